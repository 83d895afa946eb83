"""The teacher zoo (fastgen/zoo.py, scripts/train_zoo.py): its data, schedules, training targets and zoo FID."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.zoo import ZOO, toy_view, zoo_fid, zoo_teacher_path

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture(scope="module")
def train_toy_teacher():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("train_toy_teacher", SCRIPTS / "train_toy_teacher.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_grey_data_is_the_luma_of_the_colour_data_as_pil_computes_it():
    rgb, grey = ZOO["rgb8-flow"].images(16, seed=3), ZOO["gray8-linear-eps"].images(16, seed=3)
    assert rgb.shape == (16, 3, 8, 8) and grey.shape == (16, 1, 8, 8)
    pixels = ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pil = np.stack([np.asarray(Image.fromarray(p).convert("L"), dtype=np.float32) for p in pixels])
    ours = ((grey[:, 0] + 1) * 127.5).numpy()
    assert np.abs(ours - pil).max() <= 1.0  # PIL rounds the 8-bit RGB it is given; we use the floats
    assert grey.std() > 0.2  # shapes on a background, not a flat image


def test_the_schedules_are_what_they_say():
    from diffusers import DDPMScheduler

    short = ZOO["gray16-scaled-eps-t500"].scheduler()
    sd = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert short.config.num_train_timesteps == 500
    assert short.alphas_cumprod[-1].item() == pytest.approx(sd.alphas_cumprod[-1].item(), rel=0.1)  # SD's terminal SNR
    cosine = ZOO["rgb32-cosine-v"].scheduler()
    assert cosine.config.prediction_type == "v_prediction" and cosine.config.beta_schedule == "squaredcos_cap_v2"
    assert type(ZOO["rgb8-flow"].scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"
    for spec in ZOO.values():
        unet = spec.unet()
        x = torch.zeros(2, spec.channels, spec.size, spec.size)
        assert unet(x, torch.tensor([1, 2])).sample.shape == x.shape


@pytest.mark.parametrize("name", ["rgb8-flow", "rgb32-cosine-v"])
def test_training_targets_match_diffusers(train_toy_teacher, name):
    """Flow: x_t is diffusers' own interpolation (``scale_noise``) and the target its sigma-derivative; v: x_t is
    ``add_noise`` and the target ``alpha eps - sigma x0`` (Salimans & Ho 2022, eq. 10), written out here."""
    scheduler = ZOO[name].scheduler()
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_t, t, target = train_toy_teacher.noised_and_target(scheduler, x0, eps, torch.Generator().manual_seed(1))
    if name == "rgb8-flow":
        sigma = t / 1000
        scheduler.set_timesteps(sigmas=sigma.tolist())  # diffusers' interpolation at exactly these sigmas
        reference = torch.cat([scheduler.scale_noise(x0[i:i + 1], scheduler.timesteps[i:i + 1], eps[i:i + 1])
                               for i in range(4)])
        assert torch.allclose(x_t, reference, atol=1e-6)
        h = 1e-3  # the target is d x_t / d sigma: a finite difference along the same interpolation
        assert torch.allclose(target, (((1 - sigma - h).view(4, 1, 1, 1) * x0 + (sigma + h).view(4, 1, 1, 1) * eps)
                                       - x_t) / h, atol=1e-3)
    else:
        assert torch.equal(x_t, scheduler.add_noise(x0, eps, t))
        a = scheduler.alphas_cumprod[t].sqrt().view(4, 1, 1, 1)
        s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(4, 1, 1, 1)
        assert torch.allclose(target, a * eps - s * x0, atol=1e-6)  # Salimans & Ho 2022, eq. 10


def test_zoo_fid_tells_the_data_from_noise_and_a_blur():
    name = "gray8-linear-eps"
    data = ZOO[name].images(1000, seed=7)
    assert toy_view(data).shape == (1000, 3, 16, 16)
    same = zoo_fid(data, name)
    blurred = zoo_fid(torch.nn.functional.avg_pool2d(data, 3, 1, 1, count_include_pad=False), name)
    noise = zoo_fid(torch.randn_like(data).clamp(-1, 1), name)
    assert same < 5 < blurred < noise and noise > 100


def test_train_zoo_builds_teachers_that_load_as_their_family_and_take_their_own_images(tmp_path, monkeypatch):
    from fastgen.data.images import image_data
    from fastgen.errors import InputError
    from fastgen.teacher import load_teacher

    monkeypatch.setenv("FASTGEN_ZOO", str(tmp_path / "zoo"))
    with pytest.raises(InputError, match="scripts/train_zoo.py --only rgb8-flow"):
        zoo_teacher_path("rgb8-flow")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("train_zoo", SCRIPTS / "train_zoo.py")
    train_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_zoo)
    train_zoo.main(["--only", "gray8-linear-eps,rgb8-flow", "--steps", "2", "--batch-size", "4", "--pool-size", "16",
                    "--sweep", "1,2", "--num-samples", "8", "--out", str(tmp_path / "docs")])
    table = (tmp_path / "docs" / "zoo_teachers.md").read_text()
    assert table.count("| gray8-linear-eps | 1x8x8 | linear | epsilon | 1000 |") == 2  # DDIM and DPM-Solver++ rows
    assert table.count("| rgb8-flow | 3x8x8 | flow | flow | 1000 |") == 2
    health = (tmp_path / "docs" / "zoo_health.md").read_text()
    assert health.count("| rgb8-flow |") == 4 and "| gray8-linear-eps | Gaussian noise |" in health
    expected = {"gray8-linear-eps": ("vp", (1, 8, 8)), "rgb8-flow": ("flow", (3, 8, 8))}
    for name, (family, shape) in expected.items():
        teacher = load_teacher(zoo_teacher_path(name))
        assert (teacher.schedule.family, teacher.sample_shape) == (family, shape)
        folder = ZOO[name].write_images(tmp_path / f"data-{name}", 6, seed=1)
        x0, labels = image_data(folder, teacher, tmp_path / "cache", batch_size=4)
        assert labels is None and x0.shape == (6, *shape)
        assert (x0 - ZOO[name].images(6, seed=1)).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit rounding only
