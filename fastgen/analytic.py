"""The analytic teacher: a Gaussian mixture whose posterior mean ``E[x0 | x_t]`` is a closed form.

Data ``x0 ~ sum_k pi_k N(mu_k, diag(s_k²))`` noised as ``x_t = alpha x0 + sigma eps`` gives
``x_t | k ~ N(alpha mu_k, diag(v_k))`` with ``v_k = alpha² s_k² + sigma²``, so (Bishop 2006, eq. 2.116)

    E[x0 | x_t, k] = mu_k + (alpha s_k² / v_k) (x_t - alpha mu_k)
    E[x0 | x_t]    = sum_k r_k(x_t) E[x0 | x_t, k],   r_k ∝ pi_k N(x_t; alpha mu_k, diag(v_k)).

This is the exact minimiser of the denoising loss, i.e. a perfectly trained teacher, under every
schedule fastgen knows; distilling it has a known answer (means, variances, mode weights).
"""

from __future__ import annotations

import torch

from fastgen.denoiser import BaseDenoiser, Cond, batch_times
from fastgen.schedules import NoiseSchedule


class GaussianMixtureDenoiser(BaseDenoiser):
    """Exact ``E[x0 | x_t]`` of a diagonal Gaussian mixture in any shape.

    ``means``: (K, *shape); ``stds``: (K, *shape), (K,) or a float; ``weights``: (K,) (normalised here).
    Condition ``{"class_labels": y}`` restricts sample ``i`` to component ``y[i]`` (``-1``: the whole
    mixture), which gives a class-conditional teacher whose unconditional branch is ``y = -1``.
    """

    def __init__(self, means, stds, weights, schedule: NoiseSchedule):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        num_components, shape = means.shape[0], tuple(means.shape[1:])
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(num_components)
        if stds.ndim == 1:
            stds = stds.reshape(-1, *([1] * len(shape))).expand_as(means)
        if stds.shape != means.shape or bool((stds <= 0).any()):
            raise ValueError(f"stds: expected positive values of shape {tuple(means.shape)}, got {tuple(stds.shape)}")
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_components,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights: expected {num_components} non-negative values, got {weights.tolist()}")
        self.register_buffer("means", means.flatten(1))
        self.register_buffer("stds", stds.flatten(1))
        self.register_buffer("weights", weights / weights.sum())
        self.shape = shape
        self.schedule = schedule

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """``n`` exact draws ``x0`` from the mixture (float32), optionally with their component labels."""
        labels = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x0 = (self.means[labels] + self.stds[labels] * eps).float().reshape(n, *self.shape)
        return (x0, labels) if return_labels else x0

    def log_responsibilities(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        """``log r_k(x_t)`` of shape (B, K), restricted by ``cond["class_labels"]`` when given."""
        x, a, s = self._flat(x_t, t)
        var = a[:, None, None] ** 2 * self.stds**2 + s[:, None, None] ** 2  # (B, K, D)
        diff = x[:, None, :] - a[:, None, None] * self.means
        log_lik = -0.5 * ((diff**2) / var + torch.log(2 * torch.pi * var)).sum(-1)
        logits = torch.log(self.weights) + log_lik
        labels = None if cond is None else cond.get("class_labels")
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device).reshape(-1)
            mask = torch.arange(self.num_components, device=x.device)[None] == labels[:, None]
            mask = mask | (labels[:, None] < 0)
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        x, a, s = self._flat(x_t, t)
        var = a[:, None, None] ** 2 * self.stds**2 + s[:, None, None] ** 2
        gain = a[:, None, None] * self.stds**2 / var
        x0_k = self.means + gain * (x[:, None, :] - a[:, None, None] * self.means)  # (B, K, D)
        r = self.log_responsibilities(x_t, t, cond).exp()
        x0 = (r[..., None] * x0_k).sum(1)
        return x0.to(x_t.dtype).reshape(x_t.shape)

    def _flat(self, x_t, t):
        t = batch_times(t, x_t)
        a = self.schedule.alpha(t).to(torch.float64)
        s = self.schedule.sigma(t).to(torch.float64)
        return x_t.reshape(x_t.shape[0], -1).to(torch.float64), a, s
