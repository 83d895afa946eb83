"""Fréchet Inception Distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule", eq. 6):
``d² = ||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between Gaussians fitted to features.

The trace of the matrix square root is taken from eigenvalues: ``S1 S2`` is similar to the positive
semi-definite ``A = S1^{1/2} S2 S1^{1/2}``, so ``tr (S1 S2)^{1/2} = sum sqrt(eig(A))``. ``S1^{1/2}`` and
``eig(A)`` come from symmetric eigensolvers (``eigh``, ``eigvalsh``), clipping the tiny negative
eigenvalues round-off leaves: faster and better conditioned than the general ``eigvals(S1 @ S2)`` or
``scipy.linalg.sqrtm``, and finite on rank-deficient covariances.

Images reach an extractor (e.g. :class:`fastgen.eval.inception.InceptionExtractor`, or any callable
``uint8 (N, 3, H, W) -> (N, D)``) from one of three sources, in batches:

- a tensor ``(N, C, H, W)``, C = 3 (or 1, repeated to RGB): uint8 in [0, 255], or float with an explicit
  ``value_range=(-1, 1)`` / ``(0, 1)`` (any ``(low, high)``), mapped to uint8 by ``round(255 (x - low) /
  (high - low))`` after clamping;
- a folder of images read as training reads them (``fastgen.data.find_images``: PNG/JPEG/WEBP, searched
  recursively, sorted by relative path, hidden files skipped), converted to RGB, all of one size;
- a generator callable ``fn(batch_size) -> images`` (a tensor as above) with ``num_images`` in total.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from fastgen.data import find_images
from fastgen.errors import InputError


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1:
        raise ValueError(f"frechet_distance: mu1 has shape {mu1.shape}, expected (D,)")
    dim = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"frechet_distance: {name} has shape {value.shape}, expected {shape} (D from mu1)")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf, expected finite statistics")
    for name, value in (("sigma1", sigma1), ("sigma2", sigma2)):
        asymmetry = np.abs(value - value.T).max()
        if asymmetry > 1e-6 * np.abs(value).max():
            raise ValueError(f"frechet_distance: {name} differs from its transpose by up to {asymmetry:.3g}, "
                             f"expected a symmetric covariance")
    eigvals1, eigvecs1 = np.linalg.eigh(sigma1)
    sqrt_sigma1 = eigvecs1 * np.sqrt(np.clip(eigvals1, 0.0, None))  # S1^{1/2} up to a rotation: R Rᵀ = S1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_sigma1.T @ sigma2 @ sqrt_sigma1), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64 (equals ``np.cov(rowvar=False)``).

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), which stays accurate
    when the mean is large compared with the spread (unlike accumulating raw second moments).
    """

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.dim = None
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.dim = dim
        self._mean = np.zeros(dim, np.float64)
        self._m2 = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, np.float64)
        if features.ndim != 2:
            raise ValueError(f"FeatureStats.update: features have shape {features.shape}, expected (N, D)")
        if self.dim is None:
            self._allocate(features.shape[1])
        if features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: features have dimension {features.shape[1]}, expected {self.dim}")
        n_new = features.shape[0]
        if n_new == 0:
            return
        batch_mean = features.mean(axis=0)
        centered = features - batch_mean
        delta = batch_mean - self._mean
        total = self.count + n_new
        self._mean += delta * (n_new / total)
        self._m2 += centered.T @ centered + np.outer(delta, delta) * (self.count * n_new / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        self._check_count(1)
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        self._check_count(2)
        return self._m2 / (self.count - 1)

    def _check_count(self, minimum: int) -> None:
        if self.count < minimum:
            raise ValueError(f"FeatureStats: {self.count} feature vectors seen, expected at least {minimum}")


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Images ``(N, C, H, W)`` -> uint8 ``(N, 3, H, W)``; floats need ``value_range`` (module docstring)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: got {shape}, expected a tensor (N, 3, H, W) or (N, 1, H, W)")
    if images.dtype == torch.uint8:
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ValueError(f"value_range={value_range} for uint8 images, expected None (uint8 is [0, 255])")
    elif images.is_floating_point():
        if value_range is None or len(value_range) != 2 or not value_range[1] > value_range[0]:
            raise ValueError(f"value_range={value_range} for {images.dtype} images, expected (low, high) with "
                             f"high > low, e.g. (-1, 1) or (0, 1): float images are never guessed")
        low, high = value_range
        scaled = (images.detach().float() - low) * (255.0 / (high - low))
        images = scaled.round().clamp(0, 255).to(torch.uint8)
    else:
        raise ValueError(f"images have dtype {images.dtype}, expected uint8 or a float dtype")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def video_frames(images: torch.Tensor) -> torch.Tensor:
    """Videos ``(N, C, F, H, W)`` as their ``N F`` frames ``(N F, C, H, W)``, video by video (video ``i``'s frames
    are ``i F .. i F + F - 1``): per-frame metrics count every frame as an image. Images ``(N, C, H, W)`` as they
    are."""
    return images.transpose(1, 2).flatten(0, 1) if images.ndim == 5 else images


def _folder_files(folder: Path) -> list[Path]:
    """The images under ``folder`` as training reads them (``fastgen.data.find_images``: recursive, PNG, JPEG
    and WEBP, hidden files skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"images: folder {folder} does not exist")
    return find_images(folder)


def _read_rgb(path: Path) -> np.ndarray:
    """One image file as uint8 RGB, decoded as the FID references' tools read it (no EXIF rotation); a file PIL
    cannot read is named on one line."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {path}: {err}; expected a PNG, JPEG or WEBP image") from None


def _load_folder_batch(files: list[Path], size: tuple[int, int], first: Path) -> torch.Tensor:
    """The images ``files`` as one uint8 batch; an image of another size than ``size`` (that of ``first``, the
    folder's first image) is the user's file, named on one line (a folder's images are not resized)."""
    arrays = []
    for path in files:
        array = _read_rgb(path)
        if array.shape[:2] != size:
            raise InputError(f"image {path} is {array.shape[0]}x{array.shape[1]}, expected {size[0]}x{size[1]} "
                             f"like {first.name}, the first image of its folder (the images of a folder must share "
                             "one size)")
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def iter_image_batches(images, batch_size: int, value_range=None, num_images: int | None = None
                       ) -> Iterator[torch.Tensor]:
    """Yield uint8 ``(B, 3, H, W)`` batches from a tensor, a folder or a callable (module docstring).

    ``num_images``: required for a callable; for a tensor or a folder, use only the first ``num_images``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}, expected a positive int")
    if isinstance(images, (str, os.PathLike)):
        if value_range is not None:
            raise ValueError(f"value_range={value_range} for a folder, expected None (files are uint8)")
        files = _folder_files(Path(images))
        total = _check_count(num_images, len(files), f"folder {images}")
        size = _read_rgb(files[0]).shape[:2]
        for start in range(0, total, batch_size):
            yield _load_folder_batch(files[start:min(start + batch_size, total)], size, files[0])
    elif isinstance(images, torch.Tensor):
        total = _check_count(num_images, images.shape[0] if images.ndim else 0, "the images tensor")
        for start in range(0, total, batch_size):
            yield to_uint8(images[start:start + min(batch_size, total - start)], value_range)
    elif callable(images):
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images={num_images!r}, expected a positive int for a generator callable")
        for start in range(0, num_images, batch_size):
            wanted = min(batch_size, num_images - start)
            batch = to_uint8(images(wanted), value_range)
            if batch.shape[0] != wanted:
                raise ValueError(f"images: the generator returned {batch.shape[0]} images, expected {wanted}")
            yield batch
    else:
        raise TypeError(f"images: got {type(images).__name__}, expected a tensor, a folder path or a callable")


def _check_count(num_images: int | None, available: int, source: str) -> int:
    if num_images is None:
        if available < 1:
            raise ValueError(f"images: {source} holds no images, expected at least 1")
        return available
    if not isinstance(num_images, int) or not 1 <= num_images <= available:
        raise ValueError(f"num_images={num_images!r}, expected an int in [1, {available}] for {source}")
    return num_images


def iter_features(images, extractor: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 50,
                  value_range=None, num_images: int | None = None, progress: bool = False) -> Iterator[np.ndarray]:
    """Yield float64 feature batches ``(B, D)`` of ``extractor`` over the images."""
    batches = iter_image_batches(images, batch_size, value_range, num_images)
    for batch in tqdm(batches, desc="features", unit="batch", disable=not progress):
        features = extractor(batch)
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        yield np.asarray(features, np.float64)


def image_statistics(images, extractor, batch_size: int = 50, value_range=None, num_images: int | None = None,
                     progress: bool = False) -> FeatureStats:
    """Streaming float64 mean and covariance of the extractor's features (nothing held but the sums)."""
    stats = FeatureStats()
    for features in iter_features(images, extractor, batch_size, value_range, num_images, progress):
        stats.update(features)
    return stats


def image_features(images, extractor, batch_size: int = 50, value_range=None, num_images: int | None = None,
                   progress: bool = False) -> np.ndarray:
    """All features ``(N, D)`` in float64 (for KID, which needs the samples, not only their moments)."""
    return np.concatenate(list(iter_features(images, extractor, batch_size, value_range, num_images, progress)))
