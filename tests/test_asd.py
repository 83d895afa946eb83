"""ASD: one DMD2 student trained over several step counts recovers the target at each; the discriminator
sees n-step outputs against (n+1)-step ones; export lists every trained count; first-frame enhancement."""

from __future__ import annotations

import pytest
import torch
from test_dmd import NO_GAN, Factory, robust_moments, train_dmd
from tiny import MLPDenoiser

from fastgen.analytic import GaussianMixtureDenoiser
from fastgen.losses import build_objective
from fastgen.losses.asd import enhance_first_frames
from fastgen.samplers.solvers import sample_renoise
from fastgen.schedules import FlowSchedule

DIM = 4
NO_ASD = {**NO_GAN, "asd_weight": 0, "asd_critic_weight": 0}


def test_one_asd_student_recovers_the_mixture_at_one_and_two_steps():
    """The analytic fakes have no features for a head, so this checks the step-count machinery (the DMD term
    on each count's grid); the adversarial term runs in the trainer test below."""
    schedule = FlowSchedule(1000)
    teacher = GaussianMixtureDenoiser(torch.tensor([[-2.0] * DIM, [2.0] * DIM]), 0.5, torch.tensor([0.3, 0.7]),
                                      schedule)
    torch.manual_seed(0)
    student, fake = MLPDenoiser(schedule, dim=DIM, hidden=64), MLPDenoiser(schedule, dim=DIM, hidden=64)
    objective = build_objective("asd", teacher, student, {**NO_ASD, "step_counts": [1, 2]},
                                factory=Factory(lambda: fake))
    assert objective.plan.export_config()["trained_timesteps"] == {"1": schedule.timesteps(1).tolist(),
                                                              "2": schedule.timesteps(2).tolist()}
    train_dmd(objective, student, fake, steps=3000)
    for k in (1, 2):
        with torch.no_grad():
            x = sample_renoise(student, torch.randn(10000, DIM), list(objective.plan.grids[k]))
        right = x.mean(1) > 0
        assert abs(right.float().mean().item() - 0.7) < 0.07, (k, right.float().mean())
        for mask, centre in ((~right, -2.0), (right, 2.0)):
            mean, var = robust_moments(x[mask])
            # weights and centres as the issue asks; the variance is not held: measured 0.72 for 0.25 on the minor
            # mode at one step (3000 steps, one student for both counts)
            assert abs(mean - centre) < 0.05, (k, centre, mean, var)


def test_first_frame_enhancement_replaces_the_leading_frames():
    x, more = torch.zeros(2, 6, 4, 4), torch.ones(2, 6, 4, 4)
    out = enhance_first_frames(x, more, num_frames=3, first_frames=1)
    assert out[:, :2].eq(1).all() and out[:, 2:].eq(0).all()
    with pytest.raises(ValueError, match="objective.num_frames"):
        enhance_first_frames(x, more, num_frames=4, first_frames=1)


def test_bad_asd_settings_name_the_key():
    schedule = FlowSchedule(1000)
    teacher = GaussianMixtureDenoiser(torch.zeros(1, DIM), 1.0, torch.ones(1), schedule)
    with pytest.raises(ValueError, match="objective.step_counts"):
        build_objective("asd", teacher, MLPDenoiser(schedule, DIM), {**NO_ASD, "step_counts": [2, 4]},
                        factory=Factory(lambda: teacher))



def test_asd_trains_one_student_for_several_step_counts_and_exports_them(tmp_path):
    import json

    from tiny import make_ddpm_folder

    from fastgen.config import DistillConfig, load_config
    from fastgen.generate import generate
    from fastgen.teacher import load_teacher
    from fastgen.trainer import Trainer

    folder = make_ddpm_folder(tmp_path / "ddpm", sample_size=8)
    config = load_config(DistillConfig, None, [
        f"teacher={folder}", "method=asd", f"output={tmp_path / 'run'}", "train.batch_size=2", "train.max_steps=4",
        "train.log_every=1", "objective.critic_every=2", "objective.step_counts=[1,2]",
        "objective.num_frames=3", "objective.first_frame_steps=1"])
    trainer = Trainer(config)
    head_before = [p.detach().clone() for p in trainer.objective.head.parameters()]
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r}
    assert {"generator/dm", "generator/asd", "critic/asd", "critic/fake"} <= keys
    assert all(torch.isfinite(torch.tensor(v)) for r in records for k, v in r.items() if "/" in k)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.objective.head.parameters()))
    export = trainer.export(tmp_path / "export")
    student = load_teacher(export)
    for k in (1, 2):
        assert torch.isfinite(generate(student, 2, k)).all()
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert set(scheduler["trained_timesteps"]) == {"1", "2"}
