"""Adversarial heads on a denoiser's features, shared by DMD2, SiDA and ASD.

A discriminator here is a small head on the activations of one block of a denoiser (its bottleneck by
default) at a noised input: DMD2 (Yin et al. 2024b, §4.2) puts it on the fake score's bottleneck, so the
fake score's encoder is trained by both its score-matching and the classification loss; other code puts it
on frozen teacher features, where the head alone trains. Inputs are noised at a random level first (the
"diffusion GAN" of Wang et al. 2023; DMD2 samples the level uniformly over the whole range).

Losses, for logits ``D(x)``: non-saturating (Goodfellow et al. 2014, §3; the softplus form of DMD2)
``L_D = softplus(-D(real)) + softplus(D(fake))``, ``L_G = softplus(-D(fake))``; hinge (Lim & Ye 2017)
``L_D = relu(1 - D(real)) + relu(1 + D(fake))``, ``L_G = -D(fake)``. The R1 penalty (Mescheder et al. 2018,
eq. 9) is ``E ||grad_x D(x_real)||^2``, scaled by ``gamma / 2`` by the caller's weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fastgen.denoiser import Cond

GAN_LOSSES = ("nonsaturating", "hinge")
PLACEMENTS = ("fake", "teacher")


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class DiscriminatorHead(nn.Module):
    """Convolutions (stride 2 while the map is larger than 4×4) with GroupNorm and SiLU, global average
    pooling and one logit; token features ``(B, N, D)`` of transformers (``spatial`` None) are pooled over tokens
    into the logit alone: no convolutions, whose weights would take no part in the loss (DDP refuses those)."""

    def __init__(self, channels: int, spatial: int | None, width: int | None = None):
        super().__init__()
        if spatial is None:
            self.convs, self.out = None, nn.Linear(channels, 1)
            return
        width = width or channels
        layers: list[nn.Module] = []
        size, c = spatial, channels
        while True:
            stride = 2 if size > 4 else 1
            layers += [nn.Conv2d(c, width, 4 if stride == 2 else 3, stride, 1), nn.GroupNorm(_groups(width), width),
                       nn.SiLU()]
            c, size = width, (size + stride - 1) // stride
            if stride == 1:
                break
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # the one logit as a new tensor (sum over one), not a view: FSDP2 hooks a sharded module's output
        if self.convs is None:  # tokens
            return self.out(features.mean(1)).sum(1)
        return self.out(self.convs(features).mean((2, 3))).sum(1)


def discriminator_logits(head: nn.Module, denoiser, schedule, x: torch.Tensor, t: torch.Tensor,
                         cond: Cond | None, features=True) -> torch.Tensor:
    """Logits of ``head`` on block ``features`` of ``denoiser`` (a network of the objective, or the frozen
    teacher) at ``x`` noised to level ``t``. Both networks come from the caller (the objective's ``nets``), so
    the trainer wraps and owns each; this only wires them."""
    x_t = schedule.add_noise(x, torch.randn_like(x), t)
    _, found = denoiser(x_t, t, cond, features=features)
    return head(next(iter(found.values())).float())


def make_head(denoiser, sample: torch.Tensor, t: torch.Tensor, cond: Cond | None, features=True) -> DiscriminatorHead:
    """A head sized for ``denoiser``'s features on a probe batch ``sample``. Under fp16/bf16 (a half-precision
    base under a float32 LoRA adapter, or a float32 copy given the half-precision teacher's text embeddings)
    the probe runs under autocast, as training does; on a device without autocast (``meta``: ``fastgen
    estimate`` builds its networks there) the condition is cast to the denoiser's dtype instead (only the
    features' shape is read)."""
    dtypes = {denoiser.dtype, *(v.dtype for v in tree_flatten(cond)[0] if torch.is_tensor(v) and v.is_floating_point())}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    autocast = torch.amp.is_autocast_available(sample.device.type)
    if not autocast:
        cond = tree_map(lambda v: v.to(denoiser.dtype) if torch.is_tensor(v) and v.is_floating_point() else v, cond)
    with torch.no_grad(), torch.autocast(sample.device.type if autocast else "cpu", dtype=half or torch.bfloat16,
                                         enabled=autocast and half is not None):
        _, found = denoiser(sample, t, cond, features=features)
    feature = next(iter(found.values()))
    if feature.ndim == 3:
        return DiscriminatorHead(feature.shape[-1], None)
    return DiscriminatorHead(feature.shape[1], feature.shape[-1])


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` over the batch (``inputs`` must require grad; the graph is kept for backward)."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.flatten(1).square().sum(1).mean()
