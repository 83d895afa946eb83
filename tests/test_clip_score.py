"""CLIP score plumbing with tiny randomly initialised CLIP models loaded from local files: an open_clip model
and its weights file, and a Hugging Face ``transformers`` CLIP folder; ``fastgen eval``'s model card rows."""

import csv
import json
import shutil
import subprocess
import sys
import warnings

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny import OPEN_CLIP_NAME, make_open_clip_weights

from fastgen.errors import InputError
from fastgen.eval.clip_score import CLIPScorer

PROMPTS = ["a red square", "a blue circle", "a green triangle", "two yellow stars"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_open_clip_weights(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    return CLIPScorer(OPEN_CLIP_NAME, pretrained=tiny_checkpoint)


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
    fresh = open_clip.create_model(OPEN_CLIP_NAME)
    stored = open_clip.create_model(OPEN_CLIP_NAME, pretrained=str(tiny_checkpoint)).state_dict()
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
    with pytest.raises(FileNotFoundError, match="pretrained='laion2b_s12b_b42k' is not a local file; expected "
                                                "--clip-weights PATH.*allow_download"):
        CLIPScorer("ViT-g-14", pretrained="laion2b_s12b_b42k")
    with pytest.raises(ValueError, match="a local-dir: folder holds its own weights"):
        CLIPScorer(f"local-dir:{tmp_path}", pretrained=tiny_checkpoint)


def test_fastgen_eval_clip_metric_matches_the_scorer(tiny_checkpoint, scorer, tmp_path):
    from tiny import make_sd_folder

    from fastgen.cli import main
    from fastgen.generate import generate
    from fastgen.teacher import load_teacher

    sd = make_sd_folder(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(sd), "--steps", "2", "--metrics", "clip", "--clip-model", OPEN_CLIP_NAME,
                 "--clip-weights", str(tiny_checkpoint), "--prompts-file", str(prompts), "--num-samples", "4",
                 "--out", str(out)]) == 0
    (row,) = list(csv.DictReader((out / "sweep.csv").open()))
    images = generate(load_teacher(sd), 4, 2, seed=0, prompts=PROMPTS[:2])
    expected = scorer(images, [PROMPTS[i % 2] for i in range(4)], value_range=(-1, 1))
    assert float(row["clip"]) == pytest.approx(expected.clip_score, rel=1e-5)
    assert float(row["clip_cosine_raw"]) == pytest.approx(expected.clip_cosine_raw, rel=1e-5, abs=1e-7)


# -- a Hugging Face CLIP folder -----------------------------------------------------------------------------


def save_hf_clip(folder, vocab_size=200, **processor):
    """A tiny random ``CLIPModel`` (16-token context) with the character tokenizer (190 tokens) and a
    ``CLIPImageProcessor`` (shortest edge resized to 32, centre crop 32, unless ``processor`` says otherwise),
    saved to ``folder``."""
    from tiny import char_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1,
                max_position_embeddings=16, bos_token_id=188, eos_token_id=189, pad_token_id=189)
    vision = dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, **processor}
    CLIPImageProcessor(**settings).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-hf-clip")


def direct_hf_cosines(folder, images, prompts, max_length=None):
    """Cosines computed here with transformers' own API from the folder: processor, tokenizer (truncating to
    ``max_length`` when given), ``get_image_features`` and ``get_text_features``."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=[Image.fromarray(a) for a in uint8],
                                                         return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, truncation=max_length is not None,
                                                   max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image, text = (getattr(out, "pooler_output", out) for out in (image, text))  # transformers 5: an output object
    return torch.nn.functional.cosine_similarity(image, text, dim=-1).double()


@pytest.mark.parametrize("processor", [{}, {"size": {"shortest_edge": 48}, "image_mean": [0.5, 0.5, 0.5],
                                            "image_std": [0.5, 0.5, 0.5], "resample": 2}])
def test_hf_folder_scores_as_transformers_computes_it(hf_folder, tmp_path, images, processor):
    folder = hf_folder
    if processor:  # the same weights, another preprocessor_config.json: the scorer must follow it
        folder = tmp_path / "other-preprocessing"
        shutil.copytree(hf_folder, folder)
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**settings, **processor}))
    scorer = CLIPScorer(folder)
    cosines = direct_hf_cosines(folder, images, PROMPTS)
    assert (cosines < 0).any() and (cosines > 0).any(), "random model: both signs exercise the clamp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = scorer(images, PROMPTS, value_range=(-1, 1), batch_size=3)
    assert scorer.name == folder.name and result.num_images == 4
    assert result.clip_cosine_raw == pytest.approx(float(cosines.mean()), abs=1e-5)
    assert result.clip_score == pytest.approx(float((100 * cosines.clamp(min=0)).mean()), abs=1e-5)
    if processor:
        default = direct_hf_cosines(hf_folder, images, PROMPTS)
        assert (cosines - default).abs().max() > 1e-3, "the edited preprocessing must change the cosines"


def test_hf_folder_truncates_long_prompts_with_a_warning(hf_folder, images):
    scorer = CLIPScorer(hf_folder)
    prompts = ["a cat", "a very long prompt of many characters"]  # a token per character: beyond 16 positions
    with pytest.warns(UserWarning, match="prompt 1 .* longer than the tokenizer context of 16 tokens") as record:
        cosines = scorer.cosines(images[:2], prompts, value_range=(-1, 1))
    assert len(record) == 1
    assert cosines == pytest.approx(direct_hf_cosines(hf_folder, images[:2], prompts, max_length=16), abs=1e-5)


# -- files and folders of the wrong kind: one line, no traceback, nothing run --------------------------------


class _RunsCode:
    """Unpickling it creates the file ``path``: what a checkpoint that runs code on load would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _copy(hf_folder, folder, drop=(), **config):
    shutil.copytree(hf_folder, folder)
    for name in drop:
        (folder / name).unlink()
    if config:
        settings = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**settings, **config}))
    return folder


def _pickled_only(hf_folder, folder):
    from safetensors.torch import load_file

    _copy(hf_folder, folder, drop=["model.safetensors"])
    torch.save(load_file(hf_folder / "model.safetensors"), folder / "pytorch_model.bin")  # transformers 4's layout
    return folder


def _notes(folder):
    (folder / "notes.txt").write_text("not a model\n")
    return folder / "notes.txt"


def _runs_code(folder):
    torch.save({"state_dict": _RunsCode(folder / "ran")}, folder / "open_clip_pytorch_model.bin")
    return folder / "open_clip_pytorch_model.bin"


WRONG_KIND = [  # (id, extra eval arguments from (hf_folder, tmp_path), exit status, what the line says)
    ("text-file-as-model", lambda hf, t: ["--clip-model", str(_notes(t))], 2,
     ["notes.txt", "neither a folder nor an open_clip model name", "model_type 'clip'"]),
    ("folder-of-another-model", lambda hf, t: ["--clip-model", str(_copy(hf, t / "bert", model_type="bert"))], 1,
     ["bert: config.json has model_type 'bert'", "expected a Hugging Face CLIP folder"]),
    ("pickled-weights-only", lambda hf, t: ["--clip-model", str(_pickled_only(hf, t / "pickled"))], 1,
     ["pickled has no model.safetensors (pytorch_model.bin is pickled and not read"]),
    ("no-tokenizer", lambda hf, t: ["--clip-model", str(_copy(hf, t / "notok", drop=["tokenizer.json"]))], 1,
     ["notok lacks its tokenizer"]),
    ("weights-beside-a-folder", lambda hf, t: ["--clip-model", str(hf), "--clip-weights", str(_notes(t))], 2,
     ["is a folder, which holds its own weights"]),
    ("code-running-pickle-as-weights", lambda hf, t: ["--clip-model", "ViT-B-32", "--clip-weights",
                                                      str(_runs_code(t))], 1,
     ["open_clip_pytorch_model.bin cannot be read as plain tensors", "no code"]),
    ("text-file-as-weights", lambda hf, t: ["--clip-model", "ViT-B-32", "--clip-weights", str(_notes(t))], 1,
     ["notes.txt cannot be read as plain tensors"]),
]


def _eval_argv(hf_folder, tmp_path, extra):
    return ["eval", "--model", "toy-t2i", "--steps", "1", "--metrics", "clip", "--prompt", "a red disc", "--out",
            str(tmp_path / "eval")] + extra(hf_folder, tmp_path)


def _check_one_line(status, expected, tmp_path, returncode, stderr):
    lines = stderr.strip().splitlines()
    assert returncode == status, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert not (tmp_path / "ran").exists(), "the checkpoint's pickle ran code"
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("name, extra, status, expected", WRONG_KIND, ids=[case[0] for case in WRONG_KIND])
def test_wrong_kind_of_clip_model_is_one_line(name, extra, status, expected, hf_folder, tmp_path, capsys):
    from fastgen.cli import main

    argv = _eval_argv(hf_folder, tmp_path, extra)
    capsys.readouterr()
    returncode = main(argv)
    _check_one_line(status, expected, tmp_path, returncode, capsys.readouterr().err)


@pytest.mark.parametrize("name, extra, status, expected", [WRONG_KIND[0], WRONG_KIND[5]],
                         ids=[WRONG_KIND[0][0], WRONG_KIND[5][0]])
def test_wrong_kind_of_clip_model_in_a_child_process(name, extra, status, expected, hf_folder, tmp_path):
    """``python -m fastgen eval``: the exit status and the one line of a real process."""
    done = subprocess.run([sys.executable, "-m", "fastgen", *_eval_argv(hf_folder, tmp_path, extra)],
                          capture_output=True, text=True)
    _check_one_line(status, expected, tmp_path, done.returncode, done.stderr)


def test_weights_that_do_not_fit_the_model(tiny_checkpoint, hf_folder, tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny_checkpoint)
    save_file({k: v for k, v in state.items() if k != "text_projection"}, tmp_path / "partial.safetensors")
    with pytest.raises(InputError, match=r"partial.safetensors do not load into open_clip's fastgen-test-tiny-clip"):
        CLIPScorer(OPEN_CLIP_NAME, pretrained=tmp_path / "partial.safetensors")
    folder = _copy(hf_folder, tmp_path / "partial")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "text_projection.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"partial: model.safetensors lacks 1 weight\(s\) of its config "
                                         r"\(e.g. text_projection.weight\)"):
        CLIPScorer(folder)
    resized = _copy(hf_folder, tmp_path / "resized", projection_dim=4)
    with pytest.raises(InputError, match=r"resized cannot be loaded \(.*\); expected a Hugging Face CLIP folder"):
        CLIPScorer(resized)
    with pytest.raises(InputError, match="the tokenizer has 190 tokens, the text model 150"):
        CLIPScorer(save_hf_clip(tmp_path / "small-vocab", vocab_size=150))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    path = _runs_code(tmp_path)
    with pytest.raises(InputError, match="cannot be read as plain tensors"):
        CLIPScorer(OPEN_CLIP_NAME, pretrained=path)
    assert not (tmp_path / "ran").exists()
    torch.load(path, weights_only=False)  # what an unguarded load does with this file
    assert (tmp_path / "ran").exists()


# -- fastgen eval: the model card's rows say what was measured against what -----------------------------------


def test_eval_card_rows_carry_feature_network_reference_clip_model_and_sample_count(hf_folder, tmp_path, capsys):
    from fastgen import export_student, load_teacher
    from fastgen.cli import main
    from fastgen.generate import generate
    from fastgen.pipelines.export import METADATA
    from fastgen.toy import toy_eval_prompts, toy_images

    teacher = load_teacher("toy-t2i")
    export = export_student(teacher, teacher.model, tmp_path / "student", {2: [999, 499]})
    ref = tmp_path / "toy-ref"
    ref.mkdir()
    for i, image in enumerate(toy_images(24, seed=3)):
        Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(ref / f"{i:02d}.png")
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # toy prompts beyond the tiny CLIP's 16 character tokens are truncated
        assert main(["eval", "--model", str(export), "--steps", "2", "--metrics", "fid,clip,prompt_acc", "--features",
                     "toy", "--ref", str(ref), "--clip-model", str(hf_folder), "--prompts-file", "toy",
                     "--num-samples", "24", "--out", str(out)]) == 0
        prompts = toy_eval_prompts()
        expected = CLIPScorer(hf_folder)(generate(load_teacher(export), 24, 2, seed=0, prompts=prompts), prompts,
                                         value_range=(-1, 1))
    assert "warning: --features toy" not in capsys.readouterr().err  # toy-t2i's samples look like the toy world
    (row,) = list(csv.DictReader((out / "sweep.csv").open()))
    assert float(row["clip"]) == pytest.approx(expected.clip_score, abs=1e-4)
    (measured,) = json.loads((export / METADATA).read_text())["metrics"]
    columns = ["steps", "fid", "clip", "clip_cosine_raw", "prompt_acc", "prompt_acc_shape", "prompt_acc_colour",
               "features", "ref", "clip_model", "samples"]
    assert list(measured) == columns
    assert [measured[c] for c in columns[-4:]] == ["toy", "toy-ref", "tiny-hf-clip", 24]
    card = (export / "README.md").read_text()
    assert "| " + " | ".join(columns) + " |" in card and "| toy | toy-ref | tiny-hf-clip | 24 |" in card

    assert main(["eval", "--model", str(export), "--steps", "2", "--features", "toy", "--num-samples", "8",
                 "--prompts-file", "toy", "--out", str(tmp_path / "again")]) == 0
    (measured,) = json.loads((export / METADATA).read_text())["metrics"]
    assert list(measured) == ["steps", "fid", "features", "ref", "samples"]
    assert [measured["features"], measured["ref"], measured["samples"]] == ["toy", "toy world", 8]
    assert "| steps | fid | features | ref | samples |" in (export / "README.md").read_text()


def test_provenance_names_inception_and_open_clip_weight_files(tiny_checkpoint, tmp_path, monkeypatch):
    import fastgen.eval.inception
    from fastgen.eval.evaluate import build_metrics

    class NamedExtractor:  # Inception's interface without its weights: features are the mean colours
        def __init__(self, weights_path, resize):
            self.weights_path = tmp_path / weights_path

        def __call__(self, images):
            return images.float().mean((2, 3))

    monkeypatch.setattr(fastgen.eval.inception, "InceptionExtractor", NamedExtractor)
    ref = tmp_path / "my-ref"
    ref.mkdir()
    for i in range(4):
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()).save(ref / f"{i}.png")
    metrics = build_metrics(["fid", "clip"], ref=str(ref), inception_weights="my-inception.pth", prompts=["a cat"],
                            clip_model=OPEN_CLIP_NAME, clip_weights=str(tiny_checkpoint))
    assert metrics.provenance == {"features": "my-inception.pth", "ref": "my-ref",
                                  "clip_model": f"{OPEN_CLIP_NAME} (tiny.safetensors)"}
