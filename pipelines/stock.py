"""Stock diffusers schedulers that replay a ``FewStepScheduler`` exactly, so an export needs no custom code.

Candidates, built from the teacher's scheduler config (same betas or shift, the student's prediction type):

- rule ``renoise`` on a VP schedule: ``LCMScheduler`` (Luo et al. 2023, Algorithm 3: predict x0, apply the
  boundary condition ``c_skip x + c_out x0`` with ``sigma_data = 0.5``, renoise to the next timestep). A student
  without a boundary condition gets ``timestep_scaling = 1e4``: ``c_skip <= 2.5e-9 / t²`` and ``c_out`` rounds
  to 1 in float32 at every ``t >= 1``; the trained timesteps
  must be LCM's own for every trained step count, with ``original_inference_steps`` chosen among a few values.
- rule ``renoise`` on a flow schedule: ``FlowMatchLCMScheduler``.
- rule ``ddim`` on a VP schedule: ``DDIMScheduler`` with "trailing" spacing and ``eta = 0``; on a flow schedule
  ``FlowMatchEulerDiscreteScheduler``; on EDM ``EDMEulerScheduler`` (the Euler step is the DDIM step there).

A candidate is used only if ``replays`` verifies it numerically: for every trained step count, the same
model-input timesteps, initial noise scale, ``scale_model_input`` and ``step`` outputs (same generator) as the
``FewStepScheduler``, on random inputs.
"""

from __future__ import annotations

import inspect
import math
from typing import Iterator

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fastgen.samplers.scheduler import FewStepScheduler

RTOL, ATOL = 1e-5, 1e-6
NO_BOUNDARY_SCALING = 1e4


def _build(cls, config: dict) -> SchedulerMixin:
    """``cls`` from the keys of ``config`` it takes (a teacher's config may hold others, e.g. DDPM's variance_type)."""
    params = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in config.items() if k in params})


def _candidates(scheduler: FewStepScheduler, teacher_config: dict) -> Iterator[SchedulerMixin]:
    import diffusers

    family = scheduler.schedule.family
    prediction = scheduler.schedule.prediction_type
    base = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    rule, boundary = scheduler.config.rule, scheduler.config.boundary
    counts = scheduler.step_counts
    if family == "vp" and rule == "renoise" and (boundary is None or set(boundary) <= {"sigma_data", "timestep_scaling"}):
        lcm = {**base, "prediction_type": prediction, "clip_sample": False, "thresholding": False,
               "set_alpha_to_one": True,
               "timestep_scaling": NO_BOUNDARY_SCALING if boundary is None else boundary.get("timestep_scaling", 10.0)}
        for original in dict.fromkeys([math.lcm(*counts), max(counts), 50]):
            yield _build(diffusers.LCMScheduler, {**lcm, "original_inference_steps": original})
    elif family == "vp" and rule == "ddim" and boundary is None:
        yield _build(diffusers.DDIMScheduler, {**base, "prediction_type": prediction, "timestep_spacing": "trailing",
                                                   "set_alpha_to_one": True, "clip_sample": False,
                                                   "thresholding": False, "steps_offset": 0})
    elif family == "flow" and boundary is None:
        name = "FlowMatchLCMScheduler" if rule == "renoise" else "FlowMatchEulerDiscreteScheduler"
        yield _build(getattr(diffusers, name), base)
    elif family == "edm" and rule == "ddim" and boundary is None:
        yield _build(diffusers.EDMEulerScheduler, {**base, "prediction_type": prediction})


def replays(stock: SchedulerMixin, scheduler: FewStepScheduler, shape=(2, 3, 4, 4), seed: int = 0) -> bool:
    """Whether ``stock`` runs exactly what ``scheduler`` runs, at every trained step count, as a pipeline calls it."""
    generator = torch.Generator().manual_seed(seed)
    for n in scheduler.step_counts:
        try:
            stock.set_timesteps(n)
        except (ValueError, TypeError):
            return False
        scheduler.set_timesteps(n)
        theirs, ours = stock.timesteps.double(), scheduler.timesteps.double()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=1e-6):
            return False
        if not math.isclose(float(getattr(stock, "init_noise_sigma", 1.0)), float(scheduler.init_noise_sigma), rel_tol=1e-6):
            return False
        x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
        scale_input = getattr(stock, "scale_model_input", lambda sample, timestep: sample)  # flow: none
        for t_stock, t_ours in zip(stock.timesteps, scheduler.timesteps):
            if not torch.allclose(scale_input(x, t_stock), scheduler.scale_model_input(x, t_ours),
                                  rtol=RTOL, atol=ATOL):
                return False
            output = torch.randn(shape, generator=generator)
            seed_step = int(torch.randint(0, 2**31, (), generator=generator))
            prev_stock = stock.step(output, t_stock, x, generator=torch.Generator().manual_seed(seed_step),
                                    return_dict=False)[0]
            prev = scheduler.step(output, t_ours, x, generator=torch.Generator().manual_seed(seed_step),
                                  return_dict=False)[0]
            if not torch.allclose(prev_stock, prev, rtol=RTOL, atol=ATOL * max(1.0, float(prev.abs().max()))):
                return False
            x = prev
    return True


def stock_scheduler(scheduler: FewStepScheduler, teacher_config: dict) -> SchedulerMixin | None:
    """The first stock scheduler that ``replays`` ``scheduler``, or ``None``."""
    for candidate in _candidates(scheduler, dict(teacher_config)):
        if replays(candidate, scheduler):
            return candidate
    return None
