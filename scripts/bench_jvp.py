"""Cost of a training step through ``fastgen.jvp`` against a plain forward + backward, side by side, and the
error of "finite_difference" against its step.

    OMP_NUM_THREADS=1 python scripts/bench_jvp.py            # about 1 min on one CPU core; Markdown on stdout

Network: a diffusers ``UNet2DModel`` on 32×32×3 images (block_out_channels (32, 64), one layer per block,
self-attention at 16×16, GroupNorm, positional time embedding; 0.70 M parameters), batch 8, float32, called in
unit time (``timestep = 1000 s``), tangents ``(dx, 1)`` with ``dx`` a random direction. Each step ends with the
backward pass into the parameters:

- forward + backward: ``loss = mean(F²)``, ``F = f(x_t, s)``;
- jvp exact, jvp finite_difference: ``F, dF_dt = fastgen.jvp.jvp(f, (x_t, s), (dx, 1), method)``,
  ``loss = mean((F - dF_dt)²)``;
- recorded torch.func.jvp: the alternative ``jvp`` does not take, ``F`` and ``dF_dt`` from one
  ``torch.func.jvp`` with grad enabled (under ``jvp_attention``), ``dF_dt`` detached; the same loss.

Time: ``--rounds`` rounds after a warm-up round, each running every step once in turn, so that machine noise
hits all alike; the median per step of the wall clock and of this process's CPU time (with one torch thread the
CPU clock leaves out waiting for a core that other processes hold: the steadier figure on a shared machine).
Memory: the peak of the bytes torch's CPU allocator holds beyond those it held before the step, from
``torch.profiler``'s memory events, one more run of each step.

Accuracy: relative error (norm) of "finite_difference" in float32 against "exact" in float64 (the same weights),
for steps from 1e-1 to 1e-5 and tangents dx alone, dt alone and both.

Attention: whether ``torch.func.jvp`` runs through ``F.scaled_dot_product_attention`` with torch's default kernel
choice and with each kernel forced by ``sdpa_kernel``, on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from fastgen.jvp import FD_EPS, jvp, jvp_attention

EPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def build(size: int, dtype: torch.dtype = torch.float32):
    """The UNet, seeded, and ``f(x_t, s)`` that calls it in unit time."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                        attention_head_dim=8).to(dtype)

    def f(x_t, s):
        return model(x_t, 1000 * s, return_dict=False)[0]

    return model, f


def training_steps(f, x_t, s, dx, ds) -> dict:
    """Each variant of one step, forward and backward."""
    def plain():
        f(x_t, s).square().mean().backward()

    def through(method):
        def step():
            F, dF_dt = jvp(f, (x_t, s), (dx, ds), method=method)
            (F - dF_dt).square().mean().backward()
        return step

    def recorded():
        with jvp_attention():
            F, dF_dt = torch.func.jvp(f, (x_t, s), (dx, ds))
        (F - dF_dt.detach()).square().mean().backward()

    return {"forward + backward": plain, "jvp exact": through("exact"),
            "jvp finite_difference": through("finite_difference"), "recorded torch.func.jvp": recorded}


def peak_bytes(step) -> int:
    """Peak bytes held by torch's CPU allocator during ``step`` beyond those held before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def attention_support() -> dict[str, str]:
    """For the default kernel choice and each forced SDPA kernel: "yes", or the first line of the error that
    ``torch.func.jvp`` through ``F.scaled_dot_product_attention`` raised (float32, CPU)."""
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    results = {}
    for name in ("default", "MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)) if name != "default" else contextlib.nullcontext():
                torch.func.jvp(torch.nn.functional.scaled_dot_product_attention, (q, k, v), (q, k, v))
            results[name] = "yes"
        except (NotImplementedError, RuntimeError) as error:
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return results


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor()


def rel_error(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side")
    args = parser.parse_args()

    import diffusers

    model, f = build(args.size)
    model.train()
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    dx = torch.randn(x_t.shape, generator=generator)
    s = torch.rand(args.batch, generator=generator)
    ds = torch.ones_like(s)
    steps = training_steps(f, x_t, s, dx, ds)

    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for r in range(args.rounds + 1):
        for name, step in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            w1, c1 = time.perf_counter(), time.process_time()
            model.zero_grad(set_to_none=True)
            if r:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
    peaks = {}
    for name, step in steps.items():
        peaks[name] = peak_bytes(step)
        model.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    threads = os.environ.get("OMP_NUM_THREADS", "")
    print(f"`OMP_NUM_THREADS={threads} python scripts/bench_jvp.py --rounds {args.rounds} "
          f"--batch {args.batch} --size {args.size}`: {cpu_name()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch thread(s), no GPU; torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}; UNet2DModel {params / 1e6:.2f} M parameters, batch {args.batch}, "
          f"{args.size}×{args.size}×3, float32; median of {args.rounds} rounds.\n")
    print("| step | wall ms | CPU ms | CPU × plain | peak MiB | peak × plain |")
    print("|---|---:|---:|---:|---:|---:|")
    base_cpu, base_peak = statistics.median(cpu["forward + backward"]), peaks["forward + backward"]
    for name in steps:
        c = statistics.median(cpu[name])
        print(f"| {name} | {1e3 * statistics.median(wall[name]):.0f} | {1e3 * c:.0f} | {c / base_cpu:.2f} | "
              f"{peaks[name] / 2**20:.1f} | {peaks[name] / base_peak:.2f} |")

    model64, f64 = build(args.size, torch.float64)
    print(f"\nRelative error of finite_difference (float32) against exact (float64), by eps (default {FD_EPS:g}):\n")
    print("| tangent | " + " | ".join(f"{e:g}" for e in EPS) + " | exact in float32 |")
    print("|---|" + "---:|" * (len(EPS) + 1))
    model.eval()
    model64.eval()
    with torch.no_grad():
        for kind in ("dx", "dt", "both"):
            tangent = (dx if kind != "dt" else torch.zeros_like(dx), ds if kind != "dx" else torch.zeros_like(ds))
            _, exact = jvp(f64, (x_t.double(), s.double()), tuple(v.double() for v in tangent))
            errors = [rel_error(jvp(f, (x_t, s), tangent, method="finite_difference", eps=e)[1], exact) for e in EPS]
            exact32 = rel_error(jvp(f, (x_t, s), tangent)[1], exact)
            print(f"| {kind} | " + " | ".join(f"{v:.1e}" for v in errors) + f" | {exact32:.1e} |")

    print("\ntorch.func.jvp through F.scaled_dot_product_attention (CPU):\n")
    print("| kernel | forward AD |")
    print("|---|---|")
    for name, result in attention_support().items():
        print(f"| {name} | {result} |")


if __name__ == "__main__":
    main()
