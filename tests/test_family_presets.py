"""The presets of today's teacher families run as shipped: ``fastgen distill --config PRESET`` on a tiny teacher of
the preset's family exits 0 and writes ``RUN/export``, whose scheduler serves the preset's own timesteps (and, for Wan
2.2, whose two experts are the pipeline's ``transformer``/``transformer_2``).

Only what a tiny CPU run needs is overridden: the sample size, ``--max-steps 2``, batch 1, fp32, the default attention
processors, no gradient checkpointing, two teacher samples of two steps, ``train.grad_accum=1`` and no CPU offload
(fastgen refuses ``train.fsdp_offload`` without a GPU).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from fastgen.config import config_file
from tiny import make_flux_folder, make_qwen_image_folder, make_sana_folder, make_wan_folder

BUILDERS = {"flux": make_flux_folder, "qwen-image": make_qwen_image_folder, "sana": make_sana_folder,
            "wan": make_wan_folder, "wan2.2": functools.partial(make_wan_folder, boundary_ratio=0.875)}
PRESETS = {
    "flux_dmd2": ("flux", ["--height=16", "--width=16"]),
    "qwen_image_dmd2": ("qwen-image", ["--height=32", "--width=32", "train.fsdp_offload=false"]),
    "sana_dmd2": ("sana", ["--height=32", "--width=32"]),
    "wan21_dmd2": ("wan", ["--height=32", "--width=32", "--num-frames=5", "train.grad_accum=1"]),
    "wan22_phased_dmd": ("wan2.2", ["--height=32", "--width=32", "--num-frames=5"]),
}
"""Preset → (the tiny teacher of its family, its tiny sample size and CPU-only overrides)."""
TINY = ["--max-steps", "2", "teacher_samples=2", "teacher_sample_steps=2", "train.batch_size=1",
        "train.mixed_precision=no", "train.attention=default", "train.gradient_checkpointing=false"]
def distill(root, teacher, prompts, preset: str):
    out = root / preset
    family, overrides = PRESETS[preset]
    cmd = [sys.executable, "-m", "fastgen", "distill", "--config", preset, "--teacher", str(teacher), "--data",
           "teacher", "--prompts", str(prompts), "--output", str(out), *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    return proc, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_presets")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    teachers = {family: build(root / family) for family, build in BUILDERS.items()}
    with ThreadPoolExecutor(2) as pool:  # two runs at a time: one per core
        done = pool.map(lambda preset: distill(root, teachers[PRESETS[preset][0]], prompts, preset), PRESETS)
        return dict(zip(PRESETS, done))


def test_every_family_preset_is_tested():
    shipped = {p.stem for p in config_file("flux_dmd2").parent.glob("*.yaml")
               if p.stem.split("_")[0] in ("flux", "qwen", "sana", "wan21", "wan22")}
    assert shipped == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_distils_and_exports(runs, preset):
    proc, out = runs[preset]
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = out / "export"
    assert (export / "model_index.json").is_file()
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    student = yaml.safe_load(config_file(preset).read_text())["student"]
    assert scheduler["trained_timesteps"] == {str(student["num_steps"]): [float(t) for t in student["timesteps"]]}


def test_wan22_experts_export_into_the_pipelines_own_layout(runs):
    proc, out = runs["wan22_phased_dmd"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "export" / "model_index.json").read_text())
    assert index["transformer"][1] == index["transformer_2"][1] == "WanTransformer3DModel"
    # the steps at 1000 and 955 run through `transformer`, those at 875 and 700 through `transformer_2`
    assert 875 < index["boundary_ratio"] * 1000 <= 955
