"""Training checkpoints as safetensors plus a JSON skeleton: atomic, prunable, exactly resumable.

A training state is a nested structure (network and optimizer state dicts, the grad scaler, EMA
weights, RNG states of torch, numpy and ``random``, the data position). :func:`flatten_state`
splits it into flat tensors, saved as one ``state.safetensors``, and a JSON tree of everything else
(``state.json``); :func:`unflatten_state` puts it back exactly: int dict keys stay ints, tuples stay
tuples, numpy arrays keep their dtype, torch dtypes and 0-d tensors survive. Nothing is pickled.

Layout of a run folder::

    run_dir/checkpoints/step-00001000/{state.safetensors, state.json, meta.json, fastgen_manifest.json}

:func:`save_checkpoint` writes into a hidden temporary sibling (``fastgen.atomic.atomic_folder``), ends with
the manifest of every file's sha256 (``fastgen.integrity``), fsyncs every file and the folder, and renames
it into place, so a crash at any moment leaves either the old set of complete checkpoints or the new one.
Readers ignore hidden folders; the next save removes those of writes that were killed. Loading verifies
the manifest and names a damaged file; :func:`latest_checkpoint` is the newest complete and intact
checkpoint, skipping damaged ones with a warning. Checkpoints from before manifests load unverified. One
process (the main one) writes a given run folder.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fastgen.atomic import atomic_folder, temp_sibling
from fastgen.errors import InputError, MissingPathError, UserError, warn
from fastgen.integrity import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    IncompleteFileError,
    check_safetensors,
    read_safetensors,
    verify_manifest,
    write_manifest,
)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "state.safetensors"
TREE_FILE = "state.json"
META_FILE = "meta.json"

_STEP_DIR = re.compile(r"step-(\d{8,})")
_LEGACY_TMP_PREFIX = ".tmp-"
"""Temporary folders of fastgen before they were named by their process (``fastgen.atomic``)."""


class UnsafeCheckpointError(InputError):
    """A pickled weights file was given without the explicit trust flag."""


# ----------------------------------------------------------------------------- flatten / unflatten


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into flat CPU tensors keyed by their path and a JSON-serialisable tree.

    Supported leaves: tensors (any safetensors dtype, 0-d included), numpy arrays and scalars of
    numeric dtypes, ``torch.dtype``, None, bool, int, float (nan/inf too), str. Containers: dict
    (keys of any supported scalar type or tuples of them), list, tuple (subclasses come back as
    plain tuples). Anything else raises TypeError naming its path.
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def add_tensor(path: str, tensor: torch.Tensor) -> str:
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel() > 0:
            tensor = tensor.clone()  # safetensors refuses tensors sharing memory
        storages.add(storage)
        key, n = path or "<root>", 1
        while key in tensors:
            key, n = f"{path}#{n}", n + 1
        tensors[key] = tensor
        return key

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"t": "tensor", "key": add_tensor(path, value)}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"{path or '<root>'}: numpy arrays of objects cannot be checkpointed")
            raw = torch.from_numpy(np.frombuffer(np.ascontiguousarray(value).tobytes(), dtype=np.uint8).copy())
            return {"t": "ndarray", "key": add_tensor(path, raw), "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, np.generic):
            return {"t": "npscalar", "dtype": value.dtype.str, "v": encode(value.item(), path)}
        if isinstance(value, dict):
            return {"t": "dict", "items": [[_encode_key(k, path), encode(v, f"{path}.{k}" if path else str(k))]
                                           for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            items = [encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"t": "tuple", "v": items}
        return _encode_scalar(value, path)

    return tensors, encode(obj, "")


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Rebuild the object that :func:`flatten_state` split into ``tensors`` and ``tree``."""

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        kind = node["t"]
        if kind == "tensor":
            return tensors[node["key"]]
        if kind == "ndarray":
            raw = tensors[node["key"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()
        if kind == "npscalar":
            return np.dtype(node["dtype"]).type(decode(node["v"]))
        if kind == "dict":
            return {decode(k): decode(v) for k, v in node["items"]}
        if kind == "tuple":
            return tuple(decode(v) for v in node["v"])
        if kind == "float":
            return float(node["v"])
        if kind == "dtype":
            return getattr(torch, node["v"])
        raise ValueError(f"unknown node type {kind!r} in checkpoint tree")

    return decode(tree)


def _encode_scalar(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"t": "float", "v": repr(value)}
    if isinstance(value, torch.dtype):
        return {"t": "dtype", "v": str(value).removeprefix("torch.")}
    raise TypeError(f"{path or '<root>'}: cannot checkpoint a value of type {type(value).__name__}")


def _encode_key(key: Any, path: str) -> Any:
    if isinstance(key, tuple):
        return {"t": "tuple", "v": [_encode_key(k, path) for k in key]}
    return _encode_scalar(key, f"{path}[{key!r}]")


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically to ``run_dir/checkpoints/step-{step:08d}`` and keep the newest ``keep``.

    Saving a step that already exists replaces it. Returns the checkpoint folder. A full disk raises
    ``NoSpaceError`` (the earlier checkpoints intact).
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1 checkpoints to keep, got {keep}")
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_LEGACY_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    tensors, tree = flatten_state(state)
    final = root / f"step-{step:08d}"
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_folder(final, needed, intact=f"the earlier checkpoints in {root} are intact") as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "fastgen", "version": str(FORMAT_VERSION)})
        _write_json(tmp / TREE_FILE, tree)
        _write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, "step": step, "manifest": True})
        write_manifest(tmp)

    for old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            _remove(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (hidden temporary folders of killed writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete and intact checkpoint of a run (:func:`verify_checkpoint`), or None when it has
    none. Damaged newer ones are skipped with one warning line naming each and why; when every checkpoint is
    damaged, ``IncompleteFileError`` says so for each."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except UserError as err:
            skipped.append(f"{path.name} ({err})")
            continue
        if skipped:
            warn(f"skipped damaged checkpoint {'; '.join(skipped)}; using {path}")
        return path
    if skipped:
        raise IncompleteFileError(f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}: {'; '.join(skipped)}; "
                                  "expected at least one: restore one from a copy, or distil into a new --output")
    return None


def checkpoint_path(path: str | Path) -> Path:
    """``path`` as a checkpoint folder, checked cheaply (no tensors read) to be complete; the error lists the
    run's complete checkpoints."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        if (path / CHECKPOINTS_DIR).is_dir():
            run_dir = path
        elif path.parent.name == CHECKPOINTS_DIR:
            run_dir = path.parent.parent
        else:
            run_dir = path.parent
        available = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {META_FILE})"
        raise MissingPathError(f"checkpoint {path} {what}; available in {run_dir / CHECKPOINTS_DIR}: {available}")
    for name in (TREE_FILE, TENSORS_FILE):
        if not (path / name).is_file():
            raise IncompleteFileError(f"checkpoint file {path / name} is missing; the checkpoint is incomplete")
    check_safetensors(path / TENSORS_FILE)
    return path


def verify_checkpoint(path: str | Path) -> Path:
    """:func:`checkpoint_path`, then every file checked against the checkpoint's manifest (its sha256 hashes);
    raises ``DamagedFileError`` naming a damaged file. A checkpoint from before manifests is checked cheaply
    only."""
    path = checkpoint_path(path)
    verify_manifest(path, required=bool(_read_meta(path).get("manifest")))
    return path


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint folder written by :func:`save_checkpoint`, verified (:func:`verify_checkpoint`);
    returns ``(step, state)`` on CPU."""
    path = verify_checkpoint(path)
    meta = _read_meta(path)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {meta['format_version']} is newer than this fastgen "
            f"supports ({FORMAT_VERSION}); upgrade fastgen"
        )
    tree = _read_json(path / TREE_FILE)
    tensors = read_safetensors(path / TENSORS_FILE)
    return int(meta["step"]), unflatten_state(tensors, tree)


def _read_meta(path: Path) -> dict:
    meta = _read_json(path / META_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise IncompleteFileError(f"checkpoint file {path / META_FILE} holds {meta!r:.80}; expected "
                                  '{"format_version": ..., "step": ...}: the file is corrupt')
    return meta


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IncompleteFileError(f"checkpoint file {file} is not valid JSON ({err}); the file is incomplete or "
                                  "corrupt") from err


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, allow_nan=False, separators=(",", ":")), encoding="utf-8")


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: first rename it to a temporary name so no reader sees it half-deleted."""
    doomed = temp_sibling(path)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


# ----------------------------------------------------------------------------- plain weights files


def load_weights(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` weights file on CPU.

    ``.safetensors`` is read directly. Pickle formats (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can
    run code when loaded, so they raise :class:`UnsafeCheckpointError` unless ``trust_pickle=True``
    (CLI ``--trust-pickle``). Even then they are read with ``torch.load(weights_only=True)``, which
    only rebuilds tensors and plain containers: a file that needs arbitrary classes still fails;
    convert it to safetensors with the tool that wrote it. A top-level ``"state_dict"`` entry (as in
    Lightning/original SD ``.ckpt`` files) is unwrapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise InputError(
            f"{path}: unsupported weights file extension {suffix or '(none)'!r}; expected .safetensors "
            f"(or, with trust_pickle=True, one of {', '.join(PICKLE_SUFFIXES)})"
        )
    if suffix in PICKLE_SUFFIXES and not trust_pickle:
        raise UnsafeCheckpointError(
            f"{path} is a pickle file ({suffix}), which can run arbitrary code when loaded; convert it to "
            f".safetensors, or pass trust_pickle=True (CLI: --trust-pickle) if you trust where it came from"
        )
    if not path.is_file():
        raise MissingPathError(f"weights file {path} does not exist")
    if suffix in SAFE_SUFFIXES:
        return read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise IncompleteFileError(f"weights file {path} cannot be unpickled ({' '.join(str(err).split())[:200]}); "
                                  "it is incomplete, corrupt or needs classes beyond tensors: convert it to "
                                  ".safetensors") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a mapping of parameter names to tensors, got {type(loaded).__name__}")
    bad = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: expected a mapping of parameter names to tensors; not tensors: {', '.join(bad[:5])}")
    return loaded
