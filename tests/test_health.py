"""The health signal (fastgen/health.py): noise, flat and healthy samples told apart on the toy teacher, and a run
that collapsed says so on stderr, in RUN/health.jsonl, in the progress bar and in the export's model card."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastgen.generate import generate
from fastgen.health import FLAT_RATIO, NOISE_RATIO, assess, mid_time
from fastgen.teacher import load_teacher


@pytest.fixture(scope="module")
def toy():
    teacher = load_teacher("toy")
    return teacher, generate(teacher, 32, 16, seed=1), generate(teacher, 32, 16, seed=2)


def test_mid_time_is_where_alpha_equals_sigma(toy):
    teacher, _, _ = toy
    alpha, sigma = teacher.schedule.alpha_sigma(mid_time(teacher.schedule))
    assert float(alpha) == pytest.approx(float(sigma), rel=1e-2)


def test_teacher_samples_are_healthy_noise_and_constants_are_not(toy):
    teacher, reference, samples = toy
    healthy = assess(teacher, samples, None, reference, None)
    assert healthy.verdict is None and healthy.denoise_ratio < 2 and healthy.flat_ratio > 0.5
    noise = assess(teacher, torch.randn(samples.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1),
                   None, reference, None)
    assert noise.verdict == "noise" and noise.denoise_ratio > NOISE_RATIO
    constant = torch.rand(32, 3, 1, 1, generator=torch.Generator().manual_seed(0)).expand_as(samples) * 2 - 1
    flat = assess(teacher, constant.contiguous(), None, reference, None)
    assert flat.flat_ratio < FLAT_RATIO and flat.verdict in ("flat", "noise")
    grey = assess(teacher, torch.zeros_like(samples), None, reference, None)
    assert grey.verdict == "flat" and grey.flat_ratio == 0
    broken = samples.clone()
    broken[0, 0, 0, 0] = float("nan")
    assert assess(teacher, broken, None, reference, None).verdict == "nonfinite"


def test_a_collapsed_run_says_so_everywhere(tmp_path):
    """SiD at a learning rate 3e-2 turns the toy student to noise in 3 steps: warned, logged, on the card (checked
    at the sample interval, step 2, and at the end of training)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastgen", "distill", "--config", "toy_sid", "--teacher", "toy",
                           "--max-steps", "3", "--output", str(out), "train.lr=3e-2", "train.log_every=1", "train.sample_every=2"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: step 3: the student's samples look like noise" in proc.stderr
    assert "health=NOISE" in proc.stderr  # the bar's last record, after the check at the sample of step 2
    checks = [json.loads(line) for line in (out / "health.jsonl").read_text().splitlines()]
    assert [e["step"] for e in checks] == [2, 3]  # at the sample interval and at the end
    health = checks[-1]
    assert health["verdict"] == "noise" and health["denoise_ratio"] > NOISE_RATIO
    assert all("event" not in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    meta = json.loads((out / "export" / "fastgen_export.json").read_text())
    assert meta["health"] == health
    assert "**the samples looked like noise**" in (out / "export" / "README.md").read_text()
