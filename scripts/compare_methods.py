"""Every registered objective distils the toy teacher with the same budget; toy FID at 1, 2 and 4 student
steps, beside the teacher's DDIM at the same number of network evaluations.

    python scripts/compare_methods.py                               # the defaults below, about 15 min on 2 CPU cores
    python scripts/compare_methods.py --max-steps 2000 --num-samples 5000 --threads 2
    python scripts/compare_methods.py --teacher toy-t2i --guidance 3 --out-dir docs/toy_t2i

For every objective in ``fastgen.losses.OBJECTIVES`` and every step count ``n`` in ``--steps``, one student is
trained for ``n`` steps (``student.num_steps = n`` at the objective's default timesteps): neither registered
objective serves several step counts from one training (progressive halves its teacher's steps down to ``n``
and exports that count only; consistency trains and exports the ``n`` timesteps of LCM's choice), so each
``(method, n)`` is its own run. Every run has the same budget: ``--max-steps`` optimiser steps at
``--batch-size``, ``--lr``, ``--seed``, the trainer's other defaults (AdamW, grad clip 1, EMA 0.999) and the
objectives' default settings (progressive: start at 64 teacher steps, max_steps split evenly over the
halvings; consistency: LCM's 50-point skip grid, pseudo-Huber, target EMA 0.95), on the same data: ``teacher``
(``--teacher-samples`` DDIM samples of the teacher, ``--teacher-sample-steps`` steps, generated once and
shared by all runs).

Each student is exported (EMA weights, ``Trainer.export``) and sampled with ``fastgen.generate.generate``
(its ``FewStepScheduler``: trained timesteps and rule); the teacher with DDIM at ``n`` steps from the same
noise. Both are scored with ``fastgen.eval.toy_fid.toy_fid`` on ``--num-samples`` images against 5,000 fresh
toy images. With a text-conditioned toy teacher (``--teacher toy-t2i``) student and teacher are sampled on the
toy evaluation prompts (every shape x colour, ``fastgen.eval.toy_prompts``), the teacher with ``--guidance``,
and the tables add prompt accuracy (shape and colour both right); the training data are still the teacher's
samples of the empty prompt (what ``data: teacher`` draws). Training wall time is that of ``Trainer.fit()``
(the loop and its final checkpoint; not the teacher loading, data cache, export or evaluation). Writes
``compare_methods.md`` (Markdown table) and ``compare_methods.csv`` to ``--out-dir``; run folders go to
``--work-dir``, each replaced by a new run.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import torch

from fastgen.cli import int_list
from fastgen.config import DistillConfig, config_from_dict
from fastgen.eval.toy_fid import toy_fid
from fastgen.eval.toy_prompts import prompt_accuracy, toy_eval_prompts
from fastgen.generate import generate
from fastgen.losses import OBJECTIVES
from fastgen.teacher import load_teacher
from fastgen.trainer import Trainer

COLUMNS = ("method", "steps", "student_toy_fid", "teacher_ddim_toy_fid", "train_wall_s", "max_steps", "batch_size")
PROMPT_COLUMNS = ("student_prompt_acc", "teacher_ddim_prompt_acc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="toy",
                   help="teacher diffusers folder; 'toy': the bundled toy teacher, 'toy-t2i': the bundled "
                        "text-conditioned one (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale of the text teacher's DDIM samples, Ho-Salimans form (default: %(default)s)")
    p.add_argument("--methods", default=",".join(OBJECTIVES), help="comma-separated objectives (default: %(default)s)")
    p.add_argument("--steps", type=int_list, default=[1, 2, 4],
                   help="student step counts, one training each (default: 1,2,4)")
    p.add_argument("--max-steps", type=int, default=500, help="training steps of every run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run and of the sampling noise (default: %(default)s)")
    p.add_argument("--teacher-samples", type=int, default=1024,
                   help="teacher DDIM samples used as training data (default: %(default)s)")
    p.add_argument("--teacher-sample-steps", type=int, default=32,
                   help="DDIM steps of those samples (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=1000, help="images per toy FID (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/compare_methods"),
                   help="run folders, each replaced by a new run, and the shared data cache (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=Path("docs"),
                   help="where compare_methods.md and .csv go (default: %(default)s)")
    return p.parse_args(argv)


def distill(args, method: str, steps: int) -> tuple[Path, float]:
    """Train one student; return its export folder and the wall time of ``fit()``."""
    run_dir = args.work_dir / f"{method}-{steps}step"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "cache").symlink_to((args.work_dir / "cache").absolute(), target_is_directory=True)
    config = config_from_dict(DistillConfig, {
        "teacher": args.teacher, "method": method, "output": str(run_dir), "data": "teacher", "seed": args.seed,
        "teacher_samples": args.teacher_samples, "teacher_sample_steps": args.teacher_sample_steps,
        "student": {"num_steps": steps},
        "train": {"max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr, "log_every": 50},
    })
    trainer = Trainer(config)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    return trainer.export(run_dir / "export"), wall


def write_tables(rows: list[dict], args) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prompted = PROMPT_COLUMNS[0] in rows[0]
    with (args.out_dir / "compare_methods.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + (PROMPT_COLUMNS if prompted else ()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Teacher `{args.teacher}`; every run {args.max_steps} training steps, batch {args.batch_size}, lr {args.lr:g}, "
             f"seed {args.seed}, on {args.teacher_samples} teacher DDIM samples ({args.teacher_sample_steps} steps), "
             f"{args.threads} torch thread(s); toy FID of {args.num_samples} samples against 5,000 toy images. "
             "Written by `scripts/compare_methods.py`.", "",
             "| method | student steps (= NFE) | student toy FID | teacher DDIM toy FID, same NFE | "
             "training wall time (s) |" + (" student prompt acc. | teacher prompt acc. |" if prompted else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if prompted else "")]
    lines += [f"| {r['method']} | {r['steps']} | {r['student_toy_fid']:.2f} | {r['teacher_ddim_toy_fid']:.2f} | "
              f"{r['train_wall_s']:.0f} |"
              + (f" {r['student_prompt_acc']:.3f} | {r['teacher_ddim_prompt_acc']:.3f} |" if prompted else "")
              for r in rows]
    if prompted:
        lines += ["", f"Samples on the {len(toy_eval_prompts())} toy prompts; teacher guidance {args.guidance:g}, "
                  "students unguided; prompt accuracy: shape and colour both as prompted."]
    (args.out_dir / "compare_methods.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    (args.work_dir / "cache").mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args.teacher)
    prompts = toy_eval_prompts() if teacher.text_conditioned else None
    if args.guidance != 1.0 and prompts is None:
        raise SystemExit(f"error: --guidance {args.guidance} needs a text-conditioned teacher; {args.teacher} is not")
    teacher_images = {n: generate(teacher, args.num_samples, n, seed=args.seed, prompts=prompts,
                                  guidance_scale=args.guidance) for n in args.steps}
    teacher_fid = {n: toy_fid(images) for n, images in teacher_images.items()}
    teacher_acc = {n: prompt_accuracy(images, prompts).joint for n, images in teacher_images.items()} if prompts else {}
    rows = []
    for method in args.methods.split(","):
        for n in args.steps:
            export, wall = distill(args, method, n)
            student_images = generate(load_teacher(export), args.num_samples, n, seed=args.seed, prompts=prompts)
            student_fid = toy_fid(student_images)
            rows.append({"method": method, "steps": n, "student_toy_fid": round(student_fid, 3),
                         "teacher_ddim_toy_fid": round(teacher_fid[n], 3), "train_wall_s": round(wall, 1),
                         "max_steps": args.max_steps, "batch_size": args.batch_size})
            if prompts:
                rows[-1].update(student_prompt_acc=round(prompt_accuracy(student_images, prompts).joint, 4),
                                teacher_ddim_prompt_acc=round(teacher_acc[n], 4))
            print(f"{method} @ {n} steps: student toy FID {student_fid:.2f}, teacher DDIM {teacher_fid[n]:.2f}, "
                  f"trained in {wall:.0f} s", flush=True)
            write_tables(rows, args)
    print((args.out_dir / "compare_methods.md").read_text())


if __name__ == "__main__":
    main()
