"""Samplers against diffusers' own multistep solver, and the exported FewStepScheduler."""

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from fastgen.analytic import GaussianMixtureDenoiser
from fastgen.denoiser import BoundaryDenoiser
from fastgen.samplers import SAMPLERS, get_sampler, sample_ddim, sample_dpmpp_2m, sample_renoise
from fastgen.samplers.scheduler import FewStepScheduler
from fastgen.schedules import FlowSchedule, schedule_from_config

MEANS = torch.tensor([[-1.0, 0.5, 0.0, 1.0], [1.0, -0.5, 0.5, -1.0]]).reshape(2, 1, 2, 2)


def teacher(schedule=None, prediction="epsilon"):
    schedule = schedule or schedule_from_config(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                              prediction_type=prediction))
    return GaussianMixtureDenoiser(MEANS, 0.3, [0.6, 0.4], schedule)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers(prediction):
    den = teacher(prediction=prediction)
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type=prediction,
                                        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
                                        final_sigmas_type="zero", lower_order_final=True)
    sched.set_timesteps(12)
    timesteps = den.schedule.timesteps(12)
    assert sched.timesteps.tolist() == timesteps.long().tolist()
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(den.output(ref, t.float()), t, ref).prev_sample
    ours = sample_dpmpp_2m(den, x, timesteps)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_all_samplers_converge_to_the_same_ode_solution():
    den = teacher(FlowSchedule(1000, shift=2.0))
    x = torch.randn(128, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    reference = sample_ddim(den, x, den.schedule.timesteps(1000))
    for name in ("ddim", "heun", "dpmpp_2m"):
        out = get_sampler(name)(den, x, den.schedule.timesteps(100))
        assert (out - reference).abs().mean() < 0.01, name


def test_callback_and_renoise_determinism():
    den = teacher()
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    seen = []
    a = sample_renoise(den, x, [999, 499], generator=torch.Generator().manual_seed(3), callback=seen.append)
    b = sample_renoise(den, x, [999, 499], generator=torch.Generator().manual_seed(3))
    c = sample_renoise(den, x, [999, 499], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert [s["i"] for s in seen] == [0, 1] and torch.equal(seen[-1]["x"], a)
    torch.testing.assert_close(sample_renoise(den, x, [999]), den(x, 999.0))
    with pytest.raises(ValueError, match="sampler 'euler_a' is unknown; expected one of"):
        get_sampler("euler_a")
    assert set(SAMPLERS) == {"ddim", "heun", "dpmpp_2m", "renoise"}


@pytest.mark.parametrize("rule", ["renoise", "ddim"])
def test_few_step_scheduler_replays_the_student(tmp_path, rule):
    den = teacher()
    trained = {"1": [399], "4": [999, 749, 499, 249]}
    sched = FewStepScheduler(schedule=den.schedule.describe(), trained_timesteps=trained, rule=rule)
    sched.save_pretrained(tmp_path)
    sched = FewStepScheduler.from_pretrained(tmp_path)
    assert sched.config.trained_timesteps == trained and sched.config.rule == rule
    for n in (1, 4):
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == trained[str(n)]
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        x = torch.randn(16, 1, 2, 2, generator=g1)
        expected = SAMPLERS[rule](den, x.clone(), [float(t) for t in trained[str(n)]], generator=g1)
        torch.randn(16, 1, 2, 2, generator=g2)
        for t in sched.timesteps:
            x = sched.step(den.output(x, t), t, x, generator=g2).prev_sample
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"num_inference_steps=2: this student was trained for \[1, 4\] steps"):
        sched.set_timesteps(2)


def test_few_step_scheduler_drops_a_learned_variance_and_renoises_reproducibly_without_a_generator():
    """A learned-variance UNet (DDPMScheduler's variance_type learned_range) outputs twice the sample's channels:
    the step reads the first half, as DDPMScheduler does (the shipped scheduler failed on the shapes). A call whose
    pipeline passes no generator (SD3's, Flux's, Wan's) renoises the same for the same first latents."""
    den = teacher()
    sched = FewStepScheduler(schedule=den.schedule.describe(), trained_timesteps={"2": [999, 499]})
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(8))
    runs = []
    for variance in (False, True, True):
        torch.manual_seed(len(runs))  # the global RNG differs per run: it must not matter
        sched.set_timesteps(2)
        y = x.clone()
        for t in sched.timesteps:
            out = den.output(y, t)
            out = torch.cat([out, torch.full_like(out, 9.0)], 1) if variance else out
            y = sched.step(out, t, y).prev_sample
        runs.append(y)
    torch.testing.assert_close(runs[1], runs[0])
    torch.testing.assert_close(runs[2], runs[0])


def test_few_step_scheduler_applies_the_consistency_boundary():
    den = teacher()
    boundary = {"sigma_data": 0.5, "timestep_scaling": 10.0}
    sched = FewStepScheduler(schedule=den.schedule.describe(), trained_timesteps={"2": [999, 0]}, boundary=boundary)
    student = BoundaryDenoiser(den, **boundary)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    expected = sample_renoise(student, x.clone(), [999.0, 0.0], generator=torch.Generator().manual_seed(7))
    sched.set_timesteps(2)
    g = torch.Generator().manual_seed(7)
    for t in sched.timesteps:
        x = sched.step(den.output(x, t), t, x, generator=g).prev_sample
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    x_t = torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(student(x_t, 0.0), x_t)  # c_skip(0) = 1, c_out(0) = 0


def test_few_step_scheduler_errors():
    desc = teacher().schedule.describe()
    with pytest.raises(ValueError, match=r"trained_timesteps\['4'\] has 2 values, expected 4"):
        FewStepScheduler(schedule=desc, trained_timesteps={"4": [999, 499]})
    with pytest.raises(ValueError, match="FewStepScheduler.rule is 'sde'; expected one of"):
        FewStepScheduler(schedule=desc, trained_timesteps={"1": [999]}, rule="sde")
