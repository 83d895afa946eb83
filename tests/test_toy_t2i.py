"""The text-conditioned toy teacher (``fastgen/assets/toy_t2i``), its offline tokenizer and prompt accuracy."""

import json

import pytest
import torch

import fastgen.toy
from fastgen.cli import main
from fastgen.eval.evaluate import build_metrics
from fastgen.eval.toy_prompts import prompt_accuracy, read_toy_images, toy_eval_prompts
from fastgen.generate import generate
from fastgen.teacher import load_teacher
from fastgen.toy import (TOY_CLASSES, TOY_COLOURS, TOY_IMAGE_SIZE, TOY_PROMPT_LENGTH, ToyShapes, colour_index,
                         parse_toy_prompt, toy_prompt, toy_t2i_path, toy_tokenizer)


@pytest.fixture(scope="module")
def real():
    """Fresh toy images (not the training pool) and their true prompts."""
    data = ToyShapes(480, TOY_IMAGE_SIZE, seed=2024)
    images, labels = data.tensors()
    colours = colour_index(data.hues())
    return images, labels, colours, [toy_prompt(int(c), int(k)) for c, k in zip(labels, colours)]


def test_prompts_name_shape_and_nearest_colour():
    assert colour_index(torch.tensor([0.0, 0.08, 0.09, 0.5, 0.95])).tolist() == [0, 0, 1, 3, 0]
    assert toy_prompt(2, 4) == "a blue triangle"
    prompts = toy_eval_prompts()
    assert len(set(prompts)) == len(TOY_CLASSES) * len(TOY_COLOURS) == len(prompts)
    assert sorted(parse_toy_prompt(p) for p in prompts) == [(c, k) for c in range(4) for k in range(6)]
    assert parse_toy_prompt("  A Cyan Cross ") == (3, 3)
    with pytest.raises(ValueError, match="purple"):
        parse_toy_prompt("a purple disc")
    with pytest.raises(ValueError, match="colour=6"):
        toy_prompt(0, 6)


def test_tokenizer_is_word_level_and_bundled_offline(monkeypatch):
    from transformers import CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = toy_tokenizer()
    bundled = CLIPTokenizer.from_pretrained(toy_t2i_path() / "tokenizer", local_files_only=True)
    assert bundled.model_max_length == built.model_max_length == TOY_PROMPT_LENGTH
    words = ("a",) + TOY_COLOURS + TOY_CLASSES
    ids = {w: tuple(built(w).input_ids) for w in words}
    assert all(v[0] == built.bos_token_id and v[-1] == built.eos_token_id for v in ids.values())
    assert all(built.eos_token_id not in v[1:-1] for v in ids.values())  # no unknown piece
    assert len(set(ids.values())) == len(words)
    assert sum(len(v) == 3 for v in ids.values()) >= len(words) - 1  # one token per word but "green"
    for prompt in toy_eval_prompts() + [""]:
        assert bundled(prompt).input_ids == built(prompt).input_ids
    assert built("").input_ids == [built.bos_token_id, built.eos_token_id]


def test_bundled_folder_loads_in_stock_diffusers():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = toy_t2i_path()
    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files)
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and not pipe.config.requires_safety_checker
    config = pipe.scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule, config.prediction_type) == \
        (1000, "scaled_linear", "epsilon")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == TOY_IMAGE_SIZE // 2
    out = pipe(["a red disc", "a blue cross"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE) and torch.isfinite(out.images).all()


def test_load_teacher_alias_and_prompt_conditions():
    teacher = load_teacher("toy-t2i")
    assert teacher.source == str(toy_t2i_path())
    assert teacher.text_conditioned and teacher.is_latent
    assert teacher.sample_shape == (4, 8, 8) and teacher.image_size == (TOY_IMAGE_SIZE, TOY_IMAGE_SIZE)
    hidden = teacher.encode_prompts(["a red disc", "a red cross", "a red disc"])["encoder_hidden_states"]
    assert hidden.shape == (3, TOY_PROMPT_LENGTH, teacher.pipeline.text_encoder.config.hidden_size)
    torch.testing.assert_close(hidden[0], hidden[2])
    assert not torch.allclose(hidden[0], hidden[1])
    null = teacher.null_cond(1)["encoder_hidden_states"]
    assert not torch.allclose(null[0], hidden[0])


def test_missing_t2i_asset_names_its_script(tmp_path, monkeypatch):
    monkeypatch.setattr(fastgen.toy, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_toy_t2i.py"):
        toy_t2i_path()


def test_prompt_accuracy_of_real_images(real):
    images, labels, colours, prompts = real
    shape, colour = read_toy_images(images)
    assert (shape == labels).float().mean() > 0.95
    right = prompt_accuracy(images, prompts)
    assert right.shape > 0.95 and right.colour > 0.8 and right.joint > 0.8
    wrong = [toy_prompt((int(c) + 1) % 4, (int(k) + 3) % 6) for c, k in zip(labels, colours)]
    assert prompt_accuracy(images, wrong).joint < 0.02
    neighbour = prompt_accuracy(images, [toy_prompt(int(c), (int(k) + 1) % 6) for c, k in zip(labels, colours)])
    assert neighbour.shape == right.shape and neighbour.colour < 0.2
    # prompts cycle over the images as in fastgen.generate.generate
    same = [p for p in toy_eval_prompts() if parse_toy_prompt(p) == (int(labels[0]), int(colours[0]))]
    assert prompt_accuracy(images[:1].repeat(3, 1, 1, 1), same).joint == prompt_accuracy(images[:1], same).joint
    grey = torch.full((24, 3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE), -0.7)
    assert prompt_accuracy(grey, toy_eval_prompts()).joint < 0.1


def test_prompt_accuracy_rejects_bad_prompts(real):
    images = real[0][:4]
    with pytest.raises(ValueError, match="non-empty sequence"):
        prompt_accuracy(images, "a red disc")
    with pytest.raises(ValueError, match="'a <colour> <shape>'"):
        prompt_accuracy(images, ["a dog"])


def test_eval_metric_prompt_acc(real):
    images, _, _, prompts = real
    metrics = build_metrics(["prompt_acc"], features="toy", prompts=prompts)
    assert set(metrics) == {"prompt_acc", "prompt_acc_shape", "prompt_acc_colour"}
    expected = prompt_accuracy(images, prompts)
    assert (metrics["prompt_acc"](images), metrics["prompt_acc_shape"](images),
            metrics["prompt_acc_colour"](images)) == (expected.joint, expected.shape, expected.colour)
    with pytest.raises(ValueError, match="needs toy prompts"):
        build_metrics(["prompt_acc"], features="toy")
    with pytest.raises(ValueError, match="--features is 'inception'"):
        build_metrics(["prompt_acc"], prompts=prompts)
    with pytest.raises(ValueError, match="colour"):
        build_metrics(["prompt_acc"], features="toy", prompts=["a photo of a cat"])


def test_teacher_follows_prompts():
    """A short guided DDIM run on every shape x colour prompt is read as its prompt far above chance (1/24 for
    both, 1/4 shape, 1/6 colour); the empty prompt is not."""
    teacher = load_teacher("toy-t2i")
    prompts = toy_eval_prompts()
    images = generate(teacher, 2 * len(prompts), 8, seed=0, prompts=prompts, guidance_scale=3.0)
    accuracy = prompt_accuracy(images, prompts)
    assert accuracy.shape > 0.4 and accuracy.colour > 0.8 and accuracy.joint > 0.3, accuracy
    unguided_empty = generate(teacher, 2 * len(prompts), 8, seed=0, prompts=[""])
    assert prompt_accuracy(unguided_empty, prompts).joint < 0.2


def test_eval_cli_reports_prompt_accuracy(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "toy-t2i", "--steps", "2", "--num-samples", "24", "--metrics", "prompt_acc",
                 "--features", "toy", "--prompts-file", "toy", "--guidance", "3", "--out", str(out)]) == 0
    header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header == ["curve", "steps", "prompt_acc", "prompt_acc_shape", "prompt_acc_colour"]


def test_prompts_toy_names_the_toy_prompts_in_training_data(tmp_path):
    """``prompts: toy`` (the toy-t2i presets) conditions data-free training on the 24 toy prompts, without a file."""
    from fastgen.data import build_data

    teacher = load_teacher("toy-t2i")
    source = build_data(None, teacher, batch_size=24, seed=0, cache_dir=tmp_path, prompts="toy")
    assert len(source) == len(toy_eval_prompts()) == 24 and not source.needs_data
    hidden = source.batch(0).cond["encoder_hidden_states"]
    expected = teacher.encode_prompts(toy_eval_prompts())["encoder_hidden_states"]
    for row in expected:  # one epoch of 24 is every prompt once
        assert any(torch.allclose(row, h, atol=1e-5) for h in hidden)
    with pytest.raises(FileNotFoundError, match="'toy'"):
        build_data(None, teacher, batch_size=2, seed=0, cache_dir=tmp_path, prompts=tmp_path / "missing.txt")
