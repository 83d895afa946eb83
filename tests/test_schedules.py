"""Noise schedules against diffusers' own schedulers."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)

from fastgen.samplers import ddim_step
from fastgen.schedules import (
    EDMSchedule,
    FlowSchedule,
    VPSchedule,
    schedule_from_config,
    schedule_from_description,
)

VP_CLASSES = [DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, LCMScheduler]


def _vp(prediction="epsilon", beta_schedule="scaled_linear"):
    sched = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction, set_alpha_to_one=False, clip_sample=False)
    return sched, schedule_from_config(sched)


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_vp_add_noise_matches_diffusers(cls):
    sched = cls(beta_schedule="squaredcos_cap_v2")
    schedule = schedule_from_config(sched)
    assert isinstance(schedule, VPSchedule)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ref = DDPMScheduler.from_config(sched.config).add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.add_noise(x0, eps, t.float()), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_matches_diffusers(prediction):
    sched, schedule = _vp(prediction)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x_t, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, s = int(sched.timesteps[3]), int(sched.timesteps[4])
    ref = sched.step(out, t, x_t).prev_sample
    x0 = schedule.to_x0(out, x_t, float(t))
    ours = ddim_step(schedule, x_t, x0, float(t), float(s))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, sched.step(out, t, x_t).pred_original_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_matches_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = schedule_from_config(sched)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == shift
    sched.set_timesteps(8)
    torch.testing.assert_close(schedule.timesteps(8), sched.timesteps, atol=1e-3, rtol=1e-5)
    g = torch.Generator().manual_seed(2)
    x_t, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 3, 7):
        sched._step_index = i
        ref = sched.step(v, sched.timesteps[i], x_t).prev_sample
        t = sched.timesteps[i]
        s = sched.timesteps[i + 1] if i + 1 < 8 else None
        ours = ddim_step(schedule, x_t, schedule.to_x0(v, x_t, t), t, s)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_flow_add_noise_matches_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = schedule_from_config(sched)
    sched.set_timesteps(5)
    x0, eps = torch.randn(5, 4, 4, 4), torch.randn(5, 4, 4, 4)
    ref = torch.stack([sched.scale_noise(x0[i:i + 1], sched.timesteps[i:i + 1], eps[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(schedule.add_noise(x0, eps, sched.timesteps), ref, atol=1e-5, rtol=1e-5)


def test_edm_matches_diffusers_preconditioning():
    sched = EDMEulerScheduler()
    schedule = schedule_from_config(sched)
    assert isinstance(schedule, EDMSchedule)
    sigma = torch.tensor([0.01, 1.0, 40.0])
    x_t, out = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    x_in, t_in = schedule.model_input(x_t, sigma)
    torch.testing.assert_close(x_in, torch.stack([sched.precondition_inputs(x_t[i], sigma[i]) for i in range(3)]))
    torch.testing.assert_close(t_in, sched.precondition_noise(sigma))
    ref = torch.stack([sched.precondition_outputs(x_t[i], out[i], sigma[i]) for i in range(3)])
    torch.testing.assert_close(schedule.to_x0(out, x_t, sigma), ref)
    sched.set_timesteps(6)
    torch.testing.assert_close(schedule.timesteps(6), sched.sigmas[:-1], atol=1e-4, rtol=1e-5)


SCHEDULES = {
    "vp-eps": lambda: _vp("epsilon")[1],
    "vp-v": lambda: _vp("v_prediction")[1],
    "vp-x0": lambda: _vp("sample")[1],
    "flow": lambda: FlowSchedule(1000, shift=3.0),
    "edm-eps": lambda: EDMSchedule(),
    "edm-v": lambda: EDMSchedule(prediction_type="v_prediction"),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_conversions_round_trip(name):
    schedule = SCHEDULES[name]()
    g = torch.Generator().manual_seed(3)
    t = schedule.sample_t(16, generator=g).clamp(min=schedule.t_min + 1e-2 * (schedule.t_max - schedule.t_min))
    x0, eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    out = schedule.from_x0(x0, x_t, t)
    torch.testing.assert_close(schedule.to_x0(out, x_t, t), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(schedule.to_eps(out, x_t, t), eps, atol=1e-5, rtol=1e-5)
    assert ((t >= schedule.t_min) & (t <= schedule.t_max)).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_logsnr_inverse(name):
    schedule = SCHEDULES[name]()
    ts = schedule.timesteps(20)
    lam = schedule.logsnr(ts)
    assert bool((lam[1:] > lam[:-1]).all()), "logSNR must increase as t decreases"
    torch.testing.assert_close(schedule.t_from_logsnr(lam), ts, atol=1e-3 * schedule.t_max, rtol=1e-4)


def test_vp_trailing_timesteps_and_interpolation():
    _, schedule = _vp()
    assert schedule.timesteps(4).tolist() == [999, 749, 499, 249]
    assert schedule.timesteps(1).tolist() == [999]
    a_bar = schedule.alphas_cumprod
    mid = schedule.alpha(torch.tensor(10.5)) ** 2
    assert float(a_bar[11]) < float(mid) < float(a_bar[10])
    assert math.isclose(float(mid), math.sqrt(float(a_bar[10] * a_bar[11])), rel_tol=1e-5)


def test_transition_matches_direct_noising_in_distribution():
    _, schedule = _vp()
    g = torch.Generator().manual_seed(4)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x_s = schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), 300.0)
    x_t = schedule.transition(x_s, torch.randn(x0.shape, generator=g, dtype=torch.float64), 300.0, 700.0)
    a, s = float(schedule.alpha(700.0)), float(schedule.sigma(700.0))
    assert abs(float(x_t.mean()) - 0.7 * a) < 5e-3
    assert abs(float(x_t.std()) - s) < 5e-3


def test_describe_round_trip():
    for make in SCHEDULES.values():
        schedule = make()
        again = schedule_from_description(schedule.describe())
        t = schedule.timesteps(5)
        torch.testing.assert_close(again.alpha(t), schedule.alpha(t))
        torch.testing.assert_close(again.sigma(t), schedule.sigma(t))
        assert again.prediction_type == schedule.prediction_type


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="prediction_type 'flow' is not supported by the vp schedule"):
        VPSchedule(torch.linspace(0.99, 0.01, 10), "flow")
    cfg = dict(DDIMScheduler().config, prediction_type="velocity")
    with pytest.raises(ValueError, match=r"DDIMScheduler.prediction_type is 'velocity'; expected one of"):
        schedule_from_config(cfg, "DDIMScheduler")
    with pytest.raises(ValueError, match="scheduler config has no `_class_name`"):
        schedule_from_config({"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="scheduler class 'MyScheduler' is not a known noise-schedule family"):
        schedule_from_config({"_class_name": "MyScheduler"})
    with pytest.raises(ValueError, match=r"range \[0.0, 2000.0\] is not inside"):
        _vp()[1].sample_t(4, t_max=2000)
    with pytest.raises(ValueError, match="shift: expected a positive number"):
        FlowSchedule(shift=0)


def test_prior_scale_is_the_starting_noise_level():
    from fastgen.samplers.scheduler import FewStepScheduler

    edm, vp, flow = EDMSchedule(), _vp()[1], FlowSchedule()
    assert edm.prior_scale(edm.timesteps(4)[0]) == pytest.approx(80.0)
    assert vp.prior_scale(999.0) == 1.0 and flow.prior_scale(1000.0) == 1.0
    sched = FewStepScheduler(schedule=edm.describe(), trained_timesteps={"1": [10.0]})
    sched.set_timesteps(1)
    assert sched.init_noise_sigma == pytest.approx(10.0)


# -- alpha_sigma: one pass, against diffusers, cached tables, no host sync, differentiable -----------


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_sigma_is_alpha_and_sigma(name):
    schedule = SCHEDULES[name]()
    t = torch.cat([schedule.timesteps(7), schedule.sample_t(5, generator=torch.Generator().manual_seed(5))])
    a, s = schedule.alpha_sigma(t)
    assert a.shape == s.shape == t.shape and a.dtype == s.dtype == torch.float32
    assert torch.equal(a, schedule.alpha(t)) and torch.equal(s, schedule.sigma(t))
    a0, s0 = schedule.alpha_sigma(float(t[0]))  # python floats are accepted too
    assert a0.shape == () and torch.equal(a0, a[0]) and torch.equal(s0, s[0])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_alpha_sigma_matches_diffusers(prediction):
    sched, schedule = _vp(prediction)
    ac = sched.alphas_cumprod
    t = torch.arange(1000.0)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(a, ac.sqrt(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s, (1 - ac).sqrt(), atol=1e-6, rtol=1e-5)
    # and through the model output of this prediction type: x_t, the target, x0 (DDPMScheduler's own
    # add_noise / get_velocity / step)
    ddpm = DDPMScheduler.from_config(sched.config)
    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    ti = torch.tensor([0, 250, 749, 999])
    x_t = schedule.add_noise(x0, eps, ti.float())
    torch.testing.assert_close(x_t, ddpm.add_noise(x0, eps, ti), atol=1e-5, rtol=1e-5)
    target = eps if prediction == "epsilon" else ddpm.get_velocity(x0, eps, ti)
    torch.testing.assert_close(schedule.from_x0(x0, x_t, ti.float()), target, atol=1e-4, rtol=1e-4)
    for i in range(4):
        ref = ddpm.step(target[i:i + 1], int(ti[i]), x_t[i:i + 1]).pred_original_sample
        torch.testing.assert_close(schedule.to_x0(target[i:i + 1], x_t[i:i + 1], ti[i].float()), ref,
                                   atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.to_eps(target, x_t, ti.float()), eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_alpha_sigma_matches_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = schedule_from_config(sched)
    sched.set_timesteps(10)
    a, s = schedule.alpha_sigma(sched.timesteps)
    torch.testing.assert_close(s, sched.sigmas[:-1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a, 1 - sched.sigmas[:-1], atol=1e-6, rtol=1e-5)
    # the training grid (before set_timesteps shifts it again): sigmas = timesteps / T
    train = FlowMatchEulerDiscreteScheduler(shift=shift)
    torch.testing.assert_close(schedule.alpha_sigma(train.timesteps)[1], train.sigmas, atol=1e-6, rtol=1e-5)


def test_edm_alpha_sigma_matches_diffusers():
    sched = EDMEulerScheduler()
    schedule = schedule_from_config(sched)
    sched.set_timesteps(6)
    sigmas = sched.sigmas[:-1]
    a, s = schedule.alpha_sigma(sigmas)
    assert torch.equal(a, torch.ones(6)) and torch.equal(s, sigmas)
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    ref = torch.stack([sched.add_noise(x0[i:i + 1], eps[i:i + 1], sched.timesteps[i:i + 1])[0] for i in range(6)])
    torch.testing.assert_close(schedule.add_noise(x0, eps, sigmas), ref)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op run inside, with the sizes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [o.numel() for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def table_sized(self, n):
        return [op for op, sizes in self.ops if any(size >= n for size in sizes)]

    def host_syncs(self):  # .item(), float(t), bool(t), python `if t:` all come through here
        return [op for op, _ in self.ops if "_local_scalar_dense" in op]


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_vp_alpha_sigma_moves_the_table_once_per_device(device):
    """A second ``alpha_sigma`` on the same device and dtype touches no table-sized tensor (no copy, no
    flip, no difference): only gathers of ``t``'s size. ``meta`` stands for an accelerator on CPU-only
    machines: a per-call ``.to(t.device)`` of the table there is a real ``_to_copy`` of 1000 values."""
    _, schedule = _vp()
    n = schedule.num_train_timesteps
    t = torch.tensor([0.0, 3.5, 500.0, 999.0], device=device)
    with _OpLog() as first:
        schedule.alpha_sigma(t)
    assert first.table_sized(n), "the first call builds the device table (the counter sees table-sized ops)"
    for call in (lambda: schedule.alpha_sigma(t), lambda: schedule.alpha(t), lambda: schedule.sigma(t),
                 lambda: schedule.add_noise(torch.zeros(4, 2, device=device), torch.ones(4, 2, device=device), t)):
        with _OpLog() as again:
            call()
        assert again.table_sized(n) == [], f"table-sized work on a repeated call: {again.table_sized(n)}"
        assert again.host_syncs() == []
    (key, tables), = schedule._tables.items()  # one entry: (device, dtype) -> the same tensors every call
    assert key == (t.device, torch.float32) and tables[0].device == t.device
    schedule.alpha_sigma(t)
    assert schedule._device_tables(t.device, torch.float32) is tables


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_sigma_has_no_host_sync(name):
    schedule = SCHEDULES[name]()
    t = schedule.timesteps(4)
    schedule.alpha_sigma(t)
    with _OpLog() as log:
        schedule.alpha_sigma(t)
        x = torch.randn(4, 3)
        schedule.to_eps(schedule.from_x0(x, x, t), x, t)
        schedule.transition(x, x, t / 2, t)
    assert log.host_syncs() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_sigma_has_no_cuda_sync(name):
    schedule = SCHEDULES[name]()
    t = schedule.timesteps(4).cuda()
    schedule.alpha_sigma(t)  # builds the device table (one host-to-device copy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, s = schedule.alpha_sigma(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    a_cpu, s_cpu = schedule.alpha_sigma(t.cpu())
    torch.testing.assert_close(a.cpu(), a_cpu)
    torch.testing.assert_close(s.cpu(), s_cpu)


def test_schedules_with_device_tables_copy_and_pickle():
    import copy
    import pickle

    for make in SCHEDULES.values():
        schedule = make()
        t = schedule.timesteps(5)
        a, s = schedule.alpha_sigma(t)
        schedule.alpha_sigma(torch.ones(2, device="meta"))  # a cache entry that cannot be pickled
        for again in (copy.deepcopy(schedule), pickle.loads(pickle.dumps(schedule))):
            assert again._tables == {}
            a2, s2 = again.alpha_sigma(t)
            assert torch.equal(a2, a) and torch.equal(s2, s)
            assert again.describe() == schedule.describe()


def _t_for_grad(schedule):
    if isinstance(schedule, VPSchedule):
        return torch.tensor([10.5, 250.25, 500.0, 900.75])  # interior; 500 is a table point
    return schedule.timesteps(4)


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_sigma_is_differentiable_in_t(name):
    """d(alpha, sigma)/dt by autograd and by forward-mode AD agree with each other and with central
    differences (VP: inside a table interval, where ``log ā`` is linear, and at a table point, where it is the
    right-hand derivative, the earlier table lookup's being 0 there; flow: ``-1/T, 1/T``; EDM: ``0, 1``)."""
    import torch.autograd.forward_ad as fwAD

    schedule = SCHEDULES[name]()
    t = _t_for_grad(schedule).float()
    h = 0.125 if isinstance(schedule, VPSchedule) else 1e-2 * t
    fd = [(p - m) / (2 * h) for p, m in zip(schedule.alpha_sigma(t + h), schedule.alpha_sigma(t - h))]

    tr = t.clone().requires_grad_(True)
    a, s = schedule.alpha_sigma(tr)
    (ds,) = torch.autograd.grad(s.sum(), tr, retain_graph=True)
    da = torch.autograd.grad(a.sum(), tr)[0] if a.requires_grad else torch.zeros_like(t)  # EDM: alpha = 1
    with fwAD.dual_level():
        a_f, s_f = schedule.alpha_sigma(fwAD.make_dual(t, torch.ones_like(t)))
        ta, ts = fwAD.unpack_dual(a_f).tangent, fwAD.unpack_dual(s_f).tangent
    ta = torch.zeros_like(t) if ta is None else ta
    for ad, fw, ref in ((da, ta, fd[0]), (ds, ts, fd[1])):
        torch.testing.assert_close(fw, ad)
        torch.testing.assert_close(ad, ref, rtol=2e-2, atol=1e-6)
    assert bool((ds != 0).all()), "sigma depends on t everywhere inside the range"
