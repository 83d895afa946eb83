"""``fastgen demo``: one student per step count, trained side by side in child processes on one shared cache,
then swept, gridded and exported (tiny budgets: the figures of a real run are in README.md)."""

import csv
import subprocess
import sys
from pathlib import Path

from PIL import Image


def demo(out, *extra, cwd=None):
    """The ``fastgen`` console script, as README runs it."""
    script = Path(sys.executable).parent / "fastgen"
    return subprocess.run([str(script), "demo", "--out", str(out), "--num-samples", "8", "--max-steps", "2", *extra],
                          capture_output=True, text=True, cwd=cwd)


def test_the_demo_trains_one_student_per_step_count_and_sweeps_each_at_its_count(tmp_path):
    out = tmp_path / "demo"
    checkout = tmp_path / "checkout"  # run from a folder holding a fastgen/ folder, as README's clone does: the
    (checkout / "fastgen").mkdir(parents=True)  # children must import the installed package, not this one
    (checkout / "fastgen" / "__init__.py").write_text("raise ImportError('the checkout, not the installed fastgen')")
    done = demo(out, "--student-steps", "1,2", "--steps", "1,2,4", "teacher_samples=16", "teacher_sample_steps=2",
                "train.batch_size=4", "train.log_every=1", cwd=checkout)
    assert done.returncode == 0, done.stderr[-2000:]
    for n in (1, 2):
        assert (out / f"run-{n}step" / "export" / "model_index.json").is_file()
        assert not (out / f"run-{n}step" / "cache").exists()  # the shared cache, not one per run
    assert len(list((out / "cache").glob("teacher-samples-*.safetensors"))) == 1  # generated once
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["curve"], r["steps"]) for r in rows] == [("student (dmd)", "1"), ("student (dmd)", "2"),
                                                        ("teacher DDIM", "1"), ("teacher DDIM", "2")]
    assert all(float(r["toy_fid"]) > 0 for r in rows)
    with Image.open(out / "grid.png") as grid:  # rows teacher 1, student 1, teacher 64; 12 columns of 16x16 x4
        assert grid.size == (12 * 64 + 13, 3 * 64 + 4)  # 1-pixel padding
    assert "student (dmd)" in done.stdout and "distillation" in done.stdout
    weights = (out / "run-1step" / "export" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = demo(out, "--student-steps", "1,2", "--steps", "1,2,4", "teacher_samples=16", "teacher_sample_steps=2",
                 "train.batch_size=4", "train.log_every=1")  # the same command again: the finished runs are reused
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "run-1step" / "export" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_a_bad_override_is_one_line_before_any_student_starts(tmp_path):
    out = tmp_path / "demo"
    done = demo(out, "train.lr=-1")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "train.lr" in lines[-1] and "Traceback" not in done.stderr
    assert not list(out.glob("run-*"))
