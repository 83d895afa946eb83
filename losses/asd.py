"""Adversarial self-distillation, ASD (2025): one DMD2 student that serves several step counts.

On top of DMD2 (``losses.dmd``), a discriminator (a head on the fake score's features, ``losses.adversarial``)
aligns the distribution of the student's ``n``-step outputs with that of its own ``(n+1)``-step outputs, the
latter as "real" and without gradient; ``n`` is drawn per batch from ``step_counts`` and the DMD term and
the backward simulation run on that count's grid, so one student is trained for 1, 2 and 4 steps and the
export lists the timesteps of each (``plan_grids``, ``exported_counts``). No real data is needed
unless DMD2's own GAN term is switched on (``gan_weight``/``gan_critic_weight``).

First-frame enhancement, for a sequence of frames stacked along the sample's first axis (``num_frames``
frames of ``C / num_frames`` channels): the first ``first_frames`` frames of every output are taken from a
run with ``first_frame_steps`` more steps, on both sides of the discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.denoiser import cat_cond
from fastgen.errors import UsageError, check_fields
from fastgen.losses.adversarial import discriminator_loss, generator_loss
from fastgen.losses.dmd import DMD2, Critic, DMD2Config


@dataclass
class ASDConfig(DMD2Config):
    step_counts: tuple[int, ...] = (1, 2, 4)
    """Step counts the one student is trained for (each must be >= 1; ``student.num_steps`` among them)."""
    asd_weight: float = 5e-3
    """Weight of the generator's self-distillation adversarial term (DMD2's GAN weight)."""
    asd_critic_weight: float = 1e-2
    """Weight of the discriminator's n-step vs (n+1)-step classification loss in the critic phase."""
    gan_weight: float = 0.0
    gan_critic_weight: float = 0.0
    num_frames: int = 1
    """Frames stacked along the sample's first axis (1: images)."""
    first_frames: int = 1
    """How many leading frames first-frame enhancement covers."""
    first_frame_steps: int = 0
    """Extra student steps for the first frames (0: off)."""

    def __post_init__(self):
        super().__post_init__()
        counts = list(self.step_counts)
        check_fields([
            (bool(counts) and min(counts) >= 1, "step_counts", counts, "step counts >= 1"),
            (min(self.asd_weight, self.asd_critic_weight) >= 0, "asd_weight",
             (self.asd_weight, self.asd_critic_weight), "non-negative weights"),
            (self.num_frames >= 1, "num_frames", self.num_frames, ">= 1"),
            (1 <= self.first_frames <= self.num_frames, "first_frames", self.first_frames,
             f"1..num_frames ({self.num_frames})"),
            (self.first_frame_steps >= 0, "first_frame_steps", self.first_frame_steps, ">= 0"),
        ], "objective.")


class ASD(DMD2):
    name = "asd"
    Config = ASDConfig

    def __init__(self, teacher, nets, config, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        c = config
        # not uses_gan: ASD's own adversarial term compares the student with itself and needs no data
        self.needs_data = (c.gan_weight > 0 or c.gan_critic_weight > 0 or c.regression_weight > 0
                           or c.regression_steps > 0 or c.multistep_input == "data")

    @classmethod
    def plan_grids(cls, schedule, student_schedule, config, num_steps):
        """A grid for every step count trained (``step_counts``), its next count (the critic's "real" side) and
        the counts first-frame enhancement adds."""
        if num_steps not in config.step_counts:
            raise UsageError(f"objective.step_counts is {list(config.step_counts)}; expected it to contain "
                             f"student.num_steps = {num_steps}")
        extra = config.first_frame_steps
        counts = sorted({k + d for k in config.step_counts for d in (0, 1, extra, 1 + extra)} | {num_steps})
        return {k: cls.default_grid(schedule, student_schedule, config, k) for k in counts}

    @classmethod
    def exported_counts(cls, config, num_steps, grids):
        return sorted(config.step_counts)

    @property
    def uses_gan(self) -> bool:
        return super().uses_gan or self.config.asd_weight > 0 or self.config.asd_critic_weight > 0

    @staticmethod
    def base_grid(schedule, num_steps: int) -> torch.Tensor:
        """The teacher's sampling grid ``schedule.timesteps(n)``, not the trailing one: one ASD student serves every
        step count, and on a flow teacher's trailing grid ([1000, 500] for 2 steps) the analytic mixture test's
        shared 1- and 2-step student missed a mode by 0.08 after 8000 steps (tolerance 0.05; tests/test_asd.py),
        where on the sampling grid ([1000, 1.6]) it passes in 3000."""
        return schedule.timesteps(num_steps)

    # -- pieces -----------------------------------------------------------------------------------
    def draw(self, critic: Critic) -> tuple[int, Critic]:
        """A step count drawn for this batch, and the critic generating on its grid."""
        counts = self.config.step_counts
        count = counts[int(torch.randint(len(counts), (), generator=self.shared_generator()))]
        return count, critic._replace(timesteps=tuple(self.plan.grids[count]), steps=None)

    def outputs(self, k: int, batch, grad: bool) -> torch.Tensor:
        """The student's ``k``-step output (gradient through its last step only), first frames enhanced."""
        x, _ = self.generate(batch, grad, list(self.plan.grids[k]), k - 1)
        extra = self.config.first_frame_steps
        if extra:
            with torch.no_grad():
                more, _ = self.generate(batch, False, list(self.plan.grids[k + extra]), k + extra - 1)
            x = enhance_first_frames(x, more, self.config.num_frames, self.config.first_frames)
        return x

    def generator_loss(self, batch, step, critic):
        c = self.config
        count, critic = self.draw(critic)
        out = super().generator_loss(batch, step, critic)
        if c.asd_weight > 0:
            x = self.outputs(count, batch, grad=True)
            t = self.sample_t(x.shape[0], c.gan_t_range, x.device, critic)
            term = generator_loss(self.logits(critic, x, t, batch.cond), c.gan_loss)
            out = {**out, "loss": out["loss"] + c.asd_weight * term, "asd": term.detach()}
        return out

    def critic_loss(self, batch, step, critic):
        c = self.config
        count, critic = self.draw(critic)
        out = super().critic_loss(batch, step, critic)
        if c.asd_critic_weight > 0:
            with torch.no_grad():
                fake = self.outputs(count, batch, grad=False).float()
                real = self.outputs(count + 1, batch, grad=False).float()
            n = fake.shape[0]
            t = self.sample_t(2 * n, c.gan_t_range, fake.device, critic)
            logits = self.logits(critic, torch.cat([real, fake]), t, cat_cond(batch.cond, batch.cond))
            term = discriminator_loss(logits[:n], logits[n:], c.gan_loss)
            out = {**out, "loss": out["loss"] + c.asd_critic_weight * term, "asd": term.detach()}
        return out


def enhance_first_frames(x: torch.Tensor, more: torch.Tensor, num_frames: int, first_frames: int) -> torch.Tensor:
    """``x`` with its first ``first_frames`` of ``num_frames`` frames (along axis 1) taken from ``more``."""
    if x.shape[1] % num_frames:
        raise UsageError(f"objective.num_frames is {num_frames}, which does not divide the sample's first axis "
                         f"({x.shape[1]})")
    split = first_frames * (x.shape[1] // num_frames)
    return torch.cat([more[:, :split], x[:, split:]], 1)
