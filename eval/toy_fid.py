"""Toy FID: the Fréchet distance (``fastgen.eval.fid``) on features of the bundled ``ToyFeatureNet``.

The feature net is trained to tell the toy shape classes from each other and from noised or blurred
images, and to read the hue, so toy FID separates a sharp generator of the toy world from a blurry or
noisy one. It measures quality on 16x16 ``ToyShapes`` images only and is offline (no hub weights).
"""

from __future__ import annotations

import functools

import torch

from fastgen.errors import InputError
from fastgen.eval.fid import FeatureStats, frechet_distance
from fastgen.toy import TOY_IMAGE_SIZE, ToyFeatureNet, ToyShapes, load_toy_feature_net

EXPECTED_SHAPE = (3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE)


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
