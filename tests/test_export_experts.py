"""Exports of a student of experts (``ExpertsDenoiser``): one ``TimestepExperts`` model in the denoiser slot.

Students of two perturbed copies of tiny teachers (DDPM, EDM, SD, SDXL) and one trained by the Trainer
(``student.experts=2``, the ``experts_probe`` objective) are exported, loaded in fresh processes without fastgen
(``trust_remote_code=True``) and with ``fastgen.load_pipeline``, sampled at 1 and 2 steps (the 2 steps hitting
different experts) and compared with the in-process ``ExpertsDenoiser`` sampled by ``sample_renoise``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export import edm_folder, perturbed, v_prediction_ddpm_folder
from tiny import make_sd3_folder, make_sd_folder, make_sdxl_folder

from fastgen import export_student, load_teacher
from fastgen.denoiser import Denoiser
from fastgen.errors import UsageError
from fastgen.experts import ExpertsDenoiser
from fastgen.generate import generate
from fastgen.pipelines import TimestepExperts
from fastgen.pipelines.export import METADATA
from fastgen.samplers import sample_renoise

TRAINED = {1: [999], 2: [999, 499]}
BOUNDARIES = [749.0]  # the 2-step student's first step runs expert 0, its second expert 1
SIGMAS, SIGMA_BOUNDARIES = {1: [80.0], 2: [80.0, 2.0]}, [10.0]
PROMPT, SEED = "a red square", 0

LOADER = textwrap.dedent("""
    import sys
    if sys.argv[3] == "without":
        sys.modules["fastgen"] = None  # importing fastgen (or any of it) now raises ImportError
    import json, traceback
    import torch
    from safetensors.torch import save_file
    from diffusers import DiffusionPipeline

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    tensors, errors, report = {}, {}, {}
    for case in cases:
        name = case["name"]
        try:
            if sys.argv[3] == "with":
                import fastgen
                pipe = fastgen.load_pipeline(case["folder"])
            else:
                pipe = DiffusionPipeline.from_pretrained(case["folder"], use_safetensors=True, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            model = getattr(pipe, case["denoiser"])
            hits = []
            for k, expert in enumerate(model.experts):
                expert.register_forward_hook(lambda module, args, output, k=k: hits.append(k))
            report[name] = {"classes": [type(pipe).__name__, type(pipe.scheduler).__name__, type(model).__module__],
                            "hits": {}}
            for steps in case["steps"]:
                hits.clear()
                for output_type in ["pt", "latent"] if case.get("prompt") else ["pt"]:
                    kwargs = {"prompt": case["prompt"], "guidance_scale": 1.0} if case.get("prompt") else {}
                    images = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(case["seed"]),
                                  output_type=output_type, **kwargs).images
                    tensors[f"{name}/{steps}/{output_type}"] = torch.as_tensor(images).contiguous()
                report[name]["hits"][str(steps)] = hits[:steps]
        except Exception:
            errors[name] = traceback.format_exc()
    save_file(tensors, out + ".safetensors")
    open(out + ".json", "w").write(json.dumps({"errors": errors, "report": report}))
    if len(sys.argv) > 4:  # a README snippet, in this same process (one process start less)
        import contextlib, io
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(open(sys.argv[4]).read(), {})
        open(out + ".snippet.txt", "w").write(printed.getvalue())
""")


def run_loaders(cases, root: Path, snippet: str) -> dict:
    """Run ``LOADER`` in two fresh processes at once, one "without" fastgen (then ``snippet``), one "with" it;
    return each one's outputs, errors, report and what the snippet printed."""
    (root / "snippet.py").write_text(snippet)
    procs = {}
    for mode in ("without", "with"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / f"modules-{mode}")}
        extra = [str(root / "snippet.py")] if mode == "without" else []
        with (root / f"loader-{mode}.log").open("w") as log:  # files, not pipes: neither process can block
            procs[mode] = subprocess.Popen([sys.executable, "-c", LOADER, json.dumps(cases),
                                            str(root / f"loaded-{mode}"), mode, *extra], cwd=root, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
    loaded = {}
    for mode, proc in procs.items():
        proc.wait(timeout=300)
        assert proc.returncode == 0, (root / f"loader-{mode}.log").read_text()[-4000:]
        result = root / f"loaded-{mode}"
        report = json.loads(result.with_suffix(".json").read_text())
        printed = Path(f"{result}.snippet.txt").read_text() if mode == "without" else None
        loaded[mode] = load_file(f"{result}.safetensors"), report["errors"], report["report"], printed
    return loaded


def mixture(teacher, experts, boundaries) -> ExpertsDenoiser:
    return ExpertsDenoiser([Denoiser(model, teacher.schedule) for model in experts], boundaries)


def reference(teacher, student: ExpertsDenoiser, trained, steps: int, cond=None):
    """The in-process student, with the initial noise and the renoising noise the pipelines draw from
    ``Generator(SEED)``: ``(latent, image in [0, 1])``."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn((1, *teacher.sample_shape), generator=generator) * teacher.schedule.prior_scale(trained[steps][0])
    with torch.no_grad():
        latent = sample_renoise(student, x, trained[steps], cond, generator=generator)
        image = (teacher.decode(latent) / 2 + 0.5).clamp(0, 1)
    return latent, image


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-expert student of the tiny v-prediction DDPM trained 3 steps through the Trainer, exported by
    ``Trainer.export`` and by ``fastgen export --run``; its in-process EMA experts and boundaries."""
    from accelerate.state import AcceleratorState, GradientState
    from probes import register

    from fastgen.cli import main
    from fastgen.config import DistillConfig, load_config
    from fastgen.losses import OBJECTIVES
    from fastgen.trainer import Trainer

    root = tmp_path_factory.mktemp("experts-run")
    teacher_dir = v_prediction_ddpm_folder(root / "teacher")
    saved = dict(OBJECTIVES)
    register()
    try:
        config = load_config(DistillConfig, None, [
            f"teacher={teacher_dir}", "method=experts_probe", f"output={root / 'run'}", "seed=1", "train.batch_size=4",
            "train.lr=1e-2", "train.max_steps=3", "student.experts=2", "student.num_steps=2"])
        trainer = Trainer(config)
        trainer.fit()
        experts = [trainer.student_weights(True, name) for name in trainer.student_names]
        boundaries = list(trainer.student.boundaries)
        exported = trainer.export(root / "trainer-export")
        assert main(["export", "--run", str(root / "run"), "--output", str(root / "cli-export")]) == 0
    finally:
        OBJECTIVES.clear()
        OBJECTIVES.update(saved)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return load_teacher(teacher_dir), experts, boundaries, {"trainer": exported, "cli": root / "cli-export"}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, trained_run):
    """Every case exported, loaded without and with fastgen in fresh processes; the in-process references."""
    root = tmp_path_factory.mktemp("experts-export")
    cases, refs, students = [], {}, {}

    def add(name, teacher, experts, boundaries, trained, folder, cond=None, prompt=None):
        student = mixture(teacher, experts, boundaries)
        students[name] = (teacher, student, trained, folder, cond, prompt)
        steps = sorted(int(n) for n in trained)
        cases.append({"name": name, "folder": str(folder), "denoiser": teacher.denoiser_component, "seed": SEED,
                      "steps": steps, "prompt": prompt})
        for n in steps:
            refs[f"{name}/{n}"] = reference(teacher, student, trained, n, cond)

    ddpm = load_teacher(v_prediction_ddpm_folder(root / "ddpm"))
    experts = [perturbed(ddpm.model, seed=1), perturbed(ddpm.model, seed=2)]
    add("ddpm", ddpm, experts, BOUNDARIES, TRAINED,
        export_student(ddpm, experts, root / "ddpm-experts", TRAINED, expert_boundaries=BOUNDARIES))

    edm = load_teacher(edm_folder(root / "edm"))
    experts = [perturbed(edm.model, seed=1), perturbed(edm.model, seed=2)]
    add("edm", edm, experts, SIGMA_BOUNDARIES, SIGMAS,
        export_student(edm, experts, root / "edm-experts", SIGMAS, expert_boundaries=SIGMA_BOUNDARIES))

    for name, make in (("sd", make_sd_folder), ("sdxl", make_sdxl_folder)):
        teacher = load_teacher(make(root / name))
        experts = [perturbed(teacher.model, seed=1), perturbed(teacher.model, seed=2)]
        folder = export_student(teacher, experts, root / f"{name}-experts", TRAINED, expert_boundaries=BOUNDARIES)
        add(name, teacher, experts, BOUNDARIES, TRAINED, folder, teacher.encode_prompts([PROMPT]), PROMPT)

    teacher, experts, boundaries, folders = trained_run
    for way, folder in folders.items():
        add(f"trained-{way}", teacher, experts, boundaries, {2: [999.0, 499.0]}, folder)

    snippet = readme_experts_snippet().replace("students/dmd2-2step-experts", str(students["sd"][3]))
    return refs, students, run_loaders(cases, root, snippet)


NAMES = ["ddpm", "edm", "sd", "sdxl", "trained-trainer", "trained-cli"]
EXPECTED_CLASSES = {  # (pipeline, scheduler) diffusers alone builds; the denoiser is always TimestepExperts
    "ddpm": ["DDPMPipeline", "LCMScheduler"], "edm": ["FewStepPipeline", "FewStepScheduler"],
    "sd": ["StableDiffusionPipeline", "LCMScheduler"], "sdxl": ["StableDiffusionXLPipeline", "LCMScheduler"],
    "trained-trainer": ["DDPMPipeline", "LCMScheduler"], "trained-cli": ["DDPMPipeline", "LCMScheduler"],
}


@pytest.mark.parametrize("mode", ["without", "with"])
@pytest.mark.parametrize("name", NAMES)
def test_loaded_experts_reproduce_the_student(round_trip, mode, name):
    refs, students, loaded = round_trip
    outputs, errors, report, _ = loaded[mode]
    assert name not in errors, errors.get(name)
    classes = report[name]["classes"]
    if mode == "without":  # diffusers' own loaders and the folder's code
        assert classes[:2] == EXPECTED_CLASSES[name] and classes[2].endswith("modeling_experts")
    else:  # fastgen's installed classes, whatever the folder ships
        assert classes[1] == "FewStepScheduler" and classes[2] == "fastgen.pipelines.experts_model"
    _, _, trained, _, _, prompt = students[name]
    for steps in trained:
        assert report[name]["hits"][str(steps)] == list(range(steps))  # the 2-step student: expert 0, then 1
        ref_latent, ref_image = refs[f"{name}/{steps}"]
        torch.testing.assert_close(outputs[f"{name}/{steps}/pt"], ref_image, atol=1e-4, rtol=0)
        if prompt is not None:
            latent = outputs[f"{name}/{steps}/latent"]
            torch.testing.assert_close(latent, ref_latent, atol=1e-4 * max(1.0, ref_latent.abs().max().item()), rtol=0)


@pytest.mark.parametrize("name", ["ddpm", "edm", "sd", "trained-cli"])
def test_fastgen_sample_takes_an_experts_export(round_trip, name):
    """``load_teacher`` + ``generate`` (what ``fastgen sample`` and ``fastgen eval`` run): the teacher's denoiser
    is the ``TimestepExperts`` seen as one network."""
    refs, students, _ = round_trip
    teacher, _, trained, folder, cond, prompt = students[name]
    model = load_teacher(folder)
    assert isinstance(model.model, TimestepExperts) and model.model_class == teacher.model_class
    assert model.text_conditioned == teacher.text_conditioned and model.sample_shape == teacher.sample_shape
    for steps in trained:
        images = generate(model, 1, steps, seed=SEED, prompts=[prompt] if prompt else None)
        torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), refs[f"{name}/{steps}"][1], atol=1e-4, rtol=0)


def test_trainer_and_cli_exports_hold_each_experts_ema_weights(trained_run):
    _, experts, boundaries, folders = trained_run
    assert boundaries == [749.0]
    assert any(not torch.equal(a, b) for a, b in zip(experts[0].parameters(), experts[1].parameters()))
    weights = {way: load_file(folder / "unet" / "diffusion_pytorch_model.safetensors") for way, folder in folders.items()}
    for k, expert in enumerate(experts):
        for key, value in expert.state_dict().items():
            for way in folders:
                assert torch.equal(weights[way][f"experts.{k}.{key}"], value), (way, k, key)
    meta = json.loads((folders["cli"] / METADATA).read_text())
    assert meta["experts"] == {"count": 2, "boundaries": [749.0], "timestep_boundaries": [749.0],
                               "expert_class": "UNet2DModel", "layout": "timestep_experts"}
    assert meta["method"] == "experts_probe"


def test_a_phased_dmd_student_of_experts_exports(tmp_path):
    """Phased DMD records the experts' boundaries in its own export settings: ``Trainer.export`` and
    ``export_run`` take them, and the export samples as the trained experts (EMA weights) do."""
    from accelerate.state import AcceleratorState, GradientState

    from fastgen.config import DistillConfig, load_config
    from fastgen.trainer import Trainer, export_run

    folder = v_prediction_ddpm_folder(tmp_path / "ddpm")
    config = load_config(DistillConfig, None, [
        f"teacher={folder}", "method=phased_dmd", f"output={tmp_path / 'run'}", "train.batch_size=2",
        "train.max_steps=2", "train.ema_decay=0.9", "student.num_steps=2", "student.experts=2",
        "objective.critic_every=1"])
    try:
        trainer = Trainer(config)
        trainer.fit()
        experts = [trainer.student_weights(True, name) for name in trainer.student_names]
        folders = [trainer.export(tmp_path / "export"), export_run(tmp_path / "run", tmp_path / "export-run")]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    teacher = load_teacher(folder)
    _, expected = reference(teacher, mixture(teacher, experts, [749.0]), TRAINED, 2)
    for out in folders:
        assert json.loads((out / METADATA).read_text())["experts"]["boundaries"] == [749.0]
        images = generate(load_teacher(out), 1, 2, seed=SEED)
        torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), expected, atol=1e-4, rtol=0)


def test_layout_and_card(round_trip):
    _, students, _ = round_trip
    folder = students["sd"][3]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["modeling_experts", "TimestepExperts"] and index["scheduler"] == ["diffusers", "LCMScheduler"]
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["_class_name"] == "TimestepExperts" and config["expert_class"] == "UNet2DConditionModel"
    assert config["timestep_boundaries"] == [749.0] and "in_channels" not in config  # the experts' keys, nested
    from fastgen.pipelines.remote_code import denoiser_source

    assert (folder / "unet" / "modeling_experts.py").read_text() == denoiser_source("TimestepExperts")
    assert "import fastgen" not in denoiser_source("TimestepExperts")
    assert "from fastgen" not in denoiser_source("TimestepExperts")
    meta = json.loads((folder / METADATA).read_text())
    assert meta["remote_code"] == ["unet/modeling_experts.py"]
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "Student of 2 `UNet2DConditionModel` experts" in card


def test_edm_boundaries_are_in_the_networks_timestep_units(round_trip):
    """EDM networks see ``c_noise = log(sigma) / 4``: the exported boundary is the native one in those units."""
    _, students, _ = round_trip
    folder = students["edm"][3]
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["timestep_boundaries"] == [pytest.approx(float(torch.log(torch.tensor(10.0)) / 4))]
    assert json.loads((folder / METADATA).read_text())["experts"]["boundaries"] == [10.0]


def routing_times(schedule, boundary: float) -> torch.Tensor:
    """Times on both sides of and exactly at ``boundary``, within the schedule's range."""
    near = [boundary * 1.02, boundary, boundary * 0.98]
    return torch.tensor([schedule.t_max, *near, max(schedule.t_min, boundary * 0.1) * 1.001], dtype=torch.float32)


@pytest.mark.parametrize("name", ["ddpm", "edm", "sd", "sdxl", "sd3"])
def test_exported_wrapper_routes_each_sample_as_experts_denoiser(round_trip, tmp_path, name):
    """Every sample of a batch mixing times of both intervals goes to the expert ``ExpertsDenoiser`` picks, the
    exported wrapper seeing the times in the network's own units (native for VP/flow, ``c_noise`` for EDM)."""
    _, students, _ = round_trip
    if name == "sd3":
        teacher = load_teacher(make_sd3_folder(tmp_path / "sd3"))
        experts = [perturbed(teacher.model, seed=1), perturbed(teacher.model, seed=2)]
        folder = export_student(teacher, experts, tmp_path / "sd3-experts", TRAINED, expert_boundaries=BOUNDARIES)
        student, cond = mixture(teacher, experts, BOUNDARIES), teacher.encode_prompts([PROMPT])
    else:
        teacher, student, _, folder, cond, _ = students[name]
    component = teacher.denoiser_component
    wrapper = TimestepExperts.from_pretrained(folder, subfolder=component, use_safetensors=True)
    exported = Denoiser(wrapper, teacher.schedule)
    t = routing_times(teacher.schedule, student.boundaries[0])
    x = torch.randn(len(t), *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    batch_cond = _repeat(cond, len(t))
    with torch.no_grad():
        expected = student(x, t, batch_cond)
        torch.testing.assert_close(exported(x, t, batch_cond), expected, atol=1e-5, rtol=1e-5)
        each = torch.cat([student.experts[int(k)](x[i:i + 1], t[i:i + 1], _repeat(cond, 1))
                          for i, k in enumerate([0, 0, 1, 1, 1])])
    torch.testing.assert_close(expected, each, atol=1e-5, rtol=1e-5)  # both intervals are hit


def _repeat(cond, n: int):
    if cond is None:
        return None
    return {k: _repeat(v, n) if isinstance(v, dict) else v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def test_lora_export_of_experts_is_refused(round_trip, tmp_path):
    _, students, _ = round_trip
    teacher, student, *_ = students["sd"]
    experts = [e.model for e in student.experts]
    with pytest.raises(UsageError, match="LoRA export holds one adapter; this student has 2 experts.*lora=False"):
        export_student(teacher, experts, tmp_path / "out", TRAINED, lora=True, expert_boundaries=BOUNDARIES)
    with pytest.raises(ValueError, match=r"expert_boundaries is \[300.0, 700.0\] for 3 experts"):
        export_student(teacher, [*experts, experts[0]], tmp_path / "out", TRAINED, expert_boundaries=[300, 700])
    with pytest.raises(ValueError, match="a list of 2 networks; a student of experts needs expert_boundaries"):
        export_student(teacher, experts, tmp_path / "out", TRAINED)
    assert list(tmp_path.iterdir()) == []


def readme_experts_snippet() -> str:
    """README's "Loading a student" block for a student of experts."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Loading a student\n")[1].split("\n## ")[0]
    blocks = [block.split("```")[0] for block in section.split("```python\n")[1:]]
    (snippet,) = [block for block in blocks if "experts" in block]
    return snippet


def test_readme_experts_snippet_runs(round_trip):
    """README's snippet ran on the SD experts export in the loader's process where fastgen cannot be imported."""
    printed = round_trip[2]["without"][3]
    assert printed.strip() == "[749.0]"
