"""sCM: continuous-time consistency distillation (Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models", arXiv 2410.11081, Algorithm 1 with a pretrained teacher), on any
schedule fastgen supports: the TrigFlow path is mapped onto the teacher's own time, so the student stays a
copy of the teacher network, fed and read in the teacher's own parameterisation. Derivations: docs/scm.md.

**TrigFlow on the teacher's time.** TrigFlow (§3) writes ``x_t = cos(t) x0 + sin(t) z``, ``z = sigma_d eps``,
``t ∈ [0, pi/2]``; the teacher writes ``x_s = alpha(s) x0 + sigma(s) eps``. Divided by ``cos t`` and
``alpha(s)`` both are ``x0 + (noise/signal) eps``, so for the same ``(x0, eps)`` they are one sample scaled when

    sigma(s) / alpha(s) = sigma_d tan t      (equal signal-to-noise ratios; s = schedule.t_from_logsnr)
    x_s = k(t) x_t,   k = alpha(s) / cos t = sqrt(alpha(s)² + sigma(s)² / sigma_d²)

(``trig_to_teacher``; the inverse ``t = atan2(sigma(s), sigma_d alpha(s))``, ``teacher_to_trig``).
``k`` is finite at both ends: 1 at ``t = 0``, ``1/sigma_d`` where ``alpha = 0``.

**The teacher's velocity.** Along ``x_t`` the conditional velocity is ``-sin t x0 + cos t z``; the PF-ODE
velocity is its mean given ``x_t``, with ``E[z | x_t] = (x_t - cos t x0^) / sin t`` and
``x0^ = E[x0 | x_t] = D(k x_t, s)`` (the teacher's x0-prediction: ``x_s`` is a fixed multiple of ``x_t``), so

    dx_t/dt = sigma_d F_teacher = (cos t x_t - x0^) / sin t                          (``velocity``)

**The student.** ``sigma_d F_theta = (cos t x_t - D_theta(k x_t, s)) / sin t``: the consistency function of
TrigFlow, ``f_theta = cos t x_t - sin t sigma_d F_theta``, is then exactly ``D_theta(k x_t, s)``, the student
denoiser's own x0 at the SNR-matched time, and at initialisation (a copy of the teacher) ``F_theta`` is
the teacher's ``F``. The boundary ``f(x, 0) = x`` holds in the limit for epsilon, v, flow and EDM outputs (their
``x0 -> x_s`` as ``sigma -> 0``; e.g. an epsilon network gives ``F = (eps^ - sin t x_t / sigma_d) / cos t``).

**The loss** (Algorithm 1; §4.2 tangent normalisation, adaptive weighting, tangent warm-up; §5 JVP
rearrangement). With ``theta- = sg(theta)``,

    g = -cos²(t) (sigma_d F_theta- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta-/dt)
    g <- g / (||g|| + c)                                   (c = 0.1, per sample)
    L = e^{w(t)} / D ||F_theta - F_theta- - g||² - w(t)     (D elements per sample)

``g = cos t df_theta-/dt`` along the teacher's ODE; ``cos t sin t sigma_d dF_theta-/dt`` is one
``fastgen.jvp`` of ``(x_t, t) -> sigma_d F_theta`` with tangents ``(cos t sin t dx_t/dt, cos t sin t)`` (a
central "finite_difference" by default, or "exact" forward AD; below). ``r = min(1, step / tangent_warmup_steps)``.
``w`` is a small MLP on Fourier features of ``c_noise(t) = t`` (the paper's identity time transformation, §4.1),
trained with the student in the same phase; it outputs ``u = w - log D``, zero at the start, so the weight
``e^w / D = e^u`` starts at 1 (the optimum for a unit tangent) and the loss is ``e^u ||.||² - u``.
Times: ``ln(sigma_d tan t) ~ N(P_mean, P_std²)`` (-1.0, 1.4), clamped to the teacher's range.

**Sampling** (renoise, which the export replays unchanged): one step ``x0 = f(sigma_d z, t_max)`` is ``D_theta`` on
pure noise at the first time ``T``, the teacher's last (capped below for epsilon students of VP teachers; ``t_max =
atan2(sigma(T), sigma_d alpha(T))``, pi/2 for flow); two steps renoise to ``t_mid`` (1.1): ``k (cos t_mid x0 + sin
t_mid sigma_d z') = alpha(s_mid) x0 + sigma(s_mid) z'``, exactly ``renoise_step`` at ``s_mid = s(t_mid)``. The
plan's grids are ``[T]`` and ``[T, s(1.1)]`` in the teacher's time.

**The cap for epsilon students of VP teachers.** An epsilon network's
``sigma_d F = (sigma_d eps^ - sin t x_t) / cos t`` moves by ``1 / cos t`` per unit of its output, about 300 at the
top of a linear-beta DDPM (alpha(999) = 0.006): near the top each optimizer step moves ``F`` hundreds of times more
than elsewhere, and on the toy teacher the one-step output grew to a std of 10 (docs/scm.md). Such a student's
first time is capped where alpha = ``TOP_ALPHA`` = 0.1 (``first_time``: 672 on linear betas; ``1 / alpha`` 10), the
time proposal stops there, and the first step is fed pure noise at a time whose marginal is nearly noise. Unlike
the DMD family's students, which learn their map from whatever input they are given, a consistency function
reproduces the teacher's ODE from its input, so the cap cannot sit where the marginal still holds signal: on the
toy teacher the 64-step ODE from pure noise at 452 (DMD's cap, alpha 0.35) ends at toy FID 45.5, at 672 (alpha 0.1)
11.9, at 800 (0.04) 10.2, from the top 9.4 (``scripts/ode_from_noise.py``, docs/scm/ode_from_noise.md).

**The tangent of a discrete-time teacher.** A teacher trained at integer timesteps (every DDPM-style diffusers
teacher) predicts an x0 that jitters from one timestep to the next, and ``sigma_d dF/dt`` scales that jitter by
``sigma / alpha`` and by ``ds/dt``. On the toy teacher at initialisation the exact tangent is 35 at ``s = 672`` where
a central difference over 29 timesteps either side is 5.7, and the two point apart (mean cosine -0.11;
``scripts/scm_tangent_scale.py``, docs/scm/tangent_scale.md): the paper's exact JVP trains the student on the jitter,
and its 2-step toy student stays noise (624). The default tangent is the central difference of ``fastgen.jvp`` over
``jvp_eps = 0.2`` (a step of ``0.2 cos t sin t`` in TrigFlow time, 20 to 38 of the toy's timesteps either side at
every level), which is the exact tangent of a smooth teacher to within 2 % (tests/test_scm.py) and gives the toy's
2-step student 12.5 and 10.5 (two seeds; docs/scm.md, the tangent of a discrete-time teacher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fastgen.errors import UsageError, check_fields, warn
from fastgen.jvp import JVP_METHODS, jvp, warn_finite_difference
from fastgen.losses.base import Objective, Phase
from fastgen.losses.dmd import DMD, alpha_time
from fastgen.samplers.solvers import Guidance, denoise
from fastgen.schedules import expand_to

T_FLOOR = 1e-3
"""Margin of the trained TrigFlow times from both ends: below ``T_FLOOR`` float32 loses more than 1e-4 of ``F`` to
the cancellation in ``(cos t x_t - x0^) / sin t`` (the log-normal proposal puts about 1e-6 of its mass there);
float32's pi/2 has ``cos < 0``. Only flow teachers reach pi/2: they train up to ``s = 998`` of 1000."""


TOP_ALPHA = 0.1
"""An epsilon student of a VP teacher starts where ``alpha = TOP_ALPHA`` (``first_time``; module docstring, the cap)."""


def trig_to_teacher(schedule, t: torch.Tensor, sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, k)``: the teacher's time ``s`` with ``sigma(s) / alpha(s) = sigma_d tan t`` and the input scale
    ``k = sqrt(alpha(s)² + sigma(s)² / sigma_d²)``, ``x_s = k x_t`` (module docstring). Differentiable in ``t``."""
    logsnr = 2 * (torch.log(torch.cos(t)) - torch.log(sigma_d * torch.sin(t)))
    s = schedule.t_from_logsnr(logsnr)
    alpha, sigma = schedule.alpha_sigma(s)
    return s, (alpha**2 + (sigma / sigma_d) ** 2).sqrt()


def teacher_to_trig(schedule, s, sigma_d: float) -> torch.Tensor:
    """The TrigFlow time of the teacher's time ``s``: ``atan2(sigma(s), sigma_d alpha(s))``."""
    alpha, sigma = schedule.alpha_sigma(torch.as_tensor(s, dtype=torch.float32))
    return torch.atan2(sigma, sigma_d * alpha)


def trig_range(schedule, sigma_d: float) -> tuple[float, float]:
    """``[t_lo, t_hi]``: the teacher's time range in TrigFlow time, at least ``T_FLOOR`` inside ``[0, pi/2]``."""
    t = teacher_to_trig(schedule, torch.tensor([schedule.t_min, schedule.t_max]), sigma_d)
    return max(float(t[0]), T_FLOOR), min(float(t[1]), math.pi / 2 - T_FLOOR)


def trig_noise(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """TrigFlow's marginal sample ``x_t = cos t x0 + sin t sigma_d eps`` (§3)."""
    return expand_to(torch.cos(t), x0) * x0 + expand_to(torch.sin(t), x0) * sigma_d * eps


def velocity(denoiser, x_t: torch.Tensor, t: torch.Tensor, cond, sigma_d: float,
             guidance: Guidance | None = None) -> torch.Tensor:
    """``dx_t/dt = sigma_d F = (cos t x_t - x0^) / sin t`` with ``x0^ = D(k x_t, s)``: a denoiser of the
    teacher's schedule read as a TrigFlow velocity at TrigFlow times ``t`` (shape (B,))."""
    s, k = trig_to_teacher(denoiser.schedule, t, sigma_d)
    x0 = denoise(denoiser, expand_to(k, x_t) * x_t, s, cond, guidance)
    return (expand_to(torch.cos(t), x_t) * x_t - x0) / expand_to(torch.sin(t), x_t)


def first_time(schedule, student_schedule) -> float:
    """The first time of a student that reproduces the teacher's ODE from pure noise (sCM, rCM, MeanFlow): the
    teacher's last, capped where alpha = ``TOP_ALPHA`` for an epsilon student of a VP teacher (module docstring,
    the cap)."""
    if DMD.capped(schedule, student_schedule):
        return min(float(schedule.t_max), alpha_time(schedule, TOP_ALPHA))
    return float(schedule.t_max)


class AdaptiveWeight(nn.Module):
    """``u(t) = w(t) - log D``: an MLP on ``sin(2^j t), cos(2^j t)``, ``j = 0..4``; its last layer starts at
    zero, so ``e^w / D`` starts at 1."""

    FREQUENCIES = (1.0, 2.0, 4.0, 8.0, 16.0)

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.register_buffer("freqs", torch.tensor(self.FREQUENCIES), persistent=False)
        self.net = nn.Sequential(nn.Linear(2 * len(self.FREQUENCIES), hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs
        return self.net(torch.cat([angles.sin(), angles.cos()], 1))[:, 0]


@dataclass
class SCMConfig:
    sigma_d: float = 0.5
    """TrigFlow's data standard deviation (paper: 0.5 for pixels in [-1, 1]; rCM uses 1.0 for unit-variance latents)."""
    p_mean: float = -1.0
    """Mean of ``ln(sigma_d tan t)`` (paper's proposal for distillation)."""
    p_std: float = 1.4
    """Standard deviation of ``ln(sigma_d tan t)``."""
    tangent_warmup_steps: int = 1000
    """Steps over which ``r`` rises from 0 to 1 (paper: 10k of runs of 100k+ iterations; rCM's Wan2.1 1.3B
    distillation, a few thousand iterations: 1000); 0 = no warm-up."""
    tangent_c: float = 0.1
    """``c`` of the tangent normalisation ``g / (||g|| + c)``."""
    jvp: str = "finite_difference"
    """How ``dF/dt`` is computed: "finite_difference" (a central difference over ``jvp_eps``, ``fastgen.jvp``) or
    "exact" (forward AD, the paper's). A teacher trained at integer timesteps has an x0-prediction that jitters from
    one timestep to the next, and its exact tangent is mostly that jitter (module docstring, the tangent of a
    discrete-time teacher); a difference over many timesteps is not."""
    jvp_eps: float = 0.2
    """Step of "finite_difference" along the tangents ``(cos t sin t dx_t/dt, cos t sin t)``: ``0.2 cos t sin t`` in
    TrigFlow time, 20 to 38 timesteps of a 1000-step linear-beta DDPM either side at every level
    (docs/scm/tangent_scale.md). The toy teacher's 2-step sCM student at 2,000 steps, toy FID (seeds 0, 1): 624
    exact, 208 at 0.05, 25 / 26 at 0.1, 12 / 40 at 0.15, 12.5 / 10.5 at 0.2, noise at 0.3 (its tangent diverged;
    docs/scm.md). 3e-4 reproduces the exact tangent (tests/test_scm.py)."""
    t_mid: list[float] = field(default_factory=lambda: [1.1])
    """TrigFlow times of the steps after the first, descending (paper: 1.1 for two steps); k steps need k - 1."""
    guidance_scale: float = 1.0
    """Ho–Salimans CFG scale of the teacher's velocity (text teachers); 1 = none."""
    weight_hidden: int = 64
    """Hidden width of the adaptive weighting MLP."""

    def __post_init__(self):
        check_fields([
            (self.sigma_d > 0, "sigma_d", self.sigma_d, "> 0"),
            (self.p_std > 0, "p_std", self.p_std, "> 0"),
            (self.tangent_warmup_steps >= 0, "tangent_warmup_steps", self.tangent_warmup_steps, ">= 0"),
            (self.tangent_c > 0, "tangent_c", self.tangent_c, "> 0"),
            (self.jvp in JVP_METHODS, "jvp", self.jvp, f"one of {list(JVP_METHODS)}"),
            (self.jvp_eps > 0, "jvp_eps", self.jvp_eps, "> 0"),
            (all(0 < t < math.pi / 2 for t in self.t_mid) and all(a > b for a, b in zip(self.t_mid, self.t_mid[1:])),
             "t_mid", self.t_mid, "descending TrigFlow times in (0, pi/2)"),
            (self.guidance_scale >= 1.0, "guidance_scale", self.guidance_scale, ">= 1 (1 = no guidance)"),
            (self.weight_hidden >= 1, "weight_hidden", self.weight_hidden, ">= 1"),
        ], "objective.")


class SCM(Objective):
    name = "scm"
    Config = SCMConfig
    rule = "renoise"
    needs_data = True

    def __init__(self, teacher, nets, config: SCMConfig, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        warn_finite_difference(self.teacher.model, config.jvp)
        if self.student.schedule.prediction_type == "sample":
            warn(f"{self.name}: the student predicts x0 (prediction_type 'sample'), so the consistency function's "
                 "boundary f(x, 0) = x holds only as far as the network learnt it (docs/scm.md); expected an "
                 "epsilon, v or flow student (student.prediction_type converts it)")
        t_lo, t_hi = trig_range(self.schedule, config.sigma_d)
        top = max(grid[0] for grid in plan.grids.values())
        self.t_bounds = (t_lo, min(t_hi, float(teacher_to_trig(self.schedule, top, config.sigma_d))))
        """The trained TrigFlow times: the teacher's range, below the plan's first time (sampling never asks the
        consistency function above it)."""
        self.check_guidance(config.guidance_scale)
        self.add_network("weighting", self.factory.module(AdaptiveWeight(config.weight_hidden)))

    # -- the plan ----------------------------------------------------------------------------------
    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps):
        """``[T, s(t_mid[0]), ..., s(t_mid[num_steps - 2])]``: the first time ``T`` (``first_time``: the teacher's
        last, capped where alpha = ``TOP_ALPHA`` for an epsilon student of a VP teacher; module docstring, the cap),
        then the SNR-matched teacher times of ``objective.t_mid`` (module docstring, sampling)."""
        if num_steps - 1 > len(config.t_mid):
            raise UsageError(f"objective.t_mid has {len(config.t_mid)} times; student.num_steps = {num_steps} needs "
                             f"{num_steps - 1} (descending TrigFlow times, e.g. [1.1] for two steps)")
        top = first_time(schedule, student_schedule)
        t_hi = min(trig_range(schedule, config.sigma_d)[1], float(teacher_to_trig(schedule, top, config.sigma_d)))
        mids = config.t_mid[:num_steps - 1]
        if mids and mids[0] >= t_hi:
            raise UsageError(f"objective.t_mid is {config.t_mid}; expected times below the student's first time "
                             f"{t_hi:.4f} in TrigFlow time")
        rest = trig_to_teacher(schedule, torch.tensor(mids, dtype=torch.float32), config.sigma_d)[0].tolist()
        return [top] + [float(s) for s in rest]

    @classmethod
    def plan_grids(cls, schedule, student_schedule, config, num_steps):
        """A consistency function serves every step count ``objective.t_mid`` spans (1 and 2 by default)."""
        counts = {num_steps} | set(range(1, len(config.t_mid) + 2))
        return {n: cls.default_grid(schedule, student_schedule, config, n) for n in sorted(counts)}

    @classmethod
    def exported_counts(cls, config, num_steps, grids):
        return sorted(grids)

    # -- training ----------------------------------------------------------------------------------
    def phases(self):
        return [Phase("generator", ("student", "weighting"), self.scm_loss)]

    def sample_t(self, n: int, device) -> torch.Tensor:
        """``t = atan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std²)``, clamped to ``t_bounds``."""
        c = self.config
        tau = c.p_mean + c.p_std * torch.randn(n, device=device)
        return torch.atan(torch.exp(tau) / c.sigma_d).clamp(*self.t_bounds)

    def warmup(self, step: int) -> float:
        """``r = min(1, step / tangent_warmup_steps)``."""
        h = self.config.tangent_warmup_steps
        return 1.0 if h == 0 else min(1.0, step / h)

    def tangent(self, batch, step: int, x_t: torch.Tensor, t: torch.Tensor):
        """``(sigma_d F_theta, g, ||g||)``: the student's velocity (with its graph) and the tangent ``g`` before
        normalisation, from the teacher's velocity and one JVP (module docstring)."""
        c = self.config
        guidance = Guidance(batch.uncond, c.guidance_scale) if c.guidance_scale != 1.0 else None
        with torch.no_grad():
            dx_dt = velocity(self.teacher, x_t, t, batch.cond, c.sigma_d, guidance).float()
        cos, sin = expand_to(torch.cos(t), x_t), expand_to(torch.sin(t), x_t)
        cs = torch.cos(t) * torch.sin(t)

        def student_velocity(x, tt):
            return velocity(self.student, x, tt, batch.cond, c.sigma_d).float()

        # forward AD fails on bf16 convolutions and a bf16 finite difference is noise (docs/jvp.md): float32
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            v, dv = jvp(student_velocity, (x_t, t), (expand_to(cs, x_t) * dx_dt, cs), method=c.jvp, eps=c.jvp_eps)
        r = self.warmup(step)
        g = -cos**2 * (v.detach() - dx_dt) - r * (cos * sin * x_t + dv)
        return v, g, g.flatten(1).norm(dim=1)

    def scm_loss(self, batch, step):
        """``e^u ||F_theta - F_theta- - g / (||g|| + c)||² - u`` (module docstring), mean over the batch."""
        c = self.config
        x0 = batch.x0.float()
        t = self.sample_t(x0.shape[0], x0.device)
        x_t = trig_noise(x0, t, torch.randn_like(x0), c.sigma_d)
        v, g, g_norm = self.tangent(batch, step, x_t, t)
        g = g / expand_to(g_norm + c.tangent_c, g)
        F = v / c.sigma_d
        per_sample = ((F - F.detach() - g) ** 2).flatten(1).sum(1)
        u = self.nets["weighting"](t)
        loss = (torch.exp(u) * per_sample - u).mean()
        return {"loss": loss, "g_norm": g_norm.mean().detach(), "weight": torch.exp(u).mean().detach(),
                "r": torch.tensor(self.warmup(step), device=x0.device)}
