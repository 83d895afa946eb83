"""``fastgen demo``: distil the bundled toy teacher on CPU, evaluate it, export it, in minutes.

1. distil the toy teacher (16x16 shapes, linear-beta DDPM) with a bundled preset (``toy_consistency``
   or ``toy_progressive``) into ``OUT/run``, exporting the student to ``OUT/student``;
2. sweep toy FID of the student and of the teacher's DDIM at the same step counts
   (``OUT/sweep.{csv,md,png}``) and the teacher's many-step FID for reference;
3. write ``OUT/grid.png``: rows of teacher DDIM and student samples from the same noise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from fastgen.config import DistillConfig, config_file, load_config
from fastgen.eval.sweep import run_sweep
from fastgen.eval.toy_fid import toy_fid
from fastgen.generate import generate, save_grid
from fastgen.teacher import load_teacher
from fastgen.trainer import Trainer

GRID_COLUMNS = 12


def run_demo(out_dir: Path, method: str = "consistency", max_steps: int | None = None, num_samples: int = 1000,
             steps: Sequence[int] = (1, 2, 4, 8), teacher_steps: int = 64, seed: int = 0) -> list[dict]:
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"output={out_dir / 'run'}", f"seed={seed}"]
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    config = load_config(DistillConfig, config_file(f"toy_{method}"), overrides)
    print(f"[1/3] distilling the toy teacher with {method} ({config.train.max_steps} steps) into {out_dir / 'run'}")
    trainer = Trainer(config)
    trainer.fit()
    trainer.export(out_dir / "student")
    trained = time.perf_counter() - start

    print(f"[2/3] toy FID of student and teacher at {list(steps)} steps, {num_samples} samples each")
    teacher = load_teacher("toy")
    student = load_teacher(out_dir / "student")
    served = student.pipeline.scheduler.step_counts
    sweep_steps = [n for n in steps if n in served]
    curves = {f"student ({method})": lambda n: generate(student, num_samples, n, seed=seed),
              "teacher DDIM": lambda n: generate(teacher, num_samples, n, seed=seed)}
    rows = run_sweep(curves, sweep_steps, {"toy_fid": toy_fid}, out_dir)
    reference = toy_fid(generate(teacher, num_samples, teacher_steps, seed=seed))

    print("[3/3] sample grid")
    grid_steps = [n for n in (1, 4) if n in served] or sweep_steps[:1]
    rows_images = [generate(teacher, GRID_COLUMNS, n, seed=seed + 1) for n in grid_steps]
    rows_images += [generate(student, GRID_COLUMNS, n, seed=seed + 1) for n in grid_steps]
    rows_images.append(generate(teacher, GRID_COLUMNS, teacher_steps, seed=seed + 1))
    save_grid(torch.cat(rows_images), out_dir / "grid.png", nrow=GRID_COLUMNS, upscale=4)

    print((out_dir / "sweep.md").read_text())
    print(f"teacher DDIM at {teacher_steps} steps: toy FID {reference:.4g}")
    labels = [f"teacher {n}" for n in grid_steps] + [f"student {n}" for n in grid_steps] + [f"teacher {teacher_steps}"]
    print(f"outputs in {out_dir}: student (diffusers folder) {out_dir / 'student'}; table {out_dir / 'sweep.md'}; "
          f"plot {out_dir / 'sweep.png'}; grid {out_dir / 'grid.png'} (rows: {', '.join(labels)}); "
          f"training run {out_dir / 'run'}")
    print(f"distillation {trained:.0f} s, total {time.perf_counter() - start:.0f} s")
    return rows + [{"curve": "teacher DDIM", "steps": teacher_steps, "toy_fid": reference}]
