"""The floor a capped first step puts under a consistency student: the toy teacher's own ODE (DDIM) started from
pure noise at a time below its top, scored with toy FID.

    python scripts/ode_from_noise.py --times 999,800,672,650,452 --out docs/scm/ode_from_noise.md

A student whose first step is taken at time ``s`` from pure noise (the DMD family's capped grid, sCM's
``fastgen.losses.scm.first_time``) is fed ``z`` where the teacher's marginal is ``alpha(s) x0 + sigma(s) eps``. A consistency
student reproduces the teacher's ODE from its input, so at best it ends where this ODE ends: ``--steps`` DDIM steps
(evenly spaced, rounded, from ``s`` down) from ``--num-samples`` noises (``--seed``), clamped to [-1, 1] and scored
with ``fastgen.eval.toy_fid.toy_fid`` against 5,000 toy images. Writes a Markdown table (time, alpha,
sigma / alpha, toy FID, sample std) to ``--out`` and to stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastgen.eval.toy_fid import toy_fid
from fastgen.samplers.solvers import sample_ddim
from fastgen.teacher import load_teacher


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--times", default="999,800,672,650,452", help="comma-separated start times (integers)")
    p.add_argument("--steps", type=int, default=64, help="DDIM steps from each start time (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: stdout only)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_teacher("toy")
    schedule = teacher.schedule
    lines = [f"Toy teacher's DDIM, {args.steps} steps from pure noise at time `s`, {args.num_samples} samples "
             f"(seed {args.seed}), toy FID against 5,000 toy images (`scripts/ode_from_noise.py`).", "",
             "| start time s | alpha(s) | sigma / alpha | toy FID | sample std |", "|---:|---:|---:|---:|---:|"]
    for start in (int(t) for t in args.times.split(",")):
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(start))))
        timesteps = [float(t) for t in torch.linspace(start, 0, args.steps + 1)[:-1].round()]
        noise = torch.randn(args.num_samples, *teacher.sample_shape, generator=torch.Generator().manual_seed(args.seed))
        images = sample_ddim(teacher.denoiser, noise, timesteps).clamp(-1, 1)
        lines.append(f"| {start} | {alpha:.4f} | {sigma / alpha:.2f} | {toy_fid(images):.2f} | {float(images.std()):.3f} |")
        print(lines[-1], flush=True)
    write_report(lines, args.out)


def write_report(lines: list[str], out: Path | None) -> None:
    """The Markdown ``lines`` to ``out`` (its folder made), where one is given, and to stdout."""
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
