"""The ``fastgen`` command: ``demo``, ``distill``, ``sample``, ``eval``, ``export``, ``estimate``.

A mistake in the input (a path, a file, a flag, a config value, a missing optional package) prints one line,
``error: <message>``, on stderr and exits with status 2 for usage errors (as argparse does) or 1 otherwise;
``--debug`` (or ``FASTGEN_DEBUG=1``) shows the traceback. Any other exception is a bug: its traceback is
printed with one line saying so. ``distill`` stopped by SIGTERM or SIGINT writes a checkpoint, prints
``stopped at step N by SIGTERM; resume with: <command>`` and exits with 143 or 130, as a shell reports them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import traceback
from pathlib import Path

from fastgen.errors import USER_ERRORS, MissingPathError, UsageError, check_output_path, describe


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error of the command."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


# --lora-format is checked against fastgen.pipelines.export.LORA_FORMATS when the command runs (_lora): importing
# that module to build the parser would double the start-up time of every fastgen command
LORA_FORMAT_HELP = ("layout of the --lora file: peft (default; diffusers' pytorch_lora_weights.safetensors) or kohya "
                    "(lora_kohya.safetensors for ComfyUI and AUTOMATIC1111; UNet teachers: SD, SDXL)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str, minimum: int = 1, what: str = "positive step counts like 1,2,4",
             distinct: bool = False) -> list[int]:
    """Comma-separated integers, each at least ``minimum`` (``what`` names them in the error); with ``distinct``,
    none repeated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if distinct and repeated:
        raise argparse.ArgumentTypeError(f"expected {what}, each once, got {text!r} ("
                                         f"{', '.join(map(str, repeated))} repeated)")
    return values


def step_list(text: str) -> list[int]:
    """Distinct positive step counts (a sweep measures each once)."""
    return int_list(text, distinct=True)


def label_list(text: str) -> list[int]:
    return int_list(text, 0, "comma-separated class labels like 0 or 3,7")


def seed_int(text: str) -> int:
    """An integer seed in ``fastgen.generate.SEED_RANGE``."""
    from fastgen.generate import SEED_RANGE

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"expected an integer seed from -2**63 to 2**64-1 (what "
                                         f"torch.Generator.manual_seed takes), got {text!r}")
    return value


MAX_UPSCALE = 64
"""The largest ``fastgen sample --upscale``; the upscaled grid must also stay within
``fastgen.generate.MAX_GRID_PIXELS`` (checked once the model's sample size is known, before sampling)."""


def upscale_int(text: str) -> int:
    """A whole upscale factor from 1 to ``MAX_UPSCALE``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_UPSCALE:
        raise argparse.ArgumentTypeError(f"expected a whole factor from 1 to {MAX_UPSCALE}, got {text!r}")
    return value


def _read_prompts(args) -> list[str] | None:
    from fastgen.data import TOY_PROMPTS, read_prompts

    if getattr(args, "prompts_file", None):
        path = Path(args.prompts_file)
        if str(path) != TOY_PROMPTS and not path.is_file():
            raise MissingPathError(f"--prompts-file {path} does not exist; expected a text file, one prompt per line, "
                                   f"or '{TOY_PROMPTS}' (the toy world's prompts)")
        return read_prompts(path)
    return [args.prompt] if getattr(args, "prompt", None) else None


def _model_path(model: str, flag: str = "--model") -> str:
    """``model`` checked to exist when it is a path (not ``toy``, ``toy-t2i`` or a hub id ``owner/name``)."""
    from fastgen.teacher import is_hub_id

    if model not in ("toy", "toy-t2i") and not is_hub_id(model) and not Path(model).expanduser().exists():
        raise MissingPathError(f"{flag} {model} does not exist; expected a diffusers pipeline folder")
    return model


def cmd_sample(args) -> int:
    from fastgen.generate import check_grid_path, check_grid_size, check_guidance, generate, save_grid
    from fastgen.teacher import load_teacher

    check_output_path(args.out, "--out")
    check_grid_path(args.out)
    prompts = _read_prompts(args)
    model = load_teacher(_model_path(args.model), trust_pickle=args.trust_pickle, height=args.height,
                         width=args.width, num_frames=args.num_frames)
    check_grid_path(args.out, video=model.is_video)  # before any sampling
    check_grid_size(model, args.num, args.upscale, args.out)
    check_guidance(model, args.guidance)
    images = generate(model, args.num, args.steps, seed=args.seed, sampler=args.sampler,
                      prompts=prompts, guidance_scale=args.guidance, batch_size=args.batch_size,
                      class_labels=args.class_labels)
    path = save_grid(images, args.out, upscale=args.upscale)
    frames = f" of {model.frames} frames" if model.is_video else ""
    print(f"wrote {len(images)} samples{frames} ({args.steps} steps) to {path}")
    return 0


def cmd_demo(args) -> int:
    import torch

    from fastgen.demo import run_demo

    check_output_path(args.out, "--out")
    torch.set_num_threads(args.threads)
    run_demo(Path(args.out), method=args.method, max_steps=args.max_steps, num_samples=args.num_samples,
             steps=args.steps, seed=args.seed, teacher=args.teacher, guidance_scale=args.guidance,
             student_steps=args.student_steps, jobs=args.jobs, threads=args.threads, overrides=args.overrides)
    return 0


def _lora(args) -> str | bool:
    """``--lora`` in its ``--lora-format`` (default peft), the name checked; ``False`` without ``--lora``."""
    from fastgen.pipelines.export import lora_format

    if not args.lora:
        if args.lora_format is not None:
            raise UsageError(f"--lora-format {args.lora_format} applies to a LoRA export; add --lora (a full "
                             "export merges the adapter into the weights)")
        return False
    return lora_format(args.lora_format or "peft")


def cmd_distill(args) -> int:
    from fastgen.config import load_distill_config
    from fastgen.losses import objective_class
    from fastgen.pipelines.export import lora_format
    from fastgen.trainer import Trainer, TrainingStopped

    flags = {"teacher": args.teacher, "method": args.method, "data": args.data, "prompts": args.prompts,
             "output": args.output, "height": args.height, "width": args.width, "num_frames": args.num_frames,
             "student.num_steps": args.steps, "train.max_steps": args.max_steps}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.trust_pickle:
        overrides.append("trust_pickle=true")
    config = load_distill_config(args.config, overrides + list(args.overrides))
    if args.lora and config.student.lora_rank == 0:
        raise UsageError("--lora exports a LoRA adapter, but student.lora_rank is 0 (a full fine-tune); "
                         "set student.lora_rank=N or drop --lora")
    if args.lora and not objective_class(config.method).lora_export:
        raise UsageError(f"--lora exports a LoRA adapter alone, and method {config.method} trains other new weights "
                         "too; drop --lora (the student exports its full weights)")
    if args.lora and config.student.experts > 1:
        raise UsageError(f"--lora exports one LoRA adapter, but student.experts is {config.student.experts}; "
                         "drop --lora (a student of experts exports its full weights)")
    lora = _lora(args)
    check_output_path(config.output, "output")
    trainer = Trainer(config, resume=args.resume)  # a failure here leaves no folder it created
    try:
        try:
            lora_format(lora, trainer.teacher)  # a LoRA layout this teacher cannot take fails before training
        except BaseException:
            trainer.discard()
            raise
        trainer.resume_command = _resume_command(trainer.run_dir, args, "auto")  # whether a checkpoint exists or not
        try:
            trainer.fit()
        except TrainingStopped as stop:
            if trainer.accelerator.is_main_process:
                print(f"stopped at step {stop.step} by {stop.signal_name}; resume with: "
                      f"{_resume_command(trainer.run_dir, args)}", file=sys.stderr)
            return stop.exit_code
        out = trainer.export(trainer.run_dir / "export", lora=lora)
    finally:
        trainer.close()
    if out is not None:
        print(f"run in {trainer.run_dir}; student exported to {out}")
    return 0


def _resume_command(run_dir: Path, args, resume: str | None = None) -> str:
    """The command that continues the run in ``run_dir`` as ``args`` asked (its config holds every setting but the
    export's flags), with ``--resume resume`` (default: "auto" where asked, else "latest")."""
    command = ["fastgen", "distill", "--config", str(run_dir / "config.yaml"),
               "--resume", resume or ("auto" if args.resume == "auto" else "latest")]
    if args.lora:
        command += ["--lora"] + (["--lora-format", args.lora_format] if args.lora_format else [])
    return shlex.join(command)


def cmd_export(args) -> int:
    from fastgen.trainer import export_run

    check_output_path(args.output, "--output")
    no_ema = []
    out = export_run(args.run, args.output, lora=_lora(args), ema=args.ema, checkpoint=args.checkpoint,
                     on_no_ema=no_ema.append)
    if no_ema:
        print(f"{args.run} has no EMA weights (train.ema_decay was null): exported the trained weights to {out}")
    else:
        print(f"exported {args.run} to {out}")
    return 0


def cmd_eval(args) -> int:
    from fastgen.eval.evaluate import build_metrics, evaluate

    check_output_path(args.out, "--out")
    model = _model_path(args.model)
    teacher = _model_path(args.teacher, "--teacher") if args.teacher else None
    if args.num_samples < 2 and {"fid", "kid"} & set(args.metrics):
        raise UsageError(f"--num-samples {args.num_samples}: FID and KID need at least 2 samples per point")
    prompts = _read_prompts(args)
    metrics = build_metrics(args.metrics, features=args.features, ref=args.ref,
                            inception_weights=args.inception_weights, resize=args.resize, prompts=prompts,
                            clip_model=args.clip_model, clip_weights=args.clip_weights)
    out = Path(args.out)
    existed = out.exists()
    size = {"height": args.height, "width": args.width, "num_frames": args.num_frames}
    try:
        evaluate(model, args.steps, out, args.num_samples, metrics, teacher_dir=teacher, prompts=prompts,
                 guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size, size=size)
    except BaseException:
        if not existed:  # a failure found while sampling (e.g. a model the features do not fit) leaves no folder
            shutil.rmtree(out, ignore_errors=True)
        raise
    print((out / "sweep.md").read_text())
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'}")
    return 0


# -- estimate (self-contained block) ---------------------------------------------------------------------------


def cmd_estimate(args) -> int:
    import json

    from fastgen.config import load_distill_config
    from fastgen.estimate import estimate_memory, estimate_with_modes, format_table, parse_bytes

    flags = {"teacher": args.teacher, "method": args.method, "train.batch_size": args.batch_size,
             "train.sharding": args.sharding,
             "train.fsdp_offload": None if args.offload is None else str(args.offload).lower()}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    config = load_distill_config(args.config, overrides + list(args.overrides))
    try:
        budget = parse_bytes(args.budget) if args.budget else None
    except ValueError as err:
        raise UsageError(f"--budget: {err}") from None
    estimate = estimate_with_modes if args.modes else estimate_memory
    est = estimate(config, args.resolution, device=args.device, optimizer=args.optimizer or config.train.optimizer,
                   world_size=args.world_size)
    if args.json:
        out = est.to_json()
        if budget is not None:
            out["budget_bytes"] = budget
            out["fits"] = {key: n <= budget for key, n in est.modes.items()}
        print(json.dumps(out, indent=2))
    else:
        print(format_table(est, budget))
    return 0


def add_estimate_parser(sub, parents=()) -> None:
    from typing import get_args, get_type_hints

    from fastgen.config import OPTIMIZERS, TrainConfig

    estimate = sub.add_parser(
        "estimate", parents=list(parents), help="expected peak memory per device of a `distill` run, before anything is allocated",
        description="Expected peak memory per device of `fastgen distill` with the same arguments, broken down per "
        "network (weights, gradients, optimizer states, EMA) plus the activations of one micro-batch, and the "
        "memory modes side by side (full or LoRA fake score, gradient checkpointing, LoRA student). One training "
        "step is simulated on fake tensors (no memory, no weights: --teacher may be a folder without weights or "
        "one of the bundled real-size configs sd15, sdxl, sd3-medium); the activations are simulated, not "
        "modelled. --world-size N gives one device of N processes: replicated (DDP) or, with --sharding fsdp2, "
        "sharded (and with --offload, the state in host memory). Add the CUDA context and allocator slack "
        "(~0.5-1 GiB) on a GPU.")
    estimate.add_argument("--teacher", help="teacher diffusers folder (only its configs are read), or sd15, sdxl, "
                          "sd3-medium, toy")
    estimate.add_argument("--method", help="objective, as for distill")
    estimate.add_argument("--config", help="YAML file or preset name, as for distill")
    estimate.add_argument("--resolution", type=int, help="student resolution in pixels (default: the teacher's)")
    estimate.add_argument("--batch-size", type=int, help="micro-batch per device (train.batch_size)")
    estimate.add_argument("--budget", help="device memory, e.g. 24GiB or 80GB: says which modes fit")
    estimate.add_argument("--optimizer", choices=OPTIMIZERS,
                          help="train.optimizer (default: the config's): adamw, torch's AdamW (foreach on CUDA); "
                               "fused, fused=True; 8bit, bitsandbytes' AdamW8bit (1-byte states)")
    estimate.add_argument("--world-size", type=positive_int, default=1, metavar="N",
                          help="processes of the launch (torchrun --nproc_per_node N; default 1): the figure is per "
                               "device, and the global batch is batch_size x grad_accum x N")
    estimate.add_argument("--sharding", choices=get_args(get_type_hints(TrainConfig)["sharding"]),
                          help="train.sharding (default: the config's): none replicates every network (DDP when N > "
                               "1, plus its gradient buckets); fsdp2 divides weights, gradients, optimizer states and "
                               "EMA by N (per tensor, on dim 0), adds FSDP2's gathered blocks, activations undivided")
    estimate.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                          help="train.fsdp_offload (default: the config's), with --sharding fsdp2: the sharded state "
                               "and the optimizer step in host memory (printed per process), off the device")
    estimate.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                          help="the device the run will use (the optimizer's implementation differs)")
    estimate.add_argument("--modes", action=argparse.BooleanOptionalAction, default=True,
                          help="also estimate the memory modes: gradient checkpointing, then a LoRA fake score, then a "
                               "LoRA student switched on one after another (up to 3 more simulations, side by side "
                               "in processes; --no-modes skips them)")
    estimate.add_argument("--json", action="store_true", help="print one JSON object (parameters, total_bytes, "
                          "rows, modes) instead of the table")
    estimate.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distill")
    estimate.set_defaults(func=cmd_estimate)


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """``--height``, ``--width``, ``--num-frames``: the sample size (default: the teacher's own, or the size an
    exported student was trained at)."""
    parser.add_argument("--height", type=positive_int, help="sample height in pixels (default: the model's own)")
    parser.add_argument("--width", type=positive_int, help="sample width in pixels (default: the model's own)")
    parser.add_argument("--num-frames", type=positive_int, help="frames per video sample (video models)")


def build_parser() -> argparse.ArgumentParser:
    from fastgen.config import preset_names

    parser = _Parser(prog="fastgen", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of errors (also FASTGEN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of errors (also FASTGEN_DEBUG=1)")

    demo = sub.add_parser("demo", parents=[debug], help="distil, evaluate and export the bundled toy teacher (CPU, minutes)")
    demo.add_argument("--out", default="fastgen_demo", help="output folder (default: %(default)s)")
    toy_methods = sorted(p.stem[len("toy_"):] for p in (Path(__file__).parent / "configs").glob("toy_*.yaml"))
    demo.add_argument("--method", choices=toy_methods, default="dmd",
                      help="objective, with its toy_<method> preset (default: %(default)s)")
    demo.add_argument("--student-steps", type=step_list,
                      help="one student per step count, e.g. 1,4 (default: 1,4 for dmd; the preset's count for "
                           "the others)")
    demo.add_argument("--max-steps", type=positive_int,
                      help="training steps of each student (default: 500 for dmd; the preset's for the others)")
    demo.add_argument("--num-samples", type=positive_int, default=1000, help="samples per toy-FID point")
    demo.add_argument("--steps", type=step_list, default=[1, 2, 4, 8], help="step counts, e.g. 1,2,4")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--teacher", choices=["toy", "toy-t2i"], default="toy",
                      help="toy: the pixel toy teacher; toy-t2i: the text-conditioned one (default: %(default)s)")
    demo.add_argument("--guidance", type=float, default=1.0,
                      help="CFG scale of the toy-t2i teacher's samples, Ho-Salimans form (1 = none)")
    demo.add_argument("--threads", type=positive_int, default=1,
                      help="torch CPU threads per process (default 1: the toy network is too small to gain from "
                           "more, and measured 30x slower with 2 threads while another process held a core)")
    demo.add_argument("--jobs", type=positive_int,
                      help="students trained at once, one process each (default: one per CPU core, at most one "
                           "per student)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of every student's run")
    demo.set_defaults(func=cmd_demo)

    distill = sub.add_parser("distill", parents=[debug], help="distil a teacher into a few-step student, then export it to RUN/export")
    distill.add_argument("--teacher", help="teacher diffusers folder (or hub id, when online)")
    distill.add_argument("--method", help="objective: " + ", ".join(m for m in toy_methods if not m.startswith("t2i_"))
                         + " (each has its toy_<method> preset; fastgen.losses.OBJECTIVES)")
    distill.add_argument("--config", help="YAML file or preset name (" + ", ".join(preset_names()) + "); flags "
                         "and key=value overrides apply on top")
    distill.add_argument("--data", help="a folder of images, captioned images (.tar, .parquet, a folder with "
                         "metadata.jsonl, hf:owner/name), a prompts .txt file, or 'teacher'")
    distill.add_argument("--prompts", help="prompts file of teacher samples (--data teacher) or of data-free "
                         "training (no --data), or 'toy': the text toy teacher's prompts; the key `prompts`")
    distill.add_argument("--output", help="run folder (config, metrics.jsonl, checkpoints, samples, export)")
    distill.add_argument("--steps", type=positive_int, help="student sampling steps (student.num_steps)")
    distill.add_argument("--max-steps", type=positive_int, help="training steps (train.max_steps)")
    distill.add_argument("--resume", help="'latest', a checkpoint of this run (its folder, or its name such as "
                         "step-00000500), or 'auto': the latest "
                         "checkpoint when --output has one, else a new run (one command for a first start and every "
                         "restart); without it, an --output that holds a run is refused")
    distill.add_argument("--lora", action="store_true", help="export only the LoRA adapter (needs student.lora_rank > 0)")
    distill.add_argument("--lora-format", help=LORA_FORMAT_HELP)
    distill.add_argument("--trust-pickle", action="store_true", help="allow pickled (.bin) teacher weights")
    add_size_arguments(distill)
    distill.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-5")
    distill.set_defaults(func=cmd_distill)

    sample = sub.add_parser("sample", parents=[debug], help="write a grid of samples from a diffusers pipeline folder")
    sample.add_argument("--model", required=True, help="diffusers pipeline folder (teacher or exported student)")
    sample.add_argument("--steps", type=positive_int, required=True, help="sampling steps")
    sample.add_argument("--num", type=positive_int, default=16, help="number of samples (default: %(default)s)")
    sample.add_argument("--seed", type=seed_int, default=0, help="seed of the noise, -2**63 to 2**64-1 (default: "
                        "%(default)s)")
    sample.add_argument("--out", required=True, help="output image: .png (or .jpg, .jpeg, .webp, .bmp, .tif, "
                        ".tiff, .gif); a video model's grid: animated to a .gif (or .mp4, "
                        "with imageio and imageio-ffmpeg installed), else still, a row per sample and a column per "
                        "frame")
    sample.add_argument("--sampler", choices=["ddim", "heun", "dpmpp_2m", "renoise"], default=None,
                        help="default: the exported student's rule, else ddim")
    sample.add_argument("--prompt", help="one prompt for text-to-image models")
    sample.add_argument("--prompts-file", help="a file of prompts, one per line; 'toy': every shape x colour "
                        "prompt of the toy world")
    sample.add_argument("--class-labels", type=label_list, help="class-conditional models: the classes to cycle "
                        "through, e.g. 3 or 0,5 (default: every class in turn)")
    sample.add_argument("--guidance", type=float, default=1.0, help="CFG scale, Ho-Salimans form (1 = none)")
    sample.add_argument("--batch-size", type=positive_int, default=64)
    sample.add_argument("--upscale", type=upscale_int, default=1, help="nearest-neighbour upscale of the grid, "
                        f"a whole factor from 1 to {MAX_UPSCALE} (the grid at most 2**28 pixels)")
    sample.add_argument("--trust-pickle", action="store_true", help="allow pickled (.bin) weights")
    add_size_arguments(sample)
    sample.set_defaults(func=cmd_sample)

    evaluate = sub.add_parser("eval", parents=[debug], help="FID/KID/CLIP score against the number of steps: CSV, "
                              "Markdown, PNG (video models: per frame, columns <metric>_per_frame; no FVD)")
    evaluate.add_argument("--model", required=True, help="diffusers folder: an exported student or any teacher")
    evaluate.add_argument("--steps", type=step_list, required=True, help="step counts, e.g. 1,2,4")
    evaluate.add_argument("--ref", help="reference: Inception statistics .npz or a folder of images "
                          "(default with --features toy: fresh toy images)")
    evaluate.add_argument("--num-samples", type=positive_int, default=1000,
                          help="samples (video models: videos, every frame measured) per point (default: %(default)s)")
    evaluate.add_argument("--metrics", type=lambda s: [m for m in s.split(",") if m], default=["fid"],
                          help="comma-separated: fid,kid,clip,prompt_acc (default: fid)")
    evaluate.add_argument("--features", choices=["inception", "toy"], default="inception",
                          help="feature network of FID/KID (toy: the bundled toy feature network, for the 16x16 "
                               "toy world only: other image shapes are refused, samples unlike it warned about)")
    evaluate.add_argument("--teacher", help="also sweep this teacher with DDIM at the same step counts")
    evaluate.add_argument("--out", default="fastgen_eval", help="output folder (default: %(default)s)")
    evaluate.add_argument("--inception-weights", help="path of weights-inception-2015-12-05-6726825d.pth")
    evaluate.add_argument("--resize", choices=["tf", "clean"], default="tf", help="resize protocol to 299x299")
    evaluate.add_argument("--clip-model", default="ViT-g-14",
                          help="CLIP score model: a local Hugging Face CLIP folder (config.json with model_type clip, "
                               "model.safetensors, tokenizer, preprocessor_config.json), or an open_clip model name "
                               "with --clip-weights (default: %(default)s)")
    evaluate.add_argument("--clip-weights", help="local weights file of the open_clip --clip-model: .safetensors, or "
                                                 ".bin/.pt of plain tensors (pickled code is refused)")
    evaluate.add_argument("--prompt", help="one prompt for text-to-image models")
    evaluate.add_argument("--prompts-file", help="prompts, one per line (text-to-image models; CLIP score, "
                          "prompt_acc); 'toy': every shape x colour prompt of the toy world")
    evaluate.add_argument("--guidance", type=float, default=1.0, help="CFG scale, Ho-Salimans form (1 = none)")
    evaluate.add_argument("--seed", type=seed_int, default=0, help="seed of the noise, -2**63 to 2**64-1 (default: "
                          "%(default)s)")
    evaluate.add_argument("--batch-size", type=positive_int, default=64)
    add_size_arguments(evaluate)  # of --model and --teacher alike
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", parents=[debug], help="export a run's student to a diffusers folder")
    export.add_argument("--run", required=True, help="the run folder of `fastgen distill`")
    export.add_argument("--output", required=True, help="the folder to write")
    export.add_argument("--lora", action="store_true", help="write only the LoRA adapter (LoRA students)")
    export.add_argument("--lora-format", help=LORA_FORMAT_HELP)
    export.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights (default) or the raw ones")
    export.add_argument("--checkpoint", help="a checkpoint folder, or the name of one in RUN/checkpoints (default: "
                        "the latest)")
    export.set_defaults(func=cmd_export)
    add_estimate_parser(sub, [debug])
    return parser


def entry() -> None:
    """The ``fastgen`` console script and ``python -m fastgen``: ``sys.exit(main())``, or ``exit_worker`` where a
    process of a multi-process launch succeeded. A failing one keeps the interpreter's teardown, which destroys its
    process group, closing the connections while the process lives: a peer waiting in a collective with it then
    says so (``peer_ended``) before the launcher stops it (without the teardown the launcher stopped the peer
    first in 2 of 5 runs of ``tests/test_sharding.py``'s peer test)."""
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_worker(code)
    sys.exit(code)


def exit_worker(code: int) -> None:
    """End a process of a multi-process launch whose command succeeded: the ``atexit`` callbacks run (logging, file locks, finalizers),
    the streams are flushed, and the process exits without the interpreter's teardown.

    A gloo worker thread drops its reference to a collective's tensors just after the caller's ``wait`` returns,
    and dropping it takes the GIL. When the interpreter is already finalising, Python (before 3.14, cpython
    gh-87135) ends such a thread with a forced unwind through torch's ``noexcept`` destructor, and the process
    aborts (``terminate called without an active exception``, SIGABRT), although the run finished. The process
    group is destroyed at the end of training (``Accelerator.end_training``), but FSDP2's state keeps the group,
    and its threads, alive until the teardown (pytorch PR #179291 describes the race). Measured on two CPU
    processes (a 4-step sharded run of a tiny UNet, ``tests/test_sharding.py``'s): 3 of 15 runs aborted so before,
    0 of 24 after (docs/fsdp2_findings.md)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: what it held has nowhere to go
            pass
    os._exit(code)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, with the ``key=value`` overrides of ``distill`` and ``estimate`` taken from anywhere
    among the options (argparse gives its ``nargs="*"`` positional only the first run of them): every leftover that
    contains ``=`` and does not start with ``-`` is an override, in the order given; any other leftover is
    argparse's ``unrecognized arguments`` error."""
    args, extras = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [x for x in extras if "=" in x and not x.startswith("-")]
        extras = [x for x in extras if not ("=" in x and not x.startswith("-"))]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def peer_ended(err: BaseException) -> bool:
    """Whether ``err`` is a collective of a multi-process launch failing because another process of the group
    ended (its own error, printed by it, is the one to read)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "RANK" not in os.environ:
        return False
    return isinstance(err, dist.DistError) or any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer"))  # gloo's words


def stdout_closed() -> bool:
    """Whether stdout's reader has gone (a pipe whose read end is closed polls POLLERR); if so stdout is pointed at
    the null device, so that nothing written later, nor the interpreter's last flush, fails again (Python's
    documented recipe, "Note on SIGPIPE" in the ``signal`` module's docs)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream): not a pipe
        return False
    if closed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return closed


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (user errors are reported on one line, see the module doc)."""
    try:
        args = parse_args(build_parser(), argv)
    except SystemExit as exit_:  # --help, or argparse's one-line usage error
        return exit_.code if isinstance(exit_.code, int) else 2
    debug = args.debug or os.environ.get("FASTGEN_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, BrokenPipeError) and stdout_closed():
            return 141  # the reader of the output left (`fastgen estimate ... | head -1`): as SIGPIPE ends a tool
        if peer_ended(err):
            print(f"error: process {os.environ['RANK']} of {os.environ['WORLD_SIZE']} stopped: another process of its "
                  "group ended first (that process's own message says why)", file=sys.stderr)
            return 1
        traceback.print_exc()
        print("error: this is a bug in fastgen, not a mistake in your input; please report it with the traceback "
              "above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    entry()
