"""Sweep over step counts: rows, CSV, Markdown and PNG from fake curves and metrics."""

import pytest
import torch
from PIL import Image

from fastgen.eval.sweep import run_sweep


def fake_curve(offset):
    """Images whose mean pixel is offset + 1/steps: a curve that improves with steps."""
    return lambda steps: torch.full((2, 3, 4, 4), offset + 1.0 / steps)


METRICS = {"mean": lambda images: float(images.mean()), "double": lambda images: 2 * float(images.mean())}


def test_rows_csv_markdown_and_png(tmp_path):
    curves = {"student": fake_curve(0.0), "teacher": fake_curve(0.5)}
    rows = run_sweep(curves, [1, 2, 4], METRICS, tmp_path / "out", progress=False)
    expected = [
        {"curve": name, "steps": n, "mean": offset + 1.0 / n, "double": 2 * (offset + 1.0 / n)}
        for name, offset in (("student", 0.0), ("teacher", 0.5)) for n in (1, 2, 4)
    ]
    assert rows == [pytest.approx(row) for row in expected]
    csv_lines = [f"{r['curve']},{r['steps']},{r['mean']!r},{r['double']!r}" for r in rows]
    assert (tmp_path / "out" / "sweep.csv").read_text() == "\n".join(["curve,steps,mean,double"] + csv_lines) + "\n"
    assert (tmp_path / "out" / "sweep.md").read_text() == (
        "| curve | steps | mean | double |\n"
        "|---|---:|---:|---:|\n"
        "| student | 1 | 1 | 2 |\n"
        "| student | 2 | 0.5 | 1 |\n"
        "| student | 4 | 0.25 | 0.5 |\n"
        "| teacher | 1 | 1.5 | 3 |\n"
        "| teacher | 2 | 1 | 2 |\n"
        "| teacher | 4 | 0.75 | 1.5 |\n"
    )
    with Image.open(tmp_path / "out" / "sweep.png") as image:
        assert image.format == "PNG" and image.width > image.height  # two subplots side by side
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sweep.csv", "sweep.md", "sweep.png"]


def test_markdown_float_format_and_call_counts(tmp_path):
    calls = []

    def curve(steps):
        calls.append(steps)
        return torch.full((1,), 1.0 / 3.0)

    run_sweep({"only": curve}, [8, 1], {"m": lambda images: float(images[0])}, tmp_path, float_format=".2f",
              progress=False)
    assert calls == [8, 1]  # images generated once per (curve, steps), shared by the metrics
    assert (tmp_path / "sweep.md").read_text().splitlines()[2:] == ["| only | 8 | 0.33 |", "| only | 1 | 0.33 |"]


def test_interrupted_sweep_keeps_finished_rows(tmp_path):
    def curve(steps):
        if steps == 4:
            raise RuntimeError("out of memory")
        return torch.ones(1)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep({"student": curve}, [1, 2, 4], {"m": lambda images: 1.0}, tmp_path, progress=False)
    assert (tmp_path / "sweep.csv").read_text() == "curve,steps,m\nstudent,1,1.0\nstudent,2,1.0\n"
    assert not (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize(
    "curves, steps, metrics, message",
    [
        ({}, [1], METRICS, "curves={}, expected a non-empty mapping"),
        ({"s": fake_curve(0)}, [], METRICS, r"steps=\[\], expected distinct positive ints"),
        ({"s": fake_curve(0)}, [1, 0], METRICS, r"steps=\[1, 0\], expected distinct positive ints"),
        ({"s": fake_curve(0)}, [2, 2], METRICS, r"steps=\[2, 2\]"),
        ({"s": fake_curve(0)}, [1], {}, "metrics={}, expected a non-empty mapping"),
        ({"s": fake_curve(0)}, [1], {"steps": float}, r"metric name\(s\) \['steps'\] clash"),
        ({"s": fake_curve(0)}, [1], {"m": lambda images: "bad"},
         "metric 'm' returned 'bad' for curve 's' at 1 steps, expected a number"),
    ],
)
def test_bad_input(tmp_path, curves, steps, metrics, message):
    with pytest.raises(ValueError, match=message):
        run_sweep(curves, steps, metrics, tmp_path, progress=False)


def test_the_teacher_curve_of_an_export_is_sampled_at_the_exports_trained_size(tmp_path):
    """An export trained at another size than its teacher's own: ``eval --teacher`` sampled the teacher at its
    default (Wan 2.2: 480 x 832 x 81 against 32 x 32 x 5 trained), which failed or compared other sizes."""
    from tiny import make_ddpm_folder

    from fastgen.cli import main
    from fastgen.eval.evaluate import evaluate

    teacher = make_ddpm_folder(tmp_path / "teacher", sample_size=8)
    assert main(["distill", "--teacher", str(teacher), "--method", "consistency", "--data", "teacher", "--output",
                 str(tmp_path / "run"), "--steps", "1", "--max-steps", "1", "--height", "16", "--width", "16",
                 "teacher_samples=4", "teacher_sample_steps=2", "train.batch_size=2"]) == 0
    width = {"width": lambda images: float(images.shape[-1])}
    rows = evaluate(str(tmp_path / "run" / "export"), [1], tmp_path / "eval", 2, width, teacher_dir=str(teacher))
    assert {row["curve"]: row["width"] for row in rows} == {"model": 16.0, "teacher DDIM": 16.0}
    rows = evaluate(str(tmp_path / "run" / "export"), [1], tmp_path / "eval8", 2, width, teacher_dir=str(teacher),
                    size={"height": 8, "width": 8, "num_frames": None})  # --height/--width: both at the size asked
    assert {row["curve"]: row["width"] for row in rows} == {"model": 8.0, "teacher DDIM": 8.0}
