"""Image data: folders of image files decoded to ``x0`` in the denoiser's space, and the toy world's images.

A folder is searched recursively for PNG/JPEG/WEBP files (hidden files and folders skipped), read in a
stable order (sorted by relative path). Images become ``(C, H, W)`` tensors in [-1, 1]; for a latent teacher
they are encoded once with its VAE and cached. A class-conditional teacher takes each image's label from
the sub-folder it sits in, named by class index (``folder/3/x.png`` → 3). An image whose header declares more
than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused before it is decoded (a decompression bomb); 16-bit
grayscale images (modes ``I;16``, ``I``) are scaled to 8 bits (0..65535 → 0..255), not clipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastgen.data.cache import digest, load_cache, save_cache, teacher_fingerprint
from fastgen.errors import InputError
from fastgen.teacher import Teacher
from fastgen.toy import TOY_IMAGE_SIZE, toy_images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
GRAYSCALE_MODES = ("1", "L", "LA")
TOY_DATA_SIZE = 8192
"""Images of the toy world in data ``"toy"``."""


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), in a stable order."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not files:
        raise InputError(f"image folder {folder} holds no images; expected files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)} (searched recursively)")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def open_image(file: Path | BinaryIO, name: str) -> Image.Image:
    """An image file (a path or a binary file object) decoded and turned upright (its EXIF orientation); ``name``
    says which image in errors. Refused from its header, before decoding, when it declares more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # PIL warns between the limit and twice it; refused here instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as opened:
                if limit and opened.width * opened.height > limit:
                    raise InputError(f"{name} is {opened.width}x{opened.height} ({opened.width * opened.height:,} "
                                     f"pixels), above the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS), refused "
                                     "before decoding; expected a smaller image: downscale it (or raise the limit "
                                     "if you trust it)")
                return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as err:
        raise InputError(f"{name} is refused before decoding: {err} (PIL.Image.MAX_IMAGE_PIXELS is {limit:,}); "
                         "expected a smaller image: downscale it") from None
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read {name}: {err}") from None


def load_image(file: Path, size: tuple[int, int], channels: int, resize: bool = False) -> torch.Tensor:
    """One image file as a ``(channels, H, W)`` tensor in [-1, 1] (``open_image``, ``image_tensor``)."""
    return image_tensor(open_image(file, f"image {file}"), size, channels, resize, f"image {file}")


def image_tensor(image, size: tuple[int, int], channels: int, resize: bool = False, name: str = "image"):
    """A PIL image as a ``(channels, H, W)`` tensor in [-1, 1] for ``size = (H, W)``; grayscale, palette and
    alpha images become RGB for a 3-channel teacher; a 1-channel teacher takes grayscale images only; 16-bit
    grayscale (``I;16``, ``I``) is scaled to 8 bits first. ``name`` says which image in errors."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.round(levels / 257).astype(np.uint8), "L")
    if channels == 3:
        image = image.convert("RGB")
    elif channels == 1 and image.mode in GRAYSCALE_MODES:
        image = image.convert("L")
    else:
        raise InputError(f"{name} has mode {image.mode} ({len(image.getbands())} channels); the teacher "
                         f"expects {channels}-channel images")
    height, width = size
    if image.size != (width, height):
        if not resize:
            raise InputError(f"{name} is {image.width}x{image.height} (width x height); the teacher expects "
                             f"{width}x{height}; resize the images, or center-crop and resize them as they load "
                             "(fastgen distill ... resize_data=true)")
        image = ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).reshape(height, width, channels)
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def folder_labels(folder: Path, files: list[Path], num_classes: int) -> torch.Tensor:
    """Class labels from the sub-folder each image sits in, named by class index (``folder/3/x.png`` → 3)."""
    labels = []
    for file in files:
        parts = file.relative_to(folder).parts
        name = parts[0] if len(parts) > 1 else ""
        if not (name.isdigit() and int(name) < num_classes):
            raise InputError(f"image {file} is not in a class sub-folder (found {name or 'none'!r}); a "
                             f"class-conditional teacher ({num_classes} classes) expects images in sub-folders "
                             f"named by class index 0..{num_classes - 1}")
        labels.append(int(name))
    return torch.tensor(labels, dtype=torch.long)


def image_data(folder: Path, teacher: Teacher, cache_dir: Path, batch_size: int,
               resize: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x0, class labels or None)`` for the images under ``folder``; latents are cached by a hash of the
    file list and mtimes, the teacher and ``resize``."""
    files = find_images(folder)
    labels = folder_labels(folder, files, teacher.num_classes) if teacher.num_classes else None
    channels = teacher.image_channels
    if teacher.is_latent:
        listing = [[f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        path = cache_dir / f"images-{digest(teacher_fingerprint(teacher), resize, listing)}.safetensors"
        cached = load_cache(path)
        if cached is not None:
            return cached["x0"], labels
    device = teacher.model.device
    chunks = []
    for start in range(0, len(files), batch_size):
        images = torch.stack([load_image(f, teacher.image_size, channels, resize)
                              for f in files[start:start + batch_size]])
        chunks.append(teacher.encode(images.to(device)).float().cpu() if teacher.is_latent else images)
    x0 = torch.cat(chunks)
    if teacher.is_latent:
        save_cache({"x0": x0}, path)
    return x0, labels


def toy_data(teacher: Teacher) -> torch.Tensor:
    """``TOY_DATA_SIZE`` toy images for a 16x16 RGB pixel teacher (seed 0, as the toy teacher was trained)."""
    expected = (3, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE)
    if teacher.is_latent or teacher.sample_shape != expected:
        raise InputError(f"data 'toy' gives {expected} pixel images; the teacher from {teacher.source} takes "
                         f"{teacher.sample_shape}{' latents' if teacher.is_latent else ''}")
    return toy_images(TOY_DATA_SIZE)
