"""Teacher ODE solvers, student few-step rules and the exported ``FewStepScheduler``."""

from fastgen.samplers.solvers import (
    SAMPLERS,
    Guidance,
    ddim_step,
    denoise,
    get_sampler,
    renoise_step,
    sample_ddim,
    sample_dpmpp_2m,
    sample_heun,
    sample_renoise,
)

__all__ = [
    "SAMPLERS", "Guidance", "ddim_step", "denoise", "get_sampler", "renoise_step",
    "sample_ddim", "sample_dpmpp_2m", "sample_heun", "sample_renoise",
]
