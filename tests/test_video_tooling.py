"""Video models in the tooling, on one tiny random Wan 2.1 pipeline sampled at 32 x 32 pixels and 5 frames:
``fastgen sample`` writes an animated GIF grid or a still grid (a row per video, a column per frame) and refuses
on one line an .mp4 it cannot write; a distillation's sample grid gets an animated GIF beside its PNG; ``fastgen
eval`` measures FID, KID and CLIP score on every frame, names its columns ``*_per_frame`` and says that FVD is not
provided. Image models keep their grids and columns (tests/test_cli.py, tests/test_validation.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tiny import OPEN_CLIP_NAME, make_open_clip_weights, make_wan_folder

from fastgen.cli import main

FRAMES, SIDE = 5, 32
SIZE = ["--height", str(SIDE), "--width", str(SIDE), "--num-frames", str(FRAMES)]
PROMPT = "a red cat"
VALIDATION = ["a red cat", "a blue dog"]
@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return make_wan_folder(tmp_path_factory.mktemp("video") / "wan")


def sample(wan, out) -> int:
    """``fastgen sample`` of 4 Wan videos in 2 steps to ``out``."""
    return main(["sample", "--model", str(wan), "--steps", "2", "--num", "4", "--prompt", PROMPT, *SIZE,
                 "--out", str(out)])


def rgb_frames(path) -> list[np.ndarray]:
    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")).astype(int) for frame in ImageSequence.Iterator(image)]


def test_sample_writes_an_animated_grid_and_a_still_grid_of_the_same_frames(wan, tmp_path, capsys):
    gif, png = tmp_path / "grid.gif", tmp_path / "grid.png"
    assert sample(wan, gif) == 0 and sample(wan, png) == 0
    assert f"wrote 4 samples of {FRAMES} frames (2 steps) to {gif}" in capsys.readouterr().out
    tile = SIDE + 1  # torchvision's grid: 1 pixel of padding before every tile and after the last
    animation, [still] = rgb_frames(gif), rgb_frames(png)
    assert len(animation) == FRAMES
    assert animation[0].shape == (2 * tile + 1, 2 * tile + 1, 3)  # 4 videos tiled 2 x 2
    assert still.shape == (4 * tile + 1, FRAMES * tile + 1, 3)  # a row per video, a column per frame
    with Image.open(gif) as image:
        assert image.info["loop"] == 0 and image.info["duration"] == 60  # 16 fps, in GIF's hundredths
    for f, frame in enumerate(animation):
        for video in range(4):
            y, x = 1 + video // 2 * tile, 1 + video % 2 * tile
            shown, expected = frame[y:y + SIDE, x:x + SIDE], still[1 + video * tile:, 1 + f * tile:][:SIDE, :SIDE]
            assert np.abs(shown - expected).mean() < 6, (f, video)  # the GIF's 256-colour palette
    assert not np.array_equal(animation[0], animation[-1])


def test_an_mp4_without_a_writer_is_one_line_before_sampling(wan, tmp_path, monkeypatch, capsys):
    import importlib.util

    import fastgen.generate

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None
                        if name in ("imageio", "imageio_ffmpeg", "cv2") else find_spec(name, *a, **k))
    monkeypatch.setattr(fastgen.generate, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    out = tmp_path / "grid.mp4"
    assert sample(wan, out) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: --out {out}: writing an .mp4 needs imageio and imageio-ffmpeg")
    assert "pip install imageio imageio-ffmpeg" in last and "Traceback" not in err and not out.exists()


@pytest.fixture(scope="module")
def run(wan, tmp_path_factory):
    """A one-step consistency run on the Wan teacher that draws its sample grid at that step and exports to
    RUN/export; its trainer."""
    from fastgen.config import DistillConfig, load_config
    from fastgen.trainer import Trainer

    folder = tmp_path_factory.mktemp("run") / "run"
    config = load_config(DistillConfig, None, [
        f"teacher={wan}", "method=consistency", f"output={folder}", "data=teacher", "teacher_samples=2",
        "teacher_sample_steps=1", f"height={SIDE}", f"width={SIDE}", f"num_frames={FRAMES}", "train.batch_size=2",
        "train.max_steps=1", "train.sample_every=1", f"train.validation_prompts={json.dumps(VALIDATION)}"])
    trainer = Trainer(config)
    try:
        trainer.fit()
        trainer.export(folder / "export")
    finally:
        trainer.close()
    return trainer


def test_training_sample_grid_is_the_first_frame_with_an_animated_gif_beside_it(run):
    samples = run.run_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-00000001.gif", "step-00000001.png"]
    rows = len(run.plan.exported)
    [still], animation = rgb_frames(samples / "step-00000001.png"), rgb_frames(samples / "step-00000001.gif")
    # labelled_grid: a 64-pixel label column, a 14-pixel label row, 2 pixels around the tiles, 32-pixel frames at 2x
    assert still.shape == (14 + 2 + rows * (64 + 2), 64 + 2 + len(VALIDATION) * (64 + 2), 3)
    assert len(animation) == FRAMES and all(frame.shape == still.shape for frame in animation)
    assert np.abs(animation[0] - still).mean() < 6  # the PNG is the animation's first frame
    assert not np.array_equal(animation[0], animation[-1])


# -- eval: every frame counts -------------------------------------------------------------------------------


def random_inception_weights(path):
    """torch-fidelity's Inception, randomly initialised (He, so features are O(1)), saved as a weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Architecture(FeatureExtractorInceptionV3):  # its weight loading skipped
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, path.with_name("empty.pth"))
    torch.manual_seed(0)
    network = Architecture("random", ["2048"], feature_extractor_weights_path=str(path.with_name("empty.pth")))
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A tiny random open_clip model (32-pixel images) registered as ``OPEN_CLIP_NAME``, and its weights file."""
    return make_open_clip_weights(tmp_path_factory.mktemp("clip"))


def test_eval_measures_every_frame_and_says_so(run, wan, clip_weights, tmp_path, capsys):
    """An exported video student (sampled at its trained size) and, with the size flags, its teacher."""
    from fastgen.eval.inception import WEIGHTS_FILENAME
    from fastgen.pipelines.export import METADATA

    weights = random_inception_weights(tmp_path / WEIGHTS_FILENAME)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), np.uint8)).save(ref / f"{i}.png")
    out, export = tmp_path / "eval", run.run_dir / "export"
    assert main(["eval", "--model", str(export), "--teacher", str(wan), *SIZE, "--steps", "1", "--metrics",
                 "fid,kid,clip", "--ref", str(ref), "--inception-weights", str(weights), "--clip-model", OPEN_CLIP_NAME,
                 "--clip-weights", str(clip_weights), "--prompt", PROMPT, "--num-samples", "2", "--out", str(out)]) == 0
    columns = ["fid_per_frame", "kid_per_frame", "clip_per_frame", "clip_cosine_raw_per_frame"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(row["curve"], list(row)) for row in rows] == [(curve, ["curve", "steps", *columns])
                                                           for curve in ("model", "teacher DDIM")]
    assert all(np.isfinite(float(row[c])) for row in rows for c in columns)
    markdown, printed = (out / "sweep.md").read_text(), capsys.readouterr().out
    assert "| curve | steps | " + " | ".join(columns) + " |" in markdown and markdown in printed
    assert f"per-frame ({FRAMES} frames a sample" in markdown and "FVD (Fréchet Video Distance) is not" in markdown
    (measured,) = json.loads((export / METADATA).read_text())["metrics"]
    assert measured["samples"] == 2 and measured["frames"] == FRAMES and "fid_per_frame" in measured


def test_video_metrics_equal_the_image_metrics_of_the_frames_with_each_videos_prompt(clip_weights, tmp_path,
                                                                                     monkeypatch):
    """``build_metrics``' callables on videos (N, 3, F, H, W) = on their N F frames, each video's prompt for its
    frames; features: the mean colour and its square (Inception's interface, none of its cost)."""
    import fastgen.eval.inception
    from fastgen.eval.clip_score import CLIPScorer
    from fastgen.eval.evaluate import build_metrics, frame_prompts

    class ColourExtractor:
        def __init__(self, weights_path, resize):
            self.weights_path = tmp_path / "colour.pth"

        def __call__(self, images):
            colour = images.double().mean((2, 3)) / 255
            return torch.cat([colour, colour ** 2], 1)

    monkeypatch.setattr(fastgen.eval.inception, "InceptionExtractor", ColourExtractor)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), np.uint8)).save(ref / f"{i}.png")
    prompts = ["a red cat", "a blue dog"]
    metrics = build_metrics(["fid", "kid", "clip"], ref=str(ref), prompts=prompts, clip_model=OPEN_CLIP_NAME,
                            clip_weights=str(clip_weights))
    videos = torch.rand(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    frames = videos.transpose(1, 2).reshape(12, 3, 8, 8)
    assert torch.equal(frames[5], videos[1, :, 1])
    assert frame_prompts(prompts, videos) == [prompts[0]] * 4 + [prompts[1]] * 4 + [prompts[0]] * 4
    for name in ("fid", "kid"):
        assert metrics[name](videos) == pytest.approx(metrics[name](frames), rel=1e-12)
    scored = CLIPScorer(OPEN_CLIP_NAME, clip_weights)(frames, frame_prompts(prompts, videos), value_range=(-1, 1))
    assert metrics["clip"](videos) == pytest.approx(scored.clip_score, rel=1e-6)
    assert metrics["clip_cosine_raw"](videos) == pytest.approx(scored.clip_cosine_raw, rel=1e-6, abs=1e-9)
