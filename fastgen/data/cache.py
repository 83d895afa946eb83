"""Caches of encoded data: safetensors files in ``cache_dir`` named by a hash of what they depend on.

A name hashes the inputs and a fingerprint of the teacher (its source, dtype and the sizes and mtimes of
its files), so a changed input or teacher misses the cache. Each file is written to a temporary file and
renamed into place (``fastgen.atomic``), so none is ever half-written. Nested conditions are stored flat,
one ``dotted.key`` tensor each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from fastgen.atomic import atomic_path
from fastgen.denoiser import Cond
from fastgen.teacher import Teacher


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
