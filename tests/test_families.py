"""Teacher families of today (Flux.1, Wan 2.1, ...) end to end, as a user runs them: ``fastgen distill`` with
``--data teacher --prompts FILE`` on a tiny random pipeline, the export at the end of the run, then the export
loaded by stock diffusers in a process without fastgen, whose samples must equal the in-process student's.

The in-process reference draws its noise as the stock pipelines do: the initial latents from the call's generator
in the pipeline's latent layout, the renoise of a multistep student from that generator where the pipeline passes
it to ``scheduler.step`` (SANA), else from ``FewStepScheduler``'s own, seeded by the first step's latents
(``renoise_generator``), in the layout the scheduler sees: packed tokens for Flux (``fastgen.families.pack``), a
token per latent pixel for Flux.2 (``flatten``). The loader sets no global seed: one call seed gives one image.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from fastgen.denoiser import BoundaryDenoiser
from fastgen.families import flatten, pack, unflatten, unpack
from fastgen.samplers.scheduler import renoise_generator
from fastgen.samplers.solvers import renoise_step
from fastgen.teacher import load_teacher
from tiny import (make_flux2_klein_folder, make_flux_folder, make_qwen_image_folder, make_sana_folder, make_wan_folder,
                  make_z_image_folder)

SEED = 3
PROMPT = "a red cat"
BUILDERS = {"flux": make_flux_folder, "wan": make_wan_folder, "sana": make_sana_folder,
            "qwen-image": make_qwen_image_folder, "wan2.2": functools.partial(make_wan_folder, boundary_ratio=0.875), "z-image": make_z_image_folder,
            "flux2": make_flux2_klein_folder}
SIZES = {"flux": {}, "wan": {"height": 32, "width": 32, "num_frames": 5}, "sana": {},
         "qwen-image": {"height": 32, "width": 32}, "wan2.2": {"height": 32, "width": 32, "num_frames": 5}, "z-image": {}, "flux2": {}}
OVERRIDES = {"wan2.2": ["student.experts=2"]}
"""Wan 2.2: a student of two experts, one per transformer of the pipeline's own layout."""
"""Sample sizes of the runs (Flux: its VAE's 16 x 16; SANA: its transformer's; Wan: 32 x 32 pixels and 5 frames,
not the pipeline's 480 x 832 x 81; Qwen-Image: not its pipeline's 128 x VAE factor)."""
PIPELINES = {"flux": "FluxPipeline", "wan": "WanPipeline", "sana": "SanaPipeline", "qwen-image": "QwenImagePipeline",
             "wan2.2": "WanPipeline", "z-image": "ZImagePipeline", "flux2": "Flux2KleinPipeline"}
GUIDANCE_OFF = {"flux": {"guidance_scale": 3.5}, "wan": {"guidance_scale": 1.0},
                "sana": {"guidance_scale": 1.0, "use_resolution_binning": False}, "qwen-image": {},
                "wan2.2": {"guidance_scale": 1.0, "guidance_scale_2": 1.0}, "z-image": {"guidance_scale": 0.0},
                "flux2": {"guidance_scale": 1.0}}
"""How each pipeline runs a student as trained: Flux.1-dev at its embedded guidance (FluxPipeline's default 3.5),
no CFG elsewhere: guidance_scale 1 in the u + s (c - u) form (Wan, SANA, Wan 2.2's second expert too), 0 in Z-Image's
c + s (c - u) form, nothing for Qwen-Image (its true CFG needs a negative prompt); SANA's resolution binning would
resize a size off its bins."""
STEP_GENERATOR = {"sana"}
"""Pipelines that pass the call's generator to ``scheduler.step`` (the others renoise from the scheduler's own)."""

STEPS = {"dmd2": [2], "consistency": [1, 2], "dmd2-lora": [2]}
"""The step counts each method's export replays (a consistency student serves 1, 2, 4 and 8)."""

LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["fastgen"] = None  # importing fastgen (or any of it) now raises ImportError
    import torch
    from safetensors.torch import save_file
    from diffusers import DiffusionPipeline

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    tensors, classes = {}, {}
    for case in cases:
        if case.get("teacher"):  # a LoRA export: the adapter on the teacher, then the export's scheduler
            from diffusers.utils import get_class_from_dynamic_module

            pipe = DiffusionPipeline.from_pretrained(case["teacher"], use_safetensors=True)
            pipe.load_lora_weights(case["folder"])
            scheduler = get_class_from_dynamic_module(case["folder"] + "/scheduler", module_file="scheduling_few_step.py",
                                                      class_name="FewStepScheduler", trust_remote_code=True)
            pipe.scheduler = scheduler.from_pretrained(case["folder"], subfolder="scheduler")
        else:
            pipe = DiffusionPipeline.from_pretrained(case["folder"], use_safetensors=True, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        classes[case["name"]] = [type(pipe).__name__, type(pipe.scheduler).__name__]
        for steps in case["steps"]:
            result = pipe(prompt=case["prompt"], num_inference_steps=steps, output_type="pt",
                          generator=torch.Generator().manual_seed(case["seed"]), **case["call"])
            images = result.frames if hasattr(result, "frames") else result.images
            tensors[f"{case['name']}/{steps}"] = torch.as_tensor(images).contiguous()
    save_file(tensors, out + ".safetensors")
    open(out + ".json", "w").write(json.dumps(classes))
""")


def distill(tmp_path, teacher, method: str, family: str, prompts) -> "Path":
    """``fastgen distill`` of a 2-step student in a few steps (``dmd2-lora``: a LoRA student and fake score,
    exported as a LoRA); returns the run's export folder."""
    out = tmp_path / f"{family}-{method}"
    lora = ["student.lora_rank=4", "objective.fake_lora_rank=4", "--lora"] if method == "dmd2-lora" else []
    method = method.removesuffix("-lora")
    size = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES[family].items()]
    cmd = [sys.executable, "-m", "fastgen", "distill", "--teacher", str(teacher), "--method", method,
           "--data", "teacher", "--prompts", str(prompts), "--steps", "2", "--max-steps", "3", "--output", str(out),
           *size, "teacher_samples=4", "teacher_sample_steps=4", "train.batch_size=2", *OVERRIDES.get(family, []), *lora]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "export"


def reference(folder, steps: int, family: str) -> torch.Tensor:
    """The student of export ``folder`` sampled in process (fastgen's loader and denoiser), noise drawn as the
    stock pipeline draws it; images in [0, 1] in the pipeline's output layout."""
    model = load_teacher(folder)
    scheduler = model.pipeline.scheduler
    scheduler.set_timesteps(steps)
    times = scheduler.sigmas.tolist()
    denoiser = model.denoiser  # Wan 2.2: routes between its two transformers as WanPipeline does
    if scheduler.config.boundary:
        denoiser = BoundaryDenoiser(denoiser, **scheduler.config.boundary)
    cond = model.encode_prompts([PROMPT])
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn((1, *model.sample_shape), generator=generator)
    if family not in STEP_GENERATOR:
        layout = pack(x) if model.family.packed else flatten(x) if model.family.tokens else x
        generator = renoise_generator(layout)
    with torch.no_grad():
        for i, t in enumerate(times):
            x0 = denoiser(x, t, cond)
            if i + 1 == len(times):
                break
            if model.family.packed:
                noise = unpack(torch.randn(pack(x0).shape, generator=generator), x0.shape[-2], x0.shape[-1])
            elif model.family.tokens:
                noise = unflatten(torch.randn(flatten(x0).shape, generator=generator), x0.shape[-2], x0.shape[-1])
            else:
                noise = torch.randn(x0.shape, generator=generator)
            x = renoise_step(model.schedule, x0, times[i + 1], noise)
        images = (model.decode(x0) / 2 + 0.5).clamp(0, 1)
    return images.transpose(1, 2) if model.is_video else images  # video pipelines: (B, F, C, H, W)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """``(root, prompts file, {family: tiny teacher folder})``, built once for the module."""
    root = tmp_path_factory.mktemp("families")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\n")
    return root, prompts, {family: build(root / family) for family, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def exports(teachers):
    root, prompts, teachers = teachers
    runs = [(family, method) for method, families in RUNS.items() for family in families]
    with ThreadPoolExecutor(2) as pool:  # two runs at a time: one per core
        exported = pool.map(lambda run: distill(root, teachers[run[0]], run[1], run[0], prompts), runs)
        folders = dict(zip(runs, exported))
    cases = [{"name": f"{family}-{method}", "folder": str(folder), "prompt": PROMPT, "seed": SEED,
              "teacher": str(teachers[family]) if method.endswith("-lora") else None,
              "steps": STEPS[method],
              "call": json.loads((folder / "fastgen_export.json").read_text())["call"]}
             for (family, method), folder in folders.items()]
    result = root / "loaded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules")}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases), str(result)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folders, load_file(f"{result}.safetensors"), json.loads(result.with_suffix(".json").read_text())


CONSISTENCY = ["flux", "wan", "wan2.2", "z-image"]
"""Families also distilled by consistency (a student of 1, 2, 4 and 8 steps): packed, video, two experts, lists;
every family's dmd2 run above covers its inputs, time units and export (CI time: each run is a process)."""
LORA = ["flux"]
"""Families also distilled with a LoRA student, exported as a LoRA (``load_lora_weights`` on the teacher)."""
RUNS = {"dmd2": list(PIPELINES), "consistency": CONSISTENCY, "dmd2-lora": LORA}
CASES = [(family, method, steps) for method, families in RUNS.items() for family in families
         for steps in STEPS[method]]


@pytest.mark.parametrize("family,method,steps", CASES)
def test_export_loads_without_fastgen_and_replays_the_student(exports, family, method, steps):
    folders, outputs, classes = exports
    assert classes[f"{family}-{method}"] == [PIPELINES[family], "FewStepScheduler"]
    if method.endswith("-lora"):
        assert (folders[family, method] / "pytorch_lora_weights.safetensors").is_file()
    ours = reference(folders[family, method], steps, family)
    theirs = outputs[f"{family}-{method}/{steps}"]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_export_records_the_trained_size_call_and_sigmas(exports, family):
    """The export's metadata holds the trained size and the call that replays the student (the model card's
    snippet), its scheduler the trained (trailing) times; the stock pipeline's own grid (Flux passes ``sigmas``
    and ``mu``) does not move them."""
    folders, _, _ = exports
    folder = folders[family, "dmd2"]
    meta = json.loads((folder / "fastgen_export.json").read_text())
    model = load_teacher(folder)
    assert meta["size"] == model.size()
    if SIZES[family]:
        assert meta["size"] == SIZES[family]
    assert meta["call"] == {**meta["size"], **GUIDANCE_OFF[family]}
    card = (folder / "README.md").read_text()
    assert all(f"{key}={value!r}" in card for key, value in meta["call"].items())
    trained = meta["few_step_scheduler"]["trained_timesteps"]["2"]
    expected = model.schedule.few_step_grid(2).tolist()
    assert trained == pytest.approx(expected, abs=1e-3)
    assert trained[1] > 100  # a trailing grid, not the sampling grid's near-clean last point
    scheduler = model.pipeline.scheduler
    scheduler.set_timesteps(2, sigmas=[1.0, 0.5], mu=0.7)
    assert scheduler.sigmas.tolist() == pytest.approx(trained)


@pytest.mark.parametrize("method", ["dmd2", "consistency"])
def test_wan22_student_of_two_experts_exports_in_the_pipeline_layout(exports, method):
    """Wan 2.2: the two experts are ``transformer`` and ``transformer_2`` with ``boundary_ratio`` (no custom model
    code), each started from the teacher's transformer of its noise level."""
    folders, _, _ = exports
    folder = folders["wan2.2", method]
    index = json.loads((folder / "model_index.json").read_text())
    meta = json.loads((folder / "fastgen_export.json").read_text())
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["boundary_ratio"] == pytest.approx(meta["experts"]["boundaries"][0] / 1000)
    assert meta["experts"]["layout"] == "pipeline"
    assert not any("modeling_experts" in f for f in meta["remote_code"])


def test_wan22_teacher_routes_as_its_pipeline(tmp_path):
    """The teacher's denoiser sends ``t >= boundary_ratio T`` to ``transformer`` and the rest to ``transformer_2``,
    as ``WanPipeline`` does, and students of two experts start from the matching transformer."""
    from fastgen.assemble import build_students, run_plan
    from fastgen.config import DistillConfig, load_config
    from fastgen.denoiser import Denoiser

    teacher = load_teacher(BUILDERS["wan2.2"](tmp_path / "wan22"), height=32, width=32, num_frames=5)
    high, low = (Denoiser(m, teacher.schedule) for m in teacher.models)
    cond = teacher.encode_prompts([PROMPT])
    x = torch.randn((1, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t, expert in ((1000.0, high), (875.0, high), (874.99, low), (300.0, low)):
            torch.testing.assert_close(teacher(x, t, cond), expert(x, t, cond), rtol=0, atol=0)
        assert not torch.equal(high(x, 500.0, cond), low(x, 500.0, cond))
    config = load_config(DistillConfig, None, ["teacher=x", "method=dmd2", "student.experts=2", "student.num_steps=2"])
    nets = build_students(config, teacher.models, run_plan(config, teacher.schedule), teacher.schedule, "default")
    for k, source in enumerate(teacher.models):
        student = nets[f"student.{k}"].model
        assert all(torch.equal(a, b) for a, b in zip(student.parameters(), source.parameters()))


OTHER_METHODS = ["dmd", "sid", "sida", "sid_fewstep", "decoupled_dmd", "phased_dmd", "asd", "progressive",
                 "dmd2:objective.gan_features=teacher"]
"""Methods (``method:override`` adds a setting): DMD2's GAN head on the frozen teacher's features included."""


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_method_trains_and_exports_on_packed_and_video_latents(teachers, tmp_path, family, method):
    """The objectives never see a family: each trains 2 steps of a 2-step student on Flux's packed latents (and its
    embedded guidance) and on Wan's video latents, and exports (in process; the CLI path is the dmd2/consistency
    test above)."""
    from fastgen.config import DistillConfig, load_config
    from fastgen.trainer import Trainer

    root, prompts, folders = teachers
    method, *extra = method.split(":")
    size = [f"{k}={v}" for k, v in SIZES[family].items()]
    rounds = ["objective.start_steps=4", "objective.steps_per_round=1"] if method == "progressive" else []
    config = load_config(DistillConfig, None, [
        f"teacher={folders[family]}", f"method={method}", "data=teacher", f"prompts={prompts}",
        f"output={tmp_path / 'run'}", f"cache_dir={root / f'cache-{family}'}", "student.num_steps=2",
        "train.max_steps=2", "train.batch_size=2", "teacher_samples=4", "teacher_sample_steps=4", *size, *rounds, *extra])
    trainer = Trainer(config)
    trainer.fit()
    folder = trainer.export(tmp_path / "export")
    model = load_teacher(folder)
    assert model.sample_shape == load_teacher(folders[family], **SIZES[family]).sample_shape
    assert all(torch.isfinite(p).all() for p in model.model.parameters())


@pytest.mark.parametrize("family", ["flux", "flux2", "qwen-image", "sana", "z-image"])
def test_captioned_images_are_encoded_by_the_familys_vae_and_text_encoders(teachers, tmp_path, family):
    """Captioned images (a folder with metadata.jsonl) through each image family's own VAE normalisation (shift and
    scale, Flux.2's batch norm on patchified latents, Qwen-Image's 3D VAE with per-channel statistics, DC-AE) and
    text encoders: every sample is its image's latent with its own caption's condition."""
    from PIL import Image

    from fastgen.data import build_data, flatten_cond
    from fastgen.data.images import load_image

    _, _, folders = teachers
    teacher = load_teacher(folders[family], **({"height": 16, "width": 16} if family == "qwen-image" else {}))
    h, w = teacher.image_size
    captions = ["a red disc", "a blue square", "two green lines"]
    data = tmp_path / "captioned"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            Image.new("RGB", (w, h), (70 * i, 200 - 50 * i, 60 + 40 * i)).save(data / f"img{i}.png")
            f.write(json.dumps({"file_name": f"img{i}.png", "text": caption}) + "\n")
    batch = build_data(data, teacher, batch_size=3, seed=0, cache_dir=tmp_path / "cache").batch(0)
    latents = torch.cat([teacher.encode(load_image(data / f"img{i}.png", (h, w), 3)[None]) for i in range(3)])
    assert batch.x0.shape == (3, *teacher.sample_shape)
    for k, x0 in enumerate(batch.x0):
        i = int((latents - x0).flatten(1).abs().amax(1).argmin())
        torch.testing.assert_close(x0, latents[i], atol=1e-4, rtol=1e-4)
        ours = {key: value[k] for key, value in flatten_cond(batch.cond).items()}
        expected = {key: value[0] for key, value in flatten_cond(teacher.encode_prompts([captions[i]])).items()}
        assert ours.keys() == expected.keys()
        for key in ours:
            torch.testing.assert_close(ours[key].to(expected[key].dtype), expected[key], atol=1e-5, rtol=1e-5)
    decoded = teacher.decode(latents)
    assert decoded.shape == (3, 3, h, w) and decoded.abs().max() <= 1


def test_family_of_a_sharded_network_is_its_class_family():
    """FSDP2's ``fully_shard`` turns a network's class into an ``FSDP<class>`` subclass: the family is found
    through the class hierarchy."""
    from diffusers import WanTransformer3DModel

    from fastgen.families import FAMILIES, family_of

    sharded = type("FSDPWanTransformer3DModel", (WanTransformer3DModel,), {})
    model = sharded(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                    out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1)
    assert family_of(model) is FAMILIES["WanTransformer3DModel"]
    with pytest.raises(ValueError, match="not supported"):
        family_of(torch.nn.Linear(2, 2))


def test_wan22_export_runs_a_student_step_at_the_boundary_where_it_was_trained(teachers, tmp_path):
    """A student of two experts split at b with a step exactly at b trains that step on the second expert
    (``ExpertsDenoiser``: ``t <= b``); the exported ``boundary_ratio`` is one float32 step above ``b / T`` so that
    ``WanPipeline`` (``t >= boundary_ratio T``: ``transformer``) runs it on ``transformer_2`` too."""
    from diffusers import WanPipeline

    from fastgen.pipelines import export_student

    _, _, folders = teachers
    teacher = load_teacher(folders["wan2.2"], height=32, width=32, num_frames=5)
    out = export_student(teacher, list(teacher.models), tmp_path / "export", {2: [1000.0, 875.0]},
                         expert_boundaries=[875.0])
    pipe = WanPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    seen = {"transformer": [], "transformer_2": []}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"][0])), with_kwargs=True)
    pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0, guidance_scale_2=1.0, height=32, width=32,
         num_frames=5, output_type="latent")
    assert seen == {"transformer": [1000.0], "transformer_2": [875.0]}


def test_wan22_student_of_one_network_exports_a_call_its_pipeline_takes(teachers, tmp_path):
    """A one-network student of Wan 2.2 exports without ``transformer_2`` and ``boundary_ratio``; its recorded call
    (and the card's snippet) then has no ``guidance_scale_2``, which ``WanPipeline`` refuses without a boundary,
    and the snippet reads the video pipeline's ``.frames``."""
    from diffusers import WanPipeline

    from fastgen.pipelines import export_student

    _, _, folders = teachers
    teacher = load_teacher(folders["wan2.2"], height=32, width=32, num_frames=5)
    out = export_student(teacher, teacher.models[0], tmp_path / "export", {1: [1000.0]})
    meta = json.loads((out / "fastgen_export.json").read_text())
    assert meta["call"] == {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 1.0}
    card = (out / "README.md").read_text()
    assert ".frames[0]" in card and ".images[0]" not in card and "pipeline_tag: text-to-video" in card
    pipe = WanPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.boundary_ratio is None
    frames = pipe(prompt=PROMPT, num_inference_steps=1, output_type="latent", **meta["call"]).frames
    assert torch.isfinite(frames).all()


def test_image_data_for_a_video_teacher_is_one_line_before_the_run_folder(teachers, tmp_path, capsys):
    """A folder of images given to a video teacher is refused before anything is written (it failed deep in the
    network with a traceback, leaving a run folder that blocked the corrected command)."""
    from PIL import Image

    from fastgen.cli import main

    _, _, folders = teachers
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(folders["wan"]), "--method", "scm", "--data", str(images), "--output",
                 str(run), "--height", "32", "--width", "32", "--num-frames", "5", "train.max_steps=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: data {images} holds images") and "makes videos" in err[-1]
    assert "Traceback" not in "\n".join(err) and not run.exists()


def test_a_bf16_wan_teacher_denoises_outside_autocast(teachers):
    """diffusers keeps Wan's time embedder and ``scale_shift_table`` in float32 in a bf16 load, and the first of them
    is the network's first weight: the denoiser fed its input in float32 to a bf16 patch embedding, which failed as
    soon as the teacher ran without autocast (``--data teacher`` in bf16: its ODE pairs)."""
    _, _, folders = teachers
    teacher = load_teacher(folders["wan"], dtype=torch.bfloat16, height=32, width=32, num_frames=5)
    assert teacher.model.scale_shift_table.dtype == torch.float32 and teacher.denoiser.dtype == torch.bfloat16
    x = torch.randn(1, *teacher.sample_shape)
    cond = {"encoder_hidden_states": torch.randn(1, 4, teacher.model.config.text_dim, dtype=torch.bfloat16)}
    assert torch.isfinite(teacher.denoiser(x, torch.tensor([500.0]), cond)).all()
