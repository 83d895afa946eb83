"""A student made of K experts, each owning a noise interval (a mixture of experts by noise level).

Boundaries ``b_0 > b_1 > ... > b_{K-2}`` in the teacher's native time split the range, high noise first:
expert ``k`` answers every ``t`` with ``b_k < t <= b_{k-1}`` (``b_{-1} = +inf``, ``b_{K-1} = -inf``), as
Phased DMD's phases and Wan 2.2's two transformers (``boundary_ratio``) do.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastgen.denoiser import BaseDenoiser, Cond, batch_times, slice_cond
from fastgen.errors import UsageError


def expert_index(t: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """The expert of each time in ``t``: the number of boundaries at or above it."""
    b = torch.as_tensor(list(boundaries), dtype=t.dtype, device=t.device)
    return (t[:, None] <= b[None, :]).sum(1) if len(b) else torch.zeros_like(t, dtype=torch.long)


def default_boundaries(timesteps: Sequence[float], num_experts: int) -> list[float]:
    """Split the student's ``timesteps`` (descending) into ``num_experts`` contiguous groups of steps; each
    boundary lies halfway between the last step of one group and the first of the next."""
    n = len(timesteps)
    if not 1 <= num_experts <= n:
        raise UsageError(f"student.experts is {num_experts}; expected 1 to student.num_steps = {n} experts "
                         "(each owns at least one step) or explicit student.expert_boundaries")
    cuts = [round(k * n / num_experts) for k in range(1, num_experts)]
    return [(float(timesteps[c - 1]) + float(timesteps[c])) / 2 for c in cuts]


class ExpertsDenoiser(BaseDenoiser):
    """``x0 = D_k(x_t, t, cond)`` with ``k = expert_index(t)``; each sample runs through its own expert only."""

    def __init__(self, experts: Sequence[BaseDenoiser], boundaries: Sequence[float]):
        super().__init__()
        boundaries = [float(b) for b in boundaries]
        if len(boundaries) != len(experts) - 1 or any(a <= b for a, b in zip(boundaries, boundaries[1:])):
            raise UsageError(f"student.expert_boundaries is {boundaries}; expected {len(experts) - 1} strictly "
                             "decreasing times (high noise first)")
        self.experts = nn.ModuleList(experts)
        self.boundaries = boundaries
        self.schedule = experts[0].schedule

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        t = batch_times(t, x_t)
        index = expert_index(t, self.boundaries)
        out = None
        for k, expert in enumerate(self.experts):
            rows = (index == k).nonzero().flatten()
            if len(rows) == 0:
                continue
            if len(rows) == len(t):
                return expert(x_t, t, cond)
            x0 = expert(x_t[rows], t[rows], slice_cond(cond, rows))
            out = torch.zeros_like(x_t, dtype=x0.dtype) if out is None else out
            out = out.index_copy(0, rows, x0)
        return out
