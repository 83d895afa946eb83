"""The ``fastgen`` command line: commands, presets, sample, distill → export → sample, eval."""

import csv
import re
import subprocess
import sys

import pytest
from PIL import Image
from tiny import make_ddpm_folder

from fastgen.cli import main
from fastgen.config import PRESETS_DIR, DistillConfig, load_config


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    return make_ddpm_folder(tmp_path_factory.mktemp("cli") / "teacher", sample_size=8)


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "fastgen", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "distill", "sample", "eval", "export"):
        assert command in out


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_presets_load_and_validate(preset):
    config = load_config(DistillConfig, PRESETS_DIR / f"{preset}.yaml", ["teacher=somewhere", "data=images"])
    config.validate()
    from fastgen.config import config_from_dict, config_to_dict
    from fastgen.losses import objective_class

    cls = objective_class(config.method)
    assert isinstance(config.objective, cls.Config)  # typed (and checked: unknown keys raise) when loaded
    settings = config_to_dict(config)["objective"]
    assert config_from_dict(cls.Config, settings, prefix="objective") == config.objective


def test_distill_help_lists_every_preset():
    out = subprocess.run([sys.executable, "-m", "fastgen", "distill", "--help"], capture_output=True, text=True,
                         check=True).stdout
    listed = set(" ".join(out.split()).replace(",", " ").replace("(", " ").replace(")", " ").replace(";", " ").split())
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    assert len(presets) >= 30 and set(presets) <= listed
    from fastgen.losses import OBJECTIVES

    method_help = " ".join(out.split()).split("--method METHOD objective:")[1].split("--config")[0]
    assert len(OBJECTIVES) >= 13 and set(OBJECTIVES) <= set(method_help.replace(",", " ").split())


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """``fastgen estimate ... | head -1``: the reader leaving is no error of fastgen's (status 141, as SIGPIPE
    ends a tool; nothing on stderr), where a write to the closed pipe used to end in a traceback and "a bug in
    fastgen"."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "fastgen", "estimate", "--teacher", "toy", "--method", "dmd2",
                               "--batch-size", "2", "--no-modes", "--device", "cpu"], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_sample_writes_a_grid(ddpm, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(ddpm), "--steps", "3", "--num", "4", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (2 * 8 + 3, 2 * 8 + 3)  # 2x2 grid of 8x8 with 1-pixel padding


def test_sample_of_a_class_conditional_model_cycles_its_classes(tmp_path, capsys):
    """Without --class-labels every class in turn (it raised diffusers' "class_labels should be provided" as a
    fastgen bug); with it, only those; a label out of range is one line."""
    import numpy as np

    folder = make_ddpm_folder(tmp_path / "classes", sample_size=8, num_class_embeds=3)
    grids = {}
    for name, extra in (("all", []), ("one", ["--class-labels", "1"]), ("cycle", ["--class-labels", "0,1,2"])):
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--model", str(folder), "--steps", "2", "--num", "3", "--out", str(out), *extra]) == 0
        with Image.open(out) as image:
            grids[name] = np.asarray(image.convert("RGB"))
    assert np.array_equal(grids["all"], grids["cycle"]) and not np.array_equal(grids["all"], grids["one"])
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "x.png"),
                 "--class-labels", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: class labels [3] out of range: {folder} has 3 classes; expected labels 0 to 2")
    assert main(["sample", "--model", str(tmp_path / "classes"), "--steps", "2", "--out", str(tmp_path / "y.png"),
                 "--class-labels", "-1"]) == 2  # argparse's own line
    assert "expected comma-separated class labels like 0 or 3,7, got '-1'" in capsys.readouterr().err


def test_distill_export_sample_round_trip(ddpm, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code = main(["distill", "--teacher", str(ddpm), "--method", "consistency", "--data", "teacher",
                 "--output", str(run), "--steps", "2", "--max-steps", "2", "teacher_samples=8",
                 "teacher_sample_steps=2", "train.batch_size=4", "train.log_every=1"])
    assert code == 0 and "student exported to" in capsys.readouterr().out
    assert (run / "export" / "model_index.json").is_file()
    again = tmp_path / "again"
    assert main(["export", "--run", str(run), "--output", str(again), "--no-ema"]) == 0
    # --checkpoint by its name in the run's checkpoints folder, from any working directory
    (name,) = [p.name for p in (run / "checkpoints").iterdir()]
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "named"), "--checkpoint", name]) == 0
    assert (tmp_path / "named" / "model_index.json").is_file()
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "bad"), "--checkpoint", "step-9"]) == 1
    assert f"does not exist; available in {run / 'checkpoints'}: {name}" in capsys.readouterr().err
    out = tmp_path / "student.png"
    assert main(["sample", "--model", str(again), "--steps", "2", "--num", "4", "--out", str(out)]) == 0
    assert out.is_file()


def test_cli_errors_are_plain(ddpm, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    cases = [
        (["distill", "--config", "no_such_preset", "--teacher", str(ddpm), "--method", "consistency"], 2,
         "neither a file nor a preset; presets are"),
        (["distill", "--teacher", str(ddpm), "--method", "consistency", "--output", str(tmp_path / "r"), "--lora"], 2,
         "student.lora_rank is 0"),
        (["sample", "--model", str(ddpm), "--steps", "1", "--out", str(tmp_path / "x.png"), "--prompts-file",
          str(blank)], 1, "blank.txt is empty"),
        (["distill", "--teacher", str(ddpm), "--method", "consistency", "--data", "teacher", "--prompts", str(prompts),
          "--output", str(tmp_path / "p"), "--max-steps", "1"], 1, "prompts.txt given to the teacher"),
        (["eval", "--model", str(ddpm), "--steps", "1", "--metrics", "kid", "--features", "toy"], 2,
         "kid needs --ref to be a folder"),
        (["eval", "--model", str(ddpm), "--steps", "1", "--metrics", "clip"], 2,
         "clip needs prompts (--prompts-file FILE, or --prompt TEXT)"),  # eval's flags (it named --prompts)
        (["export", "--run", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")], 1,
         f"{tmp_path / 'nothing'} does not exist (expected the --output of `fastgen distill`)"),
        (["export", "--run", str(tmp_path), "--output", str(tmp_path / "o")], 1,
         f"{tmp_path} is not a fastgen run: no config.yaml"),
        (["eval", "--model", str(ddpm), "--steps", "1", "--inception-weights", str(tmp_path / "missing.pth"),
          "--ref", str(tmp_path)], 1, "weights-inception-2015-12-05-6726825d.pth"),
    ]
    for argv, status, message in cases:
        assert main(argv) == status
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # diffusers' loading bar may come before it
        assert last.startswith("error: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Reference folders --ref should refuse: one image; two of different sizes; and an image file."""
    root = tmp_path_factory.mktemp("refs")
    for name, sizes in (("one", [16]), ("mixed", [16, 32])):
        (root / name).mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", (size, size), "red").save(root / name / f"{'ab'[i]}.png")
    return root


EVAL = ["eval", "--model", "toy", "--steps", "1", "--features", "toy", "--num-samples", "4"]
SAMPLE = ["sample", "--model", "toy", "--steps", "1", "--num", "2"]
SUFFIXES = ".png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, .gif"
MISTAKES = {  # a user's mistake: (argv, {root}: the refs folder, {out}: a path to write; status; its one line)
    "eval-repeated-steps": (["eval", "--model", "toy", "--steps", "1,2,1", "--out", "{out}"], 2,
                            "error: fastgen eval: argument --steps: expected positive step counts like 1,2,4, each "
                            "once, got '1,2,1' (1 repeated)"),
    "ref-one-image": (EVAL + ["--ref", "{root}/one", "--out", "{out}"], 1,
                      "error: --ref {root}/one holds 1 image (files ending in .png, .jpg, .jpeg, .webp, searched "
                      "recursively); expected a folder of at least 2 images"),
    "ref-mixed-sizes": (EVAL + ["--ref", "{root}/mixed", "--out", "{out}"], 1,
                        "error: --ref {root}/mixed: image {root}/mixed/b.png is 32x32, expected 16x16 like a.png, the "
                        "first image of its folder"),
    "kid-ref-mixed-sizes": (EVAL + ["--metrics", "kid", "--ref", "{root}/mixed", "--out", "{out}"], 1,
                            "error: --ref {root}/mixed: image {root}/mixed/b.png is 32x32, expected 16x16"),
    "ref-an-image-file": (EVAL + ["--ref", "{root}/one/a.png", "--out", "{out}"], 1,
                          "error: --ref {root}/one/a.png is a file, not a folder; expected a folder of images or an "
                          "Inception statistics .npz file"),
    "ref-missing-npz-toy-features": (EVAL + ["--ref", "{root}/nothere.npz", "--out", "{out}"], 2,
                                     "error: --ref {root}/nothere.npz does not exist; and with --features toy, --ref "
                                     "is a folder of images or nothing"),
    "ref-missing-folder": (EVAL + ["--ref", "{root}/nothere", "--out", "{out}"], 1,
                           "error: --ref {root}/nothere does not exist; expected a folder of images or an Inception "
                           "statistics .npz file"),
    "eval-guidance-unconditional": (EVAL + ["--guidance", "3", "--out", "{out}"], 2,
                                    "error: --guidance is 3; classifier-free guidance needs a text-conditioned model"),
    "sample-guidance-unconditional": (SAMPLE + ["--guidance", "5", "--out", "{out}.png"], 2,
                                      "error: --guidance is 5; classifier-free guidance needs a text-conditioned "
                                      "model"),
    "out-txt": (SAMPLE + ["--out", "{out}.txt"], 2,
                "error: --out {out}.txt: .txt is not an image format fastgen writes; expected a file name ending in "
                + SUFFIXES),
    "out-no-suffix": (SAMPLE + ["--out", "{out}"], 2,
                      "error: --out {out}: the file name has no suffix; expected a file name ending in " + SUFFIXES),
    "out-dot-png": (SAMPLE + ["--out", "{root}/.png"], 2,
                    "error: --out {root}/.png: the file name has no suffix (a leading dot starts the name, not a "
                    "suffix)"),
    "out-mp4-of-images": (SAMPLE + ["--out", "{out}.mp4"], 2,
                          "error: --out {out}.mp4: .mp4 is written for a video model only"),
    "sample-seed-too-large": (SAMPLE + ["--seed", str(2**64), "--out", "{out}.png"], 2,
                              "error: fastgen sample: argument --seed: expected an integer seed from -2**63 to "
                              f"2**64-1 (what torch.Generator.manual_seed takes), got '{2**64}'"),
    "eval-seed-too-small": (EVAL + ["--seed", str(-2**63 - 1), "--out", "{out}"], 2,
                            "error: fastgen eval: argument --seed: expected an integer seed from -2**63 to 2**64-1"),
    "upscale-too-large": (SAMPLE + ["--upscale", "100000", "--out", "{out}.png"], 2,
                          "error: fastgen sample: argument --upscale: expected a whole factor from 1 to 64, got "
                          "'100000'"),
    "upscaled-grid-too-large": (["sample", "--model", "toy", "--steps", "1", "--num", "10000", "--upscale", "64",
                                 "--out", "{out}.png"], 2,
                                "error: --upscale 64: the grid of 10000 images of 16x16 pixels, upscaled 64 times, "
                                "would have 10,506,455,001 pixels, above the limit of 268,435,456 (2**28)"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistakes_of_sample_and_eval_are_one_line_before_any_sampling(mistake, refs, tmp_path, monkeypatch, capsys):
    """Each was a traceback reported as a bug in fastgen, or accepted and ignored (--guidance of an unconditional
    model), or a misleading line (--ref of an image file "does not exist", a missing .npz "is an Inception
    statistics file"); now one line naming the flag, the value and what was expected, before any sampling."""
    import fastgen.generate

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing the input")

    monkeypatch.setattr(fastgen.generate, "generate", no_sampling)
    argv, status, message = MISTAKES[mistake]
    out = tmp_path / "out"
    assert main([a.format(root=refs, out=out) for a in argv]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bug in fastgen" not in err
    assert err.strip().splitlines()[-1].startswith(message.format(root=refs, out=out))
    assert list(tmp_path.iterdir()) == []  # nothing written (eval's --out folder is not left behind)


def test_the_bounds_of_seed_and_guidance_are_those_of_torch_and_of_the_model():
    """--seed takes what torch.Generator.manual_seed takes, no more (negative seeds wrap modulo 2**64 there);
    a model that takes text is guided as before."""
    import torch

    from fastgen.cli import seed_int
    from fastgen.errors import UsageError
    from fastgen.generate import SEED_RANGE, check_guidance, generate
    from fastgen.teacher import load_teacher

    for seed in SEED_RANGE:
        assert seed_int(str(seed)) == seed
        torch.Generator().manual_seed(seed)
    for seed in (SEED_RANGE[0] - 1, SEED_RANGE[1] + 1):
        with pytest.raises((ValueError, RuntimeError)):  # "Overflow when unpacking long long"
            torch.Generator().manual_seed(seed)
        with pytest.raises(UsageError, match=re.escape(f"seed {seed}: expected an integer from -2**63 to 2**64-1")):
            generate(load_teacher("toy"), 1, 1, seed=seed)
    check_guidance(load_teacher("toy-t2i"), 3.0)


def test_eval_toy_features_writes_the_table(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "toy", "--teacher", "toy", "--steps", "1,2", "--features", "toy",
                 "--num-samples", "24", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["curve"], r["steps"]) for r in rows] == [("model", "1"), ("model", "2"),
                                                       ("teacher DDIM", "1"), ("teacher DDIM", "2")]
    fids = [float(r["fid"]) for r in rows]
    assert all(f > 0 for f in fids)
    assert fids[0] == pytest.approx(fids[2])  # same model, same seed: the sweep is deterministic
    assert (out / "sweep.png").stat().st_size > 0 and "| model |" in (out / "sweep.md").read_text()
    assert "sweep.md" in capsys.readouterr().out


def test_eval_fid_and_kid_against_an_image_folder_match_a_direct_computation(tmp_path):
    import numpy as np
    import torch

    from fastgen.eval.fid import frechet_distance
    from fastgen.eval.kid import kid
    from fastgen.eval.toy_fid import toy_features
    from fastgen.generate import generate
    from fastgen.teacher import load_teacher
    from fastgen.toy import toy_images

    ref = tmp_path / "ref"
    ref.mkdir()
    arrays = [((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy() for img in toy_images(40, seed=3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(ref / f"{i:03d}.png")
    out = tmp_path / "eval"
    assert main(["eval", "--model", "toy", "--steps", "8", "--features", "toy", "--metrics", "fid,kid",
                 "--ref", str(ref), "--num-samples", "40", "--out", str(out)]) == 0
    (row,) = list(csv.DictReader((out / "sweep.csv").open()))

    quantise = lambda x: ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1  # noqa: E731  (what the PNGs hold)
    gen = toy_features(quantise(generate(load_teacher("toy"), 40, 8, seed=0))).numpy()
    real = toy_features(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy()
    fid = frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), real.mean(0), np.cov(real, rowvar=False))
    assert float(row["fid"]) == pytest.approx(fid, rel=1e-6)
    assert float(row["kid"]) == pytest.approx(kid(gen, real, subset_size=40).mean, rel=1e-6)


@pytest.mark.parametrize("method,extra", [("progressive", ["objective.start_steps=4"]), ("consistency", [])])
def test_a_ddpm_folder_trained_elsewhere_distils_from_its_images_and_loads_in_stock_diffusers(
        ddpm, tmp_path, method, extra):
    """A plain DDPMPipeline folder + a folder of its training images → distill → export → stock diffusers."""
    import json

    import numpy as np
    import torch
    from diffusers import DDPMPipeline

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(ddpm), "--method", method, "--data", str(images), "--output", str(run),
                 "--steps", "2", "--max-steps", "2", "train.batch_size=4", *extra]) == 0
    pipe = DDPMPipeline.from_pretrained(run / "export", use_safetensors=True, trust_remote_code=True)
    meta = json.loads((run / "export" / "fastgen_export.json").read_text())  # a stock scheduler where one replays it
    assert type(pipe.scheduler).__name__ == meta["scheduler"] and meta["method"] == method
    out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 8, 8, 3) and np.isfinite(out.images).all()
    assert pipe.scheduler.timesteps.tolist() == [999.0, 499.0]  # trailing grid, and LCM's grid, at 2 steps


def test_student_prediction_type_is_trained_and_exported(ddpm, tmp_path, capsys):
    import json

    from fastgen.generate import generate
    from fastgen.teacher import load_teacher

    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(ddpm), "--method", "consistency", "--data", "teacher",
                 "--output", str(run), "--max-steps", "1", "teacher_samples=4", "teacher_sample_steps=2",
                 "train.batch_size=4", "student.prediction_type=v_prediction"]) == 0
    config = json.loads((run / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert config["schedule"]["prediction_type"] == "v_prediction"
    student = load_teacher(run / "export")
    assert student.schedule.prediction_type == "v_prediction"
    assert generate(student, 2, 1).shape == (2, 3, 8, 8)
    assert main(["distill", "--teacher", str(ddpm), "--method", "consistency", "--data", "teacher",
                 "--output", str(tmp_path / "bad"), "--max-steps", "1", "student.prediction_type=flow"]) == 2
    assert "student.prediction_type is 'flow'; a vp teacher's student takes one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_generate_applies_a_consistency_students_boundary_condition(ddpm, tmp_path):
    """At t = 0 the boundary condition makes f(x, 0) = x: a student 'trained' for [0] returns its input noise."""
    import torch

    from fastgen.generate import generate
    from fastgen.pipelines import export_student
    from fastgen.teacher import load_teacher

    teacher = load_teacher(ddpm)
    out = export_student(teacher, teacher.model, tmp_path / "student", {1: [0.0]},
                         boundary={"sigma_data": 0.5, "timestep_scaling": 10.0})
    images = generate(load_teacher(out), 3, 1, seed=5)
    noise = torch.randn((3, *teacher.sample_shape), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(images, noise.clamp(-1, 1))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny import make_sd3_folder

    return make_sd3_folder(tmp_path_factory.mktemp("cli-sd3") / "teacher")


@pytest.mark.parametrize("method,extra", [("progressive", ["objective.start_steps=4"]),
                                          ("consistency", ["objective.grid_points=8"])])
def test_a_flow_teacher_distils_exports_and_samples(sd3, tmp_path, method, extra):
    """A rectified-flow teacher (tiny SD3, FlowMatchEulerDiscreteScheduler with shift 3) through the CLI:
    distil from its own samples, export, load the export in diffusers and sample it with a prompt."""
    import json

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(sd3), "--method", method, "--data", "teacher", "--output", str(run),
                 "--steps", "2", "--max-steps", "2", "teacher_samples=4", "teacher_sample_steps=2",
                 "train.batch_size=2", *extra]) == 0
    meta = json.loads((run / "export" / "fastgen_export.json").read_text())
    config = meta["few_step_scheduler"]  # what the student was trained for, whichever scheduler ships
    assert config["schedule"]["family"] == "flow" and config["schedule"]["shift"] == 3.0
    assert config["trained_timesteps"]["2"][0] == pytest.approx(1000.0)
    assert (config["boundary"] is None) == (method == "progressive")
    pipe = DiffusionPipeline.from_pretrained(run / "export", text_encoder_3=None, tokenizer_3=None,  # SD3 without T5
                                             trust_remote_code=bool(meta["remote_code"]))
    assert type(pipe.scheduler).__name__ == meta["scheduler"]
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    out = pipe(prompt="a red square", num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    png = tmp_path / "student.png"
    assert main(["sample", "--model", str(run / "export"), "--steps", "2", "--num", "2", "--prompt", "a red square",
                 "--out", str(png)]) == 0
    assert png.is_file()


def test_overrides_are_taken_anywhere_among_the_options(ddpm, tmp_path, monkeypatch, capsys):
    import fastgen.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_estimate", lambda args: seen.update(estimate=args.overrides) or 0)
    assert main(["estimate", "--teacher", "t", "a=1", "--json", "b.c=[1, 2]", "--no-modes", "d=x"]) == 0
    assert seen["estimate"] == ["a=1", "b.c=[1, 2]", "d=x"]
    monkeypatch.undo()
    # after an option, between options, at the end: every override reaches the config (validate lists both)
    run = tmp_path / "r"
    code = main(["distill", "--teacher", str(ddpm), "--method", "consistency", "--output", str(run), "train.lr=-1",
                 "--steps", "2", "train.batch_size=0"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr: expected > 0, got -1" in err and "train.batch_size: expected >= 1, got 0" in err
    assert not run.exists()
    # a leftover that is not key=value is still argparse's one-line error
    assert main(["distill", "--output", str(run), "train.lr=1e-5", "--bogus", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fastgen: unrecognized arguments: --bogus") and len(err.strip().splitlines()) == 1


def _missing(monkeypatch, *modules):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in modules else find_spec(name, *a, **k))


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_is_built(ddpm, tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    argv = ["distill", "--teacher", str(ddpm), "--method", "consistency", "--output", str(run), "--max-steps", "1"]
    _missing(monkeypatch, "wandb")
    assert main(argv + ["train.trackers=[tensorboard, wandb]"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.trackers: tracker 'wandb' is not installed")
    assert "pip install wandb" in lines[0]
    _missing(monkeypatch, "tensorboard", "tensorboardX")
    assert main(argv + ["train.trackers=[tensorboard]"]) == 1
    assert "tracker 'tensorboard' is not installed; install it (pip install tensorboard)" in capsys.readouterr().err
    assert main(argv + ["train.trackers=[tensorbord]"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown tracker 'tensorbord'" in lines[0]
    assert all(name in lines[0] for name in ("tensorboard", "wandb", "comet_ml", "mlflow", "aim"))
    assert not run.exists()


def test_export_of_a_run_without_ema_exports_the_trained_weights(ddpm, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(ddpm), "--method", "consistency", "--data", "teacher",
                 "--output", str(run), "--steps", "1", "--max-steps", "1", "teacher_samples=4",
                 "teacher_sample_steps=2", "train.batch_size=2", "train.ema_decay=null"]) == 0
    capsys.readouterr()
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{run} has no EMA weights (train.ema_decay was null): exported the trained weights to {out}" \
        in captured.out and "error" not in captured.err
    assert (out / "model_index.json").is_file()
