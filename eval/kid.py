"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the unbiased estimator of the squared MMD with the cubic polynomial kernel
``k(x, y) = (xᵀy / d + 1)³``:

``MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m (m-1)) + Σ_{i≠j} k(y_i, y_j) / (m (m-1)) - 2 Σ_{i,j} k(x_i, y_j) / m²``

averaged over ``num_subsets`` random subsets of ``subset_size`` samples from each set, drawn without
replacement. The convention is torch-fidelity's: a ``numpy.random.RandomState(seed)`` draws the subset
of the first set, then of the second, per subset; the std is the population std (``ddof=0``) over the
subsets. With the same features and seed the result equals torch-fidelity's (seed 2020 is its default).
KID is unbiased, so values slightly below 0 occur for matching distributions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class KID(NamedTuple):
    mean: float
    std: float


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``k(x, y) = (xᵀy / d + 1)³`` for all pairs of rows."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between two equally sized samples (diagonals of k(x, x) and k(y, y) dropped)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def _as_features(name: str, features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"kid: {name} has shape {features.shape}, expected (N, D)")
    return features


def kid(features_1, features_2, subset_size: int = 1000, num_subsets: int = 100, seed: int = 2020) -> KID:
    """KID mean and std over subsets of two feature sets ``(N1, D)`` and ``(N2, D)``."""
    x, y = _as_features("features_1", features_1), _as_features("features_2", features_2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: features_2 has dimension {y.shape[1]}, expected {x.shape[1]} like features_1")
    if not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"kid: num_subsets={num_subsets!r}, expected a positive int")
    smallest = min(x.shape[0], y.shape[0])
    if not isinstance(subset_size, int) or not 2 <= subset_size <= smallest:
        raise ValueError(f"kid: subset_size={subset_size!r}, expected an int in [2, {smallest}] "
                         f"(the feature sets have {x.shape[0]} and {y.shape[0]} samples)")
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for index in range(num_subsets):
        x_subset = x[rng.choice(x.shape[0], subset_size, replace=False)]
        y_subset = y[rng.choice(y.shape[0], subset_size, replace=False)]
        mmds[index] = mmd2_unbiased(x_subset, y_subset)
    return KID(float(mmds.mean()), float(mmds.std()))
