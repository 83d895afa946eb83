"""Caches of encoded data: safetensors files in ``cache_dir`` named by a hash of what they depend on.

A name hashes the inputs and a fingerprint of the teacher (its source, dtype and the sizes and mtimes of
its files), so a changed input or teacher misses the cache. Each file is written to a temporary file and
renamed into place (``fastgen.atomic``), so none is ever half-written, and records the digest of its tensors
(``fastgen.integrity.tensors_digest``) in its metadata: :func:`load_cache` checks it, and a damaged file (a
flipped byte, a truncated copy) is rebuilt after a one-line warning naming it, as it is derived data. Nested
conditions are stored flat, one ``dotted.key`` tensor each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from fastgen.atomic import atomic_path
from fastgen.denoiser import Cond
from fastgen.errors import UserError, warn
from fastgen.integrity import DamagedFileError, read_safetensors, safetensors_header, tensors_digest
from fastgen.teacher import Teacher


def digest(*parts) -> str:
    """A short hex hash of JSON-able ``parts`` (names a cache file)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def teacher_fingerprint(teacher: Teacher) -> str:
    """Identifies the teacher's weights: its source and dtype, and for a folder each file's size and mtime."""
    parts = [teacher.source, str(teacher.model.dtype)]
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


DIGEST_KEY = "fastgen_sha256"
"""The metadata key of a cache file's ``tensors_digest``."""


def save_cache(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a cache file atomically (``fastgen.atomic``) with ``metadata`` and the digest of its tensors."""
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, needed) as tmp:
        save_file(tensors, tmp, {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)})


def load_cache(path: Path, metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor] | None:
    """The tensors of the cache file ``path``; None when it must be built: it is absent, was written for other
    ``metadata`` or before caches recorded digests, or is damaged (then a warning names it)."""
    if not path.is_file():
        return None
    try:
        stored = dict(safetensors_header(path).get("__metadata__") or {})
        recorded = stored.pop(DIGEST_KEY, None)
        if recorded is None or stored != (metadata or {}):
            return None
        tensors = read_safetensors(path)
        if tensors_digest(tensors) != recorded:
            raise DamagedFileError(f"cache file {path} is damaged: its tensors differ from the digest recorded when "
                                   "it was written")
    except UserError as err:
        warn(f"rebuilding {path}: {err}")
        return None
    return tensors


def null_cond(teacher: Teacher, cache_dir: Path) -> Cond | None:
    """One row of the teacher's unconditional branch (cached for text teachers); ``None`` for the others."""
    if teacher.num_classes or not teacher.text_conditioned:
        return None
    path = cache_dir / f"uncond-{digest(teacher_fingerprint(teacher))}.safetensors"
    flat = load_cache(path)
    if flat is None:
        flat = flatten_cond(teacher.null_cond(1))
        save_cache(flat, path)
    return unflatten_cond(flat)
