"""Load any supported diffusers pipeline as a teacher: denoiser, noise schedule, condition encoders, VAE.

Families: ``UNet2DModel`` pixel teachers (unconditional or class-conditional, e.g. a ``DDPMPipeline``
folder), ``UNet2DConditionModel`` latent text-to-image teachers (SD1.x/2.x, and SDXL with its added
text/time conditions) and ``SD3Transformer2DModel`` rectified-flow teachers.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fastgen.checkpoint import UnsafeCheckpointError
from fastgen.denoiser import BaseDenoiser, Cond, Denoiser
from fastgen.errors import InputError, MissingPathError
from fastgen.integrity import PICKLE_SUFFIXES, SAFE_SUFFIXES, check_safetensors
from fastgen.schedules import NoiseSchedule, schedule_from_config

DENOISER_COMPONENTS = ("unet", "transformer")
LIBRARIES = ("diffusers", "transformers")
SUPPORTED_MODELS = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel")


@dataclass
class Teacher:
    """A loaded teacher. ``denoiser(x_t, t, cond) -> x0``; ``denoiser.guided(...)`` for CFG."""

    pipeline: object
    denoiser: Denoiser
    schedule: NoiseSchedule
    source: str

    def __call__(self, x_t: torch.Tensor, t, cond: Cond | None = None, **kwargs) -> torch.Tensor:
        """The teacher's x0-prediction ``denoiser(x_t, t, cond)`` (``features=`` passes through)."""
        return self.denoiser(x_t, t, cond, **kwargs)

    def guided(self, x_t: torch.Tensor, t, cond: Cond | None, uncond: Cond | None, scale) -> torch.Tensor:
        """Classifier-free guided x0 (``BaseDenoiser.guided``, Ho–Salimans form)."""
        return self.denoiser.guided(x_t, t, cond, uncond, scale)

    @property
    def model(self) -> torch.nn.Module:
        return self.denoiser.model

    @property
    def model_class(self) -> str:
        """The denoiser's diffusers class name; an exported student of experts (``TimestepExperts``) gives its
        experts' class."""
        return getattr(self.model.config, "expert_class", None) or type(self.model).__name__

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
    def text_conditioned(self) -> bool:
        return self.model_class != "UNet2DModel"

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model.config, "num_class_embeds", None) or 0)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the denoiser sees (latents for latent teachers)."""
        cfg = self.model.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.in_channels), int(h), int(w)

    @property
    def image_size(self) -> tuple[int, int]:
        _, h, w = self.sample_shape
        if not self.is_latent:
            return h, w
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return h * factor, w * factor

    # -- conditions ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The teacher's own text encoders (``pipeline.encode_prompt``) → denoiser keyword arguments."""
        if not self.text_conditioned:
            raise InputError(f"{type(self.model).__name__} model from {self.source} takes no prompts; expected no "
                             "--prompt or --prompts-file, or a text-to-image model")
        prompts = list(prompts)
        device = self.model.device
        if self.model_class == "SD3Transformer2DModel":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if getattr(self.model.config, "addition_embed_type", None) == "text_time":  # SDXL
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            h, w = self.image_size
            projection_dim = self.pipeline.text_encoder_2.config.projection_dim
            time_ids = self.pipeline._get_add_time_ids(
                (h, w), (0, 0), (h, w), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)
            time_ids = time_ids.to(device).repeat(len(prompts), 1)
            return {"encoder_hidden_states": embeds,
                    "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        embeds, _ = self.pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def class_cond(self, labels: torch.Tensor) -> Cond:
        """Class labels (``0 .. num_classes - 1``) → denoiser keyword arguments."""
        if self.num_classes == 0:
            raise ValueError(f"teacher from {self.source} has no class embedding (num_class_embeds is unset)")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.model.device)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class labels {labels.tolist()} out of range; expected 0..{self.num_classes - 1}")
        return {"class_labels": labels}

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
        """Denoiser space → images in [-1, 1] (identity for pixel teachers)."""
        if not self.is_latent:
            return x
        cfg = self.vae.config
        latents = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → denoiser space (the VAE posterior mean, scaled as the pipeline does)."""
        if not self.is_latent:
            return images
        cfg = self.vae.config
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean.float()
        return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


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
            f"teacher folder {folder} has no model_index.json; expected a diffusers pipeline folder "
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


def load_teacher(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trust_pickle: bool = False) -> Teacher:
    """Load a diffusers pipeline folder (or hub id, when online; ``"toy"``: the bundled toy teacher,
    ``"toy-t2i"``: the bundled text-conditioned toy teacher) as a ``Teacher``.

    The folder is checked before any weights load (model index, denoiser class, scheduler family and
    prediction type). Weights must be safetensors: a component with only pickled files (``.bin``…, which
    can run code on load) raises ``UnsafeCheckpointError`` unless ``trust_pickle=True``. An exported student
    (a folder with ``fastgen_export.json``, full or LoRA) loads through ``fastgen.pipelines.load``: checked
    metadata, fastgen's own classes, no code from the folder, safetensors only.
    """
    from diffusers import DiffusionPipeline

    from fastgen.pipelines.load import is_export, load_pipeline

    if str(path) in ("toy", "toy-t2i"):
        from fastgen.toy import toy_t2i_path, toy_teacher_path

        path = toy_teacher_path() if str(path) == "toy" else toy_t2i_path()
    folder = Path(path).expanduser()
    absent = {}
    if is_export(folder):
        pipe = load_pipeline(folder, dtype=dtype)
        return _as_teacher(pipe, device, str(folder))
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"teacher path {folder} is a file; expected a diffusers pipeline folder")
        components = _read_index(folder)
        if not trust_pickle:
            _refuse_pickle(folder, components)
        # components saved as [null, null] (e.g. SD3 without T5) must be passed as None to load again
        absent = {name: None for name, entry in components.items() if entry[0] is None}
        source = str(folder)
    elif str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        source = str(path)  # a hub id: diffusers resolves it (and fails plainly when offline)
    else:
        raise MissingPathError(f"teacher path {path} does not exist; expected a diffusers pipeline folder or hub id")

    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype,
                                                     use_safetensors=None if trust_pickle else True, **absent)
    except (OSError, EOFError, pickle.UnpicklingError) as err:  # what diffusers raises for missing or broken files
        reason = " ".join(str(err).split())[:300]
        raise InputError(f"teacher {source} cannot be loaded: {reason}") from err
    return _as_teacher(pipe, device, source)


def _as_teacher(pipe, device, source: str) -> Teacher:
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    name = next(c for c in DENOISER_COMPONENTS if getattr(pipe, c, None) is not None)
    model = getattr(pipe, name)
    model.requires_grad_(False).eval()
    schedule = schedule_from_config(pipe.scheduler.config, type(pipe.scheduler).__name__)
    return Teacher(pipeline=pipe, denoiser=Denoiser(model, schedule), schedule=schedule, source=source)
