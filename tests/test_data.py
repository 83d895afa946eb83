"""``fastgen.data``: image folders, prompts files, teacher samples and data-free streams on tiny teachers."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from PIL import Image
from tiny import make_ddpm_folder, make_sd_folder, make_sdxl_folder

import fastgen.data
import fastgen.data.teacher_pairs
from fastgen.data import Batch, build_data
from fastgen.samplers import sample_ddim
from fastgen.teacher import load_teacher


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """``teachers(name)``: a tiny teacher, built and loaded once per module."""
    builders = {"ddpm": (make_ddpm_folder, {}), "ddpm_class": (make_ddpm_folder, {"num_class_embeds": 3}),
                "sd": (make_sd_folder, {}), "sdxl": (make_sdxl_folder, {}), "gray": (_make_gray_folder, {})}
    loaded = {}

    def get(name):
        if name not in loaded:
            builder, kwargs = builders[name]
            loaded[name] = load_teacher(builder(tmp_path_factory.mktemp(name) / "pipe", **kwargs))
        return loaded[name]

    return get


def _make_gray_folder(path):
    """A 1-channel pixel DDPM teacher (8x8)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def _write_images(folder, count, size=(8, 8), mode="RGB", sub="", first=0):
    """``count`` constant images, image ``i`` filled with the value ``20 i`` (identifies it in a batch)."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        value = 20 * i if mode in ("L", "1") else (20 * i,) * len(mode)
        Image.new(mode, size, value).save(folder / sub / f"img{i:02d}.png")
    return folder


def _ids(batch: Batch) -> list[int]:
    return ((batch.x0[:, 0, 0, 0] + 1) * 127.5 / 20).round().long().tolist()


def _take(source, n, start=0):
    return list(itertools.islice(source.loader(start), n))


def _assert_cond_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_cond_equal(a[key], b[key])
        else:
            torch.testing.assert_close(a[key], b[key])


def test_image_folder_pixels(teachers, tmp_path):
    teacher = teachers("ddpm")
    folder = _write_images(tmp_path / "images", 5)
    source = build_data(folder, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    assert len(source) == 5 and source.needs_data
    batches = _take(source, 10)
    batch = batches[0]
    assert batch.x0.shape == (2, 3, 8, 8) and batch.cond is None and batch.uncond is None and batch.noise is None
    assert batch.x0.min() >= -1 and batch.x0.max() <= 1
    for x0, i in zip(batch.x0, _ids(batch)):
        torch.testing.assert_close(x0, torch.full((3, 8, 8), 20 * i / 127.5 - 1))
    stream = sum((_ids(b) for b in batches), [])
    epochs = [stream[e * 5:(e + 1) * 5] for e in range(4)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1, "epochs should be reshuffled"
    # deterministic given the seed, exact resume from any batch index, another seed reorders
    again = build_data(folder, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    assert [_ids(b) for b in _take(again, 10)] == [_ids(b) for b in batches]
    assert [_ids(b) for b in _take(again, 6, start=4)] == [_ids(b) for b in batches[4:]]
    other = build_data(folder, teacher, batch_size=2, seed=1, cache_dir=tmp_path / "cache")
    assert [_ids(b) for b in _take(other, 10)] != [_ids(b) for b in batches]
    assert not list((tmp_path / "cache").glob("images-*")), "pixel images need no cache"


def test_image_folder_modes_and_resize(teachers, tmp_path):
    teacher = teachers("ddpm")
    folder = tmp_path / "images"
    _write_images(folder, 2, mode="L", sub="gray")
    _write_images(folder, 2, mode="RGBA", sub="nested/rgba")
    _write_images(folder, 1, mode="RGB", sub=".hidden")
    (folder / "notes.txt").write_text("not an image")
    source = build_data(folder, teacher, batch_size=4, seed=0, cache_dir=tmp_path / "cache")
    assert len(source) == 4
    x0 = source.batch(0).x0
    assert x0.shape == (4, 3, 8, 8)
    torch.testing.assert_close(x0[:, :1].expand_as(x0), x0)  # grayscale → equal RGB channels

    big = _write_images(tmp_path / "big", 1, size=(12, 10))
    source = build_data(big, teacher, batch_size=1, seed=0, cache_dir=tmp_path / "cache", resize=True)
    assert source.batch(0).x0.shape == (1, 3, 8, 8)


def test_image_folder_errors(teachers, tmp_path):
    teacher = teachers("ddpm")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"(?s)empty.*holds no images.*\.png.*\.jpg.*\.webp"):
        build_data(empty, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")

    wrong = _write_images(tmp_path / "wrong", 1, size=(6, 4))
    with pytest.raises(ValueError, match=r"img00\.png is 6x4 .*expects 8x8.*resize_data=true"):
        build_data(wrong, teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")

    colour = _write_images(tmp_path / "colour", 2)
    with pytest.raises(ValueError, match=r"img00\.png has mode RGB \(3 channels\).*expects 1-channel"):
        build_data(colour, teachers("gray"), batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    gray = _write_images(tmp_path / "gray", 2, mode="L")
    x0 = build_data(gray, teachers("gray"), batch_size=2, seed=0, cache_dir=tmp_path / "cache").batch(0).x0
    assert x0.shape == (2, 1, 8, 8)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(tmp_path / "missing", teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"data\.csv is a \.csv file"):
        build_data(tmp_path / "data.csv", teacher, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="batch_size = 0"):
        build_data(None, teacher, batch_size=0, seed=0, cache_dir=tmp_path / "cache")


def test_image_folder_latents_cached(teachers, tmp_path, monkeypatch):
    teacher = teachers("sd")
    folder = _write_images(tmp_path / "images", 3, size=(16, 16))
    cache = tmp_path / "cache"
    first = build_data(folder, teacher, batch_size=3, seed=0, cache_dir=cache)
    batch = first.batch(0)
    assert batch.x0.shape == (3, 4, 8, 8) and first.needs_data
    assert batch.cond["encoder_hidden_states"].shape == (3, 77, 32)
    _assert_cond_equal(batch.cond, batch.uncond)  # no captions: trained on the unconditional branch
    _assert_cond_equal(batch.uncond, teacher.null_cond(3))
    assert len(list(cache.glob("images-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    for name in ("encode", "encode_prompts", "null_cond"):
        monkeypatch.setattr(teacher, name, refuse)
    second = build_data(folder, teacher, batch_size=3, seed=0, cache_dir=cache)
    torch.testing.assert_close(second.x0, first.x0)
    torch.testing.assert_close(second.batch(0).x0, batch.x0)
    assert not list(cache.glob("*.tmp"))

    stat = (folder / "img01.png").stat()
    os.utime(folder / "img01.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="cache should have been used"):  # a changed file is re-encoded
        build_data(folder, teacher, batch_size=3, seed=0, cache_dir=cache)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_prompts_file(teachers, tmp_path, monkeypatch, name):
    teacher = teachers(name)
    prompts = ["a red disc", "a blue square"]
    file = tmp_path / "prompts.txt"
    file.write_text(f"{prompts[0]}\n\n   \n  {prompts[1]} \n")
    cache = tmp_path / "cache"
    source = build_data(file, teacher, batch_size=3, seed=0, cache_dir=cache)
    assert len(source) == 2 and not source.needs_data
    batch = source.batch(0)
    assert batch.x0 is None and batch.noise is None
    width = 32 if name == "sd" else 64
    assert batch.cond["encoder_hidden_states"].shape == (3, 77, width)
    if name == "sdxl":
        added = batch.cond["added_cond_kwargs"]
        assert added["text_embeds"].shape == (3, 32) and added["time_ids"].shape == (3, 6)
    _assert_cond_equal(batch.uncond, teacher.null_cond(3))
    encoded = [teacher.encode_prompts([p])["encoder_hidden_states"][0] for p in prompts]
    for row in batch.cond["encoder_hidden_states"]:
        assert any(torch.allclose(row, e, atol=1e-5) for e in encoded)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(teacher, "encode_prompts", refuse)
    monkeypatch.setattr(teacher, "null_cond", refuse)
    again = build_data(file, teacher, batch_size=3, seed=0, cache_dir=cache)
    _assert_cond_equal(again.batch(0).cond, batch.cond)
    _assert_cond_equal(again.batch(0).uncond, batch.uncond)


def test_prompts_errors(teachers, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n")
    with pytest.raises(ValueError, match=r"blank\.txt is empty"):
        build_data(blank, teachers("sd"), batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"prompts\.txt given to .*UNet2DModel that takes no prompts"):
        build_data(prompts, teachers("ddpm"), batch_size=2, seed=0, cache_dir=tmp_path / "cache")


def test_teacher_samples_cached(teachers, tmp_path, monkeypatch):
    teacher = teachers("ddpm")
    cache = tmp_path / "cache"
    calls = []

    def counting_ddim(*args, **kwargs):
        calls.append(1)
        return sample_ddim(*args, **kwargs)

    monkeypatch.setattr(fastgen.data.teacher_pairs, "sample_ddim", counting_ddim)
    kwargs = dict(batch_size=3, seed=0, cache_dir=cache, num_teacher_samples=4, teacher_steps=2)
    first = build_data("teacher", teacher, **kwargs)
    assert len(first) == 4 and first.needs_data and calls == [1, 1]
    batch = first.batch(0)
    assert batch.x0.shape == batch.noise.shape == (3, 3, 8, 8) and batch.cond is None
    torch.testing.assert_close(sample_ddim(teacher.denoiser, batch.noise, teacher.schedule.timesteps(2)), batch.x0)

    again = build_data("teacher", teacher, **kwargs)
    assert calls == [1, 1], "cached samples should be reused"
    torch.testing.assert_close(again.x0, first.x0)
    torch.testing.assert_close(again.noise, first.noise)

    third = build_data("teacher", teacher, **{**kwargs, "teacher_steps": 3})
    assert len(calls) == 4, "other steps should regenerate"
    assert not torch.allclose(third.x0, first.x0)
    torch.testing.assert_close(third.noise, first.noise)
    assert len(list(cache.glob("teacher-samples-*.safetensors"))) == 1


def test_class_conditional(teachers, tmp_path):
    teacher = teachers("ddpm_class")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\); expected class_labels=True"):
        build_data(None, teacher, batch_size=2, seed=0, cache_dir=cache)
    with pytest.raises(ValueError, match="class_labels=True, but .* no class embedding"):
        build_data(None, teachers("ddpm"), batch_size=2, seed=0, cache_dir=cache, class_labels=True)

    free = build_data(None, teacher, batch_size=16, seed=0, cache_dir=cache, class_labels=True)
    assert len(free) == 0 and not free.needs_data
    labels = free.batch(5).cond["class_labels"]
    assert labels.shape == (16,) and 0 <= labels.min() and labels.max() < 3 and free.batch(5).uncond is None
    assert torch.equal(labels, _take(free, 1, start=5)[0].cond["class_labels"])

    folder = tmp_path / "images"
    _write_images(folder, 2, sub="0")
    _write_images(folder, 2, sub="2", first=2)
    source = build_data(folder, teacher, batch_size=4, seed=0, cache_dir=cache, class_labels=True)
    batch = source.batch(0)
    assert torch.equal(batch.cond["class_labels"], torch.tensor([0 if i < 2 else 2 for i in _ids(batch)]))
    _write_images(folder, 1, sub="7", first=4)
    with pytest.raises(ValueError, match=r"img04\.png is not in a class sub-folder \(found '7'\)"):
        build_data(folder, teacher, batch_size=4, seed=0, cache_dir=cache, class_labels=True)

    samples = build_data("teacher", teacher, batch_size=2, seed=0, cache_dir=cache, class_labels=True,
                         num_teacher_samples=2, teacher_steps=1)
    batch = samples.batch(0)
    timesteps = teacher.schedule.timesteps(1)
    torch.testing.assert_close(sample_ddim(teacher.denoiser, batch.noise, timesteps, cond=batch.cond), batch.x0)


def test_data_free_unconditional_and_batch_to(teachers, tmp_path):
    source = build_data(None, teachers("ddpm"), batch_size=2, seed=0, cache_dir=tmp_path)
    assert len(source) == 0 and not source.needs_data
    assert source.batch(0) == Batch(None, None, None, size=2)
    nested = Batch(torch.zeros(2), {"a": torch.zeros(2), "b": {"c": torch.zeros(2)}}, None, torch.zeros(2))
    moved = nested.to("meta")
    assert moved.x0.is_meta and moved.cond["a"].is_meta and moved.cond["b"]["c"].is_meta and moved.noise.is_meta
    assert moved.uncond is None and not nested.x0.is_meta


def test_toy_world_images(teachers, tmp_path):
    from fastgen.toy import toy_images

    toy = load_teacher("toy")
    source = build_data("toy", toy, batch_size=16, seed=0, cache_dir=tmp_path)
    assert source.needs_data and len(source) == fastgen.data.TOY_DATA_SIZE
    first = source.batch(0).x0
    assert first.shape == (16, 3, 16, 16) and float(first.min()) >= -1.0 and float(first.max()) <= 1.0
    pool = toy_images(fastgen.data.TOY_DATA_SIZE)
    assert bool((pool[None] == first[:, None]).flatten(2).all(2).any(1).all()), "batches are drawn from the toy pool"
    with pytest.raises(ValueError, match=r"data 'toy' gives \(3, 16, 16\) pixel images"):
        build_data("toy", teachers("ddpm"), batch_size=4, seed=0, cache_dir=tmp_path)
