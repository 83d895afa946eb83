"""The FID Inception network: torch-fidelity's port of the TF Inception-v3 of 2015-12-05 (pool3, 2048-d).

This is the network of Heusel et al. 2017 ("GANs trained by a two time-scale update rule") as every FID
tool uses it. Weights come from a local file only; nothing is downloaded. Two resize protocols:

- ``"tf"`` (default): torch-fidelity's TF1-exact bilinear resize of the uint8 image to 299x299, as in
  the original TF FID code and torch-fidelity.
- ``"clean"``: clean-fid's protocol (Parmar et al. 2022, "On aliased resizing and surprising subtleties
  in GAN evaluation"): each channel resized to 299x299 by PIL bicubic in float, clipped to [0, 255]. The
  extractor accepts only uint8, so the result is rounded to uint8 (error <= 0.5/255; clean-fid feeds the
  float values) and the extractor's own bilinear resize from 299 to 299 is then the identity.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from fastgen.errors import InputError
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTOR_NAME = "torch-fidelity-inception-v3-2015-12-05"
FEATURE_LAYER = "2048"
INPUT_SIZE = FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
RESIZE_PROTOCOLS = ("tf", "clean")


def default_weights_path() -> Path:
    """Where torch-fidelity caches the weights: ``$TORCH_HOME/hub/checkpoints/<WEIGHTS_FILENAME>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


class InceptionWeightsNotFound(FileNotFoundError):
    """The Inception weights file is not on disk (fastgen never downloads it)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_resize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> uint8 ``(N, 3, 299, 299)`` by per-channel PIL bicubic in float (clean-fid)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"clean_resize: images are {images.dtype} {tuple(images.shape)}, expected uint8 (N, 3, H, W)")
    planes = images.cpu().numpy().astype(np.float32)
    out = np.empty(planes.shape[:2] + (INPUT_SIZE, INPUT_SIZE), np.float32)
    for index in np.ndindex(*planes.shape[:2]):
        plane = Image.fromarray(planes[index]).resize((INPUT_SIZE, INPUT_SIZE), resample=Image.BICUBIC)
        out[index] = np.asarray(plane)
    return torch.from_numpy(np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)).to(images.device)


class InceptionExtractor:
    """Pool3 (2048-d) features of uint8 RGB images ``(N, 3, H, W)`` in [0, 255], any H and W.

    ``weights_path``: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain tensor
    state dict, loaded with ``weights_only=True``); default: :func:`default_weights_path`.
    ``resize``: ``"tf"`` or ``"clean"`` (module docstring).
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, resize: str = "tf", device="cpu"):
        if resize not in RESIZE_PROTOCOLS:
            raise ValueError(f"InceptionExtractor: resize={resize!r}, expected one of {RESIZE_PROTOCOLS}")
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        if not path.is_file():
            raise InceptionWeightsNotFound(
                f"Inception weights not found at {path}. fastgen never downloads them: copy "
                f"{WEIGHTS_FILENAME} (torch-fidelity's release file) to {default_weights_path()} "
                f"($TORCH_HOME/hub/checkpoints/), or pass its path as weights_path= / --inception-weights PATH."
            )
        try:
            torch.load(path, map_location="cpu", weights_only=True)  # refuses pickles that are not plain tensors
        except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
            raise InputError(f"Inception weights {path} cannot be read ({' '.join(str(err).split())[:200]}); expected "
                             f"the complete {WEIGHTS_FILENAME} (plain tensors, nothing else pickled)") from err
        self.network = FeatureExtractorInceptionV3(
            EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=str(path)
        ).to(device)
        self.weights_path = path
        self.resize = resize
        self.device = torch.device(device)
        self.name = EXTRACTOR_NAME
        self.feature_layer = FEATURE_LAYER
        self.feature_dim = 2048

    @cached_property
    def weights_sha256(self) -> str:
        return sha256_file(self.weights_path)

    def metadata(self) -> dict:
        """What reference statistics must agree on to be comparable (see :mod:`fastgen.eval.reference`)."""
        return {
            "extractor": self.name,
            "feature_layer": self.feature_layer,
            "feature_dim": self.feature_dim,
            "resize": self.resize,
            "weights_sha256": self.weights_sha256,
        }

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"InceptionExtractor: images are {images.dtype} {tuple(images.shape)}, expected uint8 (N, 3, H, W)"
            )
        if self.resize == "clean":
            images = clean_resize(images)
        (features,) = self.network(images.to(self.device))
        return features
