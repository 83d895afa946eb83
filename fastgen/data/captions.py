"""Captioned images, read with Hugging Face ``datasets`` (as diffusers' training scripts read them).

A spec is captioned images when it is a folder holding ``metadata.jsonl`` (or ``.csv``) that names each
``file_name`` and its caption (the ``imagefolder`` convention; for a text-conditioned teacher), a
webdataset shard (``.tar``) or parquet file, a glob of such files (``shards/*.tar``), or ``hf:owner/name``,
a hub dataset (online only). Each image becomes ``x0`` as an image folder's would, and its condition is its
own caption embedded with the teacher's text encoders (one row per distinct caption); both are encoded
once and cached.

Local data is checked before it is read: every ``file_name`` of a metadata file must be a path inside its
folder, and a shard may hold only regular files and folders with paths inside it (no links). Images are
opened by ``fastgen.data.images.open_image`` (decompression bombs refused from their header, 16-bit
grayscale scaled), not decoded by ``datasets``.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import tarfile
import warnings
from pathlib import Path

import torch

from fastgen.data.cache import digest, load_cache, save_cache, teacher_fingerprint, unflatten_cond
from fastgen.data.images import IMAGE_EXTENSIONS, image_tensor, open_image
from fastgen.data.prompts import encode_texts
from fastgen.denoiser import Cond
from fastgen.errors import InputError, warn
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
            files = [path]
            found = (text, CAPTIONED_BUILDERS[path.suffix.lower()], {"data_files": [str(path)]}, _listing(files))
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
    if found[1] == "webdataset":
        for file in files:
            check_shard(file)
    elif found[1] == "imagefolder":
        for file in files:
            if file.name in METADATA_FILES:
                check_metadata(file)
    return found


def unlisted_images(folder: Path) -> list[Path]:
    """The images of an ``imagefolder`` that no metadata file of their folder names: ``datasets`` leaves them out."""
    named = set()
    for file in folder.rglob("*"):
        if file.name in METADATA_FILES:
            for _, row in _metadata_rows(file):
                if isinstance(row, dict) and isinstance(row.get("file_name"), str):
                    named.add(os.path.normpath(file.parent / row["file_name"]))
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                  and os.path.normpath(f) not in named)


def _outside(name: str) -> bool:
    """Whether a path read from data leaves the folder it is relative to (absolute, ``..``, or a URL)."""
    normal = os.path.normpath(name).replace("\\", "/")
    return os.path.isabs(name) or normal == ".." or normal.startswith("../") or "://" in name


def check_metadata(file: Path) -> None:
    """Every ``file_name`` (or ``*_file_name``, ``*file_names``) of a metadata file (``metadata.jsonl`` or
    ``.csv``) must be a relative path inside the file's folder; the error names the line. A file that is not UTF-8
    text, and a CSV row with more fields than its header, are refused naming the file."""
    try:
        rows = _metadata_rows(file)
    except UnicodeDecodeError as err:
        raise InputError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); expected a UTF-8 "
                         "metadata file") from None
    if not rows:
        raise InputError(f"{file} lists no images; expected one row per image with its file_name and caption")
    for number, row in rows:
        if isinstance(row, dict) and None in row:  # csv.DictReader files a row's extra fields under None
            raise InputError(f"{file} line {number} has {len(row[None])} more field(s) than its header; expected "
                             "one field per column (quote captions that hold commas)")
        for key, value in row.items() if isinstance(row, dict) else ():
            if key.endswith("file_name"):
                names = [value]
            elif key.endswith("file_names") and isinstance(value, list):
                names = value
            else:
                continue
            for name in names:
                if isinstance(name, str) and _outside(name):
                    raise InputError(f"{file} line {number}: {key} {name!r} leaves the folder {file.parent} "
                                     "(an absolute path or '..'); expected a path relative to it, inside it")


def _metadata_rows(file: Path) -> list[tuple[int, object]]:
    """``(line number, row)`` of a ``metadata.jsonl`` (one JSON value a line) or ``metadata.csv`` (a dict a row)."""
    if file.suffix != ".jsonl":
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except ValueError as err:
                raise InputError(f"{file} line {number} is not valid JSON ({err}); expected one JSON object "
                                 "per line") from None
    return rows


def check_shard(file: Path) -> None:
    """A webdataset shard must hold only regular files and folders, at paths inside it (no links, devices,
    absolute paths or ``..``); the error names the member."""
    try:
        with tarfile.open(file) as tar:
            for member in tar:
                if member.issym() or member.islnk():
                    raise InputError(f"webdataset shard {file}: member {member.name!r} is a "
                                     f"{'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r}); "
                                     "expected regular files only")
                if not (member.isfile() or member.isdir()):
                    raise InputError(f"webdataset shard {file}: member {member.name!r} is not a regular file; "
                                     "expected regular files only")
                if _outside(member.name):
                    raise InputError(f"webdataset shard {file}: member {member.name!r} lies outside the shard (an "
                                     "absolute path or '..'); expected relative paths")
    except tarfile.TarError as err:
        raise InputError(f"webdataset shard {file} is not a readable tar file ({err}); expected a .tar of "
                         "images and captions") from None


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
    try:
        with _datasets_quiet():
            return datasets.load_dataset(builder, **arguments, split="train", cache_dir=str(cache_dir / "datasets"))
    except Exception as err:  # datasets' own checks of the user's files (a shard's key without its caption, ...)
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        where = arguments.get("data_dir") or ", ".join(arguments.get("data_files", []))
        raise InputError(f"captioned data {where} cannot be read by datasets' {builder} loader ({reason}); "
                         "expected images each with its caption") from err


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
    import datasets

    def cache_path(key):
        return cache_dir / f"captioned-{digest(teacher_fingerprint(teacher), resize, caption_column, key)}.safetensors"

    path = cache_path(identity) if identity is not None else None
    cached = None if path is None else load_cache(path)
    if builder == "imagefolder":
        unlisted = unlisted_images(Path(arguments["data_dir"]))
        if unlisted:
            warn(f"{len(unlisted)} images in {arguments['data_dir']} are not named in its metadata file and are left "
                 f"out of the data (first: {unlisted[0]}); expected a row with file_name and caption for each image")
    if cached is None:
        dataset = load_captioned(builder, arguments, cache_dir)
        if path is None:
            path = cache_path([str(spec), dataset._fingerprint])
            cached = load_cache(path)
    if cached is None:
        image_column, text_column = captioned_columns(dataset, spec, caption_column)
        captions = dataset[text_column]
        for row, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise InputError(f"captioned data {spec}: row {row} has caption {caption!r} in column "
                                 f"{text_column!r}; expected a string")
        distinct = list(dict.fromkeys(captions))
        rows = {caption: k for k, caption in enumerate(distinct)}
        logger.info("encoding %d images and %d captions of %s", len(captions), len(distinct), spec)
        channels = teacher.image_channels
        images = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        device = teacher.model.device
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = []
            for k, image in enumerate(images[start:start + batch_size][image_column]):
                name = f"image of row {start + k} of {spec}"
                source = io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]
                pixels.append(image_tensor(open_image(source, name), teacher.image_size, channels, resize, name))
            chunks.append(teacher.encode(torch.stack(pixels).to(device)).float().cpu())
        cond = {f"cond.{key}": value for key, value in encode_texts(teacher, distinct).items()}
        index = torch.tensor([rows[caption] for caption in captions], dtype=torch.long)
        cached = {"x0": torch.cat(chunks), "cond_index": index, **cond}
        save_cache(cached, path)
    cached = unflatten_cond(cached)
    return cached["x0"], cached["cond"], cached["cond_index"]
