"""Quiet, useful output: third-party noise that fastgen's own calls cause is silenced there, and only there;
real errors and fastgen's own output still show. A text-to-image model sampled without a prompt is a one-line
usage error."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
from tiny import make_sd_folder

import fastgen.estimate
from fastgen.cli import main
from fastgen.teacher import load_teacher

LOADING_BARS = ("Loading pipeline components", "Loading weights")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("quiet") / "sd")


@pytest.fixture(scope="module")
def sd_export(sd, tmp_path_factory):
    from fastgen import export_student

    teacher = load_teacher(sd)
    return export_student(teacher, teacher.model, tmp_path_factory.mktemp("quiet") / "sd-student", {1: [999]})


def _bars_enabled() -> tuple[bool, bool]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    return diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()


# -- (a) loading progress bars ----------------------------------------------------------------------------------

def test_loading_a_teacher_or_an_export_shows_no_progress_bar_and_leaves_the_switches_as_they_were(sd, sd_export,
                                                                                                  capfd):
    assert _bars_enabled() == (True, True)
    capfd.readouterr()
    teacher = load_teacher(sd)
    student = load_teacher(sd_export)  # through fastgen.pipelines.load.load_pipeline
    err = capfd.readouterr().err
    assert teacher.text_conditioned and student.text_conditioned
    assert not any(bar in err for bar in LOADING_BARS), err
    assert _bars_enabled() == (True, True)  # a caller's own loads keep their bars

    from fastgen.pipelines.load import load_pipeline

    load_pipeline(sd_export)
    assert not any(bar in capfd.readouterr().err for bar in LOADING_BARS)
    assert _bars_enabled() == (True, True)


def test_a_teacher_that_does_not_load_still_fails_and_the_bars_come_back(sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd, broken)
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    with pytest.raises(ValueError, match="expected shape"):  # raised inside diffusers' from_pretrained
        load_teacher(broken)
    assert _bars_enabled() == (True, True)


# -- (b) peft's multiple-adapter warning -------------------------------------------------------------------------

def test_two_lora_adapters_on_the_shared_base_raise_no_peft_warning(sd):
    from fastgen.networks import NetworkFactory

    teacher = load_teacher(sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        NetworkFactory(teacher).lora("fake", rank=2)
        NetworkFactory(teacher).lora("student", rank=2)
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]
    # only there: the filter is gone after the call, and a real error still raises
    with pytest.warns(UserWarning, match="Already found a `peft_config`"):
        warnings.warn("Already found a `peft_config` attribute in the model. (outside fastgen)", UserWarning)
    with pytest.raises(ValueError, match="already has an adapter named 'fake'"):
        NetworkFactory(teacher).lora("fake", rank=2)


# -- (c) the estimate's fake-tensor noise ------------------------------------------------------------------------

FAKE_WARNING = "Accessing the data pointer of FakeTensor is deprecated and will error in a later PyTorch"
FP32_LOG = "There are modules in UNet2DConditionModel that should be kept in float32: ['x']."


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_estimate_drops_fake_tensor_and_float32_noise_within_it_only(sd, tmp_path, monkeypatch):
    from diffusers.utils import logging as diffusers_logging

    from fastgen.config import DistillConfig, load_config

    modeling_logger = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    records = Records()
    modeling_logger.addHandler(records)
    synthetic_batch = fastgen.estimate.synthetic_batch

    def noisy_batch(*args, **kwargs):  # the two messages, raised where the estimate's fake tensors would cause them
        warnings.warn(FAKE_WARNING, UserWarning)
        modeling_logger.warning(FP32_LOG)
        modeling_logger.warning("another diffusers warning")
        warnings.warn("a warning of another kind", UserWarning)
        return synthetic_batch(*args, **kwargs)

    monkeypatch.setattr(fastgen.estimate, "synthetic_batch", noisy_batch)
    config = load_config(DistillConfig, None, [f"teacher={sd}", "method=dmd2", f"output={tmp_path / 'run'}",
                                               "train.batch_size=2", "objective.gan_weight=0",
                                               "objective.gan_critic_weight=0"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            estimate = fastgen.estimate.estimate_memory(config, device="cpu")
        assert estimate.total_bytes > 0
        messages = [str(w.message) for w in caught]
        assert not any("FakeTensor" in m for m in messages), messages
        assert "a warning of another kind" in messages  # only those messages are dropped
        assert records.messages == ["another diffusers warning"]

        # after the estimate, both show again
        modeling_logger.warning(FP32_LOG)
        assert records.messages[-1] == FP32_LOG
        with pytest.warns(UserWarning, match="data pointer of FakeTensor"):
            warnings.warn(FAKE_WARNING, UserWarning)
    finally:
        modeling_logger.removeHandler(records)


# -- (d) datasets' progress for a local folder -------------------------------------------------------------------

def test_captioned_local_folder_loads_without_datasets_progress(sd, tmp_path, capfd):
    import datasets
    from test_data_captions import _captioned_folder

    from fastgen.data import build_data

    teacher = load_teacher(sd)
    folder = _captioned_folder(tmp_path / "captioned")
    assert not datasets.are_progress_bars_disabled()
    capfd.readouterr()
    source = build_data(folder, teacher, batch_size=4, seed=0, cache_dir=tmp_path / "cache")
    err = capfd.readouterr().err
    assert len(source) == 4
    assert "Generating train split" not in err and "Downloading data" not in err, err
    assert not datasets.are_progress_bars_disabled()  # back as it was


def test_captioned_errors_still_show(sd, tmp_path):
    import datasets
    from test_data_captions import _captioned_folder

    from fastgen.data import build_data

    folder = _captioned_folder(tmp_path / "captioned")
    with pytest.raises(ValueError, match="caption_column = 'prompt'"):
        build_data(folder, load_teacher(sd), batch_size=2, seed=0, cache_dir=tmp_path / "cache",
                   caption_column="prompt")
    assert not datasets.are_progress_bars_disabled()


# -- item 2: a text-to-image model sampled without a prompt ------------------------------------------------------

def test_sample_of_a_text_to_image_export_without_prompt_is_a_one_line_usage_error(sd_export, tmp_path, capfd):
    capfd.readouterr()
    code = main(["sample", "--model", str(sd_export), "--steps", "1", "--num", "1", "--out",
                 str(tmp_path / "grid.png")])
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "text-to-image model" in lines[0] and "--prompt" in lines[0] and "--prompts-file" in lines[0]
    assert not (tmp_path / "grid.png").exists()

    # with a prompt it samples, and fastgen's own line still shows (no loading bars around it)
    code = main(["sample", "--model", str(sd_export), "--steps", "1", "--num", "1", "--prompt", "a red disc",
                 "--out", str(tmp_path / "grid.png")])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "wrote 1 samples (1 steps)" in out
    assert not any(bar in err for bar in LOADING_BARS), err
    assert (tmp_path / "grid.png").is_file()


def test_generate_without_prompts_names_the_model(sd):
    from fastgen.errors import UsageError
    from fastgen.generate import generate

    with pytest.raises(UsageError, match="is a text-to-image model .*pass --prompt TEXT"):
        generate(load_teacher(sd), 1, 2)
