"""fastgen.policies: per-phase lr schedules against hand-computed references, exact resume, the metrics window
(over steps, across two gloo ranks, no host sync per step), the cumulative clock and the throughput window."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from fastgen import policies
from fastgen.checkpoint import load_checkpoint, save_checkpoint
from fastgen.policies import Clock, LRSchedules, MetricsWindow, Throughput, peak_memory_bytes, reset_peak_memory

LR, MAX_STEPS = 0.1, 20


@dataclass
class Phase:  # the trainer's Phase, duck-typed
    name: str
    every: int

    def runs_at(self, step: int) -> bool:
        return step % self.every == 0


PHASES = [Phase("generator", 5), Phase("critic", 1)]  # over 20 steps: 4 generator updates, 20 critic updates


def reference(name: str, warmup: int, n: int) -> list[float]:
    """The lr of update k = 0..n-1, by hand: linear warm-up from 0, then constant, linear or cosine to 0."""
    def lr(k):
        if k < warmup:
            return LR * k / warmup
        return LR * {"constant": 1.0, "linear": (n - k) / (n - warmup),
                     "cosine": 0.5 * (1 + math.cos(math.pi * (k - warmup) / (n - warmup)))}[name]
    return [lr(k) for k in range(n)]


def make(name, warmup):
    optimizers = {p.name: torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR) for p in PHASES}
    return optimizers, LRSchedules(optimizers, PHASES, name, warmup, MAX_STEPS)


def run(optimizers, schedules, steps, lrs):
    """The trainer's order: each phase that runs records the lr its update uses, steps, then steps its schedule."""
    for step in steps:
        for phase in PHASES:
            if phase.runs_at(step):
                lr = schedules.last_lr(phase.name)
                assert optimizers[phase.name].param_groups[0]["lr"] == pytest.approx(lr, abs=1e-15)
                lrs[phase.name].append(lr)
                optimizers[phase.name].step()
                schedules.step(phase.name)
    return lrs


@pytest.mark.parametrize("name,warmup", [("cosine", 2), ("linear", 2), ("linear", 0), ("constant", 0),
                                         ("constant", 3)])
def test_each_phase_follows_its_own_schedule(name, warmup):
    lrs = run(*make(name, warmup), range(MAX_STEPS), {p.name: [] for p in PHASES})
    assert len(lrs["generator"]) == 4 and len(lrs["critic"]) == 20
    for phase in ("generator", "critic"):
        assert lrs[phase] == pytest.approx(reference(name, warmup, len(lrs[phase])), abs=1e-12), phase


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="'constant', 'linear' or 'cosine'"):
        make("cosine_with_restarts", 0)


@pytest.mark.parametrize("stop", [3, 7, 11])
def test_resume_continues_exactly(stop, tmp_path):
    whole = run(*make("cosine", 2), range(MAX_STEPS), {p.name: [] for p in PHASES})

    optimizers, schedules = make("cosine", 2)
    lrs = run(optimizers, schedules, range(stop), {p.name: [] for p in PHASES})
    save_checkpoint(tmp_path, stop, {"lr_schedules": schedules.state_dict()})  # through the real checkpoint
    optimizers, schedules = make("cosine", 2)  # fresh optimizers too: the lrs come from the schedules' state
    schedules.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / f"step-{stop:08d}")[1]["lr_schedules"])
    run(optimizers, schedules, range(stop, MAX_STEPS), lrs)
    assert lrs == whole


class Recorder(TorchDispatchMode):
    """Records every aten op; a host sync (.item(), float(), bool()) is ``aten._local_scalar_dense``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


SYNC = torch.ops.aten._local_scalar_dense.default


def test_recorder_sees_a_host_sync():
    with Recorder() as recorder:
        torch.tensor(1.0).item()
    assert SYNC in recorder.ops


def test_window_means_over_steps_without_host_sync():
    calls = []
    window = MetricsWindow(reduce_mean=lambda t: calls.append(t.clone()) or t)
    assert window.flush() == {}
    with Recorder() as recorder:
        for k in range(4):
            window.add({"loss": torch.tensor(float(k)), "kl": torch.tensor(10.0 * k, dtype=torch.bfloat16)})
        window.add({"loss": torch.tensor(9.0)})
    assert recorder.ops and SYNC not in recorder.ops
    with Recorder() as recorder:
        assert window.flush() == {"kl": 15.0, "loss": 3.0}  # (0+1+2+3+9)/5
    assert SYNC not in recorder.ops  # one transfer (tolist), not an .item() per key
    assert len(calls) == 1 and calls[0].shape == (2,)  # one reduce on one stacked tensor, keys sorted
    assert calls[0].tolist() == [15.0, 3.0]
    assert window.flush() == {}  # reset
    window.add({"loss": torch.tensor(1.0)})
    assert window.flush() == {"loss": 1.0}


def _rank(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def reduce_mean(t):
        t = t.clone()
        dist.all_reduce(t)
        return t / dist.get_world_size()

    window = MetricsWindow(reduce_mean)
    for k in range(3):  # rank 0: loss 1,2,3 and kl 10,20,30; rank 1: loss 5,6,7 and kl 0, added first
        terms = {"loss": torch.tensor(1.0 + k + 4 * rank), "kl": torch.tensor(10.0 * (k + 1) * (1 - rank))}
        window.add(dict(reversed(terms.items())) if rank else terms)
    (out / f"rank{rank}.json").write_text(json.dumps(window.flush()))
    dist.destroy_process_group()


def test_window_means_across_two_gloo_ranks(tmp_path):
    # forked, not spawned: the children need not import torch again (seconds on a busy machine)
    mp.start_processes(_rank, args=(tmp_path / "store", tmp_path), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"kl": 10.0, "loss": 4.0}


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_clock_is_cumulative_across_a_resume(monkeypatch):
    now = FakeTime()
    monkeypatch.setattr(policies, "time", SimpleNamespace(perf_counter=now))
    clock = Clock()
    now.now += 30.0
    assert clock.elapsed() == 30.0
    state = clock.state_dict()
    now.now += 1000.0  # the time between the checkpoint and the resume is not training time
    resumed = Clock()
    resumed.load_state_dict(state)
    now.now += 5.0
    assert resumed.elapsed() == 35.0
    assert Clock(elapsed=12.0).elapsed() == 12.0


def test_throughput_is_per_window(monkeypatch):
    now = FakeTime()
    monkeypatch.setattr(policies, "time", SimpleNamespace(perf_counter=now))
    throughput = Throughput()
    throughput.add(8)
    throughput.add(8)
    now.now += 4.0
    assert throughput.rate() == 4.0
    throughput.add(6)
    now.now += 2.0
    assert throughput.rate() == 3.0  # the window restarted


def vm_hwm() -> int:
    """The kernel's own peak RSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_on_cpu_is_the_peak_rss():
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    reset_peak_memory("cpu")  # a no-op: a process's peak RSS cannot be reset
    peak = peak_memory_bytes(torch.device("cpu"))
    assert peak == pytest.approx(vm_hwm(), abs=2**20)  # the two counters may lag each other by a few pages
    assert peak >= block.numel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_resets_per_window():
    device = torch.device("cuda")
    block = torch.ones(64 * 2**20, dtype=torch.uint8, device=device)
    del block
    assert peak_memory_bytes(device) >= 64 * 2**20
    reset_peak_memory(device)
    assert peak_memory_bytes(device) < 64 * 2**20
