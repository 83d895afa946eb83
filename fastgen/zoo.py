"""The teacher zoo: small pixel teachers unlike the bundled toy teacher in what distillation is sensitive to.

Every method's defaults were first checked on one teacher (16x16 RGB, linear-beta 1000-step DDPM, epsilon).
The zoo varies what those defaults could silently depend on: channels (1 vs 3), size (8x8, 16x16, 32x32), the
noise schedule (linear, ``squaredcos_cap_v2``, scaled-linear betas; rectified flow), the output type
(epsilon, v, velocity) and the number of training timesteps (1000, 500). The data is the toy world's shapes
(``fastgen.toy.ToyShapes``) rendered at the teacher's size, in grey (ITU-R BT.601 luma) for one channel.

The teachers are rebuilt by ``scripts/train_zoo.py`` (seeded, CPU, minutes each) into ``zoo_dir()``
(``$FASTGEN_ZOO``, else ``~/.cache/fastgen/zoo``); each is a diffusers ``DDPMPipeline`` folder.

Zoo FID is the toy FID (``fastgen.eval.toy_fid``) of images seen the toy feature network's way
(``toy_view``: resized to 16x16 with antialiasing, grey repeated to RGB), against 5,000 fresh images of the
teacher's own data seen the same way. It compares generators of one zoo teacher; numbers of different
teachers are not on one scale.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgen.errors import InputError
from fastgen.toy import TOY_IMAGE_SIZE, ToyShapes

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of the grey teachers' data."""


@dataclass(frozen=True)
class ZooTeacher:
    """One zoo teacher: its data (channels, size) and diffusion (betas or flow, output type, timesteps)."""

    name: str
    channels: int
    size: int
    schedule: str
    """``DDPMScheduler.beta_schedule`` ("linear", "squaredcos_cap_v2", "scaled_linear") or "flow"."""
    prediction: str
    """"epsilon", "v_prediction" or "flow" (velocity ``eps - x0``)."""
    train_timesteps: int = 1000
    betas: tuple[float, float] | None = None
    """``(beta_start, beta_end)`` where diffusers' defaults do not suit (None: ``DDPMScheduler``'s)."""
    blocks: tuple[int, ...] = (32, 64, 64)
    """``UNet2DModel.block_out_channels``; self-attention at the lowest resolution only."""

    def images(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` training images (n, channels, size, size) in [-1, 1]."""
        rgb = ToyShapes(n, self.size, seed).tensors()[0]
        if self.channels == 3:
            return rgb
        return torch.einsum("nchw,c->nhw", rgb, torch.tensor(LUMA)).unsqueeze(1)

    def write_images(self, folder: str | Path, n: int, seed: int = 0) -> Path:
        """``n`` training images as PNG files (grey or RGB, 8 bits) in ``folder``, the ``--data`` of a run that
        needs real images; a folder that already holds ``n`` of them is kept."""
        from PIL import Image

        folder = Path(folder)
        if len(list(folder.glob("*.png"))) == n:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((self.images(n, seed) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        for i, image in enumerate(pixels.numpy()):
            Image.fromarray(image[..., 0] if self.channels == 1 else image).save(folder / f"{i:06d}.png")
        return folder

    def scheduler(self):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if self.schedule == "flow":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.train_timesteps, shift=1.0)
        extra = {} if self.betas is None else {"beta_start": self.betas[0], "beta_end": self.betas[1]}
        return DDPMScheduler(num_train_timesteps=self.train_timesteps, beta_schedule=self.schedule,
                             prediction_type=self.prediction, **extra)

    def unet(self):
        from diffusers import UNet2DModel

        levels = len(self.blocks)
        return UNet2DModel(
            sample_size=self.size, in_channels=self.channels, out_channels=self.channels,
            block_out_channels=self.blocks, layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        )


ZOO: dict[str, ZooTeacher] = {z.name: z for z in (
    ZooTeacher("gray8-linear-eps", channels=1, size=8, schedule="linear", prediction="epsilon", blocks=(32, 64)),
    ZooTeacher("rgb32-cosine-v", channels=3, size=32, schedule="squaredcos_cap_v2", prediction="v_prediction",
               blocks=(16, 32, 32, 64)),
    ZooTeacher("gray16-scaled-eps-t500", channels=1, size=16, schedule="scaled_linear", prediction="epsilon",
               train_timesteps=500, betas=(0.0017, 0.024)),
    ZooTeacher("rgb8-flow", channels=3, size=8, schedule="flow", prediction="flow", blocks=(32, 64)),
)}
"""The zoo. ``gray16-scaled-eps-t500`` has SD's scaled-linear betas (0.00085 to 0.012 over 1000 steps) doubled
over its 500 steps, so that its terminal alpha-bar is SD's (0.0047). ``rgb32-cosine-v`` goes down to 4x4 in four
levels, 16 channels at full size: a training step at 32x32 costs 1.3 s of one core at batch 128, 3.5x less than
the 8x8/16x16 teachers' three levels from 32 channels would (4.5 s), which made it a four-hour build."""


def zoo_dir() -> Path:
    """Where ``scripts/train_zoo.py`` keeps the zoo: ``$FASTGEN_ZOO``, else ``~/.cache/fastgen/zoo``."""
    return Path(os.environ.get("FASTGEN_ZOO") or Path.home() / ".cache" / "fastgen" / "zoo")


def zoo_teacher(name: str) -> ZooTeacher:
    if name not in ZOO:
        raise InputError(f"zoo teacher {name!r} is unknown; expected one of {list(ZOO)}")
    return ZOO[name]


def zoo_teacher_path(name: str) -> Path:
    """The folder of zoo teacher ``name``; refused, with the command that builds it, while it is not built."""
    path = zoo_dir() / zoo_teacher(name).name
    if not (path / "model_index.json").is_file():
        raise InputError(f"zoo teacher {name!r} is not built in {path.parent}; build it with "
                         f"`python scripts/train_zoo.py --only {name}`")
    return path


def toy_view(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] as the toy feature network reads them: 16x16 (antialiased bilinear), RGB."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"zoo FID takes images (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    x = images.float()
    if tuple(x.shape[2:]) != (TOY_IMAGE_SIZE, TOY_IMAGE_SIZE):
        x = F.interpolate(x, size=(TOY_IMAGE_SIZE, TOY_IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@functools.lru_cache(maxsize=8)
def zoo_reference_stats(name: str, num_images: int = 5000, seed: int = 12345):
    """Toy-feature statistics of ``num_images`` fresh images of the teacher's data (cached per process)."""
    from fastgen.eval.toy_fid import toy_feature_stats

    return toy_feature_stats(toy_view(zoo_teacher(name).images(num_images, seed)))


def zoo_fid(images: torch.Tensor, name: str) -> float:
    """Zoo FID of ``images`` (N, C, H, W) in [-1, 1] against teacher ``name``'s data (module docstring)."""
    from fastgen.eval.toy_fid import toy_fid

    return toy_fid(toy_view(images), zoo_reference_stats(name))
