"""rCM (``fastgen.losses.rcm``): rCM's schedule of updates, the generator loss against sCM's loss plus an
independently computed DMD term, one- and two-step students of the analytic mixture, and the export (its grid
rule is sCM's, tested in test_scm)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from test_scm import (SCHEDULES, assert_export_replays_the_plan, assert_recovers_mixture, distill_config,
                      mixture_student, tiny_unet)
from tiny import make_ddpm_folder

from fastgen.denoiser import Denoiser
from fastgen.losses import build_objective
from fastgen.teacher import DenoiserTeacher


def pixel_objective(family="vp", **args):
    schedule = SCHEDULES[family]()
    teacher = Denoiser(tiny_unet(), schedule)
    student = Denoiser(copy.deepcopy(teacher.model).requires_grad_(True), schedule)
    return build_objective("rcm", DenoiserTeacher(teacher, (3, 8, 8)), student, args, num_steps=1, max_steps=50)


def batch(x0):
    return SimpleNamespace(x0=x0, cond=None, uncond=None, noise=None, size=x0.shape[0])


def test_phases_follow_rcms_schedule_of_updates():
    """sCM alone every step during the tangent warm-up (rCM's ``is_student_phase``), then sCM + DMD every
    ``critic_every``-th step and the fake score every step; the adaptive weighting trains with the student."""
    objective = pixel_objective(tangent_warmup_steps=3, critic_every=5, fake_lr=1e-6)
    phases = {p.name: p for p in objective.phases()}
    assert phases["consistency"].networks == ("student", "weighting") == phases["generator"].networks
    assert phases["critic"].networks == ("fake",) and phases["critic"].lr == 1e-6
    assert sorted(objective.networks()) == ["fake", "weighting"]
    runs = {name: [s for s in range(15) if p.runs_at(s)] for name, p in phases.items()}
    assert runs == {"consistency": [0, 1, 2], "generator": [3, 8, 13], "critic": list(range(3, 15))}


def test_a_run_that_ends_within_the_warm_up_is_told_its_dmd_term_never_trains(capsys):
    """``train.max_steps`` (50 here) at or below the tangent warm-up: the generator phase never starts, so the
    student would be sCM's alone; one warning says so, and none where the run goes past the warm-up."""
    pixel_objective(tangent_warmup_steps=50)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: rcm: train.max_steps = 50 ends within "
                                               "objective.tangent_warmup_steps = 50")
    pixel_objective(tangent_warmup_steps=49)
    assert "warning" not in capsys.readouterr().err


def test_generator_loss_is_scm_plus_the_weighted_per_sample_sum_of_the_dmd_term():
    """With the fake score moved off the teacher, the generator loss equals sCM's loss on the same draws plus
    ``dmd_weight`` times the mean over samples of ``sum grad²``, ``grad = (x0_fake - x0_teacher) /
    mean|x - x0_teacher|`` at ``x_tau = add_noise(x, eps, tau)``: DMD eq. 8 computed here by hand."""
    objective = pixel_objective(tangent_warmup_steps=0, dmd_weight=0.3)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for p in objective.nets["fake"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    x0 = 0.5 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    out = objective.loss("generator", batch(x0), 10)
    torch.manual_seed(7)
    scm = objective.scm_loss(batch(x0), 10)["loss"]
    schedule, t0 = objective.schedule, objective.timesteps[0]
    torch.randint(1, ())  # DMD's generate draws the step it trains (one of one)
    with torch.no_grad():
        z = torch.randn(4, 3, 8, 8) * schedule.prior_scale(t0)
        x = objective.student(z, torch.full((4,), t0))
        tau = objective.dmd.sample_t(4, (0.02, 0.98), "cpu")
        x_tau = schedule.add_noise(x, torch.randn_like(x), tau)
        real, fake = objective.teacher(x_tau, tau, None), objective.nets["fake"](x_tau, tau, None)
        grad = (fake - real) / (x - real).abs().mean((1, 2, 3), keepdim=True)
        dm = grad.square().sum((1, 2, 3)).mean()
    assert float(dm) > 1.0  # the term is there to be checked
    torch.testing.assert_close(out["dm"], dm, rtol=1e-4, atol=0)
    torch.testing.assert_close(out["loss"], scm + 0.3 * dm, rtol=1e-4, atol=0)


def test_at_initialisation_the_dmd_term_is_zero_and_the_gradient_is_scms():
    """A fake score that is still the teacher gives DMD's gradient exactly zero: rCM's update is sCM's."""
    objective = pixel_objective(tangent_warmup_steps=0)
    x0 = 0.5 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for loss in (lambda: objective.loss("generator", batch(x0), 5)["loss"], lambda: objective.scm_loss(batch(x0), 5)["loss"]):
        objective.student.zero_grad()
        torch.manual_seed(11)
        loss().backward()
        grads.append(torch.cat([p.grad.flatten() for p in objective.student.parameters()]))
    assert float(grads[1].abs().max()) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_one_and_two_step_students_recover_both_modes_of_a_mixture():
    """rCM on the mixture of ``test_scm.mixture_student`` (200 steps of sCM alone, then the generator and the fake
    score every step, DMD weight 0.05): at 1 and 2 steps the minor mode's weight within 0.07 and each mode's median
    within 0.1 (0.2 std of a mode). Measured: weights 0.318 / 0.321, medians -2.061 / +2.061 (1 step), -1.990 /
    +1.971 (2 steps); sCM alone on the same run: -2.021 / +2.028 and -1.991 / +1.958 (``test_scm``). The exact
    tangent: the mixture is a teacher in continuous time (with the default difference over 0.2 the 1-step major
    mode's median is 2.124)."""
    objective, student = mixture_student("rcm", {"tangent_warmup_steps": 200, "critic_every": 1, "dmd_weight": 0.05,
                                                 "jvp": "exact"})
    for n in (1, 2):
        assert_recovers_mixture(student, objective.plan.grids[n])


def test_the_trainer_distils_and_the_export_replays_one_and_two_steps(tmp_path):
    """``fastgen distill --method rcm`` on a tiny epsilon DDPM: step 0 is the warm-up's sCM, steps 1-3 train the fake
    score and step 1 the generator (critic_every 2); student, weighting and fake score all move; the export's
    ``FewStepScheduler`` replays sCM's capped grids ``[672]``, ``[672, s(1.1)]``."""
    from fastgen.trainer import Trainer

    folder = make_ddpm_folder(tmp_path / "ddpm", sample_size=8)
    trainer = Trainer(distill_config(folder, tmp_path / "run", "method=rcm", "train.max_steps=4",
                                     "objective.critic_every=2"))
    start = {name: [p.detach().clone() for p in trainer.run.nets[name].parameters()]
             for name in ("student", "weighting", "fake")}
    trainer.fit()
    for name, before in start.items():
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.run.nets[name].parameters())), name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ran = {r["step"]: sorted({k.split("/")[0] for k in r if "/" in k and k.split("/")[0] in
                              ("consistency", "generator", "critic")}) for r in records}
    assert ran == {1: ["consistency"], 2: ["critic", "generator"], 3: ["critic"], 4: ["critic", "generator"]}, ran
    assert trainer.plan.grids[1] == (672.0,) and trainer.plan.grids[2] == pytest.approx((672.0, 254.7245), abs=1e-3)
    assert_export_replays_the_plan(trainer, tmp_path / "export", "vp")


def test_config_errors_name_the_key_and_what_was_expected():
    """rCM's own keys and the DMD2 keys it passes on are checked when the config is built, by their names."""
    from fastgen.errors import UsageError
    from fastgen.losses import objective_config

    for args, message in (({"dmd_weight": -1.0}, r"objective\.dmd_weight is -1\.0; expected >= 0"),
                          ({"fake_lr": 0.0}, r"objective\.fake_lr is 0\.0; expected > 0 or null"),
                          ({"critic_every": 0}, r"objective\.critic_every is 0; expected >= 1"),
                          ({"t_range": [0.9, 0.1]}, r"objective\.t_range is \[0\.9, 0\.1\]; expected 0 <= low <= high")):
        with pytest.raises(UsageError, match=message):
            objective_config("rcm", args)
