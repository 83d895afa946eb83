"""Data-parallel training through ``accelerate launch`` on two CPU processes: the ranks stay in step.

``accelerate launch --cpu`` starts a single process unless it is given an MPI host file, so the test
launches through torchrun (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``: each process then joins a
gloo process group on the CPU, as ``--cpu`` would under mpirun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import make_ddpm_folder

from fastgen.checkpoint import latest_checkpoint, load_checkpoint

HELPER = Path(__file__).with_name("run_distill.py")

@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    return make_ddpm_folder(tmp_path_factory.mktemp("distributed") / "teacher", sample_size=8)


def test_two_processes_end_with_identical_state(teacher, tmp_path):
    run, dump, max_steps = tmp_path / "run", tmp_path / "state", 4
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(HELPER), str(dump),
               f"teacher={teacher}", "method=consistency", "data=teacher", f"output={run}", "seed=3",
               "teacher_samples=16", "teacher_sample_steps=2", "train.batch_size=4", "train.grad_accum=2",
               "train.lr=1e-3", f"train.max_steps={max_steps}", "train.log_every=1", "train.checkpoint_every=2",
               "train.sample_every=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    files = [dump / f"rank{k}.safetensors" for k in (0, 1)]
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == {"num_processes": "2", "step": str(max_steps)}, "not a 2-process run"
    rank0, rank1 = (load_file(str(f)) for f in files)
    assert rank0.keys() == rank1.keys()
    assert {key.split(".")[0] for key in rank0} == {"networks", "optimizers", "ema", "objective"}
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"

    teacher_weights = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(rank0[f"networks.student.{k}"], v) for k, v in teacher_weights.items())  # it trained
    # the main process alone writes the run's files, once
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, max_steps + 1))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    step, state = load_checkpoint(latest_checkpoint(run))
    assert step == max_steps and state["data_position"] == 2 * max_steps
    for key, value in state["networks"]["student"].items():
        assert torch.equal(value, rank0[f"networks.student.{key}"]), key


def test_two_processes_train_a_head_on_a_critic_feature_with_the_critic_excluded_from_generator_steps(teacher,
                                                                                                      tmp_path):
    """The generator phase runs through a critic's first layer and a head on its activation (the critic's
    second layer takes no part): DDP raises its unused-parameter error there unless the excluded networks
    stay out of gradient synchronisation; both ranks end identical, and every network trained. The probe reads
    critic and head from the trainer's mapping (their DDP wrappers) and catches the activation with a forward
    hook on the wrapped critic's layer (tests/probes.py)."""
    run, dump, max_steps = tmp_path / "run", tmp_path / "state", 4
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(HELPER), str(dump),
               f"teacher={teacher}", "method=feature_head_probe", f"output={run}", "seed=3", "train.batch_size=4",
               "train.lr=1e-3", f"train.max_steps={max_steps}", "train.log_every=1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rank0, rank1 = (load_file(str(dump / f"rank{k}.safetensors")) for k in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
    assert {k.split(".")[1] for k in rank0 if k.startswith("networks.")} == {"student", "critic", "head"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("critic/loss" in r for r in records) and sum("generator/loss" in r for r in records) == 2


def test_plain_torchrun_of_the_cli_trains_as_one_group(teacher, tmp_path):
    """``torchrun --nproc_per_node 2 -m fastgen distill`` on CPUs, without ACCELERATE_USE_CPU: accelerate alone
    would report one process per rank (two copies training into one folder); the trainer forms the group."""
    run = tmp_path / "run"
    with socket.socket() as probe:  # a free port (torchrun's --master_port 0 hangs the rendezvous)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "fastgen", "distill", "--teacher", str(teacher), "--method", "consistency", "--data", "teacher",
               "--output", str(run), "--steps", "2", "--max-steps", "2", "teacher_samples=16",
               "teacher_sample_steps=2", "train.batch_size=4", "train.log_every=1"]
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 processes (MULTI_CPU, data parallel): global batch 4 x 1 x 2 = 8 per step" in done.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one writer
    step, state = load_checkpoint(latest_checkpoint(run))
    assert step == 2 and state["data_position"] == 2  # each rank drew 2 batches of its own shard


def test_a_process_launched_as_one_of_several_without_a_group_is_refused(teacher, tmp_path):
    """What ``accelerate launch --cpu --num_processes 2`` gives: one process, MASTER_ADDR set, no WORLD_SIZE."""
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "fastgen", "distill", "--teacher", str(teacher), "--method",
                           "consistency", "--output", str(tmp_path / "run"), "--max-steps", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: this process was launched as one of several") and "torchrun" in line
    assert not (tmp_path / "run").exists()
