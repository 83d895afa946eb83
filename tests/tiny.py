"""Tiny randomly initialised diffusers pipelines for tests, built offline and saved as folders.

Each ``make_*_folder(path)`` builds one pipeline family with seeded random weights, saves it with
``save_pretrained`` (safetensors unless told otherwise) into ``path`` and returns ``path``. Every network is
a few thousand parameters so that loading and a forward pass take milliseconds on a CPU. Import them from
any test as ``from tiny import make_sd_folder`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastgen.denoiser import BaseDenoiser, batch_times

TEXT_DIM = 32
"""Hidden size (and projection size) of every tiny CLIP text encoder."""


def char_tokenizer():
    """A character-level ``CLIPTokenizer`` built without any download: the printable ASCII characters,
    each also with the end-of-word marker ``</w>``, then ``<|startoftext|>`` (id 188) and ``<|endoftext|>``
    (id 189); 77 tokens per prompt as in Stable Diffusion."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    settings = dict(bos_token_id=188, eos_token_id=189, pad_token_id=189, vocab_size=200, hidden_size=TEXT_DIM,
                    intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=TEXT_DIM,
                    max_position_embeddings=77)
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def _text_encoder(with_projection: bool = False):
    """A tiny CLIP text encoder (``CLIPTextModelWithProjection`` when ``with_projection``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_text_config()).eval()


def _vae(**config):
    """A tiny ``AutoencoderKL`` with 4 latent channels and a downsampling factor of 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=2, sample_size=16, **config)


def _save(pipe, path, safe_serialization: bool) -> Path:
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def make_ddpm_folder(path, sample_size: int = 8, num_class_embeds: int | None = None,
                     safe_serialization: bool = True) -> Path:
    """A pixel-space ``DDPMPipeline``: a 3-channel ``UNet2DModel`` of ``sample_size``² and a linear-beta
    ``DDPMScheduler`` (epsilon); class-conditional with ``num_class_embeds`` classes when given."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=num_class_embeds)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    return _save(pipe, path, safe_serialization)


def make_sd_folder(path, prediction_type: str = "epsilon", safe_serialization: bool = True) -> Path:
    """A Stable Diffusion 1.x/2.x-style ``StableDiffusionPipeline``: 4×8×8 latents (16×16 images),
    one CLIP text encoder, a scaled-linear ``DDIMScheduler`` with ``prediction_type``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
                                norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(), tokenizer=char_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save(pipe, path, safe_serialization)


def make_sdxl_folder(path) -> Path:
    """An SDXL-style ``StableDiffusionXLPipeline``: 4×8×8 latents, two CLIP text encoders (their hidden states
    concatenated to 64 features, the second's pooled projection as ``text_embeds``), the added
    text/time conditions and an ``EulerDiscreteScheduler``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + TEXT_DIM,
                                cross_attention_dim=2 * TEXT_DIM, attention_head_dim=(2, 4),
                                use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(), text_encoder_2=_text_encoder(True),
                                     tokenizer=char_tokenizer(), tokenizer_2=char_tokenizer(), unet=unet,
                                     scheduler=scheduler)
    return _save(pipe, path, True)


def make_sd3_folder(path) -> Path:
    """An SD3-style ``StableDiffusion3Pipeline``: a ``SD3Transformer2DModel`` on 4×8×8 latents, two CLIP
    text encoders and no T5 (its tokens are zeros), a VAE with ``shift_factor`` and a
    ``FlowMatchEulerDiscreteScheduler`` with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=2 * TEXT_DIM, pooled_projection_dim=2 * TEXT_DIM,
                                        out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=_text_encoder(True), tokenizer=char_tokenizer(),
                                    text_encoder_2=_text_encoder(True), tokenizer_2=char_tokenizer(),
                                    text_encoder_3=None, tokenizer_3=None)
    return _save(pipe, path, True)


class MLPDenoiser(BaseDenoiser):
    """A small MLP student for analytic-teacher tests: ``x0 = alpha x - sigma v(x, t)`` (the
    v-parameterisation keeps the output well scaled at every noise level)."""

    def __init__(self, schedule, dim: int = 1, hidden: int = 128):
        super().__init__()
        self.schedule = schedule
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_t, t, cond=None):
        t = batch_times(t, x_t)
        u = (t / self.schedule.num_train_timesteps)[:, None]
        v = self.net(torch.cat([x_t, torch.sin(3 * u), torch.cos(3 * u)], 1))
        return self.schedule.alpha(t)[:, None] * x_t - self.schedule.sigma(t)[:, None] * v
