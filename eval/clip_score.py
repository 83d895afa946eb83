"""CLIP score of images against their prompts with an open_clip model (Hessel et al. 2021, "CLIPScore",
whose CLIP-S is ``w * max(cos, 0)`` with w = 2.5).

For each image ``v`` and prompt ``c`` the cosine ``cos(E_I(v), E_T(c))`` of the CLIP embeddings is taken;
two averages are reported:

- ``clip_score = mean_i 100 * max(cos_i, 0)``: Hessel's CLIP-S with weight 100 instead of 2.5, the
  scale text-to-image papers report (SD1.5 ≈ 30-36). torchmetrics' ``CLIPScore`` clamps the mean
  instead of each term (``max(100 * mean cos, 0)``); the two agree whenever no cosine is negative,
  which is the case for trained CLIP models on real prompts.
- ``clip_cosine_raw = mean_i cos_i``: what DMD2 and SiD report (open_clip ViT-g-14 laion2b_s12b_b42k,
  prompt_template ``"A photo depicts {}"``; SD1.5 ≈ 0.30-0.32).

Weights come from a local file: ``CLIPScorer("ViT-g-14", pretrained="/path/open_clip_pytorch_model.bin")``
or ``CLIPScorer("local-dir:/path/folder")``. A pretrained tag (``"laion2b_s12b_b42k"``) is resolved by
open_clip, which downloads on a cache miss, so it needs ``allow_download=True``. Prompts longer than the
tokenizer's context are truncated by it, with a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Sequence

import open_clip
import torch
from PIL import Image

from fastgen.eval.fid import to_uint8


class CLIPScore(NamedTuple):
    clip_score: float
    clip_cosine_raw: float
    num_images: int


class CLIPScorer:
    """An open_clip model with its inference transform and tokenizer, scoring image-prompt pairs."""

    def __init__(self, model_name: str, pretrained: str | os.PathLike | None = None, device="cpu",
                 allow_download: bool = False):
        local_dir = model_name.startswith("local-dir:")
        if local_dir and pretrained is not None:
            raise ValueError(f"CLIPScorer: pretrained={pretrained!r} with model_name={model_name!r}, expected None "
                             f"(a local-dir: folder holds its own weights)")
        if not local_dir and not allow_download and (pretrained is None or not os.path.isfile(pretrained)):
            raise FileNotFoundError(
                f"CLIPScorer: pretrained={pretrained!r} is not a local file, expected the path of the {model_name} "
                f"checkpoint (.bin/.pt/.safetensors). A pretrained tag makes open_clip download on a cache miss: "
                f"pass allow_download=True to allow it."
            )
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if pretrained is None else str(pretrained), device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        context = self.tokenizer.context_length
        overflow = self.tokenizer(prompts, context_length=context + 1)[:, context] != 0
        for index in overflow.nonzero().flatten().tolist():
            warnings.warn(f"CLIP score: prompt {index} ({prompts[index][:60]!r}) is longer than the tokenizer "
                          f"context of {context} tokens and is truncated", stacklevel=4)
        return self.tokenizer(prompts)

    def _pixels(self, images, value_range) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            array = to_uint8(images, value_range).permute(0, 2, 3, 1).cpu().numpy()
            images = [Image.fromarray(image) for image in array]
        elif not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("CLIP score: images must be a tensor (N, 3, H, W) or a sequence of PIL images")
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    def cosines(self, images, prompts: Sequence[str], value_range=None, prompt_template: str = "{}") -> torch.Tensor:
        """Cosine similarity of each image with its prompt, shape ``(N,)``."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score: {len(images)} images and {len(prompts)} prompts, expected one prompt "
                             f"per image")
        tokens = self._tokenize([prompt_template.format(prompt) for prompt in prompts])
        with torch.no_grad():
            image_embedding = self.model.encode_image(self._pixels(images, value_range).to(self.device), normalize=True)
            text_embedding = self.model.encode_text(tokens.to(self.device), normalize=True)
        return (image_embedding * text_embedding).sum(dim=-1).double().cpu()

    def __call__(self, images, prompts: Sequence[str], value_range=None, batch_size: int = 32,
                 prompt_template: str = "{}") -> CLIPScore:
        """``images``: uint8 tensor (N, 3, H, W) in [0, 255], float tensor with ``value_range`` (e.g. (-1, 1)),
        or a sequence of PIL images; ``prompts``: one per image."""
        if len(images) != len(prompts) or len(prompts) == 0:
            raise ValueError(f"CLIP score: {len(images)} images and {len(prompts)} prompts, expected one prompt "
                             f"per image and at least one")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"CLIP score: batch_size={batch_size!r}, expected a positive int")
        batches = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            batches.append(self.cosines(images[start:end], prompts[start:end], value_range, prompt_template))
        cosines = torch.cat(batches)
        return CLIPScore(float((100.0 * cosines.clamp(min=0)).mean()), float(cosines.mean()), len(prompts))
