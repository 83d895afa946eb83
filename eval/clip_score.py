"""CLIP score of images against their prompts (Hessel et al. 2021, "CLIPScore", whose CLIP-S is
``w * max(cos, 0)`` with w = 2.5), with an open_clip model or a Hugging Face ``transformers`` CLIP model.

For each image ``v`` and prompt ``c`` the cosine ``cos(E_I(v), E_T(c))`` of the CLIP embeddings is taken;
two averages are reported:

- ``clip_score = mean_i 100 * max(cos_i, 0)``: Hessel's CLIP-S with weight 100 instead of 2.5, the
  scale text-to-image papers report (SD1.5 ≈ 30-36). torchmetrics' ``CLIPScore`` clamps the mean
  instead of each term (``max(100 * mean cos, 0)``); the two agree whenever no cosine is negative,
  which is the case for trained CLIP models on real prompts.
- ``clip_cosine_raw = mean_i cos_i``: what DMD2 and SiD report (open_clip ViT-g-14 laion2b_s12b_b42k,
  prompt_template ``"A photo depicts {}"``; SD1.5 ≈ 0.30-0.32).

Models are read from local files only (``fastgen eval --clip-model ... [--clip-weights FILE]``):

- a Hugging Face CLIP folder (e.g. a copy of ``openai/clip-vit-large-patch14``): ``CLIPScorer("/path/folder")``.
  It holds ``config.json`` with ``model_type`` ``"clip"``, the weights as ``model.safetensors`` (pickled
  ``pytorch_model.bin`` files are not read), the tokenizer (``tokenizer.json``, or ``vocab.json`` and
  ``merges.txt``) and ``preprocessor_config.json``, whose ``CLIPImageProcessor`` resizes, crops and
  normalises the images; the embeddings are ``CLIPModel.get_image_features`` / ``get_text_features``.
- an open_clip model name with its weights file: ``CLIPScorer("ViT-g-14", pretrained="/path/model.safetensors")``
  (``.safetensors``, or a ``.bin``/``.pt``/``.pth`` that unpickles to plain tensors: it is opened with
  ``weights_only=True`` before open_clip reads it, so a pickle that would run code, or a TorchScript
  archive such as OpenAI's original ``.pt``, is refused); or ``CLIPScorer("local-dir:/path/folder")``, an
  open_clip folder. A pretrained tag (``"laion2b_s12b_b42k"``) is resolved by open_clip, which downloads
  on a cache miss, so it needs ``allow_download=True``.

Prompts longer than the text model's context are truncated, with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from fastgen.errors import InputError, UsageError
from fastgen.eval.fid import to_uint8

HF_FOLDER = ("a Hugging Face CLIP folder (config.json with model_type 'clip', model.safetensors, tokenizer.json or "
             "vocab.json and merges.txt, preprocessor_config.json)")


class CLIPScore(NamedTuple):
    clip_score: float
    clip_cosine_raw: float
    num_images: int


class CLIPScorer:
    """A CLIP model with its image preprocessing and tokenizer, scoring image-prompt pairs.

    ``model_name``: a Hugging Face CLIP folder (``pretrained`` must be None), an open_clip model name
    (``pretrained``: its local weights file) or ``local-dir:FOLDER`` (module docstring). ``name`` says
    which model scores, for reports: the folder's name, or the open_clip name with its weights file's name.
    """

    def __init__(self, model_name: str | os.PathLike, pretrained: str | os.PathLike | None = None, device="cpu",
                 allow_download: bool = False):
        model_name = str(model_name)
        self.device = torch.device(device)
        if os.path.isdir(model_name):
            if pretrained is not None:
                raise UsageError(f"CLIP model {model_name} is a folder, which holds its own weights; expected no "
                                 f"weights file (--clip-weights / pretrained), got {pretrained}")
            self._load_transformers(Path(model_name))
        else:
            self._load_open_clip(model_name, pretrained, allow_download)
        self.model.eval().requires_grad_(False)

    def _load_open_clip(self, model_name: str, pretrained, allow_download: bool) -> None:
        local_dir = model_name.startswith("local-dir:")
        if local_dir and pretrained is not None:
            raise UsageError(f"CLIPScorer: pretrained={pretrained!r} with model_name={model_name!r}, expected None "
                             f"(a local-dir: folder holds its own weights)")
        if not (local_dir or model_name.startswith("hf-hub:") or model_name in open_clip.list_models()):
            kind = "a file, " if os.path.isfile(model_name) else ""
            raise UsageError(f"CLIP model {model_name!r} (--clip-model) is {kind}neither a folder nor an open_clip "
                             f"model name; expected {HF_FOLDER}, or an open_clip name such as ViT-g-14 with its "
                             f"weights file (--clip-weights)")
        local_file = pretrained is not None and os.path.isfile(pretrained)
        if not local_dir and not allow_download and not local_file:
            given = "no weights were given" if pretrained is None else f"pretrained={pretrained!r} is not a local file"
            raise FileNotFoundError(
                f"CLIP model {model_name}: {given}; expected --clip-weights PATH, the {model_name} checkpoint "
                f"(.safetensors, or .bin/.pt of plain tensors), or --clip-model {HF_FOLDER}. fastgen never "
                "downloads (in Python, CLIPScorer(allow_download=True) lets open_clip fetch a pretrained tag)"
            )
        if local_file:
            _check_tensor_file(Path(pretrained))
        elif local_dir:
            folder = Path(model_name[len("local-dir:"):])
            for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                if path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
                    _check_tensor_file(path)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None if pretrained is None else str(pretrained), device=self.device
            )
        except (RuntimeError, KeyError, ValueError) as err:
            source = pretrained if local_file else model_name
            raise InputError(f"CLIP weights {source} do not load into open_clip's {model_name} "
                             f"({_summary(err)}); expected the checkpoint of that model") from err
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.backend = "open_clip"
        self.context_length = self.tokenizer.context_length
        if local_dir:
            self.name = Path(model_name[len("local-dir:"):]).resolve().name
        else:
            self.name = f"{model_name} ({Path(pretrained).name if local_file else pretrained})" if pretrained \
                else model_name

    def _load_transformers(self, folder: Path) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from fastgen.teacher import quiet_loading

        config_path = folder / "config.json"
        if not config_path.is_file():
            raise InputError(f"CLIP model {folder} has no config.json; expected {HF_FOLDER}")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{config_path} is not valid JSON ({err}); expected {HF_FOLDER}") from err
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type != "clip":
            raise InputError(f"CLIP model {folder}: config.json has model_type {model_type!r}, not a transformers "
                             f"CLIPModel; expected {HF_FOLDER}")
        if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            also = f" ({', '.join(pickled)} is pickled and not read: unpickling can run code)" if pickled else ""
            raise InputError(f"CLIP model {folder} has no model.safetensors{also}; expected {HF_FOLDER}")
        has_tokenizer = (folder / "tokenizer.json").is_file() or all(
            (folder / name).is_file() for name in ("vocab.json", "merges.txt"))
        if not has_tokenizer or not (folder / "preprocessor_config.json").is_file():
            missing = "its tokenizer" if not has_tokenizer else "preprocessor_config.json"
            raise InputError(f"CLIP model {folder} lacks {missing}; expected {HF_FOLDER}")
        with quiet_loading():
            try:
                model, info = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                        output_loading_info=True)
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                self.preprocess = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, RuntimeError) as err:
                raise InputError(f"CLIP model {folder} cannot be loaded ({_summary(err)}); expected {HF_FOLDER}"
                                 ) from err
        missing = sorted(info["missing_keys"]) + sorted(str(key) for key in info["mismatched_keys"])
        if missing:
            raise InputError(f"CLIP model {folder}: model.safetensors lacks {len(missing)} weight(s) of its config "
                             f"(e.g. {missing[0]}); expected the weights of that CLIPModel")
        vocab = model.config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise InputError(f"CLIP model {folder}: the tokenizer has {len(self.tokenizer)} tokens, the text model "
                             f"{vocab}; expected the tokenizer saved with that model")
        self.model = model.float().to(self.device)
        self.backend = "transformers"
        self.context_length = model.config.text_config.max_position_embeddings
        self.name = folder.resolve().name

    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The text model's keyword arguments; prompts beyond its context are truncated, with a warning."""
        context = self.context_length
        if self.backend == "open_clip":
            overflow = (self.tokenizer(prompts, context_length=context + 1)[:, context] != 0).tolist()
        else:
            overflow = [len(ids) > context for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        for index in [i for i, long in enumerate(overflow) if long]:
            warnings.warn(f"CLIP score: prompt {index} ({prompts[index][:60]!r}) is longer than the tokenizer "
                          f"context of {context} tokens and is truncated", stacklevel=4)
        if self.backend == "open_clip":
            return {"text": self.tokenizer(prompts)}
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=context, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def _pixels(self, images, value_range) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            array = to_uint8(images, value_range).permute(0, 2, 3, 1).cpu().numpy()
            images = [Image.fromarray(image) for image in array]
        elif not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("CLIP score: images must be a tensor (N, 3, H, W) or a sequence of PIL images")
        images = [image.convert("RGB") for image in images]
        if self.backend == "open_clip":
            return torch.stack([self.preprocess(image) for image in images])
        return self.preprocess(images=images, return_tensors="pt")["pixel_values"]

    def _embed(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings (unnormalised): open_clip's ``encode_image``/``encode_text``, or the
        projected pooled outputs that ``CLIPModel.get_image_features``/``get_text_features`` return."""
        pixels = pixels.to(self.device)
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        if self.backend == "open_clip":
            return self.model.encode_image(pixels), self.model.encode_text(**tokens)
        model = self.model
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        return image, text

    def cosines(self, images, prompts: Sequence[str], value_range=None, prompt_template: str = "{}") -> torch.Tensor:
        """Cosine similarity of each image with its prompt, shape ``(N,)``."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score: {len(images)} images and {len(prompts)} prompts, expected one prompt "
                             f"per image")
        tokens = self._tokenize([prompt_template.format(prompt) for prompt in prompts])
        with torch.no_grad():
            image_embedding, text_embedding = self._embed(self._pixels(images, value_range), tokens)
        cosine = (F.normalize(image_embedding, dim=-1) * F.normalize(text_embedding, dim=-1)).sum(dim=-1)
        return cosine.double().cpu()

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


def _check_tensor_file(path: Path) -> None:
    """Refuse a weights file that is not plain tensors, before open_clip reads it: a ``.safetensors`` file's
    header is read; any other file but numpy's ``.npz``/``.npy`` (which open_clip reads without pickle) is
    unpickled with ``weights_only=True`` onto the meta device, which runs no code and reads no tensor data."""
    if path.suffix in (".npz", ".npy"):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol of a file it then refuses
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt"):
                    pass
            else:
                torch.load(path, map_location="meta", weights_only=True)
    except Exception as err:  # whatever the parser trips on, the file is not a checkpoint of plain tensors
        raise InputError(f"CLIP weights {path} cannot be read as plain tensors ({_summary(err)}); expected a "
                         f".safetensors file, or a .bin/.pt/.pth that unpickles to tensors only (no code, no "
                         f"TorchScript)") from err


def _summary(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(err).__name__
