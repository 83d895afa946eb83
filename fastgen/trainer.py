"""The training loop: one loop on accelerate for every objective (distributed wrappers come from
``accelerate launch``; DDP is tested on CPU processes, FSDP and DeepSpeed are not).

Per step, each of the objective's phases that runs at this step draws ``grad_accum`` batches, sums the
scaled losses' gradients, clips the gradients of every network it trains, and steps its own optimizer;
the student's EMA is updated only after phases that train the student. A step whose loss is not finite
on any rank is skipped on all ranks, counted and logged; ``max_nonfinite`` in a row stop the run.

Randomness is a pure function of ``(seed, step, rank)`` (re-seeded at every step) and data batch ``k``
of ``(seed, rank, k)``, so a run resumed from a checkpoint continues exactly as if never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from fastgen.allocator import keep_heap
from fastgen.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from fastgen.config import DistillConfig, config_to_dict, load_config, save_config
from fastgen.data import build_data, check_data
from fastgen.denoiser import Denoiser
from fastgen.experts import ExpertsDenoiser, default_boundaries
from fastgen.errors import EnvironmentMissingError, MissingPathError, UsageError
from fastgen.losses import build_objective, default_grid
from fastgen.networks import (NetworkFactory, configure_network, load_network_state, network_module, network_state,
                              trainable_parameters)
from fastgen.schedules import NoiseSchedule, schedule_from_description
from fastgen.teacher import load_teacher


class NonFiniteLossError(RuntimeError):
    pass


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one process."""
    return (seed * 1_000_003 + step * 9_973 + rank * 7_919) % (2**63 - 1)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the teacher's weights are held in for ``train.mixed_precision`` (students stay float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def make_student(teacher_model: torch.nn.Module, config: DistillConfig) -> torch.nn.Module:
    """A trainable copy of the teacher network, or the copy frozen with a LoRA adapter (peft)."""
    student = copy.deepcopy(teacher_model).float().train()
    s = config.student
    if s.lora_rank > 0:
        from peft import LoraConfig

        if not hasattr(student, "add_adapter"):
            raise UsageError(f"student.lora_rank = {s.lora_rank}: a LoRA student needs a denoiser with diffusers' "
                             f"adapter support (add_adapter), which {type(student).__name__} lacks; "
                             "use a full fine-tune (student.lora_rank=0)")
        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha or s.lora_rank,
                                       init_lora_weights="gaussian", target_modules=list(s.lora_targets)))
    else:
        student.requires_grad_(True)
    return student


def student_schedule(schedule: NoiseSchedule, prediction_type: str | None) -> NoiseSchedule:
    """The teacher's schedule, with the student's own output type when ``student.prediction_type`` is set."""
    if prediction_type is None or prediction_type == schedule.prediction_type:
        return schedule
    if prediction_type not in schedule.supported_predictions:
        raise UsageError(f"student.prediction_type is {prediction_type!r}; a {schedule.family} teacher's student "
                         f"takes one of {list(schedule.supported_predictions)}")
    return schedule_from_description({**schedule.describe(), "prediction_type": prediction_type})


def student_boundaries(config: DistillConfig, schedule: NoiseSchedule, student: NoiseSchedule) -> list[float]:
    """The native times between the experts of a student of ``student.experts`` experts: ``student.expert_boundaries``,
    else halfway between groups of its timesteps (``default_boundaries``; by default the method's grid)."""
    s = config.student
    grid = s.timesteps or default_grid(config.method, schedule, student, config.objective, s.num_steps)
    return s.expert_boundaries or default_boundaries(grid, s.experts)


class Trainer:
    """Distil ``config.teacher`` with ``config.method`` into ``config.output``."""

    def __init__(self, config: DistillConfig, resume: str | None = None):
        config.validate()
        self.config = config
        self.run_dir = Path(config.output)
        t = config.train
        # everything is checked before the run folder is written: a failing run leaves no new folder behind,
        # and an existing one as it was
        resume_from = resume_target(self.run_dir, resume, config) if resume else None
        if t.mixed_precision == "fp16" and not torch.accelerator.is_available():
            raise EnvironmentMissingError(
                "train.mixed_precision is 'fp16', but no GPU is available: fp16 weights on a CPU train without "
                "loss scaling; use train.mixed_precision=bf16 (CPU autocast) or no")
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, log_with=list(t.trackers) or None,
                                       project_dir=str(self.run_dir))
        acc = self.accelerator
        torch.manual_seed(config.seed)  # the initial weights of LoRA adapters, heads and copies follow the seed
        dtype = weight_dtype(t.mixed_precision)
        self.teacher = load_teacher(config.teacher, device=acc.device, dtype=dtype,
                                    trust_pickle=config.trust_pickle)
        # the student starts from the full-precision weights, not from the teacher's fp16/bf16 rounding of them
        full = self.teacher if dtype == torch.float32 else load_teacher(config.teacher,
                                                                                trust_pickle=config.trust_pickle)
        schedule = student_schedule(self.teacher.schedule, config.student.prediction_type)
        self.student_names = ["student"] if config.student.experts == 1 else [
            f"student.{k}" for k in range(config.student.experts)]
        experts = []
        for _ in self.student_names:
            model = make_student(full.model, config)
            configure_network(model, t.attention, t.gradient_checkpointing)
            experts.append(Denoiser(model, schedule))
        if len(experts) == 1:
            self.student = experts[0]
        else:
            self.student = ExpertsDenoiser(experts, student_boundaries(config, self.teacher.schedule, schedule))
        # students first: LoRA networks the objective adds on the teacher's weights stay out of their copies
        factory = NetworkFactory(self.teacher, t.attention, t.gradient_checkpointing, source=full.model)
        self.objective = build_objective(config.method, self.teacher, self.student, config.objective,
                                         config.student.num_steps, config.student.timesteps, t.max_steps,
                                         factory=factory)
        factory.release()
        del full, factory
        has_x0 = check_data(config.data, self.teacher, class_labels=self.teacher.num_classes > 0, prompts=config.prompts,
                            teacher_guidance=config.teacher_sample_guidance)
        if self.objective.needs_data and not has_x0:
            raise UsageError(f"method {config.method!r} needs data: pass --data with a folder of images or "
                             "'teacher' (samples generated by the teacher)")
        with acc.main_process_first():
            self.data = build_data(config.data, self.teacher, t.batch_size, config.seed * 1000 + acc.process_index,
                                   self.run_dir / "cache", num_teacher_samples=config.teacher_samples,
                                   teacher_steps=config.teacher_sample_steps,
                                   class_labels=self.teacher.num_classes > 0, prompts=config.prompts,
                                   teacher_guidance=config.teacher_sample_guidance,
                                   caption_column=config.caption_column)
        self._build_optimizers()
        self.emas = {}  # one EMA per student network (per expert)
        if t.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.emas = {n: EMAModel(self.trainable[n], decay=t.ema_decay, foreach=True) for n in self.student_names}
        self.step = 0
        self.batches_used = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = {phase.name: 0 for phase in self.phases}
        if resume_from is not None:
            self.load(resume_from)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
            (self.run_dir / "export_config.json").write_text(json.dumps(self.objective.export_config(), indent=2))
            acc.init_trackers("fastgen", config=_flat_config(config_to_dict(config)))

    # -- networks and optimizers --------------------------------------------------------------------
    def _attr(self, name: str):
        """The ``Denoiser`` or module behind a network name (``student``, ``student.k``, objective networks)."""
        if name in self.student_names:
            return self.student if name == "student" else self.student.experts[int(name.split(".")[1])]
        return getattr(self.objective, name)

    def _network(self, name: str) -> torch.nn.Module:
        return network_module(self._attr(name))

    def _set_network(self, name: str, module: torch.nn.Module) -> None:
        attr = self._attr(name)
        if isinstance(attr, Denoiser):
            attr.model = module
        else:
            setattr(self.objective, name, module)

    def _phase_networks(self, phase) -> list[str]:
        """The networks a phase trains; ``"student"`` names every expert of a student of experts."""
        names = []
        for name in phase.networks:
            names += self.student_names if name == "student" else [name]
        return names

    def _build_optimizers(self) -> None:
        t = self.config.train
        self.phases = self.objective.phases()
        self.network_names = [*self.student_names, *sorted(self.objective.networks())]
        known = {*self.network_names, "student"}
        # built once: the training step clips, averages and excludes these lists
        self.trainable = {name: trainable_parameters(self._attr(name)) for name in self.network_names}
        for name in self.network_names:
            self._set_network(name, self.accelerator.prepare(self._network(name)))
        self.optimizers = {}
        self.phase_params = {}
        self.excluded = {}  # per phase: the trainable networks it does not own
        for phase in self.phases:
            unknown = set(phase.networks) - known
            if unknown:
                raise ValueError(f"phase {phase.name!r} trains {sorted(unknown)}, which the objective does not own; "
                                 f"expected names among {sorted(known)}")
            owned = self._phase_networks(phase)
            self.excluded[phase.name] = [n for n in self.network_names if n not in owned]
            params = self.phase_params[phase.name] = [p for n in owned for p in self.trainable[n]]
            opt = torch.optim.AdamW(params, lr=phase.lr or t.lr, betas=phase.betas or tuple(t.betas),
                                    weight_decay=t.weight_decay if phase.weight_decay is None else phase.weight_decay)
            self.optimizers[phase.name] = self.accelerator.prepare(opt)

    @contextlib.contextmanager
    def _owned_by(self, phase):
        """Only ``phase``'s networks take gradients while it runs: every other trainable network has
        ``requires_grad`` off (gradients still flow through its inputs) and, under DDP, skips gradient
        synchronisation; restored afterwards."""
        excluded = self.excluded[phase.name]
        with contextlib.ExitStack() as stack:
            for name in excluded:
                stack.enter_context(self.accelerator.no_sync(self._network(name)))
                for p in self.trainable[name]:
                    p.requires_grad_(False)
            try:
                yield
            finally:
                for name in excluded:
                    for p in self.trainable[name]:
                        p.requires_grad_(True)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        acc, t = self.accelerator, self.config.train
        bar = tqdm(total=t.max_steps, initial=self.step, desc="distill", disable=not acc.is_main_process)
        metrics_file = self.run_dir / "metrics.jsonl"
        logged: dict[str, torch.Tensor] = {}  # the latest terms of every phase that ran since the last record
        values: dict[str, float] = {}
        if acc.device.type == "cpu":
            keep_heap()  # the freed activations of a step stay mapped for the next (fastgen/allocator.py)
        # on a CPU run torch.manual_seed would also queue CUDA seeding, with a captured stack trace, every step
        seed = torch.default_generator.manual_seed if acc.device.type == "cpu" else torch.manual_seed
        start = time.perf_counter()
        while self.step < t.max_steps:
            seed(step_seed(self.config.seed, self.step, acc.process_index))
            logged.update(self._train_step())
            self.objective.on_step_end(self.step)
            self.step += 1
            bar.update(1)
            if self.step % max(t.log_every, 1) == 0 or self.step == t.max_steps:
                values = {k: float(v) for k, v in logged.items()}  # the only host sync of the logged terms
                if acc.is_main_process:
                    record = {"step": self.step, "time": round(time.perf_counter() - start, 3), **values,
                              "nonfinite_skipped": self.nonfinite_total}
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k.endswith("/loss")})
                acc.log(values, step=self.step)
                logged = {}
            if t.sample_every and self.step % t.sample_every == 0:
                self.save_samples()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                self.save()
        bar.close()
        self.save()
        acc.end_training()
        return values

    def _train_step(self) -> dict[str, torch.Tensor]:
        """One step of every phase due now; returns the logged terms as detached tensors (no host sync)."""
        acc, t = self.accelerator, self.config.train
        logged = {}
        for phase in self.phases:
            if not phase.runs_at(self.step):
                continue
            opt = self.optimizers[phase.name]
            opt.zero_grad(set_to_none=True)
            nets = [self._network(n) for n in self._phase_networks(phase)]
            totals: dict[str, torch.Tensor] = {}
            finite = True
            with self._owned_by(phase):
                for micro in range(t.grad_accum):
                    batch = self.data.batch(self.batches_used).to(acc.device)
                    self.batches_used += 1
                    sync = micro == t.grad_accum - 1
                    with contextlib.ExitStack() as stack:
                        if not sync:
                            for net in nets:
                                stack.enter_context(acc.no_sync(net))
                        with acc.autocast():
                            out = self.objective.loss(phase.name, batch, self.step)
                        loss = out["loss"]
                        ok = torch.isfinite(loss.detach()).float().reshape(1)
                        finite = finite and bool(acc.gather(ok).min() > 0)
                        if finite:
                            acc.backward(loss / t.grad_accum)
                    for key, value in out.items():
                        totals[key] = totals.get(key, 0.0) + value.detach().float() / t.grad_accum
            if not finite:
                opt.zero_grad(set_to_none=True)
                self._count_nonfinite(phase.name, float(totals.get("loss", math.nan)))
                continue
            self.nonfinite_in_a_row[phase.name] = 0
            if t.grad_clip is not None:
                totals["grad_norm"] = acc.clip_grad_norm_(self.phase_params[phase.name], t.grad_clip)
            opt.step()
            for name in self._phase_networks(phase):
                if name in self.emas:
                    self.emas[name].step(self.trainable[name])
            logged.update({f"{phase.name}/{k}": v for k, v in totals.items()})
        return logged

    def _count_nonfinite(self, phase: str, value: float) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row[phase] += 1
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, "event": "nonfinite_loss_skipped", "phase": phase,
                                    "loss": str(value)}) + "\n")
        limit = self.config.train.max_nonfinite
        if self.nonfinite_in_a_row[phase] >= limit:
            raise NonFiniteLossError(
                f"the {phase!r} loss was not finite in {self.nonfinite_in_a_row[phase]} steps in a row (last at step "
                f"{self.step}; train.max_nonfinite = {limit}); lower train.lr, enable train.grad_clip or use "
                "bf16 instead of fp16"
            )

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        acc = self.accelerator
        return {
            "networks": {n: network_state(self._attr(n)) for n in self.network_names},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "ema": {n: ema.state_dict() for n, ema in self.emas.items()} or None,
            "objective": self.objective.state_dict(),
            "data_position": self.batches_used,
            "nonfinite": [self.nonfinite_total, self.nonfinite_in_a_row],
        }

    def save(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            path = save_checkpoint(self.run_dir, self.step, self.state(), keep=self.config.train.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def load(self, which: str) -> None:
        """Resume from ``"latest"`` or a checkpoint folder."""
        path = latest_checkpoint(self.run_dir) if which == "latest" else Path(which)
        if path is None:
            raise MissingPathError(f"no checkpoint to resume in {self.run_dir / 'checkpoints'}")
        step, state = load_checkpoint(path)
        acc = self.accelerator
        if sorted(state["networks"]) != sorted(self.network_names):
            raise UsageError(f"checkpoint {path} holds networks {sorted(state['networks'])}; this run trains "
                             f"{sorted(self.network_names)} (a different method or student.experts?)")
        for name, sd in state["networks"].items():
            load_network_state(self._attr(name), sd)
        for name, sd in state["optimizers"].items():
            self.optimizers[name].load_state_dict(sd)
        if state.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        for name, sd in (state.get("ema") or {}).items():
            if name in self.emas:
                self.emas[name].load_state_dict(sd)
                self.emas[name].to(acc.device)  # load_state_dict puts the checkpoint's CPU tensors in the shadow
        self.objective.load_state_dict(state.get("objective") or {})
        self.batches_used = state["data_position"]
        self.nonfinite_total, self.nonfinite_in_a_row = state["nonfinite"]
        self.step = step

    # -- outputs ------------------------------------------------------------------------------------
    def student_weights(self, ema: bool = True, name: str = "student") -> torch.nn.Module:
        """A plain copy of a student network (an expert: ``student.k``), with its EMA weights when kept and
        asked for."""
        model = copy.deepcopy(self.accelerator.unwrap_model(self._network(name)))
        if ema and name in self.emas:
            self.emas[name].copy_to([p for p in model.parameters() if p.requires_grad])
        return model.eval()

    def export(self, out_dir: str | Path, lora: bool = False, ema: bool = True) -> Path | None:
        """Export the student (EMA weights by default, of each expert for a student of experts) as a diffusers
        folder; main process only."""
        if not self.accelerator.is_main_process:
            return None
        from fastgen.pipelines import export_student

        models = [self.student_weights(ema, name) for name in self.student_names]
        export = {"expert_boundaries": getattr(self.student, "boundaries", None), **self.objective.export_config()}
        teacher = self.teacher
        if teacher.model.dtype != torch.float32:  # the export ships the teacher's other components as loaded
            teacher = load_teacher(self.config.teacher, trust_pickle=self.config.trust_pickle)
        return export_student(teacher, models if len(models) > 1 else models[0], out_dir, **export, lora=lora,
                              prediction_type=self.student.schedule.prediction_type, method=self.config.method,
                              settings=self.config.objective)

    @torch.no_grad()
    def save_samples(self, num: int = 16) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        from fastgen.generate import save_grid
        from fastgen.samplers import get_sampler

        den = self.objective.sampling_denoiser()
        g = torch.Generator().manual_seed(self.config.seed)
        x = torch.randn((num, *self.teacher.sample_shape), generator=g).to(self.accelerator.device)
        cond = self.data.batch(0).to(self.accelerator.device).cond
        if cond is not None:
            from fastgen.denoiser import slice_cond

            cond = slice_cond(cond, slice(0, num))
            x = x[: _batch_size(cond)]
        out = get_sampler(self.objective.rule)(den, x, self.objective.timesteps, cond=cond, generator=g)
        return save_grid(self.teacher.decode(out), self.run_dir / "samples" / f"step-{self.step:08d}.png")


RESUME_KEYS = ("teacher", "method", "student", "objective")
"""Settings a resumed run must share with its checkpoint (the rest, e.g. ``train.max_steps``, may change)."""


def resume_target(run_dir: Path, which: str, config: DistillConfig) -> Path:
    """The checkpoint folder that ``--resume which`` names (``"latest"`` or a folder), checked to be complete and
    trained with this config's teacher, method, student and objective settings (``RESUME_KEYS``)."""
    if which == "latest":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise MissingPathError(f"--resume latest: run folder {run_dir} has no checkpoint in "
                                   f"{run_dir / 'checkpoints'}; expected the --output of an earlier `fastgen distill`")
    path = checkpoint_path(path if which == "latest" else which)
    stored_file = path.parent.parent / "config.yaml"
    if not stored_file.is_file():
        raise MissingPathError(f"--resume {which}: {stored_file} is missing; expected the checkpoint of a run folder")
    stored = _flat_config({k: v for k, v in config_to_dict(load_config(DistillConfig, stored_file)).items()
                           if k in RESUME_KEYS})
    given = _flat_config({k: v for k, v in config_to_dict(config).items() if k in RESUME_KEYS})
    differ = [f"{key} {stored.get(key)!r} -> {given.get(key)!r}" for key in sorted(stored.keys() | given.keys())
              if stored.get(key) != given.get(key)]
    if differ:
        raise UsageError(f"--resume {which}: the checkpoint was trained with other settings ({'; '.join(differ)}); "
                         "resume with the run's own settings, or distil into a new --output")
    return path


def _batch_size(cond) -> int:
    for value in cond.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
        if isinstance(value, dict):
            return _batch_size(value)
    raise ValueError("condition holds no tensor")


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


def export_run(run_dir: str | Path, out_dir: str | Path, lora: bool = False, ema: bool = True,
               checkpoint: str | Path | None = None) -> Path:
    """Export a finished or interrupted run from its checkpoint (latest by default) without its data."""
    from diffusers.training_utils import EMAModel

    from fastgen.config import load_config
    from fastgen.pipelines import export_student

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise MissingPathError(f"{run_dir} is not a fastgen run: no config.yaml (expected the --output of "
                               "`fastgen distill`)")
    config = load_config(DistillConfig, config_file)
    if lora and config.student.lora_rank == 0:
        raise UsageError(f"--lora: run {run_dir} has no LoRA adapter (student.lora_rank is 0, a full fine-tune); "
                         "export it without --lora")
    path = checkpoint_path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise MissingPathError(f"run {run_dir} has no checkpoint yet in {run_dir / 'checkpoints'}")
    _, state = load_checkpoint(path)
    names = ["student"] if config.student.experts == 1 else [f"student.{k}" for k in range(config.student.experts)]
    if sorted(n for n in state["networks"] if n.split(".")[0] == "student") != sorted(names):
        raise UsageError(f"checkpoint {path} holds networks {sorted(state['networks'])}; its run's config "
                         f"(student.experts = {config.student.experts}) expects {names}")
    if ema and state.get("ema") is None:
        raise UsageError(f"checkpoint {path} holds no EMA weights (train.ema_decay was null); pass --no-ema")
    teacher = load_teacher(config.teacher, trust_pickle=config.trust_pickle)
    students = []
    for name in names:
        student = make_student(teacher.model, config)
        student.load_state_dict(state["networks"][name])
        if ema:
            trainable = [p for p in student.parameters() if p.requires_grad]
            averaged = EMAModel(trainable)
            averaged.load_state_dict(state["ema"][name])
            averaged.copy_to(trainable)
        students.append(student.eval())
    # the objective may record the boundaries itself (Phased DMD); else they are the config's
    schedule = student_schedule(teacher.schedule, config.student.prediction_type)
    export = {"expert_boundaries": student_boundaries(config, teacher.schedule, schedule) if len(names) > 1 else None,
              **json.loads((run_dir / "export_config.json").read_text())}
    prediction_type = schedule.prediction_type
    return export_student(teacher, students if len(students) > 1 else students[0], out_dir, **export, lora=lora,
                          prediction_type=prediction_type, method=config.method, settings=config.objective)
