"""Validation prompts (``train.validation_prompts``, diffusers' ``--validation_prompts``): the sample grid of a
text-to-image run holds a labelled row per step count and a column per prompt, renders the same for the same
seed, goes to RUN/samples/ and to tensorboard as an image; a tracker without images is named once; the errors
of the key name it."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image
from tiny import make_ddpm_folder, make_sd_folder

from fastgen.config import ConfigError, DistillConfig, load_config
from fastgen.errors import InputError, MissingPathError, UsageError
from fastgen.trainer import Trainer, read_validation_prompts

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("validation-sd") / "teacher")


def make_config(teacher, output, *overrides) -> DistillConfig:
    return load_config(DistillConfig, None, [f"teacher={teacher}", "method=consistency", f"output={output}", "seed=3",
                                             "data=teacher", "teacher_samples=8", "teacher_sample_steps=2",
                                             "train.batch_size=2", "train.log_every=1", *overrides])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


class Imageless:
    """A tracker as accelerate's mlflow one: no ``log_images``."""

    name = "mlflow"

    def finish(self):
        pass


def test_validation_prompts_render_a_labelled_grid_to_the_run_and_to_tensorboard(sd_teacher, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
    run = tmp_path / "run"
    trainer = Trainer(make_config(sd_teacher, run, "train.max_steps=2", "train.sample_every=2",
                                  "train.trackers=[tensorboard]", f"train.validation_prompts={prompts_file}",
                                  "train.validation_seed=7"))
    assert trainer.validation_prompts == PROMPTS
    trainer.fit()

    path = run / "samples" / "step-00000002.png"
    assert sorted(p.name for p in (run / "samples").iterdir()) == [path.name]
    grid = pixels(path)
    counts = trainer.plan.exported  # a consistency student serves 1, 2, 4 (and 8) steps
    assert len(counts) >= 3
    tile = 64  # the tiny teacher's 16-pixel images, upscaled 4x (MIN_TILE)
    # a 64-pixel label column, a 14-pixel label row, 2 pixels between and around the tiles
    assert grid.shape == (14 + 2 + len(counts) * (tile + 2), 64 + 2 + len(PROMPTS) * (tile + 2), 3)

    def tile_at(r, c):
        y, x = 14 + 2 + r * (tile + 2), 64 + 2 + c * (tile + 2)
        return grid[y:y + tile, x:x + tile]

    # labels: dark text left of every row and above every column, on white
    for r in range(len(counts)):
        assert grid[14 + 2 + r * (tile + 2):14 + 2 + r * (tile + 2) + tile, :64].min() < 100, f"row {r} unlabelled"
    for c in range(len(PROMPTS)):
        assert grid[:14, 64 + 2 + c * (tile + 2):64 + 2 + c * (tile + 2) + tile].min() < 100, f"column {c} unlabelled"
    # the prompts condition their columns, the step counts their rows
    assert not np.array_equal(tile_at(0, 0), tile_at(0, 1))
    assert not np.array_equal(tile_at(0, 0), tile_at(1, 0))

    accumulator = EventAccumulator(str(run / "fastgen"), size_guidance={"images": 0})
    accumulator.Reload()
    assert "samples" in accumulator.Tags()["images"]
    [event] = accumulator.Images("samples")
    assert event.step == 2 and (event.height, event.width) == grid.shape[:2]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")), grid)

    # the same seed, the same grid (whatever the global RNG did since); another seed, another grid
    import torch

    torch.manual_seed(12345)
    trainer.accelerator.trackers = [Imageless()]
    with caplog.at_level(logging.WARNING, logger="fastgen.trainer"):
        assert trainer.save_samples() == path
        assert np.array_equal(pixels(path), grid)
        trainer.config.train.validation_seed = 8
        trainer.save_samples()
    assert not np.array_equal(pixels(path), grid)
    # a tracker that takes no images is named once, not at every grid
    named = [r for r in caplog.records if "'mlflow' takes no sample grids" in r.getMessage()]
    assert len(named) == 1


def test_validation_prompts_on_a_teacher_without_text_fail_on_one_line_naming_the_key(tmp_path):
    teacher = make_ddpm_folder(tmp_path / "teacher", sample_size=8)
    run = tmp_path / "run"
    with pytest.raises(UsageError) as info:
        Trainer(make_config(teacher, run, "train.max_steps=1", "train.validation_prompts=[a cat]"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("train.validation_prompts: ")
    assert "UNet2DModel" in message and "takes no prompts" in message
    assert not run.exists()


def test_validation_prompts_files_and_their_errors(tmp_path):
    assert read_validation_prompts(None) is None
    assert read_validation_prompts(["a cat"]) == ["a cat"]
    (tmp_path / "p.txt").write_text(" a cat \n\na dog\n")
    assert read_validation_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    with pytest.raises(MissingPathError, match=r"^train.validation_prompts: 'a cat' is not a file; expected a text "
                                               r"file of prompts, one a line, or a list of prompts"):
        read_validation_prompts("a cat")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match=r"^train.validation_prompts: prompts file .*empty.txt is empty"):
        read_validation_prompts(str(tmp_path / "empty.txt"))
    config = make_config("somewhere", tmp_path / "run", "train.validation_prompts=[]")
    with pytest.raises(ConfigError, match=r"train.validation_prompts: expected at least one prompt \(a non-empty "
                                          r"list\), a text file"):
        config.validate()
