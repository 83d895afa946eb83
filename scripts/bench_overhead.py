"""Trainer overhead: time per step of ``fastgen.trainer.Trainer`` against a hand-written loop, side by side.

    python scripts/bench_overhead.py                      # toy teacher: consistency, progressive and DMD2
    python scripts/bench_overhead.py --profile            # also cProfile both loops (top functions by cumulative time)

Both loops train the same objective (``fastgen.losses.build_objective``) on their own copy of the same
teacher (``fastgen.assemble.make_student``) and their own copies of its other networks (DMD2's fake score and
GAN head), on the same ``DataSource`` batches, in fp32 on the CPU. Several-phase objectives run each phase
due at a step (DMD2: the critic every step, the generator every fifth), with the networks a phase does not
own set to ``requires_grad=False`` while it runs in both loops.

- Trainer: ``Trainer(config).fit()`` as a user runs it: accelerate, ``fastgen.step.run_phase`` per phase (the
  owned-networks switch, one finiteness check, clipping, the lr schedule), metrics.jsonl written every step
  (``train.log_every=1``: window averages, lr, throughput, peak memory), the progress bar, EMA (diffusers'
  ``EMAModel``), the non-finite guard, per-step re-seeding; one checkpoint, at the end, which is not timed.
- Hand-written: ``loss = phase.loss(batch, step)["loss"]``, ``loss.backward()``, ``clip_grad_norm_``, a plain
  ``torch.optim.AdamW`` step, ``zero_grad``, the student's EMA by the same rule as ``EMAModel``
  (decay ``min(ema_decay, (1 + n) / (10 + n))``, 0 at the first step) as one ``torch._foreach_lerp_``, and
  ``objective.on_step_end``; no accelerate, no logging, no checkpoints.

What is timed: one step is the interval between the ends of two consecutive ``objective.on_step_end`` calls,
i.e. one full iteration of ``Trainer.fit``'s loop (re-seeding, ``run_phase``, ``on_step_end``, the step
counter, progress bar, metrics line and tracker call) or of the hand-written loop. The two alternate inside
one ``fit()``: after every ``--block-steps`` trainer steps, ``--block-steps`` hand-written steps run (the
clock restarts after them), so machine noise hits both alike. The first ``--warmup`` steps of each are not
timed. Two clocks: wall (``time.perf_counter``) and this process's CPU time (``time.process_time``); with
one torch thread all the work runs on the calling thread, so the CPU clock leaves out the time spent waiting
for a core that other processes hold and is the steadier figure on a shared machine. Reported per method
and clock: the median step of each loop, their ratio, and the spread of the per-block ratios (median of
trainer block i over median of the hand-written block that follows it); also the median minor page faults
per step of each loop (``getrusage``), which expose glibc returning freed heap to the OS between steps
(see docs/benchmarks.md; ``MALLOC_*`` variables and ``LD_PRELOAD`` are recorded with the results).
Results go to ``--out`` (JSON) and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastgen.assemble import make_student, student_schedule
from fastgen.config import DistillConfig, config_from_dict
from fastgen.denoiser import Denoiser
from fastgen.losses import build_objective
from fastgen.networks import NetworkFactory, trainable_parameters
from fastgen.trainer import Trainer

CLOCKS = ("wall", "cpu")
COUNTERS = (*CLOCKS, "minor_faults")
LOOP_MACHINERY = (r"trainer\.py|step\.py|assemble\.py|policies\.py|bench_overhead\.py|training_utils\.py|"
                  r"accelerate/|tqdm/|json/|clip_grad|random\.py|optimizer\.py|_foreach|manual_seed|isfinite|\.item|"
                  r"method 'write'|built-in method io\.open")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="toy",
                   help="teacher diffusers folder; 'toy': the bundled toy teacher (default: %(default)s)")
    p.add_argument("--methods", default="consistency,progressive,dmd2",
                   help="comma-separated objectives (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps of each loop before the first block (default: %(default)s)")
    p.add_argument("--blocks", type=int, default=30,
                   help="timed blocks of each loop, alternating (default: %(default)s)")
    p.add_argument("--block-steps", type=int, default=10, help="steps per block (default: %(default)s)")
    p.add_argument("--teacher-samples", type=int, default=256,
                   help="teacher samples in the data cache (default: %(default)s)")
    p.add_argument("--teacher-sample-steps", type=int, default=8,
                   help="DDIM steps of those samples (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, help="where the run folders go (default: a temporary folder, removed)")
    p.add_argument("--out", type=Path, default=Path("docs/bench_overhead.json"),
                   help="results file, JSON (default: %(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile both loops' timed steps and print the top functions (timings of a profiled run "
                        "are skewed, so --out is not written)")
    return p.parse_args(argv)


def distill_config(args, method: str, run_dir: Path) -> DistillConfig:
    return config_from_dict(DistillConfig, {
        "teacher": args.teacher, "method": method, "output": str(run_dir), "data": "teacher", "seed": args.seed,
        "teacher_samples": args.teacher_samples, "teacher_sample_steps": args.teacher_sample_steps,
        "train": {"max_steps": args.warmup + args.blocks * args.block_steps, "batch_size": args.batch_size,
                  "log_every": 1, "checkpoint_every": 0, "sample_every": 0, "mixed_precision": "no"},
    })


class HandLoop:
    """The trainer's objective on a fresh student copy (and fresh copies of its other networks), trained by a
    plain PyTorch loop: per phase, the networks it does not own have ``requires_grad`` off while it runs."""

    def __init__(self, trainer: Trainer):
        config, teacher = trainer.config, trainer.teacher
        self.train = config.train
        schedule = student_schedule(teacher.schedule, trainer.plan.prediction_type)
        self.student = Denoiser(make_student(teacher.model, config, trainer.plan, schedule), schedule)
        factory = NetworkFactory(teacher, source=teacher.model)
        self.objective = build_objective(config.method, teacher, self.student, config.objective,
                                         config.student.num_steps, config.student.timesteps, config.train.max_steps,
                                         factory=factory)
        assert self.objective.plan.timesteps == trainer.plan.timesteps  # both loops train the same plan
        self.phases = self.objective.phases()
        self.data = trainer.run.data
        nets = {"student": self.student, **self.objective.networks()}
        self.params = {name: trainable_parameters(net) for name, net in nets.items()}
        t = self.train
        self.owned = {ph.name: ph.networks for ph in self.phases}
        self.opts = {ph.name: torch.optim.AdamW([p for n in ph.networks for p in self.params[n]], lr=ph.lr or t.lr,
                                                betas=t.betas, weight_decay=t.weight_decay) for ph in self.phases}
        self.ema = [p.detach().clone() for p in self.params["student"]]
        self.batches = 0
        self.step = 0

    def set_grad(self, phase: str, on: bool) -> None:
        for name, params in self.params.items():
            if name not in self.owned[phase]:
                for p in params:
                    p.requires_grad_(on)

    def run(self, steps: int, stamps: list[tuple[float, float, int]]) -> None:
        """Train ``steps`` steps, appending the clock after each to ``stamps``."""
        t = self.train
        for _ in range(steps):
            for phase in self.phases:
                if not phase.runs_at(self.step):
                    continue
                self.set_grad(phase.name, False)
                loss = phase.loss(self.data.batch(self.batches), self.step)["loss"]
                self.batches += 1
                loss.backward()
                self.set_grad(phase.name, True)
                opt = self.opts[phase.name]
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if "student" in phase.networks:
                    decay = 0.0 if self.step == 0 else min(t.ema_decay, (1 + self.step) / (10 + self.step))
                    with torch.no_grad():
                        torch._foreach_lerp_(self.ema, self.params["student"], 1.0 - decay)
            self.objective.on_step_end(self.step)
            self.step += 1
            stamps.append(clock())


def clock() -> tuple[float, float, int]:
    """Wall and CPU seconds of this process, and its minor page faults so far."""
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def intervals(stamps: list[tuple[float, float, int]]) -> dict[str, list[float]]:
    """Per-step differences between consecutive stamps, for each counter."""
    return {name: [b[i] - a[i] for a, b in zip(stamps, stamps[1:])] for i, name in enumerate(COUNTERS)}


def bench_method(args, method: str, run_dir: Path) -> dict:
    """Run ``fit()`` with the hand-written loop's blocks interleaved; summarise the per-step times."""
    trainer = Trainer(distill_config(args, method, run_dir))
    hand = HandLoop(trainer)
    blocks: dict[str, list[dict[str, list[float]]]] = {"trainer": [], "hand-written": []}
    profiles = {name: cProfile.Profile() for name in blocks} if args.profile else {}
    stamps = [clock()]
    objective_step_end = trainer.objective.on_step_end

    def on_step_end(step: int) -> None:
        objective_step_end(step)
        stamps.append(clock())
        done = step + 1
        if done < args.warmup or (done - args.warmup) % args.block_steps:
            return
        warming_up = done == args.warmup
        if not warming_up:
            if profiles:
                profiles["trainer"].disable()
            blocks["trainer"].append(intervals(stamps))
            if profiles:
                profiles["hand-written"].enable()
        hand_stamps = [clock()]
        hand.run(args.warmup if warming_up else args.block_steps, hand_stamps)
        if not warming_up:
            if profiles:
                profiles["hand-written"].disable()
            blocks["hand-written"].append(intervals(hand_stamps))
        if profiles and done < trainer.config.train.max_steps:
            profiles["trainer"].enable()
        stamps[:] = [clock()]

    trainer.objective.on_step_end = on_step_end
    trainer.fit()
    result = {name: summarize([b[name] for b in blocks["trainer"]], [b[name] for b in blocks["hand-written"]])
              for name in CLOCKS}
    result["minor_faults_per_step"] = {loop: statistics.median(n for b in loop_blocks for n in b["minor_faults"])
                                       for loop, loop_blocks in blocks.items()}
    if profiles:
        result["profiles"] = {name: top_functions(profile) for name, profile in profiles.items()}
    return result


def summarize(trainer_blocks: list[list[float]], hand_blocks: list[list[float]]) -> dict:
    """Medians in ms, the ratio of the medians, and the spread of the per-block ratios."""
    trainer_ms = 1e3 * statistics.median(s for block in trainer_blocks for s in block)
    hand_ms = 1e3 * statistics.median(s for block in hand_blocks for s in block)
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(trainer_blocks, hand_blocks)]
    return {
        "trainer_ms_per_step": round(trainer_ms, 3),
        "hand_written_ms_per_step": round(hand_ms, 3),
        "overhead_ms_per_step": round(trainer_ms - hand_ms, 3),
        "ratio": round(trainer_ms / hand_ms, 4),
        # the mean weighs every step: with a critic ratio (DMD2's 5:1) the median is a critic-only step
        "mean_ratio": round(statistics.mean(s for b in trainer_blocks for s in b)
                            / statistics.mean(s for b in hand_blocks for s in b), 4),
        "block_ratios": [round(r, 4) for r in ratios],
        "block_ratio_median": round(statistics.median(ratios), 4),
        "block_ratio_min": round(min(ratios), 4),
        "block_ratio_max": round(max(ratios), 4),
        "timed_steps_each": sum(map(len, trainer_blocks)),
    }


def top_functions(profile: cProfile.Profile) -> str:
    """The top functions by cumulative time, then those of the loop machinery (not the objective's compute)."""
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
    stats.print_stats(15)
    stats.print_stats(LOOP_MACHINERY, 30)
    return out.getvalue()


def markdown_table(results: dict) -> str:
    lines = ["| method | clock | trainer ms/step | hand-written ms/step | overhead ms/step | ratio | "
             "block ratios: median [min, max] | ratio of the means | minor page faults/step: trainer, hand-written |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for method, by_clock in results.items():
        faults = by_clock["minor_faults_per_step"]
        for name in CLOCKS:
            r = by_clock[name]
            lines.append(f"| {method} | {name} | {r['trainer_ms_per_step']:.1f} | "
                         f"{r['hand_written_ms_per_step']:.1f} | "
                         f"{r['overhead_ms_per_step']:.2f} | {r['ratio']:.3f} | {r['block_ratio_median']:.3f} "
                         f"[{r['block_ratio_min']:.3f}, {r['block_ratio_max']:.3f}] | {r['mean_ratio']:.3f} | "
                         f"{faults['trainer']:.0f}, {faults['hand-written']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_overhead-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        for method in args.methods.split(","):
            results[method] = bench_method(args, method, work_dir / method)
    for method, r in results.items():
        for name, text in r.pop("profiles", {}).items():
            print(f"--- {method}, {name}: top functions by cumulative time over the timed steps\n{text}")
    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "profile"},
        "results": results,
    }
    print(markdown_table(results))
    if not args.profile:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
