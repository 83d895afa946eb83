"""Load an export with fastgen's own classes: ``load_pipeline(folder)``, checked, running no code from the folder.

The folder must hold ``fastgen_export.json`` of a format version this fastgen reads; the pipeline is built with
the installed ``FewStepScheduler`` (from the recorded settings, whatever scheduler the folder ships) and, for
pixel students written as ``FewStepPipeline``, the installed pipeline class, and, for a student of experts, the
installed ``TimestepExperts``. Weights load as safetensors only.

Before any weights load, the folder is checked (:func:`read_export`, :func:`check_export_files`): its manifest
(``fastgen.integrity``), when it has one, is verified; ``fastgen_export.json`` and ``model_index.json`` must
parse and hold what fastgen writes; every class it names must be diffusers' or transformers' own (or the
fastgen classes that are replaced by the installed ones), no config may name custom code (``auto_map``), and
every ``.safetensors`` file must be complete. Each problem is one ``InputError`` naming the file and what was
expected.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path

from fastgen.errors import InputError, MissingPathError
from fastgen.integrity import PICKLE_SUFFIXES, check_safetensors, verify_manifest
from fastgen.pipelines.export import (
    CUSTOM_DENOISERS,
    FORMAT,
    FORMAT_VERSION,
    METADATA,
    PIPELINE_MODULE,
    SCHEDULER_MODULE,
    custom_denoiser,
)

INDEX = "model_index.json"
LIBRARIES = ("diffusers", "transformers")
_FIELDS = {
    "kind": (lambda v: v in ("full", "lora"), "'full' or 'lora'"),
    "pipeline": (lambda v: v == "FewStepPipeline" or isinstance(v, str) and _is_library_class("diffusers", v),
                 "FewStepPipeline or a diffusers pipeline class"),
    "few_step_scheduler": (lambda v: isinstance(v, dict), "the scheduler's settings (a mapping)"),
    "teacher": (lambda v: isinstance(v, str), "the teacher's path or hub id"),
    "denoiser": (lambda v: v in ("unet", "transformer"), "'unet' or 'transformer'"),
    "absent": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of component names"),
    "experts": (lambda v: v is None or isinstance(v, dict), "null or the experts' settings (a mapping)"),
    "meanflow": (lambda v: v is None or isinstance(v, dict) and {"timesteps", "durations"} <= set(v),
                 "null or a MeanFlow student's table {timesteps, durations}"),
    "size": (lambda v: v is None or isinstance(v, dict) and set(v) <= {"height", "width", "num_frames"} and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values()),
        "null or the trained sample size {height, width[, num_frames]} in positive integers"),
    "call": (lambda v: isinstance(v, dict), "the pipeline call's keyword arguments that replay the student (a mapping)"),
    "health": (lambda v: v is None or isinstance(v, dict) and {"step", "denoise_ratio", "flat_ratio", "verdict"} <= set(v),
               "null or the last health check {step, denoise_ratio, flat_ratio, verdict}"),
}
"""The keys of ``fastgen_export.json`` that loading reads: ``(check, what is expected)``."""
_ADDED_LATER = ("experts", "size", "call", "health", "meanflow")
"""Keys that exports of format version 1 written before them lack (read as null)."""


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` claims to be a fastgen export (it holds ``fastgen_export.json``)."""
    return (Path(folder) / METADATA).is_file()


def read_export(folder: str | Path) -> dict:
    """The export's metadata, checked: the folder's manifest (when present) verified, then a clear error for a
    folder that is not an export, a file that is not its JSON, a missing or wrong key, or a version too new."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise InputError(f"{folder} is not a fastgen export: no {METADATA}; expected a folder written by "
                         "`fastgen export` / `export_student`")
    verify_manifest(folder)
    meta = _read_json(path, "fastgen export metadata")
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: format is {meta.get('format')!r}; expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{folder} is a fastgen export of format version {version!r} (written by fastgen "
            f"{meta.get('fastgen_version')}); this fastgen reads versions up to {FORMAT_VERSION}: upgrade fastgen"
        )
    for key, (valid, expected) in _FIELDS.items():
        if key not in meta and key in _ADDED_LATER:
            continue
        if key not in meta:
            raise InputError(f"{path} has no key {key!r}; expected {expected} (the file is damaged or was edited)")
        if not valid(meta[key]):
            raise InputError(f"{path}: {key} is {meta[key]!r:.80}; expected {expected}")
    return meta


def check_export_files(folder: Path, meta: dict) -> None:
    """Check an export's files against its metadata before any weights load: ``model_index.json`` (full exports)
    names the recorded pipeline, denoiser and scheduler and no class outside diffusers and transformers besides
    fastgen's own; no JSON config names custom code (``auto_map``); weights are complete safetensors files."""
    if meta["kind"] == "full":
        index = _read_json(folder / INDEX, "the diffusers model index that `fastgen export` wrote")
        _check_index(folder / INDEX, index, meta)
    for config in sorted(folder.rglob("*.json")):
        data = _read_json(config, "a JSON object", require_object=False)
        if isinstance(data, dict) and "auto_map" in data:
            raise InputError(f"{config} names custom code (auto_map: {data['auto_map']!r:.80}); fastgen loads only "
                             "diffusers' and transformers' own classes and runs no code from the folder; expected "
                             "the config that `fastgen export` wrote")
    for weights in sorted(folder.rglob("*")):
        if weights.suffix in PICKLE_SUFFIXES:
            raise InputError(f"{weights} is a pickle file, which can run code when loaded; fastgen loads exports "
                             "as .safetensors only: export the student again")
        if weights.suffix == ".safetensors":
            check_safetensors(weights)


def _read_json(path: Path, expected: str, require_object: bool = True):
    if not path.is_file():
        raise MissingPathError(f"{path} is missing; expected {expected}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); expected {expected}: the file is damaged (cut off?)") \
            from None
    if require_object and not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}; expected {expected} (a JSON object)")
    return data


def _check_index(path: Path, index: dict, meta: dict) -> None:
    """``model_index.json`` against the metadata: every component a class of diffusers or transformers, or absent,
    or one of fastgen's own that loading replaces with the installed class."""
    own = {"scheduler": [SCHEDULER_MODULE, "FewStepScheduler"]}
    custom = custom_denoiser(meta)
    if custom:
        own[meta["denoiser"]] = [CUSTOM_DENOISERS[custom][0], custom]
    expected_pipeline = [PIPELINE_MODULE, "FewStepPipeline"] if meta["pipeline"] == "FewStepPipeline" \
        else meta["pipeline"]
    pipeline = index.get("_class_name")
    if pipeline != expected_pipeline:
        raise InputError(f"{path}: _class_name is {pipeline!r}; expected {expected_pipeline!r}, the pipeline "
                         f"{METADATA} records (a diffusers pipeline, or fastgen's FewStepPipeline)")
    for name in (meta["denoiser"], "scheduler"):
        if not isinstance(index.get(name), list):
            raise InputError(f"{path} has no component {name!r}; expected the {name} of the exported pipeline")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):  # private keys and pipeline settings
            continue
        if entry == [None, None] or entry == own.get(name):
            continue
        library, cls = entry if len(entry) == 2 else (None, None)
        if library not in LIBRARIES or not isinstance(cls, str) or not _is_library_class(library, cls):
            raise InputError(f"{path}: component {name!r} is {entry!r}; expected a class of {' or '.join(LIBRARIES)} "
                             "(fastgen loads no custom code)")


def _is_library_class(library: str, name: str) -> bool:
    try:
        module = importlib.import_module(library)
    except ImportError:
        return False
    return isinstance(getattr(module, name, None), type)


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
    check_export_files(folder, meta)
    with quiet_loading():
        try:
            return _load_pipeline(folder, meta, teacher, kwargs)
        except OSError as err:  # what diffusers raises for a file it cannot use
            raise InputError(f"export {folder} cannot be loaded: {' '.join(str(err).split())[:300]}") from err


def _load_pipeline(folder: Path, meta: dict, teacher: str | None, kwargs: dict):
    from diffusers import DiffusionPipeline, UNet2DModel

    from fastgen.pipelines.few_step import FewStepPipeline

    scheduler = few_step_scheduler(meta)
    absent = {name: None for name in meta["absent"]}
    denoiser = _custom_denoiser(folder, meta, kwargs.get("dtype"))
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
        with _quiet_type_check(denoiser):
            pipe = DiffusionPipeline.from_pretrained(folder, scheduler=scheduler, use_safetensors=True, **absent,
                                                     **denoiser, **kwargs)
    return pipe


@contextlib.contextmanager
def _quiet_type_check(denoiser: dict):
    """Within: diffusers' "Expected types for <component>" warning dropped for the components of ``denoiser``
    (fastgen's own ``MeanFlowModel``, ``TimestepExperts``, passed where the pipeline's annotation names the wrapped
    class, by design), so that the one line of a following error stays one; its other messages pass."""
    import logging

    prefixes = tuple(f"Expected types for {name}:" for name in denoiser)
    drop = logging.Filter()
    drop.filter = lambda record: not (prefixes and record.getMessage().startswith(prefixes))
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _custom_denoiser(folder: Path, meta: dict, dtype) -> dict:
    """``{"unet" or "transformer": model}`` of the installed class for an export whose denoiser is fastgen's own
    (``TimestepExperts``, ``MeanFlowModel``), else ``{}``."""
    name = custom_denoiser(meta)
    if name is None:
        return {}
    module_name, installed, _ = CUSTOM_DENOISERS[name]
    module = importlib.import_module(installed)
    # as for the scheduler: diffusers checks a passed component against model_index.json's ["modeling_...", ...]
    sys.modules.setdefault(module_name, module)
    model = getattr(module, name).from_pretrained(folder, subfolder=meta["denoiser"], use_safetensors=True,
                                                  **({} if dtype is None else {"torch_dtype": dtype}))
    return {meta["denoiser"]: model}
