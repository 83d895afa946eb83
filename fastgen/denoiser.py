"""The denoiser: any diffusers denoising network plus its noise schedule, answering ``x0 = D(x_t, t, cond)``.

Teacher, student, fake score and critic are all ``Denoiser``s, so every objective is written against
x0-predictions and the schedule's ``(alpha, sigma)`` and never against a particular output type.

``Denoiser`` can also return the activations of named blocks of the network from the same forward pass
(``denoiser(x_t, t, cond, features=("mid_block",))``), captured with forward hooks, e.g. as the input of
the discriminator heads of adversarial distillation (Sauer et al. 2023, "Adversarial diffusion
distillation", §3.2; Yin et al. 2024, "Improved distribution matching distillation", §4.2).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from fastgen.families import TOKEN_OUTPUTS, family_of
from fastgen.schedules import NoiseSchedule, expand_to

Cond = Mapping[str, Any]
"""Keyword arguments of the network besides the sample and the timestep, e.g.
``{"encoder_hidden_states": ...}``, ``{"class_labels": ...}`` or SDXL's ``{"added_cond_kwargs": {...}}``."""


def cat_cond(a: Cond | None, b: Cond | None) -> Cond | None:
    """Concatenate two conditions along the batch (recursively through nested dicts)."""
    if a is None or b is None:
        if a is not b:
            raise ValueError("cat_cond: one condition is None and the other is not; expected both or neither")
        return None
    if set(a) != set(b):
        raise ValueError(f"cat_cond: keys differ, {sorted(a)} vs {sorted(b)}")
    out = {}
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            out[key] = torch.cat([va, vb])
        elif isinstance(va, Mapping):
            out[key] = cat_cond(va, vb)
        elif va is None and vb is None:
            out[key] = None
        else:
            raise ValueError(f"cat_cond: cannot batch condition {key!r} of type {type(va).__name__}")
    return out


def slice_cond(cond: Cond | None, index) -> Cond | None:
    """Select samples of a condition along the batch (recursively)."""
    if cond is None:
        return None
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[index]
        elif isinstance(value, Mapping):
            out[key] = slice_cond(value, index)
        else:
            out[key] = value
    return out


Features = bool | str | Sequence[str] | None
"""Which block activations a ``Denoiser`` call returns: ``None``/``False`` none, ``True`` the family's
bottleneck (``Denoiser.default_features``), or dotted module paths such as ``"down_blocks.1"``."""


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def image_stream(module: nn.Module, output) -> torch.Tensor:
    """The image-stream tensor of a block's output. A tensor is itself; SD3's ``JointTransformerBlock``
    returns ``(encoder_hidden_states, hidden_states)`` and yields ``hidden_states`` (tokens ``(B, N, D)``),
    as do Flux's blocks (``fastgen.families.TOKEN_OUTPUTS``), sharded or not; any other tuple (diffusers down
    blocks' ``(hidden_states, res_samples)``, attention blocks' ``(sample,)``) and a diffusers output object yield
    their first element."""
    if isinstance(output, torch.Tensor):
        return output
    # by the class or a base of it: FSDP2's fully_shard renames a block's class FSDP<name>, a subclass of it
    if any(cls.__name__ in TOKEN_OUTPUTS for cls in type(module).__mro__):
        return output[1]
    return output[0]


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on the blocks ``names`` (dotted paths in ``unwrap(model)``) that fill the yielded dict
    with each block's ``image_stream`` output (not detached: gradients flow through it); a block run twice
    keeps its last output. The hooks are removed on exit, also when the body raises."""
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    for name in names:
        if not name or name not in modules:
            top = [child for child, _ in inner.named_children()]
            raise ValueError(f"features: {name!r} is not a module of {type(inner).__name__}; expected a dotted "
                             f"module path under one of {top} (e.g. 'mid_block', 'down_blocks.1')")
    found: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            def hook(module, args, output, name=name):
                found[name] = image_stream(module, output)
            handles.append(modules[name].register_forward_hook(hook))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def batch_times(t, x: torch.Tensor) -> torch.Tensor:
    """Times as a float tensor of shape (B,) for the batch ``x`` (a scalar is repeated)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class BaseDenoiser(nn.Module):
    """``x0 = D(x_t, t, cond)`` over a noise schedule; subclasses implement ``forward``."""

    schedule: NoiseSchedule

    def output(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        """The prediction in the schedule's own output type (e.g. eps for an epsilon teacher)."""
        t = batch_times(t, x_t)
        return self.schedule.from_x0(self(x_t, t, cond), x_t, t)

    def guided(self, x_t: torch.Tensor, t, cond: Cond | None, uncond: Cond | None, scale: float) -> torch.Tensor:
        """Classifier-free guidance in the Ho–Salimans form ``u + scale (c - u)`` (Ho & Salimans 2022,
        eq. 6, in x0 space, which equals guiding eps at fixed ``(x_t, t)``); ``scale = 1`` is no guidance;
        a tensor ``scale`` of shape (B,) guides each sample with its own scale.
        Codebases that write ``c + w (c - u)`` (LCM, PCM, some DMD code) mean ``scale = w + 1``."""
        if not isinstance(scale, torch.Tensor) and scale == 1.0:
            return self(x_t, t, cond)
        t = batch_times(t, x_t)
        x0 = self(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
        x0_u, x0_c = x0.chunk(2)
        scale = torch.as_tensor(scale, dtype=x0.dtype, device=x0.device)
        return x0_u + expand_to(scale, x0_u) * (x0_c - x0_u)


def activate_adapter(model: nn.Module, name: str | None) -> None:
    """Run ``model`` with LoRA adapter ``name`` alone (``None``: the base weights alone); a no-op for a network
    that never had an adapter, or whose adapter is already the one asked for.

    peft's switches also set ``requires_grad`` of the adapters they touch; the trainer decides which
    networks take gradients, so the flags are put back as they were."""
    model = unwrap(model)
    if getattr(model, "_fastgen_active_adapter", None) == name:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    with adapter_flags_kept(model):
        for layer in (m for m in model.modules() if isinstance(m, BaseTunerLayer)):
            layer.enable_adapters(name is not None)
            if name is not None:
                layer.set_adapter(name)
    model._fastgen_active_adapter = name


@contextlib.contextmanager
def adapter_flags_kept(model: nn.Module) -> Iterator[None]:
    """The ``requires_grad`` of ``model``'s LoRA weights put back as they were after peft's switches inside
    (``set_adapter``, which ``add_adapter`` calls too, freezes every adapter but the one it sets)."""
    flags = [(p, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Denoiser(BaseDenoiser):
    """``x0 = D(x_t, t, cond)`` for a diffusers network (``UNet2DModel``, ``UNet2DConditionModel``,
    ``SD3Transformer2DModel``, …) whose output type is ``schedule.prediction_type``.

    ``adapter``: the LoRA adapter switched on for this denoiser's calls (``None``: the base weights alone), so
    that a teacher and the LoRA networks added on its weights (``fastgen.networks.NetworkFactory.lora``) share
    one base network."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, adapter: str | None = None):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.adapter = adapter
        self.family = family_of(unwrap(model))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network takes its input in: that of its first floating weight outside the modules that
        diffusers keeps in float32 (``_keep_in_fp32_modules``: Wan's time embedder and ``scale_shift_table`` come
        first in a bf16 Wan), as diffusers' ``ModelMixin.dtype`` reads it."""
        inner = unwrap(self.model)
        kept = getattr(inner, "_keep_in_fp32_modules", None) or ()
        weights = (p for name, p in inner.named_parameters() if p.is_floating_point()
                   and not any(module in name for module in kept))
        return next(weights, next(inner.parameters())).dtype

    @property
    def default_features(self) -> tuple[str, ...]:
        """The bottleneck that ``features=True`` returns: ``mid_block`` of a UNet, the middle block
        ``transformer_blocks.{n // 2}`` of a transformer."""
        inner = unwrap(self.model)
        if getattr(inner, "mid_block", None) is not None:
            return ("mid_block",)
        for attribute in ("transformer_blocks", "blocks", "layers"):  # SD3, Flux, SANA, Qwen-Image; Wan; Z-Image
            blocks = getattr(inner, attribute, None)
            if blocks:
                return (f"{attribute}.{len(blocks) // 2}",)
        raise ValueError(f"features=True: {type(inner).__name__} has neither a mid_block nor a list of blocks; "
                         "expected the block names to be given explicitly")

    def feature_names(self, features: Features) -> tuple[str, ...]:
        """``features`` (see ``Features``) as a tuple of module paths; empty for none."""
        if features is None or features is False:
            return ()
        if features is True:
            return self.default_features
        return (features,) if isinstance(features, str) else tuple(features)

    def output(self, x_t: torch.Tensor, t, cond: Cond | None = None, features: Features = None):
        """The network's own output (of type ``schedule.prediction_type``), in ``x_t``'s dtype; with
        ``features``, ``(output, {name: activation})`` from the same forward pass (``capture``)."""
        activate_adapter(self.model, self.adapter)
        t = batch_times(t, x_t)
        x_in, t_in = self.schedule.model_input(x_t, t)
        kwargs = self.family.inputs(unwrap(self.model), x_in.to(self.dtype), t_in, cond)
        names = self.feature_names(features)
        if not names:
            return self.family.output(self.model(**kwargs)[0], x_t).to(x_t.dtype)
        with capture(self.model, names) as found:
            out = self.family.output(self.model(**kwargs)[0], x_t).to(x_t.dtype)
        missing = [name for name in names if name not in found]
        if missing:
            raise ValueError(f"features: blocks {missing} did not run in the forward pass of "
                             f"{type(unwrap(self.model)).__name__}; expected blocks on its path")
        return out, {name: found[name] for name in names}

    def guided(self, x_t: torch.Tensor, t, cond: Cond | None, uncond: Cond | None, scale) -> torch.Tensor:
        """Guided x0: a guidance-distilled network (Flux.1-dev, ``Family.guidance_embedded``) is given ``scale``
        as its guidance input, in one call (its pipeline's ``guidance_scale``; no unconditional branch); any
        other network gets classifier-free guidance (``BaseDenoiser.guided``)."""
        if not self.family.guidance_embedded(unwrap(self.model)):
            return super().guided(x_t, t, cond, uncond, scale)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x_t.device)
        return self(x_t, t, {**(cond or {}), "guidance": scale.expand(x_t.shape[0]) if scale.ndim == 0 else scale})

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None, features: Features = None):
        """``x0``; with ``features`` (``Features``), ``(x0, {name: activation})`` from the same pass."""
        t = batch_times(t, x_t)
        if not self.feature_names(features):
            return self.schedule.to_x0(self.output(x_t, t, cond), x_t, t)
        out, found = self.output(x_t, t, cond, features)
        return self.schedule.to_x0(out, x_t, t), found


def boundary_coefficients(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                          t_min: float = 0.0):
    """Consistency-model boundary condition (Song et al. 2023, eq. 7 and Appendix C) in LCM's form
    (Luo et al. 2023, "Latent consistency models", §4.1), shifted to the schedule's clean end ``t_min``:
    with ``u = timestep_scaling * (t - t_min)``,
    ``c_skip = sigma_data² / (u² + sigma_data²)`` and ``c_out = u / sqrt(u² + sigma_data²)``, so that
    ``c_skip(t_min) = 1, c_out(t_min) = 0``. VP and flow schedules end at ``t_min = 0`` (LCM's form as
    published); EDM ends at ``t_min = sigma_min``, where ``c_skip`` with ``timestep_scaling = 1`` is Song et
    al.'s ``sigma_data² / ((sigma - sigma_min)² + sigma_data²)``. ``c_out`` multiplies an x0-prediction (not
    a raw network output), so it tends to 1, not ``sigma_data``, far from the boundary."""
    u = timestep_scaling * (torch.as_tensor(t, dtype=torch.float32) - t_min)
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class BoundaryDenoiser(BaseDenoiser):
    """``f(x_t, t) = c_skip(t) x_t + c_out(t) D(x_t, t)``: a consistency student's output, with the
    boundary at the clean end ``schedule.t_min`` of the inner denoiser's schedule."""

    def __init__(self, inner: BaseDenoiser, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        t = batch_times(t, x_t)
        c_skip, c_out = boundary_coefficients(t, self.sigma_data, self.timestep_scaling, self.schedule.t_min)
        return expand_to(c_skip, x_t) * x_t + expand_to(c_out, x_t) * self.inner(x_t, t, cond)
