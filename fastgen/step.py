"""One phase of one training step, for the trainer and ``fastgen estimate`` alike.

``run_phase`` draws ``grad_accum`` micro-batches, sums the phase loss's gradients (``phase.loss(batch, step)``,
scaled by ``1 / grad_accum``) while only the phase's own networks take gradients (``owned_by``), checks once
whether the summed loss is finite on every process, clips the phase's gradients and steps its optimizer, its
learning-rate schedule and, after a phase that trains the student, the student's EMA. A non-finite loss skips
the update (no optimizer, schedule or EMA step; gradients dropped) and is reported to the caller.

What differs between the trainer and the estimate is behind a ``Backend``: the trainer's wraps accelerate
(autocast, loss scaling, DDP's ``no_sync``, clipping of unscaled gradients, the cross-process finiteness
check); ``PlainBackend`` uses torch alone in one process (the estimate's simulation on fake tensors).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch

from fastgen.assemble import Run, owned_by


class Backend(Protocol):
    def autocast(self) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def no_sync(self, module: torch.nn.Module) -> contextlib.AbstractContextManager: ...

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every process (the one host sync of a phase)."""

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor: ...

    def step(self, optimizer: torch.optim.Optimizer) -> None: ...


class PlainBackend:
    """One process, torch alone: autocast at ``dtype`` on ``device_type`` (float32: none), optional fp16 loss
    scaling with a ``torch.amp.GradScaler``."""

    def __init__(self, dtype: torch.dtype = torch.float32, device_type: str = "cpu", scaler=None):
        self.dtype, self.device_type, self.scaler = dtype, device_type, scaler

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def no_sync(self, module):
        return contextlib.nullcontext()

    def all_finite(self, value):
        return bool(torch.isfinite(value))

    def clip(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, optimizer):
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def run_phase(run: Run, phase, batches: Iterator, step: int, backend: Backend, grad_accum: int = 1,
              grad_clip: float | None = None, lr_schedules=None) -> tuple[dict[str, torch.Tensor], bool]:
    """Run ``phase`` at training step ``step`` (module docstring); returns its terms averaged over the
    micro-batches (detached, on device: no host sync) and whether the update was made."""
    opt = run.optimizers[phase.name]
    opt.zero_grad(set_to_none=True)
    owned = run.owned(phase)
    modules = [run.module(n) for n in owned]
    totals: dict[str, torch.Tensor] = {}
    with owned_by(run, phase, backend.no_sync):
        for micro in range(grad_accum):
            batch = next(batches)
            with contextlib.ExitStack() as stack:
                if micro < grad_accum - 1:  # gradients are synchronised on the last micro-batch only
                    for module in modules:
                        stack.enter_context(backend.no_sync(module))
                with backend.autocast():
                    out = phase.loss(batch, step)
                backend.backward(out["loss"] / grad_accum)
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / grad_accum
            del out
    if not backend.all_finite(totals["loss"]):
        opt.zero_grad(set_to_none=True)
        return totals, False
    if grad_clip is not None:
        totals["grad_norm"] = backend.clip([p for n in owned for p in run.trainable[n]], grad_clip)
    backend.step(opt)
    if lr_schedules is not None:
        lr_schedules.step(phase.name)
    for name in owned:
        if name in run.emas:
            run.emas[name].step(run.trainable[name])
    return totals, True
