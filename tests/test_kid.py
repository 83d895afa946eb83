"""KID: the unbiased MMD² with the cubic kernel against a direct O(n²) sum, and torch-fidelity's convention."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from fastgen.eval.kid import kid, mmd2_unbiased


def direct_mmd2(x, y):
    """The unbiased MMD² of Bińkowski et al. 2018, term by term with k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_direct_sum():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) * 1.5 + 0.2
    assert mmd2_unbiased(x, y) == pytest.approx(direct_mmd2(x, y), rel=1e-10)


def test_kid_averages_subsets_drawn_like_torch_fidelity():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.3
    result = kid(x, y, subset_size=10, num_subsets=7, seed=5)
    draws = np.random.RandomState(5)
    values = []
    for _ in range(7):
        x_subset = x[draws.choice(40, 10, replace=False)]
        values.append(direct_mmd2(x_subset, y[draws.choice(30, 10, replace=False)]))
    assert result.mean == pytest.approx(np.mean(values), rel=1e-10)
    assert result.std == pytest.approx(np.std(values), rel=1e-8)
    theirs = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subset_size=10, kid_subsets=7,
                                    rng_seed=5, verbose=False)
    assert result.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert result.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-8)


def test_same_distribution_near_zero_different_clearly_positive():
    rng = np.random.default_rng(2)
    first, second = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(size=(300, 16)) + 0.5
    same = kid(first, second, subset_size=100, num_subsets=20)
    different = kid(first, shifted, subset_size=100, num_subsets=20)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert different.mean > 10 * max(abs(same.mean), same.std)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subset_size": 50}, r"subset_size=50, expected an int in \[2, 20\]"),
        ({"subset_size": 5, "num_subsets": 0}, "num_subsets=0, expected a positive int"),
    ],
)
def test_kid_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kid(np.zeros((30, 4)), np.zeros((20, 4)), **kwargs)


def test_kid_bad_features():
    with pytest.raises(ValueError, match="features_2 has dimension 3, expected 4"):
        kid(np.zeros((10, 4)), np.zeros((10, 3)), subset_size=5)
    with pytest.raises(ValueError, match=r"features_1 has shape \(10,\), expected \(N, D\)"):
        kid(np.zeros(10), np.zeros((10, 3)), subset_size=5)
