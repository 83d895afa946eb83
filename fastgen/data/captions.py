"""Captioned images, read with Hugging Face ``datasets`` (as diffusers' training scripts read them).

A spec is captioned images when it is a folder holding ``metadata.jsonl`` (or ``.csv``) that names each
``file_name`` and its caption (the ``imagefolder`` convention; for a text-conditioned teacher), a
webdataset shard (``.tar``) or parquet file, a glob of such files (``shards/*.tar``), or ``hf:owner/name``,
a hub dataset (online only). Each image becomes ``x0`` as an image folder's would, and its condition is its
own caption embedded with the teacher's text encoders (one row per distinct caption); both are encoded
once and cached.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastgen.data.cache import digest, save_atomic, teacher_fingerprint, unflatten_cond
from fastgen.data.images import image_tensor
from fastgen.data.prompts import encode_texts
from fastgen.denoiser import Cond
from fastgen.errors import InputError
from fastgen.teacher import Teacher

CAPTION_COLUMNS = ("text", "caption", "txt")
"""Caption columns tried in order when none is named: ``imagefolder``'s convention, a common alternative
and webdataset's ``.txt`` members."""
CAPTIONED_BUILDERS = {".tar": "webdataset", ".parquet": "parquet"}
"""``datasets`` builders of captioned files by suffix."""
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
"""A folder holding one of these is an ``imagefolder`` of captioned images."""
HUB_PREFIX = "hf:"

logger = logging.getLogger(__name__)


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
    """The ``train`` split through ``datasets.load_dataset`` (its Arrow files kept under ``cache_dir``). Local
    files load without ``datasets``' "Generating train split" progress bars (a copy into the cache, which tells
    the user nothing); a hub dataset keeps them (a download)."""
    import datasets

    if builder == "hub":
        return datasets.load_dataset(**arguments, split="train", cache_dir=str(cache_dir / "datasets"))
    with _datasets_quiet():
        return datasets.load_dataset(builder, **arguments, split="train", cache_dir=str(cache_dir / "datasets"))


@contextlib.contextmanager
def _datasets_quiet():
    """``datasets``' progress bars off within, and back as they were after (left alone when already off;
    ``HF_DATASETS_DISABLE_PROGRESS_BARS=0`` keeps them on, as its user asked)."""
    import datasets

    if datasets.are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():  # "Cannot disable progress bars: ... HF_DATASETS_DISABLE_PROGRESS_BARS=0"
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


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
