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

from fastgen.assemble import build_run
from fastgen.config import DistillConfig, load_config
from fastgen.errors import UsageError
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


def test_every_lora_fake_score_of_a_phased_run_trains_from_its_first_step_and_is_estimated(sd_folder, tmp_path):
    """Phased DMD keeps one LoRA fake score per phase on the teacher's base; adding the second froze the first
    (peft's ``set_adapter``), so its first critic step had no gradients and ``fastgen estimate`` failed on it."""
    config = load_config(DistillConfig, None, [
        f"teacher={sd_folder}", "method=phased_dmd", f"output={tmp_path}", "train.batch_size=2",
        "student.num_steps=2", "objective.fake_lora_rank=2"])
    run = build_run(config)
    assert {name: all(p.requires_grad for p in params) for name, params in run.trainable.items()} == {
        "student": True, "fake_0": True, "fake_1": True}
    estimate = estimate_memory(config, device="cpu")
    assert estimate.parameters["fake_0"] == estimate.parameters["fake_1"] > 0


def test_the_advice_for_a_student_of_experts_estimates(sd_folder, tmp_path):
    """The estimate refuses a student of experts and says what to estimate instead; that advice runs (it named
    ``student.experts=1`` alone, which the grid's ``expert_boundaries`` then refused)."""
    base = [f"teacher={sd_folder}", "method=phased_dmd", f"output={tmp_path}", "train.batch_size=2",
            "student.num_steps=2"]
    with pytest.raises(UsageError, match="estimate with student.experts=1") as refused:
        estimate_memory(load_config(DistillConfig, None, base + ["student.experts=2",
                                                                "student.expert_boundaries=[500]"]), device="cpu")
    advice = str(refused.value).split("estimate with ")[1].split(" and ")[0].split()
    assert estimate_memory(load_config(DistillConfig, None, base + ["student.experts=2",
                                                                    "student.expert_boundaries=[500]"] + advice),
                           device="cpu").parameters["student"] > 0


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


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_a_class_conditional_teacher_is_estimated(method, tmp_path, capsys):
    """Class labels of the synthetic batch and the critic's probe are made on "meta" (and as fake tensors): their
    range check read their values and failed as "a bug in fastgen"."""
    from tiny import make_ddpm_folder

    from fastgen.cli import main

    folder = make_ddpm_folder(tmp_path / "classes", num_class_embeds=4)
    assert main(["estimate", "--teacher", str(folder), "--method", method, "--batch-size", "2", "--device", "cpu",
                 "--no-modes"]) == 0
    assert "**total**" in capsys.readouterr().out


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


def test_a_mode_the_teacher_cannot_run_is_listed_with_its_reason_not_fatal(capsys):
    """The toy teacher's UNet2DModel has no LoRA support: ``fastgen estimate --config toy_dmd2`` used to end in
    ``error: a LoRA network needs ...`` (its LoRA modes failing), although the run as configured estimates fine.
    The LoRA modes are listed as unavailable with the reason; the rest of the table stands."""
    from fastgen.cli import main

    assert main(["estimate", "--config", "toy_dmd2", "--batch-size", "2", "--budget", "1GiB"]) in (0, None)
    out = capsys.readouterr().out
    assert "| `train.gradient_checkpointing=true` |" in out
    row = next(line for line in out.splitlines() if "objective.fake_lora_rank=64`" in line)
    assert "n/a: a LoRA network needs a denoiser with diffusers' adapter support" in row and row.endswith(" no |")
    assert "fits the budget of 1.00 GiB" in out


# -- per device of a launch: --world-size, --sharding fsdp2, --offload -------------------------------------------


FSDP2_RUN = ["method=dmd2", "train.batch_size=2", "objective.gan_weight=0", "objective.gan_critic_weight=0",
             "train.sharding=fsdp2"]
"""A tiny DMD2 run of three float32 UNets (teacher, student, full fake score; no GAN head), sharded by FSDP2."""


@pytest.fixture(scope="module")
def fsdp2_estimate(sd_folder, tmp_path_factory):
    """One simulated step of ``FSDP2_RUN`` on one process; every launch below is derived from it (no simulation)."""
    config = load_config(DistillConfig, None, [f"teacher={sd_folder}", f"output={tmp_path_factory.mktemp('run')}",
                                               *FSDP2_RUN])
    return estimate_memory(config, device="cpu")


def unet_params(sd_folder) -> list[torch.nn.Parameter]:
    from diffusers import UNet2DConditionModel

    return list(UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").parameters())


def one_unet_per_device(sd_folder, n: int) -> int:
    """Bytes of one float32 UNet on one of ``n`` devices under FSDP2: ceil(dim 0 / n) rows of every parameter,
    counted here from the UNet's own parameters, independently of fastgen.estimate."""
    return sum(-(-p.shape[0] // n) * (p.numel() // p.shape[0]) * 4 for p in unet_params(sd_folder))


def state_rows(est) -> dict[tuple[str, str], int]:
    return {(n, k): b for n, k, b in est.rows if k in ("weights", "gradients", "optimizer", "ema")
            and n in ("teacher", "student", "fake")}


def test_fsdp2_on_two_processes_halves_the_state_and_keeps_the_rest(fsdp2_estimate, sd_folder):
    """Weights (teacher, student, fake score), gradients (student, fake), AdamW's two states (both) and the
    student's EMA: ten UNets' worth on one device, each ceil-halved per tensor at N=2. At the step's peak (a
    phase's forward, its own network's gradients freed at its start and not yet made again) nine of them are
    live, so the total falls by nine halves; the batch, buffers, VAE, text encoders and gathered blocks stay."""
    from fastgen.estimate import per_device

    one, two = per_device(fsdp2_estimate, 1), per_device(fsdp2_estimate, 2)
    h1, h2 = one_unet_per_device(sd_folder, 1), one_unet_per_device(sd_folder, 2)
    assert h2 < h1 / 2 + 4 * len(unet_params(sd_folder))  # (odd first dimensions round up)
    copies = {("teacher", "weights"): 1, ("student", "weights"): 1, ("fake", "weights"): 1,
              ("student", "gradients"): 1, ("fake", "gradients"): 1, ("student", "optimizer"): 2,
              ("fake", "optimizer"): 2, ("student", "ema"): 1}
    assert state_rows(one) == {key: k * h1 for key, k in copies.items()}
    assert state_rows(two) == {key: k * h2 for key, k in copies.items()}
    peak = fsdp2_estimate.footprint.phases[two.peak_phase]
    assert peak.made_bytes == 0 and peak.own_bytes == h1  # the premise: its own UNet's gradients are not yet made
    assert one.total_bytes - two.total_bytes == 9 * (h1 - h2)
    unchanged = {(n, k): b for n, k, b in one.rows if k in ("other", "gathered blocks") or n in ("vae", "text_encoder")}
    assert unchanged == {(n, k): b for n, k, b in two.rows if (n, k) in unchanged} and len(unchanged) == 4
    assert two.layout["global_batch"] == 4 and one.layout["global_batch"] == 2


def test_fsdp2_on_one_process_is_the_replicated_figure_plus_the_gathered_blocks(fsdp2_estimate, sd_folder):
    """N=1: every shard is the whole tensor, so FSDP2 adds only its all-gathered parameters (gathered_bytes's
    rule, counted here from the UNet: every network's root parameters, the largest two consecutive units (a
    block's resnets and attention modules, then the rest of it), and one unit's gradients; all float32 here),
    held at a forward's peak."""
    from fastgen.estimate import per_device

    from diffusers import UNet2DConditionModel

    replicated, sharded = per_device(fsdp2_estimate, 1, "none"), per_device(fsdp2_estimate, 1, "fsdp2")
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    sizes = []  # each block's resnets and attention modules one by one, then the rest of the block
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        parts = [*(block.resnets or []), *(getattr(block, "attentions", None) or [])]
        sizes += [sum(p.numel() for p in part.parameters()) for part in parts]
        sizes.append(sum(p.numel() for p in block.parameters()) - sum(sizes[len(sizes) - len(parts):]))
    pair = max(a + b for a, b in zip(sizes, sizes[1:]))
    root = sum(p.numel() for p in unet.parameters()) - sum(sizes)
    gathered = 4 * (3 * root + pair + max(sizes))  # three UNets' roots; the student's or fake's block gradients
    assert sharded.layout["gathered_bytes"] == gathered
    assert sharded.total_bytes == replicated.total_bytes + gathered
    assert state_rows(sharded) == state_rows(replicated)
    assert replicated.rows == per_device(fsdp2_estimate, 1, "none").rows and replicated.layout["gathered_bytes"] == 0


def test_data_parallel_replicates_and_adds_the_gradient_buckets(fsdp2_estimate, sd_folder):
    from fastgen.estimate import per_device

    one, eight = per_device(fsdp2_estimate, 1, "none"), per_device(fsdp2_estimate, 8, "none")
    grads = 2 * one_unet_per_device(sd_folder, 1)  # the student's and the fake score's
    assert eight.total_bytes == one.total_bytes + grads and eight.layout["ddp_bucket_bytes"] == grads
    assert state_rows(eight) == state_rows(one) and eight.layout["global_batch"] == 16


def test_offload_moves_the_sharded_state_to_the_host(fsdp2_estimate, sd_folder):
    from fastgen.estimate import format_table, per_device

    on_device, offloaded = per_device(fsdp2_estimate, 2), per_device(fsdp2_estimate, 2, offload=True)
    h2 = one_unet_per_device(sd_folder, 2)
    assert not state_rows(offloaded)
    assert sum(b for _, _, b in offloaded.layout["host_rows"]) == 10 * h2
    assert offloaded.layout["host_bytes"] >= 10 * h2
    assert offloaded.total_bytes == on_device.total_bytes - 9 * h2  # the state live at the peak leaves the device
    assert "host memory per process (CPU offload)" in format_table(offloaded)


@pytest.mark.parametrize("argv, expected", [
    (["--world-size", "0"], "argument --world-size: expected a positive integer, got '0'"),
    (["--world-size", "two"], "argument --world-size: expected a positive integer, got 'two'"),
    (["--sharding", "zero3"], "argument --sharding: invalid choice: 'zero3'"),
    (["--offload"], "--offload (train.fsdp_offload) is set with sharding 'none'; expected --sharding fsdp2"),
], ids=["zero", "word", "sharding", "offload-unsharded"])
def test_bad_launch_flags_are_one_line_errors(sd_folder, argv, expected, capsys):
    from fastgen.cli import main

    assert main(["estimate", "--teacher", str(sd_folder), "--method", "dmd2", "--no-modes", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_per_device_refuses_a_world_size_below_one(fsdp2_estimate):
    from fastgen.errors import UsageError
    from fastgen.estimate import per_device

    with pytest.raises(UsageError, match=r"--world-size is 0; expected a positive integer"):
        per_device(fsdp2_estimate, 0)
    with pytest.raises(UsageError, match=r"--sharding is 'zero3'; expected one of \['none', 'fsdp2'\]"):
        per_device(fsdp2_estimate, 2, "zero3")


def test_estimate_command_prints_the_per_device_figure_and_the_global_batch(sd_folder, fsdp2_estimate, tmp_path,
                                                                            capsys):
    """The command with --world-size 2 --offload (sharding from the config) gives what per_device derives."""
    import json

    from fastgen.cli import main
    from fastgen.estimate import format_table, per_device

    assert main(["estimate", "--teacher", str(sd_folder), "--device", "cpu", "--no-modes", "--world-size", "2",
                 "--offload", "--json", f"output={tmp_path}", *FSDP2_RUN]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = per_device(fsdp2_estimate, 2, offload=True)
    assert out["total_bytes"] == expected.total_bytes and out["layout"]["host_bytes"] == expected.layout["host_bytes"]
    assert (out["layout"]["world_size"], out["layout"]["sharding"], out["layout"]["offload"]) == (2, "fsdp2", True)
    table = format_table(expected)
    assert "2 processes, sharding fsdp2, CPU offload: global batch 2 x 1 x 2 = 4 per step" in table
    assert "| fsdp2 | gathered blocks |" in table and "host memory per process" in table


def test_a_frozen_network_the_objective_keeps_is_counted_and_sharded(sd_folder, tmp_path):
    """Consistency distillation's EMA target (a frozen copy of the student, which the trainer shards too) was
    in neither the rows nor the total; it is one UNet's weights, divided like the others."""
    from fastgen.estimate import per_device

    config = load_config(DistillConfig, None, [f"teacher={sd_folder}", "method=consistency", f"output={tmp_path}",
                                               "train.batch_size=2", "objective.target_ema=0.95"])
    est = estimate_memory(config, device="cpu")
    rows = {(n, k): b for n, k, b in est.rows}
    assert rows[("target", "weights")] == rows[("student", "weights")] == one_unet_per_device(sd_folder, 1)
    assert est.parameters["target"] == est.parameters["student"]
    sharded = {(n, k): b for n, k, b in per_device(est, 2, "fsdp2").rows}
    assert sharded[("target", "weights")] == one_unet_per_device(sd_folder, 2)


# -- the real-size configs of the newer families (FLUX.1-dev, Qwen-Image, Wan 2.1/2.2, SANA) ------------------------


NEW_REAL_SIZE = {  # name: the pipeline's default (height, width, frames), the denoiser's nominal parameters
    "flux1-dev": ((1024, 1024, 1), 12e9),
    "qwen-image": ((1024, 1024, 1), 20e9),
    "wan2.1-t2v-1.3b": ((480, 832, 81), 1.3e9),
    "wan2.1-t2v-14b": ((480, 832, 81), 14e9),
    "wan2.2-t2v-a14b": ((480, 832, 81), 14e9),
    "sana-1.6b": ((1024, 1024, 1), 1.6e9),
}
"""The defaults of each pipeline's ``__call__`` (FluxPipeline and QwenImagePipeline: ``default_sample_size`` 128
times the VAE's 8; WanPipeline: 480 x 832, 81 frames; SanaPipeline: 1024) and the parameter count its name gives."""


def family_rule_shape(spec, height: int, width: int, frames: int) -> tuple[int, ...]:
    """The sample shape by the family rules, from the folder's configs alone: the VAE's spatial factor (its
    pipeline's formula: ``2 ** len(temperal_downsample)`` for Wan's and Qwen-Image's VAEs, else one halving per
    block after the first) and temporal one (``2 ** sum(temperal_downsample)``); packed families see
    ``in_channels / 4`` channels on an even latent grid; video ``(frames - 1) // temporal + 1`` latent frames."""
    from fastgen.families import FAMILIES

    family, vae = FAMILIES[spec.model_class], spec.others["vae"][2]
    if "temperal_downsample" in vae:
        spatial, temporal = 2 ** len(vae["temperal_downsample"]), 2 ** sum(vae["temperal_downsample"])
    else:
        spatial, temporal = 2 ** (len(vae.get("block_out_channels") or vae["encoder_block_out_channels"]) - 1), 1
    step = spatial * (2 if family.packed else 1)
    channels = spec.model_config["in_channels"] // (4 if family.packed else 1)
    grid = (height // step * step // spatial, width // step * step // spatial)
    return (channels, (frames - 1) // temporal + 1, *grid) if family.video else (channels, *grid)


@pytest.mark.parametrize("name", list(NEW_REAL_SIZE))
def test_new_real_size_folders_load_and_give_the_family_sample_shape(name):
    """Each folder reads through the estimate's spec (its denoiser a family of ``fastgen.families.FAMILIES``),
    builds on the meta device at about its published size, and gives the sample shape of the family rules at the
    pipeline's default size and at another one; a size its latents cannot have is one line naming it. The
    denoiser runs on the meta device with the family's inputs and the estimate's text conditions."""
    from fastgen.errors import InputError
    from fastgen.estimate import ConfigTeacher, build_network
    from fastgen.families import FAMILIES

    (height, width, frames), nominal = NEW_REAL_SIZE[name]
    spec = TeacherSpec.read(name)
    assert spec.model_class in FAMILIES
    assert count_parameters(name) == pytest.approx(nominal, rel=0.1)  # (the names round: Wan's 1.3B is 1.42 B)
    assert spec.sample_shape() == family_rule_shape(spec, height, width, frames)
    video = FAMILIES[spec.model_class].video
    small = {"height": 96, "width": 160, "num_frames": 9} if video else {"resolution": 96}
    shape = spec.sample_shape(**small)
    assert shape == family_rule_shape(spec, small.get("height", 96), small.get("width", 96), small.get("num_frames", 1))
    with pytest.raises(InputError, match=r"^resolution 100: height is 100; expected a positive multiple of \d+"):
        spec.sample_shape(100)
    model = build_network(name, "meta")
    teacher = ConfigTeacher(spec, model, shape)
    x = torch.zeros(1, *shape, device="meta")
    assert teacher.denoiser(x, torch.tensor([500.0], device="meta"), teacher.encode_prompts([""])).shape == x.shape


@pytest.mark.parametrize("name, tokens, keys", [
    ("flux1-dev", 512, {"encoder_hidden_states": 4096, "pooled_projections": 768}),
    ("qwen-image", 512, {"encoder_hidden_states": 3584, "encoder_hidden_states_mask": None}),
    ("wan2.1-t2v-14b", 512, {"encoder_hidden_states": 4096}),
    ("sana-1.6b", 300, {"encoder_hidden_states": 2304, "encoder_attention_mask": None}),
    ("sd3-medium", 77 + 256, {"encoder_hidden_states": 4096, "pooled_projections": 2048}),
])
def test_text_conditions_are_as_long_as_the_pipeline_makes_them(name, tokens, keys):
    """The estimate's prompt embeddings: the ``max_sequence_length`` default of the pipeline's ``__call__`` (Flux's
    T5, Wan's UMT5 and Qwen-Image's bound: 512; SANA's Gemma 2: 300; SD3: 77 CLIP + 256 T5), the text encoder's
    width, and a mask of ones where the family's pipeline gives one."""
    from fastgen.estimate import ConfigTeacher, build_network

    spec = TeacherSpec.read(name)
    cond = ConfigTeacher(spec, build_network(name, "meta"), spec.sample_shape(256)).encode_prompts(["a", "b"])
    assert set(cond) == set(keys)
    for key, width in keys.items():
        pooled = key == "pooled_projections"
        expected = (2, width) if pooled else (2, tokens) if width is None else (2, tokens, width)
        assert tuple(cond[key].shape) == expected, key


def test_estimate_of_wan_at_a_small_size_counts_the_networks_its_configs_build(capsys):
    """``fastgen estimate`` end to end on the real-size Wan 2.1 1.3B configs at 64 x 64 pixels and 5 frames: the
    sample shape of the family rules (2 latent frames of 8 x 8), the teacher's and the UMT5 text encoder's
    parameters as the networks built here from the folder's config files count them (1.42 B and 5.68 B), and
    their float32 weights' bytes."""
    import json

    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from fastgen.cli import main
    from fastgen.estimate import real_size_folder

    assert main(["estimate", "--teacher", "wan2.1-t2v-1.3b", "--method", "progressive", "--resolution", "64",
                 "--batch-size", "1", "--no-modes", "--json", "num_frames=5",
                 "train.ema_decay=null"]) == 0
    out = json.loads(capsys.readouterr().out)
    folder = real_size_folder("wan2.1-t2v-1.3b")
    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder / "transformer"))
        text_encoder = UMT5EncoderModel(UMT5Config.from_json_file(folder / "text_encoder" / "config.json"))
    teacher, text = (sum(p.numel() for p in m.parameters()) for m in (transformer, text_encoder))
    assert out["settings"]["sample_shape"] == [16, 2, 8, 8]
    assert out["parameters"]["teacher"] == out["parameters"]["student"] == teacher == 1_418_996_800
    assert out["parameters"]["text_encoder"] == text == 5_680_910_336
    rows = {(r["network"], r["kind"]): r["bytes"] for r in out["rows"]}
    assert rows[("teacher", "weights")] == 4 * teacher and rows[("text_encoder", "weights")] == 4 * text
