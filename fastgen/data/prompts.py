"""Prompts files and text conditions: prompts read once, encoded with the teacher's own text encoders and
cached, so that training holds no text encoder.

A prompts file holds one prompt per line (blank lines skipped); ``TOY_PROMPTS`` (``"toy"``) names the toy
world's own 24 prompts (``fastgen.toy.toy_eval_prompts``) instead of a file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fastgen.data.cache import digest, flatten_cond, load_cache, save_cache, teacher_fingerprint, unflatten_cond
from fastgen.denoiser import Cond, cat_cond
from fastgen.errors import InputError, MissingPathError
from fastgen.teacher import Teacher
from fastgen.toy import toy_eval_prompts

TOY_PROMPTS = "toy"
"""The prompts spec that names the toy world's own prompts (every shape x colour), not a file."""
PROMPT_CHUNK = 64
"""Prompts encoded per call of the text encoders."""

logger = logging.getLogger(__name__)


def read_prompts(file: str | os.PathLike) -> list[str]:
    """Non-blank lines of ``file``, stripped; for ``TOY_PROMPTS`` the 24 toy prompts
    (``fastgen.toy.toy_eval_prompts``), the prompts of the text toy teacher's presets."""
    if str(file) == TOY_PROMPTS:
        return toy_eval_prompts()
    file = Path(file)
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {file} is empty; expected one prompt per line")
    return prompts


def check_prompts(file: Path, teacher: Teacher) -> list[str]:
    """The prompts of ``file`` (or ``TOY_PROMPTS``), checked to exist and to suit ``teacher``."""
    if not teacher.text_conditioned:
        raise InputError(f"prompts file {file} given to the teacher from {teacher.source}, a "
                         f"{type(teacher.model).__name__} that takes no prompts; expected a text-conditioned "
                         "teacher, or data that is an image folder, 'teacher' or None")
    if str(file) != TOY_PROMPTS and not file.is_file():
        raise MissingPathError(f"prompts file {file} does not exist; expected a text file, one prompt per line "
                               f"or '{TOY_PROMPTS}' (the toy world's prompts)")
    return read_prompts(file)


def prompt_conds(file: Path, teacher: Teacher, cache_dir: Path) -> Cond:
    """The teacher's conditions for every prompt in ``file`` (one row each), encoded once and cached."""
    prompts = check_prompts(file, teacher)
    path = cache_dir / f"prompts-{digest(teacher_fingerprint(teacher), prompts)}.safetensors"
    flat = load_cache(path)
    if flat is None:
        logger.info("encoding %d prompts from %s", len(prompts), file)
        flat = encode_texts(teacher, prompts)
        save_cache(flat, path)
    return unflatten_cond(flat)


def encode_texts(teacher: Teacher, texts: list[str]) -> dict[str, torch.Tensor]:
    """The teacher's conditions of ``texts`` (one row each, flattened for safetensors), ``PROMPT_CHUNK`` at a time."""
    cond = None
    for start in range(0, len(texts), PROMPT_CHUNK):
        chunk = flatten_cond(teacher.encode_prompts(texts[start:start + PROMPT_CHUNK]))
        cond = chunk if cond is None else cat_cond(cond, chunk)
    return cond
