"""``fastgen eval``: metrics of a model (and optionally its teacher) against the number of sampling steps.

Metrics are callables ``images -> float`` on images in [-1, 1], built once (reference statistics and
features are computed a single time) and handed to ``fastgen.eval.sweep.run_sweep``:

- ``fid`` — Fréchet distance on Inception pool3 features (torch-fidelity's extractor) against a
  reference ``.npz`` (``fastgen.eval.reference``) or a folder of images; or on the toy feature network
  (``--features toy``) against fresh toy images or a folder.
- ``kid`` — KID (unbiased MMD², cubic kernel) against a folder of reference images.
- ``clip`` — CLIP score ``100 max(cos, 0)`` (and the raw mean cosine as ``clip_cosine_raw``) of the
  images against their prompts, with a local open_clip checkpoint.
- ``prompt_acc`` — with ``--features toy``: the fraction of samples the toy feature network reads as the
  shape and colour their toy prompt names (``fastgen.eval.toy_prompts``; also ``prompt_acc_shape`` and
  ``prompt_acc_colour``), for the text-conditioned toy teacher and its students.

A video model's samples ``(N, 3, F, H, W)`` are measured per frame: FID, KID, CLIP score and prompt accuracy
count each of the ``N F`` frames as an image (``fastgen.eval.fid.video_frames``), and CLIP score (and prompt
accuracy) pairs every frame with its video's prompt (``frame_prompts``). ``evaluate`` then names the columns
``<metric>_per_frame`` and says under the Markdown table that FVD is not provided; ``N`` stays the number of videos.

With ``--features toy``, a model or reference folder whose images are not 16x16 RGB is refused before any
sampling, and a sweep whose samples do not look like the toy world is warned about
(``fastgen.eval.toy_fid.ToyWorldCheck``). The rows an export's model card gets also say what was measured
against what (``Metrics.provenance``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastgen.errors import InputError, MissingPathError, UsageError
from fastgen.eval.fid import frechet_distance, image_features, image_statistics, video_frames
from fastgen.eval.kid import kid
from fastgen.eval.sweep import run_sweep
from fastgen.eval.toy_fid import ToyWorldCheck

METRICS = ("fid", "kid", "clip", "prompt_acc")
TOY_METRICS = ("fid", "kid", "prompt_acc", "prompt_acc_shape", "prompt_acc_colour")
"""The metric columns that read images with the toy feature network under ``--features toy``."""
FEATURES = ("inception", "toy")
RANGE = (-1.0, 1.0)


class Metrics(dict):
    """What ``build_metrics`` returns: the metric callables by name (as ``run_sweep`` takes them), with

    - ``provenance``: the columns an export's model card adds to every row: ``features``, the feature network
      (Inception's weights file name, or ``toy``); ``ref``, the reference (the ``--ref`` file or folder name,
      or ``toy world`` for fresh toy images); ``clip_model``, the CLIP model (``CLIPScorer.name``);
    - ``toy_world``: the ``ToyWorldCheck`` of the samples under ``--features toy``, else None.
    """

    def __init__(self, metrics: dict[str, Callable], provenance: dict[str, str], toy_world: ToyWorldCheck | None):
        super().__init__(metrics)
        self.provenance = provenance
        self.toy_world = toy_world


class ToyExtractor:
    """The toy feature network as an extractor of uint8 batches (the interface of ``InceptionExtractor``)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from fastgen.eval.toy_fid import toy_features

        return toy_features(images.float() / 127.5 - 1.0)


def build_metrics(metrics: Sequence[str], features: str = "inception", ref: str | None = None,
                  inception_weights: str | None = None, resize: str = "tf", prompts: Sequence[str] | None = None,
                  clip_model: str = "ViT-g-14", clip_weights: str | None = None, batch_size: int = 50
                  ) -> Metrics:
    """The metric callables of a sweep; each checks its inputs up front, before any sampling. ``clip_model``:
    an open_clip name (with ``clip_weights``, its weights file) or a Hugging Face CLIP folder."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise UsageError(f"--metrics: unknown {unknown}; expected some of {list(METRICS)}")
    if features not in FEATURES:
        raise UsageError(f"--features is {features!r}; expected one of {list(FEATURES)}")
    out: dict[str, Callable] = {}
    provenance: dict[str, str] = {}
    toy_world = ToyWorldCheck() if features == "toy" and {"fid", "kid", "prompt_acc"} & set(metrics) else None
    extractor = None
    if "fid" in metrics or "kid" in metrics:
        if features == "toy":
            extractor = ToyExtractor()
            provenance["features"] = "toy"
        else:
            from fastgen.eval.inception import InceptionExtractor

            extractor = InceptionExtractor(inception_weights, resize=resize)
            provenance["features"] = extractor.weights_path.name
        provenance["ref"] = Path(ref).name if ref is not None else "toy world"
        if ref is not None:
            check_ref(ref, features)
        if toy_world is not None and ref is not None and Path(ref).is_dir():
            with _reading_ref(ref):
                toy_world.check_reference(ref)
    if "fid" in metrics:
        with _reading_ref(ref):
            reference = _fid_reference(features, ref, extractor, batch_size)

        def fid(images: torch.Tensor) -> float:
            stats = image_statistics(video_frames(images), extractor, batch_size, value_range=RANGE)
            return frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)

        out["fid"] = fid
    if "kid" in metrics:
        if ref is None or not Path(ref).is_dir():
            raise UsageError(f"--metrics kid needs --ref to be a folder of reference images (got {ref!r}): KID "
                             "compares feature samples, which a statistics .npz does not hold")
        with _reading_ref(ref):
            ref_features = image_features(ref, extractor, batch_size)

        def kid_mean(images: torch.Tensor) -> float:
            gen = image_features(video_frames(images), extractor, batch_size, value_range=RANGE)
            size = min(1000, len(gen), len(ref_features))
            return kid(gen, ref_features, subset_size=size).mean

        out["kid"] = kid_mean
    if "clip" in metrics:
        if not prompts:
            raise UsageError("--metrics clip needs prompts (--prompts-file FILE, or --prompt TEXT): the score compares "
                             "images with their prompts")
        from fastgen.eval.clip_score import CLIPScorer

        scorer = CLIPScorer(clip_model, clip_weights)
        provenance["clip_model"] = scorer.name
        last: list = [None, None]  # (images, score): both CLIP metrics of one sweep point share one pass

        def _score(images):
            if last[0] is not images:
                last[:] = [images, scorer(video_frames(images), frame_prompts(prompts, images), value_range=RANGE)]
            return last[1]

        out["clip"] = lambda images: _score(images).clip_score
        out["clip_cosine_raw"] = lambda images: _score(images).clip_cosine_raw
    if "prompt_acc" in metrics:
        out.update(_prompt_accuracy_metrics(features, prompts))
        provenance["features"] = "toy"
    if toy_world is not None:  # every toy metric reads its images through the check first
        out = {name: _checked(metric, toy_world) if name in TOY_METRICS else metric for name, metric in out.items()}
    return Metrics(out, provenance, toy_world)


MIN_REF_IMAGES = 2
"""The fewest images of a ``--ref`` folder: FID fits a covariance to their features (KID pairs them)."""


def check_ref(ref: str, features: str = "inception") -> None:
    """Refuse, before anything is read, a ``--ref`` that is missing, a file other than a statistics ``.npz``, or
    a folder of fewer than ``MIN_REF_IMAGES`` images."""
    from fastgen.data import IMAGE_EXTENSIONS, find_images

    path = Path(ref)
    expected = "expected a folder of images or an Inception statistics .npz file"
    if not path.exists():
        if features == "toy" and path.suffix == ".npz":  # both wrong: the flags' mismatch is a usage error
            raise UsageError(f"--ref {ref} does not exist; and with --features toy, --ref is a folder of images or "
                             "nothing (a .npz holds Inception statistics)")
        raise MissingPathError(f"--ref {ref} does not exist; {expected}")
    if not path.is_dir():
        if path.suffix == ".npz":
            return
        raise InputError(f"--ref {ref} is a file, not a folder; {expected}")
    try:
        count = len(find_images(path))
    except InputError:  # none
        count = 0
    if count < MIN_REF_IMAGES:
        raise InputError(f"--ref {ref} holds {count} image{'s' if count != 1 else ''} (files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)}, searched recursively); expected a folder of at least "
                         f"{MIN_REF_IMAGES} images (FID and KID compare the spread of the reference's features)")


@contextlib.contextmanager
def _reading_ref(ref: str | None):
    """Name ``--ref`` in the ``InputError`` of an image (unreadable, of another size) of a reference folder read
    inside."""
    try:
        yield
    except InputError as err:
        if ref is None or not Path(ref).is_dir() or str(err).startswith("--ref"):
            raise
        raise InputError(f"--ref {ref}: {err}") from err


def frame_prompts(prompts: Sequence[str], images: torch.Tensor) -> list[str]:
    """The prompt of each image of ``video_frames(images)``: sample ``i`` was asked for ``prompts[i % len]``, and
    so was each frame of a video sample ``(N, 3, F, H, W)``."""
    frames = images.shape[2] if images.ndim == 5 else 1
    return [prompts[i // frames % len(prompts)] for i in range(len(images) * frames)]


def per_frame(metrics: Metrics, frames: int) -> tuple[Metrics, str]:
    """``metrics`` of a video model's sweep, each column named ``<name>_per_frame``, and the note that says so under
    its Markdown table (``frames`` frames a video)."""
    names = {name: f"{name}_per_frame" for name in metrics}
    note = (f"Video model: the metrics are per-frame ({frames} frames a sample; {', '.join(names.values())}): every "
            "frame of every sample counts as an image, CLIP score and prompt accuracy take each frame with its "
            "sample's prompt, --num-samples counts videos. FVD (Fréchet Video Distance) is not provided.")
    return Metrics({names[k]: v for k, v in metrics.items()}, metrics.provenance, metrics.toy_world), note


def _checked(metric: Callable, toy_world: ToyWorldCheck) -> Callable:
    def run(images: torch.Tensor) -> float:
        toy_world(images)
        return metric(images)

    return run


def _prompt_accuracy_metrics(features: str, prompts: Sequence[str] | None) -> dict[str, Callable]:
    """``prompt_acc`` (shape and colour), ``prompt_acc_shape`` and ``prompt_acc_colour``, sharing one pass."""
    from fastgen.eval.toy_prompts import prompt_accuracy
    from fastgen.toy import parse_toy_prompt

    if features != "toy":
        raise UsageError(f"--metrics prompt_acc reads toy images with the toy feature network; --features is "
                         f"{features!r}, expected 'toy'")
    if not prompts:
        raise UsageError("--metrics prompt_acc needs toy prompts (--prompts-file FILE, or --prompts-file toy for "
                         "every shape x colour): the score compares images with their prompts")
    for prompt in prompts:
        parse_toy_prompt(prompt)
    last: list = [None, None]

    def _score(images):
        if last[0] is not images:
            last[:] = [images, prompt_accuracy(video_frames(images), frame_prompts(prompts, images))]
        return last[1]

    return {"prompt_acc": lambda images: _score(images).joint,
            "prompt_acc_shape": lambda images: _score(images).shape,
            "prompt_acc_colour": lambda images: _score(images).colour}


def _fid_reference(features: str, ref: str | None, extractor, batch_size: int):
    """Reference mean and covariance: a statistics ``.npz`` (metadata checked), a folder, or toy images."""
    if ref is None:
        if features != "toy":
            raise UsageError("--metrics fid with Inception features needs --ref (a statistics .npz or a folder of images)")
        from fastgen.eval.toy_fid import toy_reference_stats

        return toy_reference_stats()
    path = Path(ref)
    if path.suffix == ".npz" and not path.is_dir():
        if features == "toy":
            raise UsageError(f"--ref {ref} is an Inception statistics file; with --features toy pass a folder or nothing")
        from fastgen.eval.reference import EXTRACTOR_FIELDS, load_reference

        meta = extractor.metadata()
        reference = load_reference(path, **{k: meta[k] for k in EXTRACTOR_FIELDS})
        return _Moments(reference.mu, reference.sigma)
    if not path.is_dir():
        raise FileNotFoundError(f"--ref {ref} does not exist; expected a statistics .npz or a folder of images")
    stats = image_statistics(str(path), extractor, batch_size)
    return _Moments(stats.mean, stats.cov)


class _Moments:
    """A reference's mean and covariance (what ``frechet_distance`` needs)."""

    def __init__(self, mean, cov):
        self.mean, self.cov = np.asarray(mean), np.asarray(cov)


def evaluate(model_dir: str, steps: Sequence[int], out_dir: str | Path, num_samples: int,
             metrics: Metrics | dict[str, Callable], teacher_dir: str | None = None,
             prompts: Sequence[str] | None = None, guidance_scale: float = 1.0, seed: int = 0,
             batch_size: int = 64, size: dict[str, int] | None = None) -> list[dict]:
    """Sweep ``model_dir`` (and ``teacher_dir``, DDIM at the same step counts) over ``steps``; return the
    sweep's rows. ``size``: ``height``, ``width``, ``num_frames`` of both (``load_teacher``'s; default: each
    one's own). A video model's metrics are per frame (``per_frame``; module docstring). An exported student's
    model card and metadata get the model's rows, each with the ``provenance`` of ``metrics`` (a ``Metrics``),
    ``samples``, the number of samples per point, and for a video model ``frames``, the frames a sample."""
    from fastgen.generate import check_guidance, generate, sampling_plan
    from fastgen.pipelines.load import is_export
    from fastgen.teacher import load_teacher

    if not isinstance(metrics, Metrics):  # plain callables: nothing to check, no provenance
        metrics = Metrics(metrics, {}, None)
    toy_world = metrics.toy_world
    curves = {}
    model = load_teacher(model_dir, **(size or {}))
    for n in steps:  # an untrained step count fails here, before any sampling
        sampling_plan(model, n)
    check_guidance(model, guidance_scale)
    if toy_world is not None:
        toy_world.check_model(model, model_dir, num_samples)
    curves["model"] = lambda n: generate(model, num_samples, n, seed=seed, prompts=prompts,
                                         guidance_scale=guidance_scale, batch_size=batch_size)
    if teacher_dir is not None:  # an export's teacher at the size it was trained at, where none is asked for
        trained = model.size() if is_export(Path(model_dir)) else {}
        teacher = load_teacher(teacher_dir, **{**trained, **{k: v for k, v in (size or {}).items() if v is not None}})
        check_guidance(teacher, guidance_scale)
        if toy_world is not None:
            toy_world.check_model(teacher, teacher_dir, num_samples)
        curves["teacher DDIM"] = lambda n: generate(teacher, num_samples, n, seed=seed, prompts=prompts,
                                                    guidance_scale=guidance_scale, batch_size=batch_size)
    metrics, note = per_frame(metrics, model.frames) if model.is_video else (metrics, None)
    rows = run_sweep(curves, list(steps), metrics, out_dir, note=note)
    if toy_world is not None:
        toy_world.warn_if_foreign()
    from fastgen.pipelines.load import is_export

    if is_export(model_dir):  # the export's model card reports what was measured, against what, on how many
        from fastgen.pipelines.card import add_metrics

        provenance = {**metrics.provenance, "samples": num_samples,
                      **({"frames": model.frames} if model.is_video else {})}
        add_metrics(model_dir, [{**row, **provenance} for row in rows])
    return rows


__all__ = ["FEATURES", "METRICS", "Metrics", "build_metrics", "check_ref", "evaluate", "frame_prompts", "per_frame"]
