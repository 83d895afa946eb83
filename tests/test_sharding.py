"""FSDP2 (``train.sharding=fsdp2``) through the real command line on two CPU processes (torchrun, gloo).

Each method runs twice from one command, sharded and data parallel (DDP), on the same two processes: the same
seeds, the same per-rank batches, so the same global batch. The sharded run's logged terms (losses, gradient
norms) equal the replicated run's to a relative 1e-4 at the first step and 1e-3 at the next two (float32
reduction order, amplified by AdamW; measured at most 1.3e-5 and 2.8e-4), its checkpoint holds every tensor in two halves (one per process), read whole its
networks equal the replicated run's, and its export loads in stock diffusers. A run killed with SIGKILL resumes
exactly; a two-process checkpoint resumes on one process and a one-process one on two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import make_ddpm_folder, make_sd_folder

from fastgen.checkpoint import SHARDS_DIR, latest_checkpoint, list_checkpoints, load_checkpoint

FIRST_RTOL, LATER_RTOL = 1e-4, 1e-3
"""Logged terms, sharded vs replicated: the first step's differ by float32 reduction order alone; later steps'
by that difference amplified by AdamW (which divides by the root of tiny second moments)."""
WEIGHT_ATOL = 2e-3
"""Networks after 3 AdamW steps at lr 1e-4: a gradient near zero whose sign flips with the reduction order moves
a weight by up to 2 lr per step (measured max difference: see the closing tests' messages)."""


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    prompts = root / "prompts.txt"
    prompts.write_text("a red disc\na blue cross\n")
    return {"pixel": make_ddpm_folder(root / "ddpm", sample_size=8), "sd": make_sd_folder(root / "sd"),
            "prompts": prompts, "cache": root / "cache"}


def free_port() -> int:
    with socket.socket() as probe:  # torchrun's --master_port 0 hangs the rendezvous
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ENV = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1"}


def fastgen(args: list[str], processes: int = 2) -> list[str]:
    """The command line of ``fastgen ARGS`` on ``processes`` processes (torchrun), or plain."""
    if processes == 1:
        return [sys.executable, "-m", "fastgen", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(free_port()), "-m", "fastgen", *args]


def run(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    done = subprocess.run(fastgen(args, processes), env={**ENV, "HF_HOME": str(cwd / "hf")}, cwd=cwd,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


METHODS = {
    # DMD2 with a LoRA fake score on the teacher's (sharded) weights and a GAN head on its bottleneck
    "dmd2-lora-gan": ("sd", ["--method", "dmd2", "--steps", "1", "objective.fake_lora_rank=2",
                             "objective.critic_every=1"]),
    "sid": ("pixel", ["--method", "sid", "--steps", "1"]),
    "phased_dmd-2-experts": ("pixel", ["--method", "phased_dmd", "--steps", "2", "student.experts=2"]),
    "consistency": ("pixel", ["--method", "consistency", "--steps", "1"]),
}


def distill(teachers, name: str, output: Path, *extra: str) -> list[str]:
    kind, method = METHODS[name]
    data = ["--prompts", str(teachers["prompts"])] if kind == "sd" else []
    return ["distill", "--teacher", str(teachers[kind]), *method, "--data", "teacher", *data, "--output",
            str(output), "teacher_samples=8", "teacher_sample_steps=2", "train.batch_size=2", "train.log_every=1",
            f"cache_dir={teachers['cache']}", *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def terms(record: dict) -> dict[str, float]:
    """A record's averaged phase terms (``phase/term``) but the learning rates."""
    return {k: v for k, v in record.items() if "/" in k and not k.startswith("lr/")}


def assert_same_terms(sharded: list[dict], replicated: list[dict]) -> None:
    """Every logged term of every step agrees: to ``FIRST_RTOL`` at the first step, ``LATER_RTOL`` after it
    (relative to the larger of the term and 1e-3)."""
    steps = [r["step"] for r in sharded if "event" not in r]
    assert steps == [r["step"] for r in replicated if "event" not in r] and steps
    for a, b in zip((r for r in sharded if "event" not in r), (r for r in replicated if "event" not in r)):
        assert terms(a).keys() == terms(b).keys()
        rtol = FIRST_RTOL if a["step"] == 1 else LATER_RTOL
        for key in terms(a):
            difference = abs(a[key] - b[key]) / max(abs(b[key]), 1e-3)
            assert difference <= rtol, f"step {a['step']}: {key} {a[key]} (fsdp2) vs {b[key]} (ddp)"


@pytest.mark.parametrize("name", [name for name in METHODS if name != "consistency"])  # the killed run's method
def test_sharded_training_equals_data_parallel_and_exports(teachers, tmp_path, name):
    from diffusers import DiffusionPipeline
    from torch.distributed.checkpoint import FileSystemReader

    sharded, replicated = tmp_path / "fsdp2", tmp_path / "ddp"
    done = run(distill(teachers, name, sharded, "--max-steps", "3", "train.sharding=fsdp2"), tmp_path)
    assert "2 processes (MULTI_CPU, networks sharded by FSDP2): global batch 2 x 1 x 2 = 4 per step" in done.stdout
    run(distill(teachers, name, replicated, "--max-steps", "3"), tmp_path)
    assert all(r["world_size"] == 2 and r["sharding"] == "fsdp2" and r["global_batch"] == 4 for r in records(sharded))
    assert_same_terms(records(sharded), records(replicated))

    # every network tensor of the checkpoint is written in two pieces, one per process, each half of dim 0
    checkpoint = latest_checkpoint(sharded)
    stored = FileSystemReader(str(checkpoint / SHARDS_DIR)).read_metadata().state_dict_metadata
    weights = {k: v for k, v in stored.items() if k.startswith("networks.") and k.endswith("weight")}
    assert weights
    for key, meta in weights.items():
        assert len(meta.chunks) == 2, (key, meta.chunks)
        assert sorted(c.sizes[0] for c in meta.chunks) == sorted([meta.size[0] // 2, meta.size[0] - meta.size[0] // 2])
    # read whole in this process (no group): the networks the replicated run trained
    _, whole = load_checkpoint(checkpoint, skip=("optimizers",))
    _, plain = load_checkpoint(latest_checkpoint(replicated), skip=("optimizers",))
    assert whole["networks"].keys() == plain["networks"].keys()
    for net, state in plain["networks"].items():
        assert whole["networks"][net].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(whole["networks"][net][key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)

    # the export: the same folder as the replicated run's, which stock diffusers loads
    folders = {which: sorted(p.relative_to(which).as_posix() for p in which.rglob("*") if p.is_file())
               for which in (sharded / "export", replicated / "export")}
    assert folders[sharded / "export"] == folders[replicated / "export"]
    ours, theirs = (DiffusionPipeline.from_pretrained(str(d / "export"), use_safetensors=True, trust_remote_code=True)
                    for d in (sharded, replicated))
    network = "unet" if hasattr(ours, "unet") else "transformer"
    for key, value in getattr(theirs, network).state_dict().items():
        torch.testing.assert_close(getattr(ours, network).state_dict()[key], value, atol=WEIGHT_ATOL, rtol=0)


def test_killed_sharded_run_resumes_exactly_and_on_other_world_sizes(teachers, tmp_path):
    """SIGKILL to every process after a checkpoint and a later step; ``--resume latest`` (two processes) writes
    the lost steps again bit for bit, and the whole run equals a replicated (DDP) one as the other methods do
    (consistency distillation: an EMA target of the sharded student); then the run goes on in one process
    (2 -> 1) and on two again (1 -> 2)."""
    output = tmp_path / "run"
    args = distill(teachers, "consistency", output, "train.sharding=fsdp2", "train.checkpoint_every=3",
                   "train.keep_checkpoints=1")
    run(distill(teachers, "consistency", tmp_path / "ddp", "--max-steps", "5"), tmp_path)
    launcher = subprocess.Popen(fastgen([*args, "--max-steps", "300"]), env={**ENV, "HF_HOME": str(tmp_path)},
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while launcher.poll() is None and time.monotonic() < deadline:
            if list_checkpoints(output) and any(r.get("step", 0) >= 4 for r in _read_records(output)):
                # torchrun starts each worker in a session of its own: kill them, then the launcher
                for worker in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
                    os.kill(int(worker), signal.SIGKILL)
                os.killpg(launcher.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == -signal.SIGKILL
    at = int(latest_checkpoint(output).name.removeprefix("step-"))
    before = {r["step"]: r for r in _read_records(output) if "event" not in r and r["step"] > at}
    assert before, "no step after the checkpoint was logged before the kill"
    last = max(before)
    assert at == 3 and last <= 5  # the poll kills at once after step 4; the next checkpoint is step 6

    run([*args, "--resume", "latest", "--max-steps", str(last)], tmp_path)
    after = {r["step"]: r for r in records(output) if "event" not in r}
    for step, record in before.items():
        assert terms(after[step]) == terms(record), f"step {step} differs after the resume"
    assert_same_terms(records(output), [r for r in records(tmp_path / "ddp") if r.get("step", 0) <= last])

    # 2 -> 1: the two-process checkpoint (saved at the end of the resumed run) continues in one process
    run([*args, "--resume", "latest", "--max-steps", str(last + 1)], tmp_path, processes=1)
    assert records(output)[-1]["step"] == last + 1
    assert records(output)[-1]["world_size"] == 1 and records(output)[-2]["world_size"] == 2
    # 1 -> 2
    run([*args, "--resume", "latest", "--max-steps", str(last + 2)], tmp_path)
    final = records(output)[-1]
    assert final["step"] == last + 2 and all(torch.isfinite(torch.tensor(v)) for v in terms(final).values())
    _, state = load_checkpoint(latest_checkpoint(output), skip=("optimizers",))
    assert state["data_position"] > 0


def _read_records(run_dir: Path) -> list[dict]:
    """The complete lines of a metrics file another process is writing."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return found


def test_a_process_whose_peer_failed_says_so_on_one_line(teachers, tmp_path):
    """The main process refuses a run folder another run holds (its lock); the other process, left waiting in a
    collective, says that a peer ended: one line each, no traceback, no "bug in fastgen"."""
    import fcntl

    output = tmp_path / "run"
    output.mkdir()
    with (output / ".lock").open("w") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(fastgen(distill(teachers, "consistency", output, "--max-steps", "1",
                                              "train.sharding=fsdp2")),
                              env={**ENV, "HF_HOME": str(tmp_path)}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and "bug in fastgen" not in done.stderr, done.stderr[-3000:]
    assert any("in use by" in line for line in lines)
    assert any(line.startswith("error: process 1 of 2 stopped: another process of its group ended first")
               for line in lines)


def test_cpu_offload_without_a_gpu_is_one_line(teachers, tmp_path):
    done = subprocess.run(fastgen(distill(teachers, "consistency", tmp_path / "run", "train.sharding=fsdp2",
                                          "train.fsdp_offload=true"), processes=1),
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: train.fsdp_offload keeps a GPU run's shards")
    assert not (tmp_path / "run").exists()


def test_accumulation_lora_student_and_checkpointing_sharded_equal_unsharded(teachers, tmp_path):
    """One process (a group of one: the same FSDP2 code path): gradient accumulation over two micro-batches, a
    LoRA student, gradient checkpointing, a LoRA fake score and a GAN head, sharded and not."""
    extra = ["--max-steps", "2", "train.grad_accum=2", "student.lora_rank=2", "train.gradient_checkpointing=true"]
    run(distill(teachers, "dmd2-lora-gan", tmp_path / "fsdp2", *extra, "train.sharding=fsdp2"), tmp_path, processes=1)
    run(distill(teachers, "dmd2-lora-gan", tmp_path / "none", *extra), tmp_path, processes=1)
    assert_same_terms(records(tmp_path / "fsdp2"), records(tmp_path / "none"))


WHOLE_INTO_SHARDS = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from fastgen.checkpoint import flatten_state, load_checkpoint, save_checkpoint
from fastgen.sharding import process_mesh
torch.manual_seed(0)
plain = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
save_checkpoint(sys.argv[1], 1, {"networks": {"student": plain.state_dict()}})  # a whole checkpoint
mesh = process_mesh(torch.device("cpu"))
torch.manual_seed(1)
sharded = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
fully_shard(sharded, mesh=mesh)
_, state = load_checkpoint(sys.argv[1] + "/checkpoints/step-00000001",
                           like=flatten_state({"networks": {"student": sharded.state_dict()}})[0])
sharded.load_state_dict(state["networks"]["student"])
for key, value in plain.state_dict().items():
    assert type(state["networks"]["student"][key]).__name__ == "DTensor", key
    assert torch.equal(sharded.state_dict()[key].full_tensor(), value), key
print("ok")
"""


def test_a_whole_checkpoint_loads_into_sharded_networks(tmp_path):
    """A run resumed with ``train.sharding=fsdp2`` from an unsharded checkpoint: each whole tensor is split as the
    run's own (in a process of its own: a process group is global state)."""
    done = subprocess.run([sys.executable, "-c", WHOLE_INTO_SHARDS, str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr[-3000:]


WORKER_EXIT = """
import atexit, sys
from pathlib import Path
from fastgen.cli import entry
folder = Path(sys.argv[1])
atexit.register(lambda: (folder / "atexit").write_text("ran"))
class Teardown:
    def __del__(self, path=folder / "teardown", open=open):
        with open(path, "w") as f:
            f.write("ran")
teardown = Teardown()  # a global of __main__: its __del__ runs in the interpreter's teardown
print("unflushed", end="")
sys.argv = ["fastgen", *sys.argv[2:]]
entry()
"""


@pytest.mark.parametrize("world_size, command", [(1, "help"), (2, "help"), (2, "error")])
def test_a_launched_process_that_succeeded_ends_without_the_teardown(tmp_path, world_size, command):
    """``fastgen`` in a process of a multi-process launch (``WORLD_SIZE`` > 1) whose command succeeded ends through
    ``exit_worker``: status 0, the ``atexit`` callbacks run and the streams flushed, and the interpreter's teardown,
    where a gloo worker thread finishing a collective aborts the process (``fastgen.cli.exit_worker``), does not
    run. A failing command (its one ``error:`` line and status) and a process of its own tear down as usual."""
    argv = ["--help"] if command == "help" else ["export", "--run", str(tmp_path / "missing"), "--output",
                                                 str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", WORKER_EXIT, str(tmp_path), *argv], capture_output=True, text=True,
                          env={**ENV, "WORLD_SIZE": str(world_size)}, timeout=120)
    assert done.stdout.startswith("unflushed"), done.stderr[-2000:]
    if command == "help":
        assert done.returncode == 0 and "distill" in done.stdout and not done.stderr
    else:
        assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "teardown").exists() == (world_size == 1 or command == "error")


def test_two_step_dmd2_of_a_two_expert_video_teacher_shards_and_equals_data_parallel(tmp_path):
    """Wan 2.2 (two transformers by noise level, video latents), a 2-step DMD2 student of two experts: every process
    draws the same student step each iteration (``Objective.shared_rng``: FSDP2 needs the same networks run the same
    number of times everywhere), both teacher transformers are sharded, and the losses equal DDP's."""
    from tiny import make_wan_folder

    from fastgen.assemble import every_network
    from fastgen.teacher import load_teacher

    teacher = make_wan_folder(tmp_path / "wan22", boundary_ratio=0.875)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red disc\na blue cross\n")
    args = ["distill", "--teacher", str(teacher), "--method", "dmd2", "--steps", "2", "--data", "teacher", "--prompts",
            str(prompts), "--height", "32", "--width", "32", "--num-frames", "5", "--max-steps", "3",
            "student.experts=2", "teacher_samples=4", "teacher_sample_steps=2", "train.batch_size=1",
            "train.log_every=1", f"cache_dir={tmp_path / 'cache'}"]
    run([*args, "--output", str(tmp_path / "fsdp2"), "train.sharding=fsdp2"], tmp_path)
    run([*args, "--output", str(tmp_path / "ddp")], tmp_path)
    assert_same_terms(records(tmp_path / "fsdp2"), records(tmp_path / "ddp"))
    assert (tmp_path / "fsdp2" / "export" / "transformer_2").is_dir()
    loaded = load_teacher(teacher, height=32, width=32, num_frames=5)
    roots = every_network(loaded, {}, type("NoObjective", (), {})())
    assert loaded.models[1] in roots  # the second transformer is sharded like the first
