"""scripts/bench_gpu.py runs every section on tiny configs on the CPU (its figures are checked on a GPU only)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_section_and_writes_its_tables(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    # SDXL's UNet (pooled text and time ids besides the text embeddings); the script's default adds SD1.5's
    bench.main(["--tiny", "--networks", "sdxl", "--steps", "1", "--precision-steps", "2", "--sample-batch", "1",
                "--teacher-steps", "4", "--no-estimate", "--out", str(out)])  # the estimate: tests/test_estimate.py
    report = json.loads(out.read_text())
    assert [(r["network"], r["mode"]) for r in report["training"]] == [
        ("sdxl", m) for m in bench.MODES]
    for row in report["training"]:
        assert "error" not in row, row
        assert row["iteration_s"] > 0 and row["flops"] > 0 and row["estimate_bytes"] is None
    full, lora = report["training"][0], report["training"][1]
    assert lora["parameters"]["fake"] < full["parameters"]["fake"] / 2  # a LoRA fake score, not a copy
    assert report["training"][3]["parameters"]["student"] < full["parameters"]["student"] / 2
    for s in report["sampling"]:
        assert s["speedup_denoiser"] > 1 and s["student_timesteps"]
    assert report["attention"]["sdpa_iteration_s"] > 0
    precision = report["precision"]
    assert precision["bf16_finite"] and precision["fp16_finite"]
    assert all(math.isfinite(v) for p in ("bf16", "fp16") for v in precision[p]["generator"])
    text = out.with_suffix(".md").read_text()
    assert "| sdxl | LoRA fake + checkpointing + LoRA student | 2 |" in text
