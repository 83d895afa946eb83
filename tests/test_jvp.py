"""fastgen.jvp on tiny diffusers networks (configs as diffusers' own tests build them) and a fastgen Denoiser.

References are computed here, never by ``fastgen.jvp``: a float64 central difference with a tiny step where
the network computes in float64 along the tangent, and reverse-mode autograd (``torch.autograd.functional.jvp``,
a double backward) everywhere, including the time path of diffusers' sinusoidal embeddings, which diffusers
computes in float32 whatever the model's dtype (``get_timestep_embedding``: ``timesteps.float()``), so that a
float64 difference in ``t`` comes no closer than about 2e-4 there (docs/jvp.md).

Networks are called in unit time ``s`` (``timestep = scale * s``): the UNets and SD3 take diffusers timesteps
(scale 1000), Flux scales its own timestep by 1000 (scale 1), the Fourier UNet takes ``sigma`` (scale 1).
"""

import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastgen.jvp import FD_EPS, JVP_METHODS, jvp

TANGENTS = ("dx", "dt", "both")


def _unet(**config):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       **config)


def _build(name: str):
    """(model, x, s, cond, scale) for the network ``name``, float32, seeded."""
    from diffusers import (FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel,
                           WanTransformer3DModel)

    torch.manual_seed(0)
    s = torch.tensor([0.25, 0.7])
    if name == "unet":  # GroupNorm, self-attention, positional sinusoidal embedding of t
        return _unet(), torch.randn(2, 3, 8, 8), s, {}, 1000.0
    if name == "unet_fourier":  # Gaussian Fourier features of log sigma (NCSN++), all in the model's dtype
        return _unet(time_embedding_type="fourier"), torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0]), {}, 1.0
    if name == "unet_cond":  # cross-attention on text states
        model = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                     out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                     norm_num_groups=2)
        return model, torch.randn(2, 4, 8, 8), s, {"encoder_hidden_states": torch.randn(2, 5, 32)}, 1000.0
    if name == "sd3":  # joint attention, AdaLayerNorm
        model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                      num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                      pooled_projection_dim=64, out_channels=4)
        cond = {"encoder_hidden_states": torch.randn(2, 5, 64), "pooled_projections": torch.randn(2, 64)}
        return model, torch.randn(2, 4, 8, 8), s, cond, 1000.0
    if name == "flux":  # diffusers' attention dispatcher, rotary embeddings
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "pooled_projections": torch.randn(2, 32),
                "img_ids": torch.stack(grid, -1).reshape(16, 3), "txt_ids": torch.zeros(5, 3)}
        return model, torch.randn(2, 16, 4), s, cond, 1.0
    if name == "wan":  # video: 3-D patches, rotary embeddings, cross-attention on text, the dispatcher
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                      out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=1,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        return model, torch.randn(2, 4, 2, 8, 8), s, {"encoder_hidden_states": torch.randn(2, 6, 16)}, 1000.0
    if name == "sana":  # linear attention, cross-attention on text
        model = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                       attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                       cross_attention_dim=8, caption_channels=8, sample_size=8)
        return model, torch.randn(2, 4, 8, 8), s, {"encoder_hidden_states": torch.randn(2, 6, 8)}, 1000.0
    raise KeyError(name)


MODELS = ("unet", "unet_fourier", "unet_cond", "sd3", "flux", "wan", "sana")


@functools.cache
def network(name: str, dtype: torch.dtype = torch.float32):
    """``(f, x, s)``: ``f(x, s)`` the network ``name`` in ``dtype`` at unit time ``s`` (its condition closed
    over), eval mode, parameters frozen."""
    model, x, s, cond, scale = _build(name)
    model.to(dtype).eval().requires_grad_(False)
    cond = {k: v.to(dtype) if k in ("encoder_hidden_states", "pooled_projections") else v for k, v in cond.items()}
    key = "sample" if name.startswith("unet") else "hidden_states"

    def f(x, s):
        return model(**{key: x}, timestep=scale * s, **cond, return_dict=False)[0]

    return f, x.to(dtype), s.to(dtype)


def tangents(x, s, kind: str):
    """``(dx, dt)`` of ``kind``: a random direction in x, a unit step in time, or both."""
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    dt = torch.ones_like(s)
    return (dx if kind != "dt" else torch.zeros_like(x), dt if kind != "dx" else torch.zeros_like(s))


def rel_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# In float64 along these tangents (the x path of the UNets and SD3, every path of the Fourier UNet), a central
# difference with h = 1e-6 is within 1e-7 of the derivative (measured, relative norm: 2e-10 to 3e-8; at
# most 2% of the tolerance element by element).
@pytest.mark.parametrize("name,kind", [("unet", "dx"), ("unet_cond", "dx"), ("sd3", "dx"), ("unet_fourier", "dx"),
                                       ("unet_fourier", "dt"), ("unet_fourier", "both")])
def test_exact_equals_central_difference_in_float64(name, kind):
    f, x, s = network(name, torch.float64)
    dx, dt = tangents(x, s, kind)
    h = 1e-6
    with torch.no_grad():
        reference = (f(x + h * dx, s + h * dt) - f(x - h * dx, s - h * dt)) / (2 * h)
        _, dF_dt = jvp(f, (x, s), (dx, dt))
    torch.testing.assert_close(dF_dt, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("kind", TANGENTS)
@pytest.mark.parametrize("name", MODELS)
def test_exact_equals_reverse_mode_in_float64(name, kind):
    f, x, s = network(name, torch.float64)
    dx, dt = tangents(x, s, kind)
    with sdpa_kernel(SDPBackend.MATH):  # fused kernels have no double backward either
        _, reference = torch.autograd.functional.jvp(f, (x, s), (dx, dt))
    with torch.no_grad():
        _, dF_dt = jvp(f, (x, s), (dx, dt))
    # measured: relative norm 2e-16 to 1.4e-15, the same arithmetic in another order; Wan's blocks (norms, residuals,
    # modulation: ``.float()``) and SANA's linear attention (SanaLinearAttnProcessor2_0) compute in float32 whatever
    # the model's dtype: 1e-8 to 1.1e-7 there
    assert rel_error(dF_dt, reference) < (1e-6 if name in ("wan", "sana") else 1e-12)


# Relative error (norm) of "finite_difference" at FD_EPS in float32 against "exact" in float64, tangent (dx, 1)
# in unit time; measured 2.3e-3, 3.6e-4, 2.8e-3, 9.2e-4, 1.1e-3, 1.0e-3 (Wan) (docs/jvp.md). Bounds: about twice
# that. SANA is left out: its linear attention (ReLU features, float32 inside, a sum in the denominator) gives the
# difference a relative error of 0.56 at FD_EPS in float32, and 0.03 at the best step of a float64 sweep
# (1e-3 ... 1e-7): use the exact JVP there (docs/jvp.md).
FD_BOUNDS = {"unet": 5e-3, "unet_fourier": 1e-3, "unet_cond": 6e-3, "sd3": 2e-3, "flux": 3e-3, "wan": 2e-3}


@pytest.mark.parametrize("name", sorted(FD_BOUNDS))
def test_finite_difference_error_at_default_eps(name):
    f64, x64, s64 = network(name, torch.float64)
    f, x, s = network(name, torch.float32)
    with torch.no_grad():
        _, exact = jvp(f64, (x64, s64), tangents(x64, s64, "both"))
        _, fd = jvp(f, (x, s), tangents(x, s, "both"), method="finite_difference")
    assert fd.dtype == torch.float32
    assert rel_error(fd, exact) < FD_BOUNDS[name]


@pytest.mark.parametrize("method", JVP_METHODS)
def test_primal_is_a_plain_forward(method):
    f, x, s = network("unet")
    dx, dt = tangents(x, s, "both")
    F, dF_dt = jvp(f, (x, s), (dx, dt), method=method)
    assert torch.equal(F, f(x, s))
    with torch.no_grad():
        F_no_grad, dF_dt_no_grad = jvp(f, (x, s), (dx, dt), method=method)
    # under no_grad "exact" returns the JVP's own primal, computed with the math attention kernel
    torch.testing.assert_close(F_no_grad, f(x, s), rtol=1e-5, atol=1e-6)
    assert torch.equal(dF_dt_no_grad, dF_dt)


@pytest.mark.parametrize("method", JVP_METHODS)
def test_gradient_flows_through_the_primal_only(method):
    """A loss on ``F`` and the detached tangent gives the parameters the gradient of the same loss on a plain
    forward."""
    model, x, s, _, scale = _build("unet")

    def f(x, s):
        return model(x, scale * s, return_dict=False)[0]

    F, dF_dt = jvp(f, (x, s), tangents(x, s, "both"), method=method)
    assert F.requires_grad and not dF_dt.requires_grad
    ((F - dF_dt) ** 2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ((f(x, s) - dF_dt) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert grads[name] is not None and torch.equal(grads[name], p.grad), name


class DropoutNet(torch.nn.Module):
    """``F(x, t)``: an MLP with dropout, of ``x`` and ``sin(t)``."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.SiLU(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(32, 4))

    def forward(self, x, t):
        return self.net(torch.cat([x, torch.sin(t)[:, None]], 1))


@pytest.mark.parametrize("method", JVP_METHODS)
def test_passes_share_the_dropout_mask_of_the_primal(method):
    torch.manual_seed(0)
    net = DropoutNet().double().train()
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    torch.manual_seed(1)
    F, dF_dt = jvp(net, (x, t), (dx, dt), method=method)
    after = torch.rand(4)
    torch.manual_seed(1)
    _, reference = torch.autograd.functional.jvp(net, (x, t), (dx, dt))  # one forward, one mask
    torch.manual_seed(1)
    assert torch.equal(F, net(x, t)) and torch.equal(after, torch.rand(4))  # the mask and random state of a forward
    torch.testing.assert_close(dF_dt, reference, rtol=1e-7 if method == "finite_difference" else 1e-12, atol=0)


@pytest.mark.parametrize("method", JVP_METHODS)
def test_denoiser(method):
    """A fastgen ``Denoiser`` (x0 of an epsilon UNet over a VP schedule) called as ``den(x_t, t, cond)`` in
    diffusers timesteps: "exact" against reverse mode, "finite_difference" at ``eps = 1000 FD_EPS`` (the same
    step as FD_EPS in unit time) against "exact"."""
    from diffusers import DDPMScheduler

    from fastgen.denoiser import Denoiser
    from fastgen.schedules import schedule_from_config

    model, x, s, _, _ = _build("unet")
    den = Denoiser(model.double().eval().requires_grad_(False),
                   schedule_from_config(DDPMScheduler().config, "DDPMScheduler"))
    x, t = x.double(), 1000 * s  # the denoiser takes float32 times
    dx, dt = tangents(x, t, "both")
    dx = dx / 1000  # dx_t/dt per timestep

    def f(x_t, t):
        return den(x_t, t, None)

    with torch.no_grad():
        _, exact = jvp(f, (x, t), (dx, dt))
    if method == "exact":
        with sdpa_kernel(SDPBackend.MATH):
            _, reference = torch.autograd.functional.jvp(f, (x, t), (dx, dt))
        torch.testing.assert_close(exact, reference, rtol=1e-9, atol=1e-9 * float(reference.abs().max()))
    else:
        den.float()
        with torch.no_grad():
            _, fd = jvp(f, (x.float(), t), (dx.float(), dt), method=method, eps=1000 * FD_EPS)
        assert rel_error(fd, exact) < FD_BOUNDS["unet"]  # measured 2.1e-3


def test_unknown_method_and_missing_tangents_refused():
    f, x, s = network("unet")
    with pytest.raises(ValueError, match=r"expected one of \['exact', 'finite_difference'\]"):
        jvp(f, (x, s), (x, s), method="forward")
    with pytest.raises(ValueError, match="one tangent per primal"):
        jvp(f, (x, s), (x,))
