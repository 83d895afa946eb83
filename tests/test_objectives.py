"""Objectives on the analytic teacher: the targets are what they stand for, and training recovers known answers."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from tiny import MLPDenoiser

from fastgen.analytic import GaussianMixtureDenoiser
from fastgen.config import ConfigError
from fastgen.losses import OBJECTIVES, build_objective
from fastgen.losses.progressive import progressive_target
from fastgen.samplers import ddim_step, sample_ddim, sample_renoise
from fastgen.schedules import FlowSchedule, schedule_from_config


def vp():
    return schedule_from_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))


def mixture(schedule, means=((-2.0,), (2.0,)), std=0.5, weights=(0.7, 0.3)):
    return GaussianMixtureDenoiser(torch.tensor(means), std, torch.tensor(weights), schedule)


def batch(x0):
    return SimpleNamespace(x0=x0, cond=None, uncond=None, noise=None)


def train(objective, student, teacher, steps, lr, batch_size=512, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for step in range(steps):
        loss = objective.loss("generator", batch(teacher.sample(batch_size)), step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.on_step_end(step)


@pytest.mark.parametrize("schedule", [vp(), FlowSchedule(1000, shift=3.0)], ids=["vp", "flow"])
def test_progressive_target_is_the_two_step_teacher_jump(schedule):
    teacher = mixture(schedule)
    grid = schedule.timesteps(8)
    x_t = schedule.add_noise(teacher.sample(64), torch.randn(64, 1), grid[2])
    z_mid = ddim_step(schedule, x_t, teacher(x_t, grid[2]), grid[2], grid[3])
    z_s = ddim_step(schedule, z_mid, teacher(z_mid, grid[3]), grid[3], grid[4])
    target = progressive_target(schedule, x_t, z_s, grid[2], grid[4])
    # one DDIM step of the student with the target as its x0 lands exactly where two teacher steps land
    torch.testing.assert_close(ddim_step(schedule, x_t, target, grid[2], grid[4]), z_s, atol=1e-5, rtol=1e-5)
    # and the two-step jump differs from one teacher step, so the target is not the teacher's own x0
    assert (target - teacher(x_t, grid[2])).abs().max() > 1e-3


def test_progressive_rounds_halve_the_teacher_steps():
    """The oracle student's zero loss is tested in every family (tests/test_objectives_families.py)."""
    schedule = vp()
    objective = build_objective("progressive", mixture(schedule), MLPDenoiser(schedule),
                                {"start_steps": 8, "steps_per_round": 3}, num_steps=2)
    assert objective.num_rounds == 2 and objective.teacher_steps == 8
    assert objective.timesteps == schedule.timesteps(2).tolist()
    for step in range(3):
        objective.on_step_end(step)
    assert objective.round == 1 and objective.teacher_steps == 4


def test_progressive_student_matches_the_two_step_teacher():
    """One round 2 -> 1: the 1-step DDIM student reproduces the 2-step DDIM teacher's samples."""
    schedule = vp()
    teacher = mixture(schedule)
    student = MLPDenoiser(schedule)
    objective = build_objective("progressive", teacher, student, {"start_steps": 2, "steps_per_round": 1500},
                                num_steps=1)
    train(objective, student, teacher, 1500, 1e-3)
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1))
    two_step = sample_ddim(teacher, noise, schedule.timesteps(2))
    one_step = sample_ddim(student, noise, objective.timesteps)
    assert (one_step - two_step).abs().mean() < 0.05


def test_consistency_one_step_student_recovers_both_modes():
    """CD of a two-mode mixture into a 1-step student: weights within ±10 %, means within 0.1 std."""
    schedule = vp()
    teacher = mixture(schedule)
    student = MLPDenoiser(schedule)
    objective = build_objective("consistency", teacher, student, {"distance": "l2", "target_ema": 0.95})
    assert objective.timesteps == [999.0]
    train(objective, student, teacher, 2000, 1e-3)
    x = sample_renoise(objective.sampling_denoiser(), torch.randn(20000, 1, generator=torch.Generator().manual_seed(2)),
                       objective.timesteps)
    upper = x[:, 0] > 0
    assert abs(float(upper.float().mean()) - 0.3) < 0.03
    assert abs(float(x[~upper].mean()) + 2.0) < 0.1 * 0.5
    assert abs(float(x[upper].mean()) - 2.0) < 0.1 * 0.5


def test_consistency_target_network_tracks_the_student_by_ema():
    schedule = vp()
    teacher = mixture(schedule)
    student = MLPDenoiser(schedule)
    objective = build_objective("consistency", teacher, student, {"target_ema": 0.9, "solver": "heun"}, num_steps=4)
    assert objective.timesteps == [999.0, 759.0, 519.0, 279.0]
    export = objective.plan.export_config()
    assert export["boundary"] == {"sigma_data": 0.5, "timestep_scaling": 10.0}
    assert export["trained_timesteps"]["4"] == [999.0, 759.0, 519.0, 279.0]
    assert export["trained_timesteps"]["1"] == [999.0] and len(export["trained_timesteps"]["8"]) == 8
    before = [p.clone() for p in objective.target.inner.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    objective.on_step_end(0)
    for b, p, s in zip(before, objective.target.inner.parameters(), student.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * s)
    state = objective.state_dict()
    fresh = build_objective("consistency", teacher, MLPDenoiser(schedule), {"target_ema": 0.9}, num_steps=4)
    fresh.load_state_dict(state)
    for p, q in zip(fresh.target.inner.parameters(), objective.target.inner.parameters()):
        torch.testing.assert_close(p, q)
    out = objective.loss("generator", batch(teacher.sample(16)), 0)
    assert out["loss"].requires_grad and set(out) == {"loss", "mse"}


def test_objective_errors_name_the_field_and_expectation():
    schedule = vp()
    teacher, student = mixture(schedule), MLPDenoiser(schedule)
    assert set(OBJECTIVES) >= {"progressive", "consistency"}
    with pytest.raises(ValueError, match="method 'dmd3' is unknown; expected one of"):
        build_objective("dmd3", teacher, student)
    with pytest.raises(ConfigError, match="unknown config key 'objective.skp'; did you mean 'objective.skip'"):
        build_objective("consistency", teacher, student, {"skp": 10})
    with pytest.raises(ValueError, match="start_steps = 12 and student.num_steps = 4: expected"):
        build_objective("progressive", teacher, student, {"start_steps": 12, "steps_per_round": 5}, num_steps=4)
    with pytest.raises(ValueError, match="objective.solver is 'rk4'; expected 'ddim' or 'heun'"):
        build_objective("consistency", teacher, student, {"solver": "rk4"})
    with pytest.raises(ValueError, match="student.timesteps has 1 values; expected student.num_steps = 2"):
        build_objective("consistency", teacher, student, {}, num_steps=2, timesteps=[999])
    with pytest.raises(ValueError, match=r"objective.skip is 1000; expected 1 <= skip < 1000"):
        build_objective("consistency", mixture(FlowSchedule()), student, {"skip": 1000})
