"""The training loop: one linear loop on accelerate for every objective, in one process or several
(``torchrun --nproc_per_node N``: DDP, or FSDP2 with ``train.sharding: fsdp2``; tested on CPU processes).

``Trainer(config)`` assembles the run (``fastgen.assemble.build_run``: teacher, ``StudentPlan``, students, the
objective's networks, optimizers, EMA, data), wraps the trained networks for the process group (DDP) or shards
every network (``fastgen.sharding``) and writes ``config.yaml`` and ``plan.json``. Each step then calls, in order (FastGen's callbacks, EDM's linearity):

1. the step's seed (randomness is a pure function of ``(seed, step, rank)``, data batch ``k`` of
   ``(seed, rank, k)``, so a resumed run continues exactly as if never stopped);
2. ``run_phase`` (``fastgen.step``) for every phase due at this step: micro-batches, backward, one finiteness
   check, clipping, the optimizer, its learning-rate schedule (``train.lr_scheduler``), the student's EMA;
3. the non-finite guard: a skipped phase is counted and logged; ``max_nonfinite`` in a row stop the run;
4. the objective's ``on_step_end`` (an EMA target, a progressive round);
5. logging every ``log_every`` steps: the window averages of every phase's terms across ranks, each phase's
   learning rate (``lr/<phase>``), samples per second, peak memory and the run's cumulative time, to
   ``metrics.jsonl`` and accelerate's trackers;
6. sample grids every ``sample_every`` steps (a row per step count the student serves, a column per
   ``train.validation_prompts`` prompt, the same noise every time; to ``RUN/samples/`` and to the trackers that
   take images) and checkpoints every ``checkpoint_every`` steps.

``fit`` runs with TF32 matmuls and convolutions when ``train.allow_tf32`` is set.

A run folder is written by one process: the main process holds ``RUN/.lock`` (``fastgen.runlock``) from before
anything is written until ``close()``. A folder that holds a run (``config.yaml`` or ``checkpoints/``) is resumed
(``resume="latest"``, a checkpoint folder, or ``"auto"``: the latest checkpoint when there is one, else a new run),
never trained over. A resumed run's ``metrics.jsonl`` is cut back to the checkpoint's step. SIGTERM and SIGINT
during ``fit`` stop the run after the current step and a checkpoint of it (``TrainingStopped``); a second one ends
the process at once. The teacher is probed once before any data is built (``probe_teacher``), and no export is
written of a student with non-finite weights or of a run whose phase never stepped (``check_exportable``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from fastgen.allocator import keep_heap
from fastgen.assemble import build_run, make_student, run_plan, student_names, student_schedule
from fastgen.atomic import atomic_path
from fastgen.checkpoint import (CHECKPOINTS_DIR, checkpoint_path, flatten_state, latest_checkpoint,
                                list_checkpoints, load_checkpoint, save_checkpoint, set_aside_later)
from fastgen.config import DistillConfig, absolute_paths, config_to_dict, load_config, save_config
from fastgen.data import TOY_PROMPTS, build_data, check_data, read_prompts
from fastgen.data.batch import num_rows
from fastgen.errors import EnvironmentMissingError, InputError, MissingPathError, UsageError, UserError, warn
from fastgen.networks import load_network_state, network_state
from fastgen.plan import PLAN_FILE, StudentPlan
from fastgen.policies import Clock, LRSchedules, MetricsWindow, Throughput, peak_memory_bytes, reset_peak_memory, tf32
from fastgen.runlock import RunLock
from fastgen.sharding import full, is_sharded, process_mesh, shard
from fastgen.step import run_phase
from fastgen.teacher import load_teacher

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
HEALTH_FILE = "health.jsonl"
"""The run's health checks (``fastgen.health``), one JSON line each: ``{"step", "denoise_ratio", "flat_ratio",
"verdict"}`` (``step``: the number of steps done)."""
HEALTH_TEACHER_STEPS = 16
"""DDIM steps of the teacher's reference samples for the health signal of a data-free run."""
NONFINITE_REMEDY = "lower train.lr, enable train.grad_clip or use bf16 instead of fp16"


class NonFiniteLossError(UserError, RuntimeError):
    """A phase's loss was not finite in ``train.max_nonfinite`` steps in a row, or in every step it ran."""


class NonFiniteWeightsError(UserError, ValueError):
    """A student to export holds NaN or infinite weights."""


class TrainingStopped(Exception):
    """``fit`` stopped by a signal (SIGTERM, SIGINT) after the current step and a checkpoint of it;
    ``exit_code`` is a shell's for that signal (128 + its number)."""

    def __init__(self, step: int, signum: int, run_dir: Path):
        self.step, self.signal_name, self.exit_code = step, signal.Signals(signum).name, 128 + signum
        super().__init__(f"stopped at step {step} by {self.signal_name}; its checkpoint is in "
                         f"{run_dir / CHECKPOINTS_DIR}")


class StopSignals:
    """Within: the first SIGTERM or SIGINT sets ``signum`` (the loop stops after its step); a second one restores
    the default action and raises it again, ending the process at once. Installed only in the main thread (where
    Python runs signal handlers); the previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        if os.environ.get("RANK", "0") == "0":
            print(f"error: a second {signal.Signals(signum).name} stopped the run at once, without a checkpoint of "
                  "the step in progress; the earlier checkpoints are intact (resume with --resume auto)",
                  file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one process."""
    return (seed * 1_000_003 + step * 9_973 + rank * 7_919) % (2**63 - 1)


class AcceleratorBackend:
    """``fastgen.step``'s backend on accelerate: its autocast, loss scaling, ``no_sync`` and clipping (of the
    unscaled gradients); the finiteness of a loss is agreed on by every process (one gather)."""

    def __init__(self, accelerator: Accelerator):
        self.acc = accelerator

    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss):
        self.acc.backward(loss)

    def no_sync(self, module):
        return self.acc.no_sync(module)

    def all_finite(self, value):
        ok = torch.isfinite(value.detach()).float().reshape(1)
        return bool(self.acc.gather(ok).min() > 0)

    def clip(self, params, max_norm):
        return full(self.acc.clip_grad_norm_(params, max_norm))  # over sharded gradients: the global norm

    def step(self, optimizer):
        optimizer.step()


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
                    "aim": ("aim",), "mlflow": ("mlflow",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                    "swanlab": ("swanlab",), "trackio": ("trackio",)}
"""The modules whose presence accelerate checks for each tracker (``accelerate.utils.imports.is_*_available``)."""


def check_trackers(names) -> None:
    """Raise a ``UsageError`` for a name of ``train.trackers`` that accelerate does not know (listing those it
    knows), and an ``EnvironmentMissingError`` for one whose package is not installed (naming the package),
    before anything is built."""
    import importlib.util

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = sorted(LOGGER_TYPE_TO_CLASS)
    for name in names:
        if name == "all":  # accelerate: every installed tracker
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(f"train.trackers: unknown tracker {name!r}; expected some of {', '.join(known)} "
                             "(accelerate's trackers) or all")
        modules = TRACKER_PACKAGES.get(name, (name,))
        if all(importlib.util.find_spec(module) is None for module in modules):
            raise EnvironmentMissingError(f"train.trackers: tracker {name!r} is not installed; install it "
                                          f"(pip install {modules[0]}) or remove it from train.trackers")


def read_validation_prompts(value: list[str] | str | None) -> list[str] | None:
    """The prompts of ``train.validation_prompts``: its list, or the lines of its text file (``"toy"``: the toy
    world's prompts); a missing or empty file is an error naming the key."""
    if value is None or isinstance(value, list):
        return value
    if value != TOY_PROMPTS and not Path(value).is_file():
        raise MissingPathError(f"train.validation_prompts: {value!r} is not a file; expected a text file of prompts, "
                               "one a line, or a list of prompts (train.validation_prompts=[a cat, a dog])")
    try:
        return read_prompts(value)
    except InputError as err:
        raise InputError(f"train.validation_prompts: {err}") from None


@torch.no_grad()
def probe_teacher(teacher, autocast=contextlib.nullcontext) -> None:
    """Refuse a teacher whose denoiser gives non-finite values on a probe batch: one forward of one sample of
    seeded noise at the middle of a 3-step grid of its schedule (class 0, the empty prompt or no condition), under
    ``autocast``. The error names the first non-finite weight when there is one."""
    schedule = teacher.schedule
    t = float(schedule.timesteps(3)[1])
    noise = torch.randn((1, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    cond = teacher.class_cond(torch.zeros(1)) if teacher.num_classes else teacher.null_cond(1)
    with autocast():
        out = teacher(noise.to(teacher.model.device) * schedule.prior_scale(t), t, cond)
    if bool(torch.isfinite(out).all()):
        return
    bad = first_nonfinite(teacher.model)
    where = f"; its weight {bad} holds NaN or inf" if bad else ""
    raise InputError(f"teacher {teacher.source} gives non-finite values (NaN or inf) on a probe batch (noise at "
                     f"timestep {t:g}){where}; expected a teacher whose outputs are finite: check its weights (and "
                     "train.mixed_precision: fp16 may overflow where bf16 does not)")


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """The name of ``model``'s first floating-point parameter or buffer holding a NaN or an infinity, or None."""
    return next((name for name, value in model.state_dict().items()
                 if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)


def phase_updates(lr_schedules: dict) -> dict[str, int]:
    """Each phase's optimizer updates, from the state of its learning-rate schedule (which steps once per update)."""
    return {phase: state["last_epoch"] for phase, state in lr_schedules.items()}


def check_exportable(students: dict[str, torch.nn.Module], updates: dict[str, int], skipped_in_a_row: dict[str, int],
                     step: int, run_dir: Path) -> None:
    """Refuse to export a run in which a phase ran but never stepped (every step skipped as non-finite:
    ``NonFiniteLossError``), or a student holding non-finite weights (``NonFiniteWeightsError``)."""
    kept = f"nothing was exported, and the run's checkpoints in {run_dir / CHECKPOINTS_DIR} are kept"
    for phase, skipped in skipped_in_a_row.items():
        if skipped and updates.get(phase) == 0:
            raise NonFiniteLossError(f"no step of the {phase!r} phase succeeded: its loss was not finite in all "
                                     f"{skipped} steps it ran (up to step {step}); {kept}; {NONFINITE_REMEDY}, or "
                                     "check the teacher")
    for name, model in students.items():
        bad = first_nonfinite(model)
        if bad:
            raise NonFiniteWeightsError(f"the student network {name!r} holds non-finite weights at step {step} (NaN "
                                        f"or inf in {bad}); {kept}: resume from an earlier one (--resume "
                                        f"CHECKPOINT) and {NONFINITE_REMEDY}")


def global_batch(t, world: int) -> int:
    """Samples per training step over ``world`` processes of ``train`` settings ``t``."""
    return t.batch_size * t.grad_accum * world


def make_accelerator(t, run_dir: Path, experts: int = 1) -> Accelerator:
    """accelerate's ``Accelerator`` for this process, checked to be one of the process group it was launched in.

    Under ``torchrun`` on a machine without a GPU, accelerate forms the group but reports one process on every
    rank (each would train alone, all into one folder) unless it is told the run is on the CPU
    (docs/fsdp2_findings.md, question 9): it is told. A process launched as one of several that forms no group
    (``MASTER_ADDR`` set without ``WORLD_SIZE``: ``accelerate launch --cpu --num_processes N`` starts one
    process) is refused, as is any disagreement between ``WORLD_SIZE`` and accelerate's count. A student of
    ``experts`` > 1 networks uses one expert per generator step (the step drawn), so DDP is told that a network's
    parameters may go unused in a step (``find_unused_parameters``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ:
        raise UsageError("this process was launched as one of several (MASTER_ADDR is set) but no process group "
                         "was formed (no WORLD_SIZE): `accelerate launch --cpu --num_processes N` starts one process; "
                         "launch N processes with `torchrun --nproc_per_node N -m fastgen distill ...`, or unset "
                         "MASTER_ADDR to train in one process")
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if experts > 1 else []
    acc = Accelerator(mixed_precision=t.mixed_precision, log_with=list(t.trackers) or None, project_dir=str(run_dir),
                      cpu=world > 1 and not torch.accelerator.is_available(), kwargs_handlers=handlers)
    if acc.num_processes != world:
        raise UsageError(f"WORLD_SIZE is {world}, but accelerate formed a group of {acc.num_processes}: the "
                         "processes would train as separate copies; launch with `torchrun --nproc_per_node N -m "
                         "fastgen distill ...` or `accelerate launch`")
    if world > 1 and acc.is_main_process:
        how = "networks sharded by FSDP2" if t.sharding == "fsdp2" else "data parallel"
        print(f"{world} processes ({acc.distributed_type.value}, {how}): global batch "
              f"{t.batch_size} x {t.grad_accum} x {world} = {global_batch(t, world)} per step")
    return acc


class Trainer:
    """Distil ``config.teacher`` with ``config.method`` into ``config.output`` (its local paths made absolute).

    ``resume``: None for a new run (a folder that holds a run is refused), ``"latest"``, a checkpoint folder, or
    ``"auto"`` (the latest checkpoint when the folder has one, else a new run). The main process holds the run
    folder's lock until ``close()`` (or its end)."""

    def __init__(self, config: DistillConfig, resume: str | None = None):
        config.validate()
        check_trackers(config.train.trackers)
        config = absolute_paths(config)
        self.validation_prompts = read_validation_prompts(config.train.validation_prompts)
        self.config = config
        self.run_dir = Path(config.output)
        t = config.train
        # everything is checked before the run folder is written: a failing run leaves no new folder behind,
        # and an existing one as it was
        if self.run_dir.is_file():
            raise InputError(f"output {self.run_dir} is a file; expected a run folder (a new one, or a run's to "
                             "resume)")
        resume_from = resume_target(self.run_dir, resume, config)
        if t.mixed_precision == "fp16" and not torch.accelerator.is_available():
            raise EnvironmentMissingError(
                "train.mixed_precision is 'fp16', but no GPU is available: fp16 weights on a CPU train without "
                "loss scaling; use train.mixed_precision=bf16 (CPU autocast) or no")
        if t.fsdp_offload and not torch.accelerator.is_available():
            raise EnvironmentMissingError("train.fsdp_offload keeps a GPU run's shards in CPU memory, but no GPU is "
                                          "available (a CPU run's shards are in CPU memory already); set "
                                          "train.fsdp_offload=false")
        self.accelerator = make_accelerator(t, self.run_dir, config.student.experts)
        self.lock = RunLock(self.run_dir)
        if self.accelerator.is_main_process:
            self.lock.acquire()
        try:
            self._build(resume_from)
        except BaseException:
            self.discard()
            raise

    def _build(self, resume_from: Path | None) -> None:
        """Assemble the run, resume it, and write its config, plan and trackers (main process)."""
        config, t, acc = self.config, self.config.train, self.accelerator
        self.sharded_networks: list[torch.nn.Module] = []
        run = self.run = build_run(config, device=acc.device, data=self._data, shard=self._sharder())
        if not self.sharded:  # sharded networks are never given to accelerate (docs/fsdp2_findings.md, 9)
            run.wrap(acc.prepare)
        run.optimizers = {name: acc.prepare(opt) for name, opt in run.optimizers.items()}
        self.lr_schedules = LRSchedules(run.optimizers, run.phases, t.lr_scheduler, t.lr_warmup_steps, t.max_steps)
        self.clock = Clock()  # restarted by fit, from the resumed run's training time
        self.step = 0
        self.batches_used = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = {phase.name: 0 for phase in run.phases}
        self._imageless: set[str] = set()  # trackers already named as taking no sample grids
        self.health = None  # the last fastgen.health check (check_health)
        self._health_reference = None  # a data-free run's teacher samples for it, made once
        if resume_from is not None:
            self.load(resume_from)
        # encoded once: the text encoders then leave the accelerator (the data's prompts are cached already)
        self.validation_cond = self.teacher.encode_prompts(self.validation_prompts) if self.validation_prompts \
            else None
        if self.teacher.pipeline is not None and acc.device.type != "cpu":
            self.teacher.offload_text_encoders()
        if acc.is_main_process:
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            truncate_metrics(self.run_dir / HEALTH_FILE, self.step)
            save_config(config, self.run_dir / "config.yaml")
            run.plan.save(self.run_dir)
            acc.init_trackers("fastgen", config=_flat_config(config_to_dict(config)))

    @property
    def sharded(self) -> bool:
        return self.config.train.sharding == "fsdp2"

    def _sharder(self):
        """``build_run``'s ``shard`` hook for ``train.sharding: fsdp2`` (``fastgen.sharding.shard`` over every
        process), None otherwise."""
        if not self.sharded:
            return None
        t = self.config.train
        mesh = process_mesh(self.accelerator.device)

        def sharder(module):
            self.sharded_networks.append(shard(module, mesh, block_attributes=t.fsdp_blocks,
                                               reshard_after_forward=t.fsdp_reshard_after_forward,
                                               offload=t.fsdp_offload))
        return sharder

    def _reshard(self) -> None:
        """Back to shards every network a forward left gathered (a root after a forward without backward: the
        teacher's, an EMA target's, a network another phase owns), before each phase and after the step: a
        gathered root keeps the ``requires_grad`` it was gathered with, which the next phase's ownership changes
        (``owned_by``), and what follows a step must see every parameter sharded."""
        for module in self.sharded_networks:
            if is_sharded(module):
                module.reshard()

    def close(self) -> None:
        """Release the run folder's lock (idempotent)."""
        self.lock.release()

    def discard(self) -> None:
        """After a failure before training: remove the run folder if this trainer created it, and release the lock
        (``RunLock.discard``)."""
        self.lock.discard()

    def _data(self, teacher, objective):
        """The run's data source, this process's shard of it (built on the main process first: caches); checked
        against the objective's needs, and the validation prompts against the teacher, before anything is read
        or cached."""
        config, acc = self.config, self.accelerator
        if self.validation_prompts and not teacher.text_conditioned:
            raise UsageError(f"train.validation_prompts: the teacher from {teacher.source} ({teacher.model_class}) "
                             "takes no prompts; expected a text-to-image teacher, or no train.validation_prompts")
        has_x0 = check_data(config.data, teacher, class_labels=teacher.num_classes > 0, prompts=config.prompts,
                            teacher_guidance=config.teacher_sample_guidance)
        if objective.needs_data and not has_x0:
            raise UsageError(f"method {config.method!r} needs data: pass --data with a folder of images or "
                             "'teacher' (samples generated by the teacher)")
        probe_teacher(teacher, acc.autocast)
        with acc.main_process_first():
            return build_data(config.data, teacher, config.train.batch_size, config.seed,
                              Path(config.cache_dir) if config.cache_dir else self.run_dir / "cache",
                              num_teacher_samples=config.teacher_samples, teacher_steps=config.teacher_sample_steps,
                              class_labels=teacher.num_classes > 0, prompts=config.prompts,
                              teacher_guidance=config.teacher_sample_guidance, caption_column=config.caption_column,
                              resize=config.resize_data, rank=acc.process_index, world_size=acc.num_processes)

    # -- what the rest of the package reads ----------------------------------------------------------
    @property
    def teacher(self):
        return self.run.teacher

    @property
    def objective(self):
        return self.run.objective

    @property
    def plan(self) -> StudentPlan:
        return self.run.plan

    @property
    def student(self):
        return self.run.nets["student"]

    @property
    def student_names(self) -> list[str]:
        return self.run.students

    @property
    def emas(self):
        return self.run.emas

    @property
    def optimizers(self):
        return self.run.optimizers

    # -- the loop ----------------------------------------------------------------------------------
    def _batches(self):
        """This process's batches from ``batches_used`` on, counting each one drawn (the checkpoint's data
        position)."""
        t = self.config.train
        for batch in self.run.data.loader(self.batches_used, num_workers=t.num_workers,
                                          pin_memory=self.accelerator.device.type == "cuda"):
            self.batches_used += 1
            yield batch.to(self.accelerator.device)

    def fit(self) -> dict[str, float]:
        """Train up to ``train.max_steps`` (TF32 on with ``train.allow_tf32``); the last logged values. A SIGTERM
        or SIGINT stops it after the current step and a checkpoint of it: ``TrainingStopped``."""
        t, acc = self.config.train, self.accelerator
        with tf32(t.allow_tf32), StopSignals() as signals, tqdm(  # closed before an error's line is printed
                total=t.max_steps, initial=self.step, desc="distill", disable=not acc.is_main_process) as bar:
            return self._fit(signals, bar)

    def _stop_signal(self, signals: StopSignals) -> int:
        """The signal that stops the run after this step (0: none), agreed by every process (a max-reduction per
        step when there are several)."""
        signum = signals.signum or 0
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([signum], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _fit(self, signals: StopSignals, bar: tqdm) -> dict[str, float]:
        acc, t, run = self.accelerator, self.config.train, self.run
        backend = AcceleratorBackend(acc)
        window = MetricsWindow(lambda x: acc.reduce(x, "mean") if acc.num_processes > 1 else x)
        throughput = Throughput()
        values: dict[str, float] = {}
        if acc.device.type == "cpu":
            keep_heap()  # the freed activations of a step stay mapped for the next (fastgen/allocator.py)
        # on a CPU run torch.manual_seed would also queue CUDA seeding, with a captured stack trace, every step
        seed = torch.default_generator.manual_seed if acc.device.type == "cpu" else torch.manual_seed
        batches = self._batches()
        reset_peak_memory(acc.device)
        self.clock = Clock(self.clock.offset)  # the resumed run's training time; set-up is not training
        saved, stop = None, 0
        while self.step < t.max_steps:
            seed(step_seed(self.config.seed, self.step, acc.process_index))
            run.objective.shared_rng.manual_seed(step_seed(self.config.seed, self.step, 0))  # one for all processes
            used = self.batches_used
            for phase in run.phases:
                if not phase.runs_at(self.step):
                    continue
                self._reshard()
                terms, stepped = run_phase(run, phase, batches, self.step, backend, t.grad_accum, t.grad_clip,
                                           self.lr_schedules)
                if stepped:
                    self.nonfinite_in_a_row[phase.name] = 0
                    window.add({f"{phase.name}/{k}": v for k, v in terms.items()})
                else:
                    self._count_nonfinite(phase.name, terms["loss"])
            throughput.add((self.batches_used - used) * t.batch_size * acc.num_processes)
            self._reshard()
            run.objective.on_step_end(self.step)
            self.step += 1
            bar.update(1)
            if self.step % max(t.log_every, 1) == 0 or self.step == t.max_steps:
                values = self._log(window, throughput, bar)
            if t.sample_every and self.step % t.sample_every == 0:
                self.save_samples()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                self.save()
                saved = self.step
            stop = self._stop_signal(signals)
            if stop:
                break
        if saved != self.step:
            self.save()
        if not (t.sample_every and self.step % t.sample_every == 0) and (acc.is_main_process or self.sharded):
            self.check_health()  # unless this step's samples were checked; one process unless the networks shard
        stop = stop or self._stop_signal(signals)  # a signal during the last step's checkpoint stops before export
        acc.end_training()
        if stop:
            raise TrainingStopped(self.step, stop, self.run_dir)
        return values

    def _log(self, window: MetricsWindow, throughput: Throughput, bar) -> dict[str, float]:
        """One record: window averages across ranks (collective: every rank calls it), learning rates,
        throughput, peak memory, cumulative time."""
        acc = self.accelerator
        values = window.flush()
        values.update({f"lr/{p.name}": self.lr_schedules.last_lr(p.name) for p in self.run.phases})
        extra = {"samples_per_s": round(throughput.rate(), 3), "peak_memory_bytes": peak_memory_bytes(acc.device)}
        reset_peak_memory(acc.device)
        if acc.is_main_process:
            record = {"step": self.step, "time": round(self.clock.elapsed(), 3), **values, **extra,
                      "nonfinite_skipped": self.nonfinite_total, "world_size": acc.num_processes,
                      "sharding": self.config.train.sharding,
                      "global_batch": global_batch(self.config.train, acc.num_processes)}
            with (self.run_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            postfix = {k: f"{v:.4g}" for k, v in values.items() if k.endswith("/loss")}
            verdict = self.health.verdict if self.health is not None else None
            bar.set_postfix({**postfix, **({"health": verdict.upper()} if verdict else {})})
        acc.log({**values, **extra}, step=self.step)
        return values

    def _count_nonfinite(self, phase: str, loss: torch.Tensor) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row[phase] += 1
        if self.accelerator.is_main_process:
            with (self.run_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps({"step": self.step, "event": "nonfinite_loss_skipped", "phase": phase,
                                    "loss": str(float(loss))}) + "\n")
        limit = self.config.train.max_nonfinite
        if self.nonfinite_in_a_row[phase] >= limit:
            kept = list_checkpoints(self.run_dir)
            resume = " and resume (--resume latest; the checkpoints are kept)" if kept else ""
            raise NonFiniteLossError(
                f"the {phase!r} loss was not finite in {self.nonfinite_in_a_row[phase]} steps in a row (last at step "
                f"{self.step}; train.max_nonfinite = {limit}); {NONFINITE_REMEDY}{resume}"
            )

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        acc, run = self.accelerator, self.run
        return {
            "networks": {n: network_state(run.nets[n]) for n in run.network_names},
            "optimizers": {name: opt.state_dict() for name, opt in run.optimizers.items()},
            "lr_schedules": self.lr_schedules.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "ema": {n: ema.state_dict() for n, ema in run.emas.items()} or None,
            "objective": run.objective.state_dict(),
            "data_position": self.batches_used,
            "nonfinite": [self.nonfinite_total, self.nonfinite_in_a_row],
            "clock": self.clock.state_dict(),
            "config": config_to_dict(self.config),  # what the run was trained with, beside its own config.yaml
        }

    resume_command: str | None = None
    """The command that continues this run (``fastgen distill`` sets it): a full disk's error ends with it."""

    def save(self) -> Path | None:
        """A checkpoint of this step: written by the main process, or by every process its own shards."""
        acc, keep = self.accelerator, self.config.train.keep_checkpoints
        retry = f"resume with: {self.resume_command}" if self.resume_command else "run the command again"
        acc.wait_for_everyone()
        path = None
        if self.sharded:
            self._reshard()  # a sample grid's forward leaves roots gathered
            path = save_checkpoint(self.run_dir, self.step, self.state(), keep=keep, sharded=True, retry=retry)
        elif acc.is_main_process:
            path = save_checkpoint(self.run_dir, self.step, self.state(), keep=keep, retry=retry)
        acc.wait_for_everyone()
        return path

    def load(self, which: str) -> None:
        """Resume from ``"latest"`` or a checkpoint folder."""
        path = latest_checkpoint(self.run_dir) if which == "latest" else Path(which)
        if path is None:
            raise MissingPathError(f"no checkpoint to resume in {self.run_dir / 'checkpoints'}")
        acc, run = self.accelerator, self.run
        like = None
        if self.sharded:  # the state comes back split as this run's own: its optimizer states must exist first
            from torch.distributed.checkpoint.state_dict import _init_optim_state

            for opt in run.optimizers.values():
                _init_optim_state(getattr(opt, "optimizer", opt))
            like = flatten_state(self.state())[0]
        step, state = load_checkpoint(path, like=like)
        if sorted(state["networks"]) != sorted(run.network_names):
            raise UsageError(f"checkpoint {path} holds networks {sorted(state['networks'])}; this run trains "
                             f"{sorted(run.network_names)} (a different method or student.experts?)")
        for name, sd in state["networks"].items():
            load_network_state(run.nets[name], sd)
        for name, sd in state["optimizers"].items():
            run.optimizers[name].load_state_dict(sd)
        if state.get("lr_schedules"):
            self.lr_schedules.load_state_dict(state["lr_schedules"])
        if state.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        for name, sd in (state.get("ema") or {}).items():
            if name in run.emas:
                run.emas[name].load_state_dict(sd)
                run.emas[name].to(acc.device)  # load_state_dict puts the checkpoint's CPU tensors in the shadow
        run.objective.load_state_dict(state.get("objective") or {})
        self.batches_used = state["data_position"]
        self.nonfinite_total, self.nonfinite_in_a_row = state["nonfinite"]
        self.clock = Clock((state.get("clock") or {}).get("elapsed", 0.0))
        self.step = step
        if state.get("config") is not None:  # (checkpoints written before it was recorded: none)
            self._check_recorded_config(path, state["config"])
        if acc.is_main_process:
            moved = set_aside_later(self.run_dir, step)
            if moved:
                warn(f"resuming from step {step}: set the later checkpoints aside, kept but no longer used: "
                     f"{', '.join(str(p) for p in moved)}")
            if step >= self.config.train.max_steps:
                warn(f"resuming at step {step}, at or past train.max_steps = {self.config.train.max_steps}: nothing "
                     f"is trained and step {step} is exported; expected a larger --max-steps to train further")

    def _check_recorded_config(self, path: Path, recorded: dict) -> None:
        """Refuse a ``config.yaml`` that lacks a key the checkpoint ``path`` recorded (``check_complete``), and
        name the settings this resume changes, but those ``EXPECTED_CHANGES`` (one warning line)."""
        check_complete(self.run_dir / "config.yaml", path, recorded)
        if self.accelerator.is_main_process:
            trained, now = _flat_config(recorded), _flat_config(config_to_dict(self.config))
            differ = [f"{key} {trained.get(key)!r} -> {now.get(key)!r}" for key in sorted(trained.keys() | now.keys())
                      if trained.get(key) != now.get(key) and key not in EXPECTED_CHANGES]
            if differ:
                warn(f"resuming {path} with settings other than it was trained with: {'; '.join(differ)}")

    # -- outputs ------------------------------------------------------------------------------------
    def student_weights(self, ema: bool = True, name: str = "student") -> torch.nn.Module:
        """A plain copy of a student network (an expert: ``student.k``), with its EMA weights when kept and
        asked for."""
        model = copy.deepcopy(self.accelerator.unwrap_model(self.run.module(name)))
        if ema and name in self.run.emas:
            self.run.emas[name].copy_to([p for p in model.parameters() if p.requires_grad])
        return model.eval()

    def export(self, out_dir: str | Path, lora: bool = False, ema: bool = True) -> Path | None:
        """Export the student (EMA weights by default, of each expert for a student of experts) as a diffusers
        folder; main process only. A run that ``check_exportable`` refuses writes nothing. A sharded run exports
        its latest checkpoint (complete on disk once ``save`` returns), read whole by the main process
        (``export_run``)."""
        if not self.accelerator.is_main_process:
            return None
        if self.sharded:
            return export_run(self.run_dir, out_dir, lora=lora, ema=ema)
        from fastgen.pipelines import export_student

        models = [self.student_weights(ema, name) for name in self.student_names]
        check_exportable(dict(zip(self.student_names, models)), phase_updates(self.lr_schedules.state_dict()),
                         self.nonfinite_in_a_row, self.step, self.run_dir)
        teacher = self.teacher
        if teacher.model.dtype != torch.float32:  # the export ships the teacher's other components as loaded
            teacher = load_teacher(self.config.teacher, trust_pickle=self.config.trust_pickle, **self.config.size())
        return export_student(teacher, models if len(models) > 1 else models[0], out_dir,
                              **self.plan.export_config(), lora=lora, prediction_type=self.plan.prediction_type,
                              method=self.config.method, settings=config_to_dict(self.config)["objective"],
                              health=last_health(self.run_dir))

    @torch.no_grad()
    def save_samples(self, num: int = 8) -> Path | None:
        """The sample grid of this step (main process only), ``RUN/samples/step-N.png``: a row per step count the
        student serves (``plan.exported``), a column per validation prompt or, without any, per condition of the
        data's first batch (at most ``num``), the same noise in every row and at every step (drawn from
        ``train.validation_seed``, else ``seed``); also sent to the trackers that take images. A sharded student
        samples on every process (each forward gathers its blocks from all of them).

        A video student's PNG holds the first frame of each sample, in the same layout (a column per frame would make
        8 prompts of Wan's 81 frames ~540,000 pixels wide at 832 a frame), and ``RUN/samples/step-N.gif`` beside it
        animates that labelled grid over every frame (``fastgen.generate.VIDEO_FPS``); the trackers get the PNG."""
        if not (self.accelerator.is_main_process or self.sharded):
            return None
        from fastgen.generate import labelled_frames, labelled_grid, save_animation

        acc, teacher = self.accelerator, self.teacher
        counts, latents, cond, labels = self._sample_latents(num, self.plan.exported or (self.plan.num_steps,))
        trained = counts.index(self.plan.num_steps) if self.plan.num_steps in counts else -1
        self.check_health(latents[trained], cond)
        rows = [teacher.decode(x).float().cpu() for x in latents]
        if not acc.is_main_process:
            return None
        samples, row_labels = torch.stack(rows), [f"{k} step{'s' if k > 1 else ''}" for k in counts]
        path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if samples.ndim == 6:  # videos: (rows, columns, 3, F, H, W)
            frames = labelled_frames(samples, row_labels, labels)
            save_animation(frames, path.with_suffix(".gif"))
            grid = frames[0]
        else:
            grid = labelled_grid(samples, row_labels, labels)
        grid.save(path)
        self._log_grid(grid)
        return path

    def _sample_latents(self, num: int, counts) -> tuple[list[int], list[torch.Tensor], Any, list[str] | None]:
        """The student's samples (denoiser space) at each step count of ``counts`` from the same noise: a column per
        validation prompt or, without any, per condition of the data's first batch (at most ``num``); the noise
        from ``train.validation_seed``, else ``seed``. Returns ``(counts, samples per count, cond, labels)``."""
        from fastgen.denoiser import slice_cond
        from fastgen.samplers import get_sampler

        acc, t, plan, teacher = self.accelerator, self.config.train, self.plan, self.teacher
        if self.validation_prompts:
            cond, labels = self.validation_cond, self.validation_prompts
        else:
            cond, labels = slice_cond(self.run.data.batch(0).to(acc.device).cond, slice(0, num)), None
        columns = num if cond is None else num_rows(cond)
        seed = self.config.seed if t.validation_seed is None else t.validation_seed
        den, sample = self.objective.sampling_denoiser(), get_sampler(plan.rule)
        latents = []
        for count in counts:
            timesteps = list(plan.grids[count])
            g = torch.Generator().manual_seed(seed)
            x = torch.randn((columns, *teacher.sample_shape), generator=g).to(acc.device)
            with acc.autocast():
                latents.append(sample(den, x * teacher.schedule.prior_scale(timesteps[0]), timesteps, cond=cond,
                                      generator=g).float())
        return list(counts), latents, cond, labels

    @torch.no_grad()
    def check_health(self, samples: torch.Tensor | None = None, cond=None, num: int = 8):
        """``fastgen.health.assess`` of the student's samples at its trained step count (sampled here unless
        given) against the data's first batch, or, for data-free runs, the teacher's own samples (DDIM,
        ``HEALTH_TEACHER_STEPS`` steps, from the same conditions; made once). Written to ``RUN/health.jsonl`` and,
        outside the band, warned about on one line and in the progress bar; every process of a sharded run calls
        it."""
        from fastgen.denoiser import slice_cond
        from fastgen.health import assess
        from fastgen.samplers import sample_ddim

        acc, teacher = self.accelerator, self.teacher
        if samples is None:
            _, (samples,), cond, _ = self._sample_latents(num, (self.plan.num_steps,))
        batch = self.run.data.batch(0).to(acc.device)
        if batch.x0 is not None:
            reference = batch.x0[: len(samples)]
            reference_cond = slice_cond(batch.cond, slice(0, len(reference)))
        else:
            if self._health_reference is None:
                timesteps = teacher.schedule.timesteps(HEALTH_TEACHER_STEPS).tolist()
                g = torch.Generator().manual_seed(self.config.seed + 1)
                x = torch.randn(samples.shape, generator=g).to(acc.device) * teacher.schedule.prior_scale(timesteps[0])
                with acc.autocast():
                    self._health_reference = sample_ddim(teacher.denoiser, x, timesteps, cond=cond).float()
            reference, reference_cond = self._health_reference, cond
        with acc.autocast():
            health = assess(teacher, samples, cond, reference, reference_cond, seed=self.config.seed)
        if acc.is_main_process:
            with (self.run_dir / HEALTH_FILE).open("a") as f:
                f.write(json.dumps({"step": self.step, **health.as_dict()}) + "\n")
            if health.message():
                warn(f"step {self.step}: {health.message()}")
        self.health = health
        return health

    def _log_grid(self, grid) -> None:
        """``grid`` (a PIL image) as the image ``samples`` to the run's tensorboard and wandb trackers; any other
        tracker takes none, which the log says once per tracker."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": np.asarray(grid)[None]}, step=self.step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [grid]}, step=self.step)
            elif tracker.name not in self._imageless:
                self._imageless.add(tracker.name)
                logger.warning("train.trackers: %r takes no sample grids from fastgen (tensorboard and wandb do); "
                               "they are in %s", tracker.name, self.run_dir / "samples")


def truncate_metrics(path: Path, step: int) -> None:
    """Cut ``metrics.jsonl`` back to a run resumed at ``step`` (atomically): the records of later steps and the
    events of steps from ``step`` on (an event's ``step`` is the index of the step it happened in; a record's, the
    number of steps done) go, and so does a line a killed write left incomplete. The resumed run writes them again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            at = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
        if at < step or (at == step and "event" not in record):
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


RESUME_KEYS = ("teacher", "method", "student", "objective")
"""Settings a resumed run must share with its checkpoint (the rest, e.g. ``train.max_steps``, may change)."""


def resume_target(run_dir: Path, which: str | None, config: DistillConfig) -> Path | None:
    """The checkpoint folder that ``--resume which`` names, checked to be complete and trained with this config's
    teacher, method, student and objective settings (``RESUME_KEYS``); None for a new run. ``which``: None (a
    new run: a folder that holds a run is refused), ``"latest"``, ``"auto"`` (``"latest"`` when the folder has a
    complete checkpoint, else a new run) or a checkpoint folder."""
    if which is None:
        held = [name for name in ("config.yaml", CHECKPOINTS_DIR) if (run_dir / name).exists()]
        if held:
            RunLock(run_dir).check_free()  # a run in progress there: say so, not "continue it with --resume"
            raise UsageError(f"output {run_dir} holds a run already ({' and '.join(held)}); continue it with "
                             "--resume latest (or --resume auto), or distil into a new --output")
        return None
    if which == "auto":
        if not list_checkpoints(run_dir):
            return None
        which = "latest"
    if which == "latest":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise MissingPathError(f"--resume latest: run folder {run_dir} has no checkpoint in "
                                   f"{run_dir / CHECKPOINTS_DIR}; expected the --output of an earlier `fastgen "
                                   "distill` (--resume auto starts a new run where there is none)")
    path = checkpoint_path(path if which == "latest" else which, run_dir)
    stored_file = path.parent.parent / "config.yaml"
    if not stored_file.is_file():
        raise MissingPathError(f"--resume {which}: {stored_file} is missing; expected the checkpoint of a run folder")
    check_complete(stored_file, path)
    differ = settings_differ(stored_file, config)
    if differ:
        raise UsageError(f"--resume {which}: the checkpoint was trained with other settings ({'; '.join(differ)}); "
                         "resume with the run's own settings, or distil into a new --output")
    return path


def settings_differ(stored_file: Path, config: DistillConfig) -> list[str]:
    """``"key stored -> given"`` for each of the ``RESUME_KEYS`` settings in which the run config ``stored_file``
    differs from ``config``: a checkpoint of that run cannot stand for ``config``'s student."""
    # a run from before paths were stored absolute: its relative paths as they were read, from here
    stored = _flat_config({k: v for k, v in config_to_dict(absolute_paths(load_config(DistillConfig, stored_file)))
                           .items() if k in RESUME_KEYS})
    given = _flat_config({k: v for k, v in config_to_dict(config).items() if k in RESUME_KEYS})
    return [f"{key} {stored.get(key)!r} -> {given.get(key)!r}" for key in sorted(stored.keys() | given.keys())
            if stored.get(key) != given.get(key)]


EXPECTED_CHANGES = ("output", "train.max_steps")
"""Settings a resume changes as a matter of course (a run folder moved, a run trained longer): not warned about."""
SECTIONS = ("teacher", "method", "student", "train", "objective")
"""Keys every run's ``config.yaml`` has held since the first version of fastgen."""


def check_complete(config_file: Path, checkpoint: Path, recorded: dict | None = None) -> None:
    """Refuse a run's ``config.yaml`` cut short or damaged, which would otherwise resume on defaults silently: one
    that lacks a key of ``recorded`` (the config the checkpoint recorded), or without it one of ``SECTIONS``."""
    import yaml

    try:
        tree = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        tree = None
    tree = tree if isinstance(tree, dict) else {}
    expected = _flat_config(recorded) if recorded is not None else dict.fromkeys(SECTIONS)
    have = _flat_config(tree) | dict.fromkeys(tree)
    missing = [key for key in expected if key not in have and key.split(".")[0] not in _empty_sections(tree)]
    if missing:
        named = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise InputError(f"{config_file} is cut short or damaged: it lacks {named}, which fastgen "
                         f"writes into every run's config.yaml; the settings the run was trained with are recorded "
                         f"in {checkpoint}: restore the file, or resume with a config that states them")


def _empty_sections(tree: dict) -> set[str]:
    """Top-level keys written as an empty mapping (``objective: {}``), whose recorded keys were defaults."""
    return {key for key, value in tree.items() if value == {}}


def _flat_config(tree: dict, prefix: str = "") -> dict:
    """Trackers take flat scalar hyper-parameters."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def last_health(run_dir: str | Path) -> dict | None:
    """The last health check of the run (``RUN/health.jsonl``), or ``None``."""
    path = Path(run_dir) / HEALTH_FILE
    found = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: the others still count
                continue
            found = record if isinstance(record, dict) else found
    return found


def export_run(run_dir: str | Path, out_dir: str | Path, lora: bool = False, ema: bool = True,
               checkpoint: str | Path | None = None, on_no_ema=None) -> Path:
    """Export a finished or interrupted run from its checkpoint (latest by default) without its data: the
    students and their EMA weights are rebuilt as ``build_run`` builds them, the plan read from the run. A run
    without EMA weights (``train.ema_decay`` null) exports its trained weights, as ``Trainer.export`` does, and
    says so: ``on_no_ema(checkpoint_path)`` is called, when given, before anything is loaded. A run that
    ``check_exportable`` refuses writes nothing."""
    from diffusers.training_utils import EMAModel

    from fastgen.pipelines import export_student

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        what = "does not exist" if not run_dir.exists() else "is not a fastgen run: no config.yaml"
        raise MissingPathError(f"{run_dir} {what} (expected the --output of `fastgen distill`)")
    config = load_config(DistillConfig, config_file)
    if lora and config.student.lora_rank == 0:
        raise UsageError(f"--lora: run {run_dir} has no LoRA adapter (student.lora_rank is 0, a full fine-tune); "
                         "export it without --lora")
    path = checkpoint_path(checkpoint, run_dir) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise MissingPathError(f"run {run_dir} has no checkpoint yet in {run_dir / 'checkpoints'}")
    other = path.resolve().parent.parent
    if other != run_dir.resolve() and (other / "config.yaml").is_file():
        differ = settings_differ(other / "config.yaml", config)
        if differ:
            raise UsageError(f"--checkpoint {checkpoint}: a checkpoint of run {other}, trained with other settings "
                             f"than run {run_dir} ({'; '.join(differ)}); export it with --run {other}")
    step, state = load_checkpoint(path, skip=("optimizers",))
    names = student_names(config)
    if sorted(n for n in state["networks"] if n.split(".")[0] == "student") != sorted(names):
        raise UsageError(f"checkpoint {path} holds networks {sorted(state['networks'])}; its run's config "
                         f"(student.experts = {config.student.experts}) expects {names}")
    if ema and state.get("ema") is None:  # nothing averaged: the trained weights are the student
        ema = False
        if on_no_ema is not None:
            on_no_ema(path)
    teacher = load_teacher(config.teacher, trust_pickle=config.trust_pickle, **config.size())
    # a run from before plan.json existed: its plan resolved again from its config (the same rule as at training)
    plan = StudentPlan.load(run_dir) if (run_dir / PLAN_FILE).is_file() else run_plan(config, teacher.schedule)
    students = []
    for name in names:
        student = make_student(teacher.model, config, plan, student_schedule(teacher.schedule, plan.prediction_type))
        load_network_state(student, state["networks"][name])
        if ema:
            trainable = [p for p in student.parameters() if p.requires_grad]
            averaged = EMAModel(trainable)
            averaged.load_state_dict(state["ema"][name])
            averaged.copy_to(trainable)
        students.append(student.eval())
    check_exportable(dict(zip(names, students)), phase_updates(state.get("lr_schedules") or {}),
                     state["nonfinite"][1], step, run_dir)
    return export_student(teacher, students if len(students) > 1 else students[0], out_dir, **plan.export_config(),
                          lora=lora, prediction_type=plan.prediction_type, method=config.method,
                          settings=config_to_dict(config)["objective"], health=last_health(run_dir))
