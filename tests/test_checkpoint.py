"""Checkpoints: exact round trips of training state, atomic writes, pruning, pickle refusal."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastgen.checkpoint as ckpt
from fastgen.checkpoint import (
    UnsafeCheckpointError,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    unflatten_state,
)


def _assert_same(a, b):
    """Deep equality that also checks types, dtypes and nan."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _mixed_state():
    base = torch.arange(12, dtype=torch.float32)
    return {
        "tensors": {
            "fp32": torch.randn(3, 4),
            "bf16": torch.randn(5, dtype=torch.bfloat16),
            "fp16": torch.randn(2, 2, dtype=torch.float16),
            "int64": torch.tensor([1, -2, 3]),
            "bool": torch.tensor([True, False]),
            "uint8": torch.get_rng_state(),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
            "full": base,
            "view": base[2:5],
            "strided": base[::3],
        },
        0: {"step": 3, "exp_avg": torch.ones(2)},
        7: [1, 2.5, -0.0, float("nan"), float("inf"), -float("inf"), None, True, "text", 2**70],
        "tuple": (1, (2, "three"), []),
        (1, "pair"): "tuple key",
        2.5: "float key",
        None: "none key",
        "numpy": [
            np.arange(6, dtype=np.uint32).reshape(2, 3),
            np.array(1.5, dtype=np.float16),
            np.array([1 + 2j], dtype=np.complex64),
            np.zeros((0,), dtype=np.int8),
            np.float32(0.1),
            np.int64(-5),
            np.bool_(True),
        ],
        "dtypes": [torch.float32, torch.bfloat16, torch.int64],
        "empty": {},
    }


def test_flatten_unflatten_exact():
    state = _mixed_state()
    tensors, tree = flatten_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    tree = json.loads(json.dumps(tree, allow_nan=False))  # plain JSON, no pickle
    _assert_same(unflatten_state(tensors, tree), state)


def test_flatten_rejects_unsupported_values_by_path():
    with pytest.raises(TypeError, match=r"a\.b: cannot checkpoint a value of type set"):
        flatten_state({"a": {"b": {1, 2}}})
    with pytest.raises(TypeError, match="numpy arrays of objects"):
        flatten_state({"a": np.array([object()])})


def test_checkpoint_round_trip_and_layout(tmp_path):
    state = _mixed_state()
    path = save_checkpoint(tmp_path, 12, state)
    assert path == tmp_path / "checkpoints" / "step-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["fastgen_manifest.json", "meta.json", "state.json",
                                                       "state.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta == {"format_version": ckpt.FORMAT_VERSION, "step": 12, "manifest": True}
    manifest = json.loads((path / "fastgen_manifest.json").read_text())
    assert sorted(manifest["files"]) == ["meta.json", "state.json", "state.safetensors"]
    assert manifest["files"]["state.json"]["sha256"] == hashlib.sha256((path / "state.json").read_bytes()).hexdigest()
    step, loaded = load_checkpoint(path)
    assert step == 12
    _assert_same(loaded, state)


def _train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    return model, optimizer


def test_adamw_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    model, optimizer = _model_and_optimizer()
    _train_steps(model, optimizer, 5, seed=1)
    save_checkpoint(tmp_path, 5, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    fresh_model, fresh_optimizer = _model_and_optimizer()
    step, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert step == 5 and set(state["optimizer"]["state"]) == {0, 1, 2, 3}
    fresh_model.load_state_dict(state["model"])
    fresh_optimizer.load_state_dict(state["optimizer"])

    _train_steps(model, optimizer, 3, seed=2)
    _train_steps(fresh_model, fresh_optimizer, 3, seed=2)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    _assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())


def test_lr_schedules_and_clock_resume_exactly(tmp_path):
    """What the trainer's checkpoints hold besides networks and optimizers: every phase's lr schedule
    (``fastgen.policies.LRSchedules``, diffusers' LambdaLR states) and the cumulative clock."""
    from types import SimpleNamespace

    from fastgen.policies import Clock, LRSchedules

    phases = [SimpleNamespace(name="critic", runs_at=lambda s: True),
              SimpleNamespace(name="generator", runs_at=lambda s: s % 2 == 0)]

    def schedules():
        model, optimizer = _model_and_optimizer()
        optimizers = {"critic": optimizer, "generator": torch.optim.AdamW(model.parameters(), lr=1e-3)}
        return optimizers, LRSchedules(optimizers, phases, "cosine", 2, 10)

    def run(optimizers, lr, steps):
        lrs = []
        for s in steps:
            for phase in phases:
                if phase.runs_at(s):
                    optimizers[phase.name].step()
                    lr.step(phase.name)
            lrs.append((lr.last_lr("critic"), lr.last_lr("generator")))
        return lrs

    optimizers, lr = schedules()
    run(optimizers, lr, range(5))
    clock = Clock(12.5)
    save_checkpoint(tmp_path, 5, {"lr_schedules": lr.state_dict(), "clock": clock.state_dict()})
    _, state = load_checkpoint(latest_checkpoint(tmp_path))
    _assert_same(state["lr_schedules"], lr.state_dict())
    assert state["clock"]["elapsed"] >= 12.5

    fresh_optimizers, fresh = schedules()
    fresh.load_state_dict(state["lr_schedules"])
    for name in ("critic", "generator"):  # the restored lr is in the optimizer before its first step
        assert fresh.last_lr(name) == lr.last_lr(name) == fresh_optimizers[name].param_groups[0]["lr"]
    assert run(fresh_optimizers, fresh, range(5, 10)) == run(optimizers, lr, range(5, 10))
    assert lr.last_lr("critic") == lr.last_lr("generator") == 0.0  # both decayed to 0 over their own updates
    resumed = Clock(state["clock"]["elapsed"])
    assert resumed.elapsed() >= state["clock"]["elapsed"]


def test_grad_scaler_state_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        scaler.scale(param.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    save_checkpoint(tmp_path, 4, {"scaler": scaler.state_dict()})
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path))[1]["scaler"])
    _assert_same(restored.state_dict(), scaler.state_dict())


def test_rng_states_resume_identically(tmp_path):
    generator = torch.Generator().manual_seed(123)
    torch.randn(3, generator=generator)
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": np.random.get_state(),
        "numpy_generator": np.random.default_rng(5).bit_generator.state,
        "python": random.getstate(),
    }
    np.random.standard_normal()  # leaves a cached gaussian in the legacy numpy state
    state["numpy_cached"] = np.random.get_state()
    path = save_checkpoint(tmp_path, 1, state)

    def draw(s):
        torch.set_rng_state(s["torch"])
        generator.set_state(s["generator"])
        np.random.set_state(s["numpy_cached"])
        np_gen = np.random.default_rng()
        np_gen.bit_generator.state = s["numpy_generator"]
        random.setstate(s["python"])
        return (
            torch.rand(4),
            torch.rand(4, generator=generator),
            np.random.standard_normal(3),
            np_gen.random(3),
            [random.random() for _ in range(3)],
        )

    _, loaded = load_checkpoint(path)
    _assert_same(loaded, state)
    _assert_same(draw(loaded), draw(state))


def test_keep_prunes_oldest_and_resave_replaces(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"step": torch.tensor(step)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    save_checkpoint(tmp_path, 40, {"step": torch.tensor(41)}, keep=2)
    assert load_checkpoint(latest_checkpoint(tmp_path))[1]["step"].item() == 41
    save_checkpoint(tmp_path, 35, {"step": torch.tensor(35)}, keep=1)  # never prunes what it just wrote
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000035", "step-00000040"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000035", "step-00000040"]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 50, {}, keep=0)


def test_empty_run_has_no_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_missing_checkpoint_lists_available(tmp_path):
    save_checkpoint(tmp_path, 1, {})
    save_checkpoint(tmp_path, 2, {})
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(tmp_path / "checkpoints" / "step-00000009")
    assert "step-00000009 does not exist" in str(info.value)
    assert "available in" in str(info.value) and "step-00000001, step-00000002" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="available in .*: none"):
        load_checkpoint(tmp_path / "elsewhere" / "checkpoints" / "step-00000001")


@pytest.mark.parametrize("failure", ["tensor_write", "rename"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)
        raise OSError("disk full")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    if failure == "tensor_write":
        monkeypatch.setattr(ckpt, "save_file", half_write)
    else:
        monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)})
    monkeypatch.undo()

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    step, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert step == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_leftover_tmp_folders_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
    crashed = tmp_path / "checkpoints" / ".tmp-step-00000002"
    crashed.mkdir()
    (crashed / "meta.json").write_text('{"format_version": 1, "step": 2}')
    (crashed / "state.safetensors").write_bytes(b"\x00" * 8)
    half_deleted = tmp_path / "checkpoints" / "step-00000000"
    half_deleted.mkdir()  # no meta.json: not a complete checkpoint
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)})
    assert not crashed.exists()


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from fastgen.checkpoint import save_checkpoint
    big = torch.empty(4_000_000)
    for step in range(1, 1000):
        big.fill_(step)
        save_checkpoint(sys.argv[1], step, {"big": big, "step": step}, keep=2)
        print(step, flush=True)
    """
)


def test_sigkill_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "1"
        time.sleep(random.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    latest = latest_checkpoint(tmp_path)
    step, state = load_checkpoint(latest)
    assert state["step"] == step >= 1
    assert torch.all(state["big"] == step)
    for path in list_checkpoints(tmp_path):
        assert load_checkpoint(path)[1]["step"] == int(path.name.removeprefix("step-"))


def test_load_weights_safetensors(tmp_path):
    weights = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    save_file(weights, tmp_path / "model.safetensors")
    loaded = load_weights(tmp_path / "model.safetensors")
    _assert_same(dict(sorted(loaded.items())), weights)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_weights(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_load_weights_refuses_pickle_without_trust(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    weights = {"a": torch.randn(2)}
    torch.save({"state_dict": weights} if suffix == ".ckpt" else weights, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights(path)
    message = str(info.value)
    assert str(path) in message and ".safetensors" in message
    assert "trust_pickle=True" in message and "--trust-pickle" in message
    assert issubclass(UnsafeCheckpointError, ValueError)
    _assert_same(load_weights(path, trust_pickle=True), weights)


def test_trusted_pickle_still_loads_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"a": torch.ones(1), "hook": os.getcwd}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_weights(path, trust_pickle=True)
    torch.save({"a": torch.ones(1), "epoch": 3}, path)
    with pytest.raises(ValueError, match="not tensors: epoch"):
        load_weights(path, trust_pickle=True)


def test_load_weights_unknown_extension(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"")
    expected = r"model\.npz: unsupported weights file extension '\.npz'; expected \.safetensors"
    with pytest.raises(ValueError, match=expected):
        load_weights(path)
