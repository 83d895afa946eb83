"""CLIP score plumbing with a tiny randomly initialised open_clip model loaded from a local file."""

import json
import warnings

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastgen.eval.clip_score import CLIPScorer

TINY_NAME = "fastgen-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PROMPTS = ["a red square", "a blue circle", "a green triangle", "two yellow stars"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME)
    save_file(model.state_dict(), folder / "tiny.safetensors")
    return folder / "tiny.safetensors"


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    return CLIPScorer(TINY_NAME, pretrained=tiny_checkpoint)


@pytest.fixture
def images():
    return torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1


def hand_cosines(scorer, images, prompts):
    """Cosines computed here from the loaded model, its val transform and its tokenizer."""
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = torch.stack([scorer.preprocess(Image.fromarray(image)) for image in uint8])
    with torch.no_grad():
        image_embedding = scorer.model.encode_image(pixels)
        text_embedding = scorer.model.encode_text(scorer.tokenizer(prompts))
    image_embedding = image_embedding / image_embedding.norm(dim=-1, keepdim=True)
    text_embedding = text_embedding / text_embedding.norm(dim=-1, keepdim=True)
    return (image_embedding * text_embedding).sum(-1).double()


def test_weights_come_from_the_local_file(tiny_checkpoint, scorer):
    fresh = open_clip.create_model(TINY_NAME)
    stored = open_clip.create_model(TINY_NAME, pretrained=str(tiny_checkpoint)).state_dict()
    assert all(torch.equal(scorer.model.state_dict()[k], v) for k, v in stored.items())
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in stored.items())


def test_score_is_hundred_times_clamped_cosine(scorer, images):
    cosines = hand_cosines(scorer, images, PROMPTS)
    assert (cosines < 0).any() and (cosines > 0).any(), "random model: both signs exercise the clamp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = scorer(images, PROMPTS, value_range=(-1, 1), batch_size=3)
    assert result.num_images == 4
    assert result.clip_cosine_raw == pytest.approx(float(cosines.mean()), abs=1e-6)
    assert result.clip_score == pytest.approx(float((100 * cosines.clamp(min=0)).mean()), abs=1e-4)
    assert result.clip_score != pytest.approx(max(100 * float(cosines.mean()), 0.0), abs=1e-3)


def test_pil_images_and_uint8_tensors_score_alike(scorer, images):
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pil = [Image.fromarray(image) for image in uint8.permute(0, 2, 3, 1).numpy()]
    from_tensor, from_pil = scorer(uint8, PROMPTS), scorer(pil, PROMPTS)
    assert from_tensor.clip_score == pytest.approx(from_pil.clip_score, abs=1e-6)
    templated = scorer(uint8, PROMPTS, prompt_template="A photo depicts {}")
    assert templated.clip_cosine_raw != pytest.approx(from_tensor.clip_cosine_raw, abs=1e-6)


def test_long_prompts_are_truncated_with_a_warning(scorer, images):
    prompts = ["one two three four five six seven eight nine", "a cat", "a dog", "six words fit exactly here ok"]
    with pytest.warns(UserWarning, match="prompt 0 .* longer than the tokenizer context of 8 tokens") as record:
        scorer(images, prompts, value_range=(-1, 1))
    assert len(record) == 1
    truncated = hand_cosines(scorer, images[:1], ["one two three four five six"])
    with pytest.warns(UserWarning, match="truncated"):
        cosine = scorer.cosines(images[:1], prompts[:1], value_range=(-1, 1))
    assert cosine == pytest.approx(truncated, abs=1e-6)


def test_bad_input(scorer, images, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="4 images and 3 prompts, expected one prompt per image"):
        scorer(images, PROMPTS[:3], value_range=(-1, 1))
    with pytest.raises(ValueError, match=r"value_range=None for torch.float32 images"):
        scorer(images, PROMPTS)
    with pytest.raises(ValueError, match="batch_size=0"):
        scorer(images, PROMPTS, value_range=(-1, 1), batch_size=0)
    with pytest.raises(TypeError, match="sequence of PIL images"):
        scorer([1, 2, 3, 4], PROMPTS)
    with pytest.raises(FileNotFoundError, match="pretrained='laion2b_s12b_b42k' is not a local file.*allow_download"):
        CLIPScorer("ViT-g-14", pretrained="laion2b_s12b_b42k")
    with pytest.raises(ValueError, match="a local-dir: folder holds its own weights"):
        CLIPScorer(f"local-dir:{tmp_path}", pretrained=tiny_checkpoint)


def test_fastgen_eval_clip_metric_matches_the_scorer(tiny_checkpoint, scorer, tmp_path):
    import csv

    from tiny import make_sd_folder

    from fastgen.cli import main
    from fastgen.generate import generate
    from fastgen.teacher import load_teacher

    sd = make_sd_folder(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(sd), "--steps", "2", "--metrics", "clip", "--clip-model", TINY_NAME,
                 "--clip-weights", str(tiny_checkpoint), "--prompts-file", str(prompts), "--num-samples", "4",
                 "--out", str(out)]) == 0
    (row,) = list(csv.DictReader((out / "sweep.csv").open()))
    images = generate(load_teacher(sd), 4, 2, seed=0, prompts=PROMPTS[:2])
    expected = scorer(images, [PROMPTS[i % 2] for i in range(4)], value_range=(-1, 1))
    assert float(row["clip"]) == pytest.approx(expected.clip_score, rel=1e-5)
    assert float(row["clip_cosine_raw"]) == pytest.approx(expected.clip_cosine_raw, rel=1e-5, abs=1e-7)
