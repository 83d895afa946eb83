"""fastgen.allocator.keep_heap: freed step buffers stay mapped (no page faults when they are reused)."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, resource, sys
from fastgen.allocator import keep_heap
if sys.argv[1] == "keep":
    assert keep_heap()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():  # a step's 64 activations of 1 MiB, written, then freed when the step returns
    acts = [libc.malloc(1 << 20) for _ in range(64)]
    for a in acts:
        ctypes.memset(a, 1, 1 << 20)
    for a in reversed(acts):
        libc.free(a)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    env = {"FASTGEN_KEEP_HEAP": "1", "PATH": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_heap_removes_the_page_faults_of_reallocated_step_buffers():
    default, kept = faults("default"), faults("keep")
    # by default glibc returns the freed 64 MiB to the OS, and each step faults its 16,384 pages back in
    assert default > 20 * 10_000, default
    assert kept < 20 * 100, (kept, default)


def test_keep_heap_leaves_a_user_setting_alone(monkeypatch):
    from fastgen.allocator import keep_heap

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert keep_heap() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("FASTGEN_KEEP_HEAP", "0")
    assert keep_heap() is False
