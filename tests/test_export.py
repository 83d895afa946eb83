"""Export round trips: a perturbed copy of a tiny teacher is exported, loaded in fresh Python processes, one in
which importing fastgen is impossible (diffusers' own loaders and the folder's shipped code) and one with
``fastgen.load_pipeline``, sampled, and compared with the in-process student sampled by ``sample_renoise``."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from tiny import make_ddpm_folder, make_sd3_folder, make_sd_folder, make_sdxl_folder

from fastgen import FewStepPipeline, export_student, load_teacher
from fastgen.cli import main
from fastgen.denoiser import Denoiser
from fastgen.errors import UsageError
from fastgen.generate import generate
from fastgen.pipelines.card import snippets
from fastgen.pipelines.export import FORMAT_VERSION, KOHYA_WEIGHTS, LORA_FORMATS, METADATA
from fastgen.pipelines.load import load_pipeline
from fastgen.samplers import sample_renoise
from fastgen.samplers.scheduler import renoise_generator

TRAINED = {1: [999], 2: [999, 499]}
PROMPT = "a red square"
SEED = 0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
KINDS = ["ddpm", "ddpm-custom", "ddpm-class", "edm", "sd", "sd-lora-merged", "sd-lora", "sdxl", "sd3"]

LOADER = textwrap.dedent("""
    import sys
    if sys.argv[3] == "without":
        sys.modules["fastgen"] = None  # importing fastgen (or any of it) now raises ImportError
    import json, traceback
    import torch
    from safetensors.torch import save_file
    from diffusers import DiffusionPipeline
    from diffusers.utils import get_class_from_dynamic_module

    def load(case):
        if sys.argv[3] == "with":
            import fastgen
            return fastgen.load_pipeline(case["folder"])
        absent = {name: None for name in case.get("absent", [])}
        if case["kind"] == "lora":
            pipe = DiffusionPipeline.from_pretrained(case["teacher_folder"], use_safetensors=True, **absent)
            pipe.load_lora_weights(case["folder"])
            name = json.load(open(case["folder"] + "/scheduler/scheduler_config.json"))["_class_name"]
            if name == "FewStepScheduler":
                cls = get_class_from_dynamic_module(case["folder"] + "/scheduler", module_file="scheduling_few_step.py",
                                                    class_name=name, trust_remote_code=True)
            else:
                import diffusers
                cls = getattr(diffusers, name)
            pipe.scheduler = cls.from_pretrained(case["folder"], subfolder="scheduler")
            return pipe
        return DiffusionPipeline.from_pretrained(case["folder"], use_safetensors=True, trust_remote_code=True, **absent)

    def run(pipe, case, steps, output_type):
        # the images and, where the pipeline exposes them, its final latents (before decoding and clamping)
        kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(case["seed"])}
        if case.get("prompt") is not None:
            kwargs.update(prompt=case["prompt"], guidance_scale=1.0)
        if case.get("class_labels") is not None:
            kwargs["class_labels"] = case["class_labels"]
        final = {}
        if type(pipe).__name__ == "FewStepPipeline":
            kwargs["callback_on_step_end"] = lambda pipe, i, t, tensors: final.update(tensors) or {}
        return pipe(**kwargs, output_type=output_type).images, final.get("latents")

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    tensors, errors, classes = {}, {}, {}
    for case in cases:
        try:
            pipe = load(case)
            pipe.set_progress_bar_config(disable=True)
            classes[case["name"]] = [type(pipe).__name__, type(pipe.scheduler).__name__]
            for steps in (1, 2):
                key = f"{case['name']}/{steps}"
                tensors[key + "/image"], latent = run(pipe, case, steps, "pt")
                if case.get("prompt") is not None:
                    latent = run(pipe, case, steps, "latent")[0]
                if latent is not None:
                    tensors[key + "/latent"] = latent
        except Exception:
            errors[case["name"]] = traceback.format_exc()
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, out + ".safetensors")
    open(out + ".json", "w").write(json.dumps({"errors": errors, "classes": classes}))
""")


def run_loader(cases, root, mode: str):
    """Run ``LOADER`` in a fresh process (``mode`` "without" fastgen or "with" it); return its outputs."""
    result = root / f"loaded-{mode}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / f"modules-{mode}")}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases), str(result), mode], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # diffusers resolves a custom pipeline's __init__ annotations: the generated file imports what they name
    assert "cannot get type annotation" not in proc.stderr
    report = json.loads(result.with_suffix(".json").read_text())
    return load_file(f"{result}.safetensors"), report["errors"], report["classes"]


def edm_folder(path):
    """The tiny DDPM teacher with an ``EDMEulerScheduler`` (Karras et al. 2022 preconditioning)."""
    folder = make_ddpm_folder(path)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
        "prediction_type": "epsilon", "num_train_timesteps": 1000}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EDMEulerScheduler"]}))
    return folder


def v_prediction_ddpm_folder(path):
    """The tiny DDPM teacher switched to v-prediction: its 1-step x0 at t = 999 stays O(1) (an epsilon
    teacher's is divided by alpha ≈ 0.006), so the clamped images compared below are not saturated."""
    folder = make_ddpm_folder(path)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    return folder


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved by ``scale``-sized Gaussian noise."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return student


def with_lora(model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """A copy of ``model`` carrying a LoRA adapter (r=4, default alpha 8, so scaling 2) with random weights."""
    student = copy.deepcopy(model)
    student.add_adapter(LoraConfig(r=4, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return student


def reference(teacher, student, trained, steps: int, cond=None, scheduler_renoise: bool = False):
    """The in-process student: initial noise from ``Generator(SEED)`` as the pipelines draw it (scaled by the
    schedule's prior), then ``sample_renoise`` with the same generator (or, for SD3, whose pipeline passes none to
    ``scheduler.step``, with the scheduler's own: ``renoise_generator`` of the initial noise)."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn((1, *teacher.sample_shape), generator=generator) * teacher.schedule.prior_scale(trained[steps][0])
    if scheduler_renoise:
        generator = renoise_generator(x)
    with torch.no_grad():
        latent = sample_renoise(Denoiser(student, teacher.schedule), x, trained[steps], cond, generator=generator)
        image = (teacher.decode(latent) / 2 + 0.5).clamp(0, 1)
    return latent, image


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Export every kind, load all of them in a process without fastgen and in one with it; return the
    export folders, the in-process references and students, and each loader's outputs, errors and classes."""
    root = tmp_path_factory.mktemp("export")
    cases, refs, folders, students = [], {}, {}, {}

    def add(name, teacher, student, folder, cond=None, trained=TRAINED, **case):
        folders[name] = folder
        students[name] = (teacher, student, cond, trained)
        case.update(name=name, folder=str(folder), seed=SEED, kind=case.get("kind", "full"))
        cases.append(case)
        for steps in (1, 2):
            refs[f"{name}/{steps}"] = reference(teacher, student, trained, steps, cond,
                                                case.get("scheduler_renoise", False))

    ddpm = load_teacher(v_prediction_ddpm_folder(root / "ddpm"))
    student = perturbed(ddpm.model)
    add("ddpm", ddpm, student, export_student(ddpm, student, root / "ddpm-student", TRAINED))
    off_grid = {1: [999], 2: [999, 400]}  # not LCM's timesteps: FewStepScheduler ships as code
    add("ddpm-custom", ddpm, student, export_student(ddpm, student, root / "ddpm-custom", off_grid), trained=off_grid)

    labelled = load_teacher(make_ddpm_folder(root / "ddpm-class", num_class_embeds=3))
    student = perturbed(labelled.model)
    out = export_student(labelled, student, root / "ddpm-class-student", TRAINED)
    add("ddpm-class", labelled, student, out, labelled.class_cond(torch.tensor([2])), class_labels=2)

    edm = load_teacher(edm_folder(root / "edm"))
    student = perturbed(edm.model)
    sigmas = {1: [80.0], 2: [80.0, 2.0]}
    add("edm", edm, student, export_student(edm, student, root / "edm-student", sigmas), trained=sigmas)

    sd_dir = make_sd_folder(root / "sd")
    sd = load_teacher(sd_dir)
    cond = sd.encode_prompts([PROMPT])
    student = perturbed(sd.model)
    add("sd", sd, student, export_student(sd, student, root / "sd-student", TRAINED), cond, prompt=PROMPT)
    student = with_lora(sd.model)
    out = export_student(sd, student, root / "sd-merged", TRAINED)
    add("sd-lora-merged", sd, student, out, cond, prompt=PROMPT)
    out = export_student(sd, student, root / "sd-lora", TRAINED, lora=True)
    add("sd-lora", sd, student, out, cond, prompt=PROMPT, teacher_folder=str(sd_dir), kind="lora")

    sdxl = load_teacher(make_sdxl_folder(root / "sdxl"))
    student = perturbed(sdxl.model)
    out = export_student(sdxl, student, root / "sdxl-student", TRAINED)
    add("sdxl", sdxl, student, out, sdxl.encode_prompts([PROMPT]), prompt=PROMPT)

    sd3 = load_teacher(make_sd3_folder(root / "sd3"))
    student = perturbed(sd3.model)
    out = export_student(sd3, student, root / "sd3-student", TRAINED)
    add("sd3", sd3, student, out, sd3.encode_prompts([PROMPT]), prompt=PROMPT,
        absent=["text_encoder_3", "tokenizer_3"], scheduler_renoise=True)
    # not in KINDS: only its model card's and README's snippets are run (a LoRA on a teacher saved without T5)
    folders["sd3-lora"] = export_student(sd3, with_lora(sd3.model), root / "sd3-lora", TRAINED, lora=True)

    loaded = {mode: run_loader(cases, root, mode) for mode in ("without", "with")}
    return folders, refs, students, loaded


EXPECTED_CLASSES = {  # (pipeline, scheduler) that diffusers alone builds from each export
    "ddpm": ["DDPMPipeline", "LCMScheduler"], "ddpm-custom": ["DDPMPipeline", "FewStepScheduler"],
    "ddpm-class": ["FewStepPipeline", "LCMScheduler"], "edm": ["FewStepPipeline", "FewStepScheduler"],
    "sd": ["StableDiffusionPipeline", "LCMScheduler"], "sd-lora-merged": ["StableDiffusionPipeline", "LCMScheduler"],
    "sd-lora": ["StableDiffusionPipeline", "LCMScheduler"], "sdxl": ["StableDiffusionXLPipeline", "LCMScheduler"],
    "sd3": ["StableDiffusion3Pipeline", "FewStepScheduler"],
}


@pytest.mark.parametrize("mode", ["without", "with"])
@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("steps", [1, 2])
def test_loaded_pipeline_reproduces_student(round_trip, mode, name, steps):
    _, refs, _, loaded = round_trip
    outputs, errors, classes = loaded[mode]
    assert name not in errors, errors.get(name)
    if mode == "without":
        assert classes[name] == EXPECTED_CLASSES[name]
    else:  # fastgen's own scheduler, whatever the folder ships
        assert classes[name][1] == "FewStepScheduler"
    ref_latent, ref_image = refs[f"{name}/{steps}"]
    torch.testing.assert_close(outputs[f"{name}/{steps}/image"], ref_image, atol=1e-4, rtol=0)
    if f"{name}/{steps}/latent" in outputs:  # before clamping; epsilon x0 at t = 999 reaches hundreds
        latent = outputs[f"{name}/{steps}/latent"]
        torch.testing.assert_close(latent, ref_latent, atol=1e-4 * max(1.0, ref_latent.abs().max().item()), rtol=0)


@pytest.mark.parametrize("name", KINDS)
def test_fastgen_sample_takes_every_kind(round_trip, name):
    """``load_teacher`` + ``generate`` (what ``fastgen sample`` and ``fastgen eval`` run) on each export."""
    folders, _, students, _ = round_trip
    teacher, student, cond, trained = students[name]
    model = load_teacher(folders[name])
    kwargs = {"prompts": [PROMPT]} if cond is not None and "encoder_hidden_states" in cond else {}
    if cond is not None and "class_labels" in cond:
        kwargs["class_labels"] = [2]
    for steps in (1, 2):
        images = generate(model, 1, steps, seed=SEED, **kwargs)
        _, expected = reference(teacher, student, trained, steps, cond)
        torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), expected, atol=1e-4, rtol=0)


def test_full_export_layout(round_trip):
    folders = round_trip[0]
    index = json.loads((folders["sd-lora-merged"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert not any("lora" in key for key in load_file(folders["sd-lora-merged"] / "unet" / "diffusion_pytorch_model.safetensors"))
    index = json.loads((folders["sd3"] / "model_index.json").read_text())
    assert index["scheduler"] == ["scheduling_few_step", "FewStepScheduler"]
    scheduler = json.loads((folders["sd3"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["trained_timesteps"] == {"1": [999.0], "2": [999.0, 499.0]} and scheduler["rule"] == "renoise"
    index = json.loads((folders["ddpm-class"] / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_few_step", "FewStepPipeline"]
    assert (folders["ddpm-class"] / "pipeline_few_step.py").is_file()
    assert not list(folders["ddpm"].rglob("*.py"))  # stock DDPMPipeline + LCMScheduler: no code at all
    for folder in folders.values():
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        assert not [f for f in folder.parent.iterdir() if f.name.startswith(f".{folder.name}.")]
        assert json.loads((folder / METADATA).read_text())["format_version"] == FORMAT_VERSION


def test_shipped_code_is_the_package_source_and_imports_no_fastgen(round_trip):
    from fastgen.pipelines.remote_code import pipeline_source, scheduler_source

    folders = round_trip[0]
    shipped = {name: (folder / "scheduler" / "scheduling_few_step.py").read_text()
               for name, folder in folders.items() if (folder / "scheduler" / "scheduling_few_step.py").is_file()}
    assert sorted(shipped) == ["ddpm-custom", "edm", "sd3", "sd3-lora"]
    assert set(shipped.values()) == {scheduler_source()}
    assert (folders["edm"] / "pipeline_few_step.py").read_text() == pipeline_source()
    for source in (scheduler_source(), pipeline_source()):
        roots = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots.add(node.module.split(".")[0])
        assert roots <= {"torch", "numpy", "diffusers", "__future__", "dataclasses", "hashlib", "typing"}, roots


def test_lora_export_layout(round_trip):
    folder = round_trip[0]["sd-lora"]
    assert sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) == [
        "README.md", "fastgen_export.json", "fastgen_manifest.json", "pytorch_lora_weights.safetensors",
        "scheduler/scheduler_config.json"]
    keys = load_file(folder / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)


def front_matter(card: str) -> dict:
    """The YAML front matter of a model card."""
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_states_the_student(round_trip):
    folders = round_trip[0]
    card = (folders["sd3"] / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and "base_model" not in meta  # a local teacher
    assert {"fastgen", "distillation"} <= set(meta["tags"])
    assert "| 2 | 999, 499 |" in card and "trust_remote_code=True" in card and "Not evaluated yet" in card
    assert "trust_remote_code" not in (folders["ddpm"] / "README.md").read_text()


def test_model_card_snippets_run_as_written(round_trip):
    """Both snippets of the cards of a stock, a custom-code, a custom-pipeline and a LoRA export, each in a fresh
    process (the diffusers one with fastgen made unimportable), give the in-process student's image."""
    folders, refs, _, _ = round_trip
    root = folders["ddpm"].parent
    names = ("ddpm", "ddpm-custom", "edm", "sd-lora", "sd3", "sd3-lora")  # SD3: saved without T5
    for name in names:
        card = (folders[name] / "README.md").read_text()
        blocks = card.split("```python\n")[1:]
        code = [block.split("```")[0] for block in blocks]
        assert len(code) == 2 and "import fastgen" in code[0] and "fastgen" not in code[1]
        meta = json.loads((folders[name] / METADATA).read_text())
        assert code == [snippets(meta, folders[name].name)[k] for k in ("fastgen", "diffusers")]  # by its name
        for way, snippet in zip(("fastgen", "diffusers"), code):
            (root / f"{name}-{way}.py").write_text(snippet + f"import sys, numpy\nnumpy.save(sys.argv[1] + '-{name}.npy', numpy.asarray(image))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules-card")}
    for way in ("fastgen", "diffusers"):  # one process per way, each snippet in a namespace of its own
        runner = "import sys\n" + ("" if way == "fastgen" else "sys.modules['fastgen'] = None\n")
        runner += "".join(f"exec(open({str(root / f'{name}-{way}.py')!r}).read(), {{}})\n" for name in names)
        proc = subprocess.run([sys.executable, "-c", runner, str(root / f"card-{way}")], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    for name in names:
        meta = json.loads((folders[name] / METADATA).read_text())
        images = {way: torch.from_numpy(np.load(root / f"card-{way}-{name}.npy")).float().permute(2, 0, 1)[None] / 255
                  for way in ("fastgen", "diffusers")}  # PIL images, 8 bits
        torch.testing.assert_close(images["fastgen"], images["diffusers"], atol=0, rtol=0)
        if meta["conditioning"] != "text":  # the card prompts with its own text
            torch.testing.assert_close(images["fastgen"], refs[f"{name}/1"][1], atol=1 / 255 + 1e-4, rtol=0)


def test_fastgen_refuses_folders_that_are_not_exports(round_trip, tmp_path):
    folders = round_trip[0]
    with pytest.raises(ValueError, match=r"is not a fastgen export: no fastgen_export.json"):
        load_pipeline(folders["ddpm"].parent / "ddpm")
    newer = tmp_path / "newer"
    newer.mkdir()
    meta = json.loads((folders["ddpm"] / METADATA).read_text())
    (newer / METADATA).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1} .*reads versions up to {FORMAT_VERSION}"):
        load_teacher(newer)
    foreign = tmp_path / "foreign"
    import shutil

    shutil.copytree(folders["edm"], foreign)
    (foreign / METADATA).unlink()
    with pytest.raises(ValueError, match=r"names classes outside diffusers.*not a fastgen export"):
        load_teacher(foreign)


def test_eval_adds_metrics_to_the_card(round_trip, tmp_path):
    import shutil

    from fastgen.pipelines.card import add_metrics

    folder = tmp_path / "student"
    shutil.copytree(round_trip[0]["ddpm"], folder)
    add_metrics(folder, [{"curve": "model", "steps": 1, "fid": 12.5}, {"curve": "teacher DDIM", "steps": 1, "fid": 3.0}])
    card = (folder / "README.md").read_text()
    assert "| steps | fid |" in card and "| 1 | 12.5 |" in card and "| 1 | 3 |" not in card
    assert json.loads((folder / METADATA).read_text())["metrics"] == [{"steps": 1, "fid": 12.5}]


def test_eval_reseals_an_export_named_relative_to_the_working_directory(round_trip, tmp_path, monkeypatch):
    """``fastgen eval --model runs/x/export``: the manifest is written again for the new metadata (it once joined
    the folder to paths that already held it and failed, leaving the export's metadata unsealed)."""
    import shutil

    from fastgen.integrity import MANIFEST, verify_manifest
    from fastgen.pipelines.card import add_metrics

    shutil.copytree(round_trip[0]["ddpm"], tmp_path / "runs" / "student")
    assert (tmp_path / "runs" / "student" / MANIFEST).is_file()
    monkeypatch.chdir(tmp_path)
    add_metrics(Path("runs/student"), [{"curve": "model", "steps": 1, "fid": 12.5}])
    assert verify_manifest(tmp_path / "runs" / "student", required=True)
    assert load_teacher(tmp_path / "runs" / "student").model is not None


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    """A tiny DDPM teacher and a perturbed student."""
    teacher = load_teacher(make_ddpm_folder(tmp_path_factory.mktemp("pixel") / "teacher"))
    return teacher, perturbed(teacher.model)


def test_untrained_step_count_is_refused(pixel, tmp_path):
    folder = export_student(*pixel, tmp_path / "out", TRAINED)
    pipe = load_pipeline(folder)
    with pytest.raises(ValueError, match=r"num_inference_steps=3: this student was trained for \[1, 2\] steps"):
        pipe(num_inference_steps=3)


def test_few_step_pipeline_conventions(tmp_path):
    teacher = load_teacher(make_ddpm_folder(tmp_path / "teacher", num_class_embeds=3))
    pipe = load_pipeline(export_student(teacher, teacher.model, tmp_path / "out", TRAINED))
    assert isinstance(pipe, FewStepPipeline)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    images = pipe(batch_size=2, generator=generators, class_labels=[0, 2], output_type="np").images
    assert images.shape == (2, 8, 8, 3) and 0 <= images.min() and images.max() <= 1
    noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    (again,) = pipe(batch_size=2, latents=noise, class_labels=[0, 2], output_type="pt", return_dict=False)
    torch.testing.assert_close(again.permute(0, 2, 3, 1).numpy(), images)
    assert pipe(class_labels=1).images[0].size == (8, 8)
    with pytest.raises(ValueError, match="class-conditional .* pass class_labels"):
        pipe()
    with pytest.raises(ValueError, match=r"class_labels \[5\] out of range"):
        pipe(class_labels=5)
    with pytest.raises(ValueError, match="output_type='latent'"):
        pipe(class_labels=1, output_type="latent")


def test_overwrite_protection(pixel, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by fastgen export.*choose a new or empty folder"):
        export_student(*pixel, foreign, TRAINED)
    assert [f.name for f in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    export_student(*pixel, empty, TRAINED)
    export_student(*pixel, empty, {4: [999, 749, 499, 249]})  # a previous export is replaced
    config = json.loads((empty / METADATA).read_text())["few_step_scheduler"]
    assert config["trained_timesteps"] == {"4": [999.0, 749.0, 499.0, 249.0]}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty", "foreign"]


def test_failure_midway_leaves_nothing_behind(pixel, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("fastgen.pipelines.card.model_card", fail)  # the card is written last
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(*pixel, tmp_path / "new", TRAINED)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    previous = export_student(*pixel, tmp_path / "previous", TRAINED)
    before = sorted(str(f.relative_to(previous)) for f in previous.rglob("*"))
    monkeypatch.setattr("fastgen.pipelines.card.model_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(*pixel, previous, {1: [399]})
    assert sorted(str(f.relative_to(previous)) for f in previous.rglob("*")) == before
    assert [f.name for f in tmp_path.iterdir()] == ["previous"]


def test_lora_export_of_pixel_teacher_is_refused(pixel, tmp_path):
    with pytest.raises(ValueError, match="LoRA export needs a text-to-image teacher.*lora=False"):
        export_student(*pixel, tmp_path / "out", TRAINED, lora=True)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(pixel, tmp_path):
    teacher, student = pixel
    with pytest.raises(TypeError, match="student_model is a Linear; expected the teacher's UNet2DModel"):
        export_student(teacher, torch.nn.Linear(2, 2), tmp_path / "out", TRAINED)
    other = type(student).from_config({**teacher.model.config, "sample_size": 16})
    with pytest.raises(ValueError, match=r"config differs from the teacher's in \['sample_size'\]"):
        export_student(teacher, other, tmp_path / "out", TRAINED)
    with pytest.raises(ValueError, match="trained_timesteps key 'four' is not a step count"):
        export_student(teacher, student, tmp_path / "out", {"four": [999, 749, 499, 249]})
    with pytest.raises(ValueError, match=r"trained_timesteps\['2'\] has 1 values"):
        export_student(teacher, student, tmp_path / "out", {2: [999]})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return load_teacher(make_sd_folder(tmp_path_factory.mktemp("sd") / "teacher"))


def test_lora_export_needs_an_untouched_base_and_an_adapter(sd, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA adapter.*lora=False"):
        export_student(sd, perturbed(sd.model), tmp_path / "out", TRAINED, lora=True)
    student = with_lora(perturbed(sd.model))
    with pytest.raises(ValueError, match="non-LoRA weight .* differs from the teacher's.*lora=False"):
        export_student(sd, student, tmp_path / "out", TRAINED, lora=True)
    assert list(tmp_path.iterdir()) == []


def test_a_lora_student_beside_a_lora_fake_score_on_the_teachers_weights_exports_its_adapter(tmp_path, capsys):
    """DMD2 with a LoRA student and a LoRA fake score: the teacher's own network then carries the fake score's
    adapter, and the export compares the student's base with the teacher's base weights (their keys differ by
    peft's ``base_layer``), not with nothing."""
    teacher = make_sd_folder(tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red disc\n")
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--method", "dmd2", "--data", "teacher", "--prompts",
                 str(prompts), "--output", str(run), "--max-steps", "1", "--lora", "student.lora_rank=2",
                 "objective.fake_lora_rank=2", "train.batch_size=2", "teacher_samples=2",
                 "teacher_sample_steps=2"]) == 0, capsys.readouterr().err
    assert sorted(load_file(run / "export" / "pytorch_lora_weights.safetensors"))  # the adapter alone
    assert not (run / "export" / "unet").exists()


def readme_loading_snippets() -> list[str]:
    """The Python blocks of README's "Loading a student" section."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Loading a student\n")[1].split("\n## ")[0]
    return [block.split("```")[0] for block in section.split("```python\n")[1:]]


def test_readme_loading_snippets_run(round_trip):
    """README's two snippets, run in fresh processes on real exports (its folder names replaced by them, nothing
    else): the fastgen one as written, the diffusers one with fastgen made unimportable; on a full SD3 export (shipped
    code, a teacher saved without T5) with an SD LoRA export (stock scheduler), then a full SD export with an SD3
    LoRA export."""
    folders = round_trip[0]
    with_fastgen, without = readme_loading_snippets()[:2]  # the third is the experts one (test_export_experts.py)
    root = folders["sd"].parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules-readme")}
    for full, lora, teacher in [("sd3", "sd-lora", "sd"), ("sd", "sd3-lora", "sd3")]:
        for prefix, snippet in [("", with_fastgen), ("import sys; sys.modules['fastgen'] = None\n", without)]:
            code = prefix + snippet.replace("students/lcm-4step-lora", str(folders[lora])) \
                .replace("students/lcm-4step", str(folders[full])).replace("teachers/sd", str(root / teacher))
            code = code.replace("num_inference_steps=4", "num_inference_steps=2")
            proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def lora_layouts(request, tmp_path_factory):
    """A LoRA student of a tiny SD or SDXL teacher exported in every layout: (teacher folder, {format: folder})."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    teacher_dir = {"sd": make_sd_folder, "sdxl": make_sdxl_folder}[request.param](root / "teacher")
    teacher = load_teacher(teacher_dir)
    student = with_lora(teacher.model)
    return teacher_dir, {fmt: export_student(teacher, student, root / fmt, TRAINED, lora=fmt) for fmt in LORA_FORMATS}


def lora_latents(teacher_dir, lora=None):
    """Final latents of the stock teacher pipeline (2 DDIM/Euler steps, seed ``SEED``) with ``lora`` loaded."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher_dir, use_safetensors=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(SEED),
                output_type="latent").images


def test_kohya_export_samples_as_the_peft_export(lora_layouts):
    """The kohya file, loaded by a stock pipeline's ``load_lora_weights`` (the file itself, and the folder), gives
    the PEFT export's latents. Measured: max abs difference 0 (both load the same weights at scale 1; latents of
    magnitude ~6); the LoRA moves them by ~0.8, so an adapter loaded wrongly or not at all fails."""
    teacher_dir, folders = lora_layouts
    peft = lora_latents(teacher_dir, folders["peft"])
    assert (peft - lora_latents(teacher_dir)).abs().max() > 0.1
    for kohya in (folders["kohya"] / KOHYA_WEIGHTS, folders["kohya"]):
        torch.testing.assert_close(lora_latents(teacher_dir, kohya), peft, atol=1e-5, rtol=0)


def test_kohya_export_layout(lora_layouts):
    """Keys ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (= rank), the
    same tensors as the PEFT export's ``lora_A`` / ``lora_B``; the format is recorded in the metadata and card."""
    _, folders = lora_layouts
    folder = folders["kohya"]
    assert sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) == [
        "README.md", "fastgen_export.json", "fastgen_manifest.json", KOHYA_WEIGHTS, "scheduler/scheduler_config.json"]
    kohya = load_file(folder / KOHYA_WEIGHTS)
    peft = load_file(folders["peft"] / "pytorch_lora_weights.safetensors")
    modules = {key.split(".lora_")[0] for key in peft}  # unet.down_blocks.1.attentions.0....attn1.to_q
    assert len(kohya) == 3 * len(modules) and all(key.startswith("lora_unet_") for key in kohya)
    for module in modules:
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        assert torch.equal(kohya[f"{name}.lora_down.weight"], peft[f"{module}.lora_A.weight"])
        assert torch.equal(kohya[f"{name}.lora_up.weight"], peft[f"{module}.lora_B.weight"])
        assert kohya[f"{name}.alpha"].item() == 4  # the rank: scale 1, as the PEFT export's folded lora_B needs
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in kohya
    assert json.loads((folder / METADATA).read_text())["lora_format"] == "kohya"
    assert json.loads((folders["peft"] / METADATA).read_text())["lora_format"] == "peft"
    assert "LoRA format: kohya-ss" in (folder / "README.md").read_text()
    assert "LoRA format: peft" in (folders["peft"] / "README.md").read_text()


def test_fastgen_loads_a_kohya_export(lora_layouts):
    teacher_dir, folders = lora_layouts
    pipes = [load_pipeline(folders[fmt]) for fmt in LORA_FORMATS]
    latents = [pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(SEED)).images for pipe in pipes]
    torch.testing.assert_close(latents[1], latents[0], atol=1e-5, rtol=0)


def test_lora_format_is_checked(tmp_path):
    sd3 = load_teacher(make_sd3_folder(tmp_path / "sd3"))
    with pytest.raises(UsageError, match=r"--lora-format kohya writes kohya-ss's UNet layout .*denoiser of "
                                         r"StableDiffusion3Pipeline is a transformer.*use --lora-format peft"):
        export_student(sd3, with_lora(sd3.model), tmp_path / "out", TRAINED, lora="kohya")
    with pytest.raises(UsageError, match=r"--lora-format 'ckpt' is not a LoRA layout; expected one of peft, kohya"):
        export_student(sd3, with_lora(sd3.model), tmp_path / "out", TRAINED, lora="ckpt")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sd3"]


def test_cli_lora_format_errors(tmp_path, capsys):
    """One-line usage errors, before a run or teacher is read (export) or before training (distill)."""
    sd3 = make_sd3_folder(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n")
    export = ["export", "--run", str(tmp_path / "no-run"), "--output", str(tmp_path / "out")]
    cases = [
        (export + ["--lora-format", "kohya"], "--lora-format kohya applies to a LoRA export; add --lora"),
        (export + ["--lora", "--lora-format", "ckpt"], "expected one of peft, kohya"),
        (["distill", "--teacher", str(sd3), "--method", "sid", "--prompts", str(tmp_path / "prompts.txt"),
          "--output", str(tmp_path / "run"), "--lora", "--lora-format", "kohya", "student.lora_rank=4"],
         "--lora-format kohya writes kohya-ss's UNet layout"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "Traceback" not in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["prompts.txt", "sd3"]  # refused before training


def test_model_cards_name_no_local_path(round_trip, tmp_path_factory):
    folders = round_trip[0]
    base = tmp_path_factory.getbasetemp()
    for name, folder in folders.items():
        card = (folder / "README.md").read_text()
        assert str(base) not in card and str(base.resolve()) not in card, name
        assert f'"{folder.name}"' in card  # the snippets name the export by its folder name
    card = (folders["sd-lora"] / "README.md").read_text()
    assert "Teacher: `sd` (a local folder)" in card
    assert '"sd", use_safetensors=True)  # the teacher: a local folder' in card


@pytest.mark.parametrize("readme, expected", [
    ("---\nlicense: openrail\nbase_model: runwayml/stable-diffusion-v1-5\ntags: [art]\n---\n# Teacher\n",
     {"license": "openrail", "base_model": "runwayml/stable-diffusion-v1-5"}),
    ("---\nlicense: [openrail\n---\n", {}),  # damaged front matter: ignored
    ("# Teacher\nlicense: openrail\n", {}),  # no front matter
    (b"\xff\xfe---", {}),  # not UTF-8
    (None, {}),  # no README.md
])
def test_card_takes_license_and_base_model_from_a_local_teacher_card(tmp_path, readme, expected):
    teacher_dir = make_ddpm_folder(tmp_path / "teacher")
    if isinstance(readme, str):
        (teacher_dir / "README.md").write_text(readme)
    elif readme is not None:
        (teacher_dir / "README.md").write_bytes(readme)
    teacher = load_teacher(teacher_dir)
    folder = export_student(teacher, teacher.model, tmp_path / "out", TRAINED)
    fields = front_matter((folder / "README.md").read_text())
    assert {key: fields[key] for key in ("license", "base_model") if key in fields} == expected
    meta = json.loads((folder / METADATA).read_text())
    assert (meta["license"], meta["base_model"]) == (expected.get("license"), expected.get("base_model"))


def test_card_of_a_hub_teacher_names_its_id(sd, tmp_path):
    """A teacher loaded from a hub id (here a local one renamed: nothing is downloaded) is the card's
    ``base_model`` and the teacher its LoRA snippet loads."""
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    teacher = dataclasses.replace(sd, source=hub_id)
    folder = export_student(teacher, with_lora(sd.model), tmp_path / "out", TRAINED, lora=True)
    card = (folder / "README.md").read_text()
    assert front_matter(card)["base_model"] == hub_id
    assert f'DiffusionPipeline.from_pretrained("{hub_id}", use_safetensors=True)\n' in card
    assert f"Teacher: `{hub_id}`." in card and "a local folder" not in card
