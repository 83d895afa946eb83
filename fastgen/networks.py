"""The networks an objective trains besides the student, built by the trainer the way it builds the student.

An objective declares what it needs by kind, through the ``NetworkFactory`` it is given:

- ``factory.copy()``: a trainable full-precision copy of the teacher network (a fake score, a critic);
- ``factory.lora(name, rank)``: a peft LoRA adapter on the teacher's *own* frozen weights. One copy of the
  base serves the teacher and every adapter: the adapter is switched on for its own calls only
  (``AdapterDenoiser``), and the teacher's calls run on the base alone. This is the memory mode that lets
  DMD2 on SDXL-size networks fit one GPU;
- ``factory.module(m)``: a small network of the objective's own (a discriminator head on features).

Every network gets the run's attention backend and gradient checkpointing; mixed precision comes from the
trainer's autocast, the trainable weights stay float32. Distributed wrappers are the trainer's business.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from fastgen.denoiser import BaseDenoiser, Denoiser, activate_adapter, adapter_flags_kept, unwrap
from fastgen.errors import EnvironmentMissingError, UsageError

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def configure_network(model: nn.Module, attention: str = "default", gradient_checkpointing: bool = False) -> None:
    """The run's attention backend (``set_attention``) and gradient checkpointing (diffusers'
    ``enable_gradient_checkpointing``)."""
    set_attention(model, attention)
    if gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise UsageError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; "
                             "expected false")
        model.enable_gradient_checkpointing()


def set_attention(model: nn.Module, attention: str) -> None:
    """Attention backend ``attention`` (``train.attention``) through diffusers' own mechanism for each attention
    module of ``model``, never a processor of another family (``attention_modules`` tells the two kinds apart):

    - "default": the processors diffusers installed, untouched;
    - "sdpa": torch's ``scaled_dot_product_attention`` (``_use_sdpa``);
    - "xformers": xformers' memory-efficient kernel (``_use_xformers``)."""
    if attention == "default":
        return
    dispatched, classic = attention_modules(model)
    if attention == "sdpa":
        _use_sdpa(model, dispatched, classic)
    elif attention == "xformers":
        _use_xformers(model, dispatched, classic)
    else:
        raise UsageError(f"train.attention is {attention!r}; expected 'default', 'sdpa' or 'xformers'")


def attention_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``model``'s attention modules (those with a diffusers processor), split by how the processor computes:

    - dispatched: the processor calls ``diffusers.models.attention_dispatch.dispatch_attention_fn`` and carries the
      backend it asks for (``_attention_backend``; Flux, Wan, QwenImage, HunyuanVideo, ...);
    - classic: the processor calls torch itself, so its class is the backend (``AttnProcessor2_0`` of the UNets,
      ``JointAttnProcessor2_0`` of SD3, Sana's linear attention, ...)."""
    modules = [m for m in model.modules() if getattr(m, "processor", None) is not None and hasattr(m, "set_processor")]
    dispatched = [m for m in modules if hasattr(m.processor, "_attention_backend")]
    classic = [m for m in modules if not hasattr(m.processor, "_attention_backend")]
    return dispatched, classic


def _sdpa_siblings() -> dict[type, type]:
    """The classic processors that compute attention without SDPA and their SDPA sibling: the processor diffusers'
    ``Attention`` itself picks when torch has ``scaled_dot_product_attention`` and the scale is the default one."""
    from diffusers.models import attention_processor as ap

    return {ap.AttnProcessor: ap.AttnProcessor2_0, ap.AttnAddedKVProcessor: ap.AttnAddedKVProcessor2_0}


def _xformers_families() -> tuple[type, ...]:
    """The classic processors that diffusers' ``Attention.set_use_memory_efficient_attention_xformers`` replaces
    by the xformers processor of their own family (plain → ``XFormersAttnProcessor``, joint →
    ``XFormersJointAttnProcessor``, added key/value → ``XFormersAttnAddedKVProcessor``); it would replace any other
    processor (Sana's linear attention, ...) by the plain one."""
    from diffusers.models import attention_processor as ap

    return (ap.AttnProcessor, ap.AttnProcessor2_0, ap.XFormersAttnProcessor, ap.JointAttnProcessor2_0,
            ap.XFormersJointAttnProcessor, ap.AttnAddedKVProcessor, ap.AttnAddedKVProcessor2_0,
            ap.XFormersAttnAddedKVProcessor)


def _use_sdpa(model: nn.Module, dispatched: list[nn.Module], classic: list[nn.Module]) -> None:
    """SDPA: the dispatcher's "native" backend for dispatched processors (``ModelMixin.set_attention_backend``);
    a classic processor is kept when it is SDPA-based already (what diffusers installs by default on torch 2:
    ``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ...) or has no SDPA form (linear attention), and replaced by
    its SDPA sibling when it is one of the plain processors without SDPA (``_sdpa_siblings``)."""
    if dispatched:
        _set_backend(model, "native")
    siblings = _sdpa_siblings()
    for module in classic:
        sibling = siblings.get(type(module.processor))
        if sibling is not None and getattr(module, "scale_qk", False):
            module.set_processor(sibling())


def _use_xformers(model: nn.Module, dispatched: list[nn.Module], classic: list[nn.Module]) -> None:
    """xformers: the dispatcher's "xformers" backend for dispatched processors (``ModelMixin.set_attention_backend``),
    diffusers' own per-module switch for classic ones (``set_use_memory_efficient_attention_xformers``, what
    ``enable_xformers_memory_efficient_attention`` calls on every module; called here on classic modules only, as it
    would give a dispatched processor in a classic ``Attention`` module the plain xformers processor). A model with
    classic processors of a family that switch does not map (``_xformers_families``) is refused."""
    import importlib.util

    families = _xformers_families()
    other = sorted({type(m.processor).__name__ for m in classic if not isinstance(m.processor, families)})
    if other:
        raise UsageError(f"train.attention is 'xformers' but {type(model).__name__} has attention processors "
                         f"diffusers has no xformers form of ({', '.join(other)}); expected 'default' or 'sdpa'")
    if importlib.util.find_spec("xformers") is None:
        raise EnvironmentMissingError("train.attention is 'xformers' but xformers is not installed; "
                                      "pip install 'fastgen-distill[xformers]' or use 'sdpa'")
    if not torch.cuda.is_available():
        raise EnvironmentMissingError("train.attention is 'xformers' but xformers' kernels need a CUDA GPU and "
                                      "none is visible; use 'sdpa'")
    if dispatched:
        _set_backend(model, "xformers")
    for module in classic:
        module.set_use_memory_efficient_attention_xformers(True)


def _set_backend(model: nn.Module, backend: str) -> None:
    """``model.set_attention_backend(backend)`` (diffusers' dispatcher: every processor that carries
    ``_attention_backend``; it also makes ``backend`` the process's active one). Its "experimental feature" log
    line, which fastgen's call causes and which tells the user nothing, is dropped within the call only."""
    import logging

    def not_experimental(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Attention backends are an experimental feature")

    if not hasattr(model, "set_attention_backend"):
        raise UsageError(f"train.attention: {type(model).__name__} has dispatched attention processors but no "
                         "set_attention_backend (not a diffusers ModelMixin); expected 'default'")
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addFilter(not_experimental)
    try:
        model.set_attention_backend(backend)
    finally:
        diffusers_logger.removeFilter(not_experimental)


def float32(module: nn.Module) -> nn.Module:
    """``module`` with float32 parameters, converted only where one is not (a module built on fake tensors,
    ``fastgen estimate``'s, cannot have its parameters swapped by ``Module.float``)."""
    return module if all(p.dtype == torch.float32 for p in module.parameters()) else module.float()


class AdapterDenoiser(Denoiser):
    """A ``Denoiser`` of LoRA adapter ``adapter`` on a shared base network (the teacher's): its trainable
    parameters and checkpoint state are the adapter's alone."""

    def __init__(self, model: nn.Module, schedule, adapter: str):
        super().__init__(model, schedule, adapter)


class NetworkFactory:
    """Builds an objective's extra networks from the teacher.

    ``source``: the full-precision teacher network to copy (the trainer loads one when the teacher runs in
    fp16/bf16); ``None`` = the teacher's own network.
    """

    def __init__(self, teacher, attention: str = "default", gradient_checkpointing: bool = False,
                 source: nn.Module | None = None):
        self.teacher = teacher
        self.attention = attention
        self.gradient_checkpointing = gradient_checkpointing
        self.source = source

    def release(self) -> None:
        """Drop the full-precision source: it is needed only while the objective builds its networks, and
        objectives keep their factory (under fp16/bf16 it is a float32 copy of the whole teacher network)."""
        self.source = None

    def copy(self) -> Denoiser:
        """A trainable float32 copy of the teacher network with the teacher's schedule."""
        model = self.source if self.source is not None else self.teacher.model
        if not isinstance(model, nn.Module) or isinstance(model, BaseDenoiser):
            raise TypeError(f"NetworkFactory.copy: the teacher {type(model).__name__} has no diffusers network to "
                            "copy; give the objective a factory that builds its networks")
        model = float32(copy.deepcopy(model)).train().requires_grad_(True)
        configure_network(model, self.attention, self.gradient_checkpointing)
        return Denoiser(model, self.teacher.schedule)

    def lora(self, name: str, rank: int, alpha: float | None = None,
             targets: Iterable[str] = DEFAULT_LORA_TARGETS) -> AdapterDenoiser:
        """A LoRA adapter ``name`` of rank ``rank`` on the teacher's own frozen network (Hu et al. 2021,
        "LoRA", eq. 3: ``W + (alpha / r) B A``, ``B = 0`` at the start, so the adapted network starts equal to
        the teacher). The teacher's ``Denoiser`` (adapter ``None``) switches to the base alone for its own calls."""
        import warnings

        from peft import LoraConfig

        base = self.teacher.model
        if not hasattr(base, "add_adapter"):
            raise UsageError(f"a LoRA network needs a denoiser with diffusers' adapter support (add_adapter), which "
                             f"{type(base).__name__} lacks; use a full copy instead")
        if rank < 1:
            raise UsageError(f"LoRA rank of network {name!r} is {rank}; expected >= 1")
        if getattr(base, "peft_config", None) and name in base.peft_config:
            raise ValueError(f"the teacher network already has an adapter named {name!r}")
        activate_adapter(base, None)
        with warnings.catch_warnings(), adapter_flags_kept(base):  # the adapters added before stay trainable
            # peft warns on every adapter after the first on one model; several adapters on the shared base (fake
            # score, student) are what this factory means to build, so the warning tells the user nothing
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model",
                                    category=UserWarning)
            base.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True,
                                        target_modules=list(targets)), adapter_name=name)
        for n, p in base.named_parameters():
            if f".{name}." in n:
                p.data = p.data.float()
                p.requires_grad_(True)
        base._fastgen_active_adapter = "unknown"  # add_adapter changed what runs: every denoiser switches on its call
        configure_network(base, self.attention, self.gradient_checkpointing)
        return AdapterDenoiser(base, self.teacher.schedule, name)

    def module(self, module: nn.Module) -> nn.Module:
        """A network of the objective's own, trainable and in float32."""
        return float32(module).train().requires_grad_(True)

    @staticmethod
    def frozen(denoiser: BaseDenoiser) -> BaseDenoiser:
        """A frozen copy of a (possibly distributed-wrapped) denoiser: an EMA target, a progressive round's
        teacher. The copy holds the plain network, never the wrapper."""
        if isinstance(denoiser, Denoiser):
            denoiser = Denoiser(unwrap(denoiser.model), denoiser.schedule)
        return copy.deepcopy(denoiser).requires_grad_(False).eval()


# -- what the trainer asks of a network ------------------------------------------------------------------


def network_module(attr: Any) -> nn.Module:
    """The module the trainer wraps and optimises for an objective attribute (a ``Denoiser``'s network)."""
    return attr.model if isinstance(attr, Denoiser) else attr


def trainable_parameters(attr: Any) -> list[nn.Parameter]:
    """The parameters a network trains: an adapter's own weights for an ``AdapterDenoiser``, else every
    parameter that requires grad."""
    if isinstance(attr, AdapterDenoiser):
        return [p for n, p in unwrap(attr.model).named_parameters() if f".{attr.adapter}." in n]
    return [p for p in network_module(attr).parameters() if p.requires_grad]


def network_state(attr: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a network: the entries of the parameters it trains when some of its parameters
    are frozen (an adapter's weights on the teacher's base; a LoRA student's adapter, whose frozen base is the
    teacher's copy and is rebuilt from the teacher), else its whole state."""
    module = unwrap(network_module(attr))
    state = module.state_dict()
    if isinstance(attr, AdapterDenoiser):
        return {k: v for k, v in state.items() if f".{attr.adapter}." in k}
    params = dict(module.named_parameters())
    trained = {name for name, p in params.items() if p.requires_grad}
    return state if len(trained) == len(params) else {k: v for k, v in state.items() if k in trained}


def load_network_state(attr: Any, state: dict[str, torch.Tensor]) -> None:
    """Load what ``network_state`` saved (a whole state, as every checkpoint of a full network and older
    checkpoints of LoRA students hold, loads strictly)."""
    module = unwrap(network_module(attr))
    if set(state) == set(module.state_dict()):
        module.load_state_dict(state)
        return
    expected = set(network_state(attr))
    if set(state) != expected:
        raise ValueError(f"checkpoint of network {type(module).__name__}: keys differ from the ones it trains "
                         f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    module.load_state_dict(state, strict=False)
