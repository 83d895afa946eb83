"""Load an export with fastgen's own classes: ``load_pipeline(folder)``, checked, running no code from the folder.

The folder must hold ``fastgen_export.json`` of a format version this fastgen reads; the pipeline is built with
the installed ``FewStepScheduler`` (from the recorded settings, whatever scheduler the folder ships) and, for
pixel students written as ``FewStepPipeline``, the installed pipeline class, and, for a student of experts, the
installed ``TimestepExperts``. Weights load as safetensors only.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from fastgen.pipelines.export import EXPERTS_MODULE, FORMAT, FORMAT_VERSION, METADATA, SCHEDULER_MODULE


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` claims to be a fastgen export (it holds ``fastgen_export.json``)."""
    return (Path(folder) / METADATA).is_file()


def read_export(folder: str | Path) -> dict:
    """The export's metadata, checked: a clear error for a folder that is not an export or is too new."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise ValueError(f"{folder} is not a fastgen export: no {METADATA}; expected a folder written by "
                         "`fastgen export` / `export_student`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected fastgen export metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: format is {found!r}; expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{folder} is a fastgen export of format version {version!r} (written by fastgen "
            f"{meta.get('fastgen_version')}); this fastgen reads versions up to {FORMAT_VERSION}: upgrade fastgen"
        )
    return meta


def few_step_scheduler(meta: dict):
    """The installed ``FewStepScheduler`` with the student's recorded settings."""
    from fastgen.samplers.scheduler import FewStepScheduler

    return FewStepScheduler.from_config(meta["few_step_scheduler"])


def load_pipeline(folder: str | Path, teacher: str | None = None, **kwargs):
    """The diffusers pipeline of the export in ``folder`` (a LoRA export is loaded onto its teacher: the recorded
    one, or ``teacher``). ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``). No loading progress bars
    (``fastgen.teacher.quiet_loading``)."""
    from fastgen.teacher import quiet_loading

    folder = Path(folder).expanduser()
    meta = read_export(folder)
    with quiet_loading():
        return _load_pipeline(folder, meta, teacher, kwargs)


def _load_pipeline(folder: Path, meta: dict, teacher: str | None, kwargs: dict):
    from diffusers import DiffusionPipeline, UNet2DModel

    from fastgen.pipelines.few_step import FewStepPipeline

    scheduler = few_step_scheduler(meta)
    absent = {name: None for name in meta["absent"]}
    denoiser = _experts_model(folder, meta, kwargs.get("dtype"))
    if meta["kind"] == "lora":
        pipe = DiffusionPipeline.from_pretrained(teacher or meta["teacher"], scheduler=scheduler, use_safetensors=True,
                                                 **absent, **kwargs)
        pipe.load_lora_weights(str(folder))
    elif meta["pipeline"] == "FewStepPipeline":  # diffusers would take the folder's copy of the class
        dtype = kwargs.pop("dtype", None)
        unet = denoiser.get("unet")
        if unet is None:
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **kwargs)
            unet = unet if dtype is None else unet.to(dtype)
        pipe = FewStepPipeline(unet=unet, scheduler=scheduler)
    else:
        # diffusers checks the passed scheduler against model_index.json's ["scheduling_few_step", ...] by looking
        # that module up in sys.modules ("import it before calling from_pretrained"): it is this package's module
        sys.modules.setdefault(SCHEDULER_MODULE, importlib.import_module("fastgen.samplers.scheduler"))
        pipe = DiffusionPipeline.from_pretrained(folder, scheduler=scheduler, use_safetensors=True, **absent,
                                                 **denoiser, **kwargs)
    return pipe


def _experts_model(folder: Path, meta: dict, dtype) -> dict:
    """``{"unet" or "transformer": TimestepExperts}`` (the installed class) for a student of experts, else ``{}``."""
    if not meta.get("experts"):
        return {}
    from fastgen.pipelines.experts_model import TimestepExperts

    # as for the scheduler: diffusers checks a passed component against model_index.json's ["modeling_experts", ...]
    sys.modules.setdefault(EXPERTS_MODULE, importlib.import_module("fastgen.pipelines.experts_model"))
    model = TimestepExperts.from_pretrained(folder, subfolder=meta["denoiser"], use_safetensors=True,
                                            **({} if dtype is None else {"torch_dtype": dtype}))
    return {meta["denoiser"]: model}
