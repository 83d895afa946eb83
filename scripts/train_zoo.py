"""Train the teacher zoo (``fastgen.zoo.ZOO``) on CPU, then measure each teacher's best zoo FID.

    python scripts/train_zoo.py                          # every teacher into fastgen.zoo.zoo_dir()
    python scripts/train_zoo.py --only gray8-linear-eps --steps 4000
    python scripts/train_zoo.py --baselines-only --out docs/zoo   # measure already-built teachers

Each teacher is trained as the toy teacher is (``scripts/train_toy_teacher.py``'s ``train_teacher``: AdamW,
warm-up, cosine decay, EMA, its own output type) on a pool of its data rendered once, and saved as a diffusers
``DDPMPipeline`` folder (EMA weights), written beside its destination and renamed into place. Its baseline is
the zoo FID (``fastgen.zoo.zoo_fid``) of ``--num-samples`` samples of DDIM (Euler for the flow teacher),
``--sweep`` steps, and of the DPM-Solver++(2M) sampler at the same counts; ``<out>/zoo_teachers.md`` and
``.csv`` keep every point and each teacher's best. The health signal (``fastgen.health.assess``: the teacher's
denoising error on samples over that on data, and their spatial variation over the data's) is measured on the
DDIM samples at every count and on Gaussian noise and constant images, against 256 images of the teacher's data:
``<out>/zoo_health.md`` shows whether the band chosen on the toy teacher holds on each zoo teacher.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from fastgen.cli import int_list
from fastgen.generate import generate
from fastgen.health import FLAT_RATIO, NOISE_RATIO, assess
from fastgen.teacher import load_teacher
from fastgen.zoo import ZOO, zoo_dir, zoo_fid
from train_toy_teacher import replace_folder, train_teacher


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(ZOO), help="comma-separated zoo teachers (default: all)")
    p.add_argument("--out-dir", type=Path, default=None, help="zoo folder (default: fastgen.zoo.zoo_dir())")
    p.add_argument("--steps", type=int, default=4000, help="optimisation steps per teacher (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--pool-size", type=int, default=40_000, help="training images rendered once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baselines-only", action="store_true", help="train nothing; measure the built teachers")
    p.add_argument("--sweep", type=int_list, default=[1, 2, 4, 8, 16, 32, 64, 128],
                   help="sampling steps of the baseline (default: 1,2,4,8,16,32,64,128)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per zoo FID (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("docs/zoo"), help="baseline tables (default: %(default)s)")
    return p.parse_args(argv)


def train(name: str, folder: Path, args) -> None:
    spec = ZOO[name]
    start = time.perf_counter()
    images = spec.images(args.pool_size, args.seed)
    unet, scheduler = train_teacher(images, args, unet=spec.unet(), scheduler=spec.scheduler())
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    replace_folder(tmp, folder)
    print(f"{name}: saved {folder} in {time.perf_counter() - start:.0f} s", flush=True)


def baseline(name: str, folder: Path, args) -> tuple[list[dict], list[dict]]:
    """The teacher's zoo FID at every sampler and count, and the health of its DDIM samples, noise and constants."""
    teacher = load_teacher(folder)
    data = ZOO[name].images(256, seed=args.seed + 1)
    rows, health = [], []

    def check(what: str, samples: torch.Tensor) -> None:
        h = assess(teacher, samples[:256], None, data, None, seed=args.seed)
        health.append({"teacher": name, "samples": what, "denoise_ratio": h.denoise_ratio,
                       "flat_ratio": h.flat_ratio, "verdict": h.verdict or "healthy"})

    for sampler in ("ddim", "dpmpp_2m"):
        for n in args.sweep:
            images = generate(teacher, args.num_samples, n, seed=args.seed, sampler=sampler)
            rows.append({"teacher": name, "sampler": sampler, "steps": n, "zoo_fid": round(zoo_fid(images, name), 3)})
            print(f"{name}: {sampler} {n} steps zoo FID {rows[-1]['zoo_fid']}", flush=True)
            if sampler == "ddim":
                check(f"DDIM {n} steps", images)
    g = torch.Generator().manual_seed(args.seed)
    check("Gaussian noise", torch.randn(data.shape, generator=g))
    check("constant images", torch.rand(len(data), data.shape[1], 1, 1, generator=g).expand_as(data) * 2 - 1)
    return rows, health


def write_baselines(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "zoo_teachers.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("teacher", "sampler", "steps", "zoo_fid"), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Zoo teachers (`fastgen/zoo.py`, trained by `scripts/train_zoo.py`, {args.steps} steps each): zoo FID "
             f"of {args.num_samples} samples (seed {args.seed}) against 5,000 images of the teacher's data, by "
             "sampler and steps. DDIM is Euler in x0 form on the flow teacher; dpmpp_2m is DPM-Solver++(2M).", "",
             "| teacher | channels x size | schedule | output | T | sampler | " +
             " | ".join(f"{n}" for n in args.sweep) + " | best |",
             "|---|---|---|---|---:|---|" + "---:|" * (len(args.sweep) + 1)]
    for name in dict.fromkeys(r["teacher"] for r in rows):
        spec, mine = ZOO[name], [r for r in rows if r["teacher"] == name]
        best = min(r["zoo_fid"] for r in mine)
        for sampler in dict.fromkeys(r["sampler"] for r in mine):
            fids = {r["steps"]: r["zoo_fid"] for r in mine if r["sampler"] == sampler}
            lines.append(f"| {name} | {spec.channels}x{spec.size}x{spec.size} | {spec.schedule} | {spec.prediction} | "
                         f"{spec.train_timesteps} | {sampler} | " + " | ".join(f"{fids[n]:.2f}" for n in args.sweep)
                         + f" | {best:.2f} |")
    (args.out / "zoo_teachers.md").write_text("\n".join(lines) + "\n")


def write_health(health: list[dict], args) -> None:
    lines = [f"The health signal (`fastgen/health.py`; band: denoise ratio <= {NOISE_RATIO:g} and flat ratio >= "
             f"{FLAT_RATIO:g}, chosen on the toy teacher) on each zoo teacher, against 256 images of its data. "
             "Written by `scripts/train_zoo.py`.", "",
             "| teacher | samples | denoise ratio | flat ratio | verdict |", "|---|---|---:|---:|---|"]
    lines += [f"| {h['teacher']} | {h['samples']} | {h['denoise_ratio']} | {h['flat_ratio']} | {h['verdict']} |"
              for h in health]
    (args.out / "zoo_health.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.out_dir or zoo_dir()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise SystemExit(f"error: --only {','.join(unknown)}: unknown; expected some of {','.join(ZOO)}")
    rows, health = [], []
    for name in names:
        if not args.baselines_only:
            root.mkdir(parents=True, exist_ok=True)
            train(name, root / name, args)
        fids, checks = baseline(name, root / name, args)
        rows, health = rows + fids, health + checks
        write_baselines(rows, args)
        write_health(health, args)
    print((args.out / "zoo_teachers.md").read_text())


if __name__ == "__main__":
    main()
