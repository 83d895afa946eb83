"""MeanFlow (``fastgen.losses.meanflow``, ``fastgen.pipelines.meanflow_model``): the flow-time map against each
schedule family, the interval input on every network family (a fresh student is its teacher; the table's lookup),
its exact tangent against float64 central differences, the MeanFlow identity on the analytic teacher (the exact
average velocity, from the PF-ODE integrated numerically, has zero loss; a perturbed one does not), a one-step
student recovering a mixture, and an export that loads with and without fastgen and replays the student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from test_dmd import robust_moments
from test_jvp import _build
from tiny import make_ddpm_folder
from torch import nn

from fastgen.analytic import GaussianMixtureDenoiser
from fastgen.config import DistillConfig, load_config
from fastgen.denoiser import BaseDenoiser, Denoiser, batch_times
from fastgen.errors import UsageError
from fastgen.jvp import jvp
from fastgen.losses import build_objective
from fastgen.losses.meanflow import TAU_FLOOR, flow_to_teacher, flow_velocity, teacher_to_flow
from fastgen.pipelines.meanflow_model import DurationEmbedding, attach_duration, duration
from fastgen.samplers import sample_ddim
from fastgen.samplers.solvers import ddim_step
from fastgen.schedules import EDMSchedule, FlowSchedule, expand_to, schedule_from_config
from fastgen.teacher import DenoiserTeacher

SCHEDULES = {
    "vp": lambda: schedule_from_config(DDPMScheduler()),
    "vp-cosine-v": lambda: schedule_from_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2",
                                                              prediction_type="v_prediction")),
    "flow": lambda: FlowSchedule(1000, shift=3.0),
    "edm": EDMSchedule,
}
FAMILIES = sorted(SCHEDULES)
TAUS = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.95])


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_time_map_puts_flow_samples_on_the_teachers_marginal(family):
    """``x_s = k z_tau`` with ``(s, k) = flow_to_teacher(tau)``: ``alpha(s) = k (1 - tau)``, ``sigma(s) = k tau``, and
    ``teacher_to_flow`` inverts it."""
    schedule = SCHEDULES[family]()
    s, k = flow_to_teacher(schedule, TAUS)
    alpha, sigma = schedule.alpha_sigma(s)
    torch.testing.assert_close(alpha, k * (1 - TAUS), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sigma, k * TAUS, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(teacher_to_flow(schedule, s), TAUS, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "unet_cond", "sd3", "flux", "wan", "sana"])
def test_a_fresh_student_is_its_network_and_the_interval_then_moves_it(name):
    """``attach_duration`` on each network family: at the start the output is the network's at any interval; once
    the interval embedding is trained (here: randomised) the output depends on it, a call at a timestep of the table
    takes that entry's interval and any other timestep the interval 0."""
    model, x, s, cond, scale = _build(name)
    model.eval()
    key = "sample" if name.startswith("unet") else "hidden_states"

    def call(timestep):
        return model(**{key: x}, timestep=timestep, **cond, return_dict=False)[0]

    t = scale * s
    with torch.no_grad():
        plain = call(t)
        attach_duration(model, timesteps=[float(t[0]), 3.0], durations=[700.0, 25.0])
        with duration(model, torch.tensor([300.0, 900.0])):
            torch.testing.assert_close(call(t), plain, rtol=0, atol=0)
        for p in model.duration_embedding.mlp.linear_2.parameters():
            nn.init.normal_(p, std=0.5)
        with duration(model, torch.tensor([300.0, 900.0])):
            moved = call(t)
        assert (moved - plain).abs().max() > 1e-3
        with duration(model, torch.tensor([700.0, 0.0])):
            explicit = call(t)
        torch.testing.assert_close(call(t), explicit)  # t[0] is in the table (700), t[1] is not (0)


class TimeMLP(nn.Module):
    """A small network with diffusers' timestep embedding, the way attach_duration finds it: ``v(x, timestep)``."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.proj = Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(32, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, timestep):
        return self.out(self.inp(x) + self.time_embedding(self.proj(timestep).to(x.dtype)))


class MLPStudent(BaseDenoiser):
    """``x0 = alpha x - sigma v`` over ``TimeMLP`` (``.model``), with the interval input attached."""

    def __init__(self, schedule, dim: int, hidden: int = 64):
        super().__init__()
        self.schedule = schedule
        self.model = attach_duration(TimeMLP(dim, hidden))

    def forward(self, x_t, t, cond=None):
        t = batch_times(t, x_t)
        v = self.model(x_t, timestep=t)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return expand_to(alpha, x_t) * x_t - expand_to(sigma, x_t) * v


def test_exact_tangent_through_the_interval_equals_float64_central_differences():
    """The student's average velocity ``u(z, r, tau)`` along ``(v, 1)`` (``fastgen.jvp``, forward AD through the
    interval's hooks) equals the central difference in float64, with the interval embedding trained (randomised).
    diffusers' sinusoidal projections compute in float32 whatever the input's dtype, and their highest frequency is
    one radian per timestep (1,000 per unit of tau): the step is 1e-4 and the relative error of the whole tangent
    below 5e-3 (measured 8e-4)."""
    schedule = FlowSchedule(1000)
    torch.manual_seed(0)
    student = MLPStudent(schedule, dim=4).double()
    for p in student.model.duration_embedding.mlp.linear_2.parameters():
        nn.init.normal_(p, std=0.3)
    z, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    tau, r = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64), torch.tensor([0.1, 0.6, 0.2], dtype=torch.float64)

    def u(zz, tt):
        with duration(student.model, 1000 * (tt - r)):
            return flow_velocity(student, zz, tt, None)

    with torch.no_grad():
        _, exact = jvp(u, (z, tau), (v, torch.ones_like(tau)))
        h = 1e-4
        central = (u(z + h * v, tau + h) - u(z - h * v, tau - h)) / (2 * h)
    assert float((exact - central).norm() / central.norm()) < 5e-3


class ExactAverage(BaseDenoiser):
    """The exact MeanFlow student of an analytic teacher: ``u(z, r, tau) = (z - z_r) / (tau - r)``, ``z_r`` the
    teacher's PF-ODE (velocity ``flow_velocity``) integrated from ``tau`` to ``r`` by ``steps`` RK4 steps, read as
    the x0 ``z - tau u`` at the teacher's time; ``r`` comes from the interval the objective sets. ``scale`` != 1
    perturbs it."""

    def __init__(self, teacher, steps: int = 16, scale: float = 1.0):
        super().__init__()
        self.teacher, self.schedule, self.steps, self.scale = teacher, teacher.schedule, steps, scale
        self.model = nn.Module()
        self.model.duration_embedding = DurationEmbedding(8, 8)

    def forward(self, x_t, s, cond=None):
        tau = teacher_to_flow(self.schedule, batch_times(s, x_t))
        z = x_t / expand_to(flow_to_teacher(self.schedule, tau)[1], x_t)
        r = tau - self.model.duration_embedding.explicit / 1000
        gap = tau - r
        y, h = z, -gap / self.steps
        for i in range(self.steps):
            tt = tau + i * h
            k1 = flow_velocity(self.teacher, y, tt, None)
            k2 = flow_velocity(self.teacher, y + expand_to(h / 2, y) * k1, tt + h / 2, None)
            k3 = flow_velocity(self.teacher, y + expand_to(h / 2, y) * k2, tt + h / 2, None)
            k4 = flow_velocity(self.teacher, y + expand_to(h, y) * k3, tt + h, None)
            y = y + expand_to(h / 6, y) * (k1 + 2 * k2 + 2 * k3 + k4)
        u = torch.where(expand_to(gap, z) > 0, (z - y) / expand_to(gap.clamp(min=1e-12), z),
                        flow_velocity(self.teacher, z, tau, None))
        return z - expand_to(tau, z) * self.scale * u


def mixture_teacher(schedule, dim=4):
    means = torch.tensor([[-2.0] * dim, [2.0] * dim], dtype=torch.float64)
    return GaussianMixtureDenoiser(means, 0.5, torch.tensor([0.7, 0.3], dtype=torch.float64), schedule)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exact_average_velocity_has_zero_loss_and_a_perturbed_one_does_not(family):
    """The MeanFlow identity on the analytic mixture, every schedule family (float64, pairs with ``r < tau``): the
    objective's squared residual ``||u - sg(v - (tau - r) du/dtau)||²`` of the exact average velocity (16 RK4 steps
    of the exact PF-ODE) is below 1e-6 per sample, and that of the same student scaled by 1.02 is above 1e-3."""
    schedule = SCHEDULES[family]()
    teacher = DenoiserTeacher(mixture_teacher(schedule), (4,))
    torch.manual_seed(0)
    x0 = torch.tensor([[-2.0] * 4, [2.0] * 4], dtype=torch.float64)[torch.randint(0, 2, (16,))]
    x0 = x0 + 0.5 * torch.randn(16, 4, dtype=torch.float64)
    errors = {}
    for scale in (1.0, 1.02):
        objective = build_objective("meanflow", teacher, ExactAverage(teacher.model, scale=scale), {"r_neq_t": 1.0})
        objective.tau_bounds = (0.05, 0.95)  # inside every family's range, away from the velocity's 1/tau
        torch.manual_seed(1)
        with torch.autocast("cpu", enabled=False):
            errors[scale] = objective.meanflow_loss(SimpleNamespace(x0=x0, cond=None, uncond=None), 0)["error"]
    assert errors[1.0] < 1e-6 and errors[1.02] > 1e-3, errors


def mixture_student(steps=2000, dim=4):
    """MeanFlow's defaults distilling the flow mixture (weights 0.7 / 0.3 at ±2, std 0.5) into ``MLPStudent``, 64
    wide: ``steps`` steps of batch 64, Adam lr 1e-3 with cosine decay."""
    schedule = FlowSchedule(1000)
    means = torch.tensor([[-2.0] * dim, [2.0] * dim])
    teacher = GaussianMixtureDenoiser(means, 0.5, torch.tensor([0.7, 0.3]), schedule)
    torch.manual_seed(0)
    student = MLPStudent(schedule, dim)
    objective = build_objective("meanflow", DenoiserTeacher(teacher, (dim,)), student, max_steps=steps)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    labels = torch.distributions.Categorical(torch.tensor([0.7, 0.3]))
    for step in range(steps):
        x0 = means[labels.sample((64,))] + 0.5 * torch.randn(64, dim)
        optimizer.zero_grad()
        objective.meanflow_loss(SimpleNamespace(x0=x0, cond=None, uncond=None), step)["loss"].backward()
        optimizer.step()
        decay.step()
    return objective, student


def mixture_samples(student, grid, n=20000):
    """``n`` samples of ``student`` by DDIM steps on ``grid``, each step with its interval to the next."""
    tau = torch.cat([teacher_to_flow(student.schedule, torch.tensor(grid)), torch.zeros(1)])
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for i, t in enumerate(grid):
            with duration(student.model, 1000 * (tau[i] - tau[i + 1]).expand(n)):
                x = ddim_step(student.schedule, x, student(x, t), t, grid[i + 1] if i + 1 < len(grid) else None)
    return x


def test_one_and_two_step_students_recover_the_modes_of_a_mixture():
    """2,000 steps on the flow mixture (20,000 samples each). Two steps (``T``, ``T/2``): the minor mode's weight
    within 0.07 of 0.3 and each mode's median within 0.1 of ±2 (0.2 std). One step: weight within 0.12, medians
    within 0.8 — the teacher's own one step puts every sample at the mean, -0.8. Measured: 2 steps 0.343, -1.945 /
    +1.914; 1 step 0.332, -1.661 / +1.247 (its long interval learns slowest: 1,000 steps gave -1.83 / +1.45 at
    2 steps)."""
    objective, student = mixture_student()
    for grid, weight_tol, median_tol in (([1000.0, 500.0], 0.07, 0.1), ([1000.0], 0.12, 0.8)):
        x = mixture_samples(student, grid)
        right = x.mean(1) > 0
        weight = right.float().mean().item()
        assert abs(weight - 0.3) < weight_tol, (grid, weight)
        for mask, centre in ((~right, -2.0), (right, 2.0)):
            median = robust_moments(x[mask])[0]
            assert abs(median - centre) < median_tol, (grid, centre, median)


def test_the_grid_is_uniform_in_flow_time_from_the_first_time_on_every_family():
    """The first time is the teacher's last but for an epsilon student of a VP teacher, capped as sCM's where alpha
    = 0.1 (``fastgen.losses.scm.first_time``: 672 on linear betas); the rest uniform in flow time below it."""
    for family in FAMILIES:
        schedule = SCHEDULES[family]()
        for n in (1, 2, 4):
            grid = build_objective("meanflow", DenoiserTeacher(mixture_teacher(schedule), (4,)),
                                   MLPStudent(schedule, 4), num_steps=n).plan.timesteps
            tau = teacher_to_flow(schedule, torch.tensor(grid))
            top = teacher_to_flow(schedule, grid[0])
            assert grid[0] == (672.0 if family == "vp" else schedule.t_max)
            torch.testing.assert_close(tau, top * (1 - torch.arange(n) / n), rtol=1e-4, atol=1e-5)


def test_times_stay_in_the_trained_range_with_r_below_tau():
    schedule = schedule_from_config(DDPMScheduler())
    objective = build_objective("meanflow", DenoiserTeacher(mixture_teacher(schedule), (4,)), MLPStudent(schedule, 4),
                                {"r_neq_t": 0.25})
    torch.manual_seed(0)
    tau, r = objective.sample_times(20000, "cpu")
    lo, hi = objective.tau_bounds
    assert lo >= TAU_FLOOR and hi == pytest.approx(float(teacher_to_flow(schedule, 672)))  # the first time
    assert float(tau.min()) >= lo and float(tau.max()) <= hi and bool((r <= tau).all()) and float(r.min()) >= 0
    assert abs((r < tau).float().mean().item() - 0.25) < 0.02


def distill_config(teacher, output, *overrides):
    base = [f"teacher={teacher}", "method=meanflow", f"output={output}", "seed=3", "data=teacher", "teacher_samples=8",
            "teacher_sample_steps=2", "train.batch_size=4", "train.log_every=1", "train.lr=1e-3", "train.max_steps=2"]
    return load_config(DistillConfig, None, base + list(overrides))


LOADER = """
import sys
sys.modules["fastgen"] = None  # importing fastgen (or any of it) now raises ImportError
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], use_safetensors=True, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=2, num_inference_steps=int(sys.argv[2]), generator=torch.Generator().manual_seed(0),
              output_type="np").images
print(type(pipe.unet).__name__, repr(images.tolist()))
"""


@pytest.mark.parametrize("steps", [1, 2])
def test_an_export_loads_with_and_without_fastgen_and_replays_the_student(steps, tmp_path):
    """``fastgen distill --method meanflow`` on a tiny epsilon DDPM: the interval embedding trains, the export is a
    ``DDPMPipeline`` whose ``unet`` is a ``MeanFlowModel`` with the plan's table and whose scheduler replays the plan
    by DDIM steps (a stock one where one does); loaded without fastgen (``trust_remote_code=True``) and with it, its images
    equal ``sample_ddim`` of the trained student on the same noise."""
    from fastgen.pipelines import load_pipeline
    from fastgen.trainer import Trainer

    folder = make_ddpm_folder(tmp_path / "ddpm", sample_size=8)
    trainer = Trainer(distill_config(folder, tmp_path / "run", f"student.num_steps={steps}"))
    network = trainer.run.nets["student"].model
    before = [p.detach().clone() for p in network.duration_embedding.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, network.duration_embedding.parameters()))
    plan = trainer.plan
    schedule = trainer.teacher.schedule
    tau = torch.cat([teacher_to_flow(schedule, torch.tensor(plan.timesteps)), torch.zeros(1)])  # to the clean end
    out = trainer.export(tmp_path / "export")
    meta = json.loads((out / "fastgen_export.json").read_text())
    assert meta["meanflow"]["timesteps"] == pytest.approx(list(plan.timesteps))
    assert meta["meanflow"]["durations"] == pytest.approx((1000 * (tau[:-1] - tau[1:])).tolist(), rel=1e-5)
    assert "unet/modeling_meanflow.py" in meta["remote_code"] and meta["few_step_scheduler"]["rule"] == "ddim"

    student = Denoiser(trainer.student_weights(), schedule)
    noise = torch.randn((2, *trainer.teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (sample_ddim(student, noise, list(plan.timesteps)) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    pipe = load_pipeline(out)
    assert type(pipe.unet).__name__ == "MeanFlowModel"
    images = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    torch.testing.assert_close(torch.as_tensor(images), expected, rtol=1e-4, atol=1e-4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", LOADER, str(out), str(steps)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    name, values = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "MeanFlowModel"
    torch.testing.assert_close(torch.tensor(eval(values)), expected, rtol=1e-4, atol=1e-4)
    if steps == 1:  # an untrained count: one line, without diffusers' warning about the wrapped unet's class
        refused = subprocess.run([sys.executable, "-m", "fastgen", "sample", "--model", str(out), "--steps", "3",
                                  "--out", str(tmp_path / "x.png")], capture_output=True, text=True, env=env,
                                 timeout=300, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            f"error: 3 steps: the student in {out} was trained for [1] steps; expected one of those"]


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(UsageError, match=r"objective.r_neq_t is 1.5; expected a fraction in \[0, 1\]"):
        load_config(DistillConfig, None, ["teacher=toy", "method=meanflow", "objective.r_neq_t=1.5"])
    with pytest.raises(UsageError, match="objective.jvp is 'forward'"):
        load_config(DistillConfig, None, ["teacher=toy", "method=meanflow", "objective.jvp=forward"])


@pytest.mark.parametrize("preset", ["sd3_meanflow", "sd3_rcm"])
def test_the_sd3_presets_distil_and_export_a_tiny_sd3(preset, tmp_path):
    """``fastgen distill --config sd3_meanflow`` (and ``sd3_rcm``) on a tiny SD3 teacher, as shipped but for the tiny
    run's size, steps, precision and attention: exits 0 and exports a pipeline that ``fastgen.load_pipeline`` loads
    and samples; the MeanFlow student's transformer is a ``MeanFlowModel``."""
    from tiny import make_sd3_folder

    from fastgen.pipelines import load_pipeline

    teacher = make_sd3_folder(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    cmd = [sys.executable, "-m", "fastgen", "distill", "--config", preset, "--teacher", str(teacher), "--data",
           "teacher", "--prompts", str(prompts), "--output", str(tmp_path / "run"), "--max-steps", "2",
           "teacher_samples=2", "teacher_sample_steps=2", "train.batch_size=1", "train.mixed_precision=no",
           "train.attention=default", "train.gradient_checkpointing=false"]
    cmd += ["objective.tangent_warmup_steps=1"] if preset == "sd3_rcm" else []  # its DMD phases run in 2 steps
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(tmp_path / "run" / "export")
    assert (type(pipe.transformer).__name__ == "MeanFlowModel") == (preset == "sd3_meanflow")
    images = pipe(prompt="a red cat", num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
                  output_type="np").images
    assert images.shape[-1] == 3 and bool(np.isfinite(images).all())


def test_the_tangent_warmup_starts_from_the_teachers_velocity():
    """With ``tangent_warmup_steps`` the target is the teacher's velocity at step 0, which a fresh student (a copy of
    the teacher's UNet with the interval input) already gives: zero error on pairs with ``r < tau``; at the end of
    the warm-up the identity's term is whole and the same student is off."""
    import copy

    from test_jvp import _unet

    schedule = schedule_from_config(DDPMScheduler())
    torch.manual_seed(0)
    network = _unet().eval()
    teacher = DenoiserTeacher(Denoiser(network, schedule), (3, 8, 8))
    student = Denoiser(attach_duration(copy.deepcopy(network)), schedule)
    objective = build_objective("meanflow", teacher, student, {"r_neq_t": 1.0, "tangent_warmup_steps": 10})
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    batch = SimpleNamespace(x0=x0, cond=None, uncond=None)
    errors = []
    for step in (0, 10):
        torch.manual_seed(1)
        errors.append(float(objective.meanflow_loss(batch, step)["error"]))
    assert errors[0] < 1e-8 and errors[1] > 1e-3, errors


def test_the_table_matches_low_precision_timesteps_and_nothing_else():
    """Flux's and Qwen-Image's pipelines pass bf16 timesteps (999 rounds to 1000): they still find their entry; a
    float32 timestep between entries gets 0."""
    table = DurationEmbedding(8, 8, timesteps=[999.0, 500.0], durations=[499.0, 500.0])
    assert table.look_up(torch.tensor([999.0, 500.0], dtype=torch.bfloat16)).tolist() == [499.0, 500.0]
    assert table.look_up(torch.tensor([999.0, 990.0, 501.0, 250.0])).tolist() == [499.0, 0.0, 0.0, 0.0]
    flux = DurationEmbedding(8, 8, timesteps=[1.0, 0.5], durations=[500.0, 500.0])
    assert flux.look_up(torch.tensor([0.999], dtype=torch.bfloat16) * 1.0).tolist() == [500.0]


def test_what_meanflow_cannot_do_is_refused_on_one_line(tmp_path, capsys):
    """A student of experts, a teacher that is itself a MeanFlow export, and ``--lora`` (the interval embedding is
    new weights): one ``error:`` line each, before training."""
    from test_jvp import _unet

    from fastgen.assemble import make_student
    from fastgen.cli import main
    from fastgen.losses.meanflow import MeanFlow

    schedule = schedule_from_config(DDPMScheduler())
    plan = SimpleNamespace(experts=2, timesteps=[999.0])
    with pytest.raises(UsageError, match="student.experts is 2"):
        MeanFlow.student_network(_unet(), plan, schedule)
    config = load_config(DistillConfig, None, ["teacher=toy", "method=dmd"])
    with pytest.raises(UsageError, match="is a MeanFlow student"):
        make_student(attach_duration(_unet()), config, SimpleNamespace(experts=1, timesteps=[999.0]), schedule)
    code = main(["distill", "--config", "toy_meanflow", "--lora", "student.lora_rank=4", "--output",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "error: --lora exports a LoRA adapter alone, and method meanflow" in err
    assert not (tmp_path / "run").exists()
