"""``fastgen demo``: the bundled toy teacher sampled at few and many steps, scored by toy FID.

It writes ``sweep.csv`` / ``sweep.md`` / ``sweep.png`` (toy FID against the number of DDIM steps) and
``grid.png`` (rows: 1, 4 and 64 steps): the gap a few-step student must close.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from fastgen.eval.sweep import run_sweep
from fastgen.eval.toy_fid import toy_fid
from fastgen.generate import generate, save_grid
from fastgen.teacher import load_teacher
from fastgen.toy import toy_teacher_path

GRID_STEPS = (1, 4, 64)
GRID_COLUMNS = 12


def teacher_step_sweep(out_dir: Path, num_samples: int, steps: Sequence[int], seed: int = 0) -> list[dict]:
    """Toy FID of the toy teacher's DDIM samples at each step count; writes the sweep files and grid."""
    teacher = load_teacher(toy_teacher_path())
    rows = run_sweep({"teacher DDIM": lambda n: generate(teacher, num_samples, n, seed=seed)},
                     steps, {"toy_fid": toy_fid}, out_dir)
    grid = torch.cat([generate(teacher, GRID_COLUMNS, n, seed=seed) for n in GRID_STEPS])
    save_grid(grid, out_dir / "grid.png", nrow=GRID_COLUMNS, upscale=4)
    return rows


def run_demo(out_dir: Path, num_samples: int = 1000, steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
             seed: int = 0) -> list[dict]:
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = teacher_step_sweep(out_dir, num_samples, steps, seed)
    print((out_dir / "sweep.md").read_text())
    print(f"toy teacher: toy FID against DDIM steps in {out_dir / 'sweep.md'} (plot: {out_dir / 'sweep.png'}); "
          f"samples at {', '.join(map(str, GRID_STEPS))} steps in {out_dir / 'grid.png'}; "
          f"{time.perf_counter() - start:.0f} s")
    return rows
