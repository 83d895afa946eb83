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

from fastgen.denoiser import BaseDenoiser, Denoiser, activate_adapter, unwrap
from fastgen.errors import EnvironmentMissingError, UsageError

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def configure_network(model: nn.Module, attention: str = "default", gradient_checkpointing: bool = False) -> None:
    """Attention backend through diffusers' processors, and gradient checkpointing."""
    if attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        if hasattr(model, "set_attn_processor"):
            model.set_attn_processor(AttnProcessor2_0())
    elif attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise EnvironmentMissingError("train.attention is 'xformers' but xformers is not installed; "
                                          "pip install 'fastgen-distill[xformers]' or use 'sdpa'")
        model.enable_xformers_memory_efficient_attention()
    if gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise UsageError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; "
                             "expected false")
        model.enable_gradient_checkpointing()


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
        with warnings.catch_warnings():
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
