"""Small per-step pieces the training loop calls in order (FastGen's callbacks, EDM's linear loop).

Interface, as the trainer uses it::

    schedules = LRSchedules(optimizers, phases, name, warmup_steps, max_steps)
    schedules.step(phase_name)       # right after that phase's optimizer.step(); not on a skipped step
    schedules.last_lr(phase_name) -> float
    schedules.state_dict() -> dict; schedules.load_state_dict(state)

    window = MetricsWindow(reduce_mean=lambda t: accelerator.reduce(t, "mean"))  # None: one process
    window.add({"loss": loss.detach(), ...})   # every step, no host sync
    window.flush() -> dict[str, float]         # at a logging step, on every rank (it is collective)

    clock = Clock(elapsed=0.0); clock.elapsed() -> float; clock.state_dict(); clock.load_state_dict(state)
    throughput = Throughput(); throughput.add(samples); throughput.rate() -> float  # and resets
    peak_memory_bytes(device) -> int; reset_peak_memory(device)
    with tf32(enabled): ...                    # train.allow_tf32 for the loop, restored afterwards
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Callable

import torch
from diffusers.optimization import get_scheduler


class LRSchedules:
    """One diffusers learning-rate schedule per phase optimizer (diffusers.optimization.get_scheduler: names
    'constant', 'linear', 'cosine'; 'constant' with warm-up is diffusers' 'constant_with_warmup').
    A phase's schedule counts the phase's own optimizer updates: num_training_steps = the number of steps s in
    range(max_steps) with phase.runs_at(s); warm-up in the same units.

    ``phases`` are duck-typed: anything with ``.name`` and ``.runs_at(step) -> bool``; ``optimizers`` maps each
    phase's name to its optimizer. As diffusers' train_text_to_image.py, the schedule steps once per optimizer
    update, but it is not given to ``accelerator.prepare``: its AcceleratedScheduler would step it once per
    process (diffusers scales num_training_steps by the process count to make up for it).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], phases: list, name: str, warmup_steps: int,
                 max_steps: int):
        if name not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr schedule {name!r}: expected 'constant', 'linear' or 'cosine'")
        if name == "constant" and warmup_steps > 0:
            name = "constant_with_warmup"
        self.schedulers = {
            phase.name: get_scheduler(name, optimizers[phase.name], num_warmup_steps=warmup_steps,
                                      num_training_steps=sum(phase.runs_at(s) for s in range(max_steps)))
            for phase in phases}

    def step(self, phase_name: str) -> None:
        """Advance ``phase_name``'s schedule by one of its optimizer updates."""
        self.schedulers[phase_name].step()

    def last_lr(self, phase_name: str) -> float:
        """The learning rate of ``phase_name``'s next update (its optimizer's first parameter group)."""
        return self.schedulers[phase_name].get_last_lr()[0]

    def state_dict(self) -> dict:
        return {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore every schedule and write its learning rates into its optimizer, so that the resumed run
        continues exactly whether or not the optimizer's own state is loaded after this."""
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state[name])
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr


class MetricsWindow:
    """Loss terms averaged over the logging window and across ranks, without a host sync per step.

    As diffusers' train_text_to_image.py (``accelerator.gather(loss).mean()``), but the per-step ``.item()``
    there is deferred to the logging step: ``add`` keeps a running sum on the terms' device. Every rank must
    add the same keys the same number of times, and call ``flush`` at the same steps (it is a collective): the
    average across ranks of each rank's window mean is then the global mean.
    """

    def __init__(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.reduce_mean = reduce_mean
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Accumulate detached 0-dim tensors (any device, any float dtype; summed in float32)."""
        for key, value in terms.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        """Per key (sorted) the window mean, averaged across ranks in one ``reduce_mean`` call on one stacked
        tensor, then brought to the host in one transfer; resets the window. ``{}`` when nothing was added."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        device = self.sums[keys[0]].device
        means = torch.stack([self.sums[k].to(device) / self.counts[k] for k in keys])
        if self.reduce_mean is not None:
            means = self.reduce_mean(means)
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means.tolist()))


class Clock:
    """Training time that stays cumulative across a resume (the checkpoint's elapsed time is the offset)."""

    def __init__(self, elapsed: float = 0.0):
        self.offset, self.start = elapsed, time.perf_counter()

    def elapsed(self) -> float:
        """Seconds trained: before the resume plus since this clock started."""
        return self.offset + time.perf_counter() - self.start

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.offset, self.start = state["elapsed"], time.perf_counter()


class Throughput:
    """Samples per second over the logging window: add(samples: int) per step; rate() -> float and reset.

    The window starts at construction and at each ``rate()``; count the samples the log should report (as
    diffusers' total_batch_size: per-process batch x processes x accumulation).
    """

    def __init__(self):
        self.samples, self.start = 0, time.perf_counter()

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.samples / (now - self.start) if now > self.start else 0.0
        self.samples, self.start = 0, now
        return rate


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: torch.cuda.max_memory_allocated on CUDA (and reset per window via
    reset_peak_memory(device)), the process's peak RSS (resource.getrusage, kilobytes on Linux) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_memory(device) -> None:
    """Start a new peak on CUDA; the peak RSS of a process cannot be reset, so on CPU it stays the run's peak."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def tf32(enabled: bool):
    """With ``enabled``, TF32 for float32 matmuls and cuDNN convolutions (``torch.backends.cuda.matmul.allow_tf32``
    and ``torch.backends.cudnn.allow_tf32``, as diffusers' ``--allow_tf32``) inside the block, both flags restored
    afterwards; without, torch's settings are left as they are."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
