"""DMD2 at real size on one GPU: peak memory, step time and MFU per memory mode, sampling throughput,
SDPA against xformers, fp16 with loss scaling against bf16.

    python scripts/bench_gpu.py            # one GPU (H200 in docs/bench_gpu.md): about 8 minutes
    python scripts/bench_gpu.py --tiny     # tiny versions of the same configs on the CPU: checks the script

Networks are the bundled real-size configs (``fastgen/assets/real_size``: SD1.5's UNet, 860 M parameters,
at 64×64 latents; SDXL's, 2.6 B, at 128×128) with random weights: speed and memory do not depend on the
values. Each run is built as the trainer builds it (``fastgen.assemble.build_run``: teacher at the run's
precision, float32 student and fake score, the objective's GAN head) and trained by the trainer's step
(``fastgen.step.run_phase`` with its one-process ``PlainBackend``: phase ownership, autocast, backward,
clipping, AdamW, EMA), without accelerate. Sections:

1. **Peak matmul**: a large square bf16 matmul, the denominator of MFU (measured here, not a data sheet).
2. **DMD2 training** per memory mode (full fake score; LoRA fake score on the shared base; + gradient
   checkpointing; + LoRA student), bf16: one generator and one critic update per timed iteration (the run's
   5:1 or 10:1 ratio weights them when it trains); peak ``torch.cuda.max_memory_allocated`` beside
   ``fastgen estimate``'s figure for the same settings; model FLOPs of the iteration counted by
   ``torch.utils.flop_counter.FlopCounterMode``; MFU = FLOPs / time / peak matmul FLOP/s.
3. **Sampling**: the teacher's 50 DDIM steps with classifier-free guidance (two network calls per step,
   one batched call) against the student's one step, same batch; with and without the VAE decode.
4. **Attention**: the full-fake-score training iteration with SDPA and with xformers (when it imports).
5. **fp16 against bf16**: 50 training iterations each (fp16: float32 master weights, fp16 autocast and
   ``torch.amp.GradScaler``, as accelerate runs ``mixed_precision=fp16``): losses side by side, finiteness.

Writes ``--out`` (JSON) and ``--md`` (Markdown tables). ``--tiny`` runs shrunken configs (a 2-level UNet,
8×8 latents, no VAE) on the CPU: the figures only show that every section runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.assemble import build_run, weight_dtype
from fastgen.config import DistillConfig, config_from_dict
from fastgen.estimate import (ConfigTeacher, TeacherSpec, build_network, estimate_memory, real_size_folder,
                              synthetic_batch, with_overrides)
from fastgen.samplers.solvers import Guidance, sample_ddim, sample_renoise
from fastgen.schedules import schedule_from_config
from fastgen.step import PlainBackend, run_phase

NETWORKS = {"sd15": {"batch": 8, "guidance": 1.75}, "sdxl": {"batch": 1, "guidance": 8.0}}
"""Real-size config, training batch (SDXL: batch 1 at 1024², the 24 GiB goal) and the DMD2 guidance of its preset."""
MODES = {
    "full fake score": [],
    "LoRA fake score": ["objective.fake_lora_rank=64"],
    "LoRA fake + checkpointing": ["objective.fake_lora_rank=64", "train.gradient_checkpointing=true"],
    "LoRA fake + checkpointing + LoRA student": ["objective.fake_lora_rank=64", "train.gradient_checkpointing=true",
                                                  "student.lora_rank=64"],
}
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
             "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "sample_size": 8,
             "transformer_layers_per_block": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (checks the script runs)")
    p.add_argument("--networks", default="sd15,sdxl", help="real-size configs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed training iterations per mode (default: %(default)s)")
    p.add_argument("--precision-steps", type=int, default=50,
                   help="iterations of the fp16 / bf16 comparison (default: %(default)s)")
    p.add_argument("--sample-batch", type=int, default=4, help="batch of the sampling section (default: %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=50,
                   help="the teacher's DDIM steps in the sampling section (default: %(default)s)")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip fastgen estimate's figure beside each mode (its fake-tensor simulation is slow on a CPU)")
    p.add_argument("--out", type=Path,
                   help="JSON results (default: docs/bench_gpu.json, --tiny: docs/bench_gpu_tiny.json)")
    p.add_argument("--md", type=Path, help="Markdown tables (default: beside --out, .md)")
    args = p.parse_args(argv)
    args.out = args.out or Path("docs/bench_gpu_tiny.json" if args.tiny else "docs/bench_gpu.json")
    args.md = args.md or args.out.with_suffix(".md")
    return args


def tiny_folder(name: str, root: Path) -> Path:
    """A copy of the real-size config ``name`` with a 2-level UNet and no VAE or text encoders."""
    src, dst = real_size_folder(name), root / name
    (dst / "unet").mkdir(parents=True)
    (dst / "scheduler").mkdir()
    index = json.loads((src / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if k in ("_class_name", "_diffusers_version", "scheduler", "unet")}
    (dst / "model_index.json").write_text(json.dumps(index))
    (dst / "scheduler" / "scheduler_config.json").write_text((src / "scheduler" / "scheduler_config.json").read_text())
    unet = {**json.loads((src / "unet" / "config.json").read_text()), **TINY_UNET}
    if unet.get("addition_embed_type") == "text_time":  # SDXL: pooled text (32 here) + 6 time ids of 8
        unet.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                    attention_head_dim=[4, 8], transformer_layers_per_block=[1, 1])
    (dst / "unet" / "config.json").write_text(json.dumps(unet))
    return dst


class Clock:
    """Wall time of device work (synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, repeat: int) -> list[float]:
        out = []
        for _ in range(repeat):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - start)
        return out


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def peak_matmul(device, dtype, clock: Clock, n: int) -> float:
    """FLOP/s of an ``n × n`` matmul in ``dtype`` (best of 10)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(clock.time(lambda: a @ b, 10))
    return 2 * n**3 / best


def run_config(teacher: str, batch: int, guidance: float, overrides: list[str], precision: str = "bf16",
               attention: str = "sdpa") -> DistillConfig:
    base = config_from_dict(DistillConfig, {
        "teacher": teacher, "method": "dmd2", "output": "unused", "seed": 0,
        "train": {"batch_size": batch, "mixed_precision": precision, "ema_decay": None, "attention": attention,
                  "grad_clip": 10.0, "lr": 1e-6},
        "objective": {"guidance_scale": guidance},
    })
    return with_overrides(base, overrides)


class Run:
    """One DMD2 run built on the device: its networks, optimizers and a fixed batch."""

    def __init__(self, config: DistillConfig, device: torch.device):
        self.config, self.device = config, device
        spec = TeacherSpec.read(config.teacher)
        self.spec = spec
        schedule = schedule_from_config(spec.scheduler_config, spec.scheduler_class)
        self.dtype = weight_dtype(config.train.mixed_precision)
        shape = spec.sample_shape()
        source = build_network(spec.folder, device)
        teacher = ConfigTeacher(spec, build_network(spec.folder, device, self.dtype).requires_grad_(False).eval(),
                                shape, schedule)
        self.run = build_run(config, teacher, source, device=device)
        self.teacher, self.objective, self.nets, self.trainable = teacher, self.run.objective, self.run.nets, \
            self.run.trainable
        self.batch = synthetic_batch(self.teacher, config.train.batch_size, shape).to(device)
        scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.backend = PlainBackend(self.dtype, device.type, scaler)

    def iteration(self) -> dict[str, float]:
        """One update of every phase; the losses."""
        losses = {}
        for ph in self.run.phases:
            terms, _ = run_phase(self.run, ph, itertools.repeat(self.batch), 0, self.backend,
                                 grad_clip=self.config.train.grad_clip)
            losses[ph.name] = float(terms["loss"])
        return losses

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.iteration()
        return counter.get_total_flops()


def bench_training(name, folder, device, clock, args, peak_flops) -> list[dict]:
    rows = []
    setting = NETWORKS[name]
    batch = 2 if args.tiny else setting["batch"]
    for mode, overrides in MODES.items():
        config = run_config(str(folder), batch, setting["guidance"], overrides)
        row = {"network": name, "mode": mode, "overrides": overrides, "batch": batch}
        row["estimate_bytes"] = None
        try:
            if not args.no_estimate:
                row["estimate_bytes"] = estimate_memory(copy.deepcopy(config), device=device.type).total_bytes
        except Exception as e:  # the estimate is reported beside the measurement, not needed by it
            row["estimate_error"] = repr(e)
        free(device)
        try:
            run = Run(config, device)
            row["parameters"] = {n: sum(p.numel() for p in ps) for n, ps in run.trainable.items()}
            run.iteration()  # allocates gradients and optimizer states
            times = clock.time(run.iteration, args.steps)
            row["iteration_s"] = statistics.median(times)
            row["peak_bytes"] = peak_bytes(device)
            row["flops"] = run.flops()
            row["mfu"] = row["flops"] / row["iteration_s"] / peak_flops
            del run
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        free(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_sampling(name, folder, device, clock, args) -> dict:
    config = run_config(str(folder), args.sample_batch, NETWORKS[name]["guidance"], [])
    free(device)
    run = Run(config, device)
    teacher, student = run.teacher, run.nets["student"]
    student.model.to(run.dtype)
    n, shape = args.sample_batch, run.spec.sample_shape()
    cond, uncond = run.batch.cond, run.batch.uncond
    z = torch.randn(n, *shape, device=device, dtype=run.dtype)
    ts = teacher.schedule.timesteps(args.teacher_steps).tolist()
    guidance = Guidance(uncond, NETWORKS[name]["guidance"])
    out = {"network": name, "batch": n, "teacher_steps": args.teacher_steps,
           "student_timesteps": list(run.run.plan.timesteps)}
    with torch.no_grad():
        out["teacher_steps_s"] = statistics.median(clock.time(
            lambda: sample_ddim(teacher.denoiser, z, ts, cond=cond, guidance=guidance), 2))
        out["student_1_step_s"] = statistics.median(clock.time(
            lambda: sample_renoise(student, z, run.objective.timesteps, cond=cond), 10))
        if "vae" in run.spec.others:
            import diffusers

            _, cls, vae_config = run.spec.others["vae"]
            with torch.device(device):
                vae = getattr(diffusers, cls).from_config(vae_config).to(run.dtype)
            out["vae_decode_s"] = statistics.median(clock.time(lambda: vae.decode(z).sample, 3))
            del vae
    decode = out.get("vae_decode_s", 0.0)
    out["speedup_denoiser"] = out["teacher_steps_s"] / out["student_1_step_s"]
    out["speedup_with_decode"] = (out["teacher_steps_s"] + decode) / (out["student_1_step_s"] + decode)
    out["student_images_per_s"] = n / (out["student_1_step_s"] + decode)
    out["teacher_images_per_s"] = n / (out["teacher_steps_s"] + decode)
    print(json.dumps(out), flush=True)
    return out  # the run is freed with this frame; the next section starts with free()


def bench_attention(name, folder, device, clock, args) -> dict:
    out = {"network": name}
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        out["xformers"] = f"not installed ({e})"
    backends = ["sdpa"] + ([] if "xformers" in out else ["xformers"])
    for attention in backends:
        free(device)
        run = Run(run_config(str(folder), 2 if args.tiny else NETWORKS[name]["batch"], NETWORKS[name]["guidance"],
                             [], attention=attention), device)
        run.iteration()
        out[f"{attention}_iteration_s"] = statistics.median(clock.time(run.iteration, args.steps))
        out[f"{attention}_peak_bytes"] = peak_bytes(device)
        del run
    free(device)
    print(json.dumps(out), flush=True)
    return out


def bench_precision(name, folder, device, args) -> dict:
    out = {"network": name, "batch": 2, "steps": args.precision_steps}
    for precision in ("bf16", "fp16"):
        free(device)
        torch.manual_seed(0)
        run = Run(run_config(str(folder), 2, NETWORKS[name]["guidance"], ["objective.fake_lora_rank=64"],
                             precision=precision), device)
        curve = [run.iteration() for _ in range(args.precision_steps)]
        out[precision] = {phase: [c[phase] for c in curve] for phase in curve[0]}
        out[f"{precision}_finite"] = all(torch.isfinite(torch.tensor(v)).all().item() for v in out[precision].values())
        if run.backend.scaler is not None:
            out["fp16_final_loss_scale"] = float(run.backend.scaler.get_scale())
        del run
    free(device)
    print(json.dumps({k: v for k, v in out.items() if k not in ("bf16", "fp16")}), flush=True)
    return out


def gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}; peak {report['peak_dtype']} matmul "
             f"{report['peak_flops'] / 1e12:.1f} TFLOP/s (measured).", "",
             "| network | mode | batch | peak GiB (measured) | estimate GiB | iteration s (G + D) | TFLOP / iter "
             "| MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["training"]:
        if "error" in r:
            lines.append(f"| {r['network']} | {r['mode']} | {r['batch']} | {r['error']} | "
                         f"{gib(r.get('estimate_bytes'))} | — | — | — |")
            continue
        lines.append(f"| {r['network']} | {r['mode']} | {r['batch']} | {gib(r['peak_bytes'])} | "
                     f"{gib(r.get('estimate_bytes'))} | {r['iteration_s']:.3f} | {r['flops'] / 1e12:.2f} | "
                     f"{100 * r['mfu']:.1f} % |")
    lines += ["", "| network | batch | teacher steps | teacher with CFG (s) | student 1 step (s) | VAE decode (s) | "
              "speed-up, denoiser | speed-up, with decode |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["sampling"]:
        lines.append(f"| {s['network']} | {s['batch']} | {s['teacher_steps']} | {s['teacher_steps_s']:.3f} | "
                     f"{s['student_1_step_s']:.4f} | "
                     f"{s.get('vae_decode_s', float('nan')):.3f} | {s['speedup_denoiser']:.1f}× | "
                     f"{s['speedup_with_decode']:.1f}× |")
    a = report["attention"]
    xformers = (f", xformers {a['xformers_iteration_s']:.3f} s" if "xformers_iteration_s" in a
                else f"; xformers {a['xformers']}")
    lines += ["", f"Attention ({a['network']}, full fake score): SDPA {a['sdpa_iteration_s']:.3f} s/iteration"
              f"{xformers}"]
    p = report["precision"]
    lines += ["", f"Precision ({p['network']}, LoRA fake score, batch {p['batch']}, {p['steps']} iterations): bf16 "
              f"finite {p['bf16_finite']}, fp16 finite {p['fp16_finite']}, final fp16 loss scale "
              f"{p.get('fp16_final_loss_scale')}", "", "| iteration | bf16 generator | fp16 generator | bf16 critic | "
              "fp16 critic |", "|---:|---:|---:|---:|---:|"]
    for i in range(0, p["steps"], max(1, p["steps"] // 10)):
        lines.append(f"| {i} | {p['bf16']['generator'][i]:.4g} | {p['fp16']['generator'][i]:.4g} | "
                     f"{p['bf16']['critic'][i]:.4g} | {p['fp16']['critic'][i]:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("error: no GPU; run with --tiny to check the script on the CPU")
    clock = Clock(device)
    names = args.networks.split(",")
    with tempfile.TemporaryDirectory() if args.tiny else contextlib.nullcontext() as tmp:
        folders = {n: tiny_folder(n, Path(tmp)) if args.tiny else real_size_folder(n) for n in names}
        peak_dtype = torch.bfloat16
        report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  "torch": torch.__version__, "tiny": args.tiny, "peak_dtype": "bf16",
                  "peak_flops": peak_matmul(device, peak_dtype, clock, 512 if args.tiny else 8192)}
        report["training"] = [row for n in names for row in bench_training(n, folders[n], device, clock, args,
                                                                             report["peak_flops"])]
        report["sampling"] = [bench_sampling(n, folders[n], device, clock, args) for n in names]
        report["attention"] = bench_attention(names[0], folders[names[0]], device, clock, args)
        report["precision"] = bench_precision(names[0], folders[names[0]], device, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.md.write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out} and {args.md}")


if __name__ == "__main__":
    main()
