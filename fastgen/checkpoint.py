"""Training checkpoints as safetensors plus a JSON skeleton: atomic, prunable, exactly resumable.

A training state is a nested structure (network and optimizer state dicts, the grad scaler, EMA
weights, RNG states of torch, numpy and ``random``, the data position). :func:`flatten_state`
splits it into flat tensors, saved as one ``state.safetensors``, and a JSON tree of everything else
(``state.json``); :func:`unflatten_state` puts it back exactly: int dict keys stay ints, tuples stay
tuples, numpy arrays keep their dtype, torch dtypes and 0-d tensors survive. Nothing is pickled.

Layout of a run folder::

    run_dir/checkpoints/step-00001000/{state.safetensors, state.json, meta.json, fastgen_manifest.json}

A sharded run (``train.sharding: fsdp2``) writes ``shards/`` instead of ``state.safetensors``: the same flat
tensors through ``torch.distributed.checkpoint``, each process its own shards, loadable whole in one process
(an export) or resharded over any number of processes (a resume on another world size).

:func:`save_checkpoint` writes into a hidden temporary sibling (``fastgen.atomic.atomic_folder``), ends with
the manifest of every file's sha256 (``fastgen.integrity``), fsyncs every file and the folder, and renames
it into place, so a crash at any moment leaves either the old set of complete checkpoints or the new one.
Readers ignore hidden folders; the next save removes those of writes that were killed. Loading verifies
the manifest and names a damaged file; :func:`latest_checkpoint` is the newest complete and intact
checkpoint, skipping damaged ones with a warning. Checkpoints from before manifests load unverified. One
process (the main one) writes a given run folder, but for the shards of a sharded run.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fastgen.atomic import atomic_folder, reporting_no_space, temp_sibling
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
SHARDS_DIR = "shards"
"""A sharded run's tensors: a ``torch.distributed.checkpoint`` folder (``.metadata`` and one file per process)."""

_STEP_DIR = re.compile(r"step-(\d{8,})")
_LEGACY_TMP_PREFIX = ".tmp-"
"""Temporary folders of fastgen before they were named by their process (``fastgen.atomic``)."""


class UnsafeCheckpointError(InputError):
    """A pickled weights file was given without the explicit trust flag."""


# ----------------------------------------------------------------------------- flatten / unflatten


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into flat CPU tensors keyed by their path and a JSON-serialisable tree.

    Supported leaves: tensors (any safetensors dtype, 0-d included; a ``DTensor`` stays as it is, on its
    device), numpy arrays and scalars of
    numeric dtypes, ``torch.dtype``, None, bool, int, float (nan/inf too), str. Containers: dict
    (keys of any supported scalar type or tuples of them), list, tuple (subclasses come back as
    plain tuples). Anything else raises TypeError naming its path.
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def add_tensor(path: str, tensor: torch.Tensor) -> str:
        if _is_dtensor(tensor):  # a shard of a sharded network's state: written by its own process (DCP)
            tensor = tensor.detach()
        else:
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


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _tensor_keys(tree: Any) -> set[str]:
    """The keys of every tensor a :func:`flatten_state` tree refers to."""
    if isinstance(tree, list):
        return set().union(*map(_tensor_keys, tree)) if tree else set()
    if not isinstance(tree, dict):
        return set()
    if tree.get("t") in ("tensor", "ndarray"):
        return {tree["key"]}
    children = [v for item in tree.get("items", []) for v in item] if tree.get("t") == "dict" else tree.get("v")
    return _tensor_keys(children) if isinstance(children, list) else set()


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


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    sharded: bool = False, retry: str = "run the command again") -> Path:
    """Write ``state`` atomically to ``run_dir/checkpoints/step-{step:08d}`` and keep the newest ``keep``.

    Saving a step that already exists replaces it. Returns the checkpoint folder. A full disk raises
    ``NoSpaceError`` (the earlier checkpoints intact; its advice ends with ``retry``). ``sharded``: every process
    of the group calls it with its own shards (``DTensor`` leaves of a sharded run); the tensors go to
    ``shards/`` through ``torch.distributed.checkpoint`` (each process writes its part into a hidden staging
    folder, which the main process then moves into the checkpoint before the manifest and the rename), the JSON
    tree as always.
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1 checkpoints to keep, got {keep}")
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    intact = (f"the earlier checkpoints in {root} are intact" if list_checkpoints(run_dir) else
              "no checkpoint of this run was written before")
    tensors, tree = flatten_state(state)
    main = True
    if sharded:
        import torch.distributed as dist

        main = dist.get_rank() == 0
        staging = root / f".{final.name}.{SHARDS_DIR}"
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        with reporting_no_space(staging, intact=intact, retry=retry):
            _dcp().save(tensors, checkpoint_id=staging)
        dist.barrier()
    if main:
        _write_checkpoint(root, final, step, tree, None if sharded else tensors, intact, retry)
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                _remove(old)
    if sharded:
        dist.barrier()
    return final


def _write_checkpoint(root: Path, final: Path, step: int, tree: Any, tensors: dict[str, torch.Tensor] | None,
                      intact: str, retry: str) -> None:
    """The main process's part of :func:`save_checkpoint`: ``tensors`` (None: the shards in the staging folder)
    and the tree, meta and manifest files into a temporary folder renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_LEGACY_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    needed = None if tensors is None else sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_folder(final, needed, intact=intact, retry=retry) as tmp:
        if tensors is None:
            os.replace(root / f".{final.name}.{SHARDS_DIR}", tmp / SHARDS_DIR)
        else:
            save_file(tensors, str(tmp / TENSORS_FILE),
                      metadata={"format": "fastgen", "version": str(FORMAT_VERSION)})
        _write_json(tmp / TREE_FILE, tree)
        _write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, "step": step, "manifest": True})
        write_manifest(tmp)


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


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


def checkpoint_path(path: str | Path, run_dir: str | Path | None = None) -> Path:
    """``path`` as a checkpoint folder, checked cheaply (no tensors read) to be complete; the error lists the
    run's complete checkpoints. With ``run_dir``, a bare name that is not a folder here is one of that run's
    checkpoints (``fastgen export --run R --checkpoint step-00000004``)."""
    path = Path(path)
    if run_dir is not None and not path.exists() and len(path.parts) == 1:
        path = Path(run_dir) / CHECKPOINTS_DIR / path
    if not (path / META_FILE).is_file():
        if run_dir is not None:
            run_dir = Path(run_dir)
        elif (path / CHECKPOINTS_DIR).is_dir():
            run_dir = path
        elif path.parent.name == CHECKPOINTS_DIR:
            run_dir = path.parent.parent
        else:
            run_dir = path.parent
        available = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {META_FILE})"
        raise MissingPathError(f"checkpoint {path} {what}; available in {run_dir / CHECKPOINTS_DIR}: {available}")
    sharded = (path / SHARDS_DIR).is_dir()
    for name in (TREE_FILE, f"{SHARDS_DIR}/.metadata" if sharded else TENSORS_FILE):
        if not (path / name).is_file():
            raise IncompleteFileError(f"checkpoint file {path / name} is missing; the checkpoint is incomplete")
    if not sharded:
        check_safetensors(path / TENSORS_FILE)
    return path


def verify_checkpoint(path: str | Path) -> Path:
    """:func:`checkpoint_path`, then every file checked against the checkpoint's manifest (its sha256 hashes);
    raises ``DamagedFileError`` naming a damaged file. A checkpoint from before manifests is checked cheaply
    only."""
    path = checkpoint_path(path)
    verify_manifest(path, required=bool(_read_meta(path).get("manifest")))
    return path


def load_checkpoint(path: str | Path, like: dict[str, torch.Tensor] | None = None,
                    skip: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint folder written by :func:`save_checkpoint`, verified (:func:`verify_checkpoint`);
    returns ``(step, state)``, on CPU and whole, sharded or not.

    ``like``: the tensors of a sharded run's own state (:func:`flatten_state`), which every process of its group
    passes: the state comes back sharded as they are (``torch.distributed.checkpoint`` reads each process's part
    of a sharded checkpoint, on any number of processes, and a whole checkpoint is split among them). ``skip``:
    top-level entries whose tensors are not read (None in the state; e.g. ``("optimizers",)`` for an export)."""
    path = verify_checkpoint(path)
    meta = _read_meta(path)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {meta['format_version']} is newer than this fastgen "
            f"supports ({FORMAT_VERSION}); upgrade fastgen"
        )
    tree = _read_json(path / TREE_FILE)
    wanted = _tensor_keys(tree)
    if isinstance(tree, dict) and tree.get("t") == "dict":
        skipped = _tensor_keys([v for k, v in tree["items"] if k in skip])
        wanted -= skipped
    else:
        skipped = set()
    if (path / SHARDS_DIR).is_dir():
        tensors = _read_shards(path / SHARDS_DIR, wanted, like)
    else:
        tensors = read_safetensors(path / TENSORS_FILE)
        if like is not None:
            tensors = {k: _distribute_like(v, like.get(k)) for k, v in tensors.items()}
    return int(meta["step"]), unflatten_state({**tensors, **dict.fromkeys(skipped)}, tree)


def _read_shards(folder: Path, keys: set[str], like: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of a ``torch.distributed.checkpoint`` folder: into ``like``'s (sharded) layout, every
    process of the group reading its part, or whole in this process alone."""
    dcp = _dcp()
    if like is not None:
        missing = sorted(keys - like.keys())
        if missing:
            raise InputError(f"checkpoint {folder.parent} holds state this run does not have ({', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}); expected a checkpoint of this run's networks")
        tensors = {k: like[k] for k in keys}
        dcp.load(tensors, checkpoint_id=folder)
        return tensors
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype)
               for k in keys if isinstance(stored.get(k), TensorStorageMetadata)}
    if len(tensors) != len(keys):
        raise IncompleteFileError(f"checkpoint {folder} lacks tensors its {TREE_FILE} names "
                                  f"({', '.join(sorted(keys - tensors.keys())[:3])}); the checkpoint is damaged")
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is what no_dist asks
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    return tensors


def _distribute_like(tensor: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """A whole ``tensor`` split as ``like`` is when that is a ``DTensor`` (every process holds the whole)."""
    if like is None or not _is_dtensor(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.dtype), like.device_mesh, like.placements)


def _read_meta(path: Path) -> dict:
    meta = _read_json(path / META_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise IncompleteFileError(f"checkpoint file {path / META_FILE} holds {meta!r:.80}; expected "
                                  '{"format_version": ..., "step": ...}: the file is corrupt')
    return meta


def set_aside_later(run_dir: str | Path, step: int) -> list[Path]:
    """Rename the run's checkpoints of steps after ``step`` to ``checkpoints/superseded-step-N`` (``.2``, ... where
    taken), out of :func:`list_checkpoints`, and return their new paths. A run resumed from ``step`` retrains
    those steps: left in place, a damaged checkpoint that the resume skipped would count as one of the newest
    when older ones are pruned (the intact one resumed from was deleted, the damaged one kept), and one of a
    resume from an earlier folder would be taken by ``--resume latest`` for this run's. Nothing is deleted."""
    moved = []
    for path in list_checkpoints(run_dir):
        if int(path.name.removeprefix("step-")) > step:
            target, n = path.with_name(f"superseded-{path.name}"), 1
            while target.exists():
                n += 1
                target = path.with_name(f"superseded-{path.name}.{n}")
            os.replace(path, target)
            moved.append(target)
    return moved


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
