"""Distribution matching distillation: DMD (Yin et al. 2024a, "One-step Diffusion with Distribution
Matching Distillation"), DMD2 (Yin et al. 2024b, "Improved Distribution Matching Distillation for Fast
Image Synthesis") and Decoupled DMD ("Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching
as the Shield", 2025).

The student G maps noise to a sample ``x = x0_G(z)``. Its update follows the gradient of the KL divergence
between the student's and the teacher's distributions, diffused to a level ``tau`` (DMD, eq. 7): with
``x_tau = alpha_tau sg(x) + sigma_tau eps``, ``tau ~ U[0.02 T, 0.98 T]``,

    grad = (x0_F(x_tau) - x0_T^g(x_tau)) / mean|x - x0_T^g(x_tau)|          (DMD eq. 8, per sample)
    L_G  = 0.5 ||x - sg(x - grad)||^2                                       (mean over elements)

where ``x0_T^g`` is the teacher guided in the Ho–Salimans form ``u + g (c - u)`` and F the fake score, a
copy of the teacher (or a LoRA adapter on its weights) trained by denoising score matching on ``sg(x)``
in the teacher's own output space (epsilon, v or velocity MSE, what the teacher was trained with), over
the whole time range. Everything is written against x0-predictions, so any schedule and output type works.

- **DMD** adds a regression loss on teacher ODE pairs (``--data teacher``: the cached noise and the
  sample the teacher's ODE made of it): ``||x0_G(noise) - x_ODE||^2`` (L2 here; the paper uses LPIPS,
  weight 0.25), on the first step's x0 of a multi-step student (the one made from the ODE's own noise);
  the fake score is updated once per generator update.
- **DMD2** drops the regression, updates the fake score ``critic_every`` times per generator update
  (5 for SDXL, 10 for SD1.5), and adds a GAN: a head on the fake score's bottleneck classifies noised
  real samples against generated ones (``losses.adversarial``), weights 5e-3 (G) / 1e-2 (D). Multi-step
  students are trained by backward simulation: for a step ``i`` drawn per batch, the student's own
  ``i`` earlier steps run without gradient from pure noise and are renoised with fresh noise to
  ``t_i``; ``multistep_input: data`` noises real samples instead.
- **Decoupled DMD** splits the guided gradient: the CFG augmentation ``(g - 1)(x0_T(c) - x0_T(u))``,
  evaluated only at levels cleaner than the student's own input, and the distribution matching term
  ``x0_T(c) - x0_F(c)`` at any level, each with its own level range and weight; the DM term (the
  "shield") can be replaced by the GAN term or a mean/variance penalty.

A one-step student's input time is ``student.timesteps`` (DMD2 conditions SDXL's one-step student at 399,
SiD conditions SD at 625): it always starts from pure noise, so a time below the top keeps the conversion
of an epsilon output to x0 away from the division by ``alpha(T) ~ 0``. Published defaults in
``losses/README.md``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastgen.denoiser import cat_cond
from fastgen.errors import UsageError, check_fields
from fastgen.losses.adversarial import (GAN_LOSSES, PLACEMENTS, discriminator_logits, discriminator_loss,
                                        generator_loss, make_head, r1_penalty)
from fastgen.losses.base import Objective, Phase
from fastgen.samplers.solvers import renoise_step, sample_renoise
from fastgen.schedules import expand_to

MULTISTEP_INPUTS = ("backward", "data")


def alpha_time(schedule, alpha: float) -> float:
    """The integer time, rounded down, where the schedule's signal coefficient is ``alpha``: the top of a grid
    capped there (``DMD.default_grid``; ``fastgen.losses.scm``'s cap)."""
    a2 = alpha ** 2
    return float(schedule.t_from_logsnr(torch.tensor(math.log(a2 / (1 - a2)))).floor())


@dataclass
class DMDConfig:
    guidance_scale: float = 1.0
    """Ho–Salimans CFG scale of the teacher in the DMD gradient (DMD2: SD1.5 1.75, SDXL 8); 1 = none."""
    t_range: tuple[float, float] = (0.02, 0.98)
    """Levels ``tau`` of the DMD gradient, as fractions of the teacher's time range."""
    fake_t_range: tuple[float, float] = (0.0, 1.0)
    """Levels at which the fake score is trained (DMD2: the whole range)."""
    critic_every: int = 1
    """Fake-score (critic) updates per generator update (two time-scale rule; DMD2: 5–10)."""
    fake_lora_rank: int = 0
    """0: the fake score is a full trainable copy of the teacher; > 0: a LoRA adapter of this rank on the
    teacher's own weights (one copy of the base in memory)."""
    fake_lr: float | None = None
    """Learning rate of the fake score and the GAN head; None = train.lr (DMD2 uses the same)."""
    regression_weight: float = 0.25
    """Weight of DMD's regression loss on teacher ODE pairs (needs ``--data teacher``); 0 = off."""
    regression_steps: int = 0
    """A regression warm-up (DMD2's one-step SDXL recipe): for the first this many training steps the generator
    is trained by the regression loss on teacher ODE pairs alone (needs ``--data teacher``), while the fake score
    follows it as usual; the run's own terms after that. 0 = none."""
    gan_weight: float = 0.0
    """Weight of the generator's GAN term (DMD2: 5e-3); with ``gan_critic_weight`` > 0 needs real samples."""
    gan_critic_weight: float = 0.0
    """Weight of the discriminator's classification loss in the critic phase (DMD2: 1e-2)."""
    gan_features: str = "fake"
    """Where the head reads features: "fake" (the fake score's bottleneck, DMD2) or "teacher" (frozen)."""
    gan_loss: str = "nonsaturating"
    """"nonsaturating" (softplus, DMD2) or "hinge"."""
    gan_t_range: tuple[float, float] = (0.0, 1.0)
    """Levels at which real and generated samples are noised before the head (fractions of the range)."""
    r1_weight: float = 0.0
    """R1 penalty on real samples (gamma / 2); 0 = off."""
    multistep_input: str = "backward"
    """How a multi-step student's input at step i > 0 is made: "backward" simulation or noised "data"."""

    def __post_init__(self):
        rules = [
            (self.guidance_scale >= 0.0, "guidance_scale", self.guidance_scale, ">= 0 (1 = no guidance)"),
            (self.critic_every >= 1, "critic_every", self.critic_every, ">= 1"),
            (self.regression_steps >= 0, "regression_steps", self.regression_steps, ">= 0 (0 = no warm-up)"),
            (self.fake_lora_rank >= 0, "fake_lora_rank", self.fake_lora_rank, ">= 0"),
            (min(self.regression_weight, self.gan_weight, self.gan_critic_weight, self.r1_weight) >= 0, "*_weight",
             (self.regression_weight, self.gan_weight, self.gan_critic_weight, self.r1_weight),
             "non-negative weights"),
            (self.gan_features in PLACEMENTS, "gan_features", self.gan_features, f"one of {list(PLACEMENTS)}"),
            (self.gan_loss in GAN_LOSSES, "gan_loss", self.gan_loss, f"one of {list(GAN_LOSSES)}"),
            (self.multistep_input in MULTISTEP_INPUTS, "multistep_input", self.multistep_input,
             f"one of {list(MULTISTEP_INPUTS)}"),
        ]
        for name in ("t_range", "fake_t_range", "gan_t_range"):
            lo, hi = getattr(self, name)
            rules.append((0.0 <= lo <= hi <= 1.0, name, [lo, hi], "0 <= low <= high <= 1 (fractions of the range)"))
        check_fields(rules, "objective.")


@dataclass
class DMD2Config(DMDConfig):
    regression_weight: float = 0.0
    critic_every: int = 5
    gan_weight: float = 5e-3
    gan_critic_weight: float = 1e-2


class Critic(NamedTuple):
    """What one generator/critic pair of phases works with: the fake score ``fake`` and GAN head ``head`` (names
    in the objective's ``nets``; ``head`` None: no GAN), the GAN weights, the student network the generator
    phase trains, the student steps ``[lo, hi)`` it trains and the level ``end`` its samples are made at (None:
    the clean sample). DMD has one; Phased DMD one per SNR phase."""

    fake: str = "fake"
    head: str | None = None
    gan_weight: float = 0.0
    gan_critic_weight: float = 0.0
    network: str = "student"
    steps: tuple[int, int] | None = None
    end: float | None = None
    timesteps: tuple[float, ...] | None = None
    """The grid the generator samples on (None: the trained grid; ASD draws a step count's grid per batch)."""


class DMD(Objective):
    """DMD; ``DMD2`` and ``DecoupledDMD`` change defaults and the gradient only."""

    name = "dmd"
    Config = DMDConfig
    rule = "renoise"
    MIN_ALPHA = 0.35
    """The default grid of an epsilon student is capped where ``alpha = MIN_ALPHA`` (see ``default_grid``)."""
    metric_terms: tuple[str, ...] = ()
    """Generator terms logged beside the loss but not added to it (SiD's count of dropped samples)."""

    def __init__(self, teacher, nets, config, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        self.check_guidance(config.guidance_scale)
        self.critics = self.build_critics()
        self.needs_data = self.uses_gan or config.regression_weight > 0 or config.regression_steps > 0 or (
            config.multistep_input == "data" and self.num_steps > 1)

    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps: int) -> list[float]:
        """The teacher's trailing grid, capped for an epsilon student where ``alpha(t) = MIN_ALPHA``: the
        student's first step starts from pure noise and turns an epsilon output into x0 by dividing by
        ``alpha``, 0.006 at the top of a linear-beta DDPM, so any error of the output is amplified 160-fold.
        The published one-step times sit at the cap or below: SiD's 625 for SD is alpha 0.37, DMD2's 399 for
        SDXL 0.65; the cap gives t = 643 for SD, 452 for a linear-beta DDPM. A grid whose top is above the cap is
        spaced evenly below it, ``t_k = round(cap (n - k) / n)``: [452, 339, 226, 113] for 4 steps of a
        linear-beta DDPM. On that toy teacher DMD2's 4-step student reached toy FID 21.0 on this grid where the
        trailing grid [999, 749, 499, 249] reached 342.2 (same 500 steps, docs/dmd.md). v, x0, flow and EDM
        students (no division) keep the teacher's grid; the SDXL preset keeps DMD2's published [999, 749, 499, 249]
        (alpha(999) = 0.068 there)."""
        ts = cls.base_grid(schedule, num_steps)
        if cls.capped(schedule, student_schedule):
            cap = alpha_time(schedule, cls.MIN_ALPHA)
            if float(ts[0]) > cap:
                ts = torch.round(cap * (num_steps - torch.arange(num_steps, dtype=torch.float64)) / num_steps)
        return [float(t) for t in ts]

    @staticmethod
    def base_grid(schedule, num_steps: int) -> torch.Tensor:
        """The grid ``default_grid`` caps: the teacher's trailing grid (``NoiseSchedule.few_step_grid``)."""
        return schedule.few_step_grid(num_steps)

    @staticmethod
    def capped(schedule, student_schedule) -> bool:
        """Whether ``default_grid`` caps the grid where ``alpha = MIN_ALPHA``: for epsilon students of VP
        teachers (EDM's preconditioning ``c_skip x + c_out F`` divides by nothing; its grid is in sigmas)."""
        return schedule.family == "vp" and student_schedule.prediction_type == "epsilon"

    def build_critics(self) -> list[Critic]:
        """One critic over the whole range; Phased DMD builds one per SNR phase."""
        c = self.config
        return [self.build_critic(Critic("fake", "head" if self.uses_gan else None, c.gan_weight,
                                         c.gan_critic_weight), "fake")]

    def build_critic(self, critic: Critic, adapter: str) -> Critic:
        """Add ``critic``'s fake score (a full copy, or the LoRA adapter ``adapter`` on the teacher's weights) and,
        when it has a head, its discriminator head (sized on a probe batch) to ``nets``."""
        c = self.config
        self.add_network(critic.fake, self.factory.lora(adapter, c.fake_lora_rank) if c.fake_lora_rank
                         else self.factory.copy())
        if critic.head is not None:
            probe = torch.zeros(1, *self.teacher.sample_shape, device=self.device)
            cond = self.teacher.null_cond(1) if self.teacher.text_conditioned else (
                self.teacher.class_cond([0]) if self.teacher.num_classes else None)
            t = torch.full((1,), float(self.schedule.t_max))
            self.add_network(critic.head, self.factory.module(make_head(self.feature_network(critic), probe, t, cond)))
        return critic

    def feature_network(self, critic: Critic):
        """The denoiser the GAN head reads features of: the critic's fake score (DMD2) or the frozen teacher."""
        return self.nets[critic.fake] if self.config.gan_features == "fake" else self.teacher.denoiser

    def logits(self, critic: Critic, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return discriminator_logits(self.nets[critic.head], self.feature_network(critic), self.schedule, x, t, cond)

    @property
    def fake(self):
        """The (first) critic's fake score."""
        return self.nets[self.critics[0].fake]

    @property
    def head(self):
        """The (first) critic's GAN head, or None."""
        head = self.critics[0].head
        return None if head is None else self.nets[head]

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def uses_gan(self) -> bool:
        return self.config.gan_weight > 0 or self.config.gan_critic_weight > 0

    def phases(self):
        c, critic = self.config, self.critics[0]
        return [Phase("generator", ("student",), functools.partial(self.generator_loss, critic=critic),
                      every=c.critic_every),
                Phase("critic", self.critic_networks(critic), functools.partial(self.critic_loss, critic=critic),
                      lr=c.fake_lr)]

    @staticmethod
    def critic_networks(critic: Critic) -> tuple[str, ...]:
        return (critic.fake,) if critic.head is None else (critic.fake, critic.head)

    # -- pieces -----------------------------------------------------------------------------------
    def sample_t(self, n: int, fractions, device, critic: Critic | None = None) -> torch.Tensor:
        """Times uniform on a fraction ``(lo, hi)`` of the teacher's time range (the schedule's own sampler)."""
        s = self.schedule
        span = s.t_max - s.t_min
        return s.sample_t(n, device=device, t_min=s.t_min + fractions[0] * span, t_max=s.t_min + fractions[1] * span)

    def generate(self, batch, grad: bool = True, timesteps: list[float] | None = None, step: int | None = None,
                 critic: Critic | None = None):
        """Student samples for ``batch``'s conditions: ``(x, t_in)`` with ``t_in`` the input time of the step
        that made them (one step drawn per batch among the critic's steps, or ``step``; earlier steps by backward
        simulation without gradient), on ``timesteps`` (default: the trained ones; ASD passes each step count's
        grid)."""
        n, device = batch.size, self.device
        critic = critic or self.critics[0]
        ts = timesteps or critic.timesteps or self.timesteps
        if step is None:
            lo, hi = critic.steps or (0, len(ts))
            # a real choice is drawn alike on every process; with one step to draw there is none to agree on, and
            # the per-process stream stays as it was
            shared = self.shared_generator() if hi - lo > 1 else None
            step = lo + int(torch.randint(hi - lo, (), generator=shared))
        i = step
        z = torch.randn(n, *self.teacher.sample_shape, device=device) * self.schedule.prior_scale(ts[0])
        x_t = z
        if i > 0:
            with torch.no_grad():
                if self.config.multistep_input == "data":
                    x_t = self.schedule.add_noise(batch.x0, torch.randn_like(batch.x0), ts[i])
                else:
                    x0 = sample_renoise(self.student, z, ts[:i], cond=batch.cond)
                    x_t = renoise_step(self.schedule, x0, ts[i], torch.randn_like(x0))
        t_in = torch.full((n,), float(ts[i]), device=z.device)
        with torch.set_grad_enabled(grad):
            x = self.student(x_t, t_in, batch.cond)
        return x, t_in

    def dmd_gradient(self, x: torch.Tensor, tau: torch.Tensor, eps: torch.Tensor, batch,
                     critic: Critic | None = None) -> torch.Tensor:
        """DMD's normalised gradient (eq. 8) at ``x_tau = add_noise(x, eps, tau)``, without graph."""
        with torch.no_grad():
            x_tau = self.schedule.add_noise(x, eps, tau)
            real = self.teacher.guided(x_tau, tau, batch.cond, batch.uncond, self.config.guidance_scale)
            fake = self.nets[(critic or self.critics[0]).fake](x_tau, tau, batch.cond)
            return normalised(fake - real, x - real)

    def generator_terms(self, x: torch.Tensor, t_in: torch.Tensor, batch,
                        critic: Critic | None = None) -> dict[str, torch.Tensor]:
        tau = self.sample_t(x.shape[0], self.config.t_range, x.device, critic)
        grad = self.dmd_gradient(x.detach().float(), tau, torch.randn_like(x), batch, critic)
        return {"dm": matching_loss(x, grad)}

    def fake_loss(self, x: torch.Tensor, batch, keep: torch.Tensor | None = None,
                  critic: Critic | None = None) -> torch.Tensor:
        """Denoising score matching of the fake score on generated samples, in the teacher's output space;
        averaged over the samples of ``keep`` only (all by default)."""
        t = self.sample_t(x.shape[0], self.config.fake_t_range, x.device, critic)
        eps = torch.randn_like(x)
        x_t = self.schedule.add_noise(x, eps, t)
        target = self.schedule.from_x0(x, x_t, t)
        fake = self.nets[(critic or self.critics[0]).fake]
        return row_mean((fake.output(x_t, t, batch.cond).float() - target.float()).square(), keep)

    # -- the two phases ---------------------------------------------------------------------------------
    def generator_loss(self, batch, step: int, critic: Critic) -> dict[str, torch.Tensor]:
        """The generator phase: DMD's matching term (plus regression and GAN terms when weighted); during the
        regression warm-up the regression loss alone."""
        c = self.config
        if step < c.regression_steps:
            regression = self.regression_loss(batch)
            return {"loss": regression, "regression": regression.detach()}
        x, t_in = self.generate(batch, grad=True, critic=critic)
        terms = self.generator_terms(x, t_in, batch, critic)
        if c.regression_weight > 0:
            terms["regression"] = self.regression_loss(batch)
        if critic.head is not None and critic.gan_weight > 0:
            t_gan = self.sample_t(x.shape[0], c.gan_t_range, x.device, critic)
            terms["gan"] = generator_loss(self.logits(critic, x, t_gan, batch.cond), c.gan_loss)
        weights = {"regression": c.regression_weight, "gan": critic.gan_weight}
        total = sum(weights.get(k, 1.0) * v for k, v in terms.items() if k not in self.metric_terms)
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    def critic_loss(self, batch, step: int, critic: Critic) -> dict[str, torch.Tensor]:
        """The critic phase: the fake score's denoising score matching on the student's samples, plus the
        discriminator's classification loss when weighted."""
        with torch.no_grad():
            x, _ = self.generate(batch, grad=False, critic=critic)
        terms = {"fake": self.fake_loss(x.float(), batch, critic=critic)}
        if critic.head is not None and critic.gan_critic_weight > 0:
            terms["gan"] = self.discriminator_terms(x.float(), batch, critic)
        total = terms["fake"] + critic.gan_critic_weight * terms.get("gan", 0.0)
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    def regression_loss(self, batch) -> torch.Tensor:
        """DMD's regression ``||x0_G(noise) - x_ODE||^2`` on a teacher ODE pair, through the first step."""
        if batch.noise is None:
            raise UsageError("objective.regression_weight > 0 and objective.regression_steps > 0 need teacher ODE "
                             "pairs: pass --data teacher (or set both to 0)")
        t0 = torch.full((batch.size,), float(self.timesteps[0]), device=batch.noise.device)
        return (self.student(batch.noise, t0, batch.cond) - batch.x0).float().square().mean()

    def discriminator_terms(self, x: torch.Tensor, batch, critic: Critic | None = None) -> torch.Tensor:
        c, critic = self.config, critic or self.critics[0]
        if batch.x0 is None:
            raise UsageError("the GAN term needs real samples: pass --data (images, captioned images or 'teacher') "
                             "or set objective.gan_weight=0 and objective.gan_critic_weight=0")
        real = batch.x0.float().requires_grad_(c.r1_weight > 0)
        n = x.shape[0]
        t = self.sample_t(2 * n, c.gan_t_range, x.device, critic)
        logits = self.logits(critic, torch.cat([real, x]), t, cat_cond(batch.cond, batch.cond))
        loss = discriminator_loss(logits[:n], logits[n:], c.gan_loss)
        if c.r1_weight > 0:
            loss = loss + c.r1_weight * r1_penalty(logits[:n], real)
        return loss


class DMD2(DMD):
    name = "dmd2"
    Config = DMD2Config


@dataclass
class DecoupledDMDConfig(DMD2Config):
    ca_weight: float = 1.0
    """Weight of the CFG-augmentation term (the "spear")."""
    ca_t_range: tuple[float, float] = (0.02, 0.98)
    """Levels of the CA term, as fractions of the range, capped at the student's own input time."""
    dm_weight: float = 1.0
    """Weight of the regulariser (the "shield")."""
    regularizer: str = "dm"
    """"dm": distribution matching ``x0_T(c) - x0_F(c)`` at any level in ``t_range``; "gan": the GAN term
    alone (``gan_weight``); "moments": a penalty on the batch mean and variance against the teacher's x0."""
    gan_weight: float = 0.0
    gan_critic_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        lo, hi = self.ca_t_range
        check_fields([
            (0.0 <= lo <= hi <= 1.0, "ca_t_range", [lo, hi], "0 <= low <= high <= 1"),
            (self.regularizer in REGULARIZERS, "regularizer", self.regularizer, f"one of {list(REGULARIZERS)}"),
            (self.regularizer != "gan" or (self.gan_weight > 0 and self.gan_critic_weight > 0), "regularizer",
             self.regularizer, "gan_weight > 0 and gan_critic_weight > 0 with regularizer 'gan'"),
        ], "objective.")


REGULARIZERS = ("dm", "gan", "moments")


def row_mean(values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``values`` (B, ...) over the samples of ``keep`` (a (B,) bool mask; None = all), in static
    shapes (no indexing by the mask: no host sync, and fake tensors can trace it); 0 when none is kept."""
    if keep is None:
        return values.mean()
    per_sample = values.flatten(1).mean(1)
    return per_sample.where(keep, 0.0).sum() / keep.sum().clamp(min=1)


class DecoupledDMD(DMD2):
    name = "decoupled_dmd"
    Config = DecoupledDMDConfig

    def ca_times(self, t_in: torch.Tensor) -> torch.Tensor:
        """CA levels: uniform on the configured fraction of the range, capped at the student's input time."""
        s = self.schedule
        span = s.t_max - s.t_min
        lo = torch.full_like(t_in, s.t_min + self.config.ca_t_range[0] * span)
        hi = torch.minimum(t_in, torch.full_like(t_in, s.t_min + self.config.ca_t_range[1] * span))
        t = lo + (hi - lo).clamp(min=0) * torch.rand_like(t_in)
        return t.round() if s.family == "vp" else t

    def ca_gradient(self, x, tau, eps, batch):
        """``-(g - 1)(x0_T(c) - x0_T(u))`` at ``tau``, normalised like DMD's (descending it moves ``x`` along
        the guidance direction)."""
        g = self.config.guidance_scale
        with torch.no_grad():
            x_tau = self.schedule.add_noise(x, eps, tau)
            x0 = self.teacher(torch.cat([x_tau, x_tau]), torch.cat([tau, tau]), cat_cond(batch.cond, batch.uncond))
            cond, uncond = x0.chunk(2)
            return normalised(-(g - 1.0) * (cond - uncond), x - cond)

    def dm_gradient(self, x, tau, eps, batch, critic: Critic | None = None):
        """``x0_F(c) - x0_T(c)`` at ``tau`` (the unguided DMD gradient), normalised."""
        with torch.no_grad():
            x_tau = self.schedule.add_noise(x, eps, tau)
            real = self.teacher(x_tau, tau, batch.cond)
            fake = self.nets[(critic or self.critics[0]).fake](x_tau, tau, batch.cond)
            return normalised(fake - real, x - real), real

    def generator_terms(self, x, t_in, batch, critic: Critic | None = None):
        c = self.config
        xd = x.detach().float()
        terms = {}
        if c.guidance_scale != 1.0 and c.ca_weight > 0:
            terms["ca"] = c.ca_weight * matching_loss(x, self.ca_gradient(xd, self.ca_times(t_in),
                                                                          torch.randn_like(xd), batch))
        if c.regularizer in ("dm", "moments"):
            tau = self.sample_t(x.shape[0], c.t_range, x.device, critic)
            grad, real = self.dm_gradient(xd, tau, torch.randn_like(xd), batch, critic)
            if c.regularizer == "dm":
                terms["dm"] = c.dm_weight * matching_loss(x, grad)
            else:
                terms["moments"] = c.dm_weight * moment_penalty(x, real)
        return terms


def normalised(direction: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``direction / mean|residual|`` per sample (DMD eq. 8's weighting), non-finite entries zeroed."""
    scale = residual.abs().flatten(1).mean(1).clamp(min=1e-12)
    return torch.nan_to_num(direction / expand_to(scale, direction))


def matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 ||x - sg(x - grad)||^2`` (mean): its gradient with respect to ``x`` is ``grad / numel``."""
    return 0.5 * (x.float() - (x.detach().float() - grad)).square().mean()


def moment_penalty(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared differences of the per-channel batch mean and standard deviation of ``x`` from ``reference``'s."""
    dims = [0, *range(2, x.ndim)]
    ref = reference.detach().float()
    return ((x.float().mean(dims) - ref.mean(dims)).square().mean()
            + (x.float().std(dims) - ref.std(dims)).square().mean())
