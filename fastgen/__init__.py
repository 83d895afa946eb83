"""fastgen: distil many-step diffusion and flow teachers into 1-4 step students that diffusers loads.

Heavy imports are lazy, so ``fastgen --help`` stays fast. Load an exported student with
``fastgen.load_pipeline(folder)`` (fastgen's own classes, no code from the folder), or without fastgen with
``DiffusionPipeline.from_pretrained(folder, use_safetensors=True, trust_remote_code=True)`` (the flag only where
the export ships custom code; its model card says which).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_teacher": "fastgen.teacher",
    "Teacher": "fastgen.teacher",
    "Denoiser": "fastgen.denoiser",
    "GaussianMixtureDenoiser": "fastgen.analytic",
    "schedule_from_config": "fastgen.schedules",
    "FewStepScheduler": "fastgen.samplers.scheduler",
    "FewStepPipeline": "fastgen.pipelines.few_step",
    "export_student": "fastgen.pipelines.export",
    "load_pipeline": "fastgen.pipelines.load",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
