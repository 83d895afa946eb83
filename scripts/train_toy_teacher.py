"""Train the bundled toy world: the toy feature network and the toy DDPM teacher (CPU, minutes).

    python scripts/train_toy_teacher.py --out-dir fastgen/assets

writes ``<out-dir>/toy_features`` (``ToyFeatureNet``: ``config.json`` + ``model.safetensors``) and
``<out-dir>/toy_teacher`` (a diffusers ``DDPMPipeline`` folder: a small ``UNet2DModel`` predicting
epsilon under a 1000-step linear-beta ``DDPMScheduler``, Ho et al. 2020, eq. 14; the EMA weights are
saved). Both are trained on a fixed pool of ``ToyShapes`` images rendered once from ``--seed``.
Each folder is written next to its destination and renamed into place, so an interrupted run leaves
the previous assets intact.
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
from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from fastgen.toy import ASSETS_DIR, TOY_CLASSES, TOY_HUE_BINS, TOY_IMAGE_SIZE, ToyFeatureNet, ToyShapes

CORRUPTED = len(TOY_CLASSES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=ASSETS_DIR, help="folder receiving toy_teacher/ and toy_features/")
    p.add_argument("--steps", type=int, default=3000, help="teacher optimisation steps")
    p.add_argument("--batch-size", type=int, default=128, help="teacher batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="teacher peak learning rate (AdamW)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="teacher EMA decay (with warm-up)")
    p.add_argument("--feature-steps", type=int, default=800, help="feature network optimisation steps")
    p.add_argument("--pool-size", type=int, default=40_000, help="training images rendered once")
    p.add_argument("--seed", type=int, default=0, help="seed of the image pool and of training")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--only", choices=("teacher", "features"), help="train only one of the two")
    return p.parse_args(argv)


def corrupt(x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Degrade images the way a poor generator would: Gaussian noise, a DDPM-style noised mix, or blur."""
    n = len(x0)
    kind = torch.randint(0, 3, (n,), generator=g)
    level = torch.rand(n, 1, 1, 1, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    noisy = x0 + (0.08 + 0.5 * level) * eps
    alpha_bar = 0.98 - 0.6 * level
    diffused = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    sigma = 0.6 + 1.0 * level
    radius = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (radius[None] / sigma.view(n, 1)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    padded = F.pad(x0, (3, 3, 3, 3), mode="replicate")
    rows = (padded.unfold(3, 7, 1) * kernel.view(n, 1, 1, 1, 7)).sum(-1)
    blurred = (rows.unfold(2, 7, 1) * kernel.view(n, 1, 1, 1, 7)).sum(-1)
    return torch.where(kind.view(n, 1, 1, 1) == 0, noisy, torch.where(kind.view(n, 1, 1, 1) == 1, diffused, blurred))


def train_features(images, labels, hues, args) -> ToyFeatureNet:
    """Shape class + "corrupted" class (cross-entropy) and hue bin of clean images (auxiliary head)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    net = ToyFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.feature_steps, pct_start=0.1)
    hue_bins = (hues * TOY_HUE_BINS).long().clamp_max(TOY_HUE_BINS - 1)
    batch, n_corrupt = 256, 64
    for step in range(args.feature_steps):
        idx = torch.randint(0, len(images), (batch + n_corrupt,), generator=g)
        x = torch.cat([images[idx[:batch]], corrupt(images[idx[batch:]], g)])
        y = torch.cat([labels[idx[:batch]], torch.full((n_corrupt,), CORRUPTED)])
        features = net.features(x)
        loss_class = F.cross_entropy(net.classifier(features), y)
        loss_hue = F.cross_entropy(net.hue_head(features[:batch]), hue_bins[idx[:batch]])
        loss = loss_class + 0.5 * loss_hue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.feature_steps - 1:
            print(f"features step {step:5d}  class {loss_class.item():.4f}  hue {loss_hue.item():.4f}", flush=True)
    return net.eval().requires_grad_(False)


def build_unet() -> UNet2DModel:
    """16x16 RGB UNet, about 1.1M parameters, self-attention at 4x4 only."""
    return UNet2DModel(
        sample_size=TOY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def train_teacher(images, args, unet: UNet2DModel | None = None, scheduler=None) -> tuple[UNet2DModel, object]:
    """Train ``unet`` (default: ``build_unet()``) under ``scheduler`` (default: the toy teacher's linear-beta
    1000-step ``DDPMScheduler``) with AdamW, linear warm-up, cosine decay and EMA. The target is the
    scheduler's output type: epsilon (Ho et al. 2020, eq. 14), v (Salimans & Ho 2022, eq. 10: ``get_velocity``)
    or, for a ``FlowMatchEulerDiscreteScheduler``, the rectified-flow velocity ``eps - x0`` at ``sigma ~ U(0, 1)``
    (Lipman et al. 2023; Liu et al. 2023), fed as ``t = 1000 sigma``."""
    g = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 2)
    if scheduler is None:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    unet = build_unet() if unet is None else unet
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
        x0 = images[torch.randint(0, len(images), (args.batch_size,), generator=g)]
        eps = torch.randn(x0.shape, generator=g)
        x_t, t, target = noised_and_target(scheduler, x0, eps, g)
        loss = F.mse_loss(unet(x_t, t).sample, target)
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
            print(f"teacher step {step:5d}  loss {loss.item():.4f}  smoothed {running:.4f}  "
                  f"lr {lr_sched.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f} s", flush=True)
    return ema, scheduler


def noised_and_target(scheduler, x0: torch.Tensor, eps: torch.Tensor, g: torch.Generator):
    """``(x_t, t, target)`` of one training batch under ``scheduler`` (see ``train_teacher``)."""
    n, num_t = len(x0), scheduler.config.num_train_timesteps
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = torch.rand(n, generator=g)
        s = sigma.view(n, 1, 1, 1)
        return (1 - s) * x0 + s * eps, sigma * num_t, eps - x0
    t = torch.randint(0, num_t, (n,), generator=g)
    x_t = scheduler.add_noise(x0, eps, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return x_t, t, eps
    if kind == "v_prediction":
        return x_t, t, scheduler.get_velocity(x0, eps, t)
    raise ValueError(f"prediction_type {kind!r}: expected 'epsilon' or 'v_prediction'")


def replace_folder(tmp: Path, final: Path) -> None:
    """Make the files in ``tmp`` world-readable (safetensors writes 0600) and move ``tmp`` to ``final``."""
    for path in tmp.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pool = ToyShapes(args.pool_size, TOY_IMAGE_SIZE, args.seed)
    images, labels = pool.tensors()
    print(f"rendered {len(images)} images in {time.perf_counter() - start:.1f} s", flush=True)

    if args.only in (None, "features"):
        net = train_features(images, labels, pool.hues(), args)
        tmp = args.out_dir / ".toy_features.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        net.save(tmp)
        replace_folder(tmp, args.out_dir / "toy_features")
        print(f"saved {args.out_dir / 'toy_features'} at {time.perf_counter() - start:.1f} s", flush=True)

    if args.only in (None, "teacher"):
        unet, scheduler = train_teacher(images, args)
        tmp = args.out_dir / ".toy_teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        replace_folder(tmp, args.out_dir / "toy_teacher")
        print(f"saved {args.out_dir / 'toy_teacher'} at {time.perf_counter() - start:.1f} s", flush=True)

    print(f"wall time {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
