"""Adversarial self-distillation, ASD (2025): one DMD2 student that serves several step counts.

On top of DMD2 (``losses.dmd``), a discriminator (a head on the fake score's features, ``losses.adversarial``)
aligns the distribution of the student's ``n``-step outputs with that of its own ``(n+1)``-step outputs, the
latter as "real" and without gradient; ``n`` is drawn per batch from ``step_counts`` and the DMD term and
the backward simulation run on that count's grid, so one student is trained for 1, 2 and 4 steps and the
export lists the timesteps of each (``export_config()["trained_timesteps"]``). No real data is needed
unless DMD2's own GAN term is switched on (``gan_weight``/``gan_critic_weight``).

First-frame enhancement, for a sequence of frames stacked along the sample's first axis (``num_frames``
frames of ``C / num_frames`` channels): the first ``first_frames`` frames of every output are taken from a
run with ``first_frame_steps`` more steps, on both sides of the discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.denoiser import cat_cond
from fastgen.errors import UsageError
from fastgen.losses.adversarial import discriminator_loss, generator_loss
from fastgen.losses.dmd import DMD2, DMD2Config


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


class ASD(DMD2):
    name = "asd"
    Config = ASDConfig

    def __init__(self, teacher, student, config, num_steps=1, timesteps=None, max_steps=None, factory=None):
        self._check_asd(config, num_steps)
        super().__init__(teacher, student, config, num_steps, timesteps, max_steps, factory)
        c = config
        # not uses_gan: ASD's own adversarial term compares the student with itself and needs no data
        self.needs_data = (c.gan_weight > 0 or c.gan_critic_weight > 0 or c.regression_weight > 0
                           or c.regression_steps > 0 or c.multistep_input == "data")
        extra = c.first_frame_steps
        counts = sorted({k + d for k in c.step_counts for d in (0, 1, extra, 1 + extra)})
        self.grids = {k: self.timesteps if k == num_steps else self.default_timesteps(k) for k in counts}
        self.count = num_steps

    @staticmethod
    def _check_asd(c: ASDConfig, num_steps: int) -> None:
        counts = list(c.step_counts)
        rules = [
            (bool(counts) and min(counts) >= 1, "step_counts", counts, "step counts >= 1"),
            (num_steps in counts, "step_counts", counts, f"to contain student.num_steps = {num_steps}"),
            (min(c.asd_weight, c.asd_critic_weight) >= 0, "asd_weight", (c.asd_weight, c.asd_critic_weight),
             "non-negative weights"),
            (c.num_frames >= 1, "num_frames", c.num_frames, ">= 1"),
            (1 <= c.first_frames <= c.num_frames, "first_frames", c.first_frames, f"1..num_frames ({c.num_frames})"),
            (c.first_frame_steps >= 0, "first_frame_steps", c.first_frame_steps, ">= 0"),
        ]
        bad = [f"objective.{key} is {value!r}; expected {expected}" for ok, key, value, expected in rules if not ok]
        if bad:
            raise UsageError("; ".join(bad))

    @property
    def uses_gan(self) -> bool:
        return super().uses_gan or self.config.asd_weight > 0 or self.config.asd_critic_weight > 0

    def export_config(self):
        return {**super().export_config(),
                "trained_timesteps": {str(k): self.grids[k] for k in sorted(self.config.step_counts)}}

    # -- pieces -----------------------------------------------------------------------------------
    def generate(self, batch, grad=True, timesteps=None, step=None):
        """DMD2's backward simulation on the grid of the step count drawn for this batch."""
        return super().generate(batch, grad, self.grids[self.count] if timesteps is None else timesteps, step)

    def outputs(self, k: int, batch, grad: bool) -> torch.Tensor:
        """The student's ``k``-step output (gradient through its last step only), first frames enhanced."""
        x, _ = super().generate(batch, grad, self.grids[k], k - 1)
        extra = self.config.first_frame_steps
        if extra:
            with torch.no_grad():
                more, _ = super().generate(batch, False, self.grids[k + extra], k + extra - 1)
            x = enhance_first_frames(x, more, self.config.num_frames, self.config.first_frames)
        return x

    def loss(self, phase, batch, step):
        c = self.config
        self.count = c.step_counts[int(torch.randint(len(c.step_counts), ()))]
        out = super().loss(phase, batch, step)
        if phase == "generator" and c.asd_weight > 0:
            x = self.outputs(self.count, batch, grad=True)
            t = self.sample_t(x.shape[0], c.gan_t_range, x.device)
            term = generator_loss(self.discriminator.logits(x, t, batch.cond), c.gan_loss)
            out = {**out, "loss": out["loss"] + c.asd_weight * term, "asd": term.detach()}
        elif phase == "critic" and c.asd_critic_weight > 0:
            with torch.no_grad():
                fake = self.outputs(self.count, batch, grad=False).float()
                real = self.outputs(self.count + 1, batch, grad=False).float()
            n = fake.shape[0]
            t = self.sample_t(2 * n, c.gan_t_range, fake.device)
            logits = self.discriminator.logits(torch.cat([real, fake]), t, cat_cond(batch.cond, batch.cond))
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
