"""Fréchet distance between Gaussians fitted to features (Heusel et al. 2017, "GANs trained by a two
time-scale update rule", eq. 6): ``d² = ||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.

The trace of the matrix square root is taken from eigenvalues: ``S1 S2`` is similar to the positive
semi-definite ``S1^{1/2} S2 S1^{1/2}``, so ``tr (S1 S2)^{1/2} = sum sqrt(eig(S1 S2))`` (clipping the
tiny negative or imaginary parts round-off leaves). This needs no ``scipy.linalg.sqrtm`` and stays
finite on rank-deficient covariances.
"""

from __future__ import annotations

import numpy as np
import torch


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"frechet_distance: shapes differ, mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}; expected statistics of one feature space"
        )
    eigvals = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = np.sqrt(np.clip(eigvals.real, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64 (equals ``np.cov(rowvar=False)``)."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._sum = None if dim is None else np.zeros(dim, np.float64)
        self._outer = None if dim is None else np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, np.float64)
        if features.ndim != 2:
            raise ValueError(f"FeatureStats.update: features have shape {features.shape}, expected (N, D)")
        if self.dim is None:
            self.dim = features.shape[1]
            self._sum = np.zeros(self.dim, np.float64)
            self._outer = np.zeros((self.dim, self.dim), np.float64)
        if features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: features have dimension {features.shape[1]}, expected {self.dim}")
        self.count += features.shape[0]
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features

    @property
    def mean(self) -> np.ndarray:
        self._check_count(1)
        return self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        self._check_count(2)
        mean = self.mean
        return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def _check_count(self, minimum: int) -> None:
        if self.count < minimum:
            raise ValueError(f"FeatureStats: {self.count} feature vectors seen, expected at least {minimum}")
