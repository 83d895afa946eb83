"""Captioned images (imagefolder, parquet, webdataset) and teacher samples of prompts and class labels."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
from PIL import Image
from tiny import make_ddpm_folder, make_sd_folder, make_sdxl_folder

import fastgen.data
import fastgen.data.captions
import fastgen.data.teacher_pairs
from fastgen.data import build_data, load_image
from fastgen.denoiser import slice_cond
from fastgen.samplers import Guidance, sample_ddim
from fastgen.teacher import load_teacher

CAPTIONS = ["a red disc", "a blue square", "a red disc", "two green lines"]
"""Caption of image ``i``; images 0 and 2 share theirs."""


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    builders = {"sd": (make_sd_folder, {}), "sdxl": (make_sdxl_folder, {}), "ddpm": (make_ddpm_folder, {}),
                "ddpm_class": (make_ddpm_folder, {"num_class_embeds": 3})}
    loaded = {}

    def get(name):
        if name not in loaded:
            builder, kwargs = builders[name]
            loaded[name] = load_teacher(builder(tmp_path_factory.mktemp(name) / "pipe", **kwargs))
        return loaded[name]

    return get


def _image(i):
    """Image ``i`` (16x16, the tiny latent teachers' size): a colour of its own."""
    return Image.new("RGB", (16, 16), (40 * i, 200 - 30 * i, 60 + 20 * i))


def _png(i) -> bytes:
    buffer = io.BytesIO()
    _image(i).save(buffer, "PNG")
    return buffer.getvalue()


def _captioned_folder(folder):
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(CAPTIONS):
            _image(i).save(folder / f"img{i}.png")
            f.write(json.dumps({"file_name": f"img{i}.png", "text": caption}) + "\n")
    return folder


def _flat_rows(cond, k):
    """Row ``k`` of every tensor of a (nested) condition."""
    return {key: value[k] for key, value in fastgen.data.flatten_cond(cond).items()}


def _assert_rows_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def _check_captions(source, teacher, tmp_path):
    """Every sample of a batch carries its own image and the embedding of its own caption."""
    latents = torch.cat([teacher.encode(load_image(_save(tmp_path, i), teacher.image_size, 3)[None])
                         for i in range(len(CAPTIONS))])
    assert len(source) == len(CAPTIONS) and source.needs_data
    batch = source.batch(0)
    images = []
    for k, x0 in enumerate(batch.x0):
        i = int((latents - x0).flatten(1).abs().amax(1).argmin())
        torch.testing.assert_close(x0, latents[i], atol=1e-4, rtol=1e-4)
        _assert_rows_equal(_flat_rows(batch.cond, k), _flat_rows(teacher.encode_prompts([CAPTIONS[i]]), 0))
        images.append(i)
    assert sorted(images) == list(range(len(CAPTIONS)))
    hidden = batch.cond["encoder_hidden_states"]
    for a in range(len(images)):
        for b in range(a):
            same = CAPTIONS[images[a]] == CAPTIONS[images[b]]
            assert torch.allclose(hidden[a], hidden[b]) == same, "the condition differs exactly when the caption does"
    _assert_rows_equal(_flat_rows(batch.uncond, 0), _flat_rows(teacher.null_cond(1), 0))


def _save(tmp_path, i):
    path = tmp_path / "reference" / f"{i}.png"
    path.parent.mkdir(exist_ok=True)
    _image(i).save(path)
    return path


def _refuse(*args, **kwargs):
    raise AssertionError("the cache should have been used")


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_captioned_folder_conditions_each_image_on_its_caption(teachers, tmp_path, monkeypatch, name):
    teacher = teachers(name)
    folder = _captioned_folder(tmp_path / "captioned")
    cache = tmp_path / "cache"
    source = build_data(folder, teacher, batch_size=4, seed=0, cache_dir=cache)
    _check_captions(source, teacher, tmp_path)
    assert len(list(cache.glob("captioned-*.safetensors"))) == 1
    assert source.cond["encoder_hidden_states"].shape[0] == 3, "a shared caption is encoded once"

    for method in ("encode", "encode_prompts", "null_cond"):
        monkeypatch.setattr(teacher, method, _refuse)
    monkeypatch.setattr(fastgen.data.captions, "load_captioned", _refuse)
    again = build_data(folder, teacher, batch_size=4, seed=0, cache_dir=cache)
    torch.testing.assert_close(again.batch(3).x0, source.batch(3).x0)
    _assert_rows_equal(_flat_rows(again.batch(3).cond, 1), _flat_rows(source.batch(3).cond, 1))


def test_a_text_teacher_without_captions_or_prompts_is_warned_once(teachers, tmp_path, capsys):
    """Uncaptioned images, teacher samples or no data without a prompts file distil a text teacher on its empty
    prompt alone: a choice, but silent it was a trap (a folder meant to carry captions, --prompts forgotten)."""
    teacher = teachers("sd")
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(2):
        _image(i).save(plain / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red disc\n")
    for spec, kwargs in ((plain, {}), (None, {}), ("teacher", {"num_teacher_samples": 2, "teacher_steps": 1})):
        build_data(spec, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache", **kwargs)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: data {spec} carries no captions"), warnings
    for spec, kwargs in ((_captioned_folder(tmp_path / "captioned"), {}), (None, {"prompts": prompts}),
                         ("teacher", {"prompts": prompts, "num_teacher_samples": 2, "teacher_steps": 1})):
        build_data(spec, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache", **kwargs)
        assert "warning" not in capsys.readouterr().err, spec
    build_data(plain, teachers("ddpm"), batch_size=2, seed=0, cache_dir=tmp_path / "cache", resize=True)
    assert "warning" not in capsys.readouterr().err, "an unconditional teacher has nothing to miss"


def test_images_a_metadata_file_leaves_out_are_named(teachers, tmp_path, capsys):
    """``datasets``' imagefolder drops the images its metadata file does not name: the data shrank silently."""
    folder = _captioned_folder(tmp_path / "captioned")
    _image(7).save(folder / "extra.png")
    source = build_data(folder, teachers("sd"), batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    assert len(source) == len(CAPTIONS)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: 1 images in {folder} are not named in its metadata file and are left out of the "
                        f"data (first: {folder / 'extra.png'}); expected a row with file_name and caption for each "
                        "image"]


def test_parquet_and_webdataset_shards(teachers, tmp_path):
    import datasets

    teacher = teachers("sd")
    table = datasets.Dataset.from_dict({"image": [_image(i) for i in range(len(CAPTIONS))], "caption": CAPTIONS})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "train.parquet"))
    source = build_data(tmp_path / "train.parquet", teacher, batch_size=4, seed=0, cache_dir=tmp_path / "cache")
    _check_captions(source, teacher, tmp_path)  # the "caption" column, as "text" is absent

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"part-{shard}.tar", "w") as tar:
            for i in range(2 * shard, 2 * shard + 2):
                for member, data in ((f"{i:04d}.png", _png(i)), (f"{i:04d}.txt", CAPTIONS[i].encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = build_data(str(shards / "*.tar"), teacher, batch_size=4, seed=0, cache_dir=tmp_path / "cache")
    _check_captions(source, teacher, tmp_path)  # webdataset's "txt" member
    one = build_data(shards / "part-1.tar", teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    assert len(one) == 2


def test_captioned_errors(teachers, tmp_path):
    import datasets

    teacher = teachers("sd")
    folder = _captioned_folder(tmp_path / "captioned")
    with pytest.raises(ValueError, match=r"caption_column = 'prompt'.*columns found: \['image', 'text'\]"):
        build_data(folder, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache", caption_column="prompt")
    datasets.Dataset.from_dict({"name": ["x"], "text": ["y"]}).to_parquet(str(tmp_path / "no-images.parquet"))
    with pytest.raises(ValueError, match=r"no image column: its columns are \['name', 'text'\]"):
        build_data(tmp_path / "no-images.parquet", teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"captioned data .*train\.parquet given to .*UNet2DModel that takes no"):
        build_data(tmp_path / "train.parquet", teachers("ddpm"), batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"matches 0 files"):
        build_data(str(tmp_path / "none-*.tar"), teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"prompts = .*prompts\.txt applies to data 'teacher' or None"):
        build_data(folder, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache", prompts=prompts)
    with pytest.raises(ValueError, match=r"prompts = .* or None, .*: prompts=null; and teacher_sample_guidance = 3.0 "):
        build_data(folder, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache", prompts=prompts,
                   teacher_guidance=3.0)  # both in one line (a preset for teacher samples sets both)
    with pytest.raises(ValueError, match=r"teacher_sample_guidance = 3.0 .*UNet2DModel; expected 1"):
        build_data("teacher", teachers("ddpm"), batch_size=2, seed=0, cache_dir=tmp_path / "cache",
                   teacher_guidance=3.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    _image(0).save(empty / "a.png")
    (empty / "metadata.jsonl").write_text("\n")  # was an IndexError deep in datasets
    with pytest.raises(ValueError, match=r"empty/metadata\.jsonl lists no images; expected one row per image"):
        build_data(empty, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    with tarfile.open(tmp_path / "uncaptioned.tar", "w") as tar:  # a key without its .txt: datasets' ValueError
        for member, data in (("0000.png", _png(0)), ("0000.txt", b"a cat"), ("0001.png", _png(1))):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"captioned data .*uncaptioned\.tar cannot be read by datasets' webdataset "
                                         r"loader \(ValueError: .*\); expected images each with its caption"):
        build_data(tmp_path / "uncaptioned.tar", teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    # an unconditional teacher reads a folder with metadata as plain images
    pixels = teachers("ddpm")
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (8, 8)).save(plain / "a.png")
    (plain / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    assert len(build_data(plain, pixels, batch_size=2, seed=0, cache_dir=tmp_path / "cache")) == 1


def test_teacher_samples_follow_their_prompts(teachers, tmp_path, monkeypatch):
    teacher = teachers("sd")
    prompts = ["a red disc", "a blue square", "two green lines"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    calls = []

    def counting_ddim(*args, **kwargs):
        calls.append(1)
        return sample_ddim(*args, **kwargs)

    monkeypatch.setattr(fastgen.data.teacher_pairs, "sample_ddim", counting_ddim)
    kwargs = dict(batch_size=5, seed=0, cache_dir=tmp_path / "cache", num_teacher_samples=5, teacher_steps=2,
                  prompts=file, teacher_guidance=2.0)
    source = build_data("teacher", teacher, **kwargs)
    assert calls == [1] and len(source) == 5
    index = source.cond_index
    assert sorted(index[:3].tolist()) == [0, 1, 2], "every prompt once per round"
    timesteps = teacher.schedule.timesteps(2)
    guidance = Guidance(teacher.null_cond(1), 2.0)
    for k in range(5):
        cond = teacher.encode_prompts([prompts[index[k]]])
        row = slice_cond(source.cond, index[k:k + 1])
        _assert_rows_equal(_flat_rows(row, 0), _flat_rows(cond, 0))
        direct = sample_ddim(teacher.denoiser, source.noise[k:k + 1], timesteps, cond=cond, guidance=guidance)
        torch.testing.assert_close(source.x0[k:k + 1], direct, atol=1e-4, rtol=1e-4)
    batch = source.batch(0)
    for k, sample in enumerate(source.indices(0).tolist()):
        torch.testing.assert_close(batch.x0[k], source.x0[sample])
        _assert_rows_equal(_flat_rows(batch.cond, k), _flat_rows(teacher.encode_prompts([prompts[index[sample]]]), 0))

    again = build_data("teacher", teacher, **kwargs)
    assert calls == [1], "cached samples should be reused"
    torch.testing.assert_close(again.x0, source.x0)
    unguided = build_data("teacher", teacher, **{**kwargs, "teacher_guidance": 1.0})
    assert len(calls) == 2 and not torch.allclose(unguided.x0, source.x0), "another guidance regenerates"
    torch.testing.assert_close(unguided.noise, source.noise)

    free = build_data(None, teacher, batch_size=4, seed=0, cache_dir=tmp_path / "cache", prompts=file)
    assert not free.needs_data and len(free) == 3  # data-free training on the prompts


def test_teacher_samples_of_class_labels(teachers, tmp_path):
    teacher = teachers("ddpm_class")
    source = build_data("teacher", teacher, batch_size=3, seed=1, cache_dir=tmp_path, class_labels=True,
                        num_teacher_samples=6, teacher_steps=2)
    labels = source.cond["class_labels"]
    assert labels.shape == (6,) and len(labels.unique()) > 1
    timesteps = teacher.schedule.timesteps(2)
    for k in range(6):
        direct = sample_ddim(teacher.denoiser, source.noise[k:k + 1], timesteps, cond={"class_labels": labels[k:k + 1]})
        torch.testing.assert_close(source.x0[k:k + 1], direct, atol=1e-4, rtol=1e-4)
    batch = source.batch(1)
    assert torch.equal(batch.cond["class_labels"], labels[source.indices(1)]) and batch.uncond is None


def test_trainer_runs_on_captioned_images(teachers, tmp_path):
    from fastgen.config import DistillConfig, load_config
    from fastgen.trainer import Trainer

    teacher = teachers("sd")
    folder = _captioned_folder(tmp_path / "captioned")
    config = load_config(DistillConfig, None, [f"teacher={teacher.source}", "method=consistency", f"data={folder}",
                                               f"output={tmp_path / 'run'}", "train.batch_size=4",
                                               "train.max_steps=1", "train.log_every=1"])
    trainer = Trainer(config)  # conftest resets accelerate's process state after the test
    _check_captions(trainer.run.data, teacher, tmp_path)
    trainer.fit()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["generator/loss"])
