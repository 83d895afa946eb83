"""Prompt accuracy in the text-to-image toy world: does a sample show the shape and colour its prompt names?

The bundled ``ToyFeatureNet`` reads each image: its classifier gives the shape (an image it calls
"corrupted" matches no prompt) and its hue head the colour: the circular mean of the hue bins' centres
weighted by their probabilities, mapped to the nearest of ``TOY_COLOURS`` (``fastgen.toy.colour_index``).
``prompt_accuracy`` is the fraction of samples whose shape and colour both match the prompt, beside the
shape-only and colour-only fractions. Chance is 1/24 for both (1/4 shape, 1/6 colour).

The feature net reads the hue to about 0.03 of a turn, so real toy images whose hue lies near the border
of two colour names are sometimes read as the neighbour: real images score about 0.85 on colour, not 1
(``test_toy_t2i.py`` measures it), and that is the ceiling of the colour and joint accuracies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fastgen.errors import UsageError
from fastgen.eval.toy_fid import _check_images, _default_net
from fastgen.toy import ToyFeatureNet, colour_index, parse_toy_prompt, toy_eval_prompts


@dataclass(frozen=True)
class PromptAccuracy:
    """Fractions of samples whose shape and colour (``joint``), shape, or colour match their prompt."""

    joint: float
    shape: float
    colour: float


@torch.no_grad()
def read_toy_images(images: torch.Tensor, batch_size: int = 256,
                    net: ToyFeatureNet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shape, colour)`` the feature net reads in images (N, 3, 16, 16) in [-1, 1]: shape indices into
    ``TOY_FEATURE_CLASSES`` (``len(TOY_CLASSES)`` is "corrupted") and colour indices into ``TOY_COLOURS``."""
    images = _check_images(images)
    net = _default_net() if net is None else net
    device = next(net.parameters()).device
    bins = net.config["hue_bins"]
    centre = (torch.arange(bins, dtype=torch.float32, device=device) + 0.5) * (2 * math.pi / bins)
    shapes, colours = [], []
    for i in range(0, len(images), batch_size):
        features = net.features(images[i:i + batch_size].to(device, torch.float32))
        p = net.hue_head(features).softmax(1)
        angle = torch.atan2(p @ centre.sin(), p @ centre.cos())
        shapes.append(net.classifier(features).argmax(1).cpu())
        colours.append(colour_index((angle / (2 * math.pi)) % 1.0).cpu())
    if not shapes:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(shapes), torch.cat(colours)


def prompt_accuracy(images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256,
                    net: ToyFeatureNet | None = None) -> PromptAccuracy:
    """Prompt accuracy of images (N, 3, 16, 16) in [-1, 1]; image ``i`` was asked for ``prompts[i % len]``
    (the cycling of ``fastgen.generate.generate``); every prompt must read ``"a <colour> <shape>"``."""
    if isinstance(prompts, str) or not prompts:
        raise UsageError(f"prompt_accuracy: prompts={prompts!r}, expected a non-empty sequence of prompts "
                         "such as toy_eval_prompts()")
    if len(images) == 0:
        raise UsageError("prompt_accuracy: images is empty, expected at least one image")
    asked = torch.tensor([parse_toy_prompt(p) for p in prompts])
    asked = asked[torch.arange(len(images)) % len(prompts)]
    shape, colour = read_toy_images(images, batch_size, net)
    shape_ok, colour_ok = shape == asked[:, 0], colour == asked[:, 1]
    return PromptAccuracy(joint=(shape_ok & colour_ok).float().mean().item(),
                          shape=shape_ok.float().mean().item(), colour=colour_ok.float().mean().item())


__all__ = ["PromptAccuracy", "prompt_accuracy", "read_toy_images", "toy_eval_prompts"]
