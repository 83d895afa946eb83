"""Toy FID: the Fréchet distance (``fastgen.eval.fid``) on features of the bundled ``ToyFeatureNet``.

The feature net is trained to tell the toy shape classes from each other and from noised or blurred
images, and to read the hue, so toy FID separates a sharp generator of the toy world from a blurry or
noisy one. It measures quality on 16x16 ``ToyShapes`` images only and is offline (no hub weights).

``ToyWorldCheck`` guards ``fastgen eval --features toy``: images that cannot be toy images (another size or
channel count) are refused, and images that do not look like the toy world are warned about. The signal is
the *shape rate*, the fraction of images the toy classifier reads as one of ``TOY_CLASSES`` rather than
"corrupted" (``toy_shape_rate``). Measured with the bundled feature net on 1000 images a set (240 for
toy-t2i, on ``toy_eval_prompts()``), shape rate (mean maximum class probability):

- real toy images (``toy_images``, seeds 777 and 778): 0.997 and 1.000 (0.95);
- the bundled toy teacher, DDIM 1 / 2 / 4 / 6 / 8 / 16 / 64 steps: 0.00 / 0.02 / 0.12 / 0.41 / 0.56 / 0.78 /
  0.90 (1.00 falling to 0.86);
- the toy-t2i teacher, DDIM 1 / 2 / 4 / 8 / 32 steps: 0.25 / 0.62 / 0.78 / 0.80 / 0.84 (0.82 - 0.88);
- Gaussian or uniform noise, black images: 0.00 (1.00); constant random colours: 0.25 (0.94);
- crops of matplotlib's sample photos resized to 16x16: 0.00 - 0.25 (0.92 - 1.00);
- random drawings (rectangles, ellipses, lines, text) on white, random or black backgrounds: 0.01 / 0.10 /
  0.14 (0.93 - 1.00).

Foreign images are read as "corrupted" (the class of noised or blurred toy images) with high confidence, so
the mean maximum class probability (the baseline of Hendrycks & Gimpel 2017, "A baseline for detecting
misclassified and out-of-distribution examples") is no signal here: it is as high on them as on real toy
images. Nor did the other readings measured (hue confidence; the Mahalanobis distance of the features to
the classes, Lee et al. 2018) tell foreign images from a poor toy generator's: the toy teacher's 4-step
samples lie farther from the classes than photo crops (median squared distance 120 against 92). So the check judges a whole sweep: it warns when the best
shape rate of all its points is below ``SHAPE_RATE_FLOOR`` = 0.4, between the foreign images' 0.25 and the
toy teacher's 0.56 at 8 DDIM steps (a sweep of the toy teacher at 6 steps or fewer only is warned about: its
samples are not toy-like there), and when a reference folder's shape rate is below it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from fastgen.errors import InputError, warn
from fastgen.eval.fid import FeatureStats, frechet_distance, iter_image_batches, video_frames
from fastgen.toy import TOY_CLASSES, TOY_IMAGE_SIZE, ToyFeatureNet, ToyShapes, load_toy_feature_net

EXPECTED_SHAPE = (3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE)
SHAPE_RATE_FLOOR = 0.4
"""Below this shape rate images are not taken for the toy world (module docstring: the measurements)."""


@functools.lru_cache(maxsize=1)
def _default_net() -> ToyFeatureNet:
    return load_toy_feature_net("cpu")


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"toy_features: images is a {type(images).__name__}, expected a torch.Tensor (N, 3, 16, 16)")
    if images.ndim != 4 or tuple(images.shape[1:]) != EXPECTED_SHAPE:
        raise InputError(f"toy features (--features toy) take the toy world's 16x16 RGB images, expected (N, 3, 16, 16); "
                         f"got images of shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"toy_features: images have dtype {images.dtype}, expected a float tensor in [-1, 1]")
    if images.numel():
        low, high = images.min().item(), images.max().item()
        if high > 2.0 and low > -1.0:
            raise ValueError(f"toy_features: images range over [{low:.3g}, {high:.3g}], expected [-1, 1] "
                             "(images in [0, 255] must be mapped with x / 127.5 - 1)")
    return images.detach()


@torch.no_grad()
def toy_features(images: torch.Tensor, batch_size: int = 256, net: ToyFeatureNet | None = None) -> torch.Tensor:
    """Features (N, D) in float64 on the CPU of images (N, 3, 16, 16) in [-1, 1] (any float dtype or device)."""
    images = _check_images(images)
    net = _default_net() if net is None else net
    device = next(net.parameters()).device
    chunks = [net.features(images[i:i + batch_size].to(device, torch.float32)).double().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, net.config["feature_dim"], dtype=torch.float64)


@torch.no_grad()
def toy_shape_rate(images: torch.Tensor, batch_size: int = 256, net: ToyFeatureNet | None = None) -> float:
    """Fraction of images (N, 3, 16, 16) in [-1, 1] whose most probable toy class is a shape, not "corrupted"."""
    images = _check_images(images)
    net = _default_net() if net is None else net
    device = next(net.parameters()).device
    shapes = sum(int((net(images[i:i + batch_size].to(device, torch.float32)).argmax(1) < len(TOY_CLASSES)).sum())
                 for i in range(0, len(images), batch_size))
    return shapes / max(len(images), 1)


class ToyWorldCheck:
    """Refuses images the toy feature network cannot read and warns, once, about images unlike the toy world
    (module docstring). Call it on every set of samples measured; ``warn_if_foreign`` after the last one."""

    def __init__(self):
        self.best_shape_rate: float | None = None
        self._last = None  # the images last read: the metrics of one sweep point share one reading
        self._warned = False

    def check_model(self, model, source: str, num_samples: int) -> None:
        """Refuse, before any sampling, a model (``fastgen.teacher.Teacher``) whose images are not 16x16 RGB."""
        channels = model.image_channels
        shape = (channels, *model.image_size)
        if tuple(shape) != EXPECTED_SHAPE:
            raise InputError(f"toy features (--features toy) take the toy world's 16x16 RGB images, expected (N, 3, "
                             f"16, 16); {source} samples images of shape {(num_samples, *shape)}")

    def check_reference(self, folder: str | Path) -> None:
        """Refuse a reference folder of images that are not 16x16; warn if they do not look like toy images."""
        shapes = total = 0
        for batch in iter_image_batches(str(folder), 256):
            if tuple(batch.shape[2:]) != EXPECTED_SHAPE[1:]:
                raise InputError(f"--ref {folder}: images of {batch.shape[2]}x{batch.shape[3]} pixels; toy features "
                                 "(--features toy) take the toy world's 16x16 images")
            shapes += toy_shape_rate(batch.float() / 127.5 - 1.0) * len(batch)
            total += len(batch)
        self._warn_below(shapes / total, f"the reference images in {folder}")

    def __call__(self, images: torch.Tensor) -> None:
        """Refuse ``images`` (N, 3, 16, 16) in [-1, 1] (or videos of such frames, ``(N, 3, F, 16, 16)``) of another
        shape; record their shape rate."""
        if images is self._last:
            return
        rate = toy_shape_rate(video_frames(images))
        self._last = images
        self.best_shape_rate = rate if self.best_shape_rate is None else max(self.best_shape_rate, rate)

    def warn_if_foreign(self) -> None:
        """Warn if even the best set of samples seen had a shape rate below ``SHAPE_RATE_FLOOR``."""
        if self.best_shape_rate is not None:
            self._warn_below(self.best_shape_rate, "the samples even at the best sweep point")

    def _warn_below(self, rate: float, subject: str) -> None:
        if rate < SHAPE_RATE_FLOOR and not self._warned:
            self._warned = True
            warn(f"--features toy: the toy feature network reads only {rate:.0%} of {subject} as a toy shape (real "
                 f"toy images: over 99%), below {SHAPE_RATE_FLOOR:.0%}; toy FID, KID and prompt accuracy measure "
                 "images of fastgen's toy world, and these do not look like it")


def toy_feature_stats(images: torch.Tensor, batch_size: int = 256, net: ToyFeatureNet | None = None) -> FeatureStats:
    """Mean and covariance of the toy features of ``images``."""
    stats = FeatureStats()
    stats.update(toy_features(images, batch_size, net))
    return stats


@functools.lru_cache(maxsize=4)
def toy_reference_stats(num_images: int = 5000, seed: int = 12345) -> FeatureStats:
    """Statistics of ``num_images`` fresh ``ToyShapes`` images (cached per process; do not ``update`` them)."""
    return toy_feature_stats(ToyShapes(num_images, TOY_IMAGE_SIZE, seed).tensors()[0])


def toy_fid(images: torch.Tensor, reference: FeatureStats | torch.Tensor | None = None) -> float:
    """Toy FID of ``images`` against ``reference``: statistics, images, or (default) ``toy_reference_stats()``."""
    if reference is None:
        reference = toy_reference_stats()
    elif isinstance(reference, torch.Tensor):
        reference = toy_feature_stats(reference)
    elif not isinstance(reference, FeatureStats):
        raise TypeError(f"toy_fid: reference is a {type(reference).__name__}, expected FeatureStats, a tensor of "
                        "images (N, 3, 16, 16) or None")
    stats = toy_feature_stats(images)
    return frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)
