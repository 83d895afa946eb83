"""A data spec → a ``DataSource``: ``build_data`` dispatches on the spec, ``check_data`` checks it first.

``build_data(spec, teacher, ...)`` accepts:

- a folder of images (PNG/JPEG/WEBP, searched recursively) → ``x0`` in the denoiser's space: pixels in
  [-1, 1], or latents for latent teachers (``fastgen.data.images``);
- captioned images (a folder with ``metadata.jsonl``, ``.tar``/``.parquet`` files or a glob of them,
  ``hf:owner/name``) → ``x0`` as above and each sample's own caption as its condition
  (``fastgen.data.captions``; for a text-conditioned teacher);
- a ``.txt`` prompts file (one prompt per line) → text conditions, data-free (``x0 = None``)
  (``fastgen.data.prompts``);
- ``"teacher"`` → the teacher's own DDIM ODE pairs (``fastgen.data.teacher_pairs``), conditioned on
  random class labels for a class-conditional teacher, on the prompts of ``prompts`` (a prompts file) for a
  text teacher, guided with the Ho–Salimans scale ``teacher_guidance``;
- ``"toy"`` → images of the procedural toy world (``fastgen.toy.ToyShapes``, ``TOY_DATA_SIZE`` of them),
  the training data of the bundled toy teacher;
- ``None`` → data-free: on the prompts of ``prompts`` when given (as a ``.txt`` spec), random class
  labels for a class-conditional teacher, or nothing.

Conditions follow the teacher: class-conditional teachers get ``{"class_labels": ...}`` (from sub-folders
named by class index for image folders, otherwise drawn at random) and ``uncond = None``; text-conditioned
teachers get ``uncond = teacher.null_cond`` and, without prompts, ``cond = uncond`` (unconditional
training); unconditional teachers get ``None`` for both.

Everything encoded or generated is cached in ``cache_dir`` (``fastgen.data.cache``) and depends on ``seed``
only, so every rank builds the same set; ``rank`` and ``world_size`` only pick the rank's share of each
global batch (``fastgen.data.batch``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastgen.data.batch import DataSource
from fastgen.data.cache import null_cond
from fastgen.data.captions import captioned_data, captioned_source
from fastgen.data.images import find_images, image_data, toy_data
from fastgen.data.prompts import check_prompts, prompt_conds
from fastgen.data.teacher_pairs import teacher_samples
from fastgen.errors import InputError, MissingPathError, UsageError, warn
from fastgen.teacher import Teacher


def build_data(spec: str | os.PathLike | None, teacher: Teacher, batch_size: int, seed: int, cache_dir: str | Path,
               num_teacher_samples: int = 1024, teacher_steps: int = 32, class_labels: bool = False,
               resize: bool = False, prompts: str | os.PathLike | None = None, teacher_guidance: float = 1.0,
               caption_column: str | None = None, rank: int = 0, world_size: int = 1) -> DataSource:
    """The ``DataSource`` for ``spec`` (module docstring): an image folder, captioned images (a folder with
    ``metadata.jsonl``, ``.tar``/``.parquet`` files or a glob of them, ``hf:owner/name``), a ``.txt``
    prompts file, ``"teacher"``, ``"toy"`` or ``None``.

    The string ``"teacher"`` always means teacher samples (write ``./teacher`` for a folder of that name).
    ``class_labels`` must be set exactly for class-conditional teachers. ``resize`` center-crops and
    resizes images of another size instead of refusing them. ``num_teacher_samples``, ``teacher_steps`` and
    ``teacher_guidance`` (Ho–Salimans CFG scale, 1 = none) apply to ``"teacher"``; ``prompts`` (a prompts
    file) to ``"teacher"`` and ``None``; ``caption_column`` (default: the first of ``CAPTION_COLUMNS``
    present) to captioned images. ``batch_size`` is per rank; every rank passes the same ``seed`` and its
    own ``rank`` of ``world_size`` (``fastgen.data.batch``: the ranks share one stream order).
    """
    for name, value in (("batch_size", batch_size), ("num_teacher_samples", num_teacher_samples),
                        ("teacher_steps", teacher_steps)):
        if value < 1:
            raise UsageError(f"{name} = {value}; expected a positive integer")
    check_data(spec, teacher, class_labels, prompts, teacher_guidance)
    cache_dir = Path(cache_dir)
    uncond = null_cond(teacher, cache_dir)
    prompt_file = None if prompts is None else Path(prompts).expanduser()

    def source(**kwargs) -> DataSource:
        return DataSource(batch_size, seed, uncond=uncond, rank=rank, world_size=world_size, **kwargs)

    if spec is None:
        if prompt_file is not None:
            return source(cond=prompt_conds(prompt_file, teacher, cache_dir))
        warn_unprompted(spec, teacher)
        return source(random_classes=teacher.num_classes)
    if spec == "toy":
        return source(x0=toy_data(teacher))
    if spec == "teacher":
        prompt_cond = None if prompt_file is None else prompt_conds(prompt_file, teacher, cache_dir)
        pairs = teacher_samples(teacher, cache_dir, num_teacher_samples, teacher_steps, seed, uncond, batch_size,
                                prompt_cond, teacher_guidance)
        if prompt_cond is not None:
            return source(x0=pairs["x0"], noise=pairs["noise"], cond=prompt_cond, cond_index=pairs["prompt_index"])
        labels = pairs.get("class_labels")
        warn_unprompted(spec, teacher)
        return source(x0=pairs["x0"], noise=pairs["noise"], cond=None if labels is None else {"class_labels": labels})
    captioned = captioned_source(spec, teacher)
    if captioned is not None:
        x0, cond, index = captioned_data(*captioned, teacher, cache_dir, batch_size, resize, caption_column)
        return source(x0=x0, cond=cond, cond_index=index)
    path = Path(spec).expanduser()
    if path.is_dir():
        x0, labels = image_data(path, teacher, cache_dir, batch_size, resize)
        warn_unprompted(spec, teacher)
        return source(x0=x0, cond=None if labels is None else {"class_labels": labels})
    return source(cond=prompt_conds(path, teacher, cache_dir))


def warn_unprompted(spec, teacher: Teacher) -> None:
    """Warn that a text-conditioned teacher is distilled on its empty prompt alone: ``spec`` (uncaptioned images,
    teacher samples or no data) came without a prompts file. Unconditional distillation is a choice, so a warning,
    not a refusal."""
    if teacher.text_conditioned and not teacher.num_classes:
        warn(f"data {spec} carries no captions and no prompts file was given, so the text-conditioned teacher from "
             f"{teacher.source} is distilled on the empty prompt alone; expected captioned images (a folder with "
             "metadata.jsonl, .tar, .parquet) or a prompts file (--prompts FILE, with --data teacher or no data)")


def check_data(spec: str | os.PathLike | None, teacher: Teacher, class_labels: bool = False,
               prompts: str | os.PathLike | None = None, teacher_guidance: float = 1.0) -> bool:
    """Check the arguments of :func:`build_data` against ``teacher``, listing files but reading no image and
    writing no cache (the trainer calls it before it creates the run folder). Returns whether the batches
    will carry clean samples ``x0``."""
    if class_labels and not teacher.num_classes:
        raise InputError(f"class_labels=True, but the teacher from {teacher.source} has no class embedding "
                         "(num_class_embeds is unset); expected class_labels=False")
    if teacher.num_classes and not class_labels:
        raise InputError(f"the teacher from {teacher.source} is class-conditional ({teacher.num_classes} classes); "
                         "expected class_labels=True")
    wrong = []  # both at once: a preset for --data teacher sets both, and --data FOLDER then needs both changed
    if prompts is not None and spec not in (None, "teacher"):
        wrong.append(f"prompts = {prompts} applies to data 'teacher' or None, but data is {spec}; expected no "
                     "prompts file (captions come with captioned data, prompts files can be the data): prompts=null")
    if teacher_guidance != 1.0 and (spec != "teacher" or not teacher.text_conditioned or teacher.num_classes):
        wrong.append(f"teacher_sample_guidance = {teacher_guidance} guides teacher samples of a text-conditioned "
                     f"teacher; data is {spec} and the teacher from {teacher.source} is a "
                     f"{type(teacher.model).__name__}; expected 1")
    if wrong:
        raise UsageError("; and ".join(wrong))
    if prompts is not None:
        check_prompts(Path(prompts).expanduser(), teacher)
    if spec is None:
        return False
    if teacher.is_video and spec != "teacher" and not str(spec).lower().endswith(".txt"):
        raise InputError(f"data {spec} holds images, but the teacher from {teacher.source} "
                         f"({type(teacher.model).__name__}) makes videos; expected 'teacher' (its own samples, with "
                         "a prompts file) or a .txt prompts file")
    if spec in ("toy", "teacher") or captioned_source(spec, teacher) is not None:
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        find_images(path)
        return True
    if path.is_file() and path.suffix.lower() == ".txt":
        check_prompts(path, teacher)
        return False
    expected = ("an image folder, captioned images (.tar, .parquet, a folder with metadata.jsonl, hf:owner/name), "
                "a .txt prompts file, 'teacher', 'toy' or None")
    if not path.exists():
        raise MissingPathError(f"data {spec} does not exist; expected {expected}")
    raise InputError(f"data {spec} is a {path.suffix or 'suffix-less'} file; expected {expected}")
