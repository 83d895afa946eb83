"""The objective contract: everything the trainer knows about a distillation method, and nothing more.

An objective

- owns trainable networks besides the student (``networks()``: a fake score, a discriminator head,
  phase experts), which it puts into the trainer's network mapping ``nets`` while it is built, and any frozen
  state of its own (``state_dict()``: an EMA target, the current progressive teacher);
- declares its update phases (``phases()``), each bound to its loss: which networks the phase trains, how
  often it runs, its optimizer settings and the callable ``loss(batch, step) -> {"loss": scalar to minimise,
  <term>: logged value, ...}`` (DMD2's two time-scale rule is ``critic`` every step, ``generator`` every k-th);
- reads the student's timesteps, rule and boundary from the run's ``StudentPlan`` (``fastgen.plan``), which is
  resolved from the objective *class* (``default_grid``, ``plan_grids``, ``exported_counts``,
  ``boundary_condition``) before any network is built.

It is given the ``Teacher`` itself (``self.teacher``: callable as its denoiser, plus sample shape, null
condition, class labels, VAE and prompt encoding; a bare denoiser is wrapped as a ``DenoiserTeacher``) and a
``NetworkFactory`` (``self.factory``) through which it builds its extra networks by kind: a trainable copy
of the teacher, a LoRA adapter on the teacher's own weights, a small head. It never builds optimizers,
calls ``backward``, moves devices, unwraps distributed wrappers or writes checkpoints, and it keeps no
per-call state: everything a loss depends on is its arguments, the plan and ``nets`` (EDM's losses are small
callables in the same spirit). Configuration is a dataclass ``Config`` resolved and validated when the run
config is loaded (``fastgen.config``), so unknown keys and bad values fail before a weight is read.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastgen.denoiser import BaseDenoiser
from fastgen.errors import UsageError
from fastgen.networks import NetworkFactory
from fastgen.plan import StudentPlan
from fastgen.samplers.scheduler import RULES
from fastgen.teacher import as_teacher


@dataclass(frozen=True)
class Phase:
    """One update phase, bound to its loss.

    ``networks``: names of the networks it trains (``"student"`` or names of ``Objective.networks()``);
    ``loss(batch, step) -> {"loss": scalar to minimise, <term>: logged value, ...}``; it runs on every step ``s``
    with ``start <= s < stop`` and ``(s - start) % every == offset``; ``lr``/``betas``/``weight_decay`` override the
    run's optimizer settings for this phase's optimizer (``None``: the run's value).
    """

    name: str
    networks: tuple[str, ...]
    loss: Callable[[Any, int], dict[str, torch.Tensor]]
    every: int = 1
    offset: int = 0
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    start: int = 0
    stop: int | None = None

    def runs_at(self, step: int) -> bool:
        inside = self.start <= step and (self.stop is None or step < self.stop)
        return inside and (step - self.start) % self.every == self.offset


class Objective:
    """Base class; subclasses set ``name``, ``Config`` and ``phases()``.

    ``nets`` is the mapping of networks the trainer owns: ``"student"`` (a ``Denoiser``, or an ``ExpertsDenoiser``
    over ``"student.k"``) and the objective's own networks, which it adds with ``add_network`` while it is built.
    The trainer may replace an entry by a wrapped network (DDP, FSDP) after that; the objective reads the mapping
    on every call and never keeps a network elsewhere. ``plan`` is the run's ``StudentPlan``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None
    rule: ClassVar[str] = "renoise"
    needs_data: ClassVar[bool] = False
    lora_export: ClassVar[bool] = True
    """Whether a LoRA student's export can be its adapter alone (False where the student trains other new weights)."""

    def __init__(self, teacher, nets: MutableMapping[str, Any], config: Any, plan: StudentPlan,
                 max_steps: int | None = None, factory: NetworkFactory | None = None):
        if self.rule not in RULES:  # the export's FewStepScheduler must replay what is trained
            raise ValueError(f"{type(self).__name__}.rule is {self.rule!r}, which the exported scheduler cannot "
                             f"replay; expected one of {list(RULES)}")
        self.teacher = as_teacher(teacher)
        self.factory = factory or NetworkFactory(self.teacher)
        self.nets = nets
        self.config = config
        self.plan = plan
        self.num_steps = plan.num_steps
        self.max_steps = max_steps
        self.timesteps = plan.timesteps
        self.owned: list[str] = []
        self.shared_rng = torch.Generator().manual_seed(0)
        """The generator of ``shared_generator`` in runs of several processes; the trainer reseeds it every step."""

    @property
    def schedule(self):
        return self.teacher.schedule

    @property
    def student(self) -> BaseDenoiser:
        return self.nets["student"]

    def add_network(self, name: str, network) -> None:
        """Put a network the objective trains into ``nets`` (built through ``self.factory``)."""
        self.nets[name] = network
        if name not in self.owned:
            self.owned.append(name)

    # -- what the trainer asks --------------------------------------------------------------------
    def networks(self) -> dict[str, Any]:
        """Trainable networks the objective owns besides the student, by name in ``nets``."""
        return {name: self.nets[name] for name in self.owned}

    def phases(self) -> list[Phase]:
        """While a phase runs, only the networks it names take gradients: every other trainable network
        is excluded (no ``.grad``, no all-reduce, no clipping); gradients through its inputs still flow."""
        raise NotImplementedError

    def loss(self, phase: str, batch, step: int) -> dict[str, torch.Tensor]:
        """The loss of the phase named ``phase`` (a look-up in ``phases()``, for callers outside the trainer)."""
        found = {p.name: p for p in self.phases()}
        if phase not in found:
            raise UsageError(f"phase {phase!r} is not one of {sorted(found)}")
        return found[phase].loss(batch, step)

    def shared_generator(self) -> torch.Generator | None:
        """Where draws that choose what runs (which student step, which step count) come from: with several
        processes ``shared_rng``, the same on every one (per-sample noise comes from the global RNG, seeded per
        process), since under FSDP2 every process must run the same networks the same number of times; in one
        process the global RNG (``None``), as before."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.shared_rng if distributed and torch.distributed.get_world_size() > 1 else None

    def on_step_end(self, step: int) -> None:
        """Called once after every completed training step (e.g. to update an EMA target)."""

    def state_dict(self) -> dict[str, Any]:
        """The objective's own non-trainable state, saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)}")

    # -- the plan (class level: resolved before any network exists) ------------------------------------
    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps: int) -> list[float]:
        """The default timesteps of ``num_steps`` steps from the teacher's and the student's schedules and the
        objective's config alone: the teacher's trailing grid (``NoiseSchedule.few_step_grid``)."""
        return schedule.few_step_grid(num_steps).tolist()

    @classmethod
    def plan_grids(cls, schedule, student_schedule, config, num_steps: int) -> dict[int, list[float]]:
        """Every grid the objective trains on or exports, per step count (default: ``num_steps`` only)."""
        return {num_steps: cls.default_grid(schedule, student_schedule, config, num_steps)}

    @classmethod
    def exported_counts(cls, config, num_steps: int, grids: dict[int, Any]) -> list[int]:
        """The step counts the exported scheduler replays."""
        return [num_steps]

    def check_guidance(self, scale: float) -> None:
        """Refuse ``objective.guidance_scale`` != 1 (classifier-free guidance of the teacher) on a teacher that
        takes no text (a bare denoiser, as tests use, passes)."""
        if scale != 1.0 and self.teacher.pipeline is not None and not self.teacher.text_conditioned:
            raise UsageError(f"objective.guidance_scale is {scale}; classifier-free guidance needs a "
                             f"text-conditioned teacher, and {self.teacher.source} is not (expected 1)")

    @classmethod
    def student_network(cls, model, plan: StudentPlan, schedule):
        """The student's network built from ``model`` (a trainable copy of the teacher's): the copy itself, or
        the copy with the inputs the objective's student needs beyond the teacher's (MeanFlow's interval)."""
        return model

    @classmethod
    def boundary_condition(cls, config) -> dict[str, float] | None:
        """A consistency model's boundary condition, recorded by the export; None for other objectives."""
        return None

    # -- what sampling asks -------------------------------------------------------------------------
    def sampling_denoiser(self) -> BaseDenoiser:
        """The denoiser whose x0 the student's rule uses (a consistency student's boundary form)."""
        return self.student
