"""Peak memory and time per generator step of SiD against DMD2 on the same tiny diffusers networks, with and
without checkpointing of SiD's input-gradient path (``objective.checkpoint_scores``); writes docs/bench_sid.md.

    python scripts/bench_sid_vs_dmd2.py --sample-size 16 --batch-size 8 --steps 5

CPU: the bytes of the tensors autograd saves for the backward pass (``saved_tensors_hooks``, distinct storages),
the activation memory that checkpointing trades for recomputation (tracemalloc does not see torch's CPU
allocator); the process's resident-set high-water mark (``resource``) is reported as a whole-run maximum;
GPU: ``torch.cuda.max_memory_allocated``. Times are the median of ``--steps`` generator losses and backwards.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from fastgen.losses import build_objective
from fastgen.teacher import load_teacher

CASES = (("dmd2", {"gan_weight": 0, "gan_critic_weight": 0}), ("sid", {}), ("sid", {"checkpoint_scores": True}))


def measure(folder, method, args, batch_size, steps, device):
    teacher = load_teacher(folder, device=device)
    student = load_teacher(folder, device=device).denoiser
    student.model.requires_grad_(True)
    objective = build_objective(method, teacher, student, args)
    objective.nets["fake"].model.requires_grad_(False)  # the generator phase: the fake score takes no gradient
    batch = SimpleNamespace(x0=None, cond=None, uncond=None, noise=None, size=batch_size)
    times, peak = [], 0
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        saved = {}

        def pack(x):
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = objective.loss("generator", batch, 0)["loss"]
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        else:
            peak = max(peak, sum(saved.values()))
        times.append(time.perf_counter() - start)
        student.model.zero_grad(set_to_none=True)
    return statistics.median(times[1:]), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/bench_sid.md"))
    a = p.parse_args(argv)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_ddpm_folder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_ddpm_folder(Path(tmp) / "ddpm", sample_size=a.sample_size)
        for method, args in CASES:
            t, peak = measure(folder, method, args, a.batch_size, a.steps, device)
            rows.append((method + (" + checkpoint_scores" if args.get("checkpoint_scores") else ""), t, peak))
            print(rows[-1], flush=True)
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "tensors saved for backward"
    lines = [f"Generator step (loss + backward) on a tiny DDPM UNet ({a.sample_size}x{a.sample_size}, batch "
             f"{a.batch_size}), {device.type}, median of {a.steps}; written by `scripts/bench_sid_vs_dmd2.py`.", "",
             f"| objective | time per step (ms) | peak memory, {kind} (MiB) |", "|---|---:|---:|"]
    lines += [f"| {name} | {1000 * t:.1f} | {peak / 2**20:.1f} |" for name, t, peak in rows]
    lines += ["", f"Process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.",
              "DMD2's generator step backpropagates through the student only (its gradient is computed without "
              "graph); SiD's through teacher and fake score into the student, which is what checkpointing trades "
              "for a second forward pass of both."]
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
