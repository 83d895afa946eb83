"""``load_teacher`` on tiny random diffusers pipelines of every supported family.

The wrapper's x0 is checked against an independent computation: the raw network call followed by the
textbook conversion for the prediction type, with alpha/sigma read from the scheduler's own
``alphas_cumprod`` (VP) or ``sigma = t / 1000`` (rectified flow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import make_ddpm_folder, make_sd3_folder, make_sd_folder, make_sdxl_folder

from fastgen.checkpoint import UnsafeCheckpointError
from fastgen.teacher import Teacher, load_teacher

# name: (builder, builder kwargs, expected properties)
FAMILIES = {
    "ddpm": (make_ddpm_folder, {}, dict(family="vp", prediction="epsilon", shape=(3, 8, 8), latent=False,
                                        image=(8, 8), text=False, classes=0)),
    "ddpm_class": (make_ddpm_folder, {"num_class_embeds": 3}, dict(family="vp", prediction="epsilon",
                                                                   shape=(3, 8, 8), latent=False, image=(8, 8),
                                                                   text=False, classes=3)),
    "sd": (make_sd_folder, {}, dict(family="vp", prediction="epsilon", shape=(4, 8, 8), latent=True,
                                    image=(16, 16), text=True, classes=0)),
    "sd_v": (make_sd_folder, {"prediction_type": "v_prediction"}, dict(family="vp", prediction="v_prediction",
                                                                       shape=(4, 8, 8), latent=True,
                                                                       image=(16, 16), text=True, classes=0)),
    "sdxl": (make_sdxl_folder, {}, dict(family="vp", prediction="epsilon", shape=(4, 8, 8), latent=True,
                                        image=(16, 16), text=True, classes=0)),
    "sd3": (make_sd3_folder, {}, dict(family="flow", prediction="flow", shape=(4, 8, 8), latent=True,
                                      image=(16, 16), text=True, classes=0)),
}
TEXT_FAMILIES = ["sd", "sd_v", "sdxl", "sd3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU the threads contend (3× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """``folder(name)``: the saved pipeline folder of a family, built once per session."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            builder, kwargs, _ = FAMILIES[name]
            built[name] = builder(tmp_path_factory.mktemp(name) / "pipe", **kwargs)
        return built[name]

    return get


@pytest.fixture(scope="session")
def teacher(folder):
    """``teacher(name)``: the loaded teacher of a family, loaded once per session."""
    loaded = {}

    def get(name: str) -> Teacher:
        if name not in loaded:
            loaded[name] = load_teacher(folder(name))
        return loaded[name]

    return get


def raw_output(model, x, t, cond):
    """The network's own output, called the way its diffusers pipeline calls it."""
    if type(model).__name__ == "SD3Transformer2DModel":
        return model(hidden_states=x, timestep=t, **(cond or {})).sample
    return model(sample=x, timestep=t.long(), **(cond or {})).sample


def reference_x0(t: Teacher, x, times, cond):
    """x0 by hand from the raw network output and the scheduler's own noise levels."""
    out = raw_output(t.model, x, times, cond)
    scheduler = t.pipeline.scheduler
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        sigma = (times / 1000).view(-1, 1, 1, 1)
        return x - sigma * out  # x_t = (1 - s) x0 + s eps, v = eps - x0
    ac = scheduler.alphas_cumprod[times.long()].view(-1, 1, 1, 1)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - sigma * out) / alpha
    if kind == "v_prediction":
        return alpha * x - sigma * out
    assert kind == "sample"
    return out


def times_for(t: Teacher) -> torch.Tensor:
    return torch.tensor([250.0, 900.0]) if t.schedule.family == "flow" else torch.tensor([10.0, 500.0])


def cond_for(t: Teacher, n: int = 2):
    if t.text_conditioned:
        return t.encode_prompts(["a red square", "blue"][:n])
    if t.num_classes:
        return t.class_cond(torch.tensor([0, 2][:n]))
    return None


def assert_cond_close(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], dict):
            assert_cond_close(a[key], b[key])
        else:
            torch.testing.assert_close(a[key], b[key])


# ----------------------------------------------------------------------------- loading and x0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_loads_with_its_schedule_and_shapes(teacher, name):
    t, expected = teacher(name), FAMILIES[name][2]
    assert t.schedule.family == expected["family"]
    assert t.schedule.prediction_type == expected["prediction"]
    assert t.sample_shape == expected["shape"]
    assert t.is_latent is expected["latent"]
    assert t.image_size == expected["image"]
    assert t.text_conditioned is expected["text"]
    assert t.num_classes == expected["classes"]
    assert t.denoiser_component == ("transformer" if name == "sd3" else "unet")
    assert not any(p.requires_grad for p in t.model.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_denoiser_matches_hand_conversion(teacher, name):
    t = teacher(name)
    x = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(1))
    times, cond = times_for(t), cond_for(t)
    with torch.no_grad():
        got = t.denoiser(x, times, cond)
        expected = reference_x0(t, x, times, cond)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_vp_schedule_is_the_schedulers(teacher):
    t = teacher("sd")
    ac = t.pipeline.scheduler.alphas_cumprod
    times = torch.tensor([0.0, 400.0, 999.0])
    torch.testing.assert_close(t.schedule.alpha(times), ac[times.long()].sqrt())
    torch.testing.assert_close(t.schedule.sigma(times), (1 - ac[times.long()]).sqrt())


def test_flow_schedule_keeps_the_shift(teacher):
    assert teacher("sd3").schedule.shift == 3.0


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_plain_ddpm_pipeline_saved_by_diffusers_loads(tmp_path, prediction):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    t = load_teacher(tmp_path)
    assert (t.schedule.prediction_type, t.sample_shape, t.is_latent) == (prediction, (1, 4, 4), False)
    torch.testing.assert_close(t.schedule.alpha(torch.arange(1000.0)) ** 2, scheduler.alphas_cumprod)
    x, times = torch.randn(3, 1, 4, 4), torch.tensor([0.0, 300.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(t.denoiser(x, times), reference_x0(t, x, times, None), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- text conditions


def test_sd_prompts_are_the_text_encoders_last_hidden_state(teacher):
    t = teacher("sd")
    pipe = t.pipeline
    prompts = ["a red square", "blue"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0]
    cond = t.encode_prompts(prompts)
    assert set(cond) == {"encoder_hidden_states"}
    torch.testing.assert_close(cond["encoder_hidden_states"], expected)


def test_sdxl_prompts_concatenate_both_encoders_and_add_time_ids(teacher):
    t = teacher("sdxl")
    pipe = t.pipeline
    prompts = ["a red square", "blue"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True)
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
    cond = t.encode_prompts(prompts)
    assert set(cond) == {"encoder_hidden_states", "added_cond_kwargs"}
    torch.testing.assert_close(cond["encoder_hidden_states"],
                               torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1))
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], second.text_embeds)
    # (original size, crop top-left, target size) = (16, 16), (0, 0), (16, 16): the default SDXL call
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"],
                               torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))


def test_sd3_prompts_give_joint_tokens_and_pooled_projections(teacher):
    t = teacher("sd3")
    pipe = t.pipeline
    ids = pipe.tokenizer(["a red square"] * 3, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = torch.cat([pipe.text_encoder(ids).text_embeds, pipe.text_encoder_2(ids).text_embeds], -1)
    cond = t.encode_prompts(["a red square"] * 3)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    # 77 CLIP tokens then the (absent, zero) T5 tokens, in joint_attention_dim = 64 features
    assert cond["encoder_hidden_states"].shape[0::2] == (3, 64) and cond["encoder_hidden_states"].shape[1] > 77
    torch.testing.assert_close(cond["pooled_projections"], pooled)


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_null_cond_is_the_pipelines_own_negative(teacher, name):
    t = teacher(name)
    null = t.null_cond(2)
    if name in ("sd", "sd_v"):
        _, negative = t.pipeline.encode_prompt(["x", "y"], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
        pooled = None
    elif name == "sdxl":
        _, negative, _, pooled = t.pipeline.encode_prompt(["x", "y"], device="cpu", do_classifier_free_guidance=True)
    else:
        _, negative, _, pooled = t.pipeline.encode_prompt(["x", "y"], None, None, device="cpu",
                                                          do_classifier_free_guidance=True)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)
    if name == "sdxl":  # force_zeros_for_empty_prompt: the pipeline's negative is zeros, not the "" embedding
        assert not negative.any() and not pooled.any()
        torch.testing.assert_close(null["added_cond_kwargs"]["text_embeds"], pooled)
        torch.testing.assert_close(null["added_cond_kwargs"]["time_ids"],
                                   t.encode_prompts(["", ""])["added_cond_kwargs"]["time_ids"])
    else:
        assert_cond_close(null, t.encode_prompts(["", ""]))
        if pooled is not None:
            torch.testing.assert_close(null["pooled_projections"], pooled)


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_guidance_is_u_plus_scale_times_c_minus_u(teacher, name):
    t = teacher(name)
    x = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(2))
    times, cond, uncond = times_for(t), cond_for(t), t.null_cond(2)
    with torch.no_grad():
        c, u = t.denoiser(x, times, cond), t.denoiser(x, times, uncond)
        torch.testing.assert_close(t.denoiser.guided(x, times, cond, uncond, scale=1.0), c)
        guided = t.denoiser.guided(x, times, cond, uncond, scale=4.5)
    assert not torch.allclose(c, u)
    torch.testing.assert_close(guided, u + 4.5 * (c - u), rtol=1e-4, atol=1e-4)


def test_pixel_teacher_takes_no_prompts(teacher):
    with pytest.raises(ValueError, match="takes no prompts"):
        teacher("ddpm").encode_prompts(["a cat"])
    assert teacher("ddpm").null_cond(2) is None


# ----------------------------------------------------------------------------- class conditions


def test_class_labels_select_the_embedding(teacher):
    t = teacher("ddpm_class")
    cond = t.class_cond([0, 2])
    assert cond["class_labels"].dtype == torch.long and cond["class_labels"].tolist() == [0, 2]
    x = torch.randn(1, *t.sample_shape).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = t.denoiser(x, torch.tensor([100.0, 100.0]), cond)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("labels", [[0, 3], [-1]])
def test_class_labels_out_of_range(teacher, labels):
    with pytest.raises(ValueError, match=r"out of range: .* has 3 classes; expected labels 0 to 2"):
        teacher("ddpm_class").class_cond(labels)


def test_class_cond_needs_a_class_embedding(teacher):
    with pytest.raises(ValueError, match="num_class_embeds"):
        teacher("ddpm").class_cond([0])
    with pytest.raises(ValueError, match="no null class"):
        teacher("ddpm_class").null_cond(2)


# ----------------------------------------------------------------------------- pixels and latents


def test_latent_round_trip_shapes_range_and_scaling(teacher):
    t = teacher("sd3")
    cfg = t.vae.config
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = t.encode(images)
    assert latents.shape == (2, *t.sample_shape)
    with torch.no_grad():
        mean = t.vae.encode(images).latent_dist.mean
        decoded = t.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
    torch.testing.assert_close(latents, (mean - cfg.shift_factor) * cfg.scaling_factor)
    back = t.decode(latents)
    assert back.shape == images.shape and back.min() >= -1 and back.max() <= 1
    torch.testing.assert_close(back, decoded.clamp(-1, 1))


def test_pixel_teacher_encode_decode_is_identity(teacher):
    t = teacher("ddpm")
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(t.encode(images), images) and torch.equal(t.decode(images), images)


# ----------------------------------------------------------------------------- errors


def copy_of(folder, tmp_path) -> Path:
    return Path(shutil.copytree(folder("ddpm"), tmp_path / "copy"))


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nothing-here does not exist; expected a diffusers pipeline"):
        load_teacher(tmp_path / "nothing-here")
    # ``teachers/sd3`` reads like a hub id, but beside a local folder ``teachers`` it is a missing folder (it was
    # sent to the hub and came back as a long line about the offline cache)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^teacher path teachers/sd3 does not exist \(and teachers/ is a "
                                                r"local folder, so it is not read as a hub id\); expected"):
        load_teacher("teachers/sd3")


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"model.safetensors is a file; expected a diffusers pipeline folder"):
        load_teacher(path)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model_index.json; expected a diffusers pipeline folder"):
        load_teacher(tmp_path)


def test_model_index_without_denoiser(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    del index["unet"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no denoiser: components are \['scheduler'\], expected one of "
                                         r"\['unet', 'transformer'\]"):
        load_teacher(path)


def test_a_component_folder_that_model_index_names_but_is_missing(folder, tmp_path):
    """A folder copied without one of its components (``unet/`` here) is named before any weights load, rather
    than diffusers' "no file named config.json" about the pipeline's root."""
    path = copy_of(folder, tmp_path)
    shutil.rmtree(path / "unet")
    with pytest.raises(FileNotFoundError, match=rf"folder {path} has no unet/ although its model_index.json names "
                                                 "that component"):
        load_teacher(path)


def test_unsupported_denoiser_class(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    edit_json(path / "model_index.json", unet=["diffusers", "UNet3DConditionModel"])
    with pytest.raises(ValueError, match=r"'UNet3DConditionModel' is not supported; expected one of \['UNet2DModel'"):
        load_teacher(path)


def test_unsupported_prediction_type(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    edit_json(path / "scheduler" / "scheduler_config.json", prediction_type="velocity")
    with pytest.raises(ValueError, match=r"'velocity'; expected one of \['epsilon', 'v_prediction', 'sample'\]"):
        load_teacher(path)


def test_unknown_scheduler_class(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    edit_json(path / "model_index.json", scheduler=["diffusers", "MadeUpScheduler"])
    edit_json(path / "scheduler" / "scheduler_config.json", _class_name="MadeUpScheduler")
    with pytest.raises(ValueError, match=r"'MadeUpScheduler' is not a known noise-schedule family; expected one of"):
        load_teacher(path)


def test_pickled_weights_need_trust(teacher, tmp_path):
    path = make_ddpm_folder(tmp_path / "pickled", safe_serialization=False)
    assert not list(path.rglob("*.safetensors")) and list(path.rglob("*.bin"))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_teacher(path)
    message = str(info.value)
    assert "'unet'" in message and ".bin" in message
    assert "safetensors" in message and "trust_pickle=True" in message
    t = load_teacher(path, trust_pickle=True)
    safe = teacher("ddpm").model.state_dict()  # the same seeded weights, saved as safetensors
    for key, value in t.model.state_dict().items():
        torch.testing.assert_close(value, safe[key])
