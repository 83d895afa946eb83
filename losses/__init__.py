"""Distillation objectives behind one contract (``fastgen.losses.base.Objective``)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from fastgen.denoiser import BaseDenoiser
from fastgen.errors import UsageError
from fastgen.losses.asd import ASD
from fastgen.losses.base import Objective, Phase
from fastgen.losses.consistency import ConsistencyDistillation
from fastgen.losses.dmd import DMD, DMD2, DecoupledDMD
from fastgen.losses.meanflow import MeanFlow
from fastgen.losses.phased_dmd import PhasedDMD
from fastgen.losses.progressive import ProgressiveDistillation
from fastgen.losses.rcm import RCM
from fastgen.losses.scm import SCM
from fastgen.losses.sid import SiD, SiDA, FewStepSiD
from fastgen.networks import NetworkFactory
from fastgen.plan import resolve_plan
from fastgen.teacher import as_teacher
from fastgen.typed_config import config_from_dict

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
    SCM.name: SCM,
    RCM.name: RCM,
    MeanFlow.name: MeanFlow,
}


def objective_config(method: str, args: Mapping[str, Any] | Any | None = None):
    """``method``'s typed ``Config`` from the mapping ``args`` (unknown keys name the closest one; each Config
    checks its values in ``__post_init__``); an instance of the Config is returned as it is."""
    cls = objective_class(method)
    if args is not None and not isinstance(args, Mapping):
        if not isinstance(args, cls.Config):
            raise TypeError(f"objective settings of {method!r}: expected a mapping or {cls.Config.__name__}, "
                            f"got {type(args).__name__}")
        return args
    return config_from_dict(cls.Config, dict(args or {}), prefix="objective")


def build_objective(method: str, teacher, student: BaseDenoiser, args=None, num_steps: int = 1,
                    timesteps: list[float] | None = None, max_steps: int | None = None,
                    factory: NetworkFactory | None = None) -> Objective:
    """The objective ``method`` for a given student denoiser, outside a run (tests, scripts): its config from
    ``args``, its plan resolved from the teacher's schedule (``fastgen.plan.resolve_plan``), and a fresh
    network mapping ``{"student": student}``. ``teacher``: a ``Teacher`` (or a bare denoiser); ``factory``
    builds its extra networks (default: from the teacher, float32, default attention)."""
    cls = objective_class(method)
    config = objective_config(method, args)
    teacher = as_teacher(teacher)
    boundaries = getattr(student, "boundaries", None)
    plan = resolve_plan(cls, config, teacher.schedule, student.schedule, num_steps, timesteps,
                        experts=1 if boundaries is None else len(boundaries) + 1, expert_boundaries=boundaries)
    return cls(teacher, {"student": student}, config, plan, max_steps, factory=factory)


def objective_class(method: str) -> type[Objective]:
    if method not in OBJECTIVES:
        close = difflib.get_close_matches(method, sorted(OBJECTIVES), n=1)
        raise UsageError(f"method {method!r} is unknown; expected one of {sorted(OBJECTIVES)}"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    return OBJECTIVES[method]


__all__ = ["OBJECTIVES", "Objective", "Phase", "build_objective", "objective_class", "objective_config"]
