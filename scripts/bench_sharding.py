"""Memory and time per process of DDP against FSDP2 (``train.sharding``) on N CPU processes, side by side.

Builds a mid-size pixel teacher (a ``UNet2DModel`` of about 50 M parameters, random weights: the figures are
about memory and time, not quality), then runs the same ``fastgen distill`` of DMD2 (student, full fake score,
frozen teacher; AdamW) under ``torchrun --nproc_per_node N`` twice, replicated and sharded, and reads the peak
resident memory of the main process and the training time per step from ``metrics.jsonl``. The peak RSS
includes the Python, torch and diffusers baseline of a process (``--baseline`` measures it: an import of fastgen
and the teacher's load), so the difference between the two runs is the state that sharding divides.

    OMP_NUM_THREADS=1 python scripts/bench_sharding.py --out docs/bench_sharding.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_teacher(path: Path, width: int) -> int:
    """A ``DDPMPipeline`` with a 32x32 ``UNet2DModel`` of block widths ``width * (1, 2, 4, 4)``; its parameters."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return sum(p.numel() for p in unet.parameters())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def distill(teacher: Path, output: Path, processes: int, sharding: str, steps: int, batch: int) -> dict:
    """One launch; its last metrics record and its wall time."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(free_port()), "-m", "fastgen", "distill", "--teacher", str(teacher), "--method", "dmd2",
               "--steps", "1", "--output", str(output), "--max-steps", str(steps), f"train.batch_size={batch}",
               f"train.sharding={sharding}", "train.log_every=1", "train.ema_decay=null",
               "objective.critic_every=1", "objective.gan_weight=0", "objective.gan_critic_weight=0"]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{sharding} run failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    # the first step includes FSDP2's lazy initialisation and the allocator's growth: time the steps after it
    per_step = (records[-1]["time"] - records[0]["time"]) / (len(records) - 1)
    return {"peak_rss": records[-1]["peak_memory_bytes"], "s_per_step": per_step, "wall": wall}


def baseline(teacher: Path) -> int:
    """Peak RSS of a process that imports fastgen's trainer and loads the teacher."""
    code = ("import resource; from fastgen.trainer import Trainer; from fastgen.teacher import load_teacher; "
            f"load_teacher({str(teacher)!r}); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--width", type=int, default=96, help="UNet block width (96: about 50 M parameters)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2, help="per process")
    parser.add_argument("--out", type=Path, help="write a markdown table here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    teacher = root / "teacher"
    params = make_teacher(teacher, args.width)
    base = baseline(teacher)
    runs = {sharding: distill(teacher, root / sharding, args.processes, sharding, args.steps, args.batch)
            for sharding in ("none", "fsdp2")}
    mib = 2**20
    state = {k: (r["peak_rss"] - base) / mib for k, r in runs.items()}
    lines = [f"# DDP vs FSDP2 on {args.processes} CPU processes", "",
             f"`OMP_NUM_THREADS=1 python scripts/bench_sharding.py --processes {args.processes} --width {args.width} "
             f"--steps {args.steps} --batch {args.batch}`; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {__import__('torch').__version__}; DMD2 (student, full fake score, "
             f"frozen teacher, AdamW, no EMA, no GAN) of a random {params / 1e6:.1f} M-parameter 32x32 UNet2DModel, "
             f"batch {args.batch} per process. Peak RSS of the main process; the baseline (imports and the teacher "
             f"loaded, one process) is {base / mib:.0f} MiB.", "",
             "| sharding | peak RSS (MiB) | above the baseline (MiB) | s per step (after the first) | wall (s) |",
             "|---|---:|---:|---:|---:|"]
    for sharding, r in runs.items():
        lines.append(f"| {sharding} | {r['peak_rss'] / mib:.0f} | {state[sharding]:.0f} | {r['s_per_step']:.2f} | "
                     f"{r['wall']:.0f} |")
    lines += ["", f"fsdp2 / none: memory above the baseline {state['fsdp2'] / state['none']:.2f}, time per step "
              f"{runs['fsdp2']['s_per_step'] / runs['none']['s_per_step']:.2f}. Expected for the state alone "
              f"(fp32 weights of 3 networks, gradients and AdamW states of 2, divided by {args.processes}): "
              f"{(3 + 2 + 4) * 4 * params / mib:.0f} MiB replicated, "
              f"{(3 + 2 + 4) * 4 * params / mib / args.processes:.0f} MiB sharded, plus activations and FSDP2's "
              "gathered blocks.", "",
              "The peak RSS of a sharded process includes the build: every process loads the whole teacher and "
              "copies it (student, fake score) before `fully_shard` splits them, so the whole networks are resident "
              "once at the start (fastgen builds no network sharded from the first byte: no meta-device build with "
              "sharded weight loading yet), and memory freed afterwards is not always returned to the system. On CPU "
              "processes the all-gathers and reduce-scatters go through gloo and memory copies: the time per step is "
              "not a GPU's (NCCL overlaps them with compute)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
