"""Teacher ODE pairs: samples of the teacher's own deterministic DDIM ODE with the noise they started from
(``noise → x0``, e.g. for DMD's regression loss), generated once and cached.

The pairs depend on ``seed`` only (not on the rank), so every rank of a run reads the same cached file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from fastgen.data.batch import derive_seed, num_rows, to_device
from fastgen.data.cache import digest, flatten_cond, load_cache, save_cache, teacher_fingerprint
from fastgen.denoiser import Cond, slice_cond
from fastgen.samplers import Guidance, sample_ddim
from fastgen.teacher import Teacher

logger = logging.getLogger(__name__)


def teacher_samples(teacher: Teacher, cache_dir: Path, count: int, steps: int, seed: int, uncond: Cond | None,
                    batch_size: int, prompt_cond: Cond | None = None, guidance: float = 1.0
                    ) -> dict[str, torch.Tensor]:
    """``{"noise", "x0"[, "class_labels" | "prompt_index"]}``: ``count`` deterministic DDIM solutions
    (``steps`` steps) of the teacher's ODE from seeded noise, conditioned on random labels for a
    class-conditional teacher, on the rows ``prompt_index`` of ``prompt_cond`` (every prompt once per
    round, in a seeded order) when given, else on the unconditional branch; guided by
    ``u + guidance (c - u)`` (Ho & Salimans 2022) when ``guidance != 1``. Cached; regenerated when the
    teacher, count, steps, seed, prompts or guidance differ from the cached file's metadata, or when it is
    damaged (``load_cache``)."""
    prompts_key = "" if prompt_cond is None else digest(*(
        [k, list(v.shape), hashlib.sha256(v.float().numpy().tobytes()).hexdigest()]
        for k, v in sorted(flatten_cond(prompt_cond).items())))
    metadata = {"teacher": teacher_fingerprint(teacher), "count": str(count), "steps": str(steps), "seed": str(seed),
                "prompts": prompts_key, "guidance": repr(float(guidance))}
    path = cache_dir / f"teacher-samples-{digest(teacher.source, seed)}.safetensors"
    cached = load_cache(path, metadata)
    if cached is not None:
        return cached
    logger.info("generating %d teacher samples with %d DDIM steps", count, steps)
    timesteps = teacher.schedule.timesteps(steps)
    generator = torch.Generator().manual_seed(derive_seed(seed, "teacher-samples"))
    noise = torch.randn((count, *teacher.sample_shape), generator=generator)
    noise = noise * teacher.schedule.prior_scale(timesteps[0])
    pairs = {"noise": noise}
    if teacher.num_classes:
        pairs["class_labels"] = torch.randint(teacher.num_classes, (count,), generator=generator)
    elif prompt_cond is not None:
        num_prompts = num_rows(prompt_cond)
        rounds = [torch.randperm(num_prompts, generator=generator) for _ in range(-(-count // num_prompts))]
        pairs["prompt_index"] = torch.cat(rounds)[:count]
    device = teacher.model.device
    chunks = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        unconds = slice_cond(uncond, torch.zeros(n, dtype=torch.long))
        if teacher.num_classes:
            cond = {"class_labels": pairs["class_labels"][start:start + n]}
        elif prompt_cond is not None:
            cond = slice_cond(prompt_cond, pairs["prompt_index"][start:start + n])
        else:
            cond = unconds
        guide = None if guidance == 1.0 else Guidance(to_device(unconds, device), guidance)
        x0 = sample_ddim(teacher.denoiser, noise[start:start + n].to(device), timesteps,
                         cond=to_device(cond, device), guidance=guide)
        chunks.append(x0.float().cpu())
    pairs["x0"] = torch.cat(chunks)
    save_cache(pairs, path, metadata)
    return pairs
