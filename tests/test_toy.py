"""The toy world: the procedural dataset, the bundled feature net and teacher, toy FID, and the check of
images measured with ``--features toy`` (refused when they cannot be toy images, warned about when unlike them)."""

import json

import pytest
import torch
import torchvision.transforms.functional as TF

import fastgen.toy
from fastgen.eval.fid import frechet_distance
from fastgen.errors import InputError
from fastgen.eval.toy_fid import (
    SHAPE_RATE_FLOOR,
    ToyWorldCheck,
    toy_feature_stats,
    toy_features,
    toy_fid,
    toy_shape_rate,
)
from fastgen.toy import (
    TOY_CLASSES,
    TOY_FEATURE_CLASSES,
    TOY_IMAGE_SIZE,
    ToyShapes,
    load_toy_feature_net,
    toy_images,
    toy_teacher_path,
)


def test_dataset_is_deterministic_per_seed_and_index():
    a, b = ToyShapes(16, seed=3).tensors(), ToyShapes(16, seed=3).tensors()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = ToyShapes(16, seed=4).tensors()[0]
    assert (a[0] - other).abs().amax(dim=(1, 2, 3)).min() > 0.1
    longer = ToyShapes(100, seed=3)
    image, label = longer[7]
    assert torch.equal(image, a[0][7]) and label == int(a[1][7])
    assert torch.equal(toy_images(16, seed=3), a[0])


def test_dataset_shape_range_dtype_and_labels():
    images, labels = ToyShapes(200, seed=0).tensors()
    assert images.shape == (200, 3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.max() > 0.5 and images.min() < -0.5
    assert set(labels.tolist()) == set(range(len(TOY_CLASSES)))
    image, label = ToyShapes(5, size=32, seed=1)[4]
    assert image.shape == (3, 32, 32) and isinstance(label, int)


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_images=-1"):
        ToyShapes(-1)
    with pytest.raises(ValueError, match="size=2"):
        ToyShapes(4, size=2)
    with pytest.raises(IndexError, match="index 4"):
        ToyShapes(4)[4]


def test_missing_assets_name_the_path_and_the_script(tmp_path, monkeypatch):
    monkeypatch.setattr(fastgen.toy, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_toy_teacher.py") as info:
        toy_teacher_path()
    assert str(tmp_path / "toy_teacher") in str(info.value)
    with pytest.raises(FileNotFoundError, match="toy_features"):
        load_toy_feature_net()


def test_feature_net_classifies_fresh_images():
    net = load_toy_feature_net()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    images, labels = ToyShapes(1000, seed=2024).tensors()
    with torch.no_grad():
        logits = net(images)
    assert logits.shape == (1000, len(TOY_FEATURE_CLASSES))
    assert (logits.argmax(1) == labels).float().mean() >= 0.9
    features = toy_features(images[:10])
    assert features.shape == (10, net.config["feature_dim"]) and features.dtype == torch.float64


def test_toy_fid_separates_real_from_noisy_blurred_and_grey_images():
    real_a, real_b = toy_images(1000, seed=101), toy_images(1000, seed=102)
    reference = toy_feature_stats(real_b)
    noise = torch.randn(real_a.shape, generator=torch.Generator().manual_seed(0))
    fid_real = toy_fid(real_a, reference)
    fid_noisy = toy_fid(real_a + 0.1 * noise, reference)
    fid_blurred = toy_fid(TF.gaussian_blur(real_a, 5, 0.7), reference)
    fid_grey = toy_fid(real_a.mean(1, keepdim=True).expand(-1, 3, -1, -1), reference)
    assert fid_real < 2.0
    assert fid_noisy > 100.0 and fid_blurred > 100.0 and fid_grey > 100.0
    assert min(fid_noisy, fid_blurred, fid_grey) > 50 * fid_real
    assert toy_fid(real_a + 0.05 * noise, reference) > 4 * fid_real


def test_toy_fid_is_frechet_distance_of_the_feature_statistics():
    real_a, real_b = toy_images(300, seed=5), toy_images(300, seed=6)
    fa, fb = toy_features(real_a).numpy(), toy_features(real_b).numpy()
    expected = frechet_distance(fa.mean(0), torch.from_numpy(fa).T.cov().numpy(),
                                fb.mean(0), torch.from_numpy(fb).T.cov().numpy())
    assert toy_fid(real_a, real_b) == pytest.approx(expected, rel=1e-9)
    assert toy_fid(real_a.half(), real_b) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(4, 3, 32, 32), r"\(4, 3, 32, 32\)"),
        (torch.zeros(3, 16, 16), r"\(3, 16, 16\)"),
        (torch.full((4, 3, 16, 16), 200.0), r"\[0, 255\]"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), "torch.uint8"),
    ],
)
def test_toy_features_reject_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        toy_features(images)


def test_bundled_teacher_loads_with_stock_diffusers():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    path = toy_teacher_path()
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipe = DDPMPipeline.from_pretrained(path)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.unet.config.sample_size == TOY_IMAGE_SIZE and pipe.unet.config.in_channels == 3
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert sum(p.numel() for p in pipe.unet.parameters()) <= 2_000_000
    x_t = torch.randn(2, 3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = pipe.unet(x_t, torch.tensor([999, 999])).sample
    assert eps.shape == x_t.shape and torch.isfinite(eps).all()
    assert torch.nn.functional.cosine_similarity(eps.flatten(), x_t.flatten(), dim=0) > 0.9


# -- --features toy on images that are not the toy world ------------------------------------------------------


def _save_pngs(folder, images):
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(folder / f"{i:02d}.png")
    return folder


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: --features toy")]


def test_shape_rate_tells_toy_images_from_noise_and_grey_images_where_confidence_does_not():
    real = toy_images(500, seed=777)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    grey = real.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert toy_shape_rate(real) > 0.99
    assert toy_shape_rate(noise) == 0.0 and toy_shape_rate(grey) < SHAPE_RATE_FLOOR / 2
    with torch.no_grad():  # the maximum class probability: as high on noise ("corrupted") as on toy images
        confidence = [load_toy_feature_net()(x).softmax(1).max(1).values.mean() for x in (real, noise)]
    assert confidence[1] >= confidence[0] > 0.9


def test_images_that_cannot_be_toy_images_are_refused(tmp_path, monkeypatch):
    from tiny import make_ddpm_folder

    import fastgen.generate
    from fastgen.eval.evaluate import build_metrics, evaluate

    metrics = build_metrics(["fid"], features="toy")
    with pytest.raises(InputError, match=r"16x16 RGB images, expected \(N, 3, 16, 16\); got images of shape "
                                         r"\(4, 1, 16, 16\)"):
        metrics["fid"](torch.zeros(4, 1, 16, 16))  # without the check, fid's uint8 path would grey-expand them
    with pytest.raises(InputError, match=r"\(4, 3, 32, 32\)"):
        metrics["fid"](torch.zeros(4, 3, 32, 32))
    small = _save_pngs(tmp_path / "small-ref", toy_images(3, size=8))
    with pytest.raises(InputError, match="--ref .*small-ref: images of 8x8 pixels; toy features"):
        build_metrics(["fid"], features="toy", ref=str(small))

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing the model")

    monkeypatch.setattr(fastgen.generate, "generate", no_sampling)
    model = make_ddpm_folder(tmp_path / "ddpm8", sample_size=8)
    with pytest.raises(InputError, match=r"ddpm8 samples images of shape \(4, 3, 8, 8\)"):
        evaluate(str(model), [1], tmp_path / "eval", 4, metrics)
    with pytest.raises(InputError, match=r"ddpm8 samples images of shape \(4, 3, 8, 8\)"):
        evaluate("toy", [1], tmp_path / "eval", 4, metrics, teacher_dir=str(model))
    assert not (tmp_path / "eval").exists()


def test_toy_world_check_warns_once_and_only_when_no_sample_set_looks_like_toy_images(capsys):
    real = toy_images(200, seed=5)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    check = ToyWorldCheck()
    check(noise)
    check(real)  # a poor point and a good one: the sweep measured toy-like samples somewhere
    check.warn_if_foreign()
    assert check.best_shape_rate > 0.99 and not _warnings(capsys.readouterr().err)
    check = ToyWorldCheck()
    check(noise)
    check(real.mean(1, keepdim=True).expand(-1, 3, -1, -1))
    check.warn_if_foreign()
    check.warn_if_foreign()
    (line,) = _warnings(capsys.readouterr().err)
    assert f"reads only {check.best_shape_rate:.0%} of the samples even at the best sweep point" in line
    assert "below 40%" in line


def test_eval_warns_once_about_a_foreign_reference_and_foreign_samples(tmp_path, capsys):
    from fastgen.eval.evaluate import build_metrics, evaluate

    grey = _save_pngs(tmp_path / "grey-ref", toy_images(24, seed=4).mean(1, keepdim=True).expand(-1, 3, -1, -1))
    metrics = build_metrics(["fid", "kid"], features="toy", ref=str(grey))
    (line,) = _warnings(capsys.readouterr().err)
    assert "of the reference images in" in line and "grey-ref" in line
    evaluate("toy", [1, 2], tmp_path / "eval", 16, metrics)  # 1 and 2 DDIM steps of the toy teacher: noise
    assert not _warnings(capsys.readouterr().err), "warned once already"

    evaluate("toy", [1, 2], tmp_path / "again", 16, build_metrics(["fid"], features="toy"))
    (line,) = _warnings(capsys.readouterr().err)
    assert "of the samples even at the best sweep point" in line
