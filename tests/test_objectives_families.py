"""Progressive and consistency distillation on every schedule family (VP, rectified flow with shift, EDM),
checked on the analytic teacher: targets are what they stand for, the boundary holds at each family's clean
end, the grids are the teacher's own (against diffusers' schedulers), and short runs recover known answers."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from tiny import MLPDenoiser
from torch import nn

from fastgen.analytic import GaussianMixtureDenoiser
from fastgen.denoiser import BaseDenoiser, BoundaryDenoiser, batch_times, boundary_coefficients
from fastgen.losses import build_objective
from fastgen.losses.progressive import progressive_target
from fastgen.samplers import ddim_step, sample_renoise
from fastgen.samplers.scheduler import FewStepScheduler
from fastgen.schedules import EDMSchedule, FlowSchedule, VPSchedule, expand_to, schedule_from_config

SCHEDULES = {
    "vp": lambda: schedule_from_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2")),
    "flow": lambda: FlowSchedule(1000, shift=3.0),
    "edm": EDMSchedule,
}
FAMILIES = sorted(SCHEDULES)


def mixture(schedule, means=((-2.0,), (2.0,)), std=0.5, weights=(0.7, 0.3)):
    return GaussianMixtureDenoiser(torch.tensor(means), std, torch.tensor(weights), schedule)


def batch(x0):
    return SimpleNamespace(x0=x0, cond=None, uncond=None, noise=None)


def grid_of(objective):
    """The consistency objective's training grid (``ConsistencyDistillation.grid`` is a staticmethod)."""
    return objective.grid(objective.schedule, objective.config)


class PreconditionedMLP(BaseDenoiser):
    """A small student with Karras et al.'s (2022, Table 1) preconditioning written for
    ``x_t = alpha x0 + sigma eps`` and data of std ``sigma_data``: with ``v = alpha² sigma_data² + sigma²``,
    ``x0 = (alpha sigma_data² / v) x_t + (sigma sigma_data / sqrt v) F(x_t / sqrt v, u)``, well scaled in
    every family (EDM's own form when ``alpha = 1``); the noise level enters as ``sin 3u, cos 3u`` of
    ``u ∈ [0, 1]``, the position of ``logsnr`` between the ends (clamped to ±20), as ``tiny.MLPDenoiser``'s."""

    def __init__(self, schedule, sigma_data: float = 2.0, hidden: int = 128):
        super().__init__()
        self.schedule, self.sigma_data = schedule, sigma_data
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        ends = schedule.logsnr(torch.tensor([schedule.t_min, schedule.t_max])).clamp(-20, 20)
        self.lam_clean, self.lam_noise = float(ends[0]), float(ends[1])

    def forward(self, x_t, t, cond=None):
        t = batch_times(t, x_t)
        a, s = expand_to(self.schedule.alpha(t), x_t), expand_to(self.schedule.sigma(t), x_t)
        v = a**2 * self.sigma_data**2 + s**2
        lam = expand_to(self.schedule.logsnr(t).clamp(-20, 20), x_t)
        u = (self.lam_clean - lam) / (self.lam_clean - self.lam_noise)
        features = torch.cat([x_t / v.sqrt(), torch.sin(3 * u), torch.cos(3 * u)], 1)
        return a * self.sigma_data**2 / v * x_t + s * self.sigma_data / v.sqrt() * self.net(features)


def train(objective, student, teacher, steps, lr, batch_size=256, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for step in range(steps):
        loss = objective.loss("generator", batch(teacher.sample(batch_size)), step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        objective.on_step_end(step)


@pytest.mark.parametrize("family", ["flow", "edm"])
def test_consistency_one_step_student_recovers_both_modes(family):
    """CD of a two-mode mixture into a 1-step student sampled from the top of the grid (flow: pure noise at
    t = 1000; EDM: N(0, 80²)): mode weights within ±0.03 and (flow) the modes' medians within 0.2 std. 18 grid points (Song et al.'s
    CIFAR-10 N) with the Heun teacher step, whose discretised ODE is within 0.02 of the exact one here."""
    schedule = SCHEDULES[family]()
    teacher = mixture(schedule)
    torch.manual_seed(0)  # the student's initial weights: the result must not depend on earlier tests
    student = MLPDenoiser(schedule) if family == "flow" else PreconditionedMLP(schedule)
    objective = build_objective("consistency", teacher, student,
                                {"distance": "l2", "target_ema": None, "solver": "heun", "grid_points": 18})
    grid = grid_of(objective)
    assert objective.timesteps == [float(grid[-1])] and grid[-1] == pytest.approx(schedule.t_max)
    train(objective, student, teacher, 800, 1e-3)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(2)) * schedule.prior_scale(schedule.t_max)
    x = sample_renoise(objective.sampling_denoiser(), noise, objective.timesteps)
    upper = x[:, 0] > 0
    assert abs(float(upper.float().mean()) - 0.3) < 0.03
    if family == "edm":  # 800 steps leave EDM's modes smeared (std ≈ 1 for 0.5): only the weights are held
        return
    # each mode's median (its mean, for a Gaussian) is robust to the samples a smooth 1-step map leaves
    # between the modes
    assert abs(float(x[~upper].median()) + 2.0) < 0.2 * 0.5
    assert abs(float(x[upper].median()) - 2.0) < 0.2 * 0.5


# -- progressive --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", [0, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_progressive_target_is_the_two_step_teacher_jump(family, first):
    """From the top of the grid (flow: alpha = 0) and from inside it, one DDIM step of the student with the
    target as its x0 lands where two DDIM (= Euler for flow and EDM) steps of the teacher land."""
    schedule = SCHEDULES[family]()
    teacher = mixture(schedule)
    grid = schedule.timesteps(8)
    t, mid, s = grid[first], grid[first + 1], grid[first + 2]
    z_t = schedule.add_noise(teacher.sample(64), torch.randn(64, 1), t)
    z_mid = ddim_step(schedule, z_t, teacher(z_t, t), t, mid)
    z_s = ddim_step(schedule, z_mid, teacher(z_mid, mid), mid, s)
    target = progressive_target(schedule, z_t, z_s, t, s)
    assert torch.isfinite(target).all()
    scale = 1 + float(z_s.abs().max())  # EDM's z_t has std sigma_max = 80
    torch.testing.assert_close(ddim_step(schedule, z_t, target, t, s), z_s, atol=1e-5 * scale, rtol=1e-5)
    assert (target - teacher(z_t, t)).abs().max() > 1e-3  # the two-step jump is not one teacher step


@pytest.mark.parametrize("family", FAMILIES)
def test_progressive_oracle_student_has_zero_loss_and_the_weight_stays_finite(family):
    schedule = SCHEDULES[family]()
    teacher = mixture(schedule)
    objective = build_objective("progressive", teacher, PreconditionedMLP(schedule),
                                {"start_steps": 8, "steps_per_round": 3}, num_steps=2)
    grid = schedule.timesteps(8)
    assert objective.timesteps == schedule.timesteps(2).tolist()

    def oracle(z_t, t):  # a student whose single DDIM step equals two teacher steps
        i = int((grid - t).abs().argmin())
        z_mid = ddim_step(schedule, z_t, teacher(z_t, t), t, grid[i + 1])
        x0_mid = teacher(z_mid, grid[i + 1])
        if i + 2 >= len(grid):
            return x0_mid
        z_s = ddim_step(schedule, z_mid, x0_mid, grid[i + 1], grid[i + 2])
        return progressive_target(schedule, z_t, z_s, t, grid[i + 2])

    real_student = objective.student
    objective.nets["student"] = lambda z_t, t, cond=None: torch.cat([oracle(z_t[i:i + 1], t[i:i + 1])
                                                                     for i in range(len(t))])
    torch.manual_seed(0)
    out = objective.loss("generator", batch(teacher.sample(64)), 0)
    assert float(out["mse"]) < 1e-10 * (1 + float(schedule.sigma(grid[0])) ** 2)
    objective.nets["student"] = real_student
    torch.manual_seed(0)
    out = objective.loss("generator", batch(teacher.sample(64)), 0)
    assert torch.isfinite(out["loss"]) and float(out["mse"]) > 1e-6
    # max(SNR, 1) (Salimans & Ho 2022, §4) is finite at both ends of every grid: 1 where alpha = 0 (flow's t = T)
    weight = schedule.logsnr(grid).exp().clamp(min=1.0)
    assert torch.isfinite(weight).all() and float(weight[0]) == pytest.approx(1.0, abs=1e-3)


# -- consistency: grids and boundary ------------------------------------------------------------------------
def consistency(schedule, config=None, num_steps=1):
    return build_objective("consistency", mixture(schedule), PreconditionedMLP(schedule), config, num_steps)


def test_consistency_grids_are_the_teachers_own():
    vp = SCHEDULES["vp"]()
    assert grid_of(consistency(vp)).tolist() == [0.0] + [20.0 * n - 1 for n in range(1, 51)]  # LCM's, below t_0 = 0

    # flow: every 20th point of FlowMatchEulerDiscreteScheduler's 1000-step grid, from the clean end
    flow = FlowSchedule(1000, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(1000)
    torch.testing.assert_close(grid_of(consistency(flow)),
                               torch.cat([torch.zeros(1), reference.timesteps.flip(0)[19::20]]))
    reference.set_timesteps(50)
    torch.testing.assert_close(grid_of(consistency(flow, {"grid_points": 50})),
                               torch.cat([torch.zeros(1), reference.timesteps.flip(0)]))

    # EDM: Song et al.'s Karras grid of N = 18 sigmas from sigma_min (the boundary itself) to sigma_max
    reference = EDMEulerScheduler(sigma_schedule="karras")
    reference.set_timesteps(18)
    edm = consistency(EDMSchedule(), {"grid_points": 18}, num_steps=2)
    grid = grid_of(edm)
    torch.testing.assert_close(grid, reference.sigmas[:-1].flip(0).float())
    assert len(grid) == 18 and grid[0] == edm.schedule.t_min
    assert edm.timesteps == [float(grid[-1]), float(grid[-9])]
    with pytest.raises(ValueError, match=r"student.num_steps is 4, but the consistency grid .* has 3 points"):
        consistency(EDMSchedule(), {"grid_points": 4}, num_steps=4)
    export = consistency(EDMSchedule(), {"grid_points": 4}).plan.export_config()
    assert sorted(export["trained_timesteps"]) == ["1", "2"]
    with pytest.raises(ValueError, match=r"objective.grid_points is 0; expected a number of points >= 1"):
        consistency(flow, {"grid_points": 0})
    with pytest.raises(ValueError, match=r"objective.grid_points is 2000: 2000 steps: expected 1 to 1000"):
        consistency(vp, {"grid_points": 2000})


@pytest.mark.parametrize("family", FAMILIES)
def test_consistency_pairs_are_adjacent_grid_points_down_to_the_boundary(family):
    """Every drawn pair is (t_n, t_{n-1}) of the grid; x_s is one teacher DDIM step from x_t; the target
    at s = t_0 is x_s itself."""
    schedule = SCHEDULES[family]()
    teacher = mixture(schedule)
    objective = build_objective("consistency", teacher, PreconditionedMLP(schedule), {"grid_points": 6})
    grid = grid_of(objective)
    real_online = objective.online
    real_student = objective.student
    calls = []

    class Spy(BaseDenoiser):  # the target network: records its input, answers as the online student
        schedule = real_student.schedule

        def forward(self, x, t, cond=None):
            calls.append((x.clone(), t.clone()))
            return real_online(x, t, cond)

    class StudentSpy(BaseDenoiser):  # the online student inside its boundary form: records its input
        schedule = real_student.schedule

        def forward(self, x, t, cond=None):
            calls.append((x.clone(), t.clone()))
            return real_student(x, t, cond)

    objective.target = Spy()
    objective.nets["student"] = StudentSpy()  # objective.online wraps nets["student"] on each call
    torch.manual_seed(0)
    x0 = teacher.sample(256)
    objective.loss("generator", batch(x0), 0)
    (x_s, s), (x_t, t) = calls
    index = torch.searchsorted(grid, t)
    assert torch.equal(grid[index], t) and bool((index >= 1).all()) and torch.equal(grid[index - 1], s)
    assert set(index.tolist()) == set(range(1, len(grid)))  # 256 draws visit every pair
    torch.testing.assert_close(x_s, ddim_step(schedule, x_t, teacher(x_t, t), t, s))
    at_boundary = s == schedule.t_min
    torch.testing.assert_close(real_online(x_s[at_boundary], s[at_boundary]), x_s[at_boundary])


@pytest.mark.parametrize("family", FAMILIES)
def test_boundary_is_one_and_zero_at_each_familys_clean_end(family):
    schedule = SCHEDULES[family]()
    c_skip, c_out = boundary_coefficients(torch.tensor(schedule.t_min), 0.5, 10.0, schedule.t_min)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    student = BoundaryDenoiser(PreconditionedMLP(schedule))
    x = torch.randn(8, 1)
    torch.testing.assert_close(student(x, schedule.t_min), x, atol=0, rtol=0)
    # far from the boundary f is the student's own x0
    top = float(schedule.timesteps(1)[0])
    torch.testing.assert_close(student(x, top), student.inner(x, top), atol=1e-4, rtol=1e-4)


def test_edm_boundary_with_unit_scaling_is_song_et_als_c_skip():
    """Song et al. 2023, Appendix C: c_skip = sigma_data² / ((sigma - sigma_min)² + sigma_data²)."""
    edm = consistency(EDMSchedule(), {"grid_points": 18, "timestep_scaling": 1.0})
    sigma = grid_of(edm)
    c_skip, c_out = boundary_coefficients(sigma, **edm.boundary, t_min=0.002)
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    # c_out multiplies an x0-prediction: 0 at sigma_min, increasing to 1 at sigma_max
    assert float(c_out[0]) == 0.0 and bool((c_out[1:] > c_out[:-1]).all()) and float(c_out[-1]) > 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_few_step_scheduler_replays_the_boundary_of_every_family(family, tmp_path):
    schedule = SCHEDULES[family]()
    if family == "vp":  # an x0 output: no eps round trip through alpha(999) ≈ 0 to blur the comparison
        schedule = VPSchedule(schedule.alphas_cumprod, "sample")
    teacher = mixture(schedule)
    objective = build_objective("consistency", teacher, PreconditionedMLP(schedule),
                                {"grid_points": 18, "timestep_scaling": 1.0}, num_steps=2)
    export = objective.plan.export_config()
    FewStepScheduler(schedule=schedule.describe(), trained_timesteps=export["trained_timesteps"],
                     rule=export["rule"], boundary=export["boundary"]).save_pretrained(tmp_path)
    sched = FewStepScheduler.from_pretrained(tmp_path)
    student = objective.sampling_denoiser()
    for timesteps in (objective.timesteps, [objective.timesteps[0], float(grid_of(objective)[1])]):
        noise = torch.randn(16, 1, generator=torch.Generator().manual_seed(1)) * schedule.prior_scale(timesteps[0])
        expected = sample_renoise(student, noise.clone(), timesteps, generator=torch.Generator().manual_seed(2))
        sched.set_timesteps(timesteps=timesteps)
        x, g = noise.clone(), torch.Generator().manual_seed(2)
        with torch.no_grad():
            for t_in, t in zip(sched.timesteps, sched.sigmas):  # what the network is fed; native times
                x = sched.step(student.inner.output(x, t), t_in, x, generator=g).prev_sample
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
