"""Score identity distillation: SiD (Zhou et al. 2024, "Score identity Distillation: Exponentially Fast
Distillation of Pretrained Diffusion Models for One-Step Generation"), SiDA (Zhou et al. 2025,
"Adversarial Score identity Distillation: Rapidly Surpassing the Teacher in One Step") and few-step SiD
with its guidance strategies (Zhou, Gu & Wang 2025, "Few-Step Diffusion via Score identity Distillation").

Data-free. The generator G makes ``x_g = x0_G(z)``; the fake score F is trained by denoising score matching
on ``sg(x_g)`` (DMD's ``fake_loss``: MSE in the teacher's own output space, which is EDM's weighting for an
EDM teacher and SiD-LSG's epsilon-MSE for SD). The generator loss (SiD, eq. 8 with the normaliser of §4):
with ``x_t = alpha_t x_g + sigma_t eps``, ``y_r = x0_T(x_t)`` and ``y_f = x0_F(x_t)`` both evaluated *with*
gradient through ``x_t`` (their parameters are excluded by the phase),

    w   = sg mean|x_g - y_r|                                                  (per sample)
    L_G = mean[(y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f))] / w           (alpha: 1.2 EDM, 1.0 SD)

Samples where ``x_g``, ``y_r`` or ``y_f`` is not finite are dropped and counted (``dropped``). The
generator's level ``t`` follows SiD: EDM teachers ``sigma = (smax^(1/rho) + (1 - u)(smin^(1/rho) -
smax^(1/rho)))^rho``, ``u ~ U[0, edm_t_max]`` (0.8, SiD's ``tmax = 800``); VP and flow teachers the fake
score's own training density on ``t_range`` (SD: ``t ~ U[20, 980)``). The one-step generator is conditioned
at 625 of 1000 on VP teachers (SiD-LSG), at ``sigma_init = 2.5`` on EDM ones, at the top on flow ones.

- **SiDA** adds the DMD2 wiring of ``losses.adversarial``: a head on the fake score's bottleneck (its
  encoder doubles as the discriminator), the generator's term in the generator loss and the
  classification loss in the fake score's; it needs real data.
- **Few-step SiD** unrolls one shared student for K steps (DMD's backward simulation, one step drawn
  uniformly per batch), so generator and fake score both see the uniform mixture of all steps' outputs,
  which is matched to the data; the adversarial term, when on, also acts on the mixture. Text teachers
  choose a guidance strategy (``cfg``): ``"lsg"`` guides the teacher by ``guidance_scale`` and the fake
  score by ``fake_guidance_scale`` (SiD-LSG's long and short guidance), ``"zero"`` (Zero-CFG) runs the
  teacher unguided and the fake score without text (trained without text too), ``"anti"`` (Anti-CFG) runs
  the teacher unguided and guides the fake score negatively (``fake_guidance_scale`` < 1 in the
  Ho–Salimans form ``u + s (c - u)``).

The input-gradient path runs backward through two denoisers; ``checkpoint_scores`` recomputes each of
their forward passes in the backward pass instead of keeping its activations (``train.gradient_checkpointing``
checkpoints block by block inside every diffusers network). ``scripts/bench_sid_vs_dmd2.py`` measures both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from fastgen.denoiser import Cond
from fastgen.errors import check_fields
from fastgen.losses.dmd import DMD, DMDConfig, row_mean
from fastgen.schedules import expand_to

CFG_MODES = ("lsg", "zero", "anti")


@dataclass
class SiDConfig(DMDConfig):
    alpha: float | None = None
    """SiD's alpha: None = 1.2 (SiD, EDM teachers), 1.0 for text-conditioned teachers (SiD-LSG)."""
    critic_every: int = 1
    """SiD updates the fake score and the generator 1:1."""
    regression_weight: float = 0.0
    t_range: tuple[float, float] = (0.02, 0.98)
    """VP and flow teachers: the generator's levels, fractions of the range (SD: U[20, 980))."""
    fake_t_range: tuple[float, float] = (0.02, 0.98)
    """Levels at which the fake score is trained (SD: U[20, 980); EDM teachers draw their log-normal sigmas)."""
    edm_t_max: float = 0.8
    """EDM teachers: the generator's ``u ~ U[0, edm_t_max]`` on the Karras ramp (SiD's tmax = 800 of 1000)."""
    cfg: str = "lsg"
    """Guidance strategy: "lsg" (teacher ``guidance_scale``, fake score ``fake_guidance_scale``), "zero"
    (Zero-CFG) or "anti" (Anti-CFG)."""
    fake_guidance_scale: float = 1.0
    """Ho–Salimans scale of the fake score in the generator loss; 1 = none; Anti-CFG needs < 1."""
    prompt_dropout: float = 0.1
    """Text teachers: fraction of the fake score's training samples given the empty prompt (SiD-LSG: 10 %)."""
    init_t: float | None = None
    """The one-step generator's input time; None = where alpha = 0.37 (VP: 625 on SD), sigma 2.5 (EDM), the top
    (flow)."""
    checkpoint_scores: bool = False
    """Recompute teacher and fake score in the backward pass instead of storing their activations."""

    def __post_init__(self):
        super().__post_init__()
        check_fields([
            (self.alpha is None or self.alpha > 0, "alpha", self.alpha, "> 0 (SiD: 1.2; SD: 1.0)"),
            (0.0 < self.edm_t_max <= 1.0, "edm_t_max", self.edm_t_max, "0 < edm_t_max <= 1"),
            (self.cfg in CFG_MODES, "cfg", self.cfg, f"one of {list(CFG_MODES)}"),
            (0.0 <= self.prompt_dropout < 1.0, "prompt_dropout", self.prompt_dropout, "0 <= prompt_dropout < 1"),
            (self.cfg == "lsg" or self.guidance_scale == 1.0, "guidance_scale", self.guidance_scale,
             f"1 with cfg {self.cfg!r} (Zero- and Anti-CFG run the teacher unguided)"),
            (self.cfg != "anti" or self.fake_guidance_scale < 1.0, "fake_guidance_scale", self.fake_guidance_scale,
             "< 1 with cfg 'anti' (negative guidance of the fake score)"),
        ], "objective.")


@dataclass
class SiDAConfig(SiDConfig):
    gan_weight: float = 5e-3
    gan_critic_weight: float = 1e-2


class SiD(DMD):
    """SiD; ``SiDA`` and ``FewStepSiD`` change defaults only (all settings are on every class)."""

    name = "sid"
    Config = SiDConfig
    metric_terms = ("dropped",)
    MIN_ALPHA = 0.37

    def __init__(self, teacher, nets, config, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        self.alpha = config.alpha if config.alpha is not None else (1.0 if self.teacher.text_conditioned else 1.2)

    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps: int) -> list[float]:
        """``init_t`` for one step when set; EDM teachers: sigma 2.5 (SiD's sigma_init); VP teachers of any
        output type: DMD's grid capped where ``alpha = MIN_ALPHA = 0.37``, which is SiD's own choice written
        as a noise level: SiD-LSG's t_init = 625 on SD's scaled-linear betas is alpha 0.371, sigma_init = 2.5
        on EDM is ``1 / sqrt(1 + 2.5^2)`` = 0.371 too. A fixed 625 / 1000 would be alpha 0.14 on a linear-beta
        DDPM (its cap is t = 440)."""
        if num_steps == 1 and config.init_t is not None:
            return [float(config.init_t)]
        if num_steps == 1 and schedule.family == "edm":
            return [2.5]
        return super().default_grid(schedule, student_schedule, config, num_steps)

    @staticmethod
    def capped(schedule, student_schedule) -> bool:
        return schedule.family == "vp"

    # -- pieces -----------------------------------------------------------------------------------
    def generator_times(self, n: int, device) -> torch.Tensor:
        """SiD's levels for the generator loss (see the module docstring)."""
        s = self.schedule
        if s.family != "edm":
            return self.sample_t(n, self.config.t_range, device)
        u = torch.rand(n, device=device) * self.config.edm_t_max
        lo, hi = s.t_min ** (1 / s.rho), s.t_max ** (1 / s.rho)
        return (hi + (1 - u) * (lo - hi)) ** s.rho

    def scores(self, x_t: torch.Tensor, t: torch.Tensor, batch, critic=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_r, y_f)`` at ``x_t`` under the guidance strategy, with gradient through ``x_t``."""
        c, fake_score = self.config, self.nets[(critic or self.critics[0]).fake]

        def real(x):
            return self.teacher.guided(x, t, batch.cond, batch.uncond, c.guidance_scale)  # 1 unless "lsg"

        def fake(x):
            if c.cfg == "zero":
                return fake_score(x, t, batch.uncond)
            return fake_score.guided(x, t, batch.cond, batch.uncond, c.fake_guidance_scale)

        if c.checkpoint_scores and torch.is_grad_enabled():
            return checkpoint(real, x_t, use_reentrant=False), checkpoint(fake, x_t, use_reentrant=False)
        return real(x_t), fake(x_t)

    def generator_terms(self, x: torch.Tensor, t_in: torch.Tensor, batch, critic=None) -> dict[str, torch.Tensor]:
        finite = finite_rows(x)  # non-finite samples reach the scores as zeros (their backward would be NaN)
        x_g = zero_rows(x, finite).float()
        t = self.generator_times(x_g.shape[0], x.device)
        x_t = self.schedule.add_noise(x_g, torch.randn_like(x_g), t)
        y_r, y_f = self.scores(x_t, t, batch, critic)
        keep = finite & finite_rows(y_r) & finite_rows(y_f)
        loss = sid_loss(x_g, zero_rows(y_r, keep).float(), zero_rows(y_f, keep).float(), self.alpha, keep)
        return {"sid": loss, "dropped": (~keep).sum().float()}

    def fake_loss(self, x: torch.Tensor, batch, keep=None, critic=None) -> torch.Tensor:
        """DMD's denoising score matching on the finite generated samples, with SiD-LSG's prompt dropout
        (text teachers) or, under Zero-CFG, without text."""
        keep = finite_rows(x) if keep is None else keep & finite_rows(x)
        if batch.uncond is not None:
            batch = copy.copy(batch)
            drop = torch.ones_like(keep) if self.config.cfg == "zero" else (
                torch.rand(keep.shape, device=x.device) < self.config.prompt_dropout)
            batch.cond = mix_cond(batch.cond, batch.uncond, drop)
        return super().fake_loss(zero_rows(x, keep), batch, keep, critic)


class SiDA(SiD):
    name = "sida"
    Config = SiDAConfig


class FewStepSiD(SiD):
    """Few-step SiD: ``student.num_steps`` K > 1 (the uniform mixture of the K step outputs is matched)."""

    name = "sid_fewstep"


def sid_loss(x_g: torch.Tensor, y_r: torch.Tensor, y_f: torch.Tensor, alpha: float,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """``mean[(y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f)) / w]``, ``w = sg mean|x_g - y_r|`` per sample; the
    mean over the samples of ``keep`` only (all by default)."""
    w = (x_g - y_r).detach().abs().flatten(1).mean(1).clamp(min=1e-5)
    return row_mean((y_r - y_f) * ((y_r - x_g) - alpha * (y_r - y_f)) / expand_to(w, x_g), keep)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per sample: every entry finite."""
    return torch.isfinite(x).flatten(1).all(1)


def zero_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with the samples outside ``keep`` set to zero (no NaN left, no gradient to them; static shapes)."""
    return torch.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x, torch.zeros((), dtype=x.dtype,
                                                                                     device=x.device))


def mix_cond(cond: Cond | None, uncond: Cond | None, use_uncond: torch.Tensor) -> Cond | None:
    """Per sample, ``uncond`` where ``use_uncond`` else ``cond`` (recursively through nested conditions)."""
    if cond is None:
        return None
    out = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, torch.Tensor):
            mask = use_uncond.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, other, value)
        elif isinstance(value, dict):
            out[key] = mix_cond(value, other, use_uncond)
        else:
            out[key] = value
    return out

