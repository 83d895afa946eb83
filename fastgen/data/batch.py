"""``Batch`` and ``DataSource``: an endless, seeded, rank-sharded stream of batches over a fixed set.

The stream contract, for ``W = world_size`` ranks each taking ``B = batch_size`` samples a step:

- The set of ``N`` samples is read as an endless concatenation of epochs; epoch ``e`` is in the order of a
  ``randperm(N)`` seeded by ``(seed, e)`` (``derive_seed(seed, "epoch", e)``). Every rank computes the same
  order: it depends on ``seed`` only, never on the rank.
- Global batch ``k`` is positions ``[k B W, (k + 1) B W)`` of that stream, and rank ``r``'s ``batch(k)`` is
  its slice ``[k B W + r B, k B W + (r + 1) B)``. So within an epoch the ranks' samples are disjoint and
  together cover it (a batch may straddle two epochs).
- Data-free random class labels: the ``B W`` labels of global batch ``k`` come from a generator seeded by
  ``(seed, k)`` (``derive_seed(seed, "labels", k)``), and rank ``r`` takes its slice ``[r B, (r + 1) B)``.
- ``batch(k)`` is a pure function of ``(seed, rank, world_size, k)``: a run that has consumed ``k`` batches
  resumes exactly with ``loader(start=k)``. With ``world_size = 1`` the stream is the single-process one.
- ``loader(start, num_workers)`` yields ``batch(start), batch(start + 1), ...`` forever; with worker
  processes it goes through a ``torch.utils.data.DataLoader`` whose workers call ``batch(k)`` and seed
  nothing that the output depends on, so it equals the plain sequence exactly.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass, fields
from typing import Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastgen.denoiser import Cond, slice_cond
from fastgen.errors import UsageError


@dataclass
class Batch:
    """One batch for an objective; every tensor has the batch as its first dimension."""

    x0: torch.Tensor | None
    """Clean samples in the denoiser's space (latents for latent teachers); ``None`` when data-free."""
    cond: Cond | None
    """The condition of each sample (keyword arguments of the denoiser), or ``None``."""
    uncond: Cond | None
    """The unconditional branch for the same batch size (empty prompt), or ``None``."""
    noise: torch.Tensor | None = None
    """For teacher samples: the noise each ``x0`` was generated from by the teacher's ODE."""
    size: int = 0
    """Samples in the batch (the only record of it in a data-free unconditional batch)."""

    def to(self, device) -> Batch:
        """A copy with every tensor (recursively through nested conditions) on ``device``."""
        return Batch(*(to_device(getattr(self, f.name), device) for f in fields(self)))

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory (``DataLoader(pin_memory=True)`` calls it)."""
        return Batch(*(_map_tensors(getattr(self, f.name), torch.Tensor.pin_memory) for f in fields(self)))


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {key: _map_tensors(v, fn) for key, v in value.items()}
    return value


def to_device(value, device):
    """``value`` with every tensor (recursively through mappings) on ``device``."""
    return _map_tensors(value, lambda tensor: tensor.to(device))


def num_rows(cond: Cond) -> int:
    """Rows of a (nested) condition: the length of its first tensor."""
    first = next(iter(cond.values()))
    return num_rows(first) if isinstance(first, Mapping) else len(first)


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed for the stream named by ``parts`` under ``seed`` (stable across processes)."""
    text = ":".join(str(p) for p in ("fastgen-data", seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, size: int, epoch: int) -> torch.Tensor:
    """The order of the ``size`` samples in ``epoch``."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


class DataSource:
    """An endless, seeded stream of ``Batch``es over a fixed set of samples (or data-free), sharded over ranks."""

    def __init__(self, batch_size: int, seed: int, x0: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 cond: Cond | None = None, uncond: Cond | None = None, random_classes: int = 0,
                 cond_index: torch.Tensor | None = None, rank: int = 0, world_size: int = 1):
        """``x0``, ``noise`` and ``cond`` hold one row per sample of the set, or ``cond_index`` gives the row of
        ``cond`` of each sample (samples sharing a caption or prompt share a row); ``uncond`` holds one row,
        repeated to the batch size (and used as ``cond`` when there is none); ``random_classes > 0`` draws
        random class labels for each batch (data-free class-conditional). ``batch_size`` is per rank; this
        source yields rank ``rank``'s share of ``world_size`` (module docstring)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank = {rank}, world_size = {world_size}; expected world_size >= 1 and "
                             "0 <= rank < world_size")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.x0, self.noise, self.cond, self.uncond = x0, noise, cond, uncond
        self.random_classes, self.cond_index = random_classes, cond_index
        if x0 is not None:
            self.size = len(x0)
        elif cond_index is not None:
            self.size = len(cond_index)
        else:
            self.size = num_rows(cond) if cond is not None else 0

    def __len__(self) -> int:
        """Samples in one epoch (prompts for a prompts file); 0 when there is no underlying set."""
        return self.size

    @property
    def needs_data(self) -> bool:
        """Whether batches carry clean samples ``x0``."""
        return self.x0 is not None

    def _first(self, k: int) -> int:
        """Stream position of this rank's first sample in batch ``k``."""
        return (k * self.world_size + self.rank) * self.batch_size

    def indices(self, k: int) -> torch.Tensor:
        """This rank's samples in batch ``k``: positions ``[k B W + r B, k B W + (r + 1) B)`` of the
        concatenated epoch orders."""
        positions = torch.arange(self._first(k), self._first(k) + self.batch_size)
        epochs, offsets = positions // self.size, positions % self.size
        index = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            index[mask] = epoch_order(self.seed, self.size, epoch)[offsets[mask]]
        return index

    def batch(self, k: int) -> Batch:
        """This rank's batch ``k``, a pure function of ``(seed, rank, world_size, k)``."""
        uncond = slice_cond(self.uncond, torch.zeros(self.batch_size, dtype=torch.long))
        if self.random_classes:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "labels", k))
            labels = torch.randint(self.random_classes, (self.batch_size * self.world_size,), generator=generator)
            start = self.rank * self.batch_size
            return Batch(None, {"class_labels": labels[start:start + self.batch_size]}, uncond, size=self.batch_size)
        if not self.size:
            return Batch(None, uncond, uncond, size=self.batch_size)
        index = self.indices(k)
        if self.cond is None:
            cond = uncond
        else:
            cond = slice_cond(self.cond, index if self.cond_index is None else self.cond_index[index])
        return Batch(
            self.x0[index] if self.x0 is not None else None,
            cond,
            uncond,
            self.noise[index] if self.noise is not None else None,
            self.batch_size,
        )

    def loader(self, start: int = 0, num_workers: int = 0, pin_memory: bool = False) -> Iterator[Batch]:
        """``batch(start), batch(start + 1), ...`` forever; ``start`` = batches already consumed. With
        ``num_workers > 0`` the batches are made in that many ``DataLoader`` worker processes (the same
        batches, in order; the global RNG is not drawn from); ``pin_memory`` has the ``DataLoader`` put them in pinned memory for faster copies
        to the GPU (a no-op, with the ``DataLoader``'s warning, where there is no accelerator)."""
        if num_workers < 0:
            raise UsageError(f"num_workers = {num_workers}; expected 0 (batches made in this process) or more")
        if num_workers == 0 and not pin_memory:
            return (self.batch(k) for k in itertools.count(start))
        # its own generator for the workers' seeds (unused by ``batch``), so the global RNG is left alone
        return iter(DataLoader(_Batches(self), batch_size=None, sampler=_Count(start), num_workers=num_workers,
                               pin_memory=pin_memory, generator=torch.Generator()))


class _Batches(Dataset):
    """Map-style view of a ``DataSource``: item ``k`` is ``batch(k)``."""

    def __init__(self, source: DataSource):
        self.source = source

    def __getitem__(self, k: int) -> Batch:
        return self.source.batch(k)


class _Count(Sampler):
    """Batch indices ``start, start + 1, ...`` forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
