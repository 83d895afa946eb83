"""rCM: sCM regularised by distribution matching (Zheng et al. 2025, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", arXiv 2510.08431; NVlabs/rcm ``t2v_model_distill_rcm.py``).

sCM's forward divergence (the consistency residual along the teacher's ODE, ``fastgen.losses.scm``) covers the
teacher's modes but its one- and few-step samples lose detail; a reverse divergence, DMD's score difference on
the student's own samples, sharpens them. The student's update is the sum of the two:

    L_G = L_sCM + dmd_weight * sum_i (x_i - sg(x_i - grad_i))²   (per sample, mean over the batch)

with ``L_sCM`` sCM's loss (its tangent, normalisation, warm-up and adaptive weighting) and ``grad`` DMD's
normalised gradient (DMD eq. 8) on the student's samples: a step of its plan drawn per batch, the earlier steps
by backward simulation without gradient (DMD2), the fake score trained on those samples by denoising score
matching. The DMD term is a per-sample sum of squares like sCM's, so ``dmd_weight`` is rCM's ``loss_scale_dmd /
loss_scale`` = 1 / 100 (rCM sums both over elements and scales sCM by 100, DMD by 1).

**Schedule of updates** (rCM's ``is_student_phase``): for the first ``tangent_warmup_steps`` steps the student
trains on sCM alone, every step, while sCM's tangent warms up (phase ``consistency``); afterwards the generator
phase (sCM + DMD) runs every ``critic_every``-th step and the fake score's phase every step (rCM: 5; its fake
score lr 4e-7 against the student's 2e-6 on Wan 2.1 1.3B). The fake score, its phase and the DMD gradient are
DMD2's (``fastgen.losses.dmd``), built here as a ``DMD2`` objective over the same networks and plan; no GAN term
(rCM has none).

**Grid.** sCM's (``SCM.default_grid``): ``[T]`` and ``[T, s(t_mid)]`` in the teacher's time, for an epsilon
student of a VP teacher capped where alpha = 0.1 (``fastgen.losses.scm.first_time``). On the toy teacher
(linear-beta epsilon, 2,000 steps, ``dmd_weight`` 0.1, ``critic_every`` 2, docs/scm.md) that top gave toy FID 11.6
at two steps where the DMD family's cap (alpha 0.35) gave 15.7; one step is poor at either (489, 222).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fastgen.errors import check_fields, warn
from fastgen.losses.base import Phase
from fastgen.losses.dmd import DMD2, DMD2Config
from fastgen.losses.scm import SCM, SCMConfig


@dataclass
class RCMConfig(SCMConfig):
    dmd_weight: float = 0.01
    """Weight of the DMD term against sCM's, both per-sample sums of squares (rCM: loss_scale_dmd 1 / loss_scale 100)."""
    critic_every: int = 5
    """Fake-score updates per generator update after the warm-up (rCM's ``student_update_freq``: 5; 10 for 14B)."""
    fake_lr: float | None = None
    """The fake score's learning rate (None: the run's; rCM: 4e-7 with the student at 2e-6, a fifth)."""
    fake_lora_rank: int = 0
    """0: the fake score is a full copy of the teacher; r > 0: a LoRA adapter of rank r on its weights."""
    t_range: tuple[float, float] = (0.02, 0.98)
    """Fraction of the teacher's time range where DMD's gradient is taken (DMD: 0.02 T to 0.98 T)."""
    fake_t_range: tuple[float, float] = (0.0, 1.0)
    """Fraction of the range where the fake score is trained."""

    def __post_init__(self):
        super().__post_init__()
        check_fields([
            (self.dmd_weight >= 0, "dmd_weight", self.dmd_weight, ">= 0 (0: sCM alone)"),
            (self.fake_lr is None or self.fake_lr > 0, "fake_lr", self.fake_lr, "> 0 or null"),
        ], "objective.")
        self.dmd_config()  # DMD2's own checks of the keys it takes (critic_every, fake_lora_rank, the ranges)

    def dmd_config(self) -> DMD2Config:
        """The DMD2 settings of the regulariser: this config's guidance, critic ratio, fake score and ranges, no GAN."""
        return DMD2Config(guidance_scale=self.guidance_scale, critic_every=self.critic_every, fake_lr=self.fake_lr,
                          fake_lora_rank=self.fake_lora_rank, t_range=self.t_range, fake_t_range=self.fake_t_range,
                          gan_weight=0.0, gan_critic_weight=0.0)


class RCM(SCM):
    """sCM plus DMD2's fake score, its phase and its gradient on the student's samples (module docstring)."""

    name = "rcm"
    Config = RCMConfig

    def __init__(self, teacher, nets, config: RCMConfig, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        if max_steps is not None and max_steps <= config.tangent_warmup_steps:
            warn(f"rcm: train.max_steps = {max_steps} ends within objective.tangent_warmup_steps = "
                 f"{config.tangent_warmup_steps}, so the DMD term and its fake score never train (the student is sCM's "
                 "alone); expected max_steps above the warm-up")
        self.dmd = DMD2(self.teacher, nets, config.dmd_config(), plan, max_steps, self.factory)
        self.owned += [name for name in self.dmd.owned if name not in self.owned]

    def phases(self):
        c, warmup = self.config, self.config.tangent_warmup_steps
        critic = self.dmd.critics[0]
        return [Phase("consistency", ("student", "weighting"), self.scm_loss, stop=warmup),
                Phase("generator", ("student", "weighting"), self.generator_loss, every=c.critic_every, start=warmup),
                Phase("critic", self.dmd.critic_networks(critic),
                      functools.partial(self.dmd.critic_loss, critic=critic), lr=c.fake_lr, start=warmup)]

    def generator_loss(self, batch, step):
        """``L_sCM + dmd_weight * sum (x - sg(x - grad))²`` (module docstring)."""
        terms = self.scm_loss(batch, step)
        x, _ = self.dmd.generate(batch, grad=True)
        dm = self.dmd.generator_terms(x, None, batch)["dm"] * 2 * x[0].numel()  # 0.5 mean -> per-sample sum
        return {**terms, "loss": terms["loss"] + self.config.dmd_weight * dm, "scm": terms["loss"].detach(),
                "dm": dm.detach()}
