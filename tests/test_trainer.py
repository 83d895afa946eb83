"""The training loop end to end on a tiny DDPM teacher: run outputs, exact resume (also after SIGKILL, after a
failed checkpoint write and mid-schedule), the non-finite guard, multi-phase objectives and the references'
pitfalls, precision/attention/LoRA options, the student plan (``plan.json``) that trainer, objective, experts and
exports share, learning-rate schedules, and the errors users see.

The probe objectives follow the engine's contract (``fastgen.losses.base``): each phase carries its loss, and
networks are added with ``add_network`` and read back from the trainer's mapping ``nets`` on every call."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tiny import make_ddpm_folder

import fastgen.checkpoint
from fastgen.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fastgen.config import DistillConfig, load_config
from fastgen.errors import EnvironmentMissingError
from fastgen.experts import expert_index
from fastgen.losses import OBJECTIVES, Objective, Phase
from fastgen.plan import StudentPlan
from fastgen.trainer import NonFiniteLossError, Trainer, export_run

SHAPE = (3, 8, 8)
"""Sample shape of the tiny teacher."""


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    return make_ddpm_folder(tmp_path_factory.mktemp("trainer") / "teacher", sample_size=8)


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory):
    from tiny import make_sd_folder

    return make_sd_folder(tmp_path_factory.mktemp("trainer-sd") / "teacher")



def make_config(teacher, output, *overrides, method="consistency", data="teacher") -> DistillConfig:
    base = [f"teacher={teacher}", f"method={method}", f"output={output}", "seed=3", "teacher_samples=16",
            "teacher_sample_steps=2", "train.batch_size=4", "train.log_every=1", "train.lr=1e-3"]
    if data is not None:
        base.append(f"data={data}")
    return load_config(DistillConfig, None, base + list(overrides))


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in params]).clone()


def changed_at(history: list[torch.Tensor], step: int) -> bool:
    """Whether training step ``step`` changed the weights (``history[0]``: before the first step)."""
    return not torch.equal(history[step], history[step + 1])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(state: dict) -> dict:
    """A training state without what no two runs share: its wall clock (``clock``: the run's cumulative training
    time) and its recorded config (``config``: which names the run's own folder)."""
    assert "clock" in state and "lr_schedules" in state and "config" in state
    return {k: v for k, v in state.items() if k not in ("clock", "config")}


def assert_same(a, b, path="state"):
    """Bit-for-bit equality of two nested training states."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max |diff| {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# ----------------------------------------------------------------------------- test objectives


@dataclass
class ProbeConfig:
    nan_steps: list[int] = field(default_factory=list)
    critic_scale: float = 1.0


class RegressionProbe(Objective):
    """Data-free regression of the student's x0 on a fixed map of its input; the loss is NaN at
    ``nan_steps``. Records the student's weights after every step and whether autocast was on."""

    name = "probe"
    Config = ProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots = [flat(self.student.parameters())]
        self.autocast = []
        self.tf32 = []

    def phases(self):
        return [Phase("generator", ("student",), self.regression_loss)]

    def regression_loss(self, batch, step):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        self.tf32.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        x_t = torch.randn(4, *SHAPE)
        loss = (self.student(x_t, torch.full((4,), 500.0)) - 0.5 * x_t).float().square().mean()
        if step in self.config.nan_steps:
            loss = loss * math.nan
        return {"loss": loss}

    def on_step_end(self, step):
        self.snapshots.append(flat(self.student.parameters()))


class CriticProbe(Objective):
    """DMD2-like two time-scale objective: a critic of its own trained every step (a huge loss), the
    generator every 2nd step through the critic. Records the weights of the student, the critic and the
    student EMA after every step, and every phase that found gradients already present at its start.
    The critic is read from the trainer's mapping ``nets`` on every call, as the contract asks."""

    name = "critic_probe"
    Config = ProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_network("critic", self.factory.module(self.make_critic()))
        self.ema = None  # set by the test to the trainer's EMA
        self.leaked = []
        self.critic_grad_after_generator = []  # per generator step: is every critic .grad still None?
        self.generator_ran = False
        self.student_after, self.critic_after, self.ema_after = [], [], []
        self._record()

    @staticmethod
    def make_critic() -> torch.nn.Module:
        return torch.nn.Conv2d(3, 3, 1)

    @property
    def critic(self):
        return self.nets["critic"]

    def phases(self):
        return [Phase("critic", ("critic",), self.critic_loss),
                Phase("generator", ("student",), self.generator_loss, every=2)]

    def _check_leaks(self, own, phase, step):
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in own.parameters()):
            self.leaked.append((step, phase))

    def critic_loss(self, batch, step):
        self._check_leaks(self.critic, "critic", step)
        x_t, t = torch.randn(4, *SHAPE), torch.full((4,), 500.0)
        with torch.no_grad():
            fake = self.student(x_t, t)
        return {"loss": self.config.critic_scale * self.critic(fake).square().mean()}

    def generator_loss(self, batch, step):
        self._check_leaks(self.student, "generator", step)
        x_t, t = torch.randn(4, *SHAPE), torch.full((4,), 500.0)
        self.critic.zero_grad(set_to_none=True)  # the critic phase of this step ran first
        self.generator_ran = True
        return {"loss": (self.critic(self.student(x_t, t)) - x_t).square().mean()}

    def on_step_end(self, step):
        if self.generator_ran:
            self.critic_grad_after_generator.append(all(p.grad is None for p in self.critic.parameters()))
            self.generator_ran = False
        self._record()

    def _record(self):
        self.student_after.append(flat(self.student.parameters()))
        self.critic_after.append(flat(self.critic.parameters()))
        if self.ema is not None:
            self.ema_after.append(flat(self.ema.shadow_params))


class WideCriticProbe(CriticProbe):
    """``CriticProbe`` with a critic whose weight has 192² entries: bitsandbytes keeps 8-bit states only for
    tensors of 4096 entries or more (every tiny UNet tensor is smaller)."""

    name = "wide_critic_probe"

    @staticmethod
    def make_critic() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 192), torch.nn.Unflatten(1, SHAPE))


@pytest.fixture
def probes(monkeypatch):
    for probe in (RegressionProbe, CriticProbe, WideCriticProbe):
        monkeypatch.setitem(OBJECTIVES, probe.name, probe)


# ----------------------------------------------------------------------------- run outputs


def test_short_run_writes_its_outputs_and_exports_the_trained_timesteps(teacher, tmp_path):
    from fastgen.teacher import load_teacher

    run = tmp_path / "run"
    config = make_config(teacher, run, "train.max_steps=5", "train.log_every=2", "train.checkpoint_every=1",
                         "train.keep_checkpoints=2", "train.sample_every=2", "student.num_steps=2",
                         "student.timesteps=[899,399]")
    trainer = Trainer(config)
    before = flat(trainer.student.parameters())
    trainer.fit()
    assert trainer.step == 5
    assert not torch.equal(before, flat(trainer.student.parameters()))

    assert load_config(DistillConfig, run / "config.yaml") == config

    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4, 5]  # every log_every steps, and the last one
    for r in records:
        assert math.isfinite(r["generator/loss"]) and math.isfinite(r["generator/grad_norm"]), r
        assert r["nonfinite_skipped"] == 0

    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000005"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    step, state = load_checkpoint(latest_checkpoint(run))
    assert step == 5 and state["data_position"] == 5
    assert_same(state["networks"]["student"], trainer.state()["networks"]["student"])

    from PIL import Image

    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    # a row per step count served (a consistency student: 1, 2, 4, ...), 8 columns (an unconditional teacher):
    # 8-pixel images upscaled 8x, right of a 64-pixel label column, 2 pixels between and around them
    rows = len(trainer.plan.exported)
    assert rows >= 3
    assert Image.open(run / "samples" / "step-00000004.png").size == (64 + 2 + 8 * (64 + 2), 2 + rows * (64 + 2))

    plan = StudentPlan.load(run)  # the run folder's plan.json
    assert plan == trainer.plan
    export_config = plan.export_config()
    # the trained timesteps, not the defaults
    assert plan.timesteps == [899.0, 399.0] and export_config["trained_timesteps"]["2"] == [899.0, 399.0]
    assert export_config["rule"] == "renoise" and export_config["boundary"]["sigma_data"] == 0.5

    exported = load_teacher(trainer.export(tmp_path / "export"))
    assert exported.pipeline.scheduler.config.trained_timesteps == export_config["trained_timesteps"]
    # the card calls the student at the count it was trained at (2), not the smallest it serves (1)
    assert "num_inference_steps=2," in (tmp_path / "export" / "README.md").read_text()
    ema_weights = trainer.student_weights(ema=True).state_dict()
    raw_weights = trainer.student_weights(ema=False).state_dict()
    exported_weights = exported.model.state_dict()
    assert_same(exported_weights, ema_weights)
    assert any(not torch.equal(ema_weights[k], raw_weights[k]) for k in raw_weights)
    # exporting the run from its last checkpoint gives the same student
    from_run = load_teacher(export_run(run, tmp_path / "export-run"))
    assert_same(from_run.model.state_dict(), exported_weights)


# ----------------------------------------------------------------------------- exact resume and crashes


class Interrupted(Exception):
    """Raised by ``stop_after_checkpoint``: the run stopped, as if killed, right after a checkpoint."""


def stop_after_checkpoint(trainer: Trainer, step: int) -> None:
    """Make ``trainer.fit()`` raise ``Interrupted`` once the checkpoint of ``step`` is written."""
    save = trainer.save

    def save_then_stop():
        path = save()
        if trainer.step == step:
            raise Interrupted(step)
        return path

    trainer.save = save_then_stop


def expected_lr(name: str, lr: float, warmup: int, total: int, updates: int) -> float:
    """diffusers' schedule ``name`` after ``updates`` of ``total`` optimizer updates (linear warm-up first)."""
    if updates < warmup:
        return lr * updates / warmup
    progress = (updates - warmup) / max(1, total - warmup)
    return lr * {"constant": 1.0, "linear": max(0.0, 1.0 - progress),
                 "cosine": max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))}[name]


@pytest.mark.parametrize("method, overrides", [
    ("consistency", []),
    ("progressive", ["objective.start_steps=8", "objective.steps_per_round=2", "student.num_steps=2"]),
    ("consistency", ["train.lr_scheduler=cosine", "train.lr_warmup_steps=2"]),
], ids=["consistency", "progressive", "cosine-warmup"])
def test_resume_continues_exactly(teacher, tmp_path, method, overrides):
    """A run resumed from a checkpoint ends bit for bit as the same run never stopped (everything in the
    training state but the wall clock); the lr schedule, logged as ``lr/<phase>``, continues across the resume.
    With a constant lr the first part may run with a smaller ``train.max_steps``; a decaying schedule spans
    ``max_steps``, so the cosine run is stopped mid-run after its step-3 checkpoint instead."""
    straight = Trainer(make_config(teacher, tmp_path / "straight", "train.max_steps=6", "train.checkpoint_every=3",
                                   *overrides, method=method))
    straight.fit()

    scheduled = "train.lr_scheduler=cosine" in overrides
    if scheduled:
        first = Trainer(make_config(teacher, tmp_path / "resumed", "train.max_steps=6", "train.checkpoint_every=3",
                                    *overrides, method=method))
        stop_after_checkpoint(first, 3)
        with pytest.raises(Interrupted):
            first.fit()
    else:
        first = Trainer(make_config(teacher, tmp_path / "resumed", "train.max_steps=3", *overrides, method=method))
        first.fit()
    assert first.step == 3
    if method == "progressive":
        assert first.objective.round == 1  # the round state crosses the checkpoint
    resumed = Trainer(make_config(teacher, tmp_path / "resumed", "train.max_steps=6", "train.checkpoint_every=3",
                                  *overrides, method=method), resume="latest")
    assert resumed.step == 3
    assert resumed.lr_schedules.last_lr("generator") == first.lr_schedules.last_lr("generator")
    resumed.fit()
    assert resumed.step == 6
    assert_same(comparable(resumed.state()), comparable(straight.state()))
    assert_same(comparable(load_checkpoint(latest_checkpoint(tmp_path / "resumed"))[1]),
                comparable(load_checkpoint(latest_checkpoint(tmp_path / "straight"))[1]))

    records = {name: [r for r in read_metrics(tmp_path / name) if "event" not in r] for name in ("straight", "resumed")}
    assert [r["step"] for r in records["resumed"]] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in records["straight"]]
    lrs = {name: [r["lr/generator"] for r in rows] for name, rows in records.items()}
    assert lrs["resumed"] == lrs["straight"]
    name, warmup = ("cosine", 2) if scheduled else ("constant", 0)
    # the record after step s gives the lr of the next update, s updates into the schedule
    assert lrs["straight"] == pytest.approx([expected_lr(name, 1e-3, warmup, 6, s) for s in range(1, 7)], abs=1e-12)
    if scheduled:  # warm-up from 0, then decay to 0 at the last update
        assert lrs["straight"][0] == pytest.approx(5e-4) and lrs["straight"][1] == pytest.approx(1e-3)
        assert lrs["straight"][-1] == pytest.approx(0.0, abs=1e-12)
    # training time is cumulative across the resume
    times = [r["time"] for r in records["resumed"]]
    assert times == sorted(times) and resumed.state()["clock"]["elapsed"] >= times[-1]


def test_resume_after_sigkill_matches_an_uninterrupted_run(teacher, tmp_path):
    max_steps = 16
    args = ["--teacher", str(teacher), "--method", "consistency", "--data", "teacher", "--max-steps", str(max_steps),
            "seed=3", "teacher_samples=16", "teacher_sample_steps=2", "train.batch_size=4", "train.lr=1e-3",
            "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "fastgen", "distill", "--output", str(run), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    chance = random.Random()
    kill_at = chance.randint(2, max_steps - 6)
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            done = list_checkpoints(run)
            if done and int(done[-1].name.removeprefix("step-")) >= kill_at:
                time.sleep(chance.uniform(0, 0.05))  # anywhere in the next step or checkpoint write
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was to be killed after step {kill_at} but ended with {proc.returncode}: {log.read_text()[-2000:]}")
    killed_at = int(latest_checkpoint(run).name.removeprefix("step-"))
    assert kill_at <= killed_at < max_steps

    from fastgen.cli import main  # the same command, resumed in this process (saves a second start-up)

    assert main(command[3:] + ["--resume", "latest"]) == 0
    step, state = load_checkpoint(latest_checkpoint(run))
    assert step == max_steps

    straight = Trainer(make_config(teacher, tmp_path / "straight", f"train.max_steps={max_steps}"))
    straight.fit()
    reference = straight.state()
    assert_same(state["networks"], reference["networks"], f"state after a kill at step {killed_at}: networks")
    assert_same(state["ema"], reference["ema"], "ema")
    assert_same(state["optimizers"], reference["optimizers"], "optimizers")


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_resume_works(teacher, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = make_config(teacher, run, "train.max_steps=4", "train.checkpoint_every=1")
    real_save_file = fastgen.checkpoint.save_file
    saves = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        saves.append(filename)
        real_save_file(tensors, filename, *args, **kwargs)
        if len(saves) == 2:  # the second checkpoint dies after its tensors are written, before its JSON
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(fastgen.checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        Trainer(config).fit()
    monkeypatch.undo()

    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]  # no half-written folder
    assert load_checkpoint(latest_checkpoint(run))[0] == 1
    # a crash that left a temporary folder behind (SIGKILL during a write) is ignored as well
    stale = run / "checkpoints" / ".tmp-step-00000002"
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"truncated")

    resumed = Trainer(make_config(teacher, run, "train.max_steps=4", "train.checkpoint_every=1"), resume="latest")
    assert resumed.step == 1
    resumed.fit()
    assert not stale.exists()
    straight = Trainer(make_config(teacher, tmp_path / "straight", "train.max_steps=4"))
    straight.fit()
    assert_same(comparable(resumed.state()), comparable(straight.state()))


# ----------------------------------------------------------------------------- non-finite guard


def test_nonfinite_steps_are_skipped_counted_and_the_run_continues(teacher, tmp_path, probes):
    run = tmp_path / "run"
    nan_steps = [1, 2, 4]
    trainer = Trainer(make_config(teacher, run, "train.max_steps=6", "train.max_nonfinite=3",
                                  f"objective.nan_steps={nan_steps}", method="probe", data=None))
    trainer.fit()
    assert trainer.step == 6
    for step in range(6):
        assert changed_at(trainer.objective.snapshots, step) == (step not in nan_steps), f"weights at step {step}"
    assert trainer.emas["student"].optimization_step == 3
    assert {int(s["step"]) for s in trainer.optimizers["generator"].state_dict()["state"].values()} == {3}
    assert trainer.nonfinite_total == 3 and trainer.nonfinite_in_a_row == {"generator": 0}

    lines = read_metrics(run)
    events = [r for r in lines if r.get("event") == "nonfinite_loss_skipped"]
    assert [(r["step"], r["phase"], r["loss"]) for r in events] == [(s, "generator", "nan") for s in nan_steps]
    records = [r for r in lines if "event" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 2, 2, 3, 3]
    for r in records:
        # a skipped step logs no loss; every logged loss is finite
        assert ("generator/loss" in r) == (r["step"] - 1 not in nan_steps)
        assert math.isfinite(r.get("generator/loss", 0.0))


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(teacher, tmp_path, probes):
    trainer = Trainer(make_config(teacher, tmp_path / "run", "train.max_steps=8", "train.max_nonfinite=3",
                                  "objective.nan_steps=[2,3,4,5,6,7]", method="probe", data=None))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "'generator'" in message and "3 steps in a row" in message and "step 4" in message
    assert "train.max_nonfinite = 3" in message
    assert trainer.step == 4


# ----------------------------------------------------------------------------- phases and pitfalls


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the recording below
def test_phases_step_their_own_optimizers_with_clipping_ema_only_on_generator_steps(teacher, tmp_path, probes):
    max_steps, clip = 5, 1e-3
    trainer = Trainer(make_config(teacher, tmp_path / "run", f"train.max_steps={max_steps}", f"train.grad_clip={clip}",
                                  "objective.critic_scale=1e6", method="critic_probe", data=None))
    objective = trainer.objective
    objective.ema = trainer.emas["student"]
    objective.ema_after = [flat(trainer.emas["student"].shadow_params)]
    steps = []  # (training step, phase, norm of the gradient the optimizer applied)

    def recording(name, optimizer):
        original = optimizer.step

        def step(*args, **kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            steps.append((trainer.step, name, float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params])))))
            return original(*args, **kwargs)

        optimizer.step = step

    for name, optimizer in trainer.optimizers.items():
        recording(name, optimizer)
    trainer.fit()

    assert trainer.step == max_steps
    assert [s for s, name, _ in steps if name == "critic"] == [0, 1, 2, 3, 4]
    assert [s for s, name, _ in steps if name == "generator"] == [0, 2, 4]
    # clipping applies to every phase: the critic's huge gradient reaches its optimizer clipped
    assert all(norm <= clip * (1 + 1e-4) for _, _, norm in steps), steps
    assert read_metrics(tmp_path / "run")[0]["critic/grad_norm"] > 1e3 * clip
    # no phase starts with gradients left over from another (the generator loss runs through the critic),
    # and the generator phase, which backpropagates through the critic, writes no gradient into it
    assert objective.leaked == []
    assert objective.critic_grad_after_generator == [True, True, True]
    for step in range(max_steps):
        generator_step = step % 2 == 0
        assert changed_at(objective.critic_after, step), f"critic unchanged at step {step}"
        assert changed_at(objective.student_after, step) == generator_step, f"student at step {step}"
        assert changed_at(objective.ema_after, step) == generator_step, f"EMA at step {step}"
    assert trainer.emas["student"].optimization_step == 3
    # the last step (max_steps - 1 = 4, a generator step) was trained and saved
    step, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert step == max_steps
    assert_same(state["networks"]["student"], trainer.accelerator.unwrap_model(trainer.student.model).state_dict())
    assert set(state["networks"]) == {"student", "critic"} and set(state["optimizers"]) == {"critic", "generator"}


# ----------------------------------------------------------------------------- precision, attention, LoRA


def test_bf16_autocast_trains_a_float32_student(teacher, tmp_path, probes):
    from fastgen.teacher import load_teacher

    trainer = Trainer(make_config(teacher, tmp_path / "run", "train.max_steps=2", "train.mixed_precision=bf16",
                                  method="probe", data=None))
    assert trainer.teacher.model.dtype == torch.bfloat16
    # the student starts from the teacher's full-precision weights, not from their bf16 rounding
    assert_same(trainer.student.model.state_dict(), load_teacher(teacher).model.state_dict())
    trainer.fit()
    assert all(trainer.objective.autocast) and len(trainer.objective.autocast) == 2
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.emas["student"].shadow_params)
    assert not torch.equal(trainer.objective.snapshots[0], trainer.objective.snapshots[-1])
    assert math.isfinite(read_metrics(tmp_path / "run")[-1]["generator/loss"])


def test_allow_tf32_turns_tf32_on_during_fit_and_restores_torchs_flags(teacher, tmp_path, probes):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for allow in (True, False):
            trainer = Trainer(make_config(teacher, tmp_path / f"run-{allow}", "train.max_steps=2",
                                          f"train.allow_tf32={str(allow).lower()}", method="probe", data=None))
            trainer.fit()
            assert trainer.objective.tf32 == [(allow, allow)] * 2  # both flags, inside every step
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- optimizers (train.optimizer)


def test_fused_adamw_trains_as_adamw_does(teacher, tmp_path, probes):
    weights = {}
    for name in ("adamw", "fused"):
        trainer = Trainer(make_config(teacher, tmp_path / name, "train.max_steps=3", f"train.optimizer={name}",
                                      method="probe", data=None))
        assert trainer.optimizers["generator"].defaults["fused"] is (True if name == "fused" else None)
        trainer.fit()
        weights[name] = flat(trainer.student.parameters())
    # the same updates up to the kernels' rounding (Adam divides by the root of tiny second moments)
    update = (weights["adamw"] - trainer.objective.snapshots[0]).abs().max()
    assert update > 1e-3 and (weights["fused"] - weights["adamw"]).abs().max() < 0.01 * update


def test_8bit_adam_without_bitsandbytes_fails_on_one_line_before_a_weight_is_read(teacher, tmp_path, monkeypatch):
    import fastgen.assemble

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the import fails, installed or not
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)

    def no_weights(*args, **kwargs):
        raise AssertionError("a teacher weight was read")

    monkeypatch.setattr(fastgen.assemble, "load_teacher", no_weights)
    run = tmp_path / "run"
    with pytest.raises(EnvironmentMissingError) as info:
        Trainer(make_config(teacher, run, "train.max_steps=1", "train.optimizer=8bit"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("train.optimizer is '8bit', but bitsandbytes is not installed")
    assert 'pip install "fastgen-distill[bnb]"' in message and "train.optimizer=adamw" in message
    assert not run.exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_8bit_adam_trains_with_8bit_states_and_resumes_exactly(teacher, tmp_path, probes):
    """bitsandbytes' AdamW8bit (on the CPU here): the critic's 192x192 weight has 8-bit states, which a
    checkpoint holds and a resumed run continues from bit for bit."""
    from bitsandbytes.optim import AdamW8bit

    def config(run, steps):
        return make_config(teacher, tmp_path / run, f"train.max_steps={steps}", "train.optimizer=8bit",
                           "train.checkpoint_every=2", method="wide_critic_probe", data=None)

    straight = Trainer(config("straight", 4))
    assert all(isinstance(opt.optimizer, AdamW8bit) for opt in straight.optimizers.values())
    straight.fit()
    assert changed_at(straight.objective.critic_after, 3) and changed_at(straight.objective.student_after, 2)
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    critic_state = flat_tensors(state["optimizers"]["critic"]["state"])
    assert any(t.dtype == torch.uint8 and t.numel() == 192 * 192 for t in critic_state), "no 8-bit state"

    Trainer(config("resumed", 2)).fit()
    resumed = Trainer(config("resumed", 4), resume="latest")
    resumed.fit()
    assert_same(comparable(resumed.state()), comparable(straight.state()))


def flat_tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in flat_tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in flat_tensors(value)]
    return []


def test_bf16_run_of_a_text_teacher_exports_full_precision_components(sd_teacher, tmp_path):
    from fastgen.teacher import load_teacher

    trainer = Trainer(make_config(sd_teacher, tmp_path / "run", "train.max_steps=2", "train.mixed_precision=bf16"))
    trainer.fit()
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert all(math.isfinite(r["generator/loss"]) for r in read_metrics(tmp_path / "run"))
    exported = load_teacher(trainer.export(tmp_path / "export")).pipeline
    original = load_teacher(sd_teacher).pipeline
    for name in ("text_encoder", "vae"):
        assert_same(getattr(exported, name).state_dict(), getattr(original, name).state_dict(), name)
    assert_same(exported.unet.state_dict(), trainer.student_weights().state_dict(), "unet")


@pytest.mark.parametrize("fake_lora_rank", [0, 4])
def test_bf16_dmd2_with_its_gan_head_builds_and_trains_on_a_text_teacher(sd_teacher, tmp_path, fake_lora_rank):
    # the head is sized by a probe pass outside the training step: a float32 fake score fed the bf16 teacher's
    # text embeddings, or a float32 LoRA on the bf16 base, failed there with a dtype mismatch before autocast
    trainer = Trainer(make_config(sd_teacher, tmp_path / "run", "train.max_steps=2", "train.mixed_precision=bf16",
                                  f"objective.fake_lora_rank={fake_lora_rank}", "objective.critic_every=1",
                                  method="dmd2"))
    assert trainer.teacher.model.dtype == torch.bfloat16 and trainer.objective.head is not None
    trainer.fit()
    rows = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["generator/loss"]) and math.isfinite(r["critic/gan"]) for r in rows)


def test_gradient_checkpointing_and_sdpa_train_like_the_default(teacher, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    results = {}
    for name, overrides in {"default": [], "checkpointing": ["train.gradient_checkpointing=true"],
                            "sdpa": ["train.attention=sdpa"]}.items():
        trainer = Trainer(make_config(teacher, tmp_path / name, "train.max_steps=2", *overrides))
        if name == "checkpointing":
            assert trainer.student.model.is_gradient_checkpointing
        if name == "sdpa":
            processors = [m.processor for m in trainer.student.model.modules() if hasattr(m, "set_processor")]
            assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
        before = flat(trainer.student.parameters())
        trainer.fit()
        results[name] = flat(trainer.student.parameters())
        assert not torch.equal(before, results[name])
    torch.testing.assert_close(results["checkpointing"], results["default"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["sdpa"], results["default"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_xformers_is_a_clear_error(teacher, tmp_path):
    with pytest.raises(ValueError, match="train.attention is 'xformers' but xformers is not installed.*sdpa"):
        Trainer(make_config(teacher, tmp_path / "run", "train.max_steps=1", "train.attention=xformers"))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_lora_student_trains_only_the_adapter(sd_teacher, tmp_path):
    from fastgen.teacher import load_teacher

    trainer = Trainer(make_config(sd_teacher, tmp_path / "run", "train.max_steps=2", "student.lora_rank=4",
                                  "student.lora_targets=[to_q,to_v]"))
    model = trainer.accelerator.unwrap_model(trainer.student.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and (".to_q." in n or ".to_v." in n) for n in trainable)
    optimized = {id(p) for group in trainer.optimizers["generator"].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()
    after = dict(model.named_parameters())
    base = load_teacher(sd_teacher).model.state_dict()
    for n, p in after.items():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"base weight {n} changed"
            assert torch.equal(p, base[n.replace(".base_layer.", ".")]), f"base weight {n} differs from the teacher"
    assert any(not torch.equal(after[n], before[n]) for n in trainable if ".lora_B." in n)
    assert len(trainer.emas["student"].shadow_params) == len(trainable)
    # the checkpoint holds the adapter (and its optimizer state), not the frozen base: that is the teacher's
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert set(state["networks"]["student"]) == trainable
    assert len(state["optimizers"]["generator"]["state"]) == len(trainable)
    # and a fresh run resumed from it, or an export of it, holds the trained adapter on the teacher's base
    resumed = Trainer(make_config(sd_teacher, tmp_path / "run", "train.max_steps=2", "student.lora_rank=4",
                                  "student.lora_targets=[to_q,to_v]"), resume="latest")
    for n, p in trainer.accelerator.unwrap_model(resumed.student.model).named_parameters():
        assert torch.equal(p, after[n]), n
    exported = export_run(tmp_path / "run", tmp_path / "export", ema=False)
    merged = load_teacher(exported).model.state_dict()
    key = next(n for n in trainable if ".lora_B." in n).split(".lora_B.")[0].replace(".base_layer", "")
    assert not torch.equal(merged[key + ".weight"], base[key + ".weight"])  # the adapter was merged into the export


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_lora_on_a_model_without_adapter_support_is_a_clear_error(teacher, tmp_path):
    with pytest.raises(ValueError, match="student.lora_rank = 4: .*UNet2DModel lacks.*student.lora_rank=0"):
        Trainer(make_config(teacher, tmp_path / "run", "train.max_steps=1", "student.lora_rank=4"))


# ----------------------------------------------------------------------------- errors


def test_a_method_that_needs_data_without_data_says_so(teacher, tmp_path):
    with pytest.raises(ValueError, match="method 'consistency' needs data.*'teacher'"):
        Trainer(make_config(teacher, tmp_path / "run", "train.max_steps=1", data=None))
    with pytest.raises(ValueError, match="method 'consistensy' is unknown; expected one of .*'consistency'"):
        Trainer(make_config(teacher, tmp_path / "run", "train.max_steps=1", method="consistensy"))


def test_unknown_override_names_the_closest_key(teacher, tmp_path, capsys):
    from fastgen.cli import main

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--method", "consistency", "--data", "teacher",
                 "--output", str(out), "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "train.max_step" in err and "did you mean 'train.max_steps'" in err
    assert not out.exists()


def test_tensorboard_tracker_receives_the_logged_losses(teacher, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(make_config(teacher, run, "train.max_steps=3", "train.trackers=[tensorboard]")).fit()
    assert list((run / "fastgen").glob("events.out.tfevents.*")), "no tensorboard event file in RUN/fastgen"
    accumulator = EventAccumulator(str(run / "fastgen"))
    accumulator.Reload()
    losses = accumulator.Scalars("generator/loss")
    assert [e.step for e in losses] == [1, 2, 3] and all(math.isfinite(e.value) for e in losses)


# ----------------------------------------------------------------------------- the student plan (plan.json)


def test_every_part_of_a_run_agrees_with_the_plan_in_its_folder(teacher, tmp_path):
    """The run folder's plan.json (written before the first step) is what the trainer, the objective, the
    student of experts, ``Trainer.export``, ``export_run`` and ``fastgen export --run`` all use."""
    from fastgen.cli import main
    from fastgen.pipelines.export import METADATA
    from fastgen.teacher import load_teacher

    run = tmp_path / "run"
    trainer = Trainer(make_config(teacher, run, "train.max_steps=2", "student.num_steps=4", "student.experts=2"))
    plan = StudentPlan.load(run)
    assert plan == trainer.plan == trainer.objective.plan
    assert (plan.num_steps, plan.experts, plan.rule) == (4, 2, "renoise")
    objective = trainer.objective
    assert objective.timesteps == plan.timesteps == list(plan.grids[4])
    assert plan.timesteps == type(objective).default_grid(trainer.teacher.schedule, trainer.student.schedule,
                                                          objective.config, 4)
    assert trainer.student.boundaries == list(plan.expert_boundaries)
    assert expert_index(torch.tensor(plan.timesteps), plan.expert_boundaries).tolist() == [0, 0, 1, 1]
    assert plan.boundary == {"sigma_data": 0.5, "timestep_scaling": 10.0}
    # a consistency function serves 1, 2, 4 and 8 steps besides its trained count: all exported
    assert sorted(plan.exported) == sorted(plan.grids) and {1, 2, 4} <= set(plan.exported)
    trainer.fit()
    assert StudentPlan.load(run) == plan

    expected = plan.export_config()
    assert expected["trained_timesteps"]["4"] == plan.timesteps
    folders = {"trainer": trainer.export(tmp_path / "export"), "export_run": export_run(run, tmp_path / "export-run")}
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "cli-export")]) == 0
    folders["cli"] = tmp_path / "cli-export"
    for way, folder in folders.items():
        scheduler = load_teacher(folder).pipeline.scheduler.config
        assert scheduler.trained_timesteps == expected["trained_timesteps"], way
        assert scheduler.rule == plan.rule and scheduler.boundary == plan.boundary, way
        meta = json.loads((folder / METADATA).read_text())
        assert meta["experts"]["count"] == 2 and meta["experts"]["boundaries"] == list(plan.expert_boundaries), way
        assert meta["few_step_scheduler"]["trained_timesteps"] == expected["trained_timesteps"], way
    # a run folder written before plan.json existed: export resolves the same plan again from its config
    (run / "plan.json").unlink()
    old = load_teacher(export_run(run, tmp_path / "export-old")).pipeline.scheduler.config
    assert old.trained_timesteps == expected["trained_timesteps"] and old.boundary == plan.boundary


@pytest.fixture(scope="session")
def family_teachers(tmp_path_factory, teacher):
    """Tiny teachers of the three schedule families: VP (the DDPM), flow (tiny SD3: FlowMatchEulerDiscreteScheduler
    with shift 3) and EDM (the DDPM network under an EDMEulerScheduler, from tests/test_export.py: tests/tiny.py
    has no EDM teacher of its own)."""
    from test_export import edm_folder
    from tiny import make_sd3_folder

    root = tmp_path_factory.mktemp("families")
    return {"vp": teacher, "flow": make_sd3_folder(root / "sd3"), "edm": edm_folder(root / "edm")}


@pytest.mark.parametrize("family", ["flow", "vp", "edm"])
def test_a_consistency_student_of_two_experts_trains_on_the_plan_and_splits_its_steps_evenly(family_teachers,
                                                                                             tmp_path, family):
    """A 4-step consistency student of 2 experts: the objective trains the plan's timesteps, each expert owns
    two of them (on the flow teacher too, whose shift crowds its grid toward high noise), both experts train,
    and sampling the plan's grid runs expert 0, 0, 1, 1."""
    run = tmp_path / "run"
    trainer = Trainer(make_config(family_teachers[family], run, "train.max_steps=2", "train.batch_size=8",
                                  "student.num_steps=4", "student.experts=2"))
    schedule = trainer.teacher.schedule
    assert schedule.family == family and (family != "flow" or schedule.describe()["shift"] == 3.0)
    plan = trainer.plan
    assert plan == StudentPlan.load(run) and len(plan.timesteps) == 4
    assert trainer.objective.timesteps == plan.timesteps
    assert plan.timesteps == type(trainer.objective).default_grid(schedule, trainer.student.schedule,
                                                                  trainer.objective.config, 4)
    assert expert_index(torch.tensor(plan.timesteps), plan.expert_boundaries).tolist() == [0, 0, 1, 1]
    assert trainer.student.boundaries == list(plan.expert_boundaries)

    start = {name: flat(trainer.run.nets[name].parameters()) for name in trainer.student_names}
    trainer.fit()
    assert set(trainer.student_names) == {"student.0", "student.1"} == set(trainer.emas)
    for name in trainer.student_names:
        assert not torch.equal(start[name], flat(trainer.run.nets[name].parameters())), f"{name} did not train"
    assert all(math.isfinite(r["generator/loss"]) for r in read_metrics(run) if "event" not in r)

    hits = []
    hooks = [expert.register_forward_hook(lambda module, args, out, k=k: hits.append(k))
             for k, expert in enumerate(trainer.student.experts)]
    try:
        trainer.save_samples(num=2)
    finally:
        for hook in hooks:
            hook.remove()
    # a row per step count served; the trained 4-step row runs expert 0, 0, 1, 1
    rows = [expert_index(torch.tensor(plan.grids[k]), plan.expert_boundaries).tolist() for k in plan.exported]
    assert 4 in plan.exported and rows[plan.exported.index(4)] == [0, 0, 1, 1]
    assert hits == [k for row in rows for k in row]


def test_a_cosine_schedule_with_warmup_logs_each_phases_lr_along_the_schedule(teacher, tmp_path, probes):
    """``train.lr_scheduler=cosine train.lr_warmup_steps=2``: every phase's schedule counts its own updates (the
    critic's 5, the generator's 3 of 5 steps) and ``lr/<phase>`` records the lr of its next update."""
    run = tmp_path / "run"
    trainer = Trainer(make_config(teacher, run, "train.max_steps=5", "train.lr_scheduler=cosine",
                                  "train.lr_warmup_steps=2", method="critic_probe", data=None))
    trainer.fit()
    records = [r for r in read_metrics(run) if "event" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    critic = [r["lr/critic"] for r in records]
    assert critic == pytest.approx([expected_lr("cosine", 1e-3, 2, 5, s) for s in range(1, 6)], abs=1e-12)
    generator_updates = [1, 1, 2, 2, 3]  # the generator runs at steps 0, 2 and 4
    assert [r["lr/generator"] for r in records] == pytest.approx(
        [expected_lr("cosine", 1e-3, 2, 3, n) for n in generator_updates], abs=1e-12)
    assert critic[-1] == pytest.approx(0.0, abs=1e-12) and records[-1]["lr/generator"] == pytest.approx(0.0, abs=1e-12)
    for name in ("critic", "generator"):
        assert [g["lr"] for g in trainer.optimizers[name].param_groups] == [trainer.lr_schedules.last_lr(name)]
    for r in records:  # the loop's other figures
        assert r["samples_per_s"] >= 0 and r["peak_memory_bytes"] > 0 and r["time"] >= 0


def test_an_objective_key_typo_fails_on_one_line_before_a_teacher_weight_is_read(tmp_path):
    """``objective.*`` is checked when the config is built: against a teacher whose weights file is truncated,
    a typo is a one-line error naming the key (and nothing about weights); the same command without the typo
    does reach the weights, and fails on them."""
    folder = make_ddpm_folder(tmp_path / "teacher", sample_size=8)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:8])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def distill(*extra):
        out = tmp_path / "run"
        done = subprocess.run([sys.executable, "-m", "fastgen", "distill", "--teacher", str(folder), "--method",
                               "dmd2", "--output", str(out), "--max-steps", "1", *extra], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        return done, out

    done, out = distill("objective.guidance_scael=2")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "objective.guidance_scael" in lines[0] and "did you mean 'objective.guidance_scale'" in lines[0]
    assert not any(word in lines[0].lower() for word in ("weight", "safetensors", "unet", "incomplete"))
    assert not out.exists()

    done, out = distill("objective.guidance_scale=2")
    assert done.returncode == 1 and "diffusion_pytorch_model.safetensors" in done.stderr, done.stderr[-3000:]
    assert not out.exists()
