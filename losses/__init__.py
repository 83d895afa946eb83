"""Distillation objectives behind one contract (``fastgen.losses.base.Objective``)."""

from __future__ import annotations

import difflib
from typing import Any

from fastgen.config import config_from_dict
from fastgen.denoiser import BaseDenoiser
from fastgen.errors import UsageError
from fastgen.losses.asd import ASD
from fastgen.losses.base import Objective, Phase
from fastgen.losses.consistency import ConsistencyDistillation
from fastgen.losses.dmd import DMD, DMD2, DecoupledDMD
from fastgen.losses.phased_dmd import PhasedDMD
from fastgen.losses.progressive import ProgressiveDistillation
from fastgen.losses.sid import SiD, SiDA, FewStepSiD
from fastgen.networks import NetworkFactory

OBJECTIVES: dict[str, type[Objective]] = {
    ProgressiveDistillation.name: ProgressiveDistillation,
    ConsistencyDistillation.name: ConsistencyDistillation,
    DMD.name: DMD,
    DMD2.name: DMD2,
    DecoupledDMD.name: DecoupledDMD,
    SiD.name: SiD,
    SiDA.name: SiDA,
    FewStepSiD.name: FewStepSiD,
    ASD.name: ASD,
    PhasedDMD.name: PhasedDMD,
}


def build_objective(method: str, teacher, student: BaseDenoiser, args: dict[str, Any] | None = None,
                    num_steps: int = 1, timesteps: list[float] | None = None, max_steps: int | None = None,
                    factory: NetworkFactory | None = None) -> Objective:
    """The objective ``method`` with its ``Config`` filled from ``args`` (unknown keys name the closest one).
    ``teacher``: a ``Teacher`` (or a bare denoiser); ``factory`` builds its extra networks (default: from the
    teacher, float32, default attention)."""
    cls = objective_class(method)
    config = config_from_dict(cls.Config, dict(args or {}), prefix="objective")
    return cls(teacher, student, config, num_steps, timesteps, max_steps, factory=factory)


def default_grid(method: str, schedule, student_schedule, args: dict[str, Any] | None, num_steps: int) -> list[float]:
    """``method``'s default student timesteps (``Objective.default_grid``), before its networks exist."""
    cls = objective_class(method)
    return cls.default_grid(schedule, student_schedule, config_from_dict(cls.Config, dict(args or {}),
                                                                         prefix="objective"), num_steps)


def objective_class(method: str) -> type[Objective]:
    if method not in OBJECTIVES:
        close = difflib.get_close_matches(method, sorted(OBJECTIVES), n=1)
        raise UsageError(f"method {method!r} is unknown; expected one of {sorted(OBJECTIVES)}"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    return OBJECTIVES[method]


__all__ = ["OBJECTIVES", "Objective", "Phase", "build_objective", "default_grid"]
