"""Load any supported diffusers pipeline as a teacher: denoiser, noise schedule, condition encoders, VAE.

Families (``fastgen.families.FAMILIES``): ``UNet2DModel`` pixel teachers (unconditional or class-conditional,
e.g. a ``DDPMPipeline`` folder), ``UNet2DConditionModel`` latent text-to-image teachers (SD1.x/2.x, and SDXL with
its added text/time conditions), and the transformers of SD3, Flux.1, SANA, Qwen-Image and Wan 2.x (video).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fastgen.checkpoint import UnsafeCheckpointError
from fastgen.denoiser import BaseDenoiser, Cond, Denoiser
from fastgen.errors import InputError, MissingPathError, UsageError
from fastgen.experts import ExpertsDenoiser
from fastgen.families import (FAMILIES, call_default, decode_latents, encode_images, family_of, vae_factors,
                              wrapped_class)
from fastgen.integrity import PICKLE_SUFFIXES, SAFE_SUFFIXES, check_safetensors
from fastgen.schedules import NoiseSchedule, schedule_from_config

DENOISER_COMPONENTS = ("unet", "transformer")
LIBRARIES = ("diffusers", "transformers")
SUPPORTED_MODELS = tuple(FAMILIES)


@dataclass
class Teacher:
    """A loaded teacher. ``denoiser(x_t, t, cond) -> x0``; ``denoiser.guided(...)`` for CFG."""

    pipeline: object
    denoiser: BaseDenoiser
    schedule: NoiseSchedule
    source: str
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    """The sample size in pixels (and frames, for video): ``None`` is the teacher's own (``sample_shape``)."""

    def __call__(self, x_t: torch.Tensor, t, cond: Cond | None = None, **kwargs) -> torch.Tensor:
        """The teacher's x0-prediction ``denoiser(x_t, t, cond)`` (``features=`` passes through)."""
        return self.denoiser(x_t, t, cond, **kwargs)

    def guided(self, x_t: torch.Tensor, t, cond: Cond | None, uncond: Cond | None, scale) -> torch.Tensor:
        """Classifier-free guided x0 (``BaseDenoiser.guided``, Ho–Salimans form)."""
        return self.denoiser.guided(x_t, t, cond, uncond, scale)

    @property
    def models(self) -> list[torch.nn.Module]:
        """The denoiser's networks: one, or the experts of a pipeline that routes two by noise level (Wan 2.2's
        ``transformer``, high noise, and ``transformer_2``)."""
        experts = getattr(self.denoiser, "experts", None)
        return [expert.model for expert in experts] if experts is not None else [self.denoiser.model]

    @property
    def model(self) -> torch.nn.Module:
        """The (first) denoiser network."""
        return self.models[0]

    @property
    def model_class(self) -> str:
        """The denoiser's diffusers class name; an exported student of experts (``TimestepExperts``) gives its
        experts' class, a MeanFlow student (``MeanFlowModel``) its network's."""
        return wrapped_class(self.model) or type(self.model).__name__

    @property
    def denoiser_component(self) -> str:
        """The pipeline component holding the denoiser: ``"unet"`` or ``"transformer"``."""
        return "unet" if "unet" in self.pipeline.components else "transformer"

    @property
    def vae(self):
        return getattr(self.pipeline, "vae", None)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def family(self):
        """The denoiser's ``fastgen.families.Family``."""
        return family_of(self.model)

    @property
    def text_conditioned(self) -> bool:
        return self.family.text

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model.config, "num_class_embeds", None) or 0)

    @property
    def is_video(self) -> bool:
        return self.family.video

    def _pixels(self) -> tuple[int, int, int]:
        """``(height, width, frames)`` in pixels: the ones asked for, else the teacher's own: the denoiser's
        ``sample_size`` times the VAE's factor, or, for families sized by their pipeline (Flux, Wan, Qwen-Image),
        the VAE's ``sample_size``, else the defaults of the pipeline's ``__call__`` (Wan: 480 x 832, 81 frames),
        else ``default_sample_size`` times the VAE's factor."""
        spatial, _ = vae_factors(self.pipeline) if self.is_latent else (1, 1)
        cfg = self.model.config
        if self.family.pipeline_size:
            h = w = getattr(self.vae.config, "sample_size", None)
            if isinstance(h, (list, tuple)):
                h, w = h
            if h is None:
                default = getattr(self.pipeline, "default_sample_size", None)
                h = call_default(self.pipeline, "height", default and default * spatial)
                w = call_default(self.pipeline, "width", h)
        else:
            size = cfg.sample_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            h, w = h * spatial, w * spatial
        frames = call_default(self.pipeline, "num_frames", 1) if self.is_video else 1
        return int(self.height or h), int(self.width or w), int(self.num_frames or frames)

    def size(self) -> dict[str, int]:
        """``{"height", "width"[, "num_frames"]}`` in pixels: the size this teacher samples at (recorded in
        exports, and what to pass to the exported pipeline's call)."""
        h, w = self.image_size
        return {"height": h, "width": w, **({"num_frames": self.frames} if self.is_video else {})}

    @functools.cached_property
    def sample_shape(self) -> tuple[int, ...]:
        """What the denoiser sees, in the pipeline's latent layout: ``(C, H, W)``, or ``(C, F, H, W)`` for video
        (``F = (frames - 1) // temporal + 1`` latent frames, as the video pipelines compute it)."""
        h, w, frames = self._pixels()
        spatial, temporal = vae_factors(self.pipeline) if self.is_latent else (1, 1)
        spatial *= self.family.patch
        channels = int(self.model.config.in_channels) // (4 if self.family.packed else 1)
        if self.family.packed:  # packing needs an even latent grid (FluxPipeline.prepare_latents)
            lh, lw = 2 * (h // (spatial * 2)), 2 * (w // (spatial * 2))
        else:
            lh, lw = h // spatial, w // spatial
        if self.is_video:
            return channels, (frames - 1) // temporal + 1, lh, lw
        return channels, lh, lw

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the decoded images (video: of each frame)."""
        spatial, _ = vae_factors(self.pipeline) if self.is_latent else (1, 1)
        spatial *= self.family.patch
        return self.sample_shape[-2] * spatial, self.sample_shape[-1] * spatial

    @property
    def image_channels(self) -> int:
        """Channels of the decoded images: the VAE's image channels (3 where its config does not say, as Wan's and
        Qwen-Image's), else the denoiser's own."""
        if not self.is_latent:
            return self.sample_shape[0]
        return int(getattr(self.vae.config, "in_channels", None) or 3)

    @property
    def frames(self) -> int:
        """Frames of a decoded video sample (1 for images)."""
        if not self.is_video:
            return 1
        _, temporal = vae_factors(self.pipeline)
        return (self.sample_shape[1] - 1) * temporal + 1

    # -- conditions ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The teacher's own text encoders (its pipeline's ``encode_prompt``) → denoiser keyword arguments."""
        if not self.text_conditioned:
            raise InputError(f"{type(self.model).__name__} model from {self.source} takes no prompts; expected no "
                             "--prompt or --prompts-file, or a text-to-image model")
        encoders = self.text_encoders()
        device = next(encoders[0].parameters()).device if encoders else self.model.device
        cond = self.family.encode_prompts(self.pipeline, prompts, device, self.image_size)
        return _to_device(cond, self.model.device)

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ...)."""
        return [module for name, module in self.pipeline.components.items()
                if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)]

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU: a run encodes its prompts once (cached) before training, so they
        need not hold accelerator memory (T5-XXL alone is 9 GB in bf16); later encodings run on the CPU."""
        for encoder in self.text_encoders():
            encoder.to("cpu")

    def class_cond(self, labels: torch.Tensor) -> Cond:
        """Class labels (``0 .. num_classes - 1``) → denoiser keyword arguments."""
        if self.num_classes == 0:
            raise UsageError(f"class labels given, but {self.source} has no class embedding (num_class_embeds is "
                             "unset); expected no class labels")
        # a list is checked; a tensor may hold no values to check (`fastgen estimate`'s "meta" and fake tensors)
        bad = [] if isinstance(labels, torch.Tensor) else sorted({int(v) for v in labels
                                                                   if not 0 <= int(v) < self.num_classes})
        if bad:
            raise UsageError(f"class labels {bad} out of range: {self.source} has {self.num_classes} classes; "
                             f"expected labels 0 to {self.num_classes - 1}")
        return {"class_labels": torch.as_tensor(labels, dtype=torch.long).to(self.model.device)}

    def null_cond(self, n: int) -> Cond | None:
        """The unconditional branch for ``n`` samples, as the teacher's own pipeline builds it: the empty
        prompt's embedding, or zeros where the pipeline sets ``force_zeros_for_empty_prompt`` (SDXL; the
        diffusers LCM-SDXL distillation script does the same); ``None`` for an unconditional teacher."""
        if self.num_classes:
            raise ValueError(
                f"class-conditional teacher from {self.source} has no null class; expected a text-conditioned or "
                "unconditional teacher for classifier-free guidance"
            )
        if not self.text_conditioned:
            return None
        cond = self.encode_prompts([""] * n)
        if self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            added = cond["added_cond_kwargs"]
            cond = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
                    "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                          "time_ids": added["time_ids"]}}
        return cond

    # -- pixels and latents -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Denoiser space → images in [-1, 1] (identity for pixel teachers); video: ``(B, 3, F, H, W)``."""
        return decode_latents(self.vae, x) if self.is_latent else x

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → denoiser space (the VAE posterior mean, normalised as the pipeline does)."""
        return encode_images(self.vae, images) if self.is_latent else images


def _to_device(cond, device):
    """A condition (nested dicts of tensors) on ``device``."""
    if isinstance(cond, torch.Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {key: _to_device(value, device) for key, value in cond.items()}
    return cond


class DenoiserTeacher:
    """A bare denoiser (e.g. ``fastgen.analytic.GaussianMixtureDenoiser``) seen as a ``Teacher``: no pipeline,
    no encoders; samples of ``sample_shape`` (the denoiser's ``shape`` unless given), unconditional or
    class-conditional (``num_classes``; the analytic mixture's label ``-1`` is its unconditional branch)."""

    is_latent = False
    text_conditioned = False
    pipeline = None

    def __init__(self, denoiser: BaseDenoiser, sample_shape: tuple[int, ...] | None = None, num_classes: int = 0):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.source = type(denoiser).__name__
        self.num_classes = num_classes
        shape = sample_shape or getattr(denoiser, "shape", None)
        self.sample_shape = tuple(shape) if shape is not None else None

    __call__ = Teacher.__call__
    guided = Teacher.guided

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.denoiser, "model", self.denoiser)

    def class_cond(self, labels: torch.Tensor) -> Cond:
        return {"class_labels": torch.as_tensor(labels, dtype=torch.long)}

    def null_cond(self, n: int) -> Cond | None:
        return {"class_labels": torch.full((n,), -1, dtype=torch.long)} if self.num_classes else None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    encode = decode


def as_teacher(teacher) -> Teacher | DenoiserTeacher:
    """A ``Teacher`` as it is; a bare denoiser wrapped as a ``DenoiserTeacher``."""
    return DenoiserTeacher(teacher) if isinstance(teacher, BaseDenoiser) else teacher


def _read_index(folder: Path) -> dict[str, list]:
    """Check a pipeline folder before loading any weights; return its components ``{name: [library, class]}``."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise MissingPathError(
            f"folder {folder} has no model_index.json; expected a diffusers pipeline folder "
            "(what `pipeline.save_pretrained` writes)"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{index_file} is not valid JSON ({err}); expected a diffusers model index") from None
    if not isinstance(index, dict):
        raise InputError(f"{index_file} holds {type(index).__name__}, not a mapping; expected a diffusers model index")
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    custom = sorted(name for name, (library, _) in components.items() if library not in (None, *LIBRARIES))
    if custom or isinstance(index.get("_class_name"), list):
        raise InputError(
            f"{folder} names classes outside diffusers and transformers (components {custom}, pipeline "
            f"{index.get('_class_name')!r}) but is not a fastgen export (no fastgen_export.json); expected a "
            "diffusers pipeline folder or a folder written by `fastgen export`"
        )
    missing = sorted(name for name, (library, _) in components.items() if library is not None
                     and not (folder / name).is_dir())
    if missing:
        which = "that component" if len(missing) == 1 else "those components"
        raise MissingPathError(f"folder {folder} has no {', '.join(f'{name}/' for name in missing)} although its "
                               f"model_index.json names {which}; expected the complete folder "
                               "`pipeline.save_pretrained` writes (copy the missing folder back)")
    found = [c for c in DENOISER_COMPONENTS if c in components and components[c][0] is not None]
    if not found:
        raise InputError(
            f"teacher folder {folder} has no denoiser: components are {sorted(components)}, "
            f"expected one of {list(DENOISER_COMPONENTS)}"
        )
    model_class = components[found[0]][1]
    if model_class not in SUPPORTED_MODELS:
        raise InputError(
            f"teacher folder {folder}: denoiser class {model_class!r} is not supported; "
            f"expected one of {list(SUPPORTED_MODELS)}"
        )
    if "scheduler" not in components:
        raise InputError(f"teacher folder {folder} has no scheduler; expected a `scheduler` component")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():  # fail before loading weights on an unknown or unsupported schedule
        try:
            scheduler_config = json.loads(scheduler_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{scheduler_file} is not valid JSON ({err}); expected a diffusers scheduler "
                             "config") from None
        try:
            schedule_from_config(scheduler_config, components["scheduler"][1])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"teacher folder {folder}: {scheduler_file.name}: {err}") from err
    for name, entry in components.items():  # a truncated weights file names itself before diffusers loads it
        if entry[0] is not None and (folder / name).is_dir():
            for file in sorted((folder / name).glob("*.safetensors")):
                check_safetensors(file)
    return components


def _refuse_pickle(folder: Path, components: dict[str, list]) -> None:
    """Raise if a component's weights exist only as pickle files (loading those can run arbitrary code)."""
    for name, entry in components.items():
        sub = folder / name
        if entry[0] is None or not sub.is_dir():
            continue
        files = [f.name for f in sub.iterdir() if f.is_file()]
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled and not any(f.endswith(SAFE_SUFFIXES) for f in files):
            raise UnsafeCheckpointError(
                f"teacher folder {folder}: component {name!r} has pickled weights {pickled} and no .safetensors "
                "file; expected safetensors weights, or pass trust_pickle=True (--trust-pickle) if you trust "
                "the source, since unpickling can run arbitrary code"
            )


@contextlib.contextmanager
def quiet_loading():
    """Within: no "Loading pipeline components..." (diffusers) or "Loading weights" (transformers) progress bar,
    which fastgen's loads of a local folder would print on every command and which tell the user nothing. Each
    library's switch is set back to what it was after, so a caller's own loads keep their bars; warnings and
    errors still show."""
    from diffusers.utils import logging as diffusers_logging

    switches = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging

        switches.append(transformers_logging)
    except ImportError:  # diffusers without transformers: pixel pipelines only
        pass
    before = [module.is_progress_bar_enabled() for module in switches]
    for module in switches:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in zip(switches, before):
            if enabled:
                module.enable_progress_bar()


def _local_owner(name: str) -> bool:
    """Whether ``name`` has the shape ``owner/name`` with ``owner`` a local folder (``teachers/sd3`` beside a folder
    ``teachers``: a missing folder, not a hub repository)."""
    return name.count("/") == 1 and Path(name.split("/")[0]).expanduser().is_dir()


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (no local path) reads as a hub id ``owner/name``: one slash, no path's start (``.``, ``/``,
    ``~``), and no local folder ``owner`` (``_local_owner``)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not _local_owner(name)


def load_teacher(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trust_pickle: bool = False, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None) -> Teacher:
    """Load a diffusers pipeline folder (or hub id, when online; ``"toy"``: the bundled toy teacher,
    ``"toy-t2i"``: the bundled text-conditioned toy teacher) as a ``Teacher``.

    The folder is checked before any weights load (model index, denoiser class, scheduler family and
    prediction type). Weights must be safetensors: a component with only pickled files (``.bin``…, which
    can run code on load) raises ``UnsafeCheckpointError`` unless ``trust_pickle=True``. An exported student
    (a folder with ``fastgen_export.json``, full or LoRA) loads through ``fastgen.pipelines.load``: checked
    metadata, fastgen's own classes, no code from the folder, safetensors only.
    """
    from diffusers import DiffusionPipeline

    from fastgen.pipelines.load import is_export, load_pipeline, read_export

    if str(path) in ("toy", "toy-t2i"):
        from fastgen.toy import toy_t2i_path, toy_teacher_path

        path = toy_teacher_path() if str(path) == "toy" else toy_t2i_path()
    folder = Path(path).expanduser()
    absent = {}
    if is_export(folder):
        pipe = load_pipeline(folder, dtype=dtype)
        trained = read_export(folder).get("size") or {}
        return _as_teacher(pipe, device, str(folder), height or trained.get("height"), width or trained.get("width"),
                           num_frames or trained.get("num_frames"))
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"teacher path {folder} is a file; expected a diffusers pipeline folder")
        components = _read_index(folder)
        if not trust_pickle:
            _refuse_pickle(folder, components)
        # components saved as [null, null] (e.g. SD3 without T5) must be passed as None to load again
        absent = {name: None for name, entry in components.items() if entry[0] is None}
        source = str(folder)
    elif is_hub_id(str(path)):
        source = str(path)  # a hub id: diffusers resolves it (and fails plainly when offline)
    else:
        why = f" (and {str(path).split('/')[0]}/ is a local folder, so it is not read as a hub id)" \
            if _local_owner(str(path)) else ""
        raise MissingPathError(f"teacher path {path} does not exist{why}; expected a diffusers pipeline folder or "
                               "hub id")

    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype,
                                                     use_safetensors=None if trust_pickle else True, **absent)
    except (OSError, EOFError, pickle.UnpicklingError) as err:  # what diffusers raises for missing or broken files
        reason = " ".join(str(err).split())[:300]
        raise InputError(f"teacher {source} cannot be loaded: {reason}") from err
    return _as_teacher(pipe, device, source, height, width, num_frames)


def _as_teacher(pipe, device, source: str, height=None, width=None, num_frames=None) -> Teacher:
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    name = next(c for c in DENOISER_COMPONENTS if getattr(pipe, c, None) is not None)
    model = getattr(pipe, name)
    model.requires_grad_(False).eval()
    schedule = schedule_from_config(pipe.scheduler.config, type(pipe.scheduler).__name__)
    denoiser = Denoiser(model, schedule)
    second, ratio = getattr(pipe, "transformer_2", None), pipe.config.get("boundary_ratio")
    if second is not None and ratio is not None:  # Wan 2.2: the pipeline routes t >= ratio T to `transformer`
        second.requires_grad_(False).eval()
        boundary = ratio * schedule.num_train_timesteps
        # ExpertsDenoiser gives t > b to the first expert: b just below the pipeline's boundary, in float32
        below = float(torch.nextafter(torch.tensor(boundary, dtype=torch.float32), torch.tensor(-math.inf)))
        denoiser = ExpertsDenoiser([denoiser, Denoiser(second, schedule)], [below])
    teacher = Teacher(pipeline=pipe, denoiser=denoiser, schedule=schedule, source=source,
                      height=height, width=width, num_frames=num_frames)
    _check_size(teacher)
    return teacher


def _check_size(teacher: Teacher) -> None:
    """Refuse a sample size the teacher's latents cannot have, naming the field."""
    spatial, temporal = vae_factors(teacher.pipeline) if teacher.is_latent else (1, 1)
    reasons = [f"its VAE's factor {spatial}"] if spatial > 1 else []
    per_latent = 2 if teacher.family.packed or teacher.family.patch > 1 else 1
    if per_latent > 1:
        reasons.append("2 for packed latents")
    levels = len(getattr(teacher.model.config, "down_block_types", None) or ()) \
        if teacher.model_class == "UNet2DModel" else 0
    if levels > 1:  # it halves its input at each level but the last (UNet2DConditionModel forwards odd sizes)
        per_latent = math.lcm(per_latent, 2 ** (levels - 1))
        reasons.append(f"{2 ** (levels - 1)} for the UNet's {levels - 1} downsampling{'s' * (levels > 2)}")
    step = spatial * per_latent
    for name, value in (("height", teacher.height), ("width", teacher.width)):
        if value is not None and (value < step or value % step):
            raise InputError(f"{name} is {value}; expected a positive multiple of {step} for {teacher.model_class} "
                             f"from {teacher.source} ({', '.join(reasons)})")
    if teacher.num_frames is not None:
        if not teacher.is_video:
            raise InputError(f"num_frames is {teacher.num_frames}; {teacher.model_class} from {teacher.source} makes "
                             "images: expected no num_frames")
        if teacher.num_frames < 1 or (teacher.num_frames - 1) % temporal:
            raise InputError(f"num_frames is {teacher.num_frames}; expected 1 + a multiple of {temporal} (the VAE's "
                             "temporal factor)")
