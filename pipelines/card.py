"""The model card of an export: ``README.md`` with Hugging Face's YAML front matter, from ``fastgen_export.json``.

It states the method and its settings, the teacher, the trained step counts and their timesteps, the metrics
``fastgen eval`` measured (``add_metrics``) and two usage snippets that run as written from the folder holding
the export: one with fastgen (``fastgen.load_pipeline``), one with diffusers alone. The card names no absolute
local path: the export by its folder name, a local teacher by its folder's name ("a local folder"), a hub
teacher by its id (also its ``base_model``). A local teacher's own card supplies ``base_model`` and ``license``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import yaml

from fastgen.atomic import write_bytes

CARD = "README.md"
PROMPT = "a photo of a cat"


def _call(meta: dict) -> str:
    """The pipeline call of the snippets, at the step count the student was trained at (exports before it was
    recorded: the smallest served)."""
    steps = meta.get("num_steps") or min(int(n) for n in meta["few_step_scheduler"]["trained_timesteps"])
    args = {"text": f'prompt="{PROMPT}", ', "class": "class_labels=0, "}.get(meta["conditioning"], "")
    call = meta.get("call", {"guidance_scale": 1.0} if meta["conditioning"] == "text" else {})
    args += "".join(f"{key}={value!r}, " for key, value in call.items())
    out, field = ("video", "frames") if _video(meta) else ("image", "images")
    return f"{out} = pipe({args}num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).{field}[0]"


def _video(meta: dict) -> bool:
    """Whether the export makes videos (its trained size has frames; a video pipeline's output is ``.frames``)."""
    return "num_frames" in meta.get("size", {})


def _absent(meta: dict) -> str:
    """The components the pipeline needs but the teacher was saved without (SD3's T5), passed as ``None``."""
    return "".join(f", {name}=None" for name in meta["absent"])


def _local_teacher(meta: dict) -> bool:
    """Whether the teacher is a local folder (recorded as an absolute path), not a hub id."""
    return Path(meta["teacher"]).is_absolute()


def _teacher_name(meta: dict) -> str:
    """The teacher as the card names it: its hub id, or its folder's name."""
    return Path(meta["teacher"]).name if _local_teacher(meta) else meta["teacher"]


def read_front_matter(folder: Path) -> dict:
    """The YAML front matter of the model card ``folder/README.md``; ``{}`` where there is no readable one."""
    try:
        text = (Path(folder) / CARD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"---[ \t]*\n(.*?)^---[ \t]*$", text, re.DOTALL | re.MULTILINE)
    try:
        fields = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return fields if isinstance(fields, dict) else {}


def snippets(meta: dict, folder: str) -> dict[str, str]:
    """``{"fastgen": ..., "diffusers": ...}``: Python code loading the export in ``folder`` (the path the code
    names, e.g. the folder's name) and sampling once."""
    with_fastgen = f'import torch\nimport fastgen\n\npipe = fastgen.load_pipeline("{folder}")\n{_call(meta)}\n'
    remote = ", trust_remote_code=True" if meta["remote_code"] else ""
    if meta["kind"] == "full":
        without = (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
                   f'pipe = DiffusionPipeline.from_pretrained("{folder}", use_safetensors=True{remote}{_absent(meta)})\n')
    else:
        scheduler = meta["scheduler"]
        if meta["remote_code"]:
            imports = "from diffusers import DiffusionPipeline\nfrom diffusers.utils import get_class_from_dynamic_module\n"
            load_class = (f'{scheduler} = get_class_from_dynamic_module("{folder}/scheduler", '
                          f'module_file="scheduling_few_step.py", class_name="{scheduler}", trust_remote_code=True)\n')
        else:
            imports, load_class = f"from diffusers import DiffusionPipeline, {scheduler}\n", ""
        where = "  # the teacher: a local folder" if _local_teacher(meta) else ""
        without = (f"import torch\n{imports}\n{load_class}"
                   f'pipe = DiffusionPipeline.from_pretrained("{_teacher_name(meta)}", use_safetensors=True'
                   f'{_absent(meta)}){where}\n'
                   f'pipe.load_lora_weights("{folder}")\n'
                   f'pipe.scheduler = {scheduler}.from_pretrained("{folder}", subfolder="scheduler")\n')
    return {"fastgen": with_fastgen, "diffusers": without + _call(meta) + "\n"}


def _front_matter(meta: dict) -> str:
    fields = {"library_name": "diffusers"}
    for key in ("license", "base_model"):  # exports written before fastgen recorded a license lack the key
        if meta.get(key):
            fields[key] = meta[key]
    fields["pipeline_tag"] = ("text-to-video" if _video(meta) else "text-to-image") if meta["conditioning"] == "text" \
        else "unconditional-image-generation"
    tags = ["fastgen", "distillation", "few-step", *([meta["method"]] if meta["method"] else [])]
    if meta["kind"] == "lora":
        tags.append("lora")
    fields["tags"] = tags
    return f"---\n{yaml.safe_dump(fields, sort_keys=False)}---"


def _metrics_table(metrics: Sequence[dict]) -> str:
    if not metrics:
        return "Not evaluated yet (`fastgen eval --model FOLDER ...` adds its results here)."
    columns = [c for c in metrics[0] if c != "curve"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in metrics:
        rows.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                      for c in columns) + " |")
    return "\n".join(rows)


def _why_code(meta: dict) -> str:
    from fastgen.pipelines.export import timestep_experts

    reasons = []
    if meta["scheduler"] == "FewStepScheduler":
        reasons.append("no stock diffusers scheduler replays this student exactly")
    if meta["pipeline"] == "FewStepPipeline":
        reasons.append("`DDPMPipeline` would run it without class labels or input preconditioning")
    if timestep_experts(meta):
        reasons.append(f"its {meta['experts']['count']} experts load as one model routing each call by its timestep")
    if meta.get("meanflow"):
        reasons.append("the MeanFlow network takes each step's interval from its own table (`MeanFlowModel`)")
    text = "; ".join(reasons)
    return text[:1].upper() + text[1:]


def _lora_line(meta: dict) -> str:
    if meta["kind"] != "lora":
        return ""
    if meta.get("lora_format") == "kohya":
        from fastgen.pipelines.export import KOHYA_WEIGHTS

        return (f"\n- LoRA format: kohya-ss (`{KOHYA_WEIGHTS}`, keys `lora_unet_..._lora_down.weight` / `lora_up` / "
                "`alpha`): ComfyUI and AUTOMATIC1111 load it as a LoRA file, diffusers with `load_lora_weights`.")
    return "\n- LoRA format: peft, diffusers' layout (`pytorch_lora_weights.safetensors`), for `load_lora_weights`."


def _health_line(meta: dict) -> str:
    """The training's last health check (``fastgen.health``), a paragraph before the metrics; none if unrecorded."""
    health = meta.get("health")
    if not health:
        return ""
    if health["verdict"] == "nonfinite":
        return f"Health at step {health['step']} of training: **the samples held NaN or inf values**.\n\n"
    verdict = {"noise": "**the samples looked like noise**", "flat": "**the samples were flat (a constant?)**"}.get(
        health["verdict"], "within the healthy band")
    return (f"Health at step {health['step']} of training: {verdict}: the teacher denoised the student's samples "
            f"{health['denoise_ratio']:.2f}x as badly as the data (noise-like above 5), and they carried "
            f"{health['flat_ratio']:.2f} of its spatial variation (flat below 0.2).\n\n")


def _experts_line(meta: dict) -> str:
    from fastgen.pipelines.export import timestep_experts

    experts = meta.get("experts")
    if not experts:
        return ""
    bounds = ", ".join(f"{b:g}" for b in experts["boundaries"])
    if not timestep_experts(meta):
        return (f"\n- Student of 2 `{experts['expert_class']}` experts by noise level, in the pipeline's own layout: "
                f"`transformer` answers native times at or above {bounds}, `transformer_2` the rest "
                "(`boundary_ratio` in model_index.json).")
    return (f"\n- Student of {experts['count']} `{experts['expert_class']}` experts by noise level (high noise first), "
            f"split at native times {bounds}: `{meta['denoiser']}` is a `TimestepExperts` holding them, which sends "
            "each call to the expert of its timestep.")


def model_card(meta: dict, folder: str) -> str:
    """The text of ``README.md`` for the export described by ``meta``, loaded from ``folder`` in its snippets."""
    scheduler = meta["few_step_scheduler"]
    teacher = f"`{_teacher_name(meta)}`" + (" (a local folder)" if _local_teacher(meta) else "")
    title = f"{meta['method'] or 'Few-step'} student of {_teacher_name(meta)}"
    settings = meta["settings"] or {}
    setting_rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(settings.items()))
    steps = "\n".join(f"| {n} | {', '.join(f'{t:g}' for t in ts)} |"
                      for n, ts in sorted(scheduler["trained_timesteps"].items(), key=lambda kv: int(kv[0])))
    if meta["remote_code"]:
        loading = (f"{_why_code(meta)}, so the folder ships code ({', '.join(f'`{f}`' for f in meta['remote_code'])}, "
                   f"generated from fastgen {meta['fastgen_version']}): without fastgen, load it with "
                   "`trust_remote_code=True`.")
    else:
        loading = f"Stock diffusers runs it as trained (`{meta['pipeline']}` with `{meta['scheduler']}`): no custom code."
    code = snippets(meta, folder)
    return f"""{_front_matter(meta)}

# {title}

Distilled with [fastgen](https://pypi.org/project/fastgen-distill/) {meta['fastgen_version']}
({'LoRA adapter' if meta['kind'] == 'lora' else 'full weights'}).

- Method: {meta['method'] or 'not recorded'}; sampling rule `{scheduler['rule']}`
  ({'consistency boundary condition ' + json.dumps(scheduler['boundary']) if scheduler['boundary'] else 'no boundary condition'});
  student prediction type `{scheduler['schedule']['prediction_type']}` on a `{scheduler['schedule']['family']}` schedule.
- Teacher: {teacher}.
- Pipeline `{meta['pipeline']}`, scheduler `{meta['scheduler']}`. {loading}{_lora_line(meta)}{_experts_line(meta)}

## Settings

| setting | value |
|---|---|
{setting_rows or '| (none recorded) | |'}

## Trained step counts

| steps | timesteps (the teacher's native time) |
|---|---|
{steps}

Other step counts were not trained.

## Metrics

{_health_line(meta)}{_metrics_table(meta['metrics'])}

## Usage

With fastgen installed (`pip install fastgen-distill`); this runs no code from the folder:

```python
{code['fastgen']}```

With diffusers alone:

```python
{code['diffusers']}```
"""


def write_card(folder: Path, meta: dict, final: Path | None = None) -> Path:
    """Write ``README.md`` into ``folder`` (its snippets name the folder by its final name, ``final``'s)."""
    path = Path(folder) / CARD
    write_bytes(path, model_card(meta, Path(final or folder).name).encode())
    return path


def add_metrics(folder: str | Path, rows: Sequence[dict]) -> None:
    """Record ``fastgen eval`` results (rows of the sweep's ``"model"`` curve) in the export's metadata and card;
    an export with a manifest (checked when it was loaded for the evaluation) is sealed again."""
    from fastgen.integrity import MANIFEST
    from fastgen.pipelines.export import METADATA, seal

    folder = Path(folder)
    meta = json.loads((folder / METADATA).read_text())
    meta["metrics"] = [{k: v for k, v in row.items() if k != "curve"} for row in rows if row.get("curve") == "model"]
    write_bytes(folder / METADATA, (json.dumps(meta, indent=2) + "\n").encode())
    write_card(folder, meta)
    if (folder / MANIFEST).is_file():
        seal(folder)
