"""At which scale does a discrete-time teacher's sCM tangent carry the consistency signal? The tangent ``g`` of
``fastgen.losses.scm`` at initialisation (student = teacher, ``r = 1``), exact and as central differences of growing
step, on the toy teacher's marginals.

    python scripts/scm_tangent_scale.py --out docs/scm/tangent_scale.md

``g`` is ``SCM.tangent`` of a student that is a copy of the teacher, at ``r = 1``: ``-(cos t sin t x_t + sigma_d
dF/dt)`` (its other term vanishes at initialisation), with ``dF/dt`` along ``(cos t sin t dx_t/dt, cos t sin t)``:
``objective.jvp`` "exact" (forward AD) and "finite_difference" at each ``--eps`` (``objective.jvp_eps``, a step of
``eps cos t sin t`` in TrigFlow time). For each
teacher time ``s`` (``--times``, integers): the mean per-sample ``||g||`` over ``--num-samples`` toy images noised to
``s``, the mean cosine between each difference and the exact tangent, and how many of the teacher's timesteps one
step of ``eps`` spans there. A teacher trained at integer timesteps has an x0-prediction that jitters from one
timestep to the next; where the exact tangent is mostly that jitter, it is large and the differences over a few
timesteps point elsewhere (low cosine). Writes a Markdown table to ``--out`` and stdout.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from ode_from_noise import write_report  # scripts/, on the path of `python scripts/scm_tangent_scale.py`

from fastgen.data.batch import Batch
from fastgen.losses import build_objective
from fastgen.losses.scm import teacher_to_trig, trig_noise
from fastgen.teacher import load_teacher
from fastgen.toy import toy_images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--times", default="900,672,452,254,100", help="comma-separated teacher times (integers)")
    p.add_argument("--eps", default="3e-4,0.01,0.05,0.1,0.15,0.2,0.3", help="comma-separated finite-difference steps")
    p.add_argument("--sigma-d", type=float, default=0.5)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: stdout only)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed)  # the noise, apart from the objectives' initialisation
    denoiser, sigma_d = load_teacher("toy").denoiser, args.sigma_d
    steps = [float(e) for e in args.eps.split(",")]
    x0 = toy_images(args.num_samples, seed=args.seed)
    batch = Batch(x0=x0, cond=None, uncond=None, size=len(x0))

    def tangent(x_t, t, **jvp):
        """``g`` of ``SCM.tangent`` at ``r = 1``, the student a copy of the teacher."""
        objective = build_objective("scm", denoiser, copy.deepcopy(denoiser),
                                    {"sigma_d": sigma_d, "tangent_warmup_steps": 0, **jvp})
        return objective.tangent(batch, 0, x_t, t)[1]

    def norm(v):
        return float(v.flatten(1).norm(dim=1).mean())

    lines = [f"sCM's tangent on the toy teacher at initialisation, {args.num_samples} toy images per time, sigma_d "
             f"{sigma_d} (`scripts/scm_tangent_scale.py`). Each cell: mean per-sample `||g||`, (mean cosine with the "
             "exact tangent), [the teacher's timesteps that one step of `eps` spans there].", "",
             "| time s | exact | " + " | ".join(f"eps {e:g}" for e in steps) + " |",
             "|---:|---:|" + "---:|" * len(steps)]
    for s in (int(v) for v in args.times.split(",")):
        t = teacher_to_trig(denoiser.schedule, torch.full((args.num_samples,), float(s)), sigma_d)
        x_t = trig_noise(x0, t, torch.randn(x0.shape, generator=generator), sigma_d)
        per_step = float(teacher_to_trig(denoiser.schedule, s + 1, sigma_d) - t[0]) / float((t.cos() * t.sin())[0])
        exact = tangent(x_t, t, jvp="exact")
        cells = []
        for eps in steps:
            fd = tangent(x_t, t, jvp="finite_difference", jvp_eps=eps)
            cos = float(torch.nn.functional.cosine_similarity(fd.flatten(1), exact.flatten(1)).mean())
            cells.append(f"{norm(fd):.1f} ({cos:.2f}) [{eps / per_step:.1f}]")
        lines.append(f"| {s} | {norm(exact):.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
