"""MeanFlow's second time input on a diffusers denoiser, and ``MeanFlowModel``: a MeanFlow student as one diffusers
model.

MeanFlow (Geng et al. 2025, "Mean flows for one-step generative modeling", arXiv 2505.13447, §4.3) conditions the
network on two times ``(r, t)``, here as the interval ``t - r`` beside the network's own ``t``: a second timestep
embedding (``DurationEmbedding``: diffusers' sinusoidal projection and timestep MLP, its last layer zero at the
start) is added to the output of the network's own timestep MLP (its first ``TimestepEmbedding``: ``time_embedding``
of the UNets, ``time_text_embed.timestep_embedder`` of SD3 and Flux, ``condition_embedder.time_embedder`` of Wan,
``time_embed.emb.timestep_embedder`` of SANA). A fresh student is therefore exactly the network it was copied from.
The interval is in thousandths of flow time (``1000 (tau_t - tau_r)``, ``tau`` the flow time of equal
signal-to-noise ratio, ``fastgen.losses.meanflow``): diffusers' sinusoidal embeddings expect timesteps in the
hundreds.

**Which interval a call gets.** Training sets it per sample (``duration``). Otherwise the network looks it up from
the ``timestep`` it is called with, so that every sampler, pipeline and scheduler runs it unchanged: a timestep of
its table (``timesteps``, the trained grid in the units the network receives) gets the interval to the next step of
the grid (to the clean end after the last, ``durations``); any other timestep gets 0, where the network is the
instantaneous-velocity (diffusion) network it was distilled from.

An export ships this module as ``{unet,transformer}/modeling_meanflow.py`` (``fastgen.pipelines.remote_code``) for
loaders without fastgen (``trust_remote_code=True``): so it imports only torch and diffusers.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

DURATION_SCALE = 1000.0
"""The interval's unit: ``DURATION_SCALE * (tau_t - tau_r)`` is what the embedding reads."""
MATCH_TOLERANCE = 1e-3
"""How far a timestep may be from a table entry, relative to the entry (at least 1e-3 absolute), and still be that
entry; a timestep in a low-precision dtype (Flux's and Qwen-Image's pipelines pass bf16) is allowed four of its
rounding steps (bf16: 3%)."""


def time_embedder(model: nn.Module) -> TimestepEmbedding | None:
    """The network's own timestep MLP: its first ``TimestepEmbedding`` not of a guidance scale (Flux's
    ``guidance_embedder``), or None (Z-Image's networks have none)."""
    for name, module in model.named_modules():
        if isinstance(module, TimestepEmbedding) and "guidance" not in name.rsplit(".", 1)[-1]:
            return module
    return None


class DurationEmbedding(nn.Module):
    """The embedding of the interval ``d`` (module docstring), added to the output of the timestep MLP it is
    attached to; ``timesteps``/``durations``: the table of the intervals of calls that set none."""

    def __init__(self, in_channels: int, embed_dim: int, timesteps: Sequence[float] = (),
                 durations: Sequence[float] = ()):
        super().__init__()
        if len(timesteps) != len(durations):
            raise ValueError(f"DurationEmbedding: {len(timesteps)} timesteps and {len(durations)} durations; expected "
                             "one duration per timestep")
        self.proj = Timesteps(in_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(in_channels, embed_dim)
        nn.init.zeros_(self.mlp.linear_2.weight)
        nn.init.zeros_(self.mlp.linear_2.bias)
        self.timesteps = [float(t) for t in timesteps]
        self.durations = [float(d) for d in durations]
        self.explicit: torch.Tensor | None = None
        self.current: torch.Tensor | None = None

    def look_up(self, timestep) -> torch.Tensor:
        """The table's interval of each timestep: that of the nearest entry within the tolerance
        (``MATCH_TOLERANCE``), else 0."""
        timestep = torch.as_tensor(timestep)
        t = timestep.float().reshape(-1)
        if not self.timesteps:
            return torch.zeros_like(t)
        rounding = 4 * torch.finfo(timestep.dtype).eps if timestep.dtype in (torch.bfloat16, torch.float16) else 0.0
        table = torch.tensor(self.timesteps, device=t.device)
        distance, index = (t[:, None] - table).abs().min(1)
        scale = table[index].abs()
        inside = distance <= torch.maximum(MATCH_TOLERANCE * scale.clamp(min=1.0), rounding * scale)
        return torch.where(inside, torch.tensor(self.durations, device=t.device)[index], torch.zeros_like(t))

    def before_call(self, module, args, kwargs):
        """Forward pre-hook of the network: the interval of this call, set or looked up from its timestep."""
        if self.explicit is not None:
            self.current = self.explicit
            return None
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.current = None if timestep is None else self.look_up(timestep)
        return None

    def after_call(self, module, args, output):
        """Forward hook of the network: the call's interval is dropped (it may be a forward-AD dual tensor)."""
        self.current = None

    def add(self, module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the timestep MLP: its output plus the interval's embedding."""
        if self.current is None:
            return output
        d = self.current.to(output.device).float().reshape(-1).expand(output.shape[0])
        emb = self.proj(d).to(self.mlp.linear_1.weight.dtype)
        return output + self.mlp(emb).to(output.dtype)


def attach_duration(model: nn.Module, timesteps: Sequence[float] = (), durations: Sequence[float] = ()) -> nn.Module:
    """Give ``model`` MeanFlow's interval input (module docstring), as ``model.duration_embedding``; returns it."""
    embedder = time_embedder(model)
    if embedder is None:
        raise ValueError(f"{type(model).__name__} has no diffusers TimestepEmbedding to add MeanFlow's interval "
                         "embedding to; expected a diffusers UNet or transformer")
    extra = DurationEmbedding(embedder.linear_1.in_features, embedder.linear_2.out_features, timesteps, durations)
    model.add_module("duration_embedding", extra.to(embedder.linear_1.weight.device))
    model.register_forward_pre_hook(extra.before_call, with_kwargs=True)
    model.register_forward_hook(extra.after_call)
    embedder.register_forward_hook(extra.add)
    return model


@contextlib.contextmanager
def duration(model: nn.Module, d: torch.Tensor):
    """Calls of ``model`` (a network with ``attach_duration``) inside take the intervals ``d`` (B,)."""
    extra = model.duration_embedding
    previous, extra.explicit = extra.explicit, d
    try:
        yield
    finally:
        extra.explicit = previous


class MeanFlowModel(ModelMixin, ConfigMixin):
    """A diffusers network with MeanFlow's interval input and its table (module docstring), as one model the
    teacher's pipeline calls in its denoiser's slot.

    Args:
        base_class: the network's diffusers model class, e.g. ``"UNet2DModel"``.
        base_config: its config (``model.config`` without private keys).
        timesteps: the trained grid in the units of ``forward``'s ``timestep``.
        durations: the interval of each, ``DURATION_SCALE`` times flow time.
    """

    @register_to_config
    def __init__(self, base_class: str, base_config: dict, timesteps: list[float], durations: list[float]):
        super().__init__()
        cls = getattr(diffusers, base_class, None)
        if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
            raise ValueError(f"MeanFlowModel.base_class is {base_class!r}; expected a diffusers model class")
        self.base = attach_duration(cls.from_config(base_config), timesteps, durations)

    @property
    def config(self) -> FrozenDict:
        """The base network's config keys, then this model's own (what ``save_pretrained`` writes is its own)."""
        own = self._internal_dict
        return FrozenDict({**{k: v for k, v in own["base_config"].items() if not k.startswith("_")}, **own})

    def __getattr__(self, name: str):
        """An attribute this model lacks is the base network's (e.g. SDXL's ``add_embedding``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if name.startswith("_") or base is None:
                raise
            return getattr(base, name)

    def forward(self, *args, **kwargs):
        """The base network's own call; the interval comes from the table by ``timestep``."""
        return self.base(*args, **kwargs)
