"""The objective contract: everything the trainer knows about a distillation method, and nothing more.

An objective

- owns trainable networks besides the student (``networks()``: a fake score, a discriminator head,
  phase experts) and any frozen state of its own (``state_dict()``: an EMA target, the current
  progressive teacher);
- declares its update phases (``phases()``): which networks each phase trains, how often it runs and
  its optimizer settings (DMD2's two time-scale rule is ``critic`` every step, ``generator`` every k-th);
- returns ``loss(phase, batch, step) -> {"loss": scalar to minimise, <term>: logged value, ...}``;
- names the student's sampling rule and trained timesteps (what export writes into the scheduler).

It is given the ``Teacher`` itself (``self.teacher``: callable as its denoiser, plus sample shape, null
condition, class labels, VAE and prompt encoding; a bare denoiser is wrapped as a ``DenoiserTeacher``) and a
``NetworkFactory`` (``self.factory``) through which it declares its extra networks by kind: a trainable copy
of the teacher, a LoRA adapter on the teacher's own weights, a small head. It never builds optimizers,
calls ``backward``, moves devices, unwraps distributed wrappers or writes checkpoints (EDM's losses are
small callables in the same spirit). Configuration is a dataclass ``Config`` filled from the
``objective:`` mapping of the run config, so unknown keys fail with the closest valid key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastgen.denoiser import BaseDenoiser
from fastgen.errors import UsageError
from fastgen.networks import NetworkFactory
from fastgen.samplers.scheduler import RULES
from fastgen.teacher import as_teacher


@dataclass(frozen=True)
class Phase:
    """One update phase.

    ``networks``: names of the networks it trains (``"student"`` or keys of ``Objective.networks()``);
    it runs on every step ``s`` with ``s % every == offset``; ``lr``/``betas``/``weight_decay`` override
    the run's optimizer settings for this phase's optimizer (``None``: the run's value).
    """

    name: str
    networks: tuple[str, ...]
    every: int = 1
    offset: int = 0
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None

    def runs_at(self, step: int) -> bool:
        return step % self.every == self.offset


class Objective:
    """Base class; subclasses set ``name``, ``Config`` and implement ``loss``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None
    rule: ClassVar[str] = "renoise"
    needs_data: ClassVar[bool] = False

    def __init__(self, teacher, student: BaseDenoiser, config: Any, num_steps: int = 1,
                 timesteps: list[float] | None = None, max_steps: int | None = None,
                 factory: NetworkFactory | None = None):
        if num_steps < 1:
            raise UsageError(f"student.num_steps is {num_steps}; expected >= 1")
        if self.rule not in RULES:  # the export's FewStepScheduler must replay what is trained
            raise ValueError(f"{type(self).__name__}.rule is {self.rule!r}, which the exported scheduler cannot "
                             f"replay; expected one of {list(RULES)}")
        self.teacher = as_teacher(teacher)
        self.factory = factory or NetworkFactory(self.teacher)
        self.student = student
        self.config = config
        self.num_steps = num_steps
        self.max_steps = max_steps
        self.timesteps = [float(t) for t in (timesteps or self.default_timesteps(num_steps))]
        if len(self.timesteps) != num_steps:
            raise UsageError(f"student.timesteps has {len(self.timesteps)} values; expected student.num_steps = "
                             f"{num_steps}")

    @property
    def schedule(self):
        return self.teacher.schedule

    # -- what the trainer asks --------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks the objective owns besides the student (built through ``self.factory``),
        keyed by their attribute names on the objective (the trainer puts the distributed wrapper back
        under the same name; a ``Denoiser`` attribute gets its ``.model`` wrapped)."""
        return {}

    def phases(self) -> list[Phase]:
        """While a phase runs, only the networks it names take gradients: every other trainable network
        is excluded (no ``.grad``, no all-reduce, no clipping); gradients through its inputs still flow."""
        return [Phase("generator", ("student",))]

    def loss(self, phase: str, batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_step_end(self, step: int) -> None:
        """Called once after every completed training step (e.g. to update an EMA target)."""

    def state_dict(self) -> dict[str, Any]:
        """The objective's own non-trainable state, saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)}")

    # -- what export and sampling ask -------------------------------------------------------------
    def default_timesteps(self, num_steps: int) -> list[float]:
        return self.default_grid(self.schedule, self.student.schedule, self.config, num_steps)

    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps: int) -> list[float]:
        """The default timesteps from the teacher's and the student's schedules and the objective's config alone,
        so that the trainer can split a student of several experts on them before the objective exists: the
        teacher's trailing grid."""
        return schedule.timesteps(num_steps).tolist()

    def sampling_denoiser(self) -> BaseDenoiser:
        """The denoiser whose x0 the student's rule uses (a consistency student's boundary form)."""
        return self.student

    def export_config(self) -> dict[str, Any]:
        """What ``FewStepScheduler`` records: trained timesteps per step count, rule, boundary."""
        return {"trained_timesteps": {str(self.num_steps): self.timesteps}, "rule": self.rule, "boundary": None}
