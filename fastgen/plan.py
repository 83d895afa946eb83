"""The student plan: the one source of the student's timesteps, sampling rule, boundary and expert split.

A ``StudentPlan`` is resolved by :func:`resolve_plan` from the run config, the teacher's noise schedule and the
objective *class* before any network is built, written to ``RUN/plan.json`` by the trainer, and read by every
part that needs it: the objective (its trained timesteps), the student of experts (its boundaries), sample
grids, ``fastgen estimate``, ``fastgen export`` (the ``FewStepScheduler`` it writes) and so ``fastgen sample`` and
``fastgen eval``. Nothing else computes a grid.

- ``grids``: the student's timesteps per step count, descending, in the teacher's native time. The trained step
  count ``num_steps`` maps to ``student.timesteps`` when given, else to the objective's default
  (``Objective.default_grid``); an objective that trains or exports several counts (ASD's step counts,
  a consistency function's 1/2/4/8-step grids) lists them through ``Objective.plan_grids``.
- ``exported``: the step counts the exported scheduler replays.
- ``expert_boundaries``: for a student of K experts, ``student.expert_boundaries`` or, by default, halfway
  between the steps that split the *trained* grid into K equal groups (``fastgen.experts.default_boundaries``),
  so that each expert owns ``num_steps / K`` steps of exactly the grid it is trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgen.atomic import write_bytes
from fastgen.errors import InputError, UsageError
from fastgen.experts import default_boundaries

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class StudentPlan:
    num_steps: int
    grids: dict[int, tuple[float, ...]]
    """Timesteps per step count (descending, native time); ``grids[num_steps]`` is the trained grid."""
    rule: str
    """The student's sampling rule (``fastgen.samplers.scheduler.RULES``)."""
    prediction_type: str
    """The student's output type."""
    exported: tuple[int, ...] = ()
    """Step counts the exported scheduler replays (default: ``num_steps``)."""
    boundary: dict[str, float] | None = None
    """Consistency models' boundary condition (``sigma_data``, ``timestep_scaling``), or None."""
    expert_boundaries: tuple[float, ...] | None = None
    """Native times between the experts of a student of experts (high noise first), or None."""

    @property
    def timesteps(self) -> list[float]:
        """The trained grid ``grids[num_steps]``."""
        return list(self.grids[self.num_steps])

    @property
    def experts(self) -> int:
        return 1 if self.expert_boundaries is None else len(self.expert_boundaries) + 1

    def export_config(self) -> dict[str, Any]:
        """The keyword arguments of ``fastgen.pipelines.export_student`` that the plan fixes."""
        counts = self.exported or (self.num_steps,)
        return {"trained_timesteps": {str(k): list(self.grids[k]) for k in counts}, "num_steps": self.num_steps,
                "rule": self.rule,
                "boundary": None if self.boundary is None else dict(self.boundary),
                "expert_boundaries": None if self.expert_boundaries is None else list(self.expert_boundaries)}

    # -- the file in the run folder ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "grids": {str(k): list(v) for k, v in self.grids.items()},
                "rule": self.rule, "prediction_type": self.prediction_type, "exported": list(self.exported),
                "boundary": self.boundary, "expert_boundaries": None if self.expert_boundaries is None
                else list(self.expert_boundaries)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudentPlan:
        return cls(num_steps=int(data["num_steps"]),
                   grids={int(k): tuple(float(t) for t in v) for k, v in data["grids"].items()},
                   rule=data["rule"], prediction_type=data["prediction_type"],
                   exported=tuple(int(k) for k in data.get("exported", ())), boundary=data.get("boundary"),
                   expert_boundaries=None if data.get("expert_boundaries") is None
                   else tuple(float(b) for b in data["expert_boundaries"]))

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / PLAN_FILE
        write_bytes(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> StudentPlan:
        path = Path(run_dir) / PLAN_FILE
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"cannot read the student plan {path}: {err}; expected the {PLAN_FILE} that "
                             "`fastgen distill` writes") from None


def resolve_plan(objective_class, objective_config, schedule, student_schedule, num_steps: int,
                 timesteps=None, experts: int = 1, expert_boundaries=None) -> StudentPlan:
    """The plan of a student of ``num_steps`` steps and ``experts`` networks trained by ``objective_class``
    (configured by ``objective_config``) on a teacher with noise schedule ``schedule``; ``student_schedule`` is
    the schedule with the student's own output type. ``timesteps`` and ``expert_boundaries`` are the config's
    ``student.timesteps`` / ``student.expert_boundaries`` (None: the defaults)."""
    grids = {int(k): tuple(float(t) for t in v) for k, v in
             objective_class.plan_grids(schedule, student_schedule, objective_config, num_steps).items()}
    if timesteps is not None:
        if len(timesteps) != num_steps:
            raise UsageError(f"student.timesteps has {len(timesteps)} values; expected student.num_steps = "
                             f"{num_steps}")
        grid = tuple(float(t) for t in timesteps)
        inside = all(schedule.t_min <= t <= schedule.t_max for t in grid)
        if not inside or any(a <= b for a, b in zip(grid, grid[1:])):
            raise UsageError(f"student.timesteps is {list(timesteps)}; expected {num_steps} distinct "
                             f"time{'s' * (num_steps > 1)} in the teacher's native range "
                             f"[{schedule.t_min:g}, {schedule.t_max:g}], in descending order")
        grids[num_steps] = grid
    boundaries = None
    if experts > 1:
        boundaries = tuple(float(b) for b in (expert_boundaries or default_boundaries(grids[num_steps], experts)))
    return StudentPlan(num_steps=num_steps, grids=grids, rule=objective_class.rule,
                       prediction_type=student_schedule.prediction_type,
                       exported=tuple(objective_class.exported_counts(objective_config, num_steps, grids)),
                       boundary=objective_class.boundary_condition(objective_config),
                       expert_boundaries=boundaries)
