"""``fastgen estimate`` against the measured peak of real tiny runs on the CPU.

The measured peak is the largest sum of live tensor bytes that the CPU allocator reports to ``torch.profiler``
(its ``[memory]`` events: every allocation and free of the c10 allocator, in order) while the trainer runs its
steps after the first (every gradient and optimizer state then exists). Allocator events, not RSS: RSS on this
shared machine also moves with glibc's heap trimming and other threads' arenas. The training data set held in
host memory (``trainer.run.data``) is subtracted: on a GPU it stays on the host, and the estimate covers the device.
"""

from __future__ import annotations

import gc

import pytest
import torch

from fastgen.config import DistillConfig, load_config
from fastgen.estimate import REAL_SIZE, TeacherSpec, count_parameters, estimate_memory, parse_bytes


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from tiny import make_sd_folder

    return make_sd_folder(tmp_path_factory.mktemp("estimate") / "sd")



def measured_peak(config, monkeypatch) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils._pytree import tree_flatten

    import fastgen.trainer
    from fastgen.trainer import Trainer

    inner = fastgen.trainer.run_phase

    def run_phase(run, phase, batches, step, *args, **kwargs):  # each phase of step k inside a window "step_k"
        with record_function(f"fastgen_step_{step}"):
            return inner(run, phase, batches, step, *args, **kwargs)

    monkeypatch.setattr(fastgen.trainer, "run_phase", run_phase)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(config)
        trainer.fit()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    windows = [(e.start_ns(), e.end_ns()) for e in events
               if e.name().startswith("fastgen_step_") and int(e.name().rsplit("_", 1)[1]) >= 1]
    live = peak = 0
    for e in events:
        if e.name() == "[memory]":
            live += e.nbytes()
            if any(a <= e.start_ns() <= b for a, b in windows):
                peak = max(peak, live)
    data = trainer.run.data
    held = [t for t in tree_flatten([data.x0, data.noise, data.cond, data.uncond])[0] if isinstance(t, torch.Tensor)]
    return peak - sum(t.untyped_storage().nbytes() for t in held)


@pytest.mark.parametrize("overrides", [
    ["objective.fake_lora_rank=0"],
    ["objective.fake_lora_rank=4", "train.gradient_checkpointing=true", "student.lora_rank=4"],
], ids=["full-fake", "lora-fake-checkpointing-lora-student"])
def test_estimate_matches_the_measured_peak_of_a_tiny_dmd2_run(sd_folder, tmp_path, overrides, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red disc\na blue cross\n")
    config = load_config(DistillConfig, None, [
        f"teacher={sd_folder}", "method=dmd2", f"output={tmp_path / 'run'}", "data=teacher", f"prompts={prompts}",
        "teacher_samples=8", "teacher_sample_steps=2", "train.batch_size=8", "train.max_steps=3",
        "objective.critic_every=2", "objective.guidance_scale=2.0", *overrides])
    estimate = estimate_memory(config, device="cpu")
    measured = measured_peak(config, monkeypatch)
    assert estimate.parameters["student"] > 0 and estimate.parameters["fake"] > 0
    assert abs(estimate.total_bytes / measured - 1) < 0.2, (estimate.total_bytes, measured, estimate.rows)


def test_lora_fake_score_costs_less_than_a_full_copy(sd_folder, tmp_path):
    base = [f"teacher={sd_folder}", "method=dmd2", f"output={tmp_path}", "train.batch_size=2",
            "objective.gan_weight=0", "objective.gan_critic_weight=0"]
    full = estimate_memory(load_config(DistillConfig, None, base), device="cpu")
    lora = estimate_memory(load_config(DistillConfig, None, base + ["objective.fake_lora_rank=2"]), device="cpu")
    assert lora.parameters["fake"] < full.parameters["fake"] == full.parameters["teacher"]
    assert lora.total_bytes < full.total_bytes


@pytest.mark.parametrize("name, expected", [("sd15", 860e6), ("sdxl", 2.6e9), ("sd3-medium", 2.0e9)])
def test_real_size_configs_build_on_the_meta_device(name, expected):
    assert name in REAL_SIZE
    assert count_parameters(name) == pytest.approx(expected, rel=0.02)
    assert TeacherSpec.read(name).latent_factor == 8


def test_budget_sizes_parse_and_mistakes_name_the_value():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80 GB") == 80 * 10**9
    with pytest.raises(ValueError, match="24 gigs"):
        parse_bytes("24 gigs")


def test_estimate_help_documents_it():
    from fastgen.cli import build_parser

    text = build_parser().parse_args(["estimate", "--teacher", "sd15"]).func.__name__
    assert text == "cmd_estimate"
    help_text = build_parser()._subparsers._group_actions[0].choices["estimate"].format_help()
    for flag in ("--teacher", "--method", "--config", "--budget", "--json", "--resolution", "--batch-size"):
        assert flag in help_text


def test_estimate_command_exits_cleanly_with_gradient_checkpointing():
    """A simulated checkpointed step of the SD1.5-size UNet left fake tensors whose teardown aborted the
    interpreter (exit status 134 after a correct table) until ``estimate_memory`` freed them inside their fake
    mode; the console script ends normally (``sys.exit``), no ``os._exit``."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastgen", "estimate", "--teacher", "sd15", "--method", "dmd2",
                          "--batch-size", "1", "--resolution", "64", "--no-modes",
                          "train.gradient_checkpointing=true"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "**total**" in out.stdout


def test_modes_switch_one_saving_on_after_another_and_each_equals_its_own_estimate(sd_folder, tmp_path):
    """The modes ladder (simulated in spawned worker processes) against estimates made here of the same
    overrides: the same bytes."""
    from fastgen.estimate import AS_CONFIGURED, estimate_with_modes, mode_overrides, with_overrides

    config = load_config(DistillConfig, None, [f"teacher={sd_folder}", "method=dmd2", f"output={tmp_path}",
                                               "train.batch_size=2"])
    ladder = mode_overrides(config)
    assert ladder == [[], ["train.gradient_checkpointing=true"],
                      ["train.gradient_checkpointing=true", "objective.fake_lora_rank=64"],
                      ["train.gradient_checkpointing=true", "objective.fake_lora_rank=64", "student.lora_rank=64"]]
    est = estimate_with_modes(config, device="cpu", workers=2)
    assert list(est.modes) == [AS_CONFIGURED] + [" ".join(o) for o in ladder[1:]]
    assert est.modes[AS_CONFIGURED] == est.total_bytes
    for overrides in ladder[1:]:
        assert est.modes[" ".join(overrides)] == estimate_memory(with_overrides(config, overrides), device="cpu").total_bytes
    assert est.modes["train.gradient_checkpointing=true"] < est.total_bytes  # (rank-64 LoRA outweighs this tiny UNet)
    on = load_config(DistillConfig, None, [f"teacher={sd_folder}", "method=dmd2", f"output={tmp_path}",
                                           "train.gradient_checkpointing=true", "student.lora_rank=4"])
    assert mode_overrides(on) == [[], ["objective.fake_lora_rank=64"]]  # savings already on are not repeated
