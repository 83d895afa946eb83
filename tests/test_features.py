"""``Denoiser(..., features=...)``: block activations from the same forward pass, on the tiny pipelines."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import make_ddpm_folder, make_sd3_folder, make_sd_folder, make_sdxl_folder

from fastgen.denoiser import Denoiser, image_stream
from fastgen.teacher import load_teacher

FAMILIES = {"ddpm": make_ddpm_folder, "sd": make_sd_folder, "sdxl": make_sdxl_folder, "sd3": make_sd3_folder}
DEFAULTS = {"ddpm": "mid_block", "sd": "mid_block", "sdxl": "mid_block", "sd3": "transformer_blocks.0"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_teacher(FAMILIES[name](tmp_path_factory.mktemp(name) / "pipe"))
        return loaded[name]

    return get


def _inputs(teacher, n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((n, *teacher.sample_shape), generator=generator)
    t = torch.tensor([700.0, 200.0][:n]) * (teacher.schedule.num_train_timesteps / 1000)
    if teacher.text_conditioned:
        cond = teacher.encode_prompts([f"prompt {k}" for k in range(n)])
    else:
        cond = None
    return x_t, t, cond


def _manual(teacher, name, x_t, t, cond):
    """What a hand-registered hook on ``name`` sees in a plain call."""
    seen = {}
    module = teacher.model.get_submodule(name)
    handle = module.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    try:
        x0 = teacher.denoiser(x_t, t, cond)
    finally:
        handle.remove()
    return x0, seen["out"]


def _no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_bottleneck_matches_a_manual_hook(teachers, name):
    teacher = teachers(name)
    x_t, t, cond = _inputs(teacher)
    assert teacher.denoiser.default_features == (DEFAULTS[name],)
    x0_plain, raw = _manual(teacher, DEFAULTS[name], x_t, t, cond)
    x0, feats = teacher.denoiser(x_t, t, cond, features=True)
    assert list(feats) == [DEFAULTS[name]]
    assert torch.equal(x0, x0_plain), "features must not change x0"
    expected = raw[1] if name == "sd3" else raw  # SD3 blocks return (encoder_hidden_states, hidden_states)
    assert torch.equal(feats[DEFAULTS[name]], expected)
    if name == "sd3":  # the image stream: one token per latent pixel (patch size 1)
        _, h, w = teacher.sample_shape
        assert feats[DEFAULTS[name]].shape[:2] == (2, h * w)
    assert torch.equal(teacher.denoiser(x_t, t, cond), x0_plain)  # no features: x0 alone, as before
    assert _no_hooks(teacher.model)


def test_named_blocks_and_tuple_outputs(teachers):
    teacher = teachers("sdxl")
    x_t, t, cond = _inputs(teacher)
    names = ("down_blocks.1", "mid_block", "up_blocks.0.attentions.0", "conv_in")
    _, raw = _manual(teacher, "down_blocks.1", x_t, t, cond)
    assert isinstance(raw, tuple) and isinstance(raw[1], tuple)  # (hidden_states, res_samples)
    x0, feats = teacher.denoiser(x_t, t, cond, features=names)
    assert list(feats) == list(names)
    assert torch.equal(feats["down_blocks.1"], raw[0])
    _, conv = _manual(teacher, "conv_in", x_t, t, cond)
    assert torch.equal(feats["conv_in"], conv)
    _, attention = _manual(teacher, "up_blocks.0.attentions.0", x_t, t, cond)
    assert torch.equal(feats["up_blocks.0.attentions.0"], image_stream(None, attention))
    assert feats["up_blocks.0.attentions.0"].shape[0] == 2
    x0_single, single = teacher.denoiser(x_t, t, cond, features="mid_block")  # one name as a string
    assert torch.equal(x0_single, x0) and torch.equal(single["mid_block"], feats["mid_block"])
    assert _no_hooks(teacher.model)


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_gradients_reach_the_input_and_every_weight_of_the_head_through_the_feature(teachers, name):
    """Every weight of the GAN head takes part in its logit: DDP stops at a parameter without a gradient (a token
    head's convolutions, unused, stopped two-process DMD2 on SD3 and Flux)."""
    from fastgen.losses.adversarial import make_head

    teacher = teachers(name)
    x_t, t, cond = _inputs(teacher)
    head = make_head(teacher.denoiser, x_t, t, cond)
    x_t.requires_grad_(True)
    _, feats = teacher.denoiser(x_t, t, cond, features=True)
    head(feats[DEFAULTS[name]]).mean().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_the_image_stream_of_a_sharded_joint_block(teachers):
    """FSDP2 renames a sharded block's class (``FSDPJointTransformerBlock``): its image stream is still its second
    output, not the text stream (Flux) or None (SD3's last block), which the GAN head read under FSDP2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    block = copy.deepcopy(teachers("sd3").model.transformer_blocks[0])
    text, image = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(block)
        assert type(block).__name__ == "FSDPJointTransformerBlock"
        assert image_stream(block, (text, image)) is image
    finally:
        dist.destroy_process_group()


def test_unknown_name_and_hooks_removed_when_the_call_raises(teachers):
    teacher = teachers("sd")
    x_t, t, cond = _inputs(teacher)
    with pytest.raises(ValueError, match=r"'mid_blok'.*\['conv_in'.*'mid_block'"):
        teacher.denoiser(x_t, t, cond, features=("mid_block", "mid_blok"))
    assert _no_hooks(teacher.model)
    bad = {"encoder_hidden_states": cond["encoder_hidden_states"][:, :, :5]}  # wrong width: the UNet raises
    with pytest.raises(RuntimeError):
        teacher.denoiser(x_t, t, bad, features=True)
    assert _no_hooks(teacher.model)


def test_features_through_ddp(teachers):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    teacher = teachers("ddpm")
    x_t, t, _ = _inputs(teacher)
    model = copy.deepcopy(teacher.model).requires_grad_(True)
    denoiser = Denoiser(model, teacher.schedule)
    x0_plain, raw = _manual(teacher, "mid_block", x_t, t, None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        denoiser.model = DistributedDataParallel(model)  # as the trainer's accelerator.prepare leaves it
        assert denoiser.default_features == ("mid_block",)
        x0, feats = denoiser(x_t, t, features=True)
        assert torch.equal(x0, x0_plain) and torch.equal(feats["mid_block"], raw)
        feats["mid_block"].square().mean().backward()
        assert model.mid_block.resnets[0].conv1.weight.grad.abs().sum() > 0
        assert _no_hooks(denoiser.model)
    finally:
        dist.destroy_process_group()
