"""``train.attention`` per model family (``fastgen.networks.set_attention``): each backend installed here gives the
default configuration's output and trains, through diffusers' own mechanism for the family (the dispatcher's
backend for Flux and Wan, the family's own SDPA processor for the UNets, SD3 and Sana), never a processor of
another family; the SD3 preset (``attention: sdpa``) trains a step on a tiny SD3 teacher."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging

import pytest
import torch
from tiny import TEXT_DIM, make_sd3_folder

from fastgen.errors import EnvironmentMissingError, UsageError, describe
from fastgen.networks import attention_modules, configure_network


def _unet2d():
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    return model, {"sample": torch.randn(2, 3, 8, 8), "timestep": torch.tensor([10, 500])}


def _unet2d_condition():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
                                 norm_num_groups=2)
    return model, {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 500]),
                   "encoder_hidden_states": torch.randn(2, 7, TEXT_DIM)}


def _sd3(dual: bool = False):
    from diffusers import SD3Transformer2DModel

    extra = {"num_layers": 2, "dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual else {"num_layers": 1}
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=2 * TEXT_DIM,
                                  pooled_projection_dim=2 * TEXT_DIM, out_channels=4, **extra)
    return model, {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10.0, 500.0]),
                   "encoder_hidden_states": torch.randn(2, 7, 2 * TEXT_DIM),
                   "pooled_projections": torch.randn(2, 2 * TEXT_DIM)}


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return model, {"hidden_states": torch.randn(2, 16, 4), "encoder_hidden_states": torch.randn(2, 6, 32),
                   "pooled_projections": torch.randn(2, 32), "timestep": torch.tensor([0.1, 0.9]),
                   "img_ids": torch.randn(16, 3), "txt_ids": torch.randn(6, 3)}


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=1,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return model, {"hidden_states": torch.randn(2, 4, 2, 8, 8), "timestep": torch.tensor([10, 500]),
                   "encoder_hidden_states": torch.randn(2, 6, 16)}


def _sana():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                   attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                   cross_attention_dim=8, caption_channels=8, sample_size=8)
    return model, {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 500]),
                   "encoder_hidden_states": torch.randn(2, 6, 8)}


FAMILIES = {"unet2d": _unet2d, "unet2d-condition": _unet2d_condition, "sd3": _sd3, "sd3.5-dual": lambda: _sd3(True),
            "flux": _flux, "wan": _wan, "sana": _sana}
DISPATCHED = {"flux", "wan"}  # the rest run classic processors (their class is the backend)
XFORMERS_READY = importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()
BACKENDS = ["default", "sdpa"] + (["xformers"] if XFORMERS_READY else [])


def build(family: str):
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    return model.float().train(), inputs


def forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def processor_classes(model) -> list[str]:
    dispatched, classic = attention_modules(model)
    return [type(m.processor).__name__ for m in dispatched + classic]


@pytest.mark.parametrize("attention", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_backend_gives_the_default_output_and_trains_on_each_family(family, attention, caplog):
    model, inputs = build(family)
    device = "cuda" if attention == "xformers" else "cpu"
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    configured = copy.deepcopy(model)
    with torch.no_grad():
        expected = forward(model, inputs)
    with caplog.at_level(logging.WARNING):
        configure_network(configured, attention)
    assert not caplog.records  # diffusers' "experimental feature" line is fastgen's noise, dropped
    dispatched, classic = attention_modules(configured)
    assert bool(dispatched) == (family in DISPATCHED) and bool(classic) == (family not in DISPATCHED)
    if attention == "sdpa":  # the family's own processors; the dispatcher's native (SDPA) backend
        assert processor_classes(configured) == processor_classes(model)
        assert all(m.processor._attention_backend == "native" for m in dispatched)
    out = forward(configured, inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.pow(2).mean().backward()
    grads = [p.grad for p in configured.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_sdpa_replaces_a_plain_processor_by_its_sdpa_sibling_where_the_scale_is_the_default():
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    model, inputs = build("unet2d-condition")
    model.set_attn_processor(AttnProcessor())  # diffusers' non-SDPA processor (torch 1's default)
    with torch.no_grad():
        expected = forward(model, inputs)
    configure_network(model, "sdpa")
    assert set(processor_classes(model)) == {"AttnProcessor2_0"}
    torch.testing.assert_close(forward(model, inputs), expected, atol=1e-5, rtol=1e-5)

    unscaled = Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False)  # scale 1: SDPA's default would differ
    assert type(unscaled.processor) is AttnProcessor
    configure_network(unscaled, "sdpa")
    assert type(unscaled.processor) is AttnProcessor and not isinstance(unscaled.processor, AttnProcessor2_0)


def test_xformers_on_a_family_diffusers_has_no_xformers_form_of_is_one_usage_error():
    model, _ = build("sana")
    before = processor_classes(model)
    with pytest.raises(UsageError) as err:
        configure_network(model, "xformers")
    message = describe(err.value)
    assert "SanaTransformer2DModel" in message and "SanaLinearAttnProcessor2_0" in message and "'sdpa'" in message
    assert "\n" not in str(err.value) and processor_classes(model) == before  # refused before any change


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_xformers_without_xformers_is_one_line_on_classic_and_dispatched_families(family):
    model, _ = build(family)
    with pytest.raises(EnvironmentMissingError, match="xformers is not installed.*'sdpa'") as err:
        configure_network(model, "xformers")
    assert "\n" not in str(err.value)


def test_an_unknown_backend_is_a_usage_error():
    model, _ = build("unet2d")
    with pytest.raises(UsageError, match="train.attention is 'flash'; expected 'default', 'sdpa' or 'xformers'"):
        configure_network(model, "flash")


def test_the_sd3_preset_with_its_sdpa_attention_trains_on_a_tiny_sd3_teacher(tmp_path):
    """``sd3_phased_dmd`` sets ``train.attention: sdpa``: the plain SDPA processor on SD3's joint attention failed
    at step 0 (a joint block unpacks two outputs); now every network keeps ``JointAttnProcessor2_0``."""
    from fastgen.config import DistillConfig, config_file, load_config
    from fastgen.trainer import Trainer

    teacher = make_sd3_folder(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    run = tmp_path / "run"
    config = load_config(DistillConfig, config_file("sd3_phased_dmd"), [
        f"teacher={teacher}", f"prompts={prompts}", f"output={run}", "train.max_steps=2", "train.batch_size=1",
        "train.log_every=1", "train.mixed_precision=no", "objective.critic_every=1"])
    assert config.train.attention == "sdpa"
    trainer = Trainer(config)
    for name in trainer.run.network_names:
        assert set(processor_classes(trainer.run.module(name))) == {"JointAttnProcessor2_0"}, name
    trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows for k, v in r.items() if k.endswith("/loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
