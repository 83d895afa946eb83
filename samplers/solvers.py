"""Samplers with one signature (k-diffusion style), written against x0-predictions and ``(alpha, sigma)``:

    sample_<name>(denoiser, x, timesteps, cond=None, guidance=None, generator=None, callback=None) -> x0

``x`` is the sample at ``timesteps[0]``; the sampler visits ``timesteps`` (descending native times of
``denoiser.schedule``) and its last step lands on the clean sample (``alpha = 1, sigma = 0``). A
student conditioned at ``t`` and fed pure noise (DMD2's 1-step student at 399, SiD's at 625) is
sampled with ``timesteps=[t]`` and ``x = randn``. ``callback`` receives a dict with ``i``, ``t``, ``x``
(after the step) and ``x0`` (the step's prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastgen.denoiser import BaseDenoiser, Cond
from fastgen.schedules import NoiseSchedule, expand_to


@dataclass
class Guidance:
    """Classifier-free guidance ``u + scale (c - u)`` (Ho–Salimans form; ``scale = 1`` is none)."""

    uncond: Cond | None
    scale: float


def denoise(denoiser: BaseDenoiser, x: torch.Tensor, t, cond: Cond | None = None,
            guidance: Guidance | None = None) -> torch.Tensor:
    """``x0 = D(x, t, cond)``, guided when ``guidance`` is given."""
    if guidance is None:
        return denoiser(x, t, cond)
    return denoiser.guided(x, t, cond, guidance.uncond, guidance.scale)


def alpha_sigma(schedule: NoiseSchedule, t, x: torch.Tensor):
    """``(alpha, sigma)`` at ``t`` broadcast against ``x`` (one ``schedule.alpha_sigma`` call, on ``x``'s
    device); ``t = None`` is the clean end ``(1, 0)``."""
    if t is None:
        return torch.ones((), dtype=x.dtype, device=x.device), torch.zeros((), dtype=x.dtype, device=x.device)
    a, s = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float32, device=x.device))
    return expand_to(a, x), expand_to(s, x)


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, x0: torch.Tensor, t, s) -> torch.Tensor:
    """One deterministic DDIM step from ``t`` to ``s`` (``None``: clean) given the prediction ``x0``:
    ``x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t`` (Song et al. 2021, eq. 12 with eta = 0).
    With ``alpha = 1 - sigma`` this is the flow-matching Euler step, with ``alpha = 1`` EDM's Euler step."""
    a_t, s_t = alpha_sigma(schedule, t, x_t)
    a_s, s_s = alpha_sigma(schedule, s, x_t)
    return a_s * x0 + s_s * (x_t - a_t * x0) / s_t


def renoise_step(schedule: NoiseSchedule, x0: torch.Tensor, s, noise: torch.Tensor) -> torch.Tensor:
    """Predict-x0-then-renoise to level ``s``: ``x_s = alpha_s x0 + sigma_s noise`` (Song et al. 2023,
    Algorithm 1; the multistep rule of consistency, DMD and SiD students)."""
    a_s, s_s = alpha_sigma(schedule, s, x0)
    return a_s * x0 + s_s * noise


def _next(timesteps, i):
    return timesteps[i + 1] if i + 1 < len(timesteps) else None


def _report(callback, i, t, x, x0):
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})


@torch.no_grad()
def sample_ddim(denoiser, x, timesteps, cond=None, guidance=None, generator=None, callback=None):
    """Deterministic DDIM / Euler (first order, one network call a step); also the progressive student rule."""
    for i, t in enumerate(timesteps):
        x0 = denoise(denoiser, x, t, cond, guidance)
        x = ddim_step(denoiser.schedule, x, x0, t, _next(timesteps, i))
        _report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, timesteps, cond=None, guidance=None, generator=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1) in exponential-integrator form: an
    Euler/DDIM predictor ``x' = ddim(x_t, x0_t)``, then the DDIM step taken with the trapezoidal mean
    ``(x0_t + D(x', s)) / 2`` (second order in ``lambda = log(alpha/sigma)``; finite where ``alpha_t = 0``,
    as at the start of a flow schedule). The last step, to the clean sample, is a plain Euler step.
    ``2n - 1`` network calls for ``n`` timesteps."""
    schedule = denoiser.schedule
    for i, t in enumerate(timesteps):
        s = _next(timesteps, i)
        x0 = denoise(denoiser, x, t, cond, guidance)
        x_next = ddim_step(schedule, x, x0, t, s)
        if s is not None:
            x0_next = denoise(denoiser, x_next, s, cond, guidance)
            x_next = ddim_step(schedule, x, (x0 + x0_next) / 2, t, s)
        x = x_next
        _report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, timesteps, cond=None, guidance=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) with ``lambda = log(alpha / sigma)``:
    ``x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D`` with ``D = (1 + 1/2r) x0_i - (1/2r) x0_{i-1}``,
    ``r = h_{i-1} / h_i``; first order on the first step and on the last step (to the clean sample)."""
    schedule = denoiser.schedule
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        s = _next(timesteps, i)
        x0 = denoise(denoiser, x, t, cond, guidance)
        if s is None:
            x = x0
        else:
            a_t, s_t = alpha_sigma(schedule, t, x)
            a_s, s_s = alpha_sigma(schedule, s, x)
            h = torch.log(a_s / s_s) - torch.log(a_t / s_t)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_s / s_t) * x - a_s * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        _report(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_renoise(denoiser, x, timesteps, cond=None, guidance=None, generator=None, callback=None):
    """Few-step student rule: predict x0, then diffuse it with fresh noise to the next timestep."""
    for i, t in enumerate(timesteps):
        x0 = denoise(denoiser, x, t, cond, guidance)
        s = _next(timesteps, i)
        if s is None:
            x = x0
        else:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            x = renoise_step(denoiser.schedule, x0, s, noise)
        _report(callback, i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddim": sample_ddim,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "renoise": sample_renoise,
}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
