"""Every registered objective distils the toy teacher with the same budget; toy FID at 1, 2 and 4 student
steps, beside the teacher's DDIM at the same number of network evaluations.

    python scripts/compare_methods.py                               # the defaults below, about 15 min on 2 CPU cores
    python scripts/compare_methods.py --max-steps 2000 --num-samples 5000 --threads 2
    python scripts/compare_methods.py --teacher toy-t2i --guidance 3 --out-dir docs/toy_t2i
    python scripts/compare_methods.py --teachers zoo --max-steps 2000 --batch-size 64 --out-dir docs/zoo

For every objective in ``fastgen.losses.OBJECTIVES`` and every step count ``n`` in ``--steps``, one student is
trained for ``n`` steps (``student.num_steps = n``), each ``(method, n)`` its own run. A run starts from the
method's toy preset (``fastgen/configs/toy_<method>.yaml``: its learning rate, batch, data, EMA and objective
settings; the preset's timesteps, experts and phase boundaries only at its own step count, else the objective's
defaults: one network, and for Phased DMD one phase per step) and has the same
budget as every other: ``--max-steps`` optimiser steps, ``--seed``; ``--batch-size`` and ``--lr`` override
every preset when given. A method without a preset runs on the trainer's defaults. Data: the preset's (the toy
world's images for ``toy_dmd2``), else ``teacher`` (``--teacher-samples`` DDIM samples of the teacher,
``--teacher-sample-steps`` steps, generated once and shared by all runs).

Each student is exported (EMA weights, ``Trainer.export``) and sampled with ``fastgen.generate.generate``
(its ``FewStepScheduler``: trained timesteps and rule); the teacher with DDIM at ``n`` steps from the same
noise. Both are scored with ``fastgen.eval.toy_fid.toy_fid`` on ``--num-samples`` images against 5,000 fresh
toy images. A zoo teacher (``fastgen.zoo``: ``--teacher gray8-linear-eps``, or ``--teachers zoo`` for every
built one, each in ``<out-dir>/<teacher>/`` and ``<work-dir>/<teacher>/``) is scored with its zoo FID
(``fastgen.zoo.zoo_fid``) against its own data instead. With a text-conditioned toy teacher (``--teacher toy-t2i``) student and teacher are sampled on the
toy evaluation prompts (every shape x colour, ``fastgen.eval.toy_prompts``), the teacher with ``--guidance``,
and the tables add prompt accuracy (shape and colour both right); runs on teacher samples or data-free draw
them on those prompts (``prompts``), and objectives with a ``guidance_scale`` (the DMD family) guide the teacher
by ``--guidance``. Training wall time is that of ``Trainer.fit()``
(the loop and its final checkpoint; not the teacher loading, data cache, export or evaluation). Writes
``compare_methods.md`` (Markdown table) and ``compare_methods.csv`` to ``--out-dir``; run folders go to
``--work-dir``, each replaced by a new run. ``--merge A.csv B.csv ...`` trains nothing: it writes the tables
from the rows of earlier runs (one table split over processes or machines, all with the same settings; a
later file's row replaces an earlier one of the same method and step count).
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import shutil
import time
from pathlib import Path

import torch

from fastgen.cli import int_list
from fastgen.config import PRESETS_DIR, DistillConfig, config_from_dict, config_to_dict, grid_for_teacher, load_config
from fastgen.eval.toy_fid import toy_fid
from fastgen.eval.toy_prompts import prompt_accuracy, toy_eval_prompts
from fastgen.generate import generate
from fastgen.losses import OBJECTIVES
from fastgen.teacher import load_teacher
from fastgen.trainer import Trainer
from fastgen.zoo import ZOO, zoo_dir, zoo_fid, zoo_teacher_path

COLUMNS = ("method", "steps", "student_toy_fid", "teacher_ddim_toy_fid", "train_wall_s", "max_steps", "batch_size",
           "lr", "data")
PROMPT_COLUMNS = ("student_prompt_acc", "teacher_ddim_prompt_acc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="toy",
                   help="teacher diffusers folder; 'toy': the bundled toy teacher, 'toy-t2i': the bundled "
                        "text-conditioned one (default: %(default)s)")
    p.add_argument("--teachers", help="'zoo': every built zoo teacher (fastgen.zoo.ZOO), one table each, or a "
                   "comma-separated list of teachers; replaces --teacher")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale of the text teacher's DDIM samples, Ho-Salimans form (default: %(default)s)")
    p.add_argument("--methods", default=",".join(OBJECTIVES), help="comma-separated objectives (default: %(default)s)")
    p.add_argument("--steps", type=int_list, default=[1, 2, 4],
                   help="student step counts, one training each (default: 1,2,4)")
    p.add_argument("--max-steps", type=int, default=500, help="training steps of every run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch size (default: the method's toy preset's, else the trainer's)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the method's toy preset's, else the trainer's)")
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
    p.add_argument("--merge", type=Path, nargs="+", metavar="CSV",
                   help="train nothing: write the tables from these compare_methods.csv files of earlier runs "
                        "(give the settings they ran with, --teacher, --seed, ..., for the table's heading)")
    return p.parse_args(argv)


def teacher_source(teacher: str) -> str:
    """The teacher's folder for a zoo name, else ``teacher`` as given."""
    return str(zoo_teacher_path(teacher)) if teacher in ZOO else teacher


def fid_of(teacher: str):
    """The FID of this comparison: zoo FID against a zoo teacher's data, else toy FID."""
    return functools.partial(zoo_fid, name=teacher) if teacher in ZOO else toy_fid


def read_rows(paths: list[Path]) -> list[dict]:
    """The rows of earlier runs' CSVs, numbers parsed; a later file's (method, steps) replaces an earlier one.
    Every file has the columns this script writes, all with the prompt columns or none."""
    rows, columns = {}, None
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: --merge {path}: no such file; expected a compare_methods.csv of an earlier run")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            found = tuple(reader.fieldnames or ())
            columns = columns or (found if found in (COLUMNS, COLUMNS + PROMPT_COLUMNS) else COLUMNS)
            if found != columns:
                raise SystemExit(f"error: --merge {path}: columns {','.join(found)}; expected {','.join(columns)} "
                                 "(compare_methods.csv, the prompt columns in every file or in none)")
            for row in reader:
                for key in set(row) - {"method", "data"}:
                    row[key] = int(row[key]) if key in ("steps", "max_steps", "batch_size") else float(row[key])
                rows[row["method"], row["steps"]] = row
    if not rows:
        raise SystemExit(f"error: --merge {' '.join(map(str, paths))}: no rows; expected compare_methods.csv files "
                         "of earlier runs")
    return list(rows.values())


def run_config(args, method: str, steps: int, run_dir: Path, prompts_file: Path | None) -> DistillConfig:
    """The method's toy preset (``toy_<method>.yaml``, when there is one) under the comparison's budget: the
    teacher, ``--max-steps``, ``student.num_steps = steps`` (the preset's timesteps, experts and phase
    boundaries only at its own step count), ``--batch-size``/``--lr`` when given, the preset's data or
    ``teacher`` samples; a text teacher's runs are conditioned on the toy prompts (``prompts`` for teacher samples and data-free runs) and a DMD-family
    teacher is guided by ``--guidance``."""
    tree = {}
    if (PRESETS_DIR / f"toy_{method}.yaml").is_file():
        tree = config_to_dict(load_config(DistillConfig, PRESETS_DIR / f"toy_{method}.yaml"))
    student = tree.get("student", {})
    objective = dict(tree.get("objective", {}))
    if student.get("num_steps") != steps:  # the preset's grid, experts and phase boundaries are for its own count
        student.update(timesteps=None, experts=1, expert_boundaries=None)
        objective.pop("boundaries", None)
    train = {**tree.get("train", {}), "max_steps": args.max_steps, "log_every": 50}
    for key in ("batch_size", "lr"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if prompts_file is not None and "guidance_scale" in getattr(OBJECTIVES[method].Config, "__dataclass_fields__", {}):
        objective["guidance_scale"] = args.guidance
    data = tree.get("data") or "teacher"
    if data == "toy" and args.teacher in ZOO:  # the toy world's images, as a zoo teacher's data
        data = str(ZOO[args.teacher].write_images(args.work_dir / "data", 10_000, seed=args.seed))
    if prompts_file is not None:  # a text teacher: its own guided samples of the toy prompts (the toy images are pixels)
        data = "teacher"
    config = config_from_dict(DistillConfig, {
        **tree, "teacher": teacher_source(args.teacher), "method": method, "output": str(run_dir), "seed": args.seed, "data": data,
        "prompts": str(prompts_file) if prompts_file is not None else None,
        "teacher_sample_guidance": args.guidance if prompts_file is not None else 1.0,
        "teacher_samples": args.teacher_samples, "teacher_sample_steps": args.teacher_sample_steps,
        "student": {**student, "num_steps": steps}, "train": train, "objective": objective,
    })
    preset = PRESETS_DIR / f"toy_{method}.yaml"
    return grid_for_teacher(config, preset) if preset.is_file() else config  # as `fastgen distill --config` does


def distill(args, method: str, steps: int, prompts_file: Path | None) -> tuple[Path, float, DistillConfig]:
    """Train one student; return its export folder, the wall time of ``fit()`` and its config."""
    run_dir = args.work_dir / f"{method}-{steps}step"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "cache").symlink_to((args.work_dir / "cache").absolute(), target_is_directory=True)
    config = run_config(args, method, steps, run_dir, prompts_file)
    trainer = Trainer(config)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    return trainer.export(run_dir / "export"), wall, config


def write_tables(rows: list[dict], args) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prompted = PROMPT_COLUMNS[0] in rows[0]
    with (args.out_dir / "compare_methods.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + (PROMPT_COLUMNS if prompted else ()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    budget = " / ".join(str(n) for n in sorted({r["max_steps"] for r in rows}))
    fid = "zoo FID" if args.teacher in ZOO else "toy FID"
    against = "5,000 images of the teacher's data (`fastgen.zoo.zoo_fid`)" if args.teacher in ZOO else "5,000 toy images"
    lines = [f"Teacher `{args.teacher}`; every run {budget} training steps at its toy preset's settings "
             f"(batch, lr, data below), seed {args.seed}; teacher samples: {args.teacher_samples} DDIM samples "
             f"({args.teacher_sample_steps} steps); {args.threads} torch thread(s); {fid} of {args.num_samples} "
             f"samples against {against}. Written by `scripts/compare_methods.py`.", "",
             f"| method | student steps (= NFE) | student {fid} | teacher DDIM {fid}, same NFE | "
             "training wall time (s) | batch | lr | data |"
             + (" student prompt acc. | teacher prompt acc. |" if prompted else ""),
             "|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if prompted else "")]
    lines += [f"| {r['method']} | {r['steps']} | {r['student_toy_fid']:.2f} | {r['teacher_ddim_toy_fid']:.2f} | "
              f"{r['train_wall_s']:.0f} | {r['batch_size']} | {r['lr']:g} | {r['data']} |"
              + (f" {r['student_prompt_acc']:.3f} | {r['teacher_ddim_prompt_acc']:.3f} |" if prompted else "")
              for r in rows]
    if prompted:
        lines += ["", f"Samples on the {len(toy_eval_prompts())} toy prompts; teacher guidance {args.guidance:g}, "
                  "students sampled without guidance (the DMD family learns the guided teacher: its `guidance_scale` is "
                  "--guidance); prompt accuracy: shape and colour both as prompted."]
    (args.out_dir / "compare_methods.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        write_tables(read_rows(args.merge), args)
        print((args.out_dir / "compare_methods.md").read_text())
        return
    torch.set_num_threads(args.threads)
    if not args.teachers:
        return compare(args)
    names = [p.name for p in sorted(zoo_dir().glob("*")) if p.name in ZOO] if args.teachers == "zoo" else (
        args.teachers.split(","))
    if not names:
        raise SystemExit(f"error: --teachers zoo: no zoo teacher is built in {zoo_dir()}; build them with "
                         "`python scripts/train_zoo.py`")
    for name in names:
        one = copy.copy(args)
        one.teacher, one.out_dir, one.work_dir = name, args.out_dir / name, args.work_dir / name
        compare(one)


def compare(args) -> None:
    """Every method of ``args.methods`` at every step count on ``args.teacher``: the table in ``args.out_dir``."""
    (args.work_dir / "cache").mkdir(parents=True, exist_ok=True)
    fid = fid_of(args.teacher)
    teacher = load_teacher(teacher_source(args.teacher))
    prompts = toy_eval_prompts() if teacher.text_conditioned else None
    if args.guidance != 1.0 and prompts is None:
        raise SystemExit(f"error: --guidance {args.guidance} needs a text-conditioned teacher; {args.teacher} is not")
    teacher_images = {n: generate(teacher, args.num_samples, n, seed=args.seed, prompts=prompts,
                                  guidance_scale=args.guidance) for n in args.steps}
    teacher_fid = {n: fid(images) for n, images in teacher_images.items()}
    teacher_acc = {n: prompt_accuracy(images, prompts).joint for n, images in teacher_images.items()} if prompts else {}
    prompts_file = None
    if prompts:
        prompts_file = args.work_dir / "toy_prompts.txt"
        prompts_file.write_text("\n".join(toy_eval_prompts()) + "\n")
    rows = []
    for method in args.methods.split(","):
        for n in args.steps:
            export, wall, config = distill(args, method, n, prompts_file)
            student_images = generate(load_teacher(export), args.num_samples, n, seed=args.seed, prompts=prompts)
            student_fid = fid(student_images)
            rows.append({"method": method, "steps": n, "student_toy_fid": round(student_fid, 3),
                         "teacher_ddim_toy_fid": round(teacher_fid[n], 3), "train_wall_s": round(wall, 1),
                         "max_steps": args.max_steps, "batch_size": config.train.batch_size,
                         "lr": config.train.lr, "data": config.data})
            if prompts:
                rows[-1].update(student_prompt_acc=round(prompt_accuracy(student_images, prompts).joint, 4),
                                teacher_ddim_prompt_acc=round(teacher_acc[n], 4))
            print(f"{method} @ {n} steps: student toy FID {student_fid:.2f}, teacher DDIM {teacher_fid[n]:.2f}, "
                  f"trained in {wall:.0f} s", flush=True)
            write_tables(rows, args)
    print((args.out_dir / "compare_methods.md").read_text())


if __name__ == "__main__":
    main()
