"""The network output ``F`` and its tangent ``dF_dt`` along time in one call: a Jacobian-vector product.

Continuous-time consistency models and MeanFlow train on the total derivative of the network output along
the noising path, ``dF/dt = ∂F/∂x_t · dx_t/dt + ∂F/∂t``: a Jacobian-vector product (JVP) of ``F(x_t, t)``
with the tangents ``(dx_t/dt, 1)``.

- sCM (Lu & Song 2024, "Simplifying, stabilizing and scaling continuous-time consistency models",
  arXiv 2410.11081, Algorithm 1): the tangent ``g`` holds ``dF_θ⁻/dt``, the JVP of ``F_θ⁻(x_t / σ_d, t)``
  with tangents ``cos(t) sin(t) (dx_t/dt, 1)`` after the paper's "JVP rearrangement".
- MeanFlow (Geng et al. 2025, "Mean flows for one-step generative modeling", arXiv 2505.13447): the
  MeanFlow identity ``u = v - (t - r) du/dt`` (eq. 6) with ``du/dt = v ∂_z u + ∂_t u`` (eq. 8), computed
  as ``jvp(fn, (z, r, t), (v, 0, 1))`` (Algorithm 1).

Both use the tangent as a stop-gradient target, and the primal output in the loss with its gradient:
``jvp`` returns ``(F, dF_dt)`` with ``dF_dt`` detached. Two methods, named by ``JVP_METHODS`` (a config
key carries the name):

- "exact": forward-mode AD, ``torch.func.jvp``, with attention on a kernel that has forward AD
  (``jvp_attention``);
- "finite_difference": the central difference
  ``(F(x_t + eps dx, t + eps dt) - F(x_t - eps dx, t - eps dt)) / (2 eps)`` of two forward passes without
  a graph (NVlabs/FastGen's ``use_jvp_finite_diff``).

Accuracy, attention kernels and cost measured on diffusers models: docs/jvp.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastgen.errors import warn

JVP_METHODS = ("exact", "finite_difference")

FD_EPS = 1e-4
"""Default step of "finite_difference" along the tangents, for times of order one with ``dt`` of order one
(MeanFlow's ``t ∈ [0, 1]``; FastGen's MeanFlow default ``jvp_finite_diff_eps``): in float32, on diffusers
networks called at ``1000 t`` with tangents ``(dx, 1)``, within a factor 3.5 of the best step of a sweep, relative
error 4e-4 to 3e-3 (docs/jvp.md). The step is in the units of ``fn``'s inputs: with times in diffusers' timesteps
(0 to 1000) and ``dt = 1`` per timestep, the same step is ``eps = 0.1``."""


def jvp_attention():
    """A context in which ``F.scaled_dot_product_attention`` runs torch's math kernel, which forward-mode AD
    runs through. The fused kernels that torch picks by default have no forward-AD formula (CPU, torch 2.14:
    ``_scaled_dot_product_flash_attention_for_cpu`` raises NotImplementedError; on GPUs flash,
    memory-efficient and cuDNN attention). This covers diffusers' SDPA processors (``AttnProcessor2_0``,
    ``JointAttnProcessor2_0``) and its dispatcher's "native" backend (Flux); not xformers or flash-attn
    backends (``train.attention=xformers``), which call their own kernels."""
    return sdpa_kernel(SDPBackend.MATH)


FD_UNRELIABLE = {"SanaLinearAttn": "SANA's linear attention (ReLU features, float32 inside)"}
"""Attention processors (by a part of their class name) through which "finite_difference" misses the tangent:
relative error 0.56 at ``FD_EPS`` on a tiny ``SanaTransformer2DModel``, 0.03 at the best step of a float64
sweep, where "exact" agrees with reverse-mode AD to 1e-7 (docs/jvp.md, tests/test_jvp.py)."""


def finite_difference_hazard(model: torch.nn.Module) -> str | None:
    """What in ``model`` defeats a finite-difference JVP (``FD_UNRELIABLE``), or None."""
    for module in model.modules():
        name = type(getattr(module, "processor", None)).__name__
        for part, what in FD_UNRELIABLE.items():
            if part in name:
                return what
    return None


def warn_finite_difference(model: torch.nn.Module, method: str) -> None:
    """A ``warning:`` line where ``method`` is "finite_difference" and ``model`` has a ``finite_difference_hazard``
    (``objective.jvp`` of sCM, rCM and MeanFlow)."""
    hazard = finite_difference_hazard(model) if method == "finite_difference" else None
    if hazard:
        warn(f"objective.jvp is 'finite_difference', and the teacher's network uses {hazard}, where a central "
             "difference misses the tangent by about half its size (docs/jvp.md); objective.jvp=exact computes it "
             "exactly")


def jvp(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
        method: str = "exact", eps: float = FD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, dF_dt)``: ``F = fn(*primals)`` and its derivative along ``tangents``,
    ``dF_dt = Σ_i ∂fn/∂primals[i] · tangents[i]`` (``method``: one of ``JVP_METHODS``; ``eps``: the step of
    "finite_difference").

    ``fn`` takes tensors and returns one tensor: ``lambda x_t, t: denoiser(x_t, t, cond)`` (a condition closed
    over is a constant) or a raw diffusers call. ``tangents`` match ``primals`` in shape and dtype; a zero
    tangent holds its input fixed (``(0, dt)``: ``∂F/∂t`` alone).

    ``dF_dt`` is computed without a graph (detached: the stop-gradient target of sCM and MeanFlow). With grad
    enabled, ``F`` is a plain forward ``fn(*primals)`` run after the tangent passes and recorded for backward,
    the way NVlabs' sCM and rCM code recompute it: taking the primal of a recorded ``torch.func.jvp`` instead
    keeps forward AD's graph, measured at 10 times the peak memory of a plain step (docs/jvp.md). The tangent
    passes replay the random state of that forward (the same dropout masks), and the random state ends as after
    it. Under ``torch.no_grad()`` "exact" returns the JVP's own primal, one pass (math attention, so equal to a
    plain forward up to rounding)."""
    if method not in JVP_METHODS:
        raise ValueError(f"jvp method {method!r}; expected one of {list(JVP_METHODS)}")
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals and {len(tangents)} tangents; expected one tangent per primal")
    replay = torch.is_grad_enabled() or method == "finite_difference"
    devices = [p.device for p in primals if p.device.type != "cpu"]

    def replayed(*inputs):  # fn on a copy of the random state: that of the primal pass
        with torch.random.fork_rng(devices, enabled=replay, device_type=devices[0].type if devices else None):
            return fn(*inputs)

    with torch.no_grad():
        if method == "exact":
            with jvp_attention():
                F, dF_dt = torch.func.jvp(replayed, primals, tangents)
        else:
            F_plus = replayed(*(p + eps * v for p, v in zip(primals, tangents)))
            F_minus = replayed(*(p - eps * v for p, v in zip(primals, tangents)))
            dF_dt = (F_plus - F_minus) / (2 * eps)
    if replay:
        F = fn(*primals)
    return F, dF_dt
