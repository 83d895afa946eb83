"""Bad input through the real command line: each mistake prints one ``error:`` line naming the offending key,
path or value, exits non-zero (2 for usage errors) without a traceback, and leaves no file behind.

Every case runs ``fastgen.cli.main`` in-process; "nothing left behind" compares every file under pytest's
temporary root (path, size, mtime) before and after, so a finished run used as a resume or export source must
also be byte-for-byte as it was. Fixtures are built once per session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from tiny import make_ddpm_folder

from fastgen.cli import main


@dataclass
class Fixtures:
    teacher: Path
    pickled: Path
    run: Path
    """A finished 2-step consistency run (full fine-tune) with its export in ``run/export``."""
    images: Path
    """A folder of 8x8 images fitting the teacher."""


@pytest.fixture(scope="session")
def fx(tmp_path_factory) -> Fixtures:
    root = tmp_path_factory.mktemp("bad-inputs")
    teacher = make_ddpm_folder(root / "teacher", sample_size=8)
    pickled = make_ddpm_folder(root / "pickled", sample_size=8, safe_serialization=False)
    run = root / "run"
    assert main(["distill", "--teacher", str(teacher), "--method", "consistency", "--data", "teacher", "--output",
                 str(run), "--steps", "2", "--max-steps", "2", "teacher_samples=8", "teacher_sample_steps=2",
                 "train.batch_size=4"]) == 0
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 20, 200)).save(images / f"{i}.png")
    return Fixtures(teacher, pickled, run, images)



def snapshot(root: Path) -> dict[str, tuple]:
    """Every folder under ``root``, and every file with its size and mtime (a rewrite with equal bytes shows)."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        state[str(path)] = "folder" if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return state


def copy_teacher(fx: Fixtures, tmp: Path) -> Path:
    return Path(shutil.copytree(fx.teacher, tmp / "teacher"))


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def distill(fx: Fixtures, tmp: Path, *extra: str, teacher: Path | None = None, data: str | None = "teacher",
            method: str | None = "consistency", output: Path | None = None) -> list[str]:
    argv = ["distill", "--teacher", str(teacher or fx.teacher), "--output", str(output or tmp / "run"),
            "--max-steps", "1"]
    if method is not None:
        argv += ["--method", method]
    if data is not None:
        argv += ["--data", data]
    overrides = [e for e in extra if not e.startswith("-") and "=" in e or e == "train.lr"]
    flags = [e for e in extra if e not in overrides]
    return argv + flags + ["teacher_samples=4", "teacher_sample_steps=2", "train.batch_size=2"] + overrides


# -- case set-ups: each makes what its case needs under ``tmp`` and returns the argv ---------------------------
def truncated_teacher(fx, tmp):
    teacher = copy_teacher(fx, tmp)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return distill(fx, tmp, teacher=teacher)


def no_index_teacher(fx, tmp):
    teacher = copy_teacher(fx, tmp)
    (teacher / "model_index.json").unlink()
    return distill(fx, tmp, teacher=teacher)


def bad_json_teacher(fx, tmp):
    teacher = copy_teacher(fx, tmp)
    (teacher / "model_index.json").write_text('{"unet": ["diffusers", ')
    return distill(fx, tmp, teacher=teacher)


def unsupported_model_teacher(fx, tmp):
    teacher = copy_teacher(fx, tmp)
    edit_json(teacher / "model_index.json", unet=["diffusers", "UNet3DConditionModel"])
    return distill(fx, tmp, teacher=teacher)


def unknown_scheduler_teacher(fx, tmp):
    teacher = copy_teacher(fx, tmp)
    edit_json(teacher / "model_index.json", scheduler=["diffusers", "MadeUpScheduler"])
    edit_json(teacher / "scheduler" / "scheduler_config.json", _class_name="MadeUpScheduler")
    return distill(fx, tmp, teacher=teacher)


def yaml_file(text):
    def setup(fx, tmp):
        (tmp / "bad.yaml").write_text(text)
        return distill(fx, tmp, "--config", str(tmp / "bad.yaml"))
    return setup


def empty_folder_data(fx, tmp):
    (tmp / "empty").mkdir()
    return distill(fx, tmp, data=str(tmp / "empty"))


def csv_data(fx, tmp):
    (tmp / "data.csv").write_text("a,b\n")
    return distill(fx, tmp, data=str(tmp / "data.csv"))


def prompts_data(fx, tmp):
    (tmp / "prompts.txt").write_text("a cat\n")
    return distill(fx, tmp, data=str(tmp / "prompts.txt"))


def wrong_size_images(fx, tmp):
    (tmp / "big").mkdir()
    Image.new("RGB", (12, 10)).save(tmp / "big" / "a.png")
    return distill(fx, tmp, data=str(tmp / "big"))


def broken_image(fx, tmp):
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.png").write_bytes(b"not a png at all")
    return distill(fx, tmp, data=str(tmp / "broken"))


def run_copy(fx, tmp) -> Path:
    return Path(shutil.copytree(fx.run, tmp / "run-copy"))


def truncated_checkpoint(fx, tmp):
    run = run_copy(fx, tmp)
    state = next((run / "checkpoints").glob("step-*")) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    return distill(fx, tmp, "--steps", "2", "--resume", "latest", output=run)


def config_only_run(fx, tmp):
    (tmp / "half").mkdir()
    shutil.copy(fx.run / "config.yaml", tmp / "half" / "config.yaml")
    return ["export", "--run", str(tmp / "half"), "--output", str(tmp / "out")]


def nonempty_output(fx, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return ["export", "--run", str(fx.run), "--output", str(tmp / "mine")]


def a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file"


def read_only_folder(tmp: Path, monkeypatch) -> Path:
    folder = tmp / "locked"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: stand in for a read-only mount
        import fastgen.errors

        monkeypatch.setattr(fastgen.errors, "_read_only_mount", lambda path: Path(path) == folder)
    else:
        folder.chmod(0o500)
    return folder


def empty_prompts(tmp: Path) -> Path:
    (tmp / "empty.txt").write_text("\n \n")
    return tmp / "empty.txt"


def truncated_inception(tmp: Path) -> Path:
    torch.save({"w": torch.ones(1000)}, tmp / "inception.pth")
    data = (tmp / "inception.pth").read_bytes()
    (tmp / "inception.pth").write_bytes(data[: len(data) // 2])
    return tmp / "inception.pth"


def student(fx) -> str:
    return str(fx.run / "export")


# (id, set-up (fx, tmp, monkeypatch) -> argv, exit status, substrings the one error line must hold)
CASES: list[tuple[str, Callable, int, list[str]]] = [
    # -- distill: teacher
    ("teacher-missing", lambda fx, t, m: distill(fx, t, teacher=t / "nope"), 1, ["nope", "does not exist"]),
    ("teacher-is-file", lambda fx, t, m: distill(fx, t, teacher=a_file(t)), 1, ["file", "is a file"]),
    ("teacher-no-index", lambda fx, t, m: no_index_teacher(fx, t), 1, ["model_index.json"]),
    ("teacher-bad-json", lambda fx, t, m: bad_json_teacher(fx, t), 1, ["model_index.json", "not valid JSON"]),
    ("teacher-pickled", lambda fx, t, m: distill(fx, t, teacher=fx.pickled), 1, ["pickled", "--trust-pickle"]),
    ("teacher-truncated", lambda fx, t, m: truncated_teacher(fx, t), 1,
     ["diffusion_pytorch_model.safetensors", "incomplete"]),
    ("teacher-unsupported-model", lambda fx, t, m: unsupported_model_teacher(fx, t), 1,
     ["UNet3DConditionModel", "not supported"]),
    ("teacher-unknown-scheduler", lambda fx, t, m: unknown_scheduler_teacher(fx, t), 1, ["MadeUpScheduler"]),
    # -- distill: method, config keys and values
    ("method-typo", lambda fx, t, m: distill(fx, t, method="consistensy"), 2, ["consistensy", "'consistency'"]),
    ("method-missing", lambda fx, t, m: distill(fx, t, method=None), 2, ["method", "required"]),
    ("key-typo", lambda fx, t, m: distill(fx, t, "train.lrr=1e-4"), 2, ["train.lrr", "did you mean 'train.lr'"]),
    ("value-type", lambda fx, t, m: distill(fx, t, "train.lr=fast"), 2, ["train.lr", "'fast'", "float"]),
    ("literal-value", lambda fx, t, m: distill(fx, t, "train.mixed_precision=fp32"), 2,
     ["train.mixed_precision", "'fp32'", "'bf16'"]),
    ("batch-size-zero", lambda fx, t, m: distill(fx, t, "train.batch_size=0"), 2, ["train.batch_size", ">= 1"]),
    ("max-steps-flag-zero", lambda fx, t, m: distill(fx, t, "--max-steps", "0"), 2, ["--max-steps", "'0'"]),
    ("max-steps-key-zero", lambda fx, t, m: distill(fx, t, "train.max_steps=0"), 2,
     ["train.max_steps", "untrained"]),
    ("steps-flag-negative", lambda fx, t, m: distill(fx, t, "--steps", "-2"), 2, ["--steps", "'-2'"]),
    ("steps-beyond-grid", lambda fx, t, m: distill(fx, t, "--steps", "100"), 2,
     ["student.num_steps is 100", "50 points"]),
    ("override-no-equals", lambda fx, t, m: distill(fx, t, "train.lr"), 2, ["train.lr", "key=value"]),
    ("section-as-value", lambda fx, t, m: distill(fx, t, "train=3"), 2, ["train", "section"]),
    ("objective-key-typo", lambda fx, t, m: distill(fx, t, "objective.skp=10"), 2,
     ["objective.skp", "objective.skip"]),
    ("objective-solver", lambda fx, t, m: distill(fx, t, "objective.solver=euler"), 2,
     ["objective.solver", "'euler'"]),
    ("prediction-type", lambda fx, t, m: distill(fx, t, "student.prediction_type=velocity"), 2,
     ["student.prediction_type", "'velocity'"]),
    ("timesteps-count", lambda fx, t, m: distill(fx, t, "--steps", "2", "student.timesteps=[999]"), 2,
     ["student.timesteps", "2 timesteps"]),
    ("height-off-the-unets-grid", lambda fx, t, m: distill(fx, t, "--height", "7"), 1,
     ["height is 7", "multiple of 2", "the UNet's 1 downsampling)"]),
    ("timesteps-out-of-range", lambda fx, t, m: distill(fx, t, "--steps", "1", "student.timesteps=[5000]"), 2,
     ["student.timesteps is [5000]", "[0, 999]"]),
    ("timesteps-ascending", lambda fx, t, m: distill(fx, t, "--steps", "2", "student.timesteps=[100,999]"), 2,
     ["student.timesteps is [100, 999]", "descending"]),
    ("weight-nan", lambda fx, t, m: distill(fx, t, "objective.huber_c=nan"), 2,
     ["objective.huber_c is 'nan'", "finite"]),
    ("lr-inf", lambda fx, t, m: distill(fx, t, "train.lr=inf"), 2, ["train.lr is 'inf'", "finite"]),
    ("lora-flag-full-fine-tune", lambda fx, t, m: distill(fx, t, "--lora"), 2, ["--lora", "student.lora_rank"]),
    ("lora-flag-experts", lambda fx, t, m: distill(fx, t, "--lora", "student.lora_rank=4", "student.experts=2"), 2,
     ["--lora", "student.experts"]),
    ("xformers-missing", lambda fx, t, m: distill(fx, t, "train.attention=xformers"), 1, ["xformers", "sdpa"]),
    ("fp16-without-gpu", lambda fx, t, m: distill(fx, t, "train.mixed_precision=fp16"), 1, ["fp16", "bf16"]),
    # -- distill: config files
    ("preset-typo", lambda fx, t, m: distill(fx, t, "--config", "toy_consistensy"), 2,
     ["toy_consistensy", "did you mean 'toy_consistency'"]),
    ("yaml-broken", lambda fx, t, m: yaml_file("train:\n  lr: [1e-4,\n")(fx, t), 2, ["bad.yaml:3:1", "invalid YAML"]),
    ("yaml-duplicate-key", lambda fx, t, m: yaml_file("train:\n  max_steps: 3\n  max_steps: 4\n")(fx, t), 2,
     ["bad.yaml:3:3", "duplicate key 'max_steps'"]),
    ("yaml-not-mapping", lambda fx, t, m: yaml_file("- a\n- b\n")(fx, t), 2, ["bad.yaml", "mapping"]),
    ("yaml-unknown-key", lambda fx, t, m: yaml_file("train:\n  bacth_size: 2\n")(fx, t), 2,
     ["train.bacth_size", "train.batch_size", "bad.yaml"]),
    # -- distill: data
    ("data-missing", lambda fx, t, m: distill(fx, t, data=str(t / "photos")), 1, ["photos", "does not exist"]),
    ("data-empty-folder", lambda fx, t, m: empty_folder_data(fx, t), 1, ["empty", "holds no images"]),
    ("data-wrong-file", lambda fx, t, m: csv_data(fx, t), 1, ["data.csv", "image folder"]),
    ("data-prompts-for-pixel-teacher", lambda fx, t, m: prompts_data(fx, t), 1, ["prompts.txt", "takes no prompts"]),
    ("data-none-for-consistency", lambda fx, t, m: distill(fx, t, data=None), 2, ["'consistency' needs data"]),
    ("data-wrong-size", lambda fx, t, m: wrong_size_images(fx, t), 1, ["a.png", "12x10", "8x8", "resize_data=true"]),
    ("data-broken-image", lambda fx, t, m: broken_image(fx, t), 1, ["a.png", "cannot read image"]),
    # -- distill: resume
    ("resume-nothing", lambda fx, t, m: distill(fx, t, "--resume", "latest"), 1, ["--resume latest", "no checkpoint"]),
    ("resume-missing-folder", lambda fx, t, m: distill(fx, t, "--resume", str(t / "step-9")), 1,
     ["step-9", "does not exist"]),
    ("resume-other-method", lambda fx, t, m: distill(fx, t, "--steps", "2", "--resume", "latest", output=fx.run,
                                                      method="progressive"), 2,
     ["method 'consistency' -> 'progressive'"]),
    ("resume-other-student", lambda fx, t, m: distill(fx, t, "--steps", "4", "--resume", "latest", output=fx.run), 2,
     ["student.num_steps 2 -> 4"]),
    ("resume-truncated-checkpoint", lambda fx, t, m: truncated_checkpoint(fx, t), 1,
     ["state.safetensors", "incomplete"]),
    # -- distill: output
    ("output-under-file", lambda fx, t, m: distill(fx, t, output=a_file(t) / "run"), 1, ["is a file, not a folder"]),
    ("output-is-a-file", lambda fx, t, m: distill(fx, t, output=a_file(t)), 1, ["is a file; expected a run folder"]),
    ("output-name-too-long", lambda fx, t, m: distill(fx, t, output=t / ("a" * 300) / "run"), 1,
     ["the name aaaa", "300 bytes long", "at most 255"]),
    ("output-path-too-long", lambda fx, t, m: distill(fx, t, output=t.joinpath(*["b" * 200] * 25)), 1,
     ["the path", "bytes long; expected at most"]),
    ("output-read-only", lambda fx, t, m: distill(fx, t, output=read_only_folder(t, m) / "run"), 1,
     ["locked", "not writable"]),
    # -- export
    ("export-not-a-run", lambda fx, t, m: ["export", "--run", str(t), "--output", str(t / "o")], 1,
     ["not a fastgen run", "config.yaml"]),
    ("export-no-checkpoint", lambda fx, t, m: config_only_run(fx, t), 1, ["half", "no checkpoint"]),
    ("export-bad-checkpoint", lambda fx, t, m: ["export", "--run", str(fx.run), "--output", str(t / "o"),
                                                "--checkpoint", str(fx.run / "checkpoints" / "step-00000099")], 1,
     ["step-00000099", "does not exist", "step-00000002"]),
    ("export-lora-of-full", lambda fx, t, m: ["export", "--run", str(fx.run), "--output", str(t / "o"), "--lora"], 2,
     ["--lora", "no LoRA adapter", "lora_rank is 0"]),
    ("export-nonempty-output", lambda fx, t, m: nonempty_output(fx, t), 1, ["mine", "not empty"]),
    ("export-output-under-file", lambda fx, t, m: ["export", "--run", str(fx.run), "--output",
                                                   str(a_file(t) / "o")], 1, ["--output", "is a file"]),
    # -- sample
    ("sample-num-zero", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "2", "--num", "0", "--out",
                                          str(t / "g.png")], 2, ["--num", "'0'"]),
    ("sample-steps-untrained", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "3", "--out",
                                                 str(t / "g.png")], 2, ["3 steps", "trained for [1, 2"]),
    ("sample-steps-beyond-teacher", lambda fx, t, m: ["sample", "--model", str(fx.teacher), "--steps", "5000",
                                                      "--num", "1", "--out", str(t / "g.png")], 2, ["5000", "1000"]),
    ("sample-model-missing", lambda fx, t, m: ["sample", "--model", str(t / "m"), "--steps", "1", "--out",
                                               str(t / "g.png")], 1, ["--model", "does not exist"]),
    ("sample-out-under-file", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "2", "--out",
                                                str(a_file(t) / "g.png")], 1, ["--out", "is a file"]),
    ("sample-prompt-for-pixel-model", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "2", "--num",
                                                        "1", "--prompt", "a cat", "--out", str(t / "g.png")], 1,
     ["takes no prompts"]),
    ("sample-prompts-file-missing", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "2",
                                                      "--prompts-file", str(t / "p.txt"), "--out",
                                                      str(t / "g.png")], 1, ["p.txt", "does not exist"]),
    ("sample-prompts-file-empty", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "2",
                                                    "--prompts-file", str(empty_prompts(t)), "--out",
                                                    str(t / "g.png")], 1, ["empty.txt", "empty"]),
    ("sample-unknown-sampler", lambda fx, t, m: ["sample", "--model", student(fx), "--steps", "2", "--sampler",
                                                 "euler", "--out", str(t / "g.png")], 2, ["--sampler", "'euler'"]),
    # -- eval
    ("eval-num-samples-zero", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--num-samples",
                                                "0", "--out", str(t / "e")], 2, ["--num-samples", "'0'"]),
    ("eval-num-samples-one", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--num-samples",
                                               "1", "--features", "toy", "--out", str(t / "e")], 2,
     ["--num-samples 1", "at least 2"]),
    ("eval-steps-zero", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "0,1", "--out", str(t / "e")],
     2, ["--steps", "'0,1'"]),
    ("eval-unknown-metric", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--metrics",
                                              "fid,fdi", "--features", "toy", "--out", str(t / "e")], 2, ["fdi"]),
    ("eval-kid-without-folder", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--metrics", "kid",
                                                  "--features", "toy", "--out", str(t / "e")], 2, ["kid", "--ref"]),
    ("eval-clip-without-prompts", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--metrics",
                                                    "clip", "--out", str(t / "e")], 2, ["clip", "prompts"]),
    ("eval-inception-missing", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--ref",
                                                 str(fx.images), "--inception-weights", str(t / "w.pth"), "--out",
                                                 str(t / "e")], 1, ["w.pth", "never downloads"]),
    ("eval-inception-truncated", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--ref",
                                                   str(fx.images), "--inception-weights", str(truncated_inception(t)),
                                                   "--out", str(t / "e")], 1, ["inception.pth", "cannot be read"]),
    ("eval-ref-missing", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--features", "toy",
                                           "--ref", str(t / "refs"), "--out", str(t / "e")], 1,
     ["--ref", "refs", "does not exist"]),
    ("eval-npz-with-toy-features", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--features",
                                                     "toy", "--ref", str(t / "r.npz"), "--out", str(t / "e")], 2,
     ["r.npz", "--features toy"]),
    ("eval-steps-untrained", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "3", "--features", "toy",
                                               "--num-samples", "4", "--out", str(t / "e")], 2,
     ["3 steps", "trained for [1, 2"]),
    ("eval-toy-features-wrong-size", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "1", "--features",
                                                       "toy", "--num-samples", "4", "--out", str(t / "e")], 1,
     ["--features toy", "16x16", "(4, 3, 8, 8)"]),
    ("eval-out-under-file", lambda fx, t, m: ["eval", "--model", student(fx), "--steps", "2", "--features", "toy",
                                              "--out", str(a_file(t) / "e")], 1, ["--out", "is a file"]),
]


@pytest.mark.parametrize("name, setup, status, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing(name, setup, status, expected, fx, tmp_path, monkeypatch,
                                                     capsys, tmp_path_factory):
    if name == "xformers-missing" and __import__("importlib.util").util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    if name == "fp16-without-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    monkeypatch.chdir(tmp_path)
    argv = setup(fx, tmp_path, monkeypatch)
    root = tmp_path_factory.getbasetemp()
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert snapshot(root) == before, "the failing command left files behind or changed existing ones"


def test_the_advice_for_images_of_another_size_trains(fx, tmp_path):
    """The refusal of images of another size names ``resize_data=true`` (it named ``resize=True``, which the CLI
    refused as an unknown key); with it the same command center-crops, resizes and trains."""
    assert main(wrong_size_images(fx, tmp_path) + ["resize_data=true"]) == 0
    assert (tmp_path / "run" / "export" / "model_index.json").is_file()


def test_the_finished_run_is_still_a_run(fx, tmp_path):
    """The bad-input cases above used the finished run as resume and export source; it still exports."""
    assert main(["export", "--run", str(fx.run), "--output", str(tmp_path / "out")]) == 0


def test_no_traceback_reaches_a_real_terminal(fx, tmp_path):
    for argv, status, expected in [
        (["distill", "--teacher", str(tmp_path / "nope"), "--method", "consistency"], 1, "does not exist"),
        (["sample", "--model", str(fx.teacher), "--steps", "2", "--num", "-1", "--out", "x.png"], 2, "--num"),
    ]:
        env = {**os.environ, "FASTGEN_DEBUG": ""}
        done = subprocess.run([sys.executable, "-m", "fastgen", *argv], capture_output=True, text=True, cwd=tmp_path,
                              env=env)
        assert done.returncode == status, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error:") and expected in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(fx, tmp_path, monkeypatch):
    from fastgen.errors import MissingPathError

    argv = ["distill", "--teacher", str(tmp_path / "nope"), "--method", "consistency", "--output", str(tmp_path / "r")]
    with pytest.raises(MissingPathError, match="does not exist"):
        main(["--debug", *argv])
    with pytest.raises(MissingPathError):
        main([*argv, "--debug"])
    monkeypatch.setenv("FASTGEN_DEBUG", "1")
    with pytest.raises(MissingPathError):
        main(argv)


def test_a_bug_keeps_its_traceback_and_says_so(fx, tmp_path, monkeypatch, capsys):
    import fastgen.generate

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(fastgen.generate, "generate", broken)
    code = main(["sample", "--model", str(fx.teacher), "--steps", "2", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "an internal invariant failed" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in fastgen")
