"""The run config: teacher, method, data, the student, training and the objective's own typed ``Config``.

``load_config(DistillConfig, file, overrides)`` (``fastgen.typed_config``: YAML with dotted ``key=value``
overrides, every value checked against its field's type) builds a ``DistillConfig`` whose ``objective`` section
is resolved into the method's own ``Config`` dataclass as the config is built, and every section checks its own
values in ``__post_init__``: a typo or a bad value in any section fails when the config is loaded, before a
teacher weight is read. ``DistillConfig.validate()`` adds what a run needs besides (a teacher and a method).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml

from fastgen.errors import check_fields, warn
from fastgen.losses import objective_class, objective_config
from fastgen.typed_config import (ConfigError, config_from_dict, config_to_dict, load_config, parse_value,
                                  parse_override, merge_overrides, save_config)

__all__ = ["OPTIMIZERS", "ConfigError", "DistillConfig", "StudentConfig", "TrainConfig", "absolute_paths",
           "config_file", "config_from_dict", "config_to_dict", "grid_for_teacher", "load_config",
           "load_distill_config", "merge_overrides", "parse_value",
           "preset_names", "save_config"]

OptimizerName = Literal["adamw", "fused", "8bit"]
"""torch's AdamW, torch's fused AdamW (``fused=True``) or bitsandbytes' AdamW8bit."""
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
"""The optimizer names of ``train.optimizer`` and ``fastgen estimate --optimizer``."""


# ----------------------------------------------------------------------------- the concrete config


@dataclass
class StudentConfig:
    """The few-step student network and the timesteps it is trained for."""

    num_steps: int = 1
    """Sampling steps the student is trained for."""
    timesteps: list[int] | None = None
    """Trained timesteps in the teacher's native time; None = the objective's default."""
    prediction_type: str | None = None
    """The student's output type (e.g. "sample" or "v_prediction" for an epsilon teacher, whose 1-step
    x0 divides by alpha(t_max)); None = the teacher's. The export records it."""
    lora_rank: int = 0
    """0 = full fine-tune; >0 = a peft LoRA adapter of this rank."""
    lora_alpha: float | None = None
    """LoRA scaling numerator; None = ``lora_rank``."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names that receive LoRA adapters."""
    experts: int = 1
    """Networks of the student, each owning a noise interval (high noise first); 1 = one network."""
    expert_boundaries: list[float] | None = None
    """The ``experts - 1`` times (teacher's native time, decreasing) between the experts' intervals;
    None = halfway between the steps that split ``timesteps`` (or the schedule's grid) into equal groups."""


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpointing of the training loop."""

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule of every phase's optimizer (diffusers' names, ``diffusers.optimization``): after
    ``lr_warmup_steps`` of linear warm-up, constant, linear decay to 0 or cosine decay to 0 over the phase's
    own updates in ``max_steps``."""
    lr_warmup_steps: int = 0
    """Optimizer updates of linear warm-up from 0 (per phase: counted in the phase's own updates)."""
    optimizer: OptimizerName = "adamw"
    """Every phase's optimizer: "adamw" (torch), "fused" (torch's fused AdamW kernels) or "8bit" (bitsandbytes'
    AdamW8bit, 8-bit states: ``pip install "fastgen-distill[bnb]"``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = False
    """TF32 matmuls and cuDNN convolutions on Ampere and newer GPUs during ``fit`` (torch's
    ``backends.cuda.matmul.allow_tf32`` and ``backends.cudnn.allow_tf32``, restored afterwards); false leaves
    torch's settings as they are."""
    ema_decay: float | None = 0.999
    """EMA decay of the student; None = no EMA."""
    attention: Literal["default", "sdpa", "xformers"] = "default"
    """Attention kernel of the trained networks, per family through diffusers' own mechanism
    (``fastgen.networks.set_attention``): "default" keeps the processors diffusers installed; "sdpa" is torch's
    ``scaled_dot_product_attention`` (the dispatcher's "native" backend for Flux, Wan and other dispatched models,
    the family's own SDPA processor for the UNets and SD3); "xformers" needs xformers and a CUDA GPU."""
    gradient_checkpointing: bool = False
    max_nonfinite: int = 10
    """Stop after this many non-finite steps in a row."""
    log_every: int = 10
    sample_every: int = 0
    """Save a sample grid (``RUN/samples/step-N.png``, also sent to the trackers that take images) every this
    many steps: a row per step count the student serves, a column per validation prompt (else per condition
    of the data); 0 = never."""
    validation_prompts: list[str] | str | None = None
    """The prompts of the sample grids of a text-to-image teacher: a list, or a text file of prompts, one a
    line ("toy": the toy world's prompts); None = the data's first conditions."""
    validation_seed: int | None = None
    """The seed of the sample grids' noise (the same noise every time); None = ``seed``."""
    checkpoint_every: int = 0
    """0 = only at the end."""
    keep_checkpoints: int = 2
    num_workers: int = 0
    """Data-loader worker processes per rank (``torch.utils.data.DataLoader``); 0 = load in the main process."""
    trackers: list[str] = field(default_factory=list)
    """accelerate trackers besides metrics.jsonl, e.g. ["tensorboard"] or ["wandb"] (when installed)."""
    sharding: Literal["none", "fsdp2"] = "none"
    """How the networks are spread over the processes of a multi-process launch (``torchrun --nproc_per_node N``):
    "none" replicates them (DDP when there are several processes); "fsdp2" shards the student, the objective's
    networks and the frozen teacher over the processes with torch's ``fully_shard`` (FSDP2), parameters,
    gradients, optimizer states and EMA divided by the number of processes (``fastgen.sharding``)."""
    fsdp_blocks: list[str] | None = None
    """With sharding "fsdp2": the attributes of a network whose blocks are sharded one by one before the whole
    network (a list of modules is sharded item by item, each block after its resnets and attention modules:
    ``fastgen.sharding.BLOCK_PARTS``); None = the known block attributes of diffusers' UNets and transformers
    (``fastgen.sharding.BLOCK_ATTRIBUTES``)."""
    fsdp_reshard_after_forward: bool = True
    """With sharding "fsdp2": free the gathered parameters of a block after its forward (less memory, one more
    all-gather in backward); false keeps them to the backward (FSDP2's ``reshard_after_forward``)."""
    fsdp_offload: bool = False
    """With sharding "fsdp2": keep the sharded parameters, gradients and optimizer states in CPU memory and move
    each block's parameters to the GPU for its compute (FSDP2's ``CPUOffloadPolicy``)."""


SCRIPT_FLAGS: dict[str, str] = {
    "gradient_accumulation_steps": "train.grad_accum",
    "report_to": "train.trackers",
    "checkpointing_steps": "train.checkpoint_every",
    "learning_rate": "train.lr",
    "use_8bit_adam": "train.optimizer=8bit",
    "validation_prompts": "train.validation_prompts",
    "validation_steps": "train.sample_every",
    "validation_epochs": "train.sample_every",
    "resume_from_checkpoint": "--resume latest",
    "train_batch_size": "train.batch_size",
    "max_train_steps": "train.max_steps",
    "mixed_precision": "train.mixed_precision",
    "lr_scheduler": "train.lr_scheduler",
    "lr_warmup_steps": "train.lr_warmup_steps",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "enable_xformers_memory_efficient_attention": "train.attention=xformers",
    "seed": "seed",
    "output_dir": "--output",
    "pretrained_model_name_or_path": "--teacher",
    "train_data_dir": "--data",
    "dataloader_num_workers": "train.num_workers",
    "adam_beta1": "train.betas",
    "adam_beta2": "train.betas",
    "adam_weight_decay": "train.weight_decay",
    "max_grad_norm": "train.grad_clip",
    "ema_decay": "train.ema_decay",
    "allow_tf32": "train.allow_tf32",
}
"""The flags of diffusers' training scripts (``train_text_to_image.py`` and its siblings) and fastgen's config key
(or ``--flag`` of ``fastgen distill``) for each. A config key spelled as one of these is reported with fastgen's
name instead of the nearest spelling (``DistillConfig.ALIASES``)."""

_SCRIPT_FLAG_NOTES = {
    "adam_beta1": "its first item",
    "adam_beta2": "its second item",
    "validation_epochs": "counted in steps: fastgen has no epochs",
}


def _script_flag_hint(flag: str, target: str) -> str:
    note = _SCRIPT_FLAG_NOTES.get(flag)
    if target.startswith("--"):
        return f"use the command-line flag {target} of `fastgen distill` (diffusers' training-script flag --{flag})"
    return f"did you mean '{target}'? (diffusers' training-script flag --{flag}{'; ' + note if note else ''})"


@dataclass
class DistillConfig:
    """A distillation run: teacher, objective (``method`` plus its free-form ``objective`` args), student, training."""

    teacher: str = ""
    """Teacher diffusers folder or hub id; required at run time."""
    method: str = ""
    """Distillation objective name; required at run time."""
    output: str = "runs/fastgen"
    data: str | None = None
    """Training data (``fastgen.data.build_data``): an image folder, captioned images (``.tar``, ``.parquet``,
    a folder with ``metadata.jsonl``, ``hf:owner/name``), a ``.txt`` prompts file, "teacher" or None."""
    prompts: str | None = None
    """A prompts file (one a line) for data "teacher" (the prompts of the teacher samples) or None (data-free
    training on those prompts); "toy": the toy world's 24 prompts (every shape x colour)."""
    caption_column: str | None = None
    """The caption column of captioned images; None = "text", else "caption", else "txt"."""
    resize_data: bool = False
    """Center-crop and resize images (folders, captioned images) of another size to the sample size; false: such
    an image is refused, named."""
    seed: int = 0
    trust_pickle: bool = False
    """Allow pickled (.bin/.pt) teacher weights; unpickling runs code."""
    teacher_samples: int = 1024
    """With data "teacher": how many teacher samples to generate and cache."""
    teacher_sample_steps: int = 32
    """With data "teacher": DDIM steps of the teacher for those samples."""
    teacher_sample_guidance: float = 1.0
    """With data "teacher": CFG scale of those samples, Ho–Salimans ``u + s (c - u)`` (1 = none)."""
    height: int | None = None
    """Sample height in pixels (None: the teacher's own; needed for teachers whose pipeline sizes them, e.g.
    Flux at 1024 and Wan at 480 x 832 by default)."""
    width: int | None = None
    """Sample width in pixels (None: the teacher's own)."""
    num_frames: int | None = None
    """Frames of a video sample (video teachers; None: the pipeline's default, Wan: 81)."""
    cache_dir: str | None = None
    """Folder of the run's caches (encoded images and captions, prompt embeddings, teacher samples; default
    ``OUTPUT/cache``). Runs of one teacher may share one: each file is named by a hash of what it depends on."""
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: dict[str, Any] = field(default_factory=dict)
    """The objective's own settings: a mapping in YAML; once ``method`` is set, the method's typed ``Config``
    (``fastgen.losses.<family>``), resolved and checked when the config is built."""

    def size(self) -> dict[str, int | None]:
        """The sample size keywords of ``fastgen.teacher.load_teacher``."""
        return {"height": self.height, "width": self.width, "num_frames": self.num_frames}

    ALIASES: ClassVar[dict[str, str]] = {flag: _script_flag_hint(flag, to) for flag, to in SCRIPT_FLAGS.items()}
    """Unknown keys named like diffusers' training-script flags: the hint of fastgen's key (``typed_config``)."""

    def __post_init__(self):
        if self.method:
            objective_class(self.method)  # an unknown method names the known ones
            if isinstance(self.objective, Mapping):
                self.objective = objective_config(self.method, self.objective)

    def validate(self) -> None:
        """Check cross-field rules; raise one ConfigError listing every violation."""
        s, t = self.student, self.train
        rules = [
            (bool(self.teacher), "teacher", self.teacher, "a teacher folder or hub id (required)"),
            (bool(self.method), "method", self.method, "a distillation method name (required)"),
            (s.num_steps >= 1, "student.num_steps", s.num_steps, ">= 1"),
            (s.timesteps is None or len(s.timesteps) == s.num_steps, "student.timesteps", s.timesteps,
             f"{s.num_steps} timesteps (one per student.num_steps)"),
            (s.lora_rank >= 0, "student.lora_rank", s.lora_rank, ">= 0"),
            (s.experts >= 1, "student.experts", s.experts, ">= 1"),
            (s.expert_boundaries is None or len(s.expert_boundaries) == s.experts - 1, "student.expert_boundaries",
             s.expert_boundaries, f"{s.experts - 1} times (student.experts - 1)"),
            (s.lora_alpha is None or s.lora_alpha > 0, "student.lora_alpha", s.lora_alpha, "> 0 or None"),
            (t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1 (0 would export the untrained student)"),
            (t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1"),
            (t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1"),
            (t.lr > 0, "train.lr", t.lr, "> 0"),
            (t.lr_warmup_steps >= 0, "train.lr_warmup_steps", t.lr_warmup_steps, ">= 0"),
            (t.num_workers >= 0, "train.num_workers", t.num_workers, ">= 0"),
            (all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "each in [0, 1)"),
            (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0"),
            (t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip, "> 0 or None"),
            (t.ema_decay is None or 0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "in [0, 1) or None"),
            (t.max_nonfinite >= 1, "train.max_nonfinite", t.max_nonfinite, ">= 1"),
            (t.log_every >= 0, "train.log_every", t.log_every, ">= 0"),
            (t.sample_every >= 0, "train.sample_every", t.sample_every, ">= 0"),
            (t.validation_prompts != [], "train.validation_prompts", t.validation_prompts,
             "at least one prompt (a non-empty list), a text file of prompts or None"),
            (t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, ">= 0"),
            (t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1"),
            (t.sharding == "fsdp2" or not t.fsdp_offload, "train.fsdp_offload", t.fsdp_offload,
             "false unless train.sharding is 'fsdp2'"),
            (t.fsdp_blocks is None or all(t.fsdp_blocks), "train.fsdp_blocks", t.fsdp_blocks,
             "attribute names of the networks' blocks, or null"),
            (t.sharding != "fsdp2" or self.method != "progressive", "train.sharding", t.sharding,
             "'none' for method 'progressive' (each round copies the student, which a sharded network cannot)"),
        ]
        problems = [f"{key}: expected {expected}, got {value!r}" for ok, key, value, expected in rules if not ok]
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


NAMES_NOT_PATHS = {"teacher": ("toy", "toy-t2i"), "data": ("teacher", "toy"), "prompts": ("toy",),
                   "train.validation_prompts": ("toy",)}
"""Per path key, the values that name something else (the toy teachers, teacher samples, the toy data and
prompts), even where a file or folder of that name exists (``./teacher`` is the folder)."""


def absolute_paths(config: DistillConfig) -> DistillConfig:
    """A copy of ``config`` with its local paths absolute, so that the run's ``config.yaml`` resumes and exports
    from any working directory: ``output`` and ``cache_dir`` always (folders the run writes); ``teacher``, ``data``,
    ``prompts`` and ``train.validation_prompts`` where they name an existing file or folder (a hub id, ``hf:...``
    and ``NAMES_NOT_PATHS`` stay as given)."""

    def absolute(value: str) -> str:
        return os.path.abspath(Path(value).expanduser())

    def existing(key: str, value):
        if not isinstance(value, str) or value in ("", *NAMES_NOT_PATHS[key]) or not Path(value).expanduser().exists():
            return value
        return absolute(value)

    train = dataclasses.replace(config.train, validation_prompts=existing("train.validation_prompts",
                                                                           config.train.validation_prompts))
    return dataclasses.replace(config, output=absolute(config.output), teacher=existing("teacher", config.teacher),
                               data=existing("data", config.data), prompts=existing("prompts", config.prompts),
                               cache_dir=config.cache_dir and absolute(config.cache_dir), train=train)


PRESETS_DIR = Path(__file__).parent / "configs"

GRID_KEYS = ("student.timesteps", "student.expert_boundaries", "objective.boundaries")
"""A config file's settings in its teacher's native time, chosen for that teacher's schedule."""


def load_distill_config(name: str | Path | None, overrides=()) -> DistillConfig:
    """The run config of ``--config name`` (a file or preset, ``config_file``) with ``key=value`` overrides, its
    grid fitted to the run's teacher (``grid_for_teacher``)."""
    path = config_file(name)
    return grid_for_teacher(load_config(DistillConfig, path, overrides), path, overrides)


def same_teacher(a, b) -> bool:
    """Whether two ``teacher`` values name one teacher: equal, or one existing folder spelled two ways."""
    if a == b:
        return True
    paths = [Path(str(v)).expanduser() for v in (a, b)]
    return all(p.exists() for p in paths) and paths[0].resolve() == paths[1].resolve()


def grid_for_teacher(config: DistillConfig, path: str | Path | None, overrides=()) -> DistillConfig:
    """``config`` without the ``GRID_KEYS`` of the config file at ``path`` when the file names one teacher and the
    run distils another (``--teacher``): the file's times are in its own teacher's native time and were chosen
    for its schedule (``toy_dmd2``'s one-step ``399`` is alpha 0.44 under the toy's linear betas, 0.81 under
    cosine betas, sigma 0.4 on a flow teacher, out of range on a 250-step one), so the objective's default grid,
    a rule of the teacher's own schedule (``losses/README.md`` § Student input time), replaces them, with a
    warning. A key also given as an override is kept."""
    if path is None:
        return config
    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(tree, Mapping) or tree.get("teacher") is None or same_teacher(tree["teacher"], config.teacher):
        return config
    given = {override.split("=", 1)[0].strip() for override in overrides}

    def in_file(key: str):
        section, name = key.split(".")
        return (tree.get(section) or {}).get(name)

    dropped = {key: in_file(key) for key in GRID_KEYS if in_file(key) is not None and key not in given}
    if not dropped:
        return config
    warn(f"{Path(path).name} sets {', '.join(f'{k}={v}' for k, v in dropped.items())} for its teacher "
         f"{tree['teacher']!r}; teacher {config.teacher!r} takes the method's default grid for its own schedule "
         "instead (set them as overrides to keep them)")

    def cleared(section: str) -> dict:
        return {key.split(".")[1]: None for key in dropped if key.startswith(f"{section}.")}

    return dataclasses.replace(config, student=dataclasses.replace(config.student, **cleared("student")),
                               objective=dataclasses.replace(config.objective, **cleared("objective")))


def preset_names() -> list[str]:
    """The bundled presets (``fastgen/configs/*.yaml``), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_file(name: str | Path | None) -> Path | None:
    """A YAML file, or the name of a bundled preset (``toy_consistency``, ``sd15_progressive``, ...)."""
    if name is None or Path(name).is_file():
        return None if name is None else Path(name)
    preset = PRESETS_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = preset_names()
    if Path(name).is_dir():
        raise ConfigError(f"config {str(name)!r} is a folder; expected a YAML file or a preset ({', '.join(known)})")
    close = difflib.get_close_matches(Path(name).stem, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config {str(name)!r} is neither a file nor a preset; presets are {known}{hint}")
