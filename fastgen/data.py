"""What the trainer feeds an objective: clean samples, conditions and the unconditional branch.

``build_data(spec, teacher, ...)`` turns one of these specs into a ``DataSource``:

- a folder of images (PNG/JPEG/WEBP, searched recursively) → ``x0`` in the denoiser's space: pixels in
  [-1, 1], or latents for latent teachers (encoded once with the teacher's VAE and cached);
- captioned images, read with Hugging Face ``datasets`` (as diffusers' training scripts read them): a
  folder with a ``metadata.jsonl`` (or ``.csv``) naming each ``file_name`` and its caption (the
  ``imagefolder`` convention; for a text-conditioned teacher), webdataset shards (``.tar``), parquet
  files (a file or a glob such as ``shards/*.tar``), or ``hf:owner/name``, a hub dataset (online only)
  → ``x0`` as above and, as each sample's condition, its own caption embedded with the teacher's text
  encoders; both encoded once and cached;
- a ``.txt`` prompts file (one prompt per line) → text conditions, encoded once with the teacher's own
  text encoders and cached, so that training holds no text encoder; data-free (``x0 = None``);
- ``"teacher"`` → samples of the teacher's own DDIM ODE with the noise they started from (ODE pairs
  ``noise → x0``, e.g. for DMD's regression loss), generated once and cached; conditioned on random
  class labels for a class-conditional teacher, on the prompts of ``prompts`` (a prompts file) for a text
  teacher, guided with the Ho–Salimans scale ``teacher_guidance``;
- ``"toy"`` → images of the procedural toy world (``fastgen.toy.ToyShapes``, ``TOY_DATA_SIZE`` of them),
  the training data of the bundled toy teacher;
- ``None`` → data-free: on the prompts of ``prompts`` when given (as a ``.txt`` spec), random class
  labels for a class-conditional teacher, or nothing.

Conditions follow the teacher: class-conditional teachers get ``{"class_labels": ...}`` (from sub-folders
named by class index for image folders, otherwise drawn at random) and ``uncond = None``; text-conditioned
teachers get ``uncond = teacher.null_cond`` and, without prompts, ``cond = uncond`` (unconditional
training); unconditional teachers get ``None`` for both.

Batch ``k`` of ``DataSource.batches()`` is a pure function of ``(seed, k)``: the set is read as an endless
concatenation of epochs, epoch ``e`` in the order of a ``randperm`` seeded by ``(seed, e)``, and batch ``k``
is positions ``[k B, (k + 1) B)`` of that stream (a batch may straddle two epochs). So a run that has
consumed ``k`` batches resumes exactly with ``batches(start_index=k)``.

Caches are safetensors files in ``cache_dir`` whose names hash what they depend on (the inputs and a
fingerprint of the teacher: its source, dtype and the sizes and mtimes of its files); each is written to
a temporary file and renamed into place, so none is ever half-written.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastgen.atomic import atomic_path
from fastgen.denoiser import Cond, cat_cond, slice_cond
from fastgen.errors import InputError, MissingPathError, UsageError
from fastgen.samplers import Guidance, sample_ddim
from fastgen.teacher import Teacher

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
GRAYSCALE_MODES = ("1", "L", "LA")
PROMPT_CHUNK = 64
"""Prompts encoded per call of the text encoders."""
CAPTION_COLUMNS = ("text", "caption", "txt")
"""Caption columns tried in order when none is named: ``imagefolder``'s convention, a common alternative
and webdataset's ``.txt`` members."""
CAPTIONED_BUILDERS = {".tar": "webdataset", ".parquet": "parquet"}
"""``datasets`` builders of captioned files by suffix."""
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
"""A folder holding one of these is an ``imagefolder`` of captioned images."""
HUB_PREFIX = "hf:"

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One batch for an objective; every tensor has the batch as its first dimension."""

    x0: torch.Tensor | None
    """Clean samples in the denoiser's space (latents for latent teachers); ``None`` when data-free."""
    cond: Cond | None
    """The condition of each sample (keyword arguments of the denoiser), or ``None``."""
    uncond: Cond | None
    """The unconditional branch for the same batch size (empty prompt), or ``None``."""
    noise: torch.Tensor | None = None
    """For teacher samples: the noise each ``x0`` was generated from by the teacher's ODE."""
    size: int = 0
    """Samples in the batch (the only record of it in a data-free unconditional batch)."""

    def to(self, device) -> Batch:
        """A copy with every tensor (recursively through nested conditions) on ``device``."""
        return Batch(*(_to(getattr(self, f.name), device) for f in fields(self)))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to(v, device) for key, v in value.items()}
    return value


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed for the stream named by ``parts`` under ``seed`` (stable across processes)."""
    text = ":".join(str(p) for p in ("fastgen-data", seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, size: int, epoch: int) -> torch.Tensor:
    """The order of the ``size`` samples in ``epoch``."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


def _num_rows(cond: Cond) -> int:
    first = next(iter(cond.values()))
    return _num_rows(first) if isinstance(first, Mapping) else len(first)


class DataSource:
    """An endless, seeded stream of ``Batch``es over a fixed set of samples, or data-free."""

    def __init__(self, batch_size: int, seed: int, x0: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 cond: Cond | None = None, uncond: Cond | None = None, random_classes: int = 0,
                 cond_index: torch.Tensor | None = None):
        """``x0``, ``noise`` and ``cond`` hold one row per sample of the set, or ``cond_index`` gives the row of
        ``cond`` of each sample (samples sharing a caption or prompt share a row); ``uncond`` holds one row,
        repeated to the batch size (and used as ``cond`` when there is none); ``random_classes > 0`` draws
        random class labels for each batch (data-free class-conditional)."""
        self.batch_size, self.seed = batch_size, seed
        self.x0, self.noise, self.cond, self.uncond = x0, noise, cond, uncond
        self.random_classes, self.cond_index = random_classes, cond_index
        if x0 is not None:
            self.size = len(x0)
        elif cond_index is not None:
            self.size = len(cond_index)
        else:
            self.size = _num_rows(cond) if cond is not None else 0

    def __len__(self) -> int:
        """Samples in one epoch (prompts for a prompts file); 0 when there is no underlying set."""
        return self.size

    @property
    def needs_data(self) -> bool:
        """Whether batches carry clean samples ``x0``."""
        return self.x0 is not None

    def indices(self, k: int) -> torch.Tensor:
        """The samples in batch ``k``: positions ``[k B, (k + 1) B)`` of the concatenated epoch orders."""
        positions = torch.arange(k * self.batch_size, (k + 1) * self.batch_size)
        epochs, offsets = positions // self.size, positions % self.size
        index = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            index[mask] = epoch_order(self.seed, self.size, epoch)[offsets[mask]]
        return index

    def batch(self, k: int) -> Batch:
        """Batch ``k`` of the stream, a pure function of ``(seed, k)``."""
        uncond = slice_cond(self.uncond, torch.zeros(self.batch_size, dtype=torch.long))
        if self.random_classes:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "labels", k))
            labels = torch.randint(self.random_classes, (self.batch_size,), generator=generator)
            return Batch(None, {"class_labels": labels}, uncond, size=self.batch_size)
        if not self.size:
            return Batch(None, uncond, uncond, size=self.batch_size)
        index = self.indices(k)
        if self.cond is None:
            cond = uncond
        else:
            cond = slice_cond(self.cond, index if self.cond_index is None else self.cond_index[index])
        return Batch(
            self.x0[index] if self.x0 is not None else None,
            cond,
            uncond,
            self.noise[index] if self.noise is not None else None,
            self.batch_size,
        )

    def batches(self, start_index: int = 0) -> Iterator[Batch]:
        """Batches ``start_index, start_index + 1, ...`` forever; ``start_index`` = batches already consumed."""
        for k in itertools.count(start_index):
            yield self.batch(k)


def build_data(spec: str | os.PathLike | None, teacher: Teacher, batch_size: int, seed: int, cache_dir: str | Path,
               num_teacher_samples: int = 1024, teacher_steps: int = 32, class_labels: bool = False,
               resize: bool = False, prompts: str | os.PathLike | None = None, teacher_guidance: float = 1.0,
               caption_column: str | None = None) -> DataSource:
    """The ``DataSource`` for ``spec`` (module docstring): an image folder, captioned images (a folder with
    ``metadata.jsonl``, ``.tar``/``.parquet`` files or a glob of them, ``hf:owner/name``), a ``.txt``
    prompts file, ``"teacher"``, ``"toy"`` or ``None``.

    The string ``"teacher"`` always means teacher samples (write ``./teacher`` for a folder of that name).
    ``class_labels`` must be set exactly for class-conditional teachers. ``resize`` center-crops and
    resizes images of another size instead of refusing them. ``num_teacher_samples``, ``teacher_steps`` and
    ``teacher_guidance`` (Ho–Salimans CFG scale, 1 = none) apply to ``"teacher"``; ``prompts`` (a prompts
    file) to ``"teacher"`` and ``None``; ``caption_column`` (default: the first of ``CAPTION_COLUMNS``
    present) to captioned images.
    """
    for name, value in (("batch_size", batch_size), ("num_teacher_samples", num_teacher_samples),
                        ("teacher_steps", teacher_steps)):
        if value < 1:
            raise UsageError(f"{name} = {value}; expected a positive integer")
    check_data(spec, teacher, class_labels, prompts, teacher_guidance)
    cache_dir = Path(cache_dir)
    uncond = null_cond(teacher, cache_dir)
    prompt_file = None if prompts is None else Path(prompts).expanduser()
    if spec is None:
        if prompt_file is not None:
            return DataSource(batch_size, seed, cond=prompt_conds(prompt_file, teacher, cache_dir), uncond=uncond)
        return DataSource(batch_size, seed, uncond=uncond, random_classes=teacher.num_classes)
    if spec == "toy":
        return DataSource(batch_size, seed, x0=toy_data(teacher), uncond=uncond)
    if spec == "teacher":
        prompt_cond = None if prompt_file is None else prompt_conds(prompt_file, teacher, cache_dir)
        pairs = teacher_samples(teacher, cache_dir, num_teacher_samples, teacher_steps, seed, uncond, batch_size,
                                prompt_cond, teacher_guidance)
        if prompt_cond is not None:
            return DataSource(batch_size, seed, x0=pairs["x0"], noise=pairs["noise"], cond=prompt_cond,
                              cond_index=pairs["prompt_index"], uncond=uncond)
        labels = pairs.get("class_labels")
        return DataSource(batch_size, seed, x0=pairs["x0"], noise=pairs["noise"],
                          cond=None if labels is None else {"class_labels": labels}, uncond=uncond)
    captioned = captioned_source(spec, teacher)
    if captioned is not None:
        x0, cond, index = captioned_data(*captioned, teacher, cache_dir, batch_size, resize, caption_column)
        return DataSource(batch_size, seed, x0=x0, cond=cond, cond_index=index, uncond=uncond)
    path = Path(spec).expanduser()
    if path.is_dir():
        x0, labels = image_data(path, teacher, cache_dir, batch_size, resize)
        return DataSource(batch_size, seed, x0=x0, cond=None if labels is None else {"class_labels": labels},
                          uncond=uncond)
    return DataSource(batch_size, seed, cond=prompt_conds(path, teacher, cache_dir), uncond=uncond)


def check_data(spec: str | os.PathLike | None, teacher: Teacher, class_labels: bool = False,
               prompts: str | os.PathLike | None = None, teacher_guidance: float = 1.0) -> bool:
    """Check the arguments of :func:`build_data` against ``teacher``, listing files but reading no image and
    writing no cache (the trainer calls it before it creates the run folder). Returns whether the batches
    will carry clean samples ``x0``."""
    if class_labels and not teacher.num_classes:
        raise InputError(f"class_labels=True, but the teacher from {teacher.source} has no class embedding "
                         "(num_class_embeds is unset); expected class_labels=False")
    if teacher.num_classes and not class_labels:
        raise InputError(f"the teacher from {teacher.source} is class-conditional ({teacher.num_classes} classes); "
                         "expected class_labels=True")
    if prompts is not None and spec not in (None, "teacher"):
        raise UsageError(f"prompts = {prompts} applies to data 'teacher' or None, but data is {spec}; expected "
                         "no prompts file (captions come with captioned data, prompts files can be the data)")
    if teacher_guidance != 1.0 and (spec != "teacher" or not teacher.text_conditioned or teacher.num_classes):
        raise UsageError(f"teacher_sample_guidance = {teacher_guidance} guides teacher samples of a "
                         f"text-conditioned teacher; data is {spec} and the teacher from {teacher.source} is a "
                         f"{type(teacher.model).__name__}; expected 1")
    if prompts is not None:
        _check_prompts(Path(prompts).expanduser(), teacher)
    if spec is None:
        return False
    if spec in ("toy", "teacher") or captioned_source(spec, teacher) is not None:
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        find_images(path)
        return True
    if path.is_file() and path.suffix.lower() == ".txt":
        _check_prompts(path, teacher)
        return False
    expected = ("an image folder, captioned images (.tar, .parquet, a folder with metadata.jsonl, hf:owner/name), "
                "a .txt prompts file, 'teacher', 'toy' or None")
    if not path.exists():
        raise MissingPathError(f"data {spec} does not exist; expected {expected}")
    raise InputError(f"data {spec} is a {path.suffix or 'suffix-less'} file; expected {expected}")


TOY_DATA_SIZE = 8192


def toy_data(teacher: Teacher) -> torch.Tensor:
    """``TOY_DATA_SIZE`` toy images for a 16x16 RGB pixel teacher (seed 0, as the toy teacher was trained)."""
    from fastgen.toy import TOY_IMAGE_SIZE, toy_images

    expected = (3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE)
    if teacher.is_latent or teacher.sample_shape != expected:
        raise InputError(f"data 'toy' gives {expected} pixel images; the teacher from {teacher.source} takes "
                         f"{teacher.sample_shape}{' latents' if teacher.is_latent else ''}")
    return toy_images(TOY_DATA_SIZE)


# -- caches -----------------------------------------------------------------------------------------------
def digest(*parts) -> str:
    """A short hex hash of JSON-able ``parts`` (names a cache file)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def teacher_fingerprint(teacher: Teacher) -> str:
    """Identifies the teacher's weights: its source and dtype, and for a folder each file's size and mtime."""
    parts = [teacher.source, str(teacher.denoiser.dtype)]
    folder = Path(teacher.source)
    if folder.is_dir():
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = file.stat()
            parts.append([file.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return digest(*parts)


def flatten_cond(cond: Cond, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested condition → flat ``{dotted.key: tensor}`` (on the CPU) for safetensors."""
    flat = {}
    for key, value in cond.items():
        if isinstance(value, Mapping):
            flat.update(flatten_cond(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[prefix + key] = value.detach().cpu()
        else:
            raise TypeError(f"condition {prefix + key!r} is a {type(value).__name__}; expected tensors to cache")
    return flat


def unflatten_cond(flat: Mapping[str, torch.Tensor]) -> dict:
    """Inverse of ``flatten_cond``."""
    cond: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = cond
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return cond


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (``fastgen.atomic``)."""
    with atomic_path(path) as tmp:
        save_file({key: value.contiguous() for key, value in tensors.items()}, tmp, metadata)


def null_cond(teacher: Teacher, cache_dir: Path) -> Cond | None:
    """One row of the teacher's unconditional branch (cached for text teachers); ``None`` for the others."""
    if teacher.num_classes or not teacher.text_conditioned:
        return None
    path = cache_dir / f"uncond-{digest(teacher_fingerprint(teacher))}.safetensors"
    if not path.is_file():
        save_atomic(flatten_cond(teacher.null_cond(1)), path)
    return unflatten_cond(load_file(path))


# -- prompts ----------------------------------------------------------------------------------------------
TOY_PROMPTS = "toy"
"""The prompts spec that names the toy world's own prompts (every shape x colour), not a file."""


def read_prompts(file: str | os.PathLike) -> list[str]:
    """Non-blank lines of ``file``, stripped; for ``TOY_PROMPTS`` the 24 toy prompts
    (``fastgen.eval.toy_prompts.toy_eval_prompts``), the prompts of the text toy teacher's presets."""
    if str(file) == TOY_PROMPTS:
        from fastgen.eval.toy_prompts import toy_eval_prompts

        return toy_eval_prompts()
    file = Path(file)
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {file} is empty; expected one prompt per line")
    return prompts


def _check_prompts(file: Path, teacher: Teacher) -> list[str]:
    """The prompts of ``file`` (or ``TOY_PROMPTS``), checked to exist and to suit ``teacher``."""
    if not teacher.text_conditioned:
        raise InputError(f"prompts file {file} given to the teacher from {teacher.source}, a "
                         f"{type(teacher.model).__name__} that takes no prompts; expected a text-conditioned "
                         "teacher, or data that is an image folder, 'teacher' or None")
    if str(file) != TOY_PROMPTS and not file.is_file():
        raise MissingPathError(f"prompts file {file} does not exist; expected a text file, one prompt per line "
                               f"or '{TOY_PROMPTS}' (the toy world's prompts)")
    return read_prompts(file)


def prompt_conds(file: Path, teacher: Teacher, cache_dir: Path) -> Cond:
    """The teacher's conditions for every prompt in ``file`` (one row each), encoded once and cached."""
    prompts = _check_prompts(file, teacher)
    path = cache_dir / f"prompts-{digest(teacher_fingerprint(teacher), prompts)}.safetensors"
    if not path.is_file():
        logger.info("encoding %d prompts from %s", len(prompts), file)
        save_atomic(encode_texts(teacher, prompts), path)
    return unflatten_cond(load_file(path))


def encode_texts(teacher: Teacher, texts: list[str]) -> dict[str, torch.Tensor]:
    """The teacher's conditions of ``texts`` (one row each, flattened for safetensors), ``PROMPT_CHUNK`` at a time."""
    cond = None
    for start in range(0, len(texts), PROMPT_CHUNK):
        chunk = flatten_cond(teacher.encode_prompts(texts[start:start + PROMPT_CHUNK]))
        cond = chunk if cond is None else cat_cond(cond, chunk)
    return cond


# -- images -----------------------------------------------------------------------------------------------
def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), in a stable order."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not files:
        raise InputError(f"image folder {folder} holds no images; expected files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)} (searched recursively)")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_image(file: Path, size: tuple[int, int], channels: int, resize: bool = False) -> torch.Tensor:
    """One image file as a ``(channels, H, W)`` tensor in [-1, 1] (``image_tensor``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {file}: {err}") from None
    return image_tensor(image, size, channels, resize, f"image {file}")


def image_tensor(image, size: tuple[int, int], channels: int, resize: bool = False, name: str = "image"):
    """A PIL image as a ``(channels, H, W)`` tensor in [-1, 1] for ``size = (H, W)``; grayscale, palette and
    alpha images become RGB for a 3-channel teacher; a 1-channel teacher takes grayscale images only.
    ``name`` says which image in errors."""
    from PIL import Image, ImageOps

    if channels == 3:
        image = image.convert("RGB")
    elif channels == 1 and image.mode in GRAYSCALE_MODES:
        image = image.convert("L")
    else:
        raise InputError(f"{name} has mode {image.mode} ({len(image.getbands())} channels); the teacher "
                         f"expects {channels}-channel images")
    height, width = size
    if image.size != (width, height):
        if not resize:
            raise InputError(f"{name} is {image.width}x{image.height} (width x height); the teacher expects "
                             f"{width}x{height}; resize the images or pass resize=True to center-crop and resize")
        image = ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).reshape(height, width, channels)
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def folder_labels(folder: Path, files: list[Path], num_classes: int) -> torch.Tensor:
    """Class labels from the sub-folder each image sits in, named by class index (``folder/3/x.png`` → 3)."""
    labels = []
    for file in files:
        parts = file.relative_to(folder).parts
        name = parts[0] if len(parts) > 1 else ""
        if not (name.isdigit() and int(name) < num_classes):
            raise InputError(f"image {file} is not in a class sub-folder (found {name or 'none'!r}); a "
                             f"class-conditional teacher ({num_classes} classes) expects images in sub-folders "
                             f"named by class index 0..{num_classes - 1}")
        labels.append(int(name))
    return torch.tensor(labels, dtype=torch.long)


def image_data(folder: Path, teacher: Teacher, cache_dir: Path, batch_size: int,
               resize: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x0, class labels or None)`` for the images under ``folder``; latents are cached by a hash of the
    file list and mtimes, the teacher and ``resize``."""
    files = find_images(folder)
    labels = folder_labels(folder, files, teacher.num_classes) if teacher.num_classes else None
    if teacher.is_latent:
        channels = teacher.vae.config.in_channels
        listing = [[f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        path = cache_dir / f"images-{digest(teacher_fingerprint(teacher), resize, listing)}.safetensors"
        if path.is_file():
            return load_file(path)["x0"], labels
    else:
        channels = teacher.sample_shape[0]
    device = teacher.model.device
    chunks = []
    for start in range(0, len(files), batch_size):
        images = torch.stack([load_image(f, teacher.image_size, channels, resize)
                              for f in files[start:start + batch_size]])
        chunks.append(teacher.encode(images.to(device)).float().cpu() if teacher.is_latent else images)
    x0 = torch.cat(chunks)
    if teacher.is_latent:
        save_atomic({"x0": x0}, path)
    return x0, labels


# -- captioned images -------------------------------------------------------------------------------------
def captioned_source(spec: str | os.PathLike, teacher: Teacher) -> tuple[str, str, dict, list | None] | None:
    """``(spec, datasets builder, load_dataset arguments, cache identity)`` when ``spec`` is captioned images,
    else ``None``. The identity (file names, sizes and mtimes) names the cache before anything is read;
    ``None`` for a hub dataset, whose identity is its ``datasets`` fingerprint."""
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        found = ("hub", "", {"path": text[len(HUB_PREFIX):]}, None)
    elif any(char in text for char in "*?["):  # a glob of shards
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text)))
        suffixes = {f.suffix.lower() for f in files}
        if not files or len(suffixes) > 1 or not suffixes <= set(CAPTIONED_BUILDERS):
            raise InputError(f"data {spec} matches {len(files)} files with suffixes {sorted(suffixes)}; expected "
                             f"files of one of the suffixes {sorted(CAPTIONED_BUILDERS)}")
        found = (text, CAPTIONED_BUILDERS[suffixes.pop()], {"data_files": [str(f) for f in files]}, _listing(files))
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() in CAPTIONED_BUILDERS:
            found = (text, CAPTIONED_BUILDERS[path.suffix.lower()], {"data_files": [str(path)]}, _listing([path]))
        elif (path.is_dir() and teacher.text_conditioned
              and any((path / name).is_file() for name in METADATA_FILES)):
            files = [p for p in path.rglob("*") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            found = (text, "imagefolder", {"data_dir": str(path)}, _listing(files, path))
        else:
            return None
    if not teacher.text_conditioned:
        raise InputError(f"captioned data {spec} given to the teacher from {teacher.source}, a "
                         f"{type(teacher.model).__name__} that takes no prompts; expected a text-conditioned "
                         "teacher, or an image folder")
    return found


def _listing(files: list[Path], root: Path | None = None) -> list:
    return sorted([f.relative_to(root).as_posix() if root else str(f.resolve()), f.stat().st_size,
                   f.stat().st_mtime_ns] for f in files)


def load_captioned(builder: str, arguments: dict, cache_dir: Path):
    """The ``train`` split through ``datasets.load_dataset`` (its Arrow files kept under ``cache_dir``)."""
    import datasets

    if builder == "hub":
        return datasets.load_dataset(**arguments, split="train", cache_dir=str(cache_dir / "datasets"))
    return datasets.load_dataset(builder, **arguments, split="train", cache_dir=str(cache_dir / "datasets"))


def captioned_columns(dataset, spec, caption_column: str | None) -> tuple[str, str]:
    """``(image column, caption column)`` of a captioned dataset: the first column of ``datasets.Image``
    type, and ``caption_column`` or else the first of ``CAPTION_COLUMNS`` present."""
    import datasets

    columns = list(dataset.features)
    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if not images:
        raise InputError(f"captioned data {spec} has no image column: its columns are {columns}; expected one "
                         "of type datasets.Image (image files, or images of a .tar/.parquet)")
    for name in (caption_column,) if caption_column else CAPTION_COLUMNS:
        if name in columns:
            return images[0], name
    raise InputError(f"caption_column = {caption_column!r}: captioned data {spec} has no column "
                     f"{caption_column or ' or '.join(CAPTION_COLUMNS)}; columns found: {columns}; expected "
                     "caption_column to name the caption column")


def captioned_data(spec, builder: str, arguments: dict, identity: list | None, teacher: Teacher, cache_dir: Path,
                   batch_size: int, resize: bool = False, caption_column: str | None = None
                   ) -> tuple[torch.Tensor, Cond, torch.Tensor]:
    """``(x0, cond, cond_index)`` of captioned images: ``x0`` as ``image_data`` gives it, ``cond`` one row per
    distinct caption (the teacher's ``encode_prompts``), ``cond_index`` each image's caption row. Encoded
    once and cached by the data's identity, the teacher, ``resize`` and ``caption_column``."""
    def cache_path(key):
        return cache_dir / f"captioned-{digest(teacher_fingerprint(teacher), resize, caption_column, key)}.safetensors"

    path = cache_path(identity) if identity is not None else None
    if path is None or not path.is_file():
        dataset = load_captioned(builder, arguments, cache_dir)
        if path is None:
            path = cache_path([str(spec), dataset._fingerprint])
    if not path.is_file():
        image_column, text_column = captioned_columns(dataset, spec, caption_column)
        captions = dataset[text_column]
        for row, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise InputError(f"captioned data {spec}: row {row} has caption {caption!r} in column "
                                 f"{text_column!r}; expected a string")
        distinct = list(dict.fromkeys(captions))
        rows = {caption: k for k, caption in enumerate(distinct)}
        logger.info("encoding %d images and %d captions of %s", len(captions), len(distinct), spec)
        channels = teacher.vae.config.in_channels if teacher.is_latent else teacher.sample_shape[0]
        images = dataset.select_columns([image_column])
        device = teacher.model.device
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([image_tensor(image, teacher.image_size, channels, resize,
                                               f"image of row {start + k} of {spec}")
                                  for k, image in enumerate(images[start:start + batch_size][image_column])])
            chunks.append(teacher.encode(pixels.to(device)).float().cpu())
        cond = {f"cond.{key}": value for key, value in encode_texts(teacher, distinct).items()}
        index = torch.tensor([rows[caption] for caption in captions], dtype=torch.long)
        save_atomic({"x0": torch.cat(chunks), "cond_index": index, **cond}, path)
    cached = unflatten_cond(load_file(path))
    return cached["x0"], cached["cond"], cached["cond_index"]


# -- teacher samples --------------------------------------------------------------------------------------
def teacher_samples(teacher: Teacher, cache_dir: Path, count: int, steps: int, seed: int, uncond: Cond | None,
                    batch_size: int, prompt_cond: Cond | None = None, guidance: float = 1.0
                    ) -> dict[str, torch.Tensor]:
    """``{"noise", "x0"[, "class_labels" | "prompt_index"]}``: ``count`` deterministic DDIM solutions
    (``steps`` steps) of the teacher's ODE from seeded noise, conditioned on random labels for a
    class-conditional teacher, on the rows ``prompt_index`` of ``prompt_cond`` (every prompt once per
    round, in a seeded order) when given, else on the unconditional branch; guided by
    ``u + guidance (c - u)`` (Ho & Salimans 2022) when ``guidance != 1``. Cached; regenerated when the
    teacher, count, steps, seed, prompts or guidance differ from the cached file's metadata."""
    prompts_key = "" if prompt_cond is None else digest(*(
        [k, list(v.shape), hashlib.sha256(v.float().numpy().tobytes()).hexdigest()]
        for k, v in sorted(flatten_cond(prompt_cond).items())))
    metadata = {"teacher": teacher_fingerprint(teacher), "count": str(count), "steps": str(steps), "seed": str(seed),
                "prompts": prompts_key, "guidance": repr(float(guidance))}
    path = cache_dir / f"teacher-samples-{digest(teacher.source, seed)}.safetensors"  # one file per rank's seed
    if path.is_file():
        with safe_open(path, "pt") as cached:
            if cached.metadata() == metadata:
                return load_file(path)
    logger.info("generating %d teacher samples with %d DDIM steps", count, steps)
    timesteps = teacher.schedule.timesteps(steps)
    generator = torch.Generator().manual_seed(derive_seed(seed, "teacher-samples"))
    noise = torch.randn((count, *teacher.sample_shape), generator=generator)
    noise = noise * teacher.schedule.prior_scale(timesteps[0])
    pairs = {"noise": noise}
    if teacher.num_classes:
        pairs["class_labels"] = torch.randint(teacher.num_classes, (count,), generator=generator)
    elif prompt_cond is not None:
        num_prompts = _num_rows(prompt_cond)
        rounds = [torch.randperm(num_prompts, generator=generator) for _ in range(-(-count // num_prompts))]
        pairs["prompt_index"] = torch.cat(rounds)[:count]
    device = teacher.model.device
    chunks = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        unconds = slice_cond(uncond, torch.zeros(n, dtype=torch.long))
        if teacher.num_classes:
            cond = {"class_labels": pairs["class_labels"][start:start + n]}
        elif prompt_cond is not None:
            cond = slice_cond(prompt_cond, pairs["prompt_index"][start:start + n])
        else:
            cond = unconds
        guide = None if guidance == 1.0 else Guidance(_to(unconds, device), guidance)
        x0 = sample_ddim(teacher.denoiser, noise[start:start + n].to(device), timesteps, cond=_to(cond, device),
                         guidance=guide)
        chunks.append(x0.float().cpu())
    pairs["x0"] = torch.cat(chunks)
    save_atomic(pairs, path, metadata)
    return pairs
