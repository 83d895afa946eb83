"""Phased DMD (Fan et al. 2025, "Phased DMD: Few-step Distribution Matching Distillation via Score Matching
within Subintervals"): DMD2 run one SNR sub-interval at a time.

The student's timesteps ``t_0 > t_1 > ... > t_{n-1}`` are grouped into K phases (high noise, low SNR,
first); the boundaries ``objective.boundaries`` are student timesteps. The phase that ends at level ``s`` (the
next phase's first input time; the last phase ends at the clean sample) generates the intermediate sample
``x_s``, not x0: its step predicts x0 and renoises it to ``s`` with fresh noise, the student's own sampling
rule (earlier steps by backward simulation without gradient, as in DMD2). Each phase has its own fake score
F_k (a full copy or a LoRA adapter ``fake_k`` on the teacher's weights) and optionally its own GAN head.

Within the phase ending at ``s``, every noise level is a level ``t > s`` reached from ``x_s`` by the
transition ``x_t = a x_s + b eps`` (``NoiseSchedule.transition``; ``a = alpha_t / alpha_s``,
``b² = sigma_t² - a² sigma_s²``):

- **F_k** is trained on ``x_t`` with the unbiased sub-interval target (the paper's score matching within
  subintervals): the score of ``p_t`` is ``E[-eps | x_t] / b``, and an x0-form network's score is
  ``(alpha_t x0^ - x_t) / sigma_t²``, so its regression target is ``x0* = (x_t - (sigma_t² / b) eps) / alpha_t
  = x_s / alpha_s - alpha_t sigma_s² / (alpha_s² b) eps``, regressed in the teacher's output space with weight
  ``b² / sigma_t²`` (the target's scale grows as ``b -> 0``). Treating ``x_s`` as clean data is biased
  unless ``s`` is the clean end, where ``x0* = x_s``, the weight is 1 and this is DMD2's fake loss.
- **The DMD gradient** is taken with teacher and F_k at those levels and written in the space of ``x_s``:
  the posterior mean ``E_X[x_s | x_t] = (alpha_s b² / sigma_t²) x0_X + (a sigma_s² / sigma_t²) x_t`` of each
  model X, ``grad = (E_F - E_T) / mean|x_s - E_T|`` per sample (a positive multiple of the score difference;
  at the clean end exactly DMD eq. 8).

Phases are trained from low to high SNR, ``sequential`` (phase k owns the k-th K-th of ``train.max_steps``,
the paper's progressive schedule; the default for a student of experts) or ``alternating`` (phase
``step % K`` runs; the default for one shared student, whose later phases would otherwise undo the earlier
phases' steps). With one phase ending at the clean sample it is DMD2, loss for loss. LightX2V's
``phased_dmd`` trainer (flow teachers): fake lr 4e-7, generator LoRA lr 5e-5, critic ratio 5; data-free.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import functools

import torch

from fastgen.errors import UsageError, check_fields
from fastgen.experts import expert_index
from fastgen.losses.base import Phase
from fastgen.losses.dmd import DMD2, Critic, DMD2Config, normalised
from fastgen.samplers.solvers import alpha_sigma, renoise_step

PHASE_ORDERS = ("sequential", "alternating")


@dataclass
class PhasedDMDConfig(DMD2Config):
    boundaries: list[float] | None = None
    """The K - 1 phase boundaries (native times, decreasing), each one of ``student.timesteps`` after the
    first: the phase ending at ``s`` hands ``x_s`` to the step whose input time is ``s``. ``[]`` = one phase
    (DMD2); None = the first step of each expert after the first (a student of experts), else two phases split
    at the middle step (``timesteps[n // 2]``; one phase for one step): the paper's and LightX2V's 4-step,
    2-phase recipe. One phase per step spreads the budget thinner: measured on the 1x8x8 linear-beta zoo
    teacher, 4 steps in 4 phases reached 3.2x the teacher's best zoo FID (1.96), 2 phases 1.4x (0.85)
    (docs/zoo.md)."""
    phase_order: str | None = None
    """"sequential" (phase k trains on the k-th K-th of ``train.max_steps``, high noise first; the paper's
    progressive schedule) or "alternating" (phase ``step % K``); None = sequential for a student of experts,
    alternating for a shared student."""
    gan_phases: list[int] | None = None
    """Phases (0 = the highest-noise one) with a GAN head when the GAN weights are > 0; None = every phase.
    An interior phase's real samples are the data diffused to its end level."""
    critic_every: int = 5
    """Fake-score updates per generator update within a phase (LightX2V: 5)."""
    gan_weight: float = 0.0
    """The paper distils data-free: no GAN term by default."""
    gan_critic_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_fields([(self.phase_order is None or self.phase_order in PHASE_ORDERS, "phase_order",
                       self.phase_order, f"one of {list(PHASE_ORDERS)}")], "objective.")


def _levels(schedule, s, t, x):
    """``alpha_s, sigma_s, alpha_t, sigma_t, a, b²`` broadcast against ``x`` (``s`` None: the clean end)."""
    a_s, s_s = alpha_sigma(schedule, s, x)
    a_t, s_t = alpha_sigma(schedule, t, x)
    a = a_t / a_s
    return a_s, s_s, a_t, s_t, a, (s_t**2 - (a * s_s) ** 2).clamp_min(0)


def diffuse(schedule, x_s: torch.Tensor, eps: torch.Tensor, s, t) -> torch.Tensor:
    """``x_t`` from ``x_s`` at level ``s`` (None: clean, ``add_noise``) to the noisier level ``t``."""
    return schedule.add_noise(x_s, eps, t) if s is None else schedule.transition(x_s, eps, s, t)


def sub_interval_target(schedule, x_s: torch.Tensor, eps: torch.Tensor, s, t):
    """The unbiased x0-form regression target at ``x_t = diffuse(x_s, eps, s, t)`` and its weight:
    ``x0* = x_s / alpha_s - alpha_t sigma_s² / (alpha_s² b) eps`` (module docstring), ``w = b² / sigma_t²``;
    ``E[x0* | x_t]`` is the x0-form of the exact score of ``p_t``. At the clean end ``x0* = x_s``, ``w = 1``."""
    a_s, s_s, a_t, s_t, _, b2 = _levels(schedule, s, t, x_s)
    return x_s / a_s - (a_t * s_s**2 / (a_s**2 * b2.sqrt())) * eps, b2 / s_t**2


def posterior_mean_coefficients(schedule, s, t, x: torch.Tensor):
    """``(c, d)`` with ``E[x_s | x_t] = c E[x0 | x_t] + d x_t`` under the forward process (the DDPM posterior
    mean with ``x0`` replaced by a model's x0-prediction): ``c = alpha_s b² / sigma_t²``, ``d = a sigma_s² / sigma_t²``."""
    a_s, s_s, _, s_t, a, b2 = _levels(schedule, s, t, x)
    return a_s * b2 / s_t**2, a * s_s**2 / s_t**2


class PhasedDMD(DMD2):
    """DMD2 per SNR phase: one ``Critic`` per phase (its fake score ``fake_k``, head ``head_k``, student steps,
    end level and the student network it trains), each phase's losses bound to its critic."""

    name = "phased_dmd"
    Config = PhasedDMDConfig

    @property
    def experts(self) -> bool:
        return self.plan.expert_boundaries is not None

    # -- the phase plan -----------------------------------------------------------------------------
    def build_critics(self) -> list[Critic]:
        c = self.config
        spans = self._spans(c)
        K = len(spans)
        self.order = c.phase_order or ("sequential" if self.experts else "alternating")
        if self.order == "sequential" and K > 1 and not self.max_steps:
            raise UsageError("objective.phase_order is 'sequential', which splits train.max_steps between the "
                             f"{K} phases, but train.max_steps is {self.max_steps!r}; expected a positive count")
        gan = list(range(K)) if c.gan_phases is None else list(c.gan_phases)
        if any(not 0 <= k < K for k in gan):
            raise UsageError(f"objective.gan_phases is {c.gan_phases}; expected phase indices in [0, {K - 1}]")
        critics = []
        for k, (steps, end, network) in enumerate(spans):
            with_gan = self.uses_gan and k in gan
            critic = Critic(f"fake_{k}", f"head_{k}" if with_gan else None, c.gan_weight if with_gan else 0.0,
                            c.gan_critic_weight if with_gan else 0.0, network, steps, end)
            critics.append(self.build_critic(critic, f"fake_{k}"))
        return critics

    def _spans(self, c: PhasedDMDConfig) -> list[tuple[tuple[int, int], float | None, str]]:
        """Per phase: the student step indices ``[lo, hi)``, the level it ends at (the next phase's first input
        time; None = the clean sample) and the student network it trains (``student`` or the expert
        ``student.k``)."""
        ts, n = self.timesteps, len(self.timesteps)
        owner = (expert_index(torch.tensor(ts), self.plan.expert_boundaries).tolist() if self.experts else [0] * n)
        if c.boundaries is None:
            starts = ([i for i in range(n) if i == 0 or owner[i] != owner[i - 1]] if self.experts
                      else sorted({0, n // 2}))
        else:
            bad = [b for b in c.boundaries if float(b) not in ts[1:]]
            starts = [0] + [ts.index(float(b)) for b in c.boundaries if float(b) in ts[1:]]
            if bad or any(a >= b for a, b in zip(starts, starts[1:])):
                raise UsageError(f"objective.boundaries is {c.boundaries}; expected decreasing times among the "
                                 f"student's timesteps after the first, {ts[1:]}")
        spans = []
        for k, lo in enumerate(starts):
            hi = starts[k + 1] if k + 1 < len(starts) else n
            if len(set(owner[lo:hi])) > 1:
                raise UsageError(f"phase {k} (student steps {ts[lo:hi]}) spans several experts; expected "
                                 "objective.boundaries to include student.expert_boundaries' splits "
                                 f"(experts own {owner} of the steps)")
            spans.append(((lo, hi), ts[hi] if hi < n else None, f"student.{owner[lo]}" if self.experts else "student"))
        return spans

    @property
    def uses_gan(self) -> bool:
        return super().uses_gan and self.config.gan_phases != []

    def phases(self):
        c, K = self.config, len(self.critics)
        out = []
        for k, critic in enumerate(self.critics):
            generator = functools.partial(self.generator_loss, critic=critic)
            fake = functools.partial(self.critic_loss, critic=critic)
            nets = self.critic_networks(critic)
            if self.order == "sequential":
                start = k * (self.max_steps or 0) // K
                stop = (k + 1) * self.max_steps // K if k + 1 < K else None
                out += [Phase(f"generator.{k}", (critic.network,), generator, every=c.critic_every, start=start,
                              stop=stop),
                        Phase(f"critic.{k}", nets, fake, lr=c.fake_lr, start=start, stop=stop)]
            else:
                out += [Phase(f"generator.{k}", (critic.network,), generator, every=K * c.critic_every, offset=k),
                        Phase(f"critic.{k}", nets, fake, every=K, offset=k, lr=c.fake_lr)]
        return out

    # -- DMD2's pieces within a phase's sub-interval --------------------------------------------------
    def sample_t(self, n, fractions, device, critic: Critic | None = None):
        """Levels on a fraction ``(lo, hi)`` of the critic's range ``(s, t_max]`` (the whole range at the
        clean end; one native step, or 0.1 % of the range, above ``s`` otherwise, where ``b = 0``)."""
        s = (critic or self.critics[0]).end
        if s is None:
            return super().sample_t(n, fractions, device)
        sch = self.schedule
        low = s + (1.0 if sch.family == "vp" else 1e-3 * (sch.t_max - sch.t_min))
        span = sch.t_max - low
        t = sch.sample_t(n, device=device, t_min=low + fractions[0] * span, t_max=low + fractions[1] * span)
        return t.clamp(min=low)  # a flow shift below 1 moves uniform times down

    def generate(self, batch, grad=True, timesteps=None, step=None, critic: Critic | None = None):
        """The critic's phase sample: one of its steps (drawn per batch, or ``step``), renoised with fresh
        noise to the phase's end level ``s`` (the student's ``renoise`` rule); x0 for the last phase."""
        if timesteps is not None:
            raise UsageError("Phased DMD trains its own timesteps only")
        critic = critic or self.critics[0]
        x0, t_in = super().generate(batch, grad, step=step, critic=critic)
        if critic.end is None:
            return x0, t_in
        return renoise_step(self.schedule, x0, critic.end, torch.randn_like(x0)), t_in

    def dmd_gradient(self, x, tau, eps, batch, critic: Critic | None = None):
        """The normalised DMD gradient for ``x = x_s`` at ``x_tau = diffuse(x_s, eps, s, tau)``, written with the
        posterior means of ``x_s`` under teacher and fake score (DMD eq. 8 at the clean end)."""
        critic = critic or self.critics[0]
        with torch.no_grad():
            x_tau = diffuse(self.schedule, x, eps, critic.end, tau)
            real = self.teacher.guided(x_tau, tau, batch.cond, batch.uncond, self.config.guidance_scale)
            fake = self.nets[critic.fake](x_tau, tau, batch.cond)
            c, d = posterior_mean_coefficients(self.schedule, critic.end, tau, x)
            return normalised(c * (fake - real), x - (c * real + d * x_tau))

    def fake_loss(self, x, batch, keep=None, critic: Critic | None = None):
        """Score matching within the sub-interval: the fake score regresses ``sub_interval_target`` at
        ``x_t = diffuse(x_s, eps, s, t)``, in the teacher's output space, weighted by ``b² / sigma_t²``."""
        critic = critic or self.critics[0]
        t = self.sample_t(x.shape[0], self.config.fake_t_range, x.device, critic)
        eps = torch.randn_like(x)
        x_t = diffuse(self.schedule, x, eps, critic.end, t)
        x0, weight = sub_interval_target(self.schedule, x, eps, critic.end, t)
        target = self.schedule.from_x0(x0, x_t, t)
        return (weight * (self.nets[critic.fake].output(x_t, t, batch.cond).float() - target.float()).square()).mean()

    def discriminator_terms(self, x, batch, critic: Critic | None = None):
        """DMD2's discriminator loss; an interior phase's real samples are the data diffused to its end level."""
        critic = critic or self.critics[0]
        if critic.end is not None and batch.x0 is not None:
            batch = copy.copy(batch)
            batch.x0 = renoise_step(self.schedule, batch.x0, critic.end, torch.randn_like(batch.x0))
        return super().discriminator_terms(x, batch, critic)
