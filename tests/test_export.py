"""Export round trips: a perturbed copy of a tiny teacher is exported, loaded in a fresh Python process with
diffusers' own loaders, sampled, and compared with the in-process student sampled by ``sample_renoise``."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from tiny import make_ddpm_folder, make_sd3_folder, make_sd_folder, make_sdxl_folder

from fastgen import FewStepPipeline, FewStepScheduler, export_student, load_teacher
from fastgen.denoiser import Denoiser
from fastgen.samplers import sample_renoise
from fastgen.schedules import EDMSchedule

TRAINED = {1: [999], 2: [999, 499]}
PROMPT = "a red square"
SEED, GLOBAL_SEED = 0, 1234
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

LOADER = textwrap.dedent("""
    import json, sys, traceback
    import torch
    from safetensors.torch import save_file
    from diffusers import DDPMPipeline, DiffusionPipeline
    # diffusers loads model_index.json's ["fastgen.samplers.scheduler", "FewStepScheduler"] only once imported
    from fastgen import FewStepPipeline, FewStepScheduler

    def load(case):
        if case["loader"] == "lora":
            scheduler = FewStepScheduler.from_pretrained(case["folder"], subfolder="scheduler")
            pipe = DiffusionPipeline.from_pretrained(case["teacher_folder"], scheduler=scheduler)
            pipe.load_lora_weights(case["folder"])
            return pipe
        loader = {"DiffusionPipeline": DiffusionPipeline, "DDPMPipeline": DDPMPipeline,
                  "FewStepPipeline": FewStepPipeline}[case["loader"]]
        return loader.from_pretrained(case["folder"], **{name: None for name in case.get("absent", [])})

    def run(pipe, case, steps, output_type):
        # the images and, where the pipeline exposes them, its final latents (before decoding and clamping)
        kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(case["seed"])}
        if case.get("prompt") is not None:
            kwargs.update(prompt=case["prompt"], guidance_scale=1.0)
        if case.get("class_labels") is not None:
            kwargs["class_labels"] = case["class_labels"]
        final = {}
        if case["loader"] == "FewStepPipeline":
            kwargs["callback_on_step_end"] = lambda pipe, i, t, tensors: final.update(tensors) or {}
        torch.manual_seed(case["global_seed"])  # SD3 renoises from the global RNG (no generator in step)
        return pipe(**kwargs, output_type=output_type).images, final.get("latents")

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    tensors, errors = {}, {}
    for case in cases:
        try:
            pipe = load(case)
            pipe.set_progress_bar_config(disable=True)
            for steps in (1, 2):
                key = f"{case['name']}/{steps}"
                tensors[key + "/image"], latent = run(pipe, case, steps, "pt")
                if case.get("prompt") is not None:
                    latent = run(pipe, case, steps, "latent")[0]
                if latent is not None:
                    tensors[key + "/latent"] = latent
        except Exception:
            errors[case["name"]] = traceback.format_exc()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out + ".safetensors")
    open(out + ".json", "w").write(json.dumps(errors))
""")


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


def reference(teacher, student, steps: int, cond=None, global_renoise: bool = False):
    """The in-process student: initial noise from ``Generator(SEED)`` as the pipelines draw it, then
    ``sample_renoise`` with the same generator (or with the global RNG's seed, for SD3)."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn((1, *teacher.sample_shape), generator=generator)
    if global_renoise:
        generator = torch.Generator().manual_seed(GLOBAL_SEED)
    with torch.no_grad():
        latent = sample_renoise(Denoiser(student, teacher.schedule), x, TRAINED[steps], cond, generator=generator)
        image = (teacher.decode(latent) / 2 + 0.5).clamp(0, 1)
    return latent, image


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Export every kind, load all of them in one fresh process; return the export folders, the
    in-process references, the loaded pipelines' outputs and the loader's errors by case."""
    root = tmp_path_factory.mktemp("export")
    cases, refs, folders = [], {}, {}

    def add(name, teacher, student, loader, folder, cond=None, **case):
        folders[name] = folder
        case.update(name=name, loader=loader, folder=str(folder), seed=SEED, global_seed=GLOBAL_SEED)
        cases.append(case)
        for steps in (1, 2):
            refs[f"{name}/{steps}"] = reference(teacher, student, steps, cond, case.get("global_renoise", False))

    ddpm = load_teacher(v_prediction_ddpm_folder(root / "ddpm"))
    student = perturbed(ddpm.model)
    out = export_student(ddpm, student, root / "ddpm-student", TRAINED)
    add("ddpm-fewstep", ddpm, student, "FewStepPipeline", out)
    add("ddpm-stock", ddpm, student, "DDPMPipeline", out)

    labelled = load_teacher(make_ddpm_folder(root / "ddpm-class", num_class_embeds=3))
    student = perturbed(labelled.model)
    out = export_student(labelled, student, root / "ddpm-class-student", TRAINED)
    add("ddpm-class", labelled, student, "FewStepPipeline", out, labelled.class_cond(torch.tensor([2])),
        class_labels=2)

    sd_dir = make_sd_folder(root / "sd")
    sd = load_teacher(sd_dir)
    cond = sd.encode_prompts([PROMPT])
    student = perturbed(sd.model)
    add("sd", sd, student, "DiffusionPipeline", export_student(sd, student, root / "sd-student", TRAINED), cond,
        prompt=PROMPT)
    student = with_lora(sd.model)
    out = export_student(sd, student, root / "sd-merged", TRAINED)
    add("sd-lora-merged", sd, student, "DiffusionPipeline", out, cond, prompt=PROMPT)
    out = export_student(sd, student, root / "sd-lora", TRAINED, lora=True)
    add("sd-lora", sd, student, "lora", out, cond, prompt=PROMPT, teacher_folder=str(sd_dir))

    sdxl = load_teacher(make_sdxl_folder(root / "sdxl"))
    student = perturbed(sdxl.model)
    out = export_student(sdxl, student, root / "sdxl-student", TRAINED)
    add("sdxl", sdxl, student, "DiffusionPipeline", out, sdxl.encode_prompts([PROMPT]), prompt=PROMPT)

    sd3 = load_teacher(make_sd3_folder(root / "sd3"))
    student = perturbed(sd3.model)
    out = export_student(sd3, student, root / "sd3-student", TRAINED)
    add("sd3", sd3, student, "DiffusionPipeline", out, sd3.encode_prompts([PROMPT]), prompt=PROMPT,
        absent=["text_encoder_3", "tokenizer_3"], global_renoise=True)

    result = root / "loaded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases), str(result)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(result.with_suffix(".json").read_text())
    return folders, refs, load_file(f"{result}.safetensors"), errors


@pytest.mark.parametrize("name", ["ddpm-fewstep", "ddpm-stock", "ddpm-class", "sd", "sd-lora-merged", "sd-lora",
                                  "sdxl", "sd3"])
@pytest.mark.parametrize("steps", [1, 2])
def test_loaded_pipeline_reproduces_student(round_trip, name, steps):
    _, refs, loaded, errors = round_trip
    assert name not in errors, errors.get(name)
    ref_latent, ref_image = refs[f"{name}/{steps}"]
    torch.testing.assert_close(loaded[f"{name}/{steps}/image"], ref_image, atol=1e-4, rtol=0)
    if f"{name}/{steps}/latent" in loaded:  # before clamping; epsilon x0 at t = 999 reaches hundreds
        latent = loaded[f"{name}/{steps}/latent"]
        torch.testing.assert_close(latent, ref_latent, atol=1e-4 * max(1.0, ref_latent.abs().max().item()), rtol=0)


def test_full_export_layout(round_trip):
    folders = round_trip[0]
    sd = folders["sd-lora-merged"]
    index = json.loads((sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["fastgen.samplers.scheduler", "FewStepScheduler"]
    scheduler = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["trained_timesteps"] == {"1": [999.0], "2": [999.0, 499.0]} and scheduler["rule"] == "renoise"
    assert not any("lora" in key for key in load_file(sd / "unet" / "diffusion_pytorch_model.safetensors"))
    assert json.loads((folders["ddpm-fewstep"] / "model_index.json").read_text())["_class_name"] == "FewStepPipeline"
    for folder in folders.values():
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        assert not [f for f in folder.parent.iterdir() if f.name.startswith(f".{folder.name}.")]


def test_lora_export_layout(round_trip):
    folder = round_trip[0]["sd-lora"]
    assert sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) == [
        "pytorch_lora_weights.safetensors", "scheduler/scheduler_config.json"]
    keys = load_file(folder / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    """A tiny DDPM teacher and a perturbed student."""
    teacher = load_teacher(make_ddpm_folder(tmp_path_factory.mktemp("pixel") / "teacher"))
    return teacher, perturbed(teacher.model)


def test_untrained_step_count_is_refused(pixel, tmp_path):
    folder = export_student(*pixel, tmp_path / "out", TRAINED)
    pipe = FewStepPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"num_inference_steps=3: this student was trained for \[1, 2\] steps"):
        pipe(num_inference_steps=3)


def test_few_step_pipeline_conventions(tmp_path):
    teacher = load_teacher(make_ddpm_folder(tmp_path / "teacher", num_class_embeds=3))
    pipe = FewStepPipeline.from_pretrained(export_student(teacher, teacher.model, tmp_path / "out", TRAINED))
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
    config = json.loads((empty / "scheduler" / "scheduler_config.json").read_text())
    assert config["trained_timesteps"] == {"4": [999.0, 749.0, 499.0, 249.0]}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty", "foreign"]


def test_failure_midway_leaves_nothing_behind(pixel, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(FewStepScheduler, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(*pixel, tmp_path / "new", TRAINED)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    previous = export_student(*pixel, tmp_path / "previous", TRAINED)
    before = sorted(str(f.relative_to(previous)) for f in previous.rglob("*"))
    monkeypatch.setattr(FewStepScheduler, "save_pretrained", fail)
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
    edm = dataclasses.replace(teacher, schedule=EDMSchedule())
    with pytest.raises(NotImplementedError, match="export of an EDM teacher"):
        export_student(edm, student, tmp_path / "out", TRAINED)
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
