"""MeanFlow distillation (Geng et al. 2025, "Mean flows for one-step generative modeling", arXiv 2505.13447), on any
schedule fastgen supports: the flow path is mapped onto the teacher's own time, so the student stays a copy of the
teacher network, fed and read in the teacher's parameterisation, plus the interval input of
``fastgen.pipelines.meanflow_model`` (zero at the start: a fresh student is the teacher).

**Flow time on the teacher's time.** The flow path writes ``z_tau = (1 - tau) x0 + tau eps``, ``tau ∈ [0, 1]``; the
teacher writes ``x_s = alpha(s) x0 + sigma(s) eps``. Both are one sample, scaled, when their signal-to-noise ratios
are equal:

    tau / (1 - tau) = sigma(s) / alpha(s),    x_s = k z_tau,   k = alpha(s) + sigma(s)

(``flow_to_teacher``; the inverse ``tau = sigma / (alpha + sigma)``, ``teacher_to_flow``). A flow teacher has
``s = tau`` and ``k = 1``.

**Velocities.** A denoiser's x0-prediction ``D`` at ``(k z, s)`` is read as the velocity ``(z - D) / tau`` (the
conditional velocity ``eps - x0`` given ``z``): the teacher's PF-ODE velocity ``v``, and, with the interval
``tau - r`` set, the student's average velocity ``u(z, r, tau) = (1 / (tau - r)) ∫_r^tau v(z_s, s) ds`` (eq. 3),
so that ``z_r = z - (tau - r) u`` — which is exactly the DDIM step from ``tau`` to ``r`` with the student's x0,
``z_r = (1 - r) D + r (z - (1 - tau) D) / tau``: the student samples, trains and exports with the ``ddim`` rule.

**The loss** (eq. 9–10, Algorithm 1, distilled: ``v`` is the teacher's velocity at ``z``, not ``eps - x0``):

    u_tgt = v - w (tau - r) du/dtau,  du/dtau = v ∂_z u + ∂_tau u     (one ``fastgen.jvp`` along ``(v, 1)``)
    L = sg(a) ||u - sg(u_tgt)||²,     a = 1 / (||u - sg(u_tgt)||² + c)^p        (§4.3, per sample; p 1, c 1e-3)

with ``w`` 1, or rising from 0 over ``tangent_warmup_steps`` (NVlabs/FastGen's tangent warm-up).

Times: ``tau`` and ``r`` are two draws of ``sigmoid(N(P_mean, P_std²))`` (-0.4, 1.0), the larger being ``tau``;
a fraction ``1 - r_neq_t`` (0.25) of the pairs has ``r = tau`` (plain flow matching on the teacher's velocity).
``tau`` is kept in the teacher's range, ``TAU_FLOOR`` inside ``[0, 1]``, and at or below the plan's first time;
``r`` down to 0.

**Sampling.** The grid is uniform in flow time from the first time ``T`` (``[T]``, ``[T, s(tau_T / 2)]``, ...):
each step lands on the next at the interval the student's table gives that step (``MeanFlowModel``). ``T`` is
sCM's (``fastgen.losses.scm.first_time``): the teacher's last time, capped for an epsilon student of a VP teacher
where alpha = 0.1, whose x0 divides by alpha (157 at the top of the toy's linear betas: its one-step samples blew
up, docs/scm.md). Unlike the DMD family, which trains on its own samples from pure noise, MeanFlow trains on the
data's noised marginals and reproduces the teacher's ODE from its input, so its first step must be fed pure noise
where the marginal is nearly noise: the DMD family's cap (alpha = 0.35) would start it where the marginal still
holds a third of the signal (the toy teacher's own ODE from pure noise there ends at toy FID 45.5; at alpha 0.1,
11.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.denoiser import unwrap
from fastgen.errors import UsageError, check_fields
from fastgen.families import family_of
from fastgen.jvp import FD_EPS, JVP_METHODS, jvp, warn_finite_difference
from fastgen.losses.base import Objective, Phase
from fastgen.losses.scm import first_time
from fastgen.pipelines.meanflow_model import DURATION_SCALE, attach_duration, duration, time_embedder
from fastgen.samplers.solvers import Guidance, denoise
from fastgen.schedules import expand_to

TAU_FLOOR = 1e-3
"""Margin of the trained flow times from both ends: below ``TAU_FLOOR`` the velocity ``(z - D) / tau`` loses float32
precision to cancellation; at ``tau = 1`` (a flow teacher's last time) the teacher's time ``s(tau)`` has an infinite
derivative (log-SNR -inf), and the tangent is NaN."""


def flow_to_teacher(schedule, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, k)``: the teacher's time ``s`` with ``sigma(s) / alpha(s) = tau / (1 - tau)`` and the input scale
    ``k = alpha(s) + sigma(s)``, ``x_s = k z_tau`` (module docstring). Differentiable in ``tau``."""
    s = schedule.t_from_logsnr(2 * (torch.log1p(-tau) - torch.log(tau)))
    alpha, sigma = schedule.alpha_sigma(s)
    return s, alpha + sigma


def teacher_to_flow(schedule, s) -> torch.Tensor:
    """The flow time of the teacher's time ``s``: ``sigma / (alpha + sigma)``."""
    alpha, sigma = schedule.alpha_sigma(torch.as_tensor(s, dtype=torch.float32))
    return sigma / (alpha + sigma)


def flow_velocity(denoiser, z: torch.Tensor, tau: torch.Tensor, cond, guidance: Guidance | None = None):
    """``(z - D(k z, s)) / tau``: a denoiser of the teacher's schedule read as a velocity at flow times ``tau``
    (B,) (module docstring)."""
    s, k = flow_to_teacher(denoiser.schedule, tau)
    x0 = denoise(denoiser, expand_to(k, z) * z, s, cond, guidance)
    return (z - x0) / expand_to(tau, z)


def interval_table(grid, schedule, model) -> tuple[list[float], list[float]]:
    """The table of ``attach_duration`` for the grid ``grid`` (native times, descending): each step's timestep in
    the units ``model`` receives, and ``DURATION_SCALE`` times its interval of flow time to the next step (to 0
    after the last)."""
    t = torch.tensor([float(s) for s in grid], dtype=torch.float32)
    units = schedule.model_input(torch.zeros_like(t), t)[1] * family_of(model).time_scale
    tau = teacher_to_flow(schedule, t)
    gaps = tau - torch.cat([tau[1:], tau.new_zeros(1)])
    return [float(u) for u in units], [float(DURATION_SCALE * g) for g in gaps]


@dataclass
class MeanFlowConfig:
    p_mean: float = -0.4
    """Mean of ``logit(tau)`` (paper: -0.4, its best on ImageNet 256, Table 1d)."""
    p_std: float = 1.0
    """Standard deviation of ``logit(tau)``."""
    r_neq_t: float = 0.75
    """Fraction of the pairs with ``r < tau``; the others have ``r = tau`` (plain flow matching on the teacher's
    velocity). The paper's 25% (Table 1a) trains from scratch, where those pairs teach the instantaneous velocity;
    a distilled student starts with the teacher's. Measured on the analytic mixture (tests/test_meanflow.py's
    student, 1,000 steps, 2 seeds), 2-step medians: 75% -1.87 / +1.81 and -1.94 / +1.85, 25% -1.64 / +1.53 and -1.53 /
    +1.36 (of ±2)."""
    tangent_warmup_steps: int = 0
    """Steps over which the identity's term ``(tau - r) du/dtau`` is weighted up linearly from 0 to 1 (NVlabs/FastGen's
    MeanFlow ``tangent_warmup_steps``: 2000 in its Wan 2.1 distillation); 0: none (the paper)."""
    adaptive_p: float = 1.0
    """Power ``p`` of the adaptive weight ``1 / (||.||² + c)^p`` (paper: 1.0; 0 is the plain squared error)."""
    adaptive_c: float = 1e-3
    """``c`` of the adaptive weight."""
    jvp: str = "exact"
    """How ``du/dtau`` is computed: "exact" (forward AD) or "finite_difference" (``fastgen.jvp``)."""
    jvp_eps: float = FD_EPS
    """Step of "finite_difference" along ``(v, 1)`` in flow time (``fastgen.jvp.FD_EPS``: MeanFlow's times are in
    [0, 1] with a unit tangent)."""
    guidance_scale: float = 1.0
    """Ho–Salimans CFG scale of the teacher's velocity (text teachers); 1 = none."""

    def __post_init__(self):
        check_fields([
            (self.p_std > 0, "p_std", self.p_std, "> 0"),
            (0.0 <= self.r_neq_t <= 1.0, "r_neq_t", self.r_neq_t, "a fraction in [0, 1]"),
            (self.tangent_warmup_steps >= 0, "tangent_warmup_steps", self.tangent_warmup_steps, ">= 0"),
            (self.adaptive_p >= 0, "adaptive_p", self.adaptive_p, ">= 0"),
            (self.adaptive_c > 0, "adaptive_c", self.adaptive_c, "> 0"),
            (self.jvp in JVP_METHODS, "jvp", self.jvp, f"one of {list(JVP_METHODS)}"),
            (self.jvp_eps > 0, "jvp_eps", self.jvp_eps, "> 0"),
            (self.guidance_scale >= 1.0, "guidance_scale", self.guidance_scale, ">= 1 (1 = no guidance)"),
        ], "objective.")


class MeanFlow(Objective):
    name = "meanflow"
    Config = MeanFlowConfig
    rule = "ddim"
    needs_data = True
    lora_export = False  # the interval embedding is new weights besides any adapter

    def __init__(self, teacher, nets, config: MeanFlowConfig, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        if getattr(unwrap(self.student.model), "duration_embedding", None) is None:
            raise ValueError("meanflow: the student network has no interval input; build it with "
                             "MeanFlow.student_network (fastgen.assemble.make_student does)")
        warn_finite_difference(self.teacher.model, config.jvp)
        self.check_guidance(config.guidance_scale)
        ends = teacher_to_flow(self.schedule, torch.tensor([self.schedule.t_min, plan.timesteps[0]]))
        self.tau_bounds = (max(float(ends[0]), TAU_FLOOR), min(float(ends[1]), 1 - TAU_FLOOR))
        """The trained flow times: the teacher's range, up to the plan's first time."""

    # -- the plan ----------------------------------------------------------------------------------
    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps):
        """``num_steps`` times uniform in flow time from the first time ``T`` (the teacher's last, capped for an
        epsilon student of a VP teacher: ``fastgen.losses.scm.first_time``), ``s(tau_T (1 - i / n))``."""
        first = first_time(schedule, student_schedule)
        taus = teacher_to_flow(schedule, first) * (1 - torch.arange(1, num_steps, dtype=torch.float32) / num_steps)
        return [first] + [float(s) for s in flow_to_teacher(schedule, taus)[0]]

    @classmethod
    def student_network(cls, model, plan, schedule):
        """The student network with the interval input and the table of the plan's trained grid; refused for a
        student of experts (one table, one network) and a network without diffusers' timestep MLP."""
        if plan.experts > 1:
            raise UsageError(f"method meanflow trains one network; student.experts is {plan.experts} (expected 1)")
        if time_embedder(model) is None:
            raise UsageError(f"method meanflow adds its interval input to the network's diffusers TimestepEmbedding, "
                             f"and {type(model).__name__} has none; use another method for this teacher")
        return attach_duration(model, *interval_table(plan.timesteps, schedule, model))

    # -- training ----------------------------------------------------------------------------------
    def phases(self):
        return [Phase("generator", ("student",), self.meanflow_loss)]

    def sample_times(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tau, r)``: two logit-normal draws sorted, ``r = tau`` but on a fraction ``r_neq_t`` (module
        docstring)."""
        c = self.config
        a, b = torch.sigmoid(c.p_mean + c.p_std * torch.randn(2, n, device=device))
        tau = torch.maximum(a, b).clamp(*self.tau_bounds)
        r = torch.minimum(a, b).clamp(max=tau)
        return tau, torch.where(torch.rand(n, device=device) < c.r_neq_t, r, tau)

    def meanflow_loss(self, batch, step):
        """``sg(a) ||u - sg(v - w (tau - r) du/dtau)||²`` (module docstring), mean over the batch."""
        c = self.config
        x0 = batch.x0.float()
        tau, r = self.sample_times(x0.shape[0], x0.device)
        z = expand_to(1 - tau, x0) * x0 + expand_to(tau, x0) * torch.randn_like(x0)
        guidance = Guidance(batch.uncond, c.guidance_scale) if c.guidance_scale != 1.0 else None
        with torch.no_grad():
            v = flow_velocity(self.teacher, z, tau, batch.cond, guidance).float()
        network = unwrap(self.student.model)

        def average_velocity(zz, tt):
            with duration(network, DURATION_SCALE * (tt - r)):
                return flow_velocity(self.student, zz, tt, batch.cond).float()

        # forward AD fails on bf16 convolutions and a bf16 finite difference is noise (docs/jvp.md): float32
        with torch.autocast(device_type=x0.device.type, enabled=False):
            u, du_dt = jvp(average_velocity, (z, tau), (v, torch.ones_like(tau)), method=c.jvp, eps=c.jvp_eps)
        warm = 1.0 if c.tangent_warmup_steps == 0 else min(1.0, step / c.tangent_warmup_steps)
        target = v - warm * expand_to(tau - r, v) * du_dt
        error = ((u - target) ** 2).flatten(1).sum(1)
        weight = (error.detach() + c.adaptive_c) ** -c.adaptive_p
        return {"loss": (weight * error).mean(), "error": error.mean().detach(),
                "gap": (tau - r).mean().detach()}
