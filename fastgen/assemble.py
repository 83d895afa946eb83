"""Assembly of a run: the one place that turns a ``DistillConfig`` into networks, optimizers and data.

``build_run(config)`` makes, in order: the teacher (loaded, or given: ``fastgen estimate`` passes one built
from configs on fake tensors), the ``StudentPlan`` (``fastgen.plan``, before any network is built), the
student (one network, or ``student.experts`` experts over the plan's boundaries), the objective and the
networks it adds, each phase's optimizer (``train.optimizer``), the student's EMA and the data. The trainer,
``fastgen estimate`` and ``export_run`` all build through it; nothing else assembles a run.

Networks live in one mapping, ``Run.nets``, which the objective reads on every call: ``"student"`` (a
``Denoiser``, or an ``ExpertsDenoiser`` over ``"student.k"``) and the objective's own networks. The trainer
wraps a network (DDP) by replacing its entry (``Run.wrap``), never by writing into an object.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fastgen.config import DistillConfig
from fastgen.denoiser import Denoiser
from fastgen.errors import EnvironmentMissingError, UsageError
from fastgen.experts import ExpertsDenoiser
from fastgen.losses import Objective, Phase, objective_class
from fastgen.networks import NetworkFactory, configure_network, float32, network_module, trainable_parameters
from fastgen.plan import StudentPlan, resolve_plan
from fastgen.schedules import NoiseSchedule, schedule_from_description
from fastgen.teacher import load_teacher


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the teacher's weights are held in for ``train.mixed_precision`` (students stay float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def make_student(teacher_model: nn.Module, config: DistillConfig, plan: StudentPlan,
                 schedule: NoiseSchedule) -> nn.Module:
    """A trainable copy of the teacher network, or the copy frozen with a LoRA adapter (peft), with the inputs the
    objective's student adds (``Objective.student_network``; ``plan`` and the student's ``schedule`` fix them)."""
    if getattr(teacher_model, "duration_embedding", None) is not None:
        raise UsageError(f"teacher {config.teacher} is a MeanFlow student (an export of fastgen's meanflow method): its "
                         "network answers its grid's timesteps with average velocities; distil from a diffusion or "
                         "flow model (its own teacher)")
    student = float32(copy.deepcopy(teacher_model)).train()
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
    return objective_class(config.method).student_network(student, plan, schedule)


def optimizer_class(name: str, device: torch.device | str = "cpu") -> Callable[..., torch.optim.Optimizer]:
    """The optimizer of ``train.optimizer`` (``fastgen.config.OPTIMIZERS``), called as ``torch.optim.AdamW``:
    torch's AdamW, torch's fused AdamW on ``device`` or bitsandbytes' AdamW8bit. A missing bitsandbytes or a
    device without fused kernels is a one-line error naming the key."""
    if name == "8bit":
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError:
            raise EnvironmentMissingError(
                "train.optimizer is '8bit', but bitsandbytes is not installed; install it (pip install "
                "\"fastgen-distill[bnb]\" or pip install bitsandbytes) or use train.optimizer=adamw") from None
        return AdamW8bit
    if name == "fused":
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        if torch.device(device).type not in _get_fused_kernels_supported_devices():
            raise UsageError(f"train.optimizer is 'fused', but torch has no fused AdamW on {device}; use "
                             "train.optimizer=adamw")
        return functools.partial(torch.optim.AdamW, fused=True)
    return torch.optim.AdamW


def student_schedule(schedule: NoiseSchedule, prediction_type: str | None) -> NoiseSchedule:
    """The teacher's schedule, with the student's own output type when ``student.prediction_type`` is set."""
    if prediction_type is None or prediction_type == schedule.prediction_type:
        return schedule
    if prediction_type not in schedule.supported_predictions:
        raise UsageError(f"student.prediction_type is {prediction_type!r}; a {schedule.family} teacher's student "
                         f"takes one of {list(schedule.supported_predictions)}")
    return schedule_from_description({**schedule.describe(), "prediction_type": prediction_type})


def student_names(config: DistillConfig) -> list[str]:
    """``["student"]``, or ``["student.0", ..., "student.K-1"]`` for a student of K experts."""
    k = config.student.experts
    return ["student"] if k == 1 else [f"student.{i}" for i in range(k)]


def run_plan(config: DistillConfig, schedule: NoiseSchedule) -> StudentPlan:
    """The run's ``StudentPlan`` from its config and the teacher's schedule (no network needed)."""
    s = config.student
    return resolve_plan(objective_class(config.method), config.objective, schedule,
                        student_schedule(schedule, s.prediction_type), s.num_steps, s.timesteps, s.experts,
                        s.expert_boundaries)


def build_students(config: DistillConfig, source: nn.Module | list[nn.Module], plan: StudentPlan,
                   schedule: NoiseSchedule, attention: str) -> dict[str, Any]:
    """The student networks as ``nets`` entries: ``student`` (one ``Denoiser``), or the experts ``student.k`` and
    ``student``, the ``ExpertsDenoiser`` routing between them by the plan's boundaries. ``source``: the teacher's
    network, or its networks by noise level (Wan 2.2's two): expert ``k`` starts from network ``min(k, last)``,
    one student from the first (high noise, where a few-step student starts)."""
    schedule = student_schedule(schedule, config.student.prediction_type)
    sources = source if isinstance(source, (list, tuple)) else [source]
    nets = {}
    for k, name in enumerate(student_names(config)):
        model = make_student(sources[min(k, len(sources) - 1)], config, plan, schedule)
        configure_network(model, attention, config.train.gradient_checkpointing)
        nets[name] = Denoiser(model, schedule)
    if config.student.experts > 1:
        nets["student"] = ExpertsDenoiser([nets[n] for n in student_names(config)], plan.expert_boundaries)
    return nets


@dataclass
class Run:
    """What ``build_run`` makes; see the module docstring."""

    config: DistillConfig
    teacher: Any
    plan: StudentPlan
    nets: dict[str, Any]
    objective: Objective
    students: list[str]
    """The student's trained networks (``student`` or the experts ``student.k``)."""
    network_names: list[str]
    """Every trained network: the student's, then the objective's (sorted)."""
    trainable: dict[str, list[nn.Parameter]]
    phases: list[Phase]
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    emas: dict[str, Any] = field(default_factory=dict)
    data: Any = None

    def owned(self, phase: Phase) -> list[str]:
        """The networks ``phase`` trains; ``"student"`` names every expert of a student of experts."""
        names = []
        for name in phase.networks:
            names += self.students if name == "student" else [name]
        return names

    def module(self, name: str) -> nn.Module:
        """The module behind a network name (a ``Denoiser``'s network)."""
        return network_module(self.nets[name])

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace every trained network's module by ``fn(module)`` (a distributed wrapper) in ``nets``: a
        ``Denoiser`` entry becomes a new ``Denoiser`` over the wrapped module, and a student of experts a new
        ``ExpertsDenoiser`` over the new experts."""
        for name in self.network_names:
            entry = self.nets[name]
            if isinstance(entry, Denoiser):
                self.nets[name] = type(entry)(fn(entry.model), entry.schedule, entry.adapter)
            else:
                self.nets[name] = fn(entry)
        if len(self.students) > 1:
            self.nets["student"] = ExpertsDenoiser([self.nets[n] for n in self.students], self.plan.expert_boundaries)


def build_run(config: DistillConfig, teacher=None, source: nn.Module | None = None, *,
              plan: StudentPlan | None = None, device: torch.device | str = "cpu", attention: str | None = None,
              optimizer_kwargs: dict | None = None, data: Callable[[Any, Objective], Any] | None = None,
              materialize: Callable[[nn.Module], None] | None = None,
              shard: Callable[[nn.Module], None] | None = None) -> Run:
    """Assemble the run of ``config`` (module docstring). ``teacher``: a loaded teacher, or None to load
    ``config.teacher`` on ``device`` at the run's precision; ``source``: the float32 teacher network the
    copies are made from (default: loaded when the teacher runs in fp16/bf16, else the teacher's own);
    ``plan``: the run's plan when already resolved (``fastgen estimate`` resolves it on real tensors);
    ``attention``: overrides ``train.attention``; ``optimizer_kwargs``: build torch's AdamW with these arguments
    (``foreach``, ``fused``) instead of ``train.optimizer`` (the estimate's fake tensors); ``data(teacher,
    objective)``: builds the data source (None: no data); ``materialize(module)``: applied to every network (the
    teacher's, the students', the objective's, and the frozen ones the objective keeps) once they are all built
    and before the optimizers and the EMA are made (``fastgen estimate`` builds on the ``meta`` device and turns
    the networks into fake tensors there); ``shard(module)``: applied, after the data is built (teacher samples
    are drawn from the whole teacher), to every network in the order ``fastgen.sharding`` gives, before the
    optimizers and the EMA are made from the (then sharded) parameters."""
    config.validate()
    t = config.train
    # before any weight is read: a missing bitsandbytes fails here
    make_optimizer = (functools.partial(torch.optim.AdamW, **optimizer_kwargs) if optimizer_kwargs is not None
                      else optimizer_class(t.optimizer, device))
    dtype = weight_dtype(t.mixed_precision)
    if teacher is None:
        teacher = load_teacher(config.teacher, device=device, dtype=dtype, trust_pickle=config.trust_pickle,
                               **config.size())
    if source is None:
        # the student starts from the full-precision weights, not from the teacher's fp16/bf16 rounding of them
        source = teacher.models if teacher.model.dtype == torch.float32 else load_teacher(
            config.teacher, trust_pickle=config.trust_pickle, **config.size()).models
    plan = plan or run_plan(config, teacher.schedule)
    attention = attention or t.attention
    torch.manual_seed(config.seed)  # the initial weights of LoRA adapters, heads and copies follow the seed
    nets = build_students(config, source, plan, teacher.schedule, attention)
    # students first: LoRA networks the objective adds on the teacher's weights stay out of their copies
    factory = NetworkFactory(teacher, attention, t.gradient_checkpointing,
                             source=source[0] if isinstance(source, (list, tuple)) else source)
    objective = objective_class(config.method)(teacher, nets, config.objective, plan, t.max_steps, factory=factory)
    factory.release()
    if materialize is not None:
        for module in every_network(teacher, nets, objective):
            materialize(module)
    students = student_names(config)
    for name in [*students, *objective.owned]:
        nets[name] = _to(nets[name], device)  # nn.Module.to moves in place: an ExpertsDenoiser sees its experts
    network_names = [*students, *sorted(objective.owned)]
    run_data = data(teacher, objective) if data is not None else None
    if shard is not None:
        for module in every_network(teacher, {n: nets[n] for n in network_names}, objective):
            shard(module)
    trainable = {name: trainable_parameters(nets[name]) for name in network_names}
    phases = objective.phases()
    known = {*network_names, "student"}
    for phase in phases:
        unknown = set(phase.networks) - known
        if unknown:
            raise ValueError(f"phase {phase.name!r} trains {sorted(unknown)}, which the objective does not own; "
                             f"expected names among {sorted(known)}")
    run = Run(config, teacher, plan, nets, objective, students, network_names, trainable, phases)
    for phase in phases:
        params = [p for n in run.owned(phase) for p in trainable[n]]
        run.optimizers[phase.name] = make_optimizer(
            params, lr=phase.lr or t.lr, betas=phase.betas or tuple(t.betas),
            weight_decay=t.weight_decay if phase.weight_decay is None else phase.weight_decay)
    if t.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        run.emas = {n: EMAModel(trainable[n], decay=t.ema_decay, foreach=True) for n in students}
    run.data = run_data
    return run


def every_network(teacher, nets: dict[str, Any], objective: Objective) -> list[nn.Module]:
    """Each network of a run once, teacher first: the teacher's (the base of any LoRA adapter on it; both of Wan
    2.2's transformers), those of
    ``nets``, and the frozen ones the objective keeps (an EMA target), as ``fastgen.sharding.network_roots``
    finds them inside fastgen's denoiser wrappers."""
    from fastgen.sharding import network_roots

    kept = [v for v in vars(objective).values() if isinstance(v, nn.Module)]
    found = {}
    for module in [*getattr(teacher, "models", [teacher.model]), *map(network_module, nets.values()), *kept]:
        for root in network_roots(module):
            found.setdefault(id(root), root)
    return list(found.values())


def _to(net, device):
    """``net`` moved to ``device``; nothing to do on the CPU, where every network is built (and where the
    estimate's fake tensors live)."""
    return net if str(device) == "cpu" else net.to(device)


@contextlib.contextmanager
def owned_by(run: Run, phase: Phase, no_sync: Callable[[nn.Module], Any] | None = None):
    """Only ``phase``'s networks take gradients while it runs: every other trained network has
    ``requires_grad`` off (gradients still flow through its inputs) and, with ``no_sync`` (DDP's), skips
    gradient synchronisation; restored afterwards."""
    owned = set(run.owned(phase))
    excluded = [n for n in run.network_names if n not in owned]
    with contextlib.ExitStack() as stack:
        for name in excluded:
            if no_sync is not None:
                stack.enter_context(no_sync(run.module(name)))
            for p in run.trainable[name]:
                p.requires_grad_(False)
        try:
            yield
        finally:
            for name in excluded:
                for p in run.trainable[name]:
                    p.requires_grad_(True)
