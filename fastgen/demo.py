"""``fastgen demo``: distil a bundled toy teacher on CPU, evaluate it, export it, in minutes.

1. distil the toy teacher (``"toy"``: 16x16 shapes, linear-beta DDPM; or ``"toy-t2i"``: the text-conditioned
   Stable-Diffusion-style toy teacher) with the bundled preset ``toy_<method>``, one student per step count of
   ``student_steps`` (default: DMD, a one-step and a four-step student; a method whose student serves several
   counts, such as consistency, trains one), each a ``fastgen distill`` child process in ``OUT/run-<n>step``
   exporting to ``OUT/run-<n>step/export`` (``--resume auto``: a demo run again into the same ``OUT`` continues
   or reuses its students, and refuses, naming what differs, when the settings changed). Up to ``jobs``
   children run at once, one torch thread each (the toy networks gain little from more), and all share one cache
   (``OUT/cache``): a child starts once the one before it has begun training, so the teacher samples are
   generated once;
2. sweep toy FID of the students and of the teacher's DDIM at the same step counts
   (``OUT/sweep.{csv,md,png}``) and the teacher's many-step FID for reference; for ``"toy-t2i"`` both are
   sampled on the toy evaluation prompts (every shape x colour), the teacher with classifier-free guidance
   ``guidance_scale``, and the sweep also reports prompt accuracy (``fastgen.eval.toy_prompts``);
3. write ``OUT/grid.png``: rows of teacher DDIM and student samples from the same noise.

The default, DMD with its regression on teacher ODE pairs at a 1:1 critic ratio, is the method whose one-step
student is good after a few hundred steps on these teachers (docs/compare_methods.md, docs/dmd.md); the text
teacher is distilled on its own DDIM samples (data ``"teacher"``), drawn with the empty prompt, so the student
learns the teacher's unconditional distribution and starts from the teacher's prompt-following weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fastgen.config import DistillConfig, config_file, load_config
from fastgen.errors import UsageError, UserError
from fastgen.eval.evaluate import build_metrics
from fastgen.eval.sweep import run_sweep
from fastgen.eval.toy_fid import toy_fid
from fastgen.eval.toy_prompts import toy_eval_prompts
from fastgen.generate import generate, save_grid
from fastgen.teacher import Teacher, load_teacher
from fastgen.trainer import METRICS_FILE

GRID_COLUMNS = 12
TEACHERS = ("toy", "toy-t2i")
DEFAULTS = {"dmd": ((1, 4), 500)}
"""Per method, the student step counts the demo trains and the training steps of each, by default (a method not
listed: its preset's count and steps). DMD at 500 steps: toy FID 41.4 at one step and 14.9 at four
(docs/compare_methods.md, against the teacher's best 9.36)."""
CHILD = "import sys; sys.path.pop(0); from fastgen.cli import entry; entry()"
"""``python -c CHILD distill ...``: the installed fastgen, never a ``fastgen/`` folder in the working directory
(``python -m`` would put the working directory first on ``sys.path``: a checkout of fastgen is such a folder)."""


class DistillFailed(UserError):
    """A ``fastgen distill`` child of the demo exited non-zero; its own last line says why."""


def demo_runs(out_dir: Path, method: str, student_steps: Sequence[int] | None, teacher: str, seed: int,
              max_steps: int | None, overrides: Sequence[str] = ()) -> dict[int, tuple[list[str], int]]:
    """The ``fastgen distill`` overrides of every student the demo trains and its training steps, by step count,
    each checked by ``load_config`` before any child starts. A count other than the preset's drops the preset's
    timesteps, experts and phase boundaries (they are for its own count): the objective's default grid is used."""
    preset = config_file(f"toy_{method}")
    base = [f"seed={seed}", f"cache_dir={out_dir / 'cache'}"]
    if teacher == "toy-t2i":
        base += ["teacher=toy-t2i", "data=teacher"]
    default_counts, default_steps = DEFAULTS.get(method, (None, None))
    if (max_steps or default_steps) is not None:
        base.append(f"train.max_steps={max_steps or default_steps}")
    own = load_config(DistillConfig, preset, base + list(overrides)).student.num_steps
    runs = {}
    for n in student_steps or default_counts or (own,):
        run = base + [f"output={out_dir / f'run-{n}step'}", f"student.num_steps={n}"]
        if n != own:
            run += ["student.timesteps=null", "student.experts=1", "student.expert_boundaries=null"]
        run += list(overrides)
        runs[n] = run, load_config(DistillConfig, preset, run).train.max_steps
    return runs


def distill_all(out_dir: Path, preset: str, runs: dict[int, tuple[list[str], int]], jobs: int, threads: int) -> float:
    """Run ``fastgen distill --config preset`` for every run, up to ``jobs`` at once, each logging to
    ``OUT/distill-<n>step.log``; one progress bar over all their training steps (read from each run's
    ``metrics.jsonl``). Returns the wall time. The first child that fails stops the others."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    max_steps = {n: steps for n, (_, steps) in runs.items()}
    waiting, running, done = list(runs), {}, set()
    start = time.perf_counter()

    def started_training(n: int) -> bool:
        return (out_dir / f"run-{n}step" / METRICS_FILE).is_file()

    def progress(n: int) -> int:
        if n in done:
            return max_steps[n]
        path = out_dir / f"run-{n}step" / METRICS_FILE
        lines = path.read_text().splitlines() if path.is_file() else []
        return json.loads(lines[-1]).get("step", 0) if lines and lines[-1].endswith("}") else 0

    with tqdm(total=sum(max_steps.values()), desc="distill", unit="step") as bar:
        try:
            while waiting or running:
                if waiting and len(running) < jobs and all(started_training(n) for n in running):
                    n = waiting.pop(0)
                    log = open(out_dir / f"distill-{n}step.log", "w")
                    command = [sys.executable, "-c", CHILD, "distill", "--config", preset, "--resume", "auto",
                               *runs[n][0]]
                    running[n] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
                for n, (child, log) in list(running.items()):
                    if child.poll() is None:
                        continue
                    log.close()
                    del running[n]
                    if child.returncode != 0:
                        lines = (out_dir / f"distill-{n}step.log").read_text().splitlines()
                        last = next((line for line in reversed(lines) if line.startswith("error:")), "")
                        raise DistillFailed(f"the {n}-step student's run failed (exit {child.returncode}): "
                                            f"{last.removeprefix('error: ') or 'see its log'}; log: "
                                            f"{out_dir / f'distill-{n}step.log'}")
                    done.add(n)
                bar.n = sum(progress(n) for n in runs)
                state = {n: "done" if n in done else "running" if n in running else "queued" for n in runs}
                bar.set_postfix_str(", ".join(f"{n}-step {state[n]}" for n in runs))
                bar.refresh()
                time.sleep(0.5)
        finally:
            for child, log in running.values():
                child.kill()
                child.wait()
                log.close()
    return time.perf_counter() - start


def run_demo(out_dir: Path, method: str, max_steps: int | None = None, num_samples: int = 1000,
             steps: Sequence[int] = (1, 2, 4, 8), teacher_steps: int = 64, seed: int = 0, teacher: str = "toy",
             guidance_scale: float = 1.0, student_steps: Sequence[int] | None = None, jobs: int | None = None,
             threads: int = 1, overrides: Sequence[str] = ()) -> list[dict]:
    if teacher not in TEACHERS:
        raise UsageError(f"run_demo: teacher={teacher!r}, expected one of {list(TEACHERS)}")
    if guidance_scale != 1.0 and teacher != "toy-t2i":
        raise UsageError(f"run_demo: guidance_scale={guidance_scale} needs a text-conditioned teacher; "
                         f"teacher={teacher!r}, expected 'toy-t2i' or guidance_scale=1")
    start = time.perf_counter()
    out_dir = out_dir.resolve()
    runs = demo_runs(out_dir, method, student_steps, teacher, seed, max_steps, overrides)
    jobs = jobs or min(len(runs), os.cpu_count() or 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] distilling the {teacher} teacher with {method} into {', '.join(f'{n}-step' for n in runs)} "
          f"student(s), {jobs} at a time: {', '.join(str(out_dir / f'run-{n}step') for n in runs)}")
    trained = distill_all(out_dir, f"toy_{method}", runs, jobs, threads)

    prompts = toy_eval_prompts() if teacher == "toy-t2i" else None
    metrics = {"toy_fid": toy_fid}
    if prompts:
        metrics.update(build_metrics(["prompt_acc"], features="toy", prompts=prompts))
    teacher_model = load_teacher(teacher)
    students: dict[int, Teacher] = {}
    for n in runs:  # each count served by the student trained for it, else by one that serves it
        student = load_teacher(out_dir / f"run-{n}step" / "export")
        for count in student.pipeline.scheduler.step_counts:
            if count == n or count not in students:
                students[count] = student
    sweep_steps = [n for n in steps if n in students] or sorted(students)
    print(f"[2/3] {', '.join(metrics)} of student and teacher at {sweep_steps} steps, {num_samples} samples each")

    def sample_student(n: int, num: int = num_samples, offset: int = 0) -> torch.Tensor:
        return generate(students[n], num, n, seed=seed + offset, prompts=prompts)

    def sample_teacher(n: int, num: int = num_samples, offset: int = 0) -> torch.Tensor:
        return generate(teacher_model, num, n, seed=seed + offset, prompts=prompts, guidance_scale=guidance_scale)

    teacher_name = "teacher DDIM" if guidance_scale == 1.0 else f"teacher DDIM (guidance {guidance_scale:g})"
    rows = run_sweep({f"student ({method})": sample_student, teacher_name: sample_teacher}, sweep_steps, metrics,
                     out_dir)
    reference_images = sample_teacher(teacher_steps)
    reference = {name: metric(reference_images) for name, metric in metrics.items()}

    print("[3/3] sample grid")
    grid_steps = [n for n in (1, 4) if n in sweep_steps] or sweep_steps[:1]
    rows_images = [sample_teacher(n, GRID_COLUMNS, 1) for n in grid_steps]
    rows_images += [sample_student(n, GRID_COLUMNS, 1) for n in grid_steps]
    rows_images.append(sample_teacher(teacher_steps, GRID_COLUMNS, 1))
    save_grid(torch.cat(rows_images), out_dir / "grid.png", nrow=GRID_COLUMNS, upscale=4)

    print((out_dir / "sweep.md").read_text())
    print(f"{teacher_name} at {teacher_steps} steps: " + ", ".join(f"{k} {v:.4g}" for k, v in reference.items()))
    if prompts:
        print(f"grid columns are the prompts {prompts[:GRID_COLUMNS]}")
    labels = [f"teacher {n}" for n in grid_steps] + [f"student {n}" for n in grid_steps] + [f"teacher {teacher_steps}"]
    exports = ", ".join(f"{n}-step {out_dir / f'run-{n}step' / 'export'}" for n in runs)
    print(f"outputs in {out_dir}: students (diffusers folders) {exports}; table {out_dir / 'sweep.md'}; "
          f"plot {out_dir / 'sweep.png'}; grid {out_dir / 'grid.png'} (rows: {', '.join(labels)})")
    print(f"distillation {trained:.0f} s, total {time.perf_counter() - start:.0f} s")
    return rows + [{"curve": teacher_name, "steps": teacher_steps, **reference}]
