"""Training checkpoints as safetensors plus a JSON skeleton: atomic, prunable, exactly resumable.

A training state is a nested structure (network and optimizer state dicts, the grad scaler, EMA
weights, RNG states of torch, numpy and ``random``, the data position). :func:`flatten_state`
splits it into flat tensors, saved as one ``state.safetensors``, and a JSON tree of everything else
(``state.json``); :func:`unflatten_state` puts it back exactly: int dict keys stay ints, tuples stay
tuples, numpy arrays keep their dtype, torch dtypes and 0-d tensors survive. Nothing is pickled.

Layout of a run folder::

    run_dir/checkpoints/step-00001000/{state.safetensors, state.json, meta.json}

:func:`save_checkpoint` writes into a hidden ``.tmp-step-...`` sibling, fsyncs every file and the
folder, and renames it into place, so a crash at any moment leaves either the old set of complete
checkpoints or the new one. Readers ignore ``.tmp-*`` folders; the next save removes them. One
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
from safetensors.torch import load_file, save_file

from fastgen.atomic import fsync
from fastgen.errors import InputError, MissingPathError

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "state.safetensors"
TREE_FILE = "state.json"
META_FILE = "meta.json"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_STEP_DIR = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"


class UnsafeCheckpointError(InputError):
    """A pickled weights file was given without the explicit trust flag."""


class IncompleteFileError(InputError):
    """A weights or checkpoint file is truncated or corrupt (e.g. a copy or download that stopped midway)."""


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

    Saving a step that already exists replaces it. Returns the checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1 checkpoints to keep, got {keep}")
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    tensors, tree = flatten_state(state)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "fastgen", "version": str(FORMAT_VERSION)})
        _write_json(tmp / TREE_FILE, tree)
        _write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, "step": step})
        for file in (TENSORS_FILE, TREE_FILE, META_FILE):
            fsync(tmp / file)
        fsync(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(root)

    for old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            _remove(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp-*`` folders of crashed writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


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


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint folder written by :func:`save_checkpoint`; returns ``(step, state)`` on CPU."""
    path = checkpoint_path(path)
    meta = _read_json(path / META_FILE)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {meta['format_version']} is newer than this fastgen "
            f"supports ({FORMAT_VERSION}); upgrade fastgen"
        )
    tree = _read_json(path / TREE_FILE)
    tensors = read_safetensors(path / TENSORS_FILE)
    return int(meta["step"]), unflatten_state(tensors, tree)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IncompleteFileError(f"checkpoint file {file} is not valid JSON ({err}); the file is incomplete or "
                                  "corrupt") from err


def check_safetensors(file: str | Path) -> None:
    """Raise :class:`IncompleteFileError` naming ``file`` unless its header parses and its size covers every
    tensor it lists (a truncated copy or download fails here, before any weights load)."""
    file = Path(file)
    size = file.stat().st_size
    problem = None
    with file.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            problem = f"its header needs {8 + (length or 0)} bytes but the file has {size}"
        else:
            try:
                header = json.loads(f.read(length))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "its header is not valid safetensors JSON"
            else:
                if 8 + length + end > size:
                    problem = f"it is {size} bytes but its tensors end at byte {8 + length + end}"
    if problem:
        raise IncompleteFileError(f"weights file {file} is incomplete or corrupt ({problem}); it was probably cut "
                                  "off while copying or downloading: copy or save it again")


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """``load_file`` on the CPU after :func:`check_safetensors`; safetensors' own errors name the file."""
    from safetensors import SafetensorError

    check_safetensors(file)
    try:
        return load_file(str(file), device="cpu")
    except SafetensorError as err:
        raise IncompleteFileError(f"weights file {file} cannot be read ({err}); expected a complete "
                                  ".safetensors file") from err


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, allow_nan=False, separators=(",", ":")), encoding="utf-8")


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: first rename it to a ``.tmp-`` name so no reader sees it half-deleted."""
    doomed = path.with_name(f"{_TMP_PREFIX}old-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
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
