"""The denoiser: any diffusers denoising network plus its noise schedule, answering ``x0 = D(x_t, t, cond)``.

Teacher, student, fake score and critic are all ``Denoiser``s, so every objective is written against
x0-predictions and the schedule's ``(alpha, sigma)`` and never against a particular output type.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

from fastgen.schedules import NoiseSchedule, expand_to

Cond = Mapping[str, Any]
"""Keyword arguments of the network besides the sample and the timestep, e.g.
``{"encoder_hidden_states": ...}``, ``{"class_labels": ...}`` or SDXL's ``{"added_cond_kwargs": {...}}``."""


def cat_cond(a: Cond | None, b: Cond | None) -> Cond | None:
    """Concatenate two conditions along the batch (recursively through nested dicts)."""
    if a is None or b is None:
        if a is not b:
            raise ValueError("cat_cond: one condition is None and the other is not; expected both or neither")
        return None
    if set(a) != set(b):
        raise ValueError(f"cat_cond: keys differ, {sorted(a)} vs {sorted(b)}")
    out = {}
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            out[key] = torch.cat([va, vb])
        elif isinstance(va, Mapping):
            out[key] = cat_cond(va, vb)
        elif va is None and vb is None:
            out[key] = None
        else:
            raise ValueError(f"cat_cond: cannot batch condition {key!r} of type {type(va).__name__}")
    return out


def slice_cond(cond: Cond | None, index) -> Cond | None:
    """Select samples of a condition along the batch (recursively)."""
    if cond is None:
        return None
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[index]
        elif isinstance(value, Mapping):
            out[key] = slice_cond(value, index)
        else:
            out[key] = value
    return out


def batch_times(t, x: torch.Tensor) -> torch.Tensor:
    """Times as a float tensor of shape (B,) for the batch ``x`` (a scalar is repeated)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class BaseDenoiser(nn.Module):
    """``x0 = D(x_t, t, cond)`` over a noise schedule; subclasses implement ``forward``."""

    schedule: NoiseSchedule

    def output(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        """The prediction in the schedule's own output type (e.g. eps for an epsilon teacher)."""
        t = batch_times(t, x_t)
        return self.schedule.from_x0(self(x_t, t, cond), x_t, t)

    def guided(self, x_t: torch.Tensor, t, cond: Cond | None, uncond: Cond | None, scale: float) -> torch.Tensor:
        """Classifier-free guidance in the Ho–Salimans form ``u + scale (c - u)`` (Ho & Salimans 2022,
        eq. 6, in x0 space, which equals guiding eps at fixed ``(x_t, t)``); ``scale = 1`` is no guidance;
        a tensor ``scale`` of shape (B,) guides each sample with its own scale.
        Codebases that write ``c + w (c - u)`` (LCM, PCM, some DMD code) mean ``scale = w + 1``."""
        if not isinstance(scale, torch.Tensor) and scale == 1.0:
            return self(x_t, t, cond)
        t = batch_times(t, x_t)
        x0 = self(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
        x0_u, x0_c = x0.chunk(2)
        scale = torch.as_tensor(scale, dtype=x0.dtype, device=x0.device)
        return x0_u + expand_to(scale, x0_u) * (x0_c - x0_u)


class Denoiser(BaseDenoiser):
    """``x0 = D(x_t, t, cond)`` for a diffusers network (``UNet2DModel``, ``UNet2DConditionModel``,
    ``SD3Transformer2DModel``, …) whose output type is ``schedule.prediction_type``."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.model = model
        self.schedule = schedule
        params = inspect.signature(model.forward).parameters
        if "sample" in params:
            self.input_name = "sample"
        elif "hidden_states" in params:
            self.input_name = "hidden_states"
        else:
            raise TypeError(
                f"{type(model).__name__}.forward takes neither `sample` nor `hidden_states`; "
                "expected a diffusers denoising network"
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def output(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        """The network's own output (of type ``schedule.prediction_type``), in ``x_t``'s dtype."""
        t = batch_times(t, x_t)
        x_in, t_in = self.schedule.model_input(x_t, t)
        kwargs = {self.input_name: x_in.to(self.dtype), "timestep": t_in, "return_dict": False}
        out = self.model(**kwargs, **(cond or {}))[0]
        return out.to(x_t.dtype)

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        t = batch_times(t, x_t)
        return self.schedule.to_x0(self.output(x_t, t, cond), x_t, t)


def boundary_coefficients(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """Consistency-model boundary condition in LCM's form (Song et al. 2023, eq. 7; Luo et al. 2023,
    "Latent consistency models", §4.1): with ``u = timestep_scaling * t``,
    ``c_skip = sigma_data² / (u² + sigma_data²)`` and ``c_out = u / sqrt(u² + sigma_data²)``, so that
    ``c_skip(0) = 1, c_out(0) = 0``."""
    u = timestep_scaling * torch.as_tensor(t, dtype=torch.float32)
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class BoundaryDenoiser(BaseDenoiser):
    """``f(x_t, t) = c_skip(t) x_t + c_out(t) D(x_t, t)``: a consistency student's output."""

    def __init__(self, inner: BaseDenoiser, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        t = batch_times(t, x_t)
        c_skip, c_out = boundary_coefficients(t, self.sigma_data, self.timestep_scaling)
        return expand_to(c_skip, x_t) * x_t + expand_to(c_out, x_t) * self.inner(x_t, t, cond)
