"""``FewStepScheduler``: the diffusers scheduler an exported student ships with.

It stores the exact timesteps the student was trained for, per step count, and the student's rule
(``renoise`` for consistency/DMD/SiD students, ``ddim`` for progressive ones), so that
``pipe(num_inference_steps=4)`` reproduces what was trained with no ``timesteps=`` passed by hand.

Where no stock diffusers scheduler replays the student, an export ships this class as
``scheduler/scheduling_few_step.py`` (``fastgen.pipelines.remote_code`` generates it from this module and
what it names), for loaders without fastgen (``trust_remote_code=True``): so this module and everything it
uses import only torch, numpy and diffusers. Its config keys are a file format: keep them.

The pipeline sees the schedule's model-input times (``timesteps``: the native times, or EDM's
``c_noise = log(sigma) / 4``) and calls ``scale_model_input`` (EDM's ``c_in``) before the network, as it does
for ``EDMEulerScheduler`` (Karras et al. 2022, Table 1); ``sigmas`` holds the native times.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from fastgen.denoiser import boundary_coefficients
from fastgen.samplers.solvers import ddim_step, renoise_step
from fastgen.schedules import schedule_from_description

RULES = ("renoise", "ddim")


def renoise_generator(sample: torch.Tensor) -> torch.Generator:
    """The generator of a call's renoise where the pipeline passes none to ``step`` (SD3's, Flux's, Qwen-Image's
    and Wan's pipelines do not): a CPU generator seeded by the SHA-256 of the sample at the call's first step, the
    latents the call's own generator drew. So one seed gives one image, on any device, with no global
    ``torch.manual_seed``, and different seeds different renoise."""
    digest = hashlib.sha256(sample.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """A scheduler replaying a distilled student's trained timesteps.

    Args:
        schedule: ``NoiseSchedule.describe()`` of the teacher (family, prediction type and parameters).
        trained_timesteps: ``{"1": [399], "4": [999, 749, 499, 249]}`` — native times per step count.
        rule: ``"renoise"`` (predict x0, add fresh noise) or ``"ddim"`` (deterministic DDIM step).
        boundary: ``{"sigma_data": 0.5, "timestep_scaling": 10.0}`` for consistency students, whose x0 is
            ``c_skip x_t + c_out x0_net`` (``fastgen.denoiser.boundary_coefficients``, with the boundary at
            the clean end ``t_min`` of ``schedule``, as ``BoundaryDenoiser`` has it); ``None`` otherwise.
        num_train_timesteps: recorded for pipelines that read it; defaults to the schedule's.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, schedule: dict[str, Any] | None = None,
                 trained_timesteps: dict[str, list[float]] | None = None, rule: str = "renoise",
                 boundary: dict[str, float] | None = None, num_train_timesteps: int | None = None):
        if schedule is None or not trained_timesteps:
            raise ValueError("FewStepScheduler needs `schedule` (a NoiseSchedule description) and "
                             "`trained_timesteps` (e.g. {'4': [999, 749, 499, 249]})")
        if rule not in RULES:
            raise ValueError(f"FewStepScheduler.rule is {rule!r}; expected one of {list(RULES)}")
        for n, ts in trained_timesteps.items():
            if len(ts) != int(n):
                raise ValueError(f"trained_timesteps[{n!r}] has {len(ts)} values, expected {n}")
        self.schedule = schedule_from_description(schedule)
        if num_train_timesteps is None:  # read by some pipelines (e.g. SDXL's denoising_end)
            self.register_to_config(num_train_timesteps=self.schedule.num_train_timesteps)
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self.init_noise_sigma = 1.0
        self.generator = None
        """The renoise generator of the call in progress when its pipeline passes none (``renoise_generator``)."""

    @property
    def step_counts(self) -> list[int]:
        return sorted(int(n) for n in self.config.trained_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      mu=None, **_):
        """Select the trained timesteps for ``num_inference_steps`` (or take explicit native ``timesteps``).

        ``sigmas`` and ``mu`` are taken and not used: pipelines that always pass their own default grid (Flux's
        ``linspace(1, 1/n, n)`` and resolution shift ``mu``, through ``retrieve_timesteps``, which requires a
        ``sigmas`` argument, and then no step count) get the trained timesteps of ``len(sigmas)`` steps, which are
        what the student was trained for."""
        if num_inference_steps is None and sigmas is not None:
            num_inference_steps = len(sigmas)
        if timesteps is None:
            key = str(num_inference_steps)
            if key not in self.config.trained_timesteps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps}: this student was trained for "
                    f"{self.step_counts} steps; pass one of those or explicit `timesteps=`"
                )
            timesteps = self.config.trained_timesteps[key]
        self.sigmas = torch.tensor([float(t) for t in timesteps], dtype=torch.float32, device=device)
        self.timesteps = self.schedule.model_input(torch.zeros_like(self.sigmas), self.sigmas)[1]
        self.num_inference_steps = len(self.sigmas)
        self.init_noise_sigma = self.schedule.prior_scale(self.sigmas[0].cpu())
        self.generator = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Taken and kept, as diffusers' schedulers do (Flux's and Qwen-Image's pipelines call it); ``step`` finds
        its index from the timestep itself."""
        self.begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input at ``timestep`` (one of ``timesteps``): EDM's ``c_in x``, else ``x``."""
        if timestep is None:
            return sample
        t = self.sigmas[self._index(timestep)].to(sample.device)
        return self.schedule.model_input(sample, t.expand(sample.shape[0]))[0]

    def _index(self, timestep) -> int:
        if self.timesteps is None:
            raise RuntimeError("FewStepScheduler.step called before set_timesteps")
        hits = (self.timesteps.cpu() == torch.as_tensor(timestep, dtype=self.timesteps.dtype).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of {self.timesteps.tolist()}")
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self._index(timestep)
        t = self.sigmas[i].to(sample.device)
        if model_output.shape[1] == 2 * sample.shape[1] and model_output.shape[2:] == sample.shape[2:]:
            model_output = model_output[:, :sample.shape[1]]  # a learned variance's half (DDPMScheduler drops it too)
        x0 = self.schedule.to_x0(model_output.to(sample.dtype), sample, t)
        if self.config.boundary is not None:
            c_skip, c_out = boundary_coefficients(t, **self.config.boundary, t_min=self.schedule.t_min)
            x0 = c_skip.to(sample) * sample + c_out.to(sample) * x0
        s = self.sigmas[i + 1].to(sample.device) if i + 1 < len(self.sigmas) else None
        if s is None:
            prev = x0
        elif self.config.rule == "ddim":
            prev = ddim_step(self.schedule, sample, x0, t, s)
        else:
            if generator is None:
                if self.generator is None:  # every step but the last renoises: this is the call's first step
                    self.generator = renoise_generator(sample)
                generator = self.generator
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            prev = renoise_step(self.schedule, x0, s, noise)
        if not return_dict:
            return (prev, x0)
        return FewStepSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        return self.schedule.add_noise(original_samples, noise, timesteps)

    def __len__(self):
        return self.schedule.num_train_timesteps
