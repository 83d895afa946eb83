"""Peak training memory per device, before anything is allocated (``fastgen estimate``).

**How.** One training step of the run is *simulated* on fake tensors (``torch._subclasses.FakeTensorMode``:
shapes, dtypes and storages, no data, no memory): the run is assembled by the trainer's own
``fastgen.assemble.build_run`` from the teacher's diffusers configs (random weights on the ``meta`` device,
where dtype conversions and peft's adapter moves work, turned into fake CPU tensors by its ``materialize``
hook before the optimizers and the EMA are made; the plan is resolved on real tensors first), every trainable
parameter is given its gradient and optimizer state (the steady state: the trainer's phases set their own
gradients to ``None`` only at their start, so the student's gradients stay alive through the critic phase and
the other way round), and then every phase of the objective runs once through the trainer's own
``fastgen.step.run_phase`` (a one-process ``PlainBackend``): ownership of the phase's networks, autocast at the
run's precision, the phase's loss, ``backward``, gradient clipping, the optimizer step and the student's EMA.
Nothing in torch or in the objectives is patched. Every denoiser family of ``fastgen.families.FAMILIES``
is taken: the sample is ``Teacher.sample_shape`` of the folder's own pipeline class (``TeacherSpec.pipeline``), the
prompt embeddings are zeros as long as that pipeline makes them (``ConfigTeacher.encode_prompts``), the networks are
called through their family as in training; the pipeline's other networks (VAE, text encoders, Wan 2.2's
``transformer_2``) are frozen weights on the device (``TeacherSpec.component_parameters``). A dispatch mode
counts the bytes of every live storage (a storage counts from the op that made it until its last tensor dies), so
the peak includes what activations autograd saves, gradient checkpointing's recomputation, the attention kernel's
own buffers and the optimizer's temporaries. The activations are therefore *simulated* at the real size, not
measured on a small batch nor modelled.

Limits: the simulation runs PyTorch's CPU kernels' bookkeeping (autocast's CPU casting rules and CPU
SDPA, a flash kernel that saves O(tokens) like CUDA's), so on a GPU expect a few per cent more: the CUDA
caching allocator's fragmentation and workspaces (cuBLAS, cuDNN) and the CUDA context (≈ 0.5 GiB) are not
in it. The trainer's AdamW uses the foreach implementation on CUDA (one temporary of the phase's
parameters' size in its step) and the per-tensor loop on the CPU; ``device="cuda"`` or ``"cpu"`` selects
which is simulated. Host RAM at start-up also holds the float32 teacher the copies are made from; that is
not device memory on a GPU and is not counted. ``optimizer="8bit"`` (bitsandbytes' AdamW8bit, 1 byte per
state: ``train.optimizer=8bit``) is modelled: its states are scaled from AdamW's, simulated with torch's AdamW.

Checked in ``tests/test_estimate.py`` against the peak of live tensor bytes of real tiny runs on the CPU
(``torch.profiler``'s allocator events).

**A launch of N processes** (``per_device``, ``fastgen estimate --world-size N --sharding none|fsdp2
[--offload]``) is derived from the same simulated step of one process, not simulated again: the steady state's
tensors are kept by ``(network, kind)`` with their shapes, and each phase by its measured moments (its start, the
peak of its forward and backward with the gradients it had made by then, its optimizer step). Replicated (DDP),
N > 1 adds DDP's gradient buckets; FSDP2 divides the weights (the frozen teacher's too), gradients, optimizer
states and EMA per tensor on dim 0 (``sharded_bytes``), leaves the activations, batch, buffers, VAE and text
encoders whole, and adds its all-gathered blocks (``gathered_bytes``); with CPU offload the sharded state and the
optimizer step live in host memory, reported per process. The sharding itself is not simulated (no process group,
no DTensors): its rule is modelled from docs/fsdp2_findings.md and torch's FSDP2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import itertools
import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_type_hints

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastgen.assemble import build_run, run_plan, weight_dtype
from fastgen.config import OPTIMIZERS, DistillConfig, TrainConfig, config_from_dict, config_to_dict, merge_overrides
from fastgen.data import Batch
from fastgen.denoiser import Denoiser
from fastgen.errors import InputError, UsageError
from fastgen.families import FAMILIES, call_default, vae_factors
from fastgen.schedules import schedule_from_config
from fastgen.step import PlainBackend, run_phase
from fastgen.teacher import DENOISER_COMPONENTS, Teacher, _check_size
from fastgen.toy import toy_teacher_path

REAL_SIZE = ("sd15", "sdxl", "sd3-medium", "flux1-dev", "qwen-image", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b",
             "wan2.2-t2v-a14b", "sana-1.6b")
"""Bundled diffusers configs (no weights) of real-size networks, as published with the models (docs/benchmarks.md
names each one's source): SD1.5's UNet (859.5 M parameters), SDXL's (2.57 B), an SD3-medium transformer (2.03 B),
FLUX.1-dev's (11.90 B), Qwen-Image's (20.43 B), Wan 2.1 T2V 1.3B's (1.42 B) and 14B's (14.29 B), Wan 2.2 T2V
A14B's two (14.29 B each: ``transformer``, high noise, and ``transformer_2``) and SANA 1.6B 1024px's (1.60 B)."""
KINDS = ("weights", "gradients", "optimizer", "ema", "activations")
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def real_size_folder(name: str) -> Path:
    """The folder of a bundled real-size config (one of ``REAL_SIZE``)."""
    if name not in REAL_SIZE:
        raise ValueError(f"real-size config {name!r} is unknown; expected one of {list(REAL_SIZE)}")
    return Path(__file__).parent / "assets" / "real_size" / name


def _folder(source: str | Path) -> Path:
    if str(source) in REAL_SIZE:
        return real_size_folder(str(source))
    if str(source) == "toy":
        return Path(toy_teacher_path())
    folder = Path(source).expanduser()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher {source}: no model_index.json; expected a diffusers pipeline folder or one "
                                f"of {list(REAL_SIZE)}")
    return folder


@contextlib.contextmanager
def _quiet_builds():
    """Within: diffusers and transformers log errors only. Building from configs alone, their warnings concern what
    the estimate leaves out on purpose (StableDiffusionPipeline: "You have disabled the safety checker") or a
    published config's older keys (Qwen2.5-VL's ``rope_scaling``, which transformers 5 reads as it is)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = [(module, module.get_verbosity()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in before:
        module.set_verbosity_error()
    try:
        yield
    finally:
        for module, level in before:
            module.set_verbosity(level)


@dataclass
class TeacherSpec:
    """What a teacher folder's configs say, read without loading any weights."""

    folder: Path
    component: str
    model_class: str
    model_config: dict
    scheduler_class: str
    scheduler_config: dict
    pipeline_class: str
    pipeline_config: dict  # model_index.json's settings (force_zeros_for_empty_prompt, boundary_ratio, ...)
    others: dict = field(default_factory=dict)  # component -> (library, class, config) of the VAE, text encoders

    @classmethod
    def read(cls, source: str | Path) -> TeacherSpec:
        folder = _folder(source)
        index = json.loads((folder / "model_index.json").read_text())
        component = next((c for c in DENOISER_COMPONENTS if c in index), None)
        if component is None:
            raise ValueError(f"teacher {folder}: model_index.json names no {' or '.join(DENOISER_COMPONENTS)}")
        model_class = index[component][1]
        if model_class not in FAMILIES:
            raise ValueError(f"teacher {folder}: denoiser class {model_class!r} is not supported; expected one of "
                             f"{list(FAMILIES)}")
        model_config = json.loads((folder / component / "config.json").read_text())
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        others = {}
        for name, entry in index.items():
            if (isinstance(entry, list) and entry[0] in ("diffusers", "transformers") and name != component
                    and (folder / name / "config.json").is_file()):
                others[name] = (entry[0], entry[1], json.loads((folder / name / "config.json").read_text()))
        settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
        return cls(folder, component, model_class, model_config, index["scheduler"][1], scheduler_config,
                   index["_class_name"], settings, others)

    def pipeline(self, model: torch.nn.Module | None = None):
        """The folder's pipeline class built as ``DiffusionPipeline.from_pretrained`` would build it, from its
        settings, but holding only its scheduler, its VAE (on the ``meta`` device) and ``model`` as the denoiser:
        what the pipeline's own constructor derives (the VAE's factors, its default size) and its ``__call__``'s
        defaults (size, ``max_sequence_length``) are then the pipeline's, read by ``fastgen.families`` as for a
        loaded teacher."""
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class)
        params = inspect.signature(pipeline_class.__init__).parameters
        kwargs = {name: None for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty}
        kwargs.update({k: v for k, v in self.pipeline_config.items() if k in params})
        kwargs["scheduler"] = getattr(diffusers, self.scheduler_class).from_config(self.scheduler_config)
        kwargs[self.component] = model
        if "vae" in self.others:
            _, vae_class, vae_config = self.others["vae"]
            with torch.device("meta"):
                kwargs["vae"] = getattr(diffusers, vae_class).from_config(vae_config)
        with _quiet_builds():
            return pipeline_class(**kwargs)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along height and width (1 for pixel teachers), as the pipeline records it."""
        return vae_factors(self.pipeline())[0] if "vae" in self.others else 1

    def component_parameters(self) -> dict[str, int]:
        """Parameters of the pipeline's other networks (VAE, text encoders; Wan 2.2's ``transformer_2``), counted
        on the ``meta`` device: the trainer's teacher pipeline holds them on the device at the run's precision."""
        import diffusers
        import transformers

        counts = {}
        for name, (library, class_name, config) in self.others.items():
            with torch.device("meta"), _quiet_builds():
                if library == "diffusers":
                    model = getattr(diffusers, class_name).from_config(config)
                else:
                    model_class = getattr(transformers, class_name)
                    model = model_class(model_class.config_class.from_dict(config))
            counts[name] = sum(p.numel() for p in model.parameters())
        return counts

    def sample_shape(self, resolution: int | None = None, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        """What the denoiser sees at ``height x width`` pixels (``resolution``: both) and ``num_frames`` frames
        (video), ``Teacher.sample_shape`` of this folder's pipeline: ``(C, H, W)``, ``(C, F, H, W)`` for video;
        packed families' ``C`` is ``in_channels / 4``. ``None``: the teacher's own size (the denoiser's
        ``sample_size`` times the VAE's factor, or the pipeline's default: Flux 1024², Qwen-Image 1024²
        (``QwenImagePipeline.default_sample_size`` 128 times the VAE's 8), Wan 480 x 832 and 81 frames,
        SANA 1024²). A size its latents cannot have is one line naming it."""
        model = build_network(self.folder, "meta")
        schedule = schedule_from_config(self.scheduler_config, self.scheduler_class)
        teacher = Teacher(pipeline=self.pipeline(model), denoiser=Denoiser(model, schedule), schedule=schedule,
                          source=str(self.folder), height=resolution or height, width=resolution or width,
                          num_frames=num_frames)
        try:
            _check_size(teacher)
        except InputError as err:
            raise InputError(f"resolution {resolution}: {err}" if resolution else str(err)) from None
        return teacher.sample_shape


def build_network(source: str | Path, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The teacher's denoiser from its config with random weights (``device="meta"``: no memory at all)."""
    import diffusers

    spec = TeacherSpec.read(source)
    cls = getattr(diffusers, spec.model_class)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in their dtype (fake ones cannot be converted by Module.to)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls.from_config(spec.model_config)
    finally:
        torch.set_default_dtype(default)


def count_parameters(source: str | Path) -> int:
    """Parameters of the teacher's denoiser, counted on the ``meta`` device."""
    return sum(p.numel() for p in build_network(source, "meta").parameters())


class ConfigTeacher(Teacher):
    """A ``Teacher`` built from configs alone: its pipeline is ``TeacherSpec.pipeline`` (no text encoders, a VAE on
    the ``meta`` device); text conditions are zeros of the encoders' output shapes."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, shape: tuple[int, ...], schedule=None):
        schedule = schedule or schedule_from_config(spec.scheduler_config, spec.scheduler_class)
        super().__init__(pipeline=spec.pipeline(model), denoiser=Denoiser(model, schedule), schedule=schedule,
                         source=str(spec.folder))
        self.spec = spec
        self._shape = shape

    @property
    def sample_shape(self):
        return self._shape

    def encode_prompts(self, prompts):
        """Zeros of the embeddings' shapes in the network's dtype (as a pipeline at that precision gives; attention
        masks: ones), as long as the family's pipeline makes them: CLIP's 77 tokens (SD, SDXL), 77 CLIP tokens and
        the ``max_sequence_length`` T5 tokens of its ``__call__`` (SD3: 77 + 256), that many tokens for Flux (T5,
        512), Wan (UMT5, 512) and SANA (Gemma 2, 300). Qwen-Image's embeddings are as long as the longest prompt
        of the batch, truncated at ``max_sequence_length`` (``QwenImagePipeline.encode_prompt``): its bound, 512,
        is taken."""
        n, cfg, family = len(prompts), self.model.config, self.family.name
        device = next(self.model.parameters()).device
        zeros = functools.partial(torch.zeros, dtype=self.model.dtype, device=device)
        tokens = call_default(self.pipeline, "max_sequence_length")
        if family == "sd3":
            return {"encoder_hidden_states": zeros(n, 77 + tokens, cfg.joint_attention_dim),
                    "pooled_projections": zeros(n, cfg.pooled_projection_dim)}
        if family == "flux":
            return {"encoder_hidden_states": zeros(n, tokens, cfg.joint_attention_dim),
                    "pooled_projections": zeros(n, cfg.pooled_projection_dim)}
        if family == "wan":
            return {"encoder_hidden_states": zeros(n, tokens, cfg.text_dim)}
        ones = functools.partial(torch.ones, dtype=torch.long, device=device)
        if family == "sana":
            return {"encoder_hidden_states": zeros(n, tokens, cfg.caption_channels),
                    "encoder_attention_mask": ones(n, tokens)}
        if family == "qwen-image":
            return {"encoder_hidden_states": zeros(n, tokens, cfg.joint_attention_dim),
                    "encoder_hidden_states_mask": ones(n, tokens)}
        embeds = zeros(n, 77, cfg.cross_attention_dim)
        if family == "sdxl":  # pooled text + 6 size/crop ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            return {"encoder_hidden_states": embeds,
                    "added_cond_kwargs": {"text_embeds": zeros(n, pooled), "time_ids": zeros(n, 6)}}
        return {"encoder_hidden_states": embeds}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live storages: a storage counts from the op that made it (or ``track``) until its
    last tensor is freed. ``.item()``-like reads of fake tensors, which hold no values, answer True for a bool (a
    finiteness check), 0 for an integer (a drawn step index) and 1.0 for a float (an optimizer's step count)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key).atexit = False

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 0)
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


class StepTracker(LiveBytes):
    """``LiveBytes`` that also splits each phase in two moments: its *pass* (forward and backward, from after its
    ``zero_grad``) and its *update* (clipping, the optimizer step, the EMA, after the backward); for the pass it
    records which of the phase's gradients backward had made at the pass's peak (``grad_made``, a
    post-accumulate-grad hook). ``fastgen.estimate.per_device`` shards these measured moments."""

    def __init__(self):
        super().__init__()
        self.made: list[torch.Tensor] = []
        self.made_at_peak = 0
        self.moments: dict[str, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        before = self.peak
        super().track(tensor)
        if self.peak > before:
            self.made_at_peak = len(self.made)

    def grad_made(self, param: torch.Tensor) -> None:
        self.made.append(param)

    def begin_pass(self) -> None:
        self.made, self.made_at_peak = [], 0
        self.reset_peak()
        self.moments = {}

    def backward_done(self) -> None:
        self.moments.update(pass_peak=self.peak, after_backward=self.now, made=self.made[:self.made_at_peak])
        self.reset_peak()

    def end_phase(self) -> dict:
        """The phase's moments (live bytes) and the gradients backward had made at the pass's peak."""
        return {**self.moments, "update_peak": self.peak}


class TrackedBackend(PlainBackend):
    """``PlainBackend`` that tells a ``StepTracker`` when the phase's backward is done."""

    def __init__(self, tracker: StepTracker, dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.tracker = tracker

    def backward(self, loss):
        super().backward(loss)
        self.tracker.backward_done()


@dataclass
class Estimate:
    """Expected peak memory of one device; ``rows``: ``(network, kind, bytes)``. ``layout``: the launch it is for
    (world size, sharding, offload, global batch, host memory per process); ``footprint``: what the simulation
    measured, from which ``per_device`` derives the figure of any launch."""

    rows: list[tuple[str, str, int]]
    parameters: dict[str, int]
    total_bytes: int
    peak_phase: str
    settings: dict
    modes: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    """Modes this teacher cannot run, with the reason (a UNet2DModel has no LoRA support)."""
    activations: str = "simulated"
    layout: dict = field(default_factory=dict)
    footprint: Footprint | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"parameters": self.parameters, "total_bytes": self.total_bytes,
                "rows": [{"network": n, "kind": k, "bytes": b} for n, k, b in self.rows],
                "peak_phase": self.peak_phase, "activations": self.activations, "settings": self.settings,
                "modes": self.modes, "unavailable_modes": self.unavailable, "layout": self.layout}


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


# -- one device of a launch: replicated (DDP) or sharded (FSDP2) ----------------------------------------------


SHARDINGS = get_args(get_type_hints(TrainConfig)["sharding"])
"""``train.sharding``'s values (``none``, ``fsdp2``)."""


def shard_shapes(tensors) -> list[tuple[int, int]]:
    """``(dim 0, bytes per index of dim 0)`` of each distinct storage among ``tensors`` (a 0-d tensor: one index)."""
    seen, shapes = set(), []
    for t in tensors:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            rows = t.shape[0] if t.dim() and t.shape[0] else 1
            shapes.append((rows, storage.nbytes() // rows))
    return shapes


def sharded_bytes(shapes: list[tuple[int, int]], world_size: int) -> int:
    """The bytes one device holds of tensors sharded on dim 0 over ``world_size`` processes: ``ceil(dim0 / N)``
    indices of each. FSDP2 (``fully_shard``) chunks every parameter on dim 0 with ``torch.chunk`` and pads each
    shard to the first (largest) chunk, so the first process holds exactly this much (docs/fsdp2_findings.md, 1);
    the gradients, AdamW's states and the EMA shadows are made like their parameters."""
    return sum(-(-rows // world_size) * size for rows, size in shapes)


@dataclass
class PhaseMoments:
    """One phase of the simulated step, in live bytes (``StepTracker``): ``start``, before its ``zero_grad``;
    ``pass_peak``, the peak of its forward and backward; ``after_backward``; ``update_peak``, the peak of its
    clipping, optimizer step and EMA. ``own``: its own gradients, freed at its start (shapes, bytes); ``made``:
    those of them that backward had made again at ``pass_peak``."""

    start: int
    pass_peak: int
    after_backward: int
    update_peak: int
    own: list[tuple[int, int]]
    own_bytes: int
    made: list[tuple[int, int]]
    made_bytes: int


@dataclass
class Footprint:
    """What the simulation measured: the steady state's tensors by ``(network, kind)`` (``shard_shapes``),
    AdamW's states' scale (8-bit: a quarter), each phase's moments, the VAE's and text encoders' bytes,
    ``static`` (live bytes of the steady state: those tensors, the batch and buffers) and ``gathered``
    (FSDP2's unsharded parameters at once, ``gathered_bytes``)."""

    state: dict[tuple[str, str], list[tuple[int, int]]]
    optimizer_scale: float
    phases: dict[str, PhaseMoments]
    components: dict[str, int]
    static: int
    gathered: int

    def state_rows(self, world_size: int = 1) -> list[tuple[str, str, int]]:
        """The steady state's rows on one device, each tensor sharded over ``world_size`` processes."""
        return [(network, kind, int(sharded_bytes(shapes, world_size)
                                    * (self.optimizer_scale if kind == "optimizer" else 1.0)))
                for (network, kind), shapes in self.state.items()]

    @property
    def gradient_bytes(self) -> int:
        return sum(sharded_bytes(shapes, 1) for (_, kind), shapes in self.state.items() if kind == "gradients")

    @property
    def other(self) -> int:
        """Batch, buffers, step counters: the steady state's live bytes that are not the state's tensors."""
        return self.static - sum(sharded_bytes(shapes, 1) for shapes in self.state.values())


def gathered_bytes(run, trained: set[int], attributes, reshard_after_forward: bool) -> int:
    """FSDP2's transient on one device: the unsharded parameters its all-gathers hold at once, for the networks
    the trainer shards (``fastgen.assemble.every_network``), each split in blocks as ``fastgen.sharding.blocks``
    splits it (``train.fsdp_blocks``, in the order the network runs them). The rule, with
    ``reshard_after_forward`` (FSDP2's default): every network's root parameters (those outside its blocks) plus
    the largest two consecutive units of one network (the unit computing and the next one, prefetched: FSDP2's
    default in forward and backward); without it, every network whole (its blocks stay gathered from forward to
    backward). Plus the largest unit's trained parameters' unsharded gradients (FSDP2's reduce-scatter input).
    A unit's size is its own parameters: a block's, less those of its parts sharded before it.
    In the dtype each parameter is held in: ``fastgen.sharding.shard`` gathers without a ``MixedPrecisionPolicy``
    (trained weights in float32, a half-precision teacher in its own)."""
    from fastgen.assemble import every_network
    from fastgen.sharding import blocks

    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    roots = every_network(run.teacher, {n: run.nets[n] for n in run.network_names}, run.objective)
    own = pair = whole = grads = 0
    for root in roots:
        units, claimed = [], set()
        for unit in blocks(root, attributes):  # a block after its parts: its own unit holds the rest
            units.append([p for p in unit.parameters() if id(p) not in claimed])
            claimed.update(id(p) for p in units[-1])
        own += size(p for p in root.parameters() if id(p) not in claimed)
        whole += size(root.parameters())
        sizes = [size(unit) for unit in units]
        pair = max([pair, *sizes, *(a + b for a, b in zip(sizes, sizes[1:]))])
        grads = max([grads, *(size(p for p in unit if id(p) in trained) for unit in units)])
    return (own + pair if reshard_after_forward else whole) + grads


def check_layout(world_size: int, sharding: str, offload: bool) -> None:
    """A launch's settings, checked: one line naming the flag and what was expected."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise UsageError(f"--world-size is {world_size!r}; expected a positive integer (the number of processes)")
    if sharding not in SHARDINGS:
        raise UsageError(f"--sharding is {sharding!r}; expected one of {list(SHARDINGS)}")
    if offload and sharding != "fsdp2":
        raise UsageError(f"--offload (train.fsdp_offload) is set with sharding {sharding!r}; expected --sharding fsdp2 "
                         "(the CPU offload is FSDP2's)")


def phase_peaks(fp: Footprint, shards: int, offload: bool, gathered: int, buckets: int) -> dict[str, int]:
    """Each phase's peak on one device, from its measured moments, the state sharded over ``shards`` processes
    (1: replicated). The largest of: its start (the steady state); its pass, where the activations (the pass's
    peak less the state then live) are not divided but the state is, its own gradients freed and those made
    again by the peak included, plus ``gathered``; its update, where the optimizer's temporaries are divided
    like the parameters they are made of. ``offload``: the state lives on the host, and so does the update's
    work. ``buckets``: DDP's, held throughout."""
    held = 0 if offload else sum(b for _, _, b in fp.state_rows(shards))
    raw = fp.static - fp.other
    peaks = {}
    for name, m in fp.phases.items():
        rest = m.start - raw + buckets  # not the state: batch, buffers, what earlier phases left, DDP's buckets
        activations = m.pass_peak - (m.start - m.own_bytes + m.made_bytes)
        grads = 0 if offload else sharded_bytes(m.made, shards) - sharded_bytes(m.own, shards)
        temporaries = 0 if offload else -(-(m.update_peak - m.after_backward) // shards)
        peaks[name] = max(rest + held, rest + held + grads + activations + gathered,
                          rest + held + (m.after_backward - m.start) + temporaries)
    return peaks


def per_device(est: Estimate, world_size: int = 1, sharding: str | None = None,
               offload: bool | None = None) -> Estimate:
    """``est`` (a simulated step of one process) as the peak of one device of a launch of ``world_size``
    processes (``torchrun --nproc_per_node N``), derived from the same measured footprint:

    - ``sharding="none"`` (DDP when N > 1): everything replicated; N > 1 adds DDP's gradient buckets, one more
      copy of every trained network's gradients (accelerate's default ``gradient_as_bucket_view=False``);
    - ``"fsdp2"``: weights (the frozen teacher's too), gradients, optimizer states and EMA sharded per tensor
      (``sharded_bytes``); activations, the batch, buffers, the VAE and text encoders (not sharded by the
      trainer) not divided; plus the all-gathered blocks (``gathered_bytes``), also at N = 1;
    - ``offload`` (FSDP2's ``CPUOffloadPolicy``, ``train.fsdp_offload``): the sharded state and the optimizer
      step move to host memory (``layout["host_bytes"]`` per process); the device holds the rest.

    ``sharding`` and ``offload`` default to the run's config (``train.sharding``, ``train.fsdp_offload``)."""
    s = est.settings
    sharding = s["sharding"] if sharding is None else sharding
    offload = s["fsdp_offload"] if offload is None else offload
    check_layout(world_size, sharding, offload)
    fp = est.footprint
    shards = world_size if sharding == "fsdp2" else 1
    gathered = fp.gathered if sharding == "fsdp2" else 0
    buckets = fp.gradient_bytes if sharding == "none" and world_size > 1 else 0
    peaks = phase_peaks(fp, shards, offload, gathered, buckets)
    peak_phase = max(peaks, key=peaks.get)
    total = peaks[peak_phase] + sum(fp.components.values())
    state = [r for r in fp.state_rows(shards) if r[2] > 0]
    rows = [] if offload else list(state)
    rows += [(name, "weights", n) for name, n in fp.components.items()] + [("batch, buffers", "other", fp.other)]
    rows += [r for r in [("fsdp2", "gathered blocks", gathered), ("ddp", "gradient buckets", buckets)] if r[2]]
    rows.append((peak_phase, "activations", total - sum(r[2] for r in rows)))  # and the step's temporaries
    host = sum(r[2] for r in state) + max(-(-(m.update_peak - m.after_backward) // shards)
                                          for m in fp.phases.values()) if offload else 0
    batch = s["batch_size"] * s["grad_accum"] * world_size
    layout = {"world_size": world_size, "sharding": sharding, "offload": offload, "global_batch": batch,
              "host_bytes": host, "host_rows": [list(r) for r in state] if offload else [],
              "gathered_bytes": gathered, "ddp_bucket_bytes": buckets}
    return dataclasses.replace(est, rows=rows, total_bytes=int(total), peak_phase=peak_phase, layout=layout)


def estimate_memory(config: DistillConfig, resolution: int | None = None, device: str = "cuda",
                    optimizer: str = "adamw", world_size: int = 1) -> Estimate:
    """Expected peak memory per device of ``Trainer(config)`` launched on ``world_size`` processes (sharded or
    not as ``config.train.sharding`` says: ``per_device``), at ``resolution`` pixels (default: the teacher's
    sample size) and ``config.train.batch_size``; see the module docstring.

    Within it only, two messages that the estimate's own fake tensors cause and that tell the user nothing are
    dropped: torch's "Accessing the data pointer of FakeTensor is deprecated" warning and diffusers' "There are
    modules in ... that should be kept in float32" log line (networks built in their dtype are cast, as fakes)."""
    import logging
    import warnings

    check_layout(world_size, config.train.sharding, config.train.fsdp_offload)

    def kept_in_float32(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("There are modules in ")

    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addFilter(kept_in_float32)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor is deprecated",
                                    category=UserWarning)
            return per_device(_estimate_memory(config, resolution, device, optimizer), world_size)
    finally:
        diffusers_logger.removeFilter(kept_in_float32)


def _estimate_memory(config: DistillConfig, resolution: int | None, device: str, optimizer: str) -> Estimate:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer is {optimizer!r}; expected one of {list(OPTIMIZERS)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device is {device!r}; expected 'cuda' or 'cpu'")
    config.validate()
    if config.student.experts != 1:
        raise UsageError(f"student.experts is {config.student.experts}; the estimate covers a student of one "
                         "network (1): estimate with student.experts=1 student.expert_boundaries=null and add one "
                         "student's weights, gradients and optimizer states per further expert")
    if getattr(config.objective, "jvp", None) == "exact":
        raise UsageError(f"objective.jvp is 'exact': forward-mode AD (torch.func.jvp) does not run on the estimate's "
                         f"fake tensors; estimate with objective.jvp=finite_difference (method {config.method!r}: the "
                         "exact JVP's step measured 1.33x the peak memory of the finite difference's, docs/jvp.md)")
    spec = TeacherSpec.read(config.teacher)
    t = config.train
    dtype = weight_dtype(t.mixed_precision)
    shape = spec.sample_shape(resolution, **config.size())
    schedule = schedule_from_config(spec.scheduler_config, spec.scheduler_class)  # real tensors: checks read them
    plan = run_plan(config, schedule)  # on real tensors too: the plan reads the grids' values
    tracker = StepTracker()
    kwargs = {"fused": True} if optimizer == "fused" else {"foreach": device == "cuda"}
    # built on the meta device (conversions and peft's adapter moves work there), then turned into fake tensors on
    # the CPU (shapes, dtypes and CPU autocast, no memory) before the optimizers and the EMA are made
    full = build_network(spec.folder, "meta")
    teacher = ConfigTeacher(spec, full if dtype == torch.float32 else build_network(spec.folder, "meta", dtype),
                            shape, schedule)
    teacher.model.requires_grad_(False).eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    run = build_run(config, teacher, source=full, plan=plan, optimizer_kwargs=kwargs,
                    attention="sdpa" if t.attention == "xformers" else t.attention,
                    materialize=functools.partial(to_fake, mode, {}))
    with mode:
        trainable = run.trainable
        owned_ids = {id(p) for ps in trainable.values() for p in ps}
        base = [p for p in teacher.model.parameters() if id(p) not in owned_ids]
        frozen = {"teacher": base, **{name: [p for p in run.module(name).parameters() if id(p) not in owned_ids
                                             and all(p is not q for q in base)]
                                      for name in run.network_names}}
        kept = kept_networks(run, [base, *trainable.values(), *frozen.values()])
        # the steady state: every trainable parameter holds its gradient and optimizer states (a phase sets its
        # own gradients to None only at its start, so the other phases' gradients stay alive through it)
        for params in trainable.values():
            for p in params:
                p.grad = torch.zeros_like(p)
                p.register_post_accumulate_grad_hook(tracker.grad_made)
        for opt in run.optimizers.values():
            opt.step()
        batch = synthetic_batch(teacher, t.batch_size, shape)
        # shapes only: a list of the gradients would keep them alive through the phases' zero_grad
        state = {key: shard_shapes(tensors) for key, tensors in _state_tensors(run, base, frozen, kept).items()}
        gathered = gathered_bytes(run, owned_ids, t.fsdp_blocks, t.fsdp_reshard_after_forward)
        for tensor in _live_tensors(run, batch, kept):
            tracker.track(tensor)
        static = tracker.now
        phases = {}
        backend = TrackedBackend(tracker, dtype)
        with tracker:
            for phase in run.phases:
                phases[phase.name] = _simulate_phase(run, phase, batch, backend, t.grad_clip)
        parameters = {"teacher": sum(p.numel() for p in base),
                      **{name: sum(p.numel() for p in trainable[name]) for name in run.network_names},
                      **{name: sum(p.numel() for p in params) for name, params in kept.items()}}
        # the fake tensors die here, while their mode is alive: left to the interpreter's teardown, those saved by
        # a gradient-checkpointed step abort it ('corrupted double-linked list', exit status 134)
        del run, trainable, base, frozen, kept, teacher, full, batch, backend
        gc.collect()
    components = spec.component_parameters()
    element = torch.tensor([], dtype=dtype).element_size()
    footprint = Footprint(state, 0.25 if optimizer == "8bit" else 1.0, phases,
                          {name: n * element for name, n in components.items()}, static, gathered)
    parameters = {"teacher": parameters.pop("teacher"), **components, **parameters}
    settings = {"teacher": str(config.teacher), "method": config.method, "sample_shape": list(shape),
                "batch_size": t.batch_size, "grad_accum": t.grad_accum, "mixed_precision": t.mixed_precision,
                "gradient_checkpointing": t.gradient_checkpointing, "student.lora_rank": config.student.lora_rank,
                "objective.fake_lora_rank": getattr(config.objective, "fake_lora_rank", 0),
                "ema_decay": t.ema_decay, "optimizer": optimizer, "device": device, "sharding": t.sharding,
                "fsdp_offload": t.fsdp_offload, "fsdp_reshard_after_forward": t.fsdp_reshard_after_forward}
    return per_device(Estimate([], parameters, 0, "", settings, footprint=footprint), 1, "none", False)


def kept_networks(run, counted) -> dict[str, list[torch.nn.Parameter]]:
    """The frozen networks the objective keeps beside ``nets`` (consistency's EMA target), by attribute name: their
    parameters not among ``counted`` (lists of the teacher's and the networks' parameters)."""
    seen = {id(p) for params in counted for p in params}
    kept = {}
    for attr, value in vars(run.objective).items():
        if isinstance(value, torch.nn.Module):
            params = [p for p in value.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                kept[attr] = params
    return kept


def _state_tensors(run, base, frozen, kept) -> dict[tuple[str, str], list[torch.Tensor]]:
    """The steady state's tensors by ``(network, kind)``: weights (the teacher's base, then each network's own,
    then the frozen networks the objective keeps), gradients, optimizer states (AdamW's two moments; step counts
    left out) and the students' EMA shadows."""
    trainable, names = run.trainable, run.network_names
    state = {("teacher", "weights"): base}
    state.update({(name, "weights"): trainable[name] + frozen[name] for name in names})
    state.update({(name, "weights"): params for name, params in kept.items()})
    state.update({(name, "gradients"): [p.grad for p in trainable[name]] for name in names})
    state.update({(name, "optimizer"): [s for p in trainable[name] for opt in run.optimizers.values()
                                        for s in opt.state.get(p, {}).values() if s.dim() > 0] for name in names})
    state.update({(name, "ema"): list(ema.shadow_params) for name, ema in run.emas.items()})
    return state


def _simulate_phase(run, phase, batch, backend: TrackedBackend, grad_clip) -> PhaseMoments:
    """Run ``phase`` once through the trainer's ``run_phase`` and return its measured moments. The phase's own
    ``zero_grad`` (its first act) is done here first, so that its pass is measured from the freed gradients."""
    tracker = backend.tracker
    own = [p.grad for name in run.owned(phase) for p in run.trainable[name] if p.grad is not None]
    start, own_shapes, own_bytes = tracker.now, shard_shapes(own), _bytes(own)
    del own
    run.optimizers[phase.name].zero_grad(set_to_none=True)
    tracker.begin_pass()
    run_phase(run, phase, itertools.repeat(batch), 0, backend, grad_clip=grad_clip)
    moments = tracker.end_phase()
    made = [p.grad for p in moments.pop("made") if p.grad is not None]
    return PhaseMoments(start, moments["pass_peak"], moments["after_backward"], moments["update_peak"],
                        own_shapes, own_bytes, shard_shapes(made), _bytes(made))


def to_fake(mode: FakeTensorMode, memo: dict, module: torch.nn.Module) -> None:
    """Turn the ``meta`` parameters and buffers of ``module`` into fake CPU tensors of ``mode`` (in place; a
    tensor shared between modules becomes one fake tensor, through ``memo``). ``Module._apply`` assigns a new
    parameter for a meta one (no ``swap_tensors``, which fake tensors refuse)."""
    cpu = torch.device("cpu")

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return t
        if id(t) not in memo:
            memo[id(t)] = (t, mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu))
        return memo[id(t)][1]

    module._apply(convert)


def synthetic_batch(teacher, n: int, shape) -> Batch:
    """A batch of ``n`` random samples of ``shape`` with every field an objective may read (data, ODE noise,
    empty-prompt or class-0 conditions), for measuring a step without a dataset."""
    cond = uncond = None
    if teacher.text_conditioned:
        cond, uncond = teacher.encode_prompts([""] * n), teacher.null_cond(n)
    elif teacher.num_classes:
        cond = teacher.class_cond(torch.zeros(n, dtype=torch.long))
    return Batch(x0=torch.randn(n, *shape), cond=cond, uncond=uncond, noise=torch.randn(n, *shape), size=n)


def _live_tensors(run, batch, kept):
    yield from run.teacher.model.parameters()
    yield from run.teacher.model.buffers()
    for params in kept.values():
        yield from params
    for name in run.network_names:
        module = run.module(name)
        yield from module.parameters()
        yield from module.buffers()
        yield from (p.grad for p in module.parameters() if p.grad is not None)
    for opt in run.optimizers.values():
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    for ema in run.emas.values():
        yield from ema.shadow_params
    yield from (v for v in tree_flatten([batch.x0, batch.noise, batch.cond, batch.uncond])[0]
                if isinstance(v, torch.Tensor))


# -- modes and budgets --------------------------------------------------------------------------------------


MODE_LORA_RANK = 64
"""The LoRA rank of the modes that switch a LoRA fake score or student on (DMD2's SDXL recipe's rank)."""
AS_CONFIGURED = "(as configured)"
"""The mode key of the run's own settings."""


def mode_overrides(config: DistillConfig) -> list[list[str]]:
    """The memory modes, each as the overrides that select it: the run's own settings, then one memory saving
    after another switched on, the cheapest in quality first: gradient checkpointing (costs time only), a LoRA
    fake score on the teacher's shared weights (objectives with ``fake_lora_rank``; DMD2's SDXL recipe), a LoRA
    student. A saving the run already has is not repeated."""
    savings = []
    if not config.train.gradient_checkpointing:
        savings.append("train.gradient_checkpointing=true")
    if getattr(config.objective, "fake_lora_rank", None) == 0:
        savings.append(f"objective.fake_lora_rank={MODE_LORA_RANK}")
    if config.student.lora_rank == 0:
        savings.append(f"student.lora_rank={MODE_LORA_RANK}")
    return [savings[:k] for k in range(len(savings) + 1)]


def with_overrides(config: DistillConfig, overrides: list[str]) -> DistillConfig:
    return config_from_dict(DistillConfig, merge_overrides(DistillConfig, config_to_dict(config), overrides))


def _mode_total(config: DistillConfig, overrides: list[str], resolution: int | None, device: str,
                optimizer: str, world_size: int = 1) -> int | str:
    """One mode's total bytes per device (in a worker process), or why this teacher cannot run it (a LoRA mode
    of a network without adapter support)."""
    try:
        return estimate_memory(with_overrides(config, overrides), resolution, device, optimizer, world_size).total_bytes
    except UsageError as error:
        return str(error)


def estimate_with_modes(config: DistillConfig, resolution: int | None = None, device: str = "cuda",
                        optimizer: str = "adamw", workers: int | None = None, world_size: int = 1) -> Estimate:
    """``estimate_memory`` of the run, with ``modes``: ``{overrides: total_bytes}`` for every mode of
    ``mode_overrides`` (the run's own settings keyed ``AS_CONFIGURED``). Fake tensors are Python dispatch, so
    the modes are simulated side by side in ``workers`` processes (default: one per CPU core, at most one per
    mode) while this process simulates the run itself. The workers are forked (they inherit the imports, 5-6 s
    of CPU each) where this process runs one thread, else spawned (forking a process with other threads can
    deadlock a child on a lock one of them held)."""
    import multiprocessing
    import os
    import threading
    from concurrent.futures import ProcessPoolExecutor

    ladder = mode_overrides(config)[1:]
    if not ladder:
        est = estimate_memory(config, resolution, device, optimizer, world_size)
        est.modes = {AS_CONFIGURED: est.total_bytes}
        return est
    workers = workers or min(len(ladder), os.cpu_count() or 1)
    start = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start)) as pool:
        futures = {" ".join(o): pool.submit(_mode_total, config, o, resolution, device, optimizer, world_size)
                   for o in ladder}
        est = estimate_memory(config, resolution, device, optimizer, world_size)
        results = {key: f.result() for key, f in futures.items()}
    est.modes = {AS_CONFIGURED: est.total_bytes, **{k: v for k, v in results.items() if isinstance(v, int)}}
    est.unavailable = {k: v for k, v in results.items() if isinstance(v, str)}
    return est


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"80 GB"``, ``"512MiB"`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"budget is {text!r}; expected a size like 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def launch_line(est: Estimate) -> str:
    """The launch an estimate is for, with its global batch (as ``fastgen distill`` prints it)."""
    lay, s = est.layout, est.settings
    n = lay.get("world_size", 1)
    how = f"sharding {lay.get('sharding', 'none')}" + (", CPU offload" if lay.get("offload") else "")
    return (f"{n} process{'es' if n > 1 else ''}, {how}: global batch {s['batch_size']} x {s['grad_accum']} x {n} = "
            f"{lay.get('global_batch', s['batch_size'] * s['grad_accum'])} per step")


def layout_notes(est: Estimate) -> list[str]:
    """What a sharded or data-parallel figure divides and adds (``per_device``), and the host memory of offload."""
    lay = est.layout
    n = lay.get("world_size", 1)
    if lay.get("sharding") == "fsdp2":
        lines = [f"fsdp2: weights (the teacher's too), gradients, optimizer states and EMA sharded over {n} "
                 f"(ceil(dim 0 / {n}) of each tensor per device); activations, batch, buffers, VAE and text encoders "
                 "not divided; gathered blocks: every network's root parameters, the largest two consecutive units "
                 "(computing, prefetched; a UNet block's resnets and attention modules, then the rest of the block) "
                 "and one unit's gradients, unsharded in their own dtype"]
        if lay.get("offload"):
            kinds = {}
            for _, kind, b in lay["host_rows"]:
                kinds[kind] = kinds.get(kind, 0) + b
            parts = ", ".join(f"{kind} {human(b)}" for kind, b in kinds.items())
            lines.append(f"host memory per process (CPU offload): {human(lay['host_bytes'])} ({parts}, plus the "
                         "optimizer step's temporaries)")
        return lines
    if n > 1:
        return ["ddp: every network replicated; gradient buckets: one more copy of the trained gradients (DDP's "
                "default gradient_as_bucket_view=False)"]
    return []


def format_table(est: Estimate, budget: int | None = None) -> str:
    s = est.settings
    lines = [f"peak memory per device: {s['teacher']}, {s['method']}, sample {tuple(s['sample_shape'])}, batch "
             f"{s['batch_size']}, mixed precision {s['mixed_precision']}, gradient checkpointing "
             f"{s['gradient_checkpointing']}, optimizer {s['optimizer']} ({s['device']})", launch_line(est),
             "", "| network | kind | parameters | memory |", "|---|---|---:|---:|"]
    for network, kind, n in est.rows:
        count = est.parameters.get(network, "") if kind == "weights" else ""
        label = f"{kind} ({'peak phase' if kind == 'activations' else ''})".replace(" ()", "")
        lines.append(f"| {network} | {label} | {count:,} | {human(n)} |" if count != "" else
                     f"| {network} | {label} | | {human(n)} |")
    lines.append(f"| **total** | | | **{human(est.total_bytes)}** |")
    lines.append("")
    lines.append(f"activations: {est.activations} on fake tensors (one micro-batch, every phase; peak in "
                 f"{est.peak_phase!r}); add the CUDA context and allocator slack (~0.5-1 GiB) on a GPU")
    lines += layout_notes(est)
    if est.modes:
        lines += ["", "| mode (overrides) | total | fits |" if budget else "| mode (overrides) | total |",
                  "|---|---:|---|" if budget else "|---|---:|"]
        for key, n in sorted(est.modes.items(), key=lambda kv: kv[1]):
            fits = ("yes" if n <= budget else "no") if budget else None
            label = key if key == AS_CONFIGURED else f"`{key}`"
            lines.append(f"| {label} | {human(n)} |" + (f" {fits} |" if fits else ""))
        for key, reason in est.unavailable.items():
            lines.append(f"| `{key}` | n/a: {reason} |" + (" no |" if budget else ""))
    if budget:
        lines.append("")
        if est.total_bytes <= budget:
            lines.append(f"fits the budget of {human(budget)}")
        else:
            fitting = sorted((n, k) for k, n in est.modes.items() if n <= budget)
            lines.append(f"over the budget of {human(budget)} by {human(est.total_bytes - budget)}; " + (
                f"these settings fit: {fitting[-1][1]} ({human(fitting[-1][0])}, the largest that fits)"
                if fitting else ("no mode fits: lower train.batch_size or the resolution" if est.modes
                                 else "run with --modes to see which settings fit")))
    return "\n".join(lines)
