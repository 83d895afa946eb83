"""``fastgen demo``: distil a bundled toy teacher on CPU, evaluate it, export it, in minutes.

1. distil the toy teacher (``"toy"``: 16x16 shapes, linear-beta DDPM; or ``"toy-t2i"``: the text-conditioned
   Stable-Diffusion-style toy teacher) with a bundled preset (``toy_consistency`` or ``toy_progressive``)
   into ``OUT/run``, exporting the student to ``OUT/student``;
2. sweep toy FID of the student and of the teacher's DDIM at the same step counts
   (``OUT/sweep.{csv,md,png}``) and the teacher's many-step FID for reference; for ``"toy-t2i"`` both are
   sampled on the toy evaluation prompts (every shape x colour), the teacher with classifier-free guidance
   ``guidance_scale``, and the sweep also reports prompt accuracy (``fastgen.eval.toy_prompts``);
3. write ``OUT/grid.png``: rows of teacher DDIM and student samples from the same noise.

The text teacher is distilled on its own DDIM samples (data ``"teacher"``), which ``fastgen.data`` draws
with the empty prompt: the student learns the teacher's unconditional distribution and starts from the
teacher's prompt-following weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from fastgen.config import DistillConfig, config_file, load_config
from fastgen.errors import UsageError
from fastgen.eval.evaluate import build_metrics
from fastgen.eval.sweep import run_sweep
from fastgen.eval.toy_fid import toy_fid
from fastgen.eval.toy_prompts import toy_eval_prompts
from fastgen.generate import generate, save_grid
from fastgen.teacher import load_teacher
from fastgen.trainer import Trainer

GRID_COLUMNS = 12
TEACHERS = ("toy", "toy-t2i")


def run_demo(out_dir: Path, method: str = "consistency", max_steps: int | None = None, num_samples: int = 1000,
             steps: Sequence[int] = (1, 2, 4, 8), teacher_steps: int = 64, seed: int = 0, teacher: str = "toy",
             guidance_scale: float = 1.0) -> list[dict]:
    if teacher not in TEACHERS:
        raise UsageError(f"run_demo: teacher={teacher!r}, expected one of {list(TEACHERS)}")
    if guidance_scale != 1.0 and teacher != "toy-t2i":
        raise UsageError(f"run_demo: guidance_scale={guidance_scale} needs a text-conditioned teacher; "
                         f"teacher={teacher!r}, expected 'toy-t2i' or guidance_scale=1")
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"output={out_dir / 'run'}", f"seed={seed}"]
    if teacher == "toy-t2i":
        overrides += ["teacher=toy-t2i", "data=teacher"]
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    config = load_config(DistillConfig, config_file(f"toy_{method}"), overrides)
    print(f"[1/3] distilling the {teacher} teacher with {method} ({config.train.max_steps} steps) into "
          f"{out_dir / 'run'}")
    trainer = Trainer(config)
    trainer.fit()
    trainer.export(out_dir / "student")
    trained = time.perf_counter() - start

    prompts = toy_eval_prompts() if teacher == "toy-t2i" else None
    metrics = {"toy_fid": toy_fid}
    if prompts:
        metrics.update(build_metrics(["prompt_acc"], features="toy", prompts=prompts))
    print(f"[2/3] {', '.join(metrics)} of student and teacher at {list(steps)} steps, {num_samples} samples each")
    teacher_model = load_teacher(teacher)
    student = load_teacher(out_dir / "student")
    served = student.pipeline.scheduler.step_counts
    sweep_steps = [n for n in steps if n in served]

    def sample_student(n: int, num: int = num_samples, offset: int = 0) -> torch.Tensor:
        return generate(student, num, n, seed=seed + offset, prompts=prompts)

    def sample_teacher(n: int, num: int = num_samples, offset: int = 0) -> torch.Tensor:
        return generate(teacher_model, num, n, seed=seed + offset, prompts=prompts, guidance_scale=guidance_scale)

    teacher_name = "teacher DDIM" if guidance_scale == 1.0 else f"teacher DDIM (guidance {guidance_scale:g})"
    rows = run_sweep({f"student ({method})": sample_student, teacher_name: sample_teacher}, sweep_steps, metrics,
                     out_dir)
    reference_images = sample_teacher(teacher_steps)
    reference = {name: metric(reference_images) for name, metric in metrics.items()}

    print("[3/3] sample grid")
    grid_steps = [n for n in (1, 4) if n in served] or sweep_steps[:1]
    rows_images = [sample_teacher(n, GRID_COLUMNS, 1) for n in grid_steps]
    rows_images += [sample_student(n, GRID_COLUMNS, 1) for n in grid_steps]
    rows_images.append(sample_teacher(teacher_steps, GRID_COLUMNS, 1))
    save_grid(torch.cat(rows_images), out_dir / "grid.png", nrow=GRID_COLUMNS, upscale=4)

    print((out_dir / "sweep.md").read_text())
    print(f"{teacher_name} at {teacher_steps} steps: " + ", ".join(f"{k} {v:.4g}" for k, v in reference.items()))
    if prompts:
        print(f"grid columns are the prompts {prompts[:GRID_COLUMNS]}")
    labels = [f"teacher {n}" for n in grid_steps] + [f"student {n}" for n in grid_steps] + [f"teacher {teacher_steps}"]
    print(f"outputs in {out_dir}: student (diffusers folder) {out_dir / 'student'}; table {out_dir / 'sweep.md'}; "
          f"plot {out_dir / 'sweep.png'}; grid {out_dir / 'grid.png'} (rows: {', '.join(labels)}); "
          f"training run {out_dir / 'run'}")
    print(f"distillation {trained:.0f} s, total {time.perf_counter() - start:.0f} s")
    return rows + [{"curve": teacher_name, "steps": teacher_steps, **reference}]
