"""The analytic Gaussian-mixture teacher: exact posterior mean, and ODE sampling that recovers the mixture."""

import pytest
import torch
from diffusers import DDPMScheduler

from fastgen.analytic import GaussianMixtureDenoiser
from fastgen.samplers import sample_ddim, sample_heun
from fastgen.schedules import EDMSchedule, FlowSchedule, schedule_from_config

MEANS = torch.tensor([[-2.0, 1.0], [2.0, -1.0], [0.5, 3.0]])
STDS = torch.tensor([[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


def vp_schedule():
    return schedule_from_config(DDPMScheduler(beta_schedule="linear"))


SCHEDULES = {"vp": vp_schedule, "flow": lambda: FlowSchedule(1000, shift=3.0), "edm": EDMSchedule}


@pytest.mark.parametrize("family", SCHEDULES)
def test_posterior_mean_matches_monte_carlo(family):
    schedule = SCHEDULES[family]()
    teacher = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = teacher.sample(400_000, generator=g).double()
    t = schedule.timesteps(10)[6]
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    queries = teacher.sample(4, generator=g).double() * a + s * torch.randn(4, 2, generator=g, dtype=torch.float64)
    exact = teacher(queries, t).double()
    for q, e in zip(queries, exact):
        log_w = -((q - a * x0) ** 2).sum(-1) / (2 * s**2)  # p(x_t | x0), self-normalised
        w = torch.softmax(log_w, 0)
        mc = (w[:, None] * x0).sum(0)
        ess = 1 / (w**2).sum()
        assert ess > 500, "the Monte-Carlo estimate needs enough effective samples"
        torch.testing.assert_close(e, mc, atol=0.05, rtol=0.0)


def test_class_conditioning_selects_component():
    teacher = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, vp_schedule())
    x_t = torch.zeros(3, 2)
    t = torch.tensor(999.0)
    x0 = teacher(x_t, t, {"class_labels": torch.tensor([0, 1, 2])})
    # at t = 999 (alpha ≈ 0.006) the conditional posterior mean is close to the component mean
    torch.testing.assert_close(x0, MEANS, atol=0.05, rtol=0)
    uncond = teacher(x_t, t, {"class_labels": torch.tensor([-1, -1, -1])})
    torch.testing.assert_close(uncond, teacher(x_t, t), atol=1e-6, rtol=0)
    guided = teacher.guided(x_t, t, {"class_labels": torch.tensor([0, 1, 2])},
                            {"class_labels": torch.tensor([-1, -1, -1])}, 3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (x0 - uncond))


@pytest.mark.parametrize("family", SCHEDULES)
def test_ode_solve_reproduces_the_mixture(family):
    schedule = SCHEDULES[family]()
    teacher = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule)
    g = torch.Generator().manual_seed(1)
    n = 6000
    timesteps = schedule.timesteps(200)
    x_T = schedule.add_noise(teacher.sample(n, generator=g), torch.randn(n, 2, generator=g), timesteps[0])
    x0 = sample_ddim(teacher, x_T, timesteps)
    labels = torch.cdist(x0, MEANS).argmin(1)
    for k in range(3):
        pts = x0[labels == k]
        assert abs(len(pts) / n - float(WEIGHTS[k])) < 0.03
        torch.testing.assert_close(pts.mean(0), MEANS[k], atol=0.05, rtol=0)
        torch.testing.assert_close(pts.std(0), STDS[k], atol=0.0, rtol=0.1)


def test_heun_is_second_order():
    schedule = EDMSchedule()
    teacher = GaussianMixtureDenoiser(MEANS, STDS, WEIGHTS, schedule)
    x_T = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = sample_heun(teacher, x_T, schedule.timesteps(2000))

    def err(sampler, n):
        return float((sampler(teacher, x_T, schedule.timesteps(n)) - reference).abs().mean())

    heun20, heun40, ddim20, ddim40 = err(sample_heun, 20), err(sample_heun, 40), err(sample_ddim, 20), err(sample_ddim, 40)
    assert heun40 / heun20 < 0.35, "Heun's error should fall about 4x when the steps double"
    assert ddim40 / ddim20 > 0.35, "Euler/DDIM's error should fall about 2x when the steps double"
    assert heun20 < 0.6 * ddim40, "at equal network calls (39 vs 40) Heun should be more accurate"


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="stds: expected positive values of shape"):
        GaussianMixtureDenoiser(MEANS, -STDS, WEIGHTS, vp_schedule())
    with pytest.raises(ValueError, match="weights: expected 3 non-negative values"):
        GaussianMixtureDenoiser(MEANS, STDS, [0.5, 0.5], vp_schedule())
