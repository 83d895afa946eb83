"""Train the bundled text-conditioned toy teacher, a Stable-Diffusion-style pipeline (CPU, one thread, 12-32 min).

    python scripts/train_toy_t2i.py --out-dir fastgen/assets

writes ``<out-dir>/toy_t2i``, a diffusers ``StableDiffusionPipeline`` folder trained on ``ToyShapes``
(16x16 RGB) with the prompts ``"a <colour> <shape>"`` of ``fastgen.toy.toy_prompt``:

1. a small ``AutoencoderKL`` (downsampling 2, 4x8x8 latents) trained for reconstruction with a weak KL
   term (Rombach et al. 2022, sec. 3); its ``scaling_factor`` is set to one over the latents' std;
2. a ``CLIPTextModel`` kept frozen at its seeded random initialisation (the toy tokenizer is word-level,
   so each prompt's hidden states are a fixed, distinct code that the UNet learns to read);
3. a ``UNet2DConditionModel`` predicting epsilon (Ho et al. 2020, eq. 14) under Stable Diffusion's
   scaled-linear 1000-step betas, cross-attending to the text hidden states, with the prompt replaced by
   the empty prompt with probability ``--prompt-dropout`` so that classifier-free guidance
   (Ho & Salimans 2022, eq. 6) works; the EMA weights are saved.

Everything is deterministic from ``--seed``. The bundled folder is ``--seed 0`` with the defaults: 32 min of
wall time with one torch thread on a 2-core machine shared with five other busy processes (the UNet step
took 1.4-2.5 s there; about 0.6 s on an idle core, so about 12 min in all). The folder is written next to
its destination and renamed into place, so an interrupted run leaves the previous asset intact.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from train_toy_teacher import replace_folder  # scripts/ is on sys.path when this script runs
from transformers import CLIPTextConfig, CLIPTextModel

from fastgen.toy import (ASSETS_DIR, TOY_CLASSES, TOY_COLOURS, TOY_IMAGE_SIZE, TOY_PROMPT_LENGTH, ToyShapes,
                         colour_index, toy_prompt, toy_tokenizer)

TEXT_DIM = 64
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=ASSETS_DIR, help="folder receiving toy_t2i/")
    p.add_argument("--steps", type=int, default=1100, help="UNet optimisation steps")
    p.add_argument("--batch-size", type=int, default=128, help="UNet batch size")
    p.add_argument("--lr", type=float, default=1.5e-3, help="UNet peak learning rate (AdamW)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="UNet EMA decay (with warm-up)")
    p.add_argument("--vae-steps", type=int, default=600, help="autoencoder optimisation steps")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the autoencoder's KL term")
    p.add_argument("--prompt-dropout", type=float, default=0.12, help="probability of the empty prompt")
    p.add_argument("--pool-size", type=int, default=40_000, help="training images rendered once")
    p.add_argument("--seed", type=int, default=0, help="seed of the image pool and of training")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if not 0.0 <= args.prompt_dropout < 1.0:
        p.error(f"--prompt-dropout={args.prompt_dropout}, expected a probability in [0, 1)")
    return args


def build_vae() -> AutoencoderKL:
    """16x16 RGB <-> 4x8x8 latents, about 0.16M parameters."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=TOY_IMAGE_SIZE,
                         mid_block_add_attention=False)


def build_text_encoder(tokenizer) -> CLIPTextModel:
    """A two-layer CLIP text transformer over the toy vocabulary (random, frozen)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=TEXT_DIM,
                            max_position_embeddings=TOY_PROMPT_LENGTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_unet() -> UNet2DConditionModel:
    """4x8x8 latents, cross-attention at 8x8 and 4x4, about 1.1M parameters."""
    return UNet2DConditionModel(sample_size=TOY_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=TEXT_DIM,
                                attention_head_dim=4, norm_num_groups=8)


def train_vae(images, args) -> AutoencoderKL:
    """Reconstruction (MSE + L1) plus ``kl_weight`` times the KL to N(0, I), AdamW with cosine decay."""
    g = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.vae_steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(args.vae_steps):
        x = images[torch.randint(0, len(images), (64,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss_rec = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x)
        loss_kl = posterior.kl().mean() / z[0].numel()
        loss = loss_rec + args.kl_weight * loss_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step:5d}  rec {loss_rec.item():.5f}  kl/dim {loss_kl.item():.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, 4, 8, 8) of every pool image."""
    means, stds = [], []
    for i in range(0, len(images), 1024):
        posterior = vae.encode(images[i:i + 1024]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def prompt_embeddings(tokenizer, text_encoder) -> torch.Tensor:
    """Text hidden states (1 + classes x colours, L, D): the empty prompt first, then ``toy_prompt(c, k)``
    at ``1 + c * len(TOY_COLOURS) + k``."""
    prompts = [""] + [toy_prompt(c, k) for c in range(len(TOY_CLASSES)) for k in range(len(TOY_COLOURS))]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(latents, prompt_ids, embeddings, args) -> UNet2DConditionModel:
    """Epsilon prediction with prompt dropout; AdamW, linear warm-up, cosine decay and EMA."""
    mean, std = latents
    g = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 2)
    scheduler = DDPMScheduler(**BETAS, prediction_type="epsilon")
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    running, start = None, time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=g)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        keep = torch.rand(args.batch_size, generator=g) >= args.prompt_dropout
        context = embeddings[torch.where(keep, prompt_ids[idx], 0)]
        eps = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(z0, eps, t), t, context).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"unet step {step:5d}  loss {loss.item():.4f}  smoothed {running:.4f}  "
                  f"lr {lr_sched.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f} s", flush=True)
    return ema


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pool = ToyShapes(args.pool_size, TOY_IMAGE_SIZE, args.seed)
    images, labels = pool.tensors()
    prompt_ids = 1 + labels * len(TOY_COLOURS) + colour_index(pool.hues())
    print(f"rendered {len(images)} images in {time.perf_counter() - start:.1f} s", flush=True)

    vae = train_vae(images, args)
    mean, std = encode_pool(vae, images)
    scaling = 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()
    vae.register_to_config(scaling_factor=scaling)
    print(f"latent scaling factor {scaling:.4f} at {time.perf_counter() - start:.1f} s", flush=True)

    torch.manual_seed(args.seed + 3)
    tokenizer = toy_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    embeddings = prompt_embeddings(tokenizer, text_encoder)
    unet = train_unet((mean * scaling, std * scaling), prompt_ids, embeddings, args)

    scheduler = DDIMScheduler(**BETAS, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = args.out_dir / ".toy_t2i.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    replace_folder(tmp, args.out_dir / "toy_t2i")
    print(f"saved {args.out_dir / 'toy_t2i'}; wall time {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
