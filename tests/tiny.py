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


def _vae(latent_channels: int = 4, **config):
    """A tiny ``AutoencoderKL`` with 4 latent channels (unless told) and a downsampling factor of 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=2, sample_size=16, **config)


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


def t5_tokenizer():
    """A character-level fast tokenizer in T5's layout built without any download: ``<pad>`` (0), ``</s>`` (1,
    appended to every prompt), ``<unk>`` (2), then the printable ASCII characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i in range(33, 127):
        vocab[chr(i)] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def _t5_encoder(umt5: bool = False):
    """A tiny T5 (or UMT5, Wan's) encoder of ``TEXT_DIM`` features."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return cls(config_cls(vocab_size=100, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def make_flux_folder(path, guidance_embeds: bool = True) -> Path:
    """A Flux.1-style ``FluxPipeline``: a ``FluxTransformer2DModel`` on packed 4-channel latents (16 features per
    token), a CLIP and a T5 text encoder, a VAE with ``shift_factor`` (factor 2, ``sample_size`` 16: 16x16
    images, 8x8 latents), a dynamically shifted ``FlowMatchEulerDiscreteScheduler``; Flux.1-dev's guidance
    embedding unless ``guidance_embeds=False`` (schnell)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=TEXT_DIM, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
                        text_encoder=_text_encoder(), tokenizer=char_tokenizer(), text_encoder_2=_t5_encoder(),
                        tokenizer_2=t5_tokenizer(), transformer=transformer)
    return _save(pipe, path, True)


def make_wan_folder(path, scheduler: str = "unipc", boundary_ratio: float | None = None) -> Path:
    """A Wan 2.1-style ``WanPipeline``: a ``WanTransformer3DModel`` on 16-channel video latents, a UMT5 text
    encoder, Wan's VAE (factor 8 in space, 4 in time, per-channel latent mean/std) and a flow-mode
    ``UniPCMultistepScheduler`` (shift 3), or ``scheduler="euler"``: a ``FlowMatchEulerDiscreteScheduler``. With
    ``boundary_ratio``, Wan 2.2's layout: a second transformer (other weights) for ``t < boundary_ratio T``."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    settings = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                    out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    transformer = WanTransformer3DModel(**settings)
    experts = {} if boundary_ratio is None else {"transformer_2": WanTransformer3DModel(**settings),
                                                 "boundary_ratio": boundary_ratio}
    if scheduler == "unipc":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(umt5=True), vae=vae,
                       transformer=transformer, scheduler=scheduler, **experts)
    return _save(pipe, path, True)


def make_sana_folder(path) -> Path:
    """A SANA-style ``SanaPipeline``: a ``SanaTransformer2DModel`` (linear attention; ``sample_size`` 16, one of the
    sizes its resolution binning knows) on 4-channel latents of a tiny DC-AE (``AutoencoderDC``, factor 2:
    32 x 32 images), a Gemma 2 text encoder and a flow-mode ``DPMSolverMultistepScheduler`` (shift 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=TEXT_DIM,
                                         sample_size=16)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=TEXT_DIM, intermediate_size=64,
                                            num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2,
                                            vocab_size=100, attn_implementation="eager")).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=t5_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    return _save(pipe, path, True)


def make_qwen_image_folder(path) -> Path:
    """A Qwen-Image-style ``QwenImagePipeline``: a ``QwenImageTransformer2DModel`` on packed 4-channel latents, a
    tiny Qwen2.5-VL text encoder, Qwen-Image's VAE (factor 4 here, per-channel mean/std) and its dynamically
    shifted ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.8, 1.0, 1.2])
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
    config = Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16,
                                                               "num_heads": 2, "out_hidden_size": 16},
                              hidden_size=16, vocab_size=152064, vision_end_token_id=151653,
                              vision_start_token_id=151652, vision_token_id=151654)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(tokenizer=t5_tokenizer(), text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                             vae=vae, transformer=transformer, scheduler=scheduler)
    return _save(pipe, path, True)


def make_z_image_folder(path) -> Path:
    """A Z-Image-style ``ZImagePipeline``: a ``ZImageTransformer2DModel`` (2x2 patches inside) on 16-channel latents
    of a VAE with ``shift_factor`` (factor 2, 16 x 16 images), a Qwen3 text encoder whose tokenizer has a chat
    template, and a ``FlowMatchEulerDiscreteScheduler`` (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=100)).eval()
    tokenizer = t5_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    vae = _vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, path, True)


def make_flux2_klein_folder(path) -> Path:
    """A FLUX.2 [klein]-style ``Flux2KleinPipeline``: a ``Flux2Transformer2DModel`` (no guidance embedding) on a token
    per pixel of 2x2-patchified, batch-normalised latents of a tiny ``AutoencoderKLFlux2`` (4 latent channels,
    factor 2 then the patch: 16 x 16 images, 4 x 4 tokens), a Qwen3 text encoder of 27 layers (the pipeline stacks
    layers 9, 18 and 27: 48 features) with a chat template, and a dynamically shifted
    ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=[4, 8], in_channels=3, out_channels=3, layers_per_block=1,
                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                             latent_channels=4, norm_num_groups=2, sample_size=16)
    with torch.no_grad():  # a batch norm that has seen data: non-trivial statistics
        vae.bn.running_mean.copy_(0.1 * torch.randn(16))
        vae.bn.running_var.copy_(0.5 + torch.rand(16))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=27,
                                                num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                vocab_size=100)).eval()
    tokenizer = t5_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
    return _save(pipe, path, True)


OPEN_CLIP_NAME = "fastgen-test-tiny-clip"
"""The name a tiny open_clip model is registered under (``make_open_clip_weights``)."""


def make_open_clip_weights(folder) -> Path:
    """A tiny random open_clip model (32-pixel images, 8 features) registered with open_clip as
    ``OPEN_CLIP_NAME`` from a config in ``folder``; its weights saved as ``folder/tiny.safetensors`` (returned)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    config = {"embed_dim": 8,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    save_file(open_clip.create_model(OPEN_CLIP_NAME).state_dict(), folder / "tiny.safetensors")
    return folder / "tiny.safetensors"
