"""Teacher families in one table: what each diffusers denoiser needs beyond ``(x_t, t)``.

Objectives see ``x0 = D(x_t, t, cond)`` with ``x_t`` in the layout of the pipeline's VAE latents (``(B, C, H, W)``
for images, ``(B, C, F, H, W)`` for video) and never anything family-specific. A ``Family`` holds the rest:

- how the network is called: the sample's keyword (``sample`` for UNets, ``hidden_states`` for transformers), the
  time units the network takes (``time_scale``: Flux and Qwen-Image take ``t / 1000``, the others the native
  ``t``), inputs built from the sample's shape (Flux's ``img_ids``/``txt_ids``, Qwen-Image's ``img_shapes``),
  packed latents (``packed``: 2x2 patches as tokens, the pipelines' ``_pack_latents``/``_unpack_latents``; ``tokens``:
  Flux.2's patchified latents, a token per latent pixel) and an
  embedded guidance scale (``embedded_guidance``: Flux.1-dev is guidance-distilled, its guidance is an input);
- how prompts become condition tensors: the pipeline's own ``encode_prompt``, with the text length its
  ``__call__`` defaults to (``max_sequence_length``), keeping only per-sample tensors (what is shared by the batch
  is rebuilt per call from shapes, so conditions concatenate and cache as plain tensors);
- the latent normalisation its pipeline applies before decoding (``decode_latents``/``encode_images``):
  ``(z - shift) * scale`` for ``AutoencoderKL``/DC-AE (SD, SDXL, SD3, Flux, SANA), per-channel
  ``(z - mean) / std`` for Wan's and Qwen-Image's VAEs, Flux.2's batch norm over 2x2-patchified latents.

A new diffusers family is one ``Family`` entry in ``FAMILIES`` plus a test; ``family_of(model)`` looks it up by the
network's class.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

TOKEN_OUTPUTS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                "QwenImageTransformerBlock")
"""Transformer blocks that return ``(encoder_hidden_states, hidden_states)``: their image stream is the second."""


def call_default(pipeline, name: str, fallback: Any = None) -> Any:
    """The default of argument ``name`` of ``pipeline.__call__`` (e.g. ``max_sequence_length``), else
    ``fallback``: what a stock call of the pipeline would use."""
    param = inspect.signature(type(pipeline).__call__).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return fallback
    return param.default


@functools.lru_cache(maxsize=None)
def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` has a parameter ``name`` (cached: it is asked on every network call)."""
    return name in inspect.signature(function).parameters


# -- prompt encoders: the pipeline's encode_prompt, per-sample tensors only ------------------------------------
def _encode_sd(pipe, prompts: list[str], device) -> dict:
    embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds}


def _encode_sdxl(pipe, prompts: list[str], device, image_size: tuple[int, int]) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    projection_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(image_size, (0, 0), image_size, dtype=embeds.dtype,
                                      text_encoder_projection_dim=projection_dim)
    time_ids = time_ids.to(device).repeat(len(prompts), 1)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _encode_sd3(pipe, prompts: list[str], device) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _encode_flux(pipe, prompts: list[str], device) -> dict:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=call_default(pipe, "max_sequence_length", 512))
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _encode_wan(pipe, prompts: list[str], device) -> dict:
    embeds, _ = pipe.encode_prompt(prompt=prompts, negative_prompt=None, do_classifier_free_guidance=False,
                                   num_videos_per_prompt=1, device=device,
                                   max_sequence_length=call_default(pipe, "max_sequence_length", 512))
    return {"encoder_hidden_states": embeds}


def _encode_sana(pipe, prompts: list[str], device) -> dict:
    kwargs = {}
    if _takes(type(pipe).encode_prompt, "complex_human_instruction"):
        kwargs["complex_human_instruction"] = call_default(pipe, "complex_human_instruction")
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                            device=device, max_sequence_length=call_default(
                                                pipe, "max_sequence_length", 300), **kwargs)
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def _encode_flux2(pipe, prompts: list[str], device) -> dict:
    embeds, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                   max_sequence_length=call_default(pipe, "max_sequence_length", 512))
    return {"encoder_hidden_states": embeds}


def _encode_qwen(pipe, prompts: list[str], device) -> dict:
    """Qwen-Image's ``encode_prompt`` trims the text to the longest prompt of the call; the result is padded to
    ``max_sequence_length`` (zeros, masked out) so that every batch and the empty prompt have one length. The
    transformer masks the padding in attention and numbers text positions from the start, so padding changes
    nothing but the cost."""
    length = call_default(pipe, "max_sequence_length", 512)
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                      max_sequence_length=length)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pad = length - embeds.shape[1]
    return {"encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
            "encoder_hidden_states_mask": torch.nn.functional.pad(mask.long(), (0, pad))}


def _encode_zimage(pipe, prompts: list[str], device) -> dict:
    """Z-Image's ``encode_prompt`` returns one tensor per prompt (its real tokens only); they are padded to
    ``max_sequence_length`` with a mask (``_zimage_call`` cuts them again), so conditions batch as tensors."""
    length = call_default(pipe, "max_sequence_length", 512)
    embeds, _ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False,
                                   max_sequence_length=length)
    padded = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, length - len(e))) for e in embeds])
    mask = torch.stack([torch.arange(length, device=padded.device) < len(e) for e in embeds]).long()
    return {"cap_feats": padded, "cap_mask": mask}


# -- inputs built per call from the sample's shape -------------------------------------------------------------
def pack(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H/2 * W/2, 4C)``: 2x2 patches as tokens (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of ``h x w`` (``FluxPipeline._unpack_latents``)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H W, C)``: every latent pixel a token (``Flux2Pipeline._pack_latents``)."""
    return x.flatten(2).transpose(1, 2)


def unflatten(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``flatten`` (``Flux2Pipeline._unpack_latents_with_ids`` on its row-major ids)."""
    return tokens[:, : h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, 4C, H/2, W/2)`` (``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``patchify`` (``Flux2Pipeline._unpatchify_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _flux_inputs(model, x: torch.Tensor, cond: Mapping) -> dict:
    """Flux's position ids: text tokens all zero, image tokens ``(0, row, column)`` of the packed grid."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    img_ids = torch.zeros(h, w, 3, device=x.device)
    img_ids[..., 1] += torch.arange(h, device=x.device)[:, None]
    img_ids[..., 2] += torch.arange(w, device=x.device)[None, :]
    text = cond["encoder_hidden_states"]
    return {"img_ids": img_ids.reshape(h * w, 3), "txt_ids": torch.zeros(text.shape[1], 3, device=x.device)}


def _flux2_inputs(model, x: torch.Tensor, cond: Mapping) -> dict:
    """Flux.2's 4-axis position ids ``(t, h, w, l)`` per sample: image tokens ``(0, row, column, 0)``, text tokens
    ``(0, 0, 0, index)`` (``Flux2Pipeline._prepare_latent_ids`` / ``_prepare_text_ids``)."""
    b, _, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols, zeros], dim=-1).reshape(1, h * w, 4).expand(b, -1, -1)
    length = cond["encoder_hidden_states"].shape[1]
    text = torch.zeros(length, 4, dtype=torch.long, device=x.device)
    text[:, 3] = torch.arange(length, device=x.device)
    return {"img_ids": img_ids, "txt_ids": text.expand(b, -1, -1)}


def _qwen_inputs(model, x: torch.Tensor, cond: Mapping) -> dict:
    """Qwen-Image's per-call shapes: the packed grid per sample (and, for diffusers before 0.36, whose transformer
    takes them, each prompt's token count)."""
    inputs = {"img_shapes": [[(1, x.shape[-2] // 2, x.shape[-1] // 2)]] * x.shape[0]}
    if _takes(type(model).forward, "txt_seq_lens"):
        inputs["txt_seq_lens"] = cond["encoder_hidden_states_mask"].sum(dim=1).tolist()
    return inputs


def _zimage_call(model, x: torch.Tensor, t_in: torch.Tensor, cond: Mapping) -> dict:
    """Z-Image's transformer takes lists: one ``(C, 1, H, W)`` latent and one ``(L_i, D)`` caption per sample, and
    the time ``1 - t / T`` (``ZImagePipeline``: ``(1000 - t) / 1000``)."""
    mask = cond["cap_mask"].bool()
    return {"x": list(x.unsqueeze(2).unbind(0)), "t": (1000 - t_in) / 1000,
            "cap_feats": [feats[m] for feats, m in zip(cond["cap_feats"], mask)], "return_dict": False}


def _zimage_output(out, x: torch.Tensor) -> torch.Tensor:
    """Z-Image predicts ``x0 - eps`` per sample; the flow velocity is its negative (``ZImagePipeline``)."""
    return -torch.stack(list(out)).squeeze(2)


@dataclass(frozen=True)
class Family:
    """One diffusers denoiser family (see the module docstring)."""

    name: str
    sample_arg: str = "hidden_states"
    time_scale: float = 1.0
    packed: bool = False
    tokens: bool = False
    """Every latent pixel a token (Flux.2: its denoiser space is the VAE's latents patchified 2x2 and
    batch-normalised, ``patch = 2``)."""
    patch: int = 1
    """Spatial factor of the denoiser space below the VAE's latents (Flux.2's patchified latents: 2)."""
    video: bool = False
    text: bool = True
    embedded_guidance: float | None = None
    """For a guidance-distilled network (``guidance_embeds`` in its config): the guidance scale it is given when
    the call names none, its pipeline's default ``guidance_scale`` (``FluxPipeline``: 3.5)."""
    encode: Callable | None = None
    shape_inputs: Callable | None = None
    pipeline_size: bool = False
    """The sample size comes from the pipeline (its ``__call__`` defaults, its VAE), not the denoiser's
    ``sample_size``."""
    call: Callable | None = None
    """A network called unlike diffusers' ``(sample, timestep, **cond)`` (Z-Image's lists): ``call(model, x, t_in,
    cond) -> kwargs`` replaces ``inputs``, and ``call_output(out, x)`` turns its output into ``x``'s layout."""
    call_output: Callable | None = None
    plain_call: Mapping[str, Any] = field(default_factory=lambda: {"guidance_scale": 1.0})
    """The keyword arguments that make the family's pipeline run the network once per step, unguided (what a
    distilled student needs): ``guidance_scale=1`` where CFG is ``u + s (c - u)``, 0 where it is ``c + s (c - u)``
    (Z-Image); nothing where guidance needs a negative prompt (Qwen-Image's ``true_cfg_scale``). See
    ``replay_kwargs``."""

    def inputs(self, model, x: torch.Tensor, t_in: torch.Tensor, cond: Mapping | None) -> dict:
        """The network's keyword arguments for sample ``x`` (the pipeline's latent layout) at model time ``t_in``."""
        if self.call is not None:
            return self.call(model, x, t_in, cond)
        cond = dict(cond or {})
        sample = pack(x) if self.packed else flatten(x) if self.tokens else x
        kwargs = {self.sample_arg: sample, "timestep": t_in * self.time_scale,
                  "return_dict": False}
        if self.shape_inputs is not None:
            kwargs.update(self.shape_inputs(model, x, cond))
        if self.guidance_embedded(model):
            if "guidance" not in cond:
                cond["guidance"] = torch.full((x.shape[0],), self.embedded_guidance, device=x.device)
        else:
            cond.pop("guidance", None)
        return {**kwargs, **cond}

    def replay_kwargs(self, model, two_experts: bool) -> dict:
        """What to pass to the exported pipeline (besides prompt, steps and size) so that it runs the student as
        trained: ``plain_call``; a guidance-embedded network its trained ``embedded_guidance`` as
        ``guidance_scale``; where the pipeline routes two experts itself (``two_experts``: Wan 2.2's
        ``boundary_ratio`` set), the second's ``guidance_scale_2`` likewise unguided (WanPipeline refuses it
        otherwise)."""
        kwargs = dict(self.plain_call)
        if self.guidance_embedded(model):
            kwargs["guidance_scale"] = self.embedded_guidance
        if two_experts and "guidance_scale" in kwargs:
            kwargs["guidance_scale_2"] = kwargs["guidance_scale"]
        return kwargs

    def guidance_embedded(self, model) -> bool:
        """Whether ``model`` takes its guidance scale as an input (Flux.1-dev), not through two calls (CFG)."""
        return self.embedded_guidance is not None and bool(getattr(model.config, "guidance_embeds", False))

    def output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's output in ``x``'s layout; a learned-variance output (twice the channels) gives its
        first half, as the pipelines take it."""
        if self.call_output is not None:
            return self.call_output(out, x)
        if self.packed:
            out = unpack(out, x.shape[-2], x.shape[-1])
        elif self.tokens:
            out = unflatten(out, x.shape[-2], x.shape[-1])
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    def encode_prompts(self, pipe, prompts: Sequence[str], device, image_size: tuple[int, int]) -> dict:
        if self.encode is _encode_sdxl:
            return _encode_sdxl(pipe, list(prompts), device, image_size)
        return self.encode(pipe, list(prompts), device)


FAMILIES: dict[str, Family] = {
    "UNet2DModel": Family("pixel-unet", sample_arg="sample", text=False, plain_call={}),
    "UNet2DConditionModel": Family("sd-unet", sample_arg="sample", encode=_encode_sd),
    "SD3Transformer2DModel": Family("sd3", encode=_encode_sd3),
    "FluxTransformer2DModel": Family("flux", time_scale=1e-3, packed=True, embedded_guidance=3.5,
                                     encode=_encode_flux, shape_inputs=_flux_inputs, pipeline_size=True),
    "Flux2Transformer2DModel": Family("flux2", time_scale=1e-3, tokens=True, patch=2, embedded_guidance=4.0,
                                      encode=_encode_flux2, shape_inputs=_flux2_inputs, pipeline_size=True),
    "WanTransformer3DModel": Family("wan", video=True, encode=_encode_wan, pipeline_size=True),
    "SanaTransformer2DModel": Family("sana", encode=_encode_sana,  # binning would resize sizes off its bins
                                     plain_call={"guidance_scale": 1.0, "use_resolution_binning": False}),
    "ZImageTransformer2DModel": Family("z-image", encode=_encode_zimage, call=_zimage_call, call_output=_zimage_output,
                                       pipeline_size=True, plain_call={"guidance_scale": 0.0}),
    "QwenImageTransformer2DModel": Family("qwen-image", time_scale=1e-3, packed=True, encode=_encode_qwen,
                                          shape_inputs=_qwen_inputs, pipeline_size=True, plain_call={}),
}
"""Denoiser class name → its family. SDXL is ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``
(``family_of`` picks ``SDXL``)."""

SDXL = Family("sdxl", sample_arg="sample", encode=_encode_sdxl)


def wrapped_class(model) -> str | None:
    """The diffusers class of the networks a fastgen export model holds (``TimestepExperts``' experts,
    ``MeanFlowModel``'s network), or None for any other model."""
    config = getattr(model, "config", None)
    return getattr(config, "expert_class", None) or getattr(config, "base_class", None)


def family_of(model) -> Family:
    """The ``Family`` of a diffusers denoiser (or of the network a ``TimestepExperts`` or ``MeanFlowModel`` export
    holds)."""
    config = getattr(model, "config", None)
    # the class itself or the one it wraps: FSDP2's fully_shard makes `FSDP<class>` subclasses
    names = [wrapped_class(model)] + [cls.__name__ for cls in type(model).__mro__]
    name = next((n for n in names if n in FAMILIES), None)
    if name is None:
        raise ValueError(f"denoiser class {type(model).__name__!r} is not supported; expected one of {sorted(FAMILIES)}")
    family = FAMILIES[name]
    if name == "UNet2DConditionModel" and getattr(config, "addition_embed_type", None) == "text_time":
        return SDXL
    return family


# -- latents <-> images ------------------------------------------------------------------------------------------
def _video_vae(vae) -> bool:
    """Whether ``vae`` takes ``(B, C, F, H, W)`` (Wan's and Qwen-Image's causal 3D VAEs: a temporal factor)."""
    return hasattr(vae.config, "temperal_downsample")


def _batch_norm(vae) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std)`` of the batch norm over patchified latents of a Flux.2 VAE (``AutoencoderKLFlux2.bn``), shaped
    ``(1, 4C, 1, 1)``; ``None`` for other VAEs."""
    bn = getattr(vae, "bn", None)
    if bn is None:
        return None
    std = torch.sqrt(bn.running_var + vae.config.batch_norm_eps)
    return bn.running_mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def _channel_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel ``(mean, std)`` of a VAE that normalises its latents that way (Wan, Qwen-Image), shaped to
    broadcast against ``like`` ``(B, C, [F,] H, W)``; ``None`` for scale/shift VAEs."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    view = (1, len(mean)) + (1,) * (like.ndim - 2)
    return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(view),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(view))


def decode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Denoiser-space latents → images in [-1, 1], normalised back as the family's pipeline does before
    ``vae.decode``: ``(B, 3, H, W)``, or ``(B, 3, F, H, W)`` for a video VAE."""
    cfg = vae.config
    stats = _channel_stats(vae, x)
    if _batch_norm(vae):  # Flux.2: x are the patchified latents normalised by the VAE's batch norm
        mean, std = _batch_norm(vae)
        latents = unpatchify(x * std.to(x) + mean.to(x))
    elif stats is not None:
        latents = x * stats[1] + stats[0]
    else:
        latents = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    still = latents.ndim == 4 and _video_vae(vae)  # Qwen-Image: an image is a video of one frame
    image = vae.decode((latents.unsqueeze(2) if still else latents).to(vae.dtype), return_dict=False)[0]
    return (image[:, :, 0] if still else image).float().clamp(-1, 1)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → denoiser-space latents (the posterior mean, normalised as ``decode_latents`` inverts)."""
    still = images.ndim == 4 and _video_vae(vae)
    out = vae.encode((images.unsqueeze(2) if still else images).to(vae.dtype))
    latents = (out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent).float()
    latents = latents[:, :, 0] if still else latents
    if _batch_norm(vae):
        mean, std = _batch_norm(vae)
        return (patchify(latents) - mean.to(latents)) / std.to(latents)
    stats = _channel_stats(vae, latents)
    if stats is not None:
        return (latents - stats[0]) / stats[1]
    cfg = vae.config
    return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


def vae_factors(pipe) -> tuple[int, int]:
    """``(spatial, temporal)`` downsampling of the pipeline's VAE, as the pipeline itself records it."""
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    if spatial is None:
        spatial = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(spatial), int(getattr(pipe, "vae_scale_factor_temporal", None) or 1)
