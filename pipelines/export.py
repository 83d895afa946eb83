"""Export a trained student as a folder that stock diffusers loads, with or without fastgen installed.

Full export (``lora=False``): the teacher pipeline with the student as its denoiser (same model class and
config, a LoRA adapter merged into the weights), saved as safetensors. The scheduler is a stock diffusers one
where one replays the student exactly (``fastgen.pipelines.stock``: e.g. ``LCMScheduler`` for a renoise
student at LCM's timesteps), else ``FewStepScheduler`` with its code in ``scheduler/scheduling_few_step.py``.
Pixel teachers keep ``DDPMPipeline`` where it runs the student as it was trained (unconditional, no input
preconditioning); class-conditional and EDM students get ``FewStepPipeline`` with its code in
``pipeline_few_step.py``. Without fastgen::

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)   # no custom code in the folder
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, trust_remote_code=True)  # else

With fastgen, ``fastgen.load_pipeline(folder)`` checks the folder and builds it from the installed classes,
running no code from the folder. LoRA export (``lora=True`` or ``"peft"``): ``pytorch_lora_weights.safetensors``
(diffusers' layout) and ``scheduler/`` for ``pipe.load_lora_weights(folder)`` on the teacher; ``lora="kohya"``
writes the adapter as ``lora_kohya.safetensors`` in kohya-ss's layout instead (``lora_unet_...`` keys, which
ComfyUI and AUTOMATIC1111 load, as does ``load_lora_weights``; UNet teachers only). Every export holds
``fastgen_export.json`` (format version, student settings, teacher, LoRA format) and a model card ``README.md``
with usage snippets for both ways (``fastgen.pipelines.card``).

A student of K experts (``fastgen.experts.ExpertsDenoiser``: ``student_model`` a list of K networks and
``expert_boundaries`` their K-1 boundaries in native time) exports as a full pipeline whose denoiser is one
``TimestepExperts`` model (``fastgen.pipelines.experts_model``) routing each call by its timestep, with its code in
``{unet,transformer}/modeling_experts.py``; ``fastgen_export.json`` records the boundaries (``"experts"``).
A MeanFlow student (a network with ``fastgen.pipelines.meanflow_model.attach_duration``'s interval input) exports
as one ``MeanFlowModel`` holding the network and its table of intervals, with its code in
``{unet,transformer}/modeling_meanflow.py``; ``fastgen_export.json`` records the table (``"meanflow"``).

Every export is written into a hidden sibling folder and renamed into place at the end, so a failure leaves
nothing half-written; a non-empty ``out_dir`` is replaced only if an earlier export wrote it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from fastgen.atomic import atomic_folder
from fastgen.errors import UsageError
from fastgen.pipelines.few_step import FewStepPipeline
from fastgen.pipelines.stock import stock_scheduler
from fastgen.samplers.scheduler import FewStepScheduler
from fastgen.teacher import Teacher

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
METADATA = "fastgen_export.json"
FORMAT, FORMAT_VERSION = "fastgen-export", 1
SCHEDULER_MODULE, PIPELINE_MODULE = "scheduling_few_step", "pipeline_few_step"
CUSTOM_DENOISERS = {
    "TimestepExperts": ("modeling_experts", "fastgen.pipelines.experts_model",
                        "a fastgen student of experts as one diffusers model."),
    "MeanFlowModel": ("modeling_meanflow", "fastgen.pipelines.meanflow_model",
                      "a fastgen MeanFlow student, its network with the interval input, as one diffusers model."),
}
"""fastgen's own denoiser models: class name -> (the module an export ships it as, the installed module, what it
is)."""
LORA_FORMATS = ("peft", "kohya")
"""The layouts of a LoRA export's weights: diffusers' (peft keys, ``pytorch_lora_weights.safetensors``) and
kohya-ss's (``lora_unet_..._lora_down.weight``, ``.alpha``: ComfyUI, AUTOMATIC1111), in ``KOHYA_WEIGHTS``."""
KOHYA_WEIGHTS = "lora_kohya.safetensors"


def export_student(teacher: Teacher, student_model: torch.nn.Module | Sequence[torch.nn.Module],
                   out_dir: str | os.PathLike, trained_timesteps: Mapping[int | str, Sequence[float]],
                   rule: str = "renoise", boundary: dict | None = None, lora: bool | str = False,
                   prediction_type: str | None = None, method: str | None = None, settings: Mapping | None = None,
                   expert_boundaries: Sequence[float] | None = None, health: Mapping | None = None,
                   num_steps: int | None = None) -> Path:
    """Write ``student_model`` (the teacher's model class and config, optionally with a peft LoRA adapter
    added through ``model.add_adapter``) as a diffusers folder; return its path.

    Args:
        teacher: the loaded teacher (its pipeline supplies every other component and the noise schedule).
        student_model: the trained network, or the K experts of a student of experts (with
            ``expert_boundaries``); it is not modified.
        out_dir: the folder to create (or to replace, if an earlier export wrote it).
        trained_timesteps: native times per step count, e.g. ``{1: [399], 4: [999, 749, 499, 249]}``.
        rule: the student's sampling rule, ``"renoise"`` or ``"ddim"`` (see ``FewStepScheduler``).
        boundary: consistency boundary parameters (``{"sigma_data": ..., "timestep_scaling": ...}``) or ``None``.
        lora: write only the LoRA adapter (text-to-image teachers) instead of the full pipeline, in the layout
            named (one of ``LORA_FORMATS``; ``True`` is ``"peft"``).
        prediction_type: the student's output type when it differs from the teacher's (``student.prediction_type``).
        method: the distillation method's name, for the model card (e.g. ``"dmd2"``).
        settings: the method's settings, for the model card.
        expert_boundaries: for a student of experts, the K-1 strictly decreasing native times between the
            experts' intervals (expert ``k`` answers ``b_k < t <= b_{k-1}``, as ``ExpertsDenoiser``).
        health: the training's last ``fastgen.health`` check (``{"step", "denoise_ratio", "flat_ratio",
            "verdict"}``), for the model card.
        num_steps: the step count the student was trained at (``student.num_steps``), one of
            ``trained_timesteps``: the model card's call; ``None``: the smallest of them.
    """
    lora = lora_format(lora, teacher)
    students = _students(student_model, expert_boundaries, lora)
    for model in students:
        _check_student(teacher, model)
    schedule = {**teacher.schedule.describe(), **({"prediction_type": prediction_type} if prediction_type else {})}
    scheduler = FewStepScheduler(schedule=schedule, trained_timesteps=_timesteps(trained_timesteps),
                                 rule=rule, boundary=boundary)
    shipped = stock_scheduler(scheduler, teacher.pipeline.scheduler.config) or scheduler
    experts = None
    if expert_boundaries is not None:
        experts = {"count": len(students), "boundaries": [float(b) for b in expert_boundaries],
                   "timestep_boundaries": timestep_boundaries(scheduler, expert_boundaries),
                   "expert_class": type(students[0]).__name__,
                   "layout": "pipeline" if native_experts(teacher) and len(students) == 2 else "timestep_experts"}
    meanflow = _meanflow_table(students[0])
    if num_steps is not None and str(num_steps) not in scheduler.config.trained_timesteps:
        raise ValueError(f"num_steps {num_steps} is not among the trained step counts "
                         f"{sorted(scheduler.config.trained_timesteps, key=int)}")
    meta = {**_metadata(teacher, scheduler, shipped, lora, method, settings, experts, meanflow), "health": health,
            "num_steps": num_steps}
    if lora and meanflow:
        raise UsageError("a LoRA export holds the adapter alone, and this MeanFlow student also trained its interval "
                         "embedding: export the full model (no --lora)")
    if lora:
        adapter = _adapter_name(student_model)
        _check_base_weights(teacher, student_model)
        if lora == "kohya":
            write = partial(_write_kohya, teacher.denoiser_component, student_model, adapter, shipped)
        else:
            write = partial(_write_lora, _lora_saver(teacher), teacher.denoiser_component, student_model, adapter,
                            shipped)
    else:
        write = partial(_write_full, teacher, students, experts, meanflow, shipped)
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
    return _write_atomically(out, partial(_write_export, write, meta, out))


def lora_format(lora: bool | str, teacher: Teacher | None = None) -> str | None:
    """The LoRA layout ``lora`` asks for (``None``: a full export; ``True``: ``"peft"``), checked to be one of
    ``LORA_FORMATS`` and, given the ``teacher``, to be writable for it (a text-to-image pipeline with a LoRA
    loader; for ``"kohya"``, a UNet denoiser). ``fastgen distill --lora`` calls it before training."""
    if lora is False or lora is None:
        return None
    name = "peft" if lora is True else lora
    if name not in LORA_FORMATS:
        raise UsageError(f"--lora-format {name!r} is not a LoRA layout; expected one of {', '.join(LORA_FORMATS)}")
    if teacher is not None:
        _lora_saver(teacher)
        if name == "kohya" and teacher.denoiser_component != "unet":
            raise UsageError(
                f"--lora-format kohya writes kohya-ss's UNet layout (Stable Diffusion, SDXL); the denoiser of "
                f"{type(teacher.pipeline).__name__} is a {teacher.denoiser_component}, which diffusers' conversion "
                "does not support: use --lora-format peft, or export the full model (no --lora)"
            )
    return name


def _students(student_model, expert_boundaries: Sequence[float] | None, lora: str | None) -> list[torch.nn.Module]:
    """The networks to export: ``[student_model]``, or the K experts, checked against ``expert_boundaries``."""
    if expert_boundaries is None:
        if isinstance(student_model, (list, tuple)):
            raise ValueError(f"student_model is a list of {len(student_model)} networks; a student of experts needs "
                             "expert_boundaries (their K-1 native times, decreasing)")
        return [student_model]
    students = list(student_model) if isinstance(student_model, (list, tuple)) else [student_model]
    bounds = [float(b) for b in expert_boundaries]
    if len(students) < 2 or len(bounds) != len(students) - 1 or any(a <= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"expert_boundaries is {bounds} for {len(students)} experts; expected K >= 2 networks in "
                         "student_model and K-1 strictly decreasing native times (high noise first)")
    if lora:
        raise UsageError(f"a LoRA export holds one adapter; this student has {len(students)} experts: export their "
                         "full weights (lora=False, no --lora), which merges each expert's adapter")
    return students


def timestep_boundaries(scheduler: FewStepScheduler, boundaries: Sequence[float]) -> list[float]:
    """Native-time boundaries in the units of the ``timestep`` the pipeline passes to the network (the scheduler's
    ``timesteps``: ``schedule.model_input``'s time, e.g. EDM's ``c_noise``), computed as the scheduler computes
    its timesteps (float32). The map is increasing, so the intervals keep their order."""
    t = torch.tensor([float(b) for b in boundaries], dtype=torch.float32)
    return [float(u) for u in scheduler.schedule.model_input(torch.zeros_like(t), t)[1]]


def _meanflow_table(model: torch.nn.Module) -> dict | None:
    """A MeanFlow student's table of intervals (``{"timesteps", "durations"}``), or None for any other student."""
    extra = getattr(model, "duration_embedding", None)
    return None if extra is None else {"timesteps": list(extra.timesteps), "durations": list(extra.durations)}


def _metadata(teacher: Teacher, scheduler: FewStepScheduler, shipped, lora: str | None, method: str | None,
              settings: Mapping | None, experts: dict | None = None, meanflow: dict | None = None) -> dict:
    """``fastgen_export.json``: what fastgen needs to load the folder with its own classes, and the card's facts
    (``base_model`` and ``license``: a hub teacher's id, else those of a local teacher's own model card)."""
    from fastgen import __version__
    from fastgen.pipelines.card import read_front_matter

    source = Path(teacher.source)
    hub_id = None if source.exists() else teacher.source
    card = {} if hub_id else read_front_matter(source)
    base_model = hub_id or _hub_ids(card.get("base_model"))
    license_ = card.get("license") if isinstance(card.get("license"), str) else None
    optional = set(getattr(type(teacher.pipeline), "_optional_components", []))
    absent = sorted(name for name, entry in _index_entries(teacher.pipeline).items()
                    if entry is None and name not in optional)
    if not teacher.text_conditioned:
        pipeline = "FewStepPipeline" if _needs_few_step_pipeline(teacher) else "DDPMPipeline"
    else:
        pipeline = type(teacher.pipeline).__name__
    custom = custom_denoiser({"experts": experts, "meanflow": meanflow})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fastgen_version": __version__,
        "kind": "lora" if lora else "full", "lora_format": lora, "pipeline": pipeline,
        "scheduler": type(shipped).__name__,
        "remote_code": sorted(_remote_code_files(shipped, pipeline if not lora else None,
                                                 f"{teacher.denoiser_component}/{CUSTOM_DENOISERS[custom][0]}.py"
                                                 if custom else None)),
        "few_step_scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        "teacher": hub_id or str(source.resolve()), "base_model": base_model, "license": license_,
        "denoiser": teacher.denoiser_component,
        "conditioning": "text" if teacher.text_conditioned else "class" if teacher.num_classes else None,
        "absent": absent, "experts": experts, "meanflow": meanflow, "method": method,
        "settings": dict(settings or {}), "metrics": [],
        "size": teacher.size(),
        # a LoRA loads into the teacher's own pipeline; a full export keeps its two experts only as a student of two
        "call": _replay_call(teacher, (teacher.pipeline.config.get("boundary_ratio") is not None) if lora
                             else (experts or {}).get("layout") == "pipeline"),
    }


def _replay_call(teacher: Teacher, two_experts: bool) -> dict:
    """The keyword arguments of the exported pipeline's call that replay the student: the trained size where the
    pipeline takes one (text-to-image pipelines; the pixel ones sample their network's size) and the family's
    ``replay_kwargs`` (guidance off, or a guidance-distilled network's trained scale; ``two_experts``: the
    exported pipeline routes two networks by its ``boundary_ratio``)."""
    size = teacher.size() if teacher.text_conditioned else {}
    params = inspect.signature(type(teacher.pipeline).__call__).parameters
    return {**{k: v for k, v in size.items() if k in params},
            **teacher.family.replay_kwargs(teacher.model, two_experts)}


def _hub_ids(value) -> str | list[str] | None:
    """A model card's ``base_model`` (one hub id or a list of them), or ``None`` where it is neither."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    return None


def _index_entries(pipeline) -> dict:
    """The pipeline's components by name (``None`` where absent, e.g. SD3 without T5)."""
    return {name: value for name, value in pipeline.components.items()}


def _needs_few_step_pipeline(teacher: Teacher) -> bool:
    """A pixel student needs ``FewStepPipeline`` where ``DDPMPipeline`` would not run it as trained: class
    labels (it passes none) or input preconditioning (it calls neither ``scale_model_input`` nor
    ``init_noise_sigma``: EDM)."""
    return bool(teacher.num_classes) or teacher.schedule.family == "edm"


def timestep_experts(meta: dict) -> bool:
    """Whether an export's student of experts is one ``TimestepExperts`` model (not the pipeline's own layout of
    two networks, ``"layout": "pipeline"``: Wan 2.2's ``transformer`` + ``transformer_2``)."""
    experts = meta.get("experts")
    return bool(experts) and experts.get("layout", "timestep_experts") == "timestep_experts"


def custom_denoiser(meta: dict) -> str | None:
    """The class of the export's own denoiser model (a key of ``CUSTOM_DENOISERS``), or None where the denoiser is
    the teacher's class."""
    if timestep_experts(meta):
        return "TimestepExperts"
    return "MeanFlowModel" if meta.get("meanflow") else None


def _remote_code_files(shipped, pipeline: str | None, denoiser_file: str | None) -> list[str]:
    files = [] if type(shipped).__name__ != "FewStepScheduler" else [f"scheduler/{SCHEDULER_MODULE}.py"]
    files += [denoiser_file] if denoiser_file else []
    return files + ([f"{PIPELINE_MODULE}.py"] if pipeline == "FewStepPipeline" else [])


def _write_export(write: Callable[[Path], None], meta: dict, out: Path, folder: Path) -> None:
    """Write the weights (``write``), the custom code the loaders without fastgen need, the metadata and the card."""
    from fastgen.pipelines.card import write_card
    from fastgen.pipelines.remote_code import denoiser_source, pipeline_source, scheduler_source

    write(folder)
    if f"scheduler/{SCHEDULER_MODULE}.py" in meta["remote_code"]:
        (folder / "scheduler" / f"{SCHEDULER_MODULE}.py").write_text(scheduler_source())
    if f"{PIPELINE_MODULE}.py" in meta["remote_code"]:
        (folder / f"{PIPELINE_MODULE}.py").write_text(pipeline_source())
    custom = custom_denoiser(meta)
    if custom:
        (folder / meta["denoiser"] / f"{CUSTOM_DENOISERS[custom][0]}.py").write_text(denoiser_source(custom))
    index_file = folder / "model_index.json"
    if index_file.is_file():  # diffusers recorded the classes under their fastgen module paths
        index = json.loads(index_file.read_text())
        if meta["scheduler"] == "FewStepScheduler":
            index["scheduler"] = [SCHEDULER_MODULE, "FewStepScheduler"]
        if meta["pipeline"] == "FewStepPipeline":
            index["_class_name"] = [PIPELINE_MODULE, "FewStepPipeline"]
        if custom:
            index[meta["denoiser"]] = [CUSTOM_DENOISERS[custom][0], custom]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    write_card(folder, meta, out)
    seal(folder)


def _timesteps(trained_timesteps: Mapping[int | str, Sequence[float]]) -> dict[str, list[float]]:
    """``{4: [999, 749, ...]}`` → ``{"4": [999.0, 749.0, ...]}`` (JSON keys), sorted by step count."""
    out = {}
    for n, ts in trained_timesteps.items():
        try:
            steps = int(n)
        except (TypeError, ValueError):
            raise ValueError(f"trained_timesteps key {n!r} is not a step count; "
                             "expected e.g. {4: [999, 749, 499, 249]}") from None
        out[steps] = [float(t) for t in ts]
    return {str(n): out[n] for n in sorted(out)}


def _public_config(model: torch.nn.Module) -> dict:
    """The model's diffusers config without private keys, JSON-normalised (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}, default=str))


def _check_student(teacher: Teacher, student_model: torch.nn.Module) -> None:
    expected = type(teacher.model)
    if type(student_model) is not expected:
        raise TypeError(
            f"student_model is a {type(student_model).__name__}; expected the teacher's {expected.__name__} "
            "(add LoRA adapters with `model.add_adapter(LoraConfig(...))`, not by wrapping the model in a PeftModel)"
        )
    teacher_config, student_config = _public_config(teacher.model), _public_config(student_model)
    differ = sorted(k for k in teacher_config.keys() | student_config.keys()
                    if teacher_config.get(k) != student_config.get(k))
    if differ:
        raise ValueError(f"student_model config differs from the teacher's in {differ}; expected the same config")


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` was written by ``export_student`` (it holds ``fastgen_export.json`` of this format)."""
    try:
        return json.loads((folder / METADATA).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export folder {out} is a file; expected a folder path")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise FileExistsError(
            f"export folder {out} is not empty and was not written by fastgen export (no {METADATA}); "
            "choose a new or empty folder, or remove this one first"
        )


def seal(folder: Path) -> None:
    """Record the size and sha256 of every file of an export (``fastgen.integrity``, verified when fastgen loads
    it) but its card, which stays editable, and the manifest itself."""
    from fastgen.integrity import MANIFEST, write_manifest
    from fastgen.pipelines.card import CARD

    files = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name not in (CARD, MANIFEST)]
    write_manifest(folder, files)  # names relative to folder: rglob's paths include it, relative or not


def _write_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary sibling folder, fsync it, then swap it in for ``out`` (``fastgen.atomic``:
    a full disk is one line, the previous export stays as it was)."""
    with atomic_folder(out) as tmp:
        write(tmp)
    return out


def _merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in its plain diffusers class: active LoRA adapters fused into the weights and
    the peft layers removed (``model`` itself is left as it is)."""
    plain = copy.deepcopy(model)
    if getattr(plain, "peft_config", None):
        plain.fuse_lora()
        plain.unload_lora()
    return plain.eval()


def _with_components(pipeline, **replacements):
    """A pipeline of ``pipeline``'s class sharing its components and settings, with ``replacements`` swapped in.
    (``DiffusionPipeline.from_pipe`` would also cast every component to one dtype.)"""
    cls = type(pipeline)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**pipeline.config, **pipeline.components}.items() if k in params}
    return cls(**{**kwargs, **replacements})


def _denoiser_components(teacher: Teacher, students: Sequence[torch.nn.Module], experts: dict | None,
                         meanflow: dict | None = None) -> dict[str, torch.nn.Module]:
    """The pipeline components holding the student: ``{"unet" or "transformer": merged copy}``; for a student of
    experts, one ``TimestepExperts`` holding the merged copies, or, where the pipeline routes two networks itself
    (``native_experts``: Wan 2.2's ``transformer`` + ``transformer_2`` with ``boundary_ratio``), the two copies in
    that layout. A one-network student of such a teacher leaves ``transformer_2`` and ``boundary_ratio`` unset.
    A MeanFlow student (``meanflow``: its table) is one ``MeanFlowModel`` holding the merged copy."""
    from fastgen.pipelines.experts_model import TimestepExperts
    from fastgen.pipelines.meanflow_model import MeanFlowModel

    merged = [_merged_copy(model) for model in students]
    two = native_experts(teacher)
    one_network = {"transformer_2": None, "boundary_ratio": None} if two else {}
    if meanflow is not None:
        with torch.device("meta"):  # the network is the merged copy, not a fresh random one
            model = MeanFlowModel(type(merged[0]).__name__, _public_config(merged[0]), **meanflow)
        model.base = merged[0]
        return {teacher.denoiser_component: model.eval(), **one_network}
    if experts is None:
        return {teacher.denoiser_component: merged[0], **one_network}
    if two and len(merged) == 2:
        # ExpertsDenoiser gives t <= b to the second expert, WanPipeline t >= ratio T to the first: the boundary is
        # moved up by one float32 step, so a student step exactly at b runs where it was trained
        above = torch.nextafter(torch.tensor(experts["timestep_boundaries"][0]), torch.tensor(math.inf))
        ratio = float(above) / teacher.schedule.num_train_timesteps
        return {"transformer": merged[0], "transformer_2": merged[1], "boundary_ratio": ratio}
    with torch.device("meta"):  # the experts are the merged copies, not K fresh random networks
        model = TimestepExperts(experts["expert_class"], _public_config(merged[0]), experts["timestep_boundaries"])
    model.experts = torch.nn.ModuleList(merged)
    return {teacher.denoiser_component: model.eval()}


def native_experts(teacher: Teacher) -> bool:
    """Whether the teacher's pipeline routes two denoisers by noise level itself (``transformer_2`` and
    ``boundary_ratio`` among its arguments: ``WanPipeline`` of Wan 2.2, where ``t >= boundary_ratio T`` runs
    ``transformer``)."""
    params = inspect.signature(type(teacher.pipeline).__init__).parameters
    return "transformer_2" in params and "boundary_ratio" in params


def _write_full(teacher: Teacher, students: Sequence[torch.nn.Module], experts: dict | None, meanflow: dict | None,
                scheduler, folder: Path) -> None:
    components = _denoiser_components(teacher, students, experts, meanflow)
    if teacher.text_conditioned:
        pipe = _with_components(teacher.pipeline, **components, scheduler=scheduler)
    elif _needs_few_step_pipeline(teacher):
        pipe = FewStepPipeline(**components, scheduler=scheduler)
    else:
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline(**components, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)


def _lora_saver(teacher: Teacher) -> Callable:
    """The teacher pipeline's ``save_lora_weights``, checked to take the denoiser's LoRA layers."""
    pipeline_cls = type(teacher.pipeline)
    component = teacher.denoiser_component
    save = getattr(pipeline_cls, "save_lora_weights", None)
    if not teacher.text_conditioned or save is None or not hasattr(pipeline_cls, "load_lora_weights") \
            or f"{component}_lora_layers" not in inspect.signature(save).parameters:
        raise UsageError(
            f"LoRA export needs a text-to-image teacher pipeline with a LoRA loader (StableDiffusion, SDXL, SD3); "
            f"{pipeline_cls.__name__} from {teacher.source} has none. Export the full model instead "
            "(lora=False), which merges the adapter into the weights"
        )
    return save


def _adapter_name(model: torch.nn.Module) -> str:
    """The one active LoRA adapter of ``model``."""
    if not getattr(model, "peft_config", None):
        raise ValueError("student_model has no LoRA adapter (add one with `model.add_adapter(LoraConfig(...))`); "
                         "export it with lora=False")
    active = model.active_adapters()
    if len(active) != 1:
        raise ValueError(f"student_model has active adapters {active}; expected exactly one for LoRA export")
    return active[0]


def _check_base_weights(teacher: Teacher, student_model: torch.nn.Module) -> None:
    """A LoRA export ships only the adapter: refuse it if the student's other weights left the teacher's
    (compared exactly, in the teacher's dtype). The teacher's own network may carry adapters too (a LoRA fake
    score on its weights): its base weights are compared."""
    reference = {key.replace(".base_layer.", "."): value for key, value in teacher.model.state_dict().items()
                 if ".lora_" not in key}
    for key, value in student_model.state_dict().items():
        if ".lora_" in key:
            continue
        base = reference.get(key.replace(".base_layer.", "."))
        if base is None or not torch.equal(value.to(device=base.device, dtype=base.dtype), base):
            raise ValueError(
                f"student_model's non-LoRA weight {key!r} differs from the teacher's, and a LoRA export would drop "
                "it; export the full model (lora=False)"
            )


def _lora_layers(model: torch.nn.Module, adapter: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's weights in peft's key format (``...to_q.lora_A.weight``) and its ``LoraConfig`` as a dict,
    with each layer's scaling (``lora_alpha / r``) folded into ``lora_B`` and ``lora_alpha`` set to ``r``: loaders
    that ignore the saved config and assume ``alpha = r`` (older diffusers, most UIs) then get the same output."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model, adapter_name=adapter)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            prefix = f"{name}.lora_B."
            for key in [k for k in layers if k.startswith(prefix)]:
                layers[key] = layers[key] * module.scaling[adapter]
    config = model.peft_config[adapter].to_dict()
    config.update(lora_alpha=config["r"], alpha_pattern=dict(config.get("rank_pattern") or {}), use_rslora=False)
    return layers, config


def _write_lora(save_lora: Callable, component: str, student_model: torch.nn.Module, adapter: str,
                scheduler, folder: Path) -> None:
    layers, metadata = _lora_layers(student_model, adapter)
    kwargs = {f"{component}_lora_layers": layers}
    if f"{component}_lora_adapter_metadata" in inspect.signature(save_lora).parameters:  # diffusers >= 0.34
        kwargs[f"{component}_lora_adapter_metadata"] = metadata
    save_lora(folder, **kwargs, safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")


def _write_kohya(component: str, student_model: torch.nn.Module, adapter: str, scheduler, folder: Path) -> None:
    """The adapter in kohya-ss's layout (diffusers' ``convert_state_dict_to_kohya`` of the peft keys: ``lora_A`` →
    ``lora_down``, ``lora_B`` → ``lora_up``, ``alpha`` = rank, which matches the scaling folded into ``lora_up``)
    as ``KOHYA_WEIGHTS``, and the scheduler."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    layers, _ = _lora_layers(student_model, adapter)
    state = convert_state_dict_to_kohya({f"{component}.{key}": value for key, value in layers.items()})
    save_file({key: value.detach().contiguous() for key, value in state.items()}, folder / KOHYA_WEIGHTS,
              metadata={"format": "pt"})
    scheduler.save_pretrained(folder / "scheduler")
