"""The toy world: procedural images of coloured shapes, the bundled toy teacher and the toy feature network.

``ToyShapes`` draws one shape (``TOY_CLASSES``) per image in a random saturated colour, at a random
position, size and rotation, on a dark grey background. Image ``i`` depends only on ``(seed, i)``: its
parameters come from a generator seeded with a hash of the pair, so any subset of a dataset can be
rendered in any order. Shapes are rendered at 4x resolution and average-pooled (anti-aliasing), so the
image distribution is smooth.

``ToyFeatureNet`` is a small CNN trained (``scripts/train_toy_teacher.py``) to tell the shape classes
from one another and from corrupted images (noised or blurred), with an auxiliary head for the hue;
its penultimate activations are the features of the "toy FID" (``fastgen.eval.toy_fid``).

The text-to-image toy world names each image with a prompt, ``"a <colour> <shape>"`` (``toy_prompt``): the
colour is the nearest of the six ``TOY_COLOURS`` hues, the shape its class. ``toy_tokenizer`` is the
word-level ``CLIPTokenizer`` of that vocabulary, built offline, used by the bundled text-conditioned toy
teacher (``toy_t2i_path``, trained by ``scripts/train_toy_t2i.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.errors import UsageError

TOY_IMAGE_SIZE = 16
TOY_CLASSES = ("disc", "square", "triangle", "cross")
TOY_FEATURE_CLASSES = TOY_CLASSES + ("corrupted",)
TOY_HUE_BINS = 8
SUPERSAMPLING = 4

ASSETS_DIR = Path(__file__).parent / "assets"
TRAIN_SCRIPT = "scripts/train_toy_teacher.py"
T2I_TRAIN_SCRIPT = "scripts/train_toy_t2i.py"

TOY_COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
"""Colour names; colour ``k`` is the hue ``k / 6`` (``colour_index`` maps a hue to the nearest one)."""
TOY_PROMPT_LENGTH = 16
"""Tokens per prompt of the toy tokenizer (Stable Diffusion uses 77; the toy prompts need five)."""
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def item_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of the dataset with ``seed`` (stable across processes)."""
    digest = hashlib.blake2b(f"fastgen-toy:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] to RGB in [0, 1]; inputs of shape (N,), output (N, 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6.0 * h[:, None]) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def sample_params(seed: int, index: int) -> dict[str, torch.Tensor]:
    """Draw the parameters of one image: label, hue, colour, background, centre, radius, angle."""
    g = torch.Generator().manual_seed(item_seed(seed, index))
    u = torch.rand(9, generator=g, dtype=torch.float64).float()
    label = int(u[0] * len(TOY_CLASSES))
    hue = u[1]
    colour = hsv_to_rgb(hue[None], 0.75 + 0.25 * u[2:3], 0.8 + 0.2 * u[3:4])[0]
    background = 0.05 + 0.15 * u[4]
    return {
        "label": torch.tensor(label),
        "hue": hue,
        "colour": colour,
        "background": background,
        "centre": 0.3 + 0.4 * u[5:7],
        "radius": 0.2 + 0.12 * u[7],
        "angle": 2.0 * math.pi * u[8],
    }


def render(params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Render a batch of stacked parameters to images (N, 3, size, size) in [-1, 1], anti-aliased."""
    fine = size * SUPERSAMPLING
    grid = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    dx = x[None] - params["centre"][:, 0, None, None]
    dy = y[None] - params["centre"][:, 1, None, None]
    cos, sin = torch.cos(params["angle"])[:, None, None], torch.sin(params["angle"])[:, None, None]
    radius = params["radius"][:, None, None]
    px, py = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
    triangle = torch.ones_like(px, dtype=torch.bool)
    for k in range(3):
        phi = -math.pi / 2 + 2 * math.pi * k / 3
        triangle &= px * math.cos(phi) + py * math.sin(phi) <= 0.5
    masks = torch.stack(
        [
            px**2 + py**2 <= 1.0,
            torch.maximum(px.abs(), py.abs()) <= 0.8,
            triangle,
            ((px.abs() <= 0.3) & (py.abs() <= 0.95)) | ((py.abs() <= 0.3) & (px.abs() <= 0.95)),
        ],
        dim=1,
    )
    mask = masks[torch.arange(len(px)), params["label"]].float()
    coverage = F.avg_pool2d(mask[:, None], SUPERSAMPLING)
    background = params["background"][:, None, None, None]
    rgb = background + coverage * (params["colour"][:, :, None, None] - background)
    return rgb * 2.0 - 1.0


class ToyShapes(torch.utils.data.Dataset):
    """``num_images`` procedural RGB images of coloured shapes; item ``(image, label)``.

    ``image`` is float32 in [-1, 1] of shape (3, size, size); ``label`` an int indexing ``TOY_CLASSES``.
    """

    def __init__(self, num_images: int, size: int = TOY_IMAGE_SIZE, seed: int = 0):
        if num_images < 0:
            raise ValueError(f"ToyShapes: num_images={num_images}, expected a non-negative int")
        if size < 4:
            raise ValueError(f"ToyShapes: size={size}, expected an int >= 4")
        self.num_images, self.size, self.seed = num_images, size, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"ToyShapes: index {index} out of range for {self.num_images} images")
        index %= self.num_images
        params = sample_params(self.seed, index)
        image = render({k: v[None] for k, v in params.items()}, self.size)[0]
        return image, int(params["label"])

    def tensors(self, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (N, 3, size, size) and labels (N,), rendered in chunks (same values as indexing)."""
        images, labels = [], []
        for start in range(0, self.num_images, chunk):
            batch = [sample_params(self.seed, i) for i in range(start, min(start + chunk, self.num_images))]
            params = {k: torch.stack([p[k] for p in batch]) for k in batch[0]}
            images.append(render(params, self.size))
            labels.append(params["label"])
        if not images:
            return torch.empty(0, 3, self.size, self.size), torch.empty(0, dtype=torch.long)
        return torch.cat(images), torch.cat(labels)

    def hues(self) -> torch.Tensor:
        """The hue in [0, 1) of every image's shape (N,), the target of the feature net's colour head."""
        return torch.stack([sample_params(self.seed, i)["hue"] for i in range(self.num_images)])


def colour_index(hue: torch.Tensor) -> torch.Tensor:
    """Index into ``TOY_COLOURS`` of the colour nearest to each hue in [0, 1) (circular): ``round(6 hue) mod 6``."""
    return torch.round(hue * len(TOY_COLOURS)).long() % len(TOY_COLOURS)


def toy_prompt(label: int, colour: int) -> str:
    """The prompt naming shape class ``label`` in colour ``colour``: ``"a red disc"``."""
    if not 0 <= label < len(TOY_CLASSES):
        raise UsageError(f"toy_prompt: label={label}, expected an int in [0, {len(TOY_CLASSES)})")
    if not 0 <= colour < len(TOY_COLOURS):
        raise UsageError(f"toy_prompt: colour={colour}, expected an int in [0, {len(TOY_COLOURS)})")
    return f"a {TOY_COLOURS[colour]} {TOY_CLASSES[label]}"


def toy_eval_prompts() -> list[str]:
    """The fixed evaluation prompt set: every shape x colour combination, shape-major (24 prompts)."""
    return [toy_prompt(label, colour) for label in range(len(TOY_CLASSES)) for colour in range(len(TOY_COLOURS))]


def parse_toy_prompt(prompt: str) -> tuple[int, int]:
    """``(label, colour)`` of a prompt written by ``toy_prompt`` (case and surrounding spaces ignored)."""
    words = prompt.strip().lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in TOY_COLOURS or words[2] not in TOY_CLASSES:
        raise UsageError(f"parse_toy_prompt: prompt={prompt!r}, expected 'a <colour> <shape>' with colour in "
                         f"{TOY_COLOURS} and shape in {TOY_CLASSES}")
    return TOY_CLASSES.index(words[2]), TOY_COLOURS.index(words[1])


def toy_tokenizer():
    """A word-level ``CLIPTokenizer`` of the toy vocabulary ("a", the colours, the shapes), built offline.

    Each word has BPE merges that join its characters left to right into ``word</w>``; merges rank in the
    order of the words, so an earlier word's merge can take precedence ("re" of "red" splits "green" into
    four known pieces): every word still has its own token sequence, with no unknown token, which is all the
    frozen random text encoder of the toy teacher needs. The bundled teacher was trained with exactly these
    ids. Unknown words map to ``<|endoftext|>``, also the padding; ``TOY_PROMPT_LENGTH`` tokens per prompt.
    """
    from transformers import CLIPTokenizer

    words = ("a",) + TOY_COLOURS + TOY_CLASSES
    tokens, merges = [_BOS, _EOS], []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            if piece not in tokens:
                tokens.append(piece)
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            if merged not in tokens:
                tokens.append(merged)
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=_EOS, bos_token=_BOS, eos_token=_EOS,
                         pad_token=_EOS, model_max_length=TOY_PROMPT_LENGTH)


def toy_images(n: int, size: int = TOY_IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """``n`` toy images (n, 3, size, size) in [-1, 1]: the first ``n`` items of ``ToyShapes(n, size, seed)``."""
    return ToyShapes(n, size, seed).tensors()[0]


def _bundled(name: str, script: str = TRAIN_SCRIPT) -> Path:
    path = ASSETS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"toy asset folder {path} is missing; create it with `python {script} --out-dir {ASSETS_DIR}`"
        )
    return path


def toy_teacher_path() -> Path:
    """The bundled toy teacher, a diffusers ``DDPMPipeline`` folder (16x16 RGB, epsilon prediction)."""
    return _bundled("toy_teacher")


def toy_t2i_path() -> Path:
    """The bundled text-conditioned toy teacher, a diffusers ``StableDiffusionPipeline`` folder (16x16 RGB
    from 4x8x8 latents, a frozen random CLIP text encoder, scaled-linear betas, epsilon prediction)."""
    return _bundled("toy_t2i", T2I_TRAIN_SCRIPT)


class ToyFeatureNet(nn.Module):
    """A small CNN on 16x16 images; ``features`` are its ``feature_dim`` penultimate activations.

    ``forward`` gives logits over ``TOY_FEATURE_CLASSES`` (the shapes and "corrupted"),
    ``hue_logits`` those over ``hue_bins`` hue bins.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = len(TOY_FEATURE_CLASSES),
                 hue_bins: int = TOY_HUE_BINS):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes, "hue_bins": hue_bins}

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, width, 1),
            *block(width, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
            nn.SiLU(),
        )
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.hue_head = nn.Linear(feature_dim, hue_bins)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of images (N, 3, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def hue_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.hue_head(self.features(x))

    def save(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ToyFeatureNet":
        """Read a folder written by ``save`` (safetensors only) and return the net in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"ToyFeatureNet.load: {folder / name} is missing; expected a folder "
                                        f"written by ToyFeatureNet.save (see {TRAIN_SCRIPT})")
        net = cls(**json.loads((folder / "config.json").read_text()))
        net.load_state_dict(load_file(folder / "model.safetensors"))
        return net.to(device).eval().requires_grad_(False)


def load_toy_feature_net(device: str | torch.device = "cpu") -> ToyFeatureNet:
    """The bundled toy feature network (``fastgen/assets/toy_features``), frozen, in eval mode."""
    return ToyFeatureNet.load(_bundled("toy_features"), device)
