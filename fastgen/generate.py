"""Generate images (or videos) from a loaded teacher or exported student, and save them as a grid (or a labelled
one); a grid of videos is animated (GIF, MP4) or laid out still, a column per frame."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch

from fastgen.denoiser import BoundaryDenoiser
from fastgen.errors import EnvironmentMissingError, UsageError
from fastgen.samplers import Guidance, get_sampler
from fastgen.samplers.scheduler import FewStepScheduler
from fastgen.teacher import Teacher


def sampling_plan(model: Teacher, steps: int, sampler: str | None = None) -> tuple[str, list[float]]:
    """``(sampler name, timesteps)`` for ``steps`` steps: an exported student replays its trained
    timesteps and rule (``FewStepScheduler``); a teacher uses its schedule's grid and DDIM by default."""
    scheduler = model.pipeline.scheduler
    if isinstance(scheduler, FewStepScheduler):
        if steps not in scheduler.step_counts:
            raise UsageError(f"{steps} steps: the student in {model.source} was trained for {scheduler.step_counts} "
                             "steps; expected one of those")
        scheduler.set_timesteps(steps)
        return sampler or scheduler.config.rule, scheduler.sigmas.tolist()
    return sampler or "ddim", model.schedule.timesteps(steps).tolist()


SEED_RANGE = (-2**63, 2**64 - 1)
"""The seeds ``torch.Generator.manual_seed`` takes (a negative seed ``s`` is the same as ``s + 2**64``)."""


def check_guidance(model: Teacher, guidance_scale: float, flag: str = "--guidance") -> None:
    """Refuse classifier-free guidance (a scale other than 1) of a model that takes no text: an unconditional or
    class-conditional one has no prompt to guide towards (``generate`` guides prompts only), as ``fastgen
    distill`` refuses ``objective.guidance_scale`` on such a teacher."""
    if guidance_scale != 1.0 and not model.text_conditioned:
        raise UsageError(f"{flag} is {guidance_scale:g}; classifier-free guidance needs a text-conditioned model, and "
                         f"{model.source} ({model.model_class}) is not (expected 1)")


@torch.no_grad()
def generate(model: Teacher, num: int, steps: int, seed: int = 0, sampler: str | None = None,
             prompts: Sequence[str] | None = None, guidance_scale: float = 1.0, batch_size: int = 64,
             class_labels: Sequence[int] | None = None) -> torch.Tensor:
    """``num`` images ``(num, 3, H, W)`` in [-1, 1] (decoded for latent models), deterministic given ``seed``; a
    video model's ``num`` videos ``(num, 3, F, H, W)``. A class-conditional model's samples cycle through
    ``class_labels`` (default: every class in turn, 0 to K-1, so that any ``num`` is as balanced as it can be)."""
    if num < 1:
        raise UsageError(f"{num} samples: expected at least 1")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"seed {seed}: expected an integer from -2**63 to 2**64-1 (what torch.Generator.manual_seed "
                         "takes)")
    check_guidance(model, guidance_scale)
    if class_labels is None and model.num_classes:
        class_labels = range(model.num_classes)
    if prompts is None and class_labels is None and model.text_conditioned:
        raise UsageError(f"{model.source} is a text-to-image model ({model.model_class}): pass --prompt TEXT "
                         "(or --prompts-file FILE)")
    name, timesteps = sampling_plan(model, steps, sampler)
    sample = get_sampler(name)
    denoiser = model.denoiser
    boundary = getattr(model.pipeline.scheduler.config, "boundary", None)
    if isinstance(model.pipeline.scheduler, FewStepScheduler) and boundary:  # a consistency student's f(x, t)
        denoiser = BoundaryDenoiser(denoiser, **boundary)
    generator = torch.Generator().manual_seed(seed)
    device = model.model.device
    images = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        x = torch.randn((n, *model.sample_shape), generator=generator).to(device)
        x = x * model.schedule.prior_scale(timesteps[0])
        cond, guidance = None, None
        if prompts is not None:
            cond = model.encode_prompts([prompts[(start + i) % len(prompts)] for i in range(n)])
            if guidance_scale != 1.0:
                guidance = Guidance(model.null_cond(n), guidance_scale)
        elif class_labels is not None:
            cond = model.class_cond([class_labels[(start + i) % len(class_labels)] for i in range(n)])
        out = sample(denoiser, x, timesteps, cond=cond, guidance=guidance, generator=generator)
        images.append(model.decode(out).float().cpu())
    return torch.cat(images).clamp(-1, 1)


ANIMATIONS = (".gif", ".mp4")
"""The suffixes ``save_grid`` animates a grid of videos to."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""The suffixes ``save_grid`` writes a still grid to (with PIL; those this PIL cannot write are left out)."""
MAX_GRID_PIXELS = 2**28
"""The most pixels of a grid image (``grid_image``): 268 million, 0.8 GB as uint8 RGB and 3 GB as the float
tensor it is made from; a larger ``upscale`` is refused before any work."""


def _still_suffixes() -> list[str]:
    from PIL import Image

    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    return [suffix for suffix in IMAGE_SUFFIXES if suffix in writable]


def check_grid_path(path: str | Path, video: bool | None = None, flag: str = "--out") -> None:
    """Refuse, before any work, a file name ``save_grid`` cannot write: its suffix must be an image format
    (``IMAGE_SUFFIXES``), or for a grid of videos (``video``; None: not known yet, either) ``.gif`` or ``.mp4``
    (``check_animation_path``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    still = _still_suffixes()
    allowed = still + [s for s in ANIMATIONS if s not in still] if video is not False else still
    expected = (f"expected a file name ending in {', '.join(still)}"
                + ("" if video is False else " (a video model's grid: animated to .gif or .mp4)"))
    if not suffix:
        hidden = " (a leading dot starts the name, not a suffix)" if path.name.startswith(".") else ""
        raise UsageError(f"{flag} {path}: the file name has no suffix{hidden}; {expected}")
    if suffix not in allowed:
        why = "is written for a video model only" if suffix in ANIMATIONS else "is not an image format fastgen writes"
        raise UsageError(f"{flag} {path}: {suffix} {why}; {expected}")
    if video:
        check_animation_path(path)


def _grid_layout(images_shape: Sequence[int], nrow: int | None, animated: bool) -> tuple[int, int, int, int]:
    """``(tiles, nrow, H, W)`` of the grid ``save_grid`` makes of images (``N, 3, H, W``) or videos
    (``N, 3, F, H, W``; ``animated``: the grid of one frame)."""
    n, h, w = images_shape[0], images_shape[-2], images_shape[-1]
    if len(images_shape) == 5 and not animated:
        return n * images_shape[2], images_shape[2], h, w
    return n, nrow or max(1, int(n ** 0.5)), h, w


def grid_pixels(tiles: int, nrow: int, height: int, width: int, upscale: int = 1) -> int:
    """Pixels of the grid of ``tiles`` images of ``height x width``, ``upscale``d, ``nrow`` a row, 1-pixel padding
    (torchvision's ``make_grid``)."""
    columns = min(nrow, tiles)
    rows = -(-tiles // columns)
    return (rows * (height * upscale + 1) + 1) * (columns * (width * upscale + 1) + 1)


def _check_pixels(tiles: int, nrow: int, height: int, width: int, upscale: int, flag: str = "upscale") -> None:
    pixels = grid_pixels(tiles, nrow, height, width, upscale)
    if pixels > MAX_GRID_PIXELS:
        raise UsageError(f"{flag} {upscale}: the grid of {tiles} images of {height}x{width} pixels, upscaled "
                         f"{upscale} times, would have {pixels:,} pixels, above the limit of {MAX_GRID_PIXELS:,} "
                         f"(2**28); expected a smaller {flag} (or fewer samples)")


def check_grid_size(model: Teacher, num: int, upscale: int, path: str | Path, flag: str = "--upscale") -> None:
    """Refuse, before any sampling, an ``upscale`` that makes ``save_grid``'s grid of ``num`` samples of ``model``
    larger than ``MAX_GRID_PIXELS``."""
    h, w = model.image_size
    shape = (num, 3, model.frames, h, w) if model.is_video else (num, 3, h, w)
    tiles, nrow, h, w = _grid_layout(shape, None, Path(path).suffix.lower() in ANIMATIONS)
    _check_pixels(tiles, nrow, h, w, upscale, flag)
VIDEO_FPS = 16
"""Frames per second of the animations written (Wan 2.1's frame rate)."""


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save images in [-1, 1] as one PNG grid (nearest-neighbour upscaled by ``upscale``), ``nrow`` images a row
    (default: about the square root of their number). Videos ``(N, 3, F, H, W)``: to a ``.gif`` or ``.mp4``, the
    grid of the N videos' frame ``f`` is the animation's frame ``f`` (``save_animation``); to any other file, a
    still grid with a row per video and a column per frame (``nrow`` unused)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5 and path.suffix.lower() in ANIMATIONS:
        return save_animation([grid_image(images[:, :, f], nrow, upscale) for f in range(images.shape[2])], path)
    if images.ndim == 5:
        images, nrow = images.transpose(1, 2).flatten(0, 1), images.shape[2]
    grid_image(images, nrow, upscale).save(path)
    return path


def grid_image(images: torch.Tensor, nrow: int | None = None, upscale: int = 1):
    """The PIL image of ``save_grid``'s grid of images ``(N, 3, H, W)`` in [-1, 1]: torchvision's ``make_grid``
    (1-pixel white padding), rounded to uint8 as its ``save_image`` does."""
    from PIL import Image
    from torchvision.utils import make_grid

    _check_pixels(*_grid_layout(images.shape, nrow, animated=True), upscale)
    images = (images.float().clamp(-1, 1) + 1) / 2
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
    return Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy())


def check_animation_path(path: str | Path) -> None:
    """Refuse, before any sampling, an ``.mp4`` that diffusers' ``export_to_video`` cannot write here: it writes
    with imageio and imageio-ffmpeg or, without imageio, with OpenCV (``cv2``). A ``.gif`` needs only PIL."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        return
    found = importlib.util.find_spec
    if found("imageio_ffmpeg") if found("imageio") else found("cv2"):
        return
    raise EnvironmentMissingError(f"--out {path}: writing an .mp4 needs imageio and imageio-ffmpeg, not installed "
                                  "here (pip install imageio imageio-ffmpeg); or write a .gif, or a .png still grid")


def save_animation(frames: Sequence, path: str | Path) -> Path:
    """PIL images as the frames of an animated ``.gif`` (diffusers' ``export_to_gif``) or ``.mp4``
    (``export_to_video``; ``check_animation_path`` first), at ``VIDEO_FPS``, looping."""
    from diffusers.utils import export_to_gif, export_to_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        check_animation_path(path)
        export_to_video(list(frames), str(path), fps=VIDEO_FPS)
    else:
        export_to_gif(list(frames), str(path), fps=VIDEO_FPS)
    return path


GRID_PAD = 2
"""Pixels between the tiles of a labelled grid (and after its labels)."""
ROW_LABEL_WIDTH = 64
"""Pixels left of a labelled grid's tiles for the row labels."""
COLUMN_LABEL_HEIGHT = 14
"""Pixels above a labelled grid's tiles for the column labels (none without column labels)."""
MIN_TILE = 64
"""Tiles narrower than this are upscaled by the smallest whole factor that reaches it, so that labels fit."""


def labelled_grid(images: torch.Tensor, row_labels: Sequence[str], column_labels: Sequence[str] | None = None):
    """A PIL image of RGB ``images`` in [-1, 1], shaped ``(rows, columns, 3, H, W)``, on white: each row's label
    left of it, each column's label (when given) above it, in PIL's default font and cut to fit (``..``).
    Tiles are ``k W x k H`` pixels, ``k`` = ``ceil(MIN_TILE / W)`` (nearest neighbour); the image is
    ``ROW_LABEL_WIDTH + GRID_PAD + columns (k W + GRID_PAD)`` wide and ``top + GRID_PAD + rows (k H + GRID_PAD)``
    high, ``top`` = ``COLUMN_LABEL_HEIGHT`` with column labels, else 0."""
    from PIL import Image, ImageDraw, ImageFont

    rows, columns, _, h, w = images.shape
    k = -(-MIN_TILE // w)
    tile_h, tile_w = k * h, k * w
    top = COLUMN_LABEL_HEIGHT if column_labels else 0
    grid = Image.new("RGB", (ROW_LABEL_WIDTH + GRID_PAD + columns * (tile_w + GRID_PAD),
                             top + GRID_PAD + rows * (tile_h + GRID_PAD)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()

    def label(text: str, x: int, y: int, width: int, height: int) -> None:
        """``text`` cut to ``width`` pixels, centred vertically in ``height`` pixels from ``(x, y)``."""
        cut = text
        while cut and draw.textlength(cut if cut == text else cut + "..", font=font) > width:
            cut = cut[:-1]
        cut = cut if cut == text else cut + ".."
        _, y0, _, y1 = draw.textbbox((0, 0), cut, font=font)
        draw.text((x, y + (height - (y1 + y0)) // 2), cut, fill="black", font=font)

    for c, text in enumerate(column_labels or ()):
        label(text, ROW_LABEL_WIDTH + GRID_PAD + c * (tile_w + GRID_PAD), 0, tile_w, top)
    for r in range(rows):
        y = top + GRID_PAD + r * (tile_h + GRID_PAD)
        label(row_labels[r], GRID_PAD, y, ROW_LABEL_WIDTH - GRID_PAD, tile_h)
        for c in range(columns):
            tile = Image.fromarray(pixels[r, c]).resize((tile_w, tile_h), Image.NEAREST)
            grid.paste(tile, (ROW_LABEL_WIDTH + GRID_PAD + c * (tile_w + GRID_PAD), y))
    return grid


def labelled_frames(videos: torch.Tensor, row_labels: Sequence[str], column_labels: Sequence[str] | None = None):
    """``labelled_grid`` of each frame of videos ``(rows, columns, 3, F, H, W)`` in [-1, 1]: F PIL images, the
    frames of an animation (``save_animation``)."""
    return [labelled_grid(videos[:, :, :, f], row_labels, column_labels) for f in range(videos.shape[3])]
