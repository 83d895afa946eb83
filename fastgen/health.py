"""A cheap, teacher-relative health signal of a student's samples: has training collapsed to noise or to flat images?

Losses do not say it: a student that outputs noise can log ordinary losses (SiD's defaults on an unseen teacher
did, exiting 0). Two ratios, each of the student's samples against reference samples (the data's ``x0``, or the
teacher's own samples for data-free runs), in the denoiser's space:

- ``denoise_ratio``: the teacher's denoising error on the samples at its middle noise level (``logSNR = 0``,
  ``alpha = sigma``), ``E |D(alpha x + sigma eps, t) - x|^2``, over the same on the reference. Samples on the
  teacher's data manifold are denoised about as well as data; noise, or noise-like artefacts, are not.
- ``flat_ratio``: the samples' spatial standard deviation (per channel and frame, averaged) over the
  reference's: a student collapsed to a constant or flat colour has none.

Measured on the bundled toy teacher (64 samples each, reference: its 32-step DDIM samples): its own 32-step
samples 0.84 / 0.96, 4-step DDIM 1.95 / 0.98, 2 x 2 average-pooled data 1.32 / 0.76, Gaussian noise 6.72 /
2.73, data plus noise of std 0.5 7.68 / 1.78, its 1-step DDIM (noise-like) 28.4 / 3.21, mid-grey 2.32 / 0.00,
constant random colours 6.67 / 0.00. Hence the band: ``denoise_ratio <= NOISE_RATIO`` and
``flat_ratio >= FLAT_RATIO``; outside it the trainer warns and the export's model card says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from fastgen.denoiser import Cond

NOISE_RATIO = 5.0
"""Above this ``denoise_ratio`` the samples are called noise-like (toy: noise 6.7, a 4-step DDIM teacher 1.95)."""
FLAT_RATIO = 0.2
"""Below this ``flat_ratio`` the samples are called flat (toy: constants 0.00, 2x2-pooled data 0.76)."""


@dataclass
class Health:
    """The two ratios (module docstring; ``None`` when not finite) and the verdict: ``None`` (healthy),
    ``"noise"``, ``"flat"`` or ``"nonfinite"`` (the samples hold NaN or inf)."""

    denoise_ratio: float | None
    flat_ratio: float | None
    verdict: str | None

    def message(self) -> str | None:
        """One line for the log when the samples left the band, else ``None``."""
        if self.verdict == "noise":
            return (f"the student's samples look like noise: the teacher denoises them {self.denoise_ratio:.1f}x "
                    f"worse than the data (healthy <= {NOISE_RATIO:g}); check the learning rate, the one-step "
                    "time (student.timesteps) and the loss scale")
        if self.verdict == "nonfinite":
            return "the student's samples hold NaN or inf values"
        if self.verdict == "flat":
            return (f"the student's samples are flat: {self.flat_ratio:.2f} of the data's spatial variation "
                    f"(healthy >= {FLAT_RATIO:g}); the student may have collapsed to a constant")
        return None

    def as_dict(self) -> dict:
        return asdict(self)


def mid_time(schedule) -> torch.Tensor:
    """The teacher's native time where ``alpha = sigma`` (``logSNR = 0``), inside its range."""
    t = schedule.t_from_logsnr(torch.tensor(0.0))
    return t.clamp(schedule.t_min, schedule.t_max)


@torch.no_grad()
def denoising_error(teacher, x: torch.Tensor, cond: Cond | None, generator: torch.Generator) -> torch.Tensor:
    """``mean |D(alpha x + sigma eps, t_mid) - x|^2`` of the teacher over the batch ``x``."""
    t = mid_time(teacher.schedule).to(x.device).expand(x.shape[0])
    eps = torch.randn(x.shape, generator=generator).to(x)
    x0 = teacher(teacher.schedule.add_noise(x, eps, t), t, cond)
    return (x0.float() - x.float()).pow(2).mean()


def spatial_std(x: torch.Tensor) -> torch.Tensor:
    """The standard deviation over the last two (spatial) axes, averaged over samples, channels and frames."""
    return x.float().flatten(-2).std(-1).mean()


def assess(teacher, samples: torch.Tensor, cond: Cond | None, reference: torch.Tensor, reference_cond: Cond | None,
           seed: int = 0) -> Health:
    """The ``Health`` of the student's ``samples`` (denoiser space, conditioned on ``cond``) against
    ``reference`` samples (the data's ``x0`` or the teacher's samples, conditioned on ``reference_cond``); the
    teacher's noise is drawn from ``seed``, the same for both."""
    ours = denoising_error(teacher, samples, cond, torch.Generator().manual_seed(seed))
    theirs = denoising_error(teacher, reference, reference_cond, torch.Generator().manual_seed(seed))
    denoise = float(ours / theirs.clamp_min(1e-12))
    flat = float(spatial_std(samples) / spatial_std(reference).clamp_min(1e-12))
    if not (math.isfinite(denoise) and math.isfinite(flat)):
        return Health(None, None, "nonfinite")
    verdict = "noise" if denoise > NOISE_RATIO else "flat" if flat < FLAT_RATIO else None
    return Health(round(denoise, 4), round(flat, 4), verdict)
