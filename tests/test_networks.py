"""The engine's second shape: networks an objective declares by kind (full copy, LoRA on the teacher's own
weights, a head), per-phase gradient ownership, and students made of several experts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from probes import register
from tiny import make_ddpm_folder, make_sd_folder

from fastgen.checkpoint import latest_checkpoint, load_checkpoint
from fastgen.config import DistillConfig, load_config
from fastgen.experts import ExpertsDenoiser, default_boundaries, expert_index
from fastgen.networks import NetworkFactory, activate_adapter
from fastgen.teacher import load_teacher
from fastgen.trainer import Trainer


@pytest.fixture(scope="session")
def ddpm(tmp_path_factory):
    return make_ddpm_folder(tmp_path_factory.mktemp("networks") / "ddpm", sample_size=8)


@pytest.fixture(scope="session")
def sd(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("networks") / "sd")


@pytest.fixture(autouse=True)
def probes(monkeypatch):
    from fastgen.losses import OBJECTIVES

    for name in list(OBJECTIVES):
        monkeypatch.setitem(OBJECTIVES, name, OBJECTIVES[name])  # undone after the test
    register()


def storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def run_config(teacher, output, method, *overrides) -> DistillConfig:
    base = [f"teacher={teacher}", f"method={method}", f"output={output}", "seed=1", "train.batch_size=4",
            "train.log_every=1", "train.lr=1e-3", "train.max_steps=3"]
    return load_config(DistillConfig, None, base + list(overrides))


# ----------------------------------------------------------------------------- LoRA on the shared base


def test_lora_fake_score_shares_the_teachers_weights_and_starts_equal_to_it(sd):
    teacher = load_teacher(sd)
    base_storage = storages(teacher.model)
    x_t = torch.randn(2, *teacher.sample_shape)
    t = torch.tensor([900.0, 300.0])
    cond = teacher.encode_prompts(["a red disc", "a cube"])
    before = teacher(x_t, t, cond)

    fake = NetworkFactory(teacher).lora("fake", rank=4)
    assert fake.model is teacher.model  # one network: no second copy of the base
    lora = [p for n, p in fake.model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora)
    base = [p for n, p in fake.model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    assert {p.untyped_storage().data_ptr() for p in base} == base_storage  # the teacher's own tensors
    torch.testing.assert_close(fake(x_t, t, cond), before, rtol=0, atol=1e-6)  # B = 0 at the start

    with torch.no_grad():
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    adapted = fake(x_t, t, cond)
    assert (adapted - before).abs().max() > 1e-3  # the adapter is on for the fake score's calls ...
    torch.testing.assert_close(teacher(x_t, t, cond), before, rtol=0, atol=1e-6)  # ... and off for the teacher's
    torch.testing.assert_close(fake(x_t, t, cond), adapted, rtol=0, atol=1e-6)


def test_switching_adapters_leaves_gradient_flags_alone(sd):
    teacher = load_teacher(sd)
    fake = NetworkFactory(teacher).lora("fake", rank=4)
    lora = [p for n, p in fake.model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(False)  # excluded by the phase that runs
    activate_adapter(teacher.model, "fake")
    activate_adapter(teacher.model, None)
    activate_adapter(teacher.model, "fake")
    assert not any(p.requires_grad for p in lora)


def test_full_copy_is_a_trainable_float32_network_of_its_own(sd):
    teacher = load_teacher(sd)
    copy = NetworkFactory(teacher).copy()
    assert storages(copy.model).isdisjoint(storages(teacher.model))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in copy.model.parameters())
    x_t, t = torch.randn(1, *teacher.sample_shape), torch.tensor([500.0])
    cond = teacher.encode_prompts(["a"])
    torch.testing.assert_close(copy(x_t, t, cond), teacher(x_t, t, cond))


def test_lora_fake_trains_its_adapter_only_and_resumes_exactly(sd, tmp_path):
    config = run_config(sd, tmp_path / "run", "lora_fake_probe", "objective.lora_rank=4", "train.ema_decay=null")
    trainer = Trainer(config)
    base = {n: p.detach().clone() for n, p in trainer.teacher.model.named_parameters() if "lora_" not in n}
    trainer.fit()
    for n, p in trainer.teacher.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"teacher weight {n} changed"
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    fake_state = state["networks"]["fake"]
    assert fake_state and all(".fake." in k for k in fake_state)  # the adapter alone, not the base
    assert any(v.abs().sum() > 0 for k, v in fake_state.items() if "lora_B" in k)  # it trained

    # resume from step 2 of a fresh run equals the uninterrupted run
    Trainer(run_config(sd, tmp_path / "a", "lora_fake_probe", "objective.lora_rank=4", "train.ema_decay=null",
                       "train.max_steps=2")).fit()
    resumed = Trainer(run_config(sd, tmp_path / "a", "lora_fake_probe", "objective.lora_rank=4",
                                 "train.ema_decay=null"), resume="latest")
    resumed.fit()
    _, again = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    for key, value in fake_state.items():
        torch.testing.assert_close(again["networks"]["fake"][key], value, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- gradient ownership


def test_a_generator_phase_through_a_critic_and_its_head_writes_no_gradient_into_them(ddpm, tmp_path):
    trainer = Trainer(run_config(ddpm, tmp_path / "run", "feature_head_probe", "train.max_steps=1"))
    objective = trainer.objective
    critic, head = objective.nets["critic"], objective.nets["head"]
    seen = {}

    def spied(phase):
        def loss(batch, step):
            for net in (critic, head):
                net.zero_grad(set_to_none=True)
            out = phase.loss(batch, step)
            if phase.name == "generator":
                out["loss"].backward(retain_graph=True)  # what the trainer's backward will do, inside the phase
                seen["critic"] = [p.grad for p in critic.parameters()]
                seen["head"] = [p.grad for p in head.parameters()]
                seen["student"] = [p.grad for p in trainer.student.model.parameters()]
                trainer.student.model.zero_grad(set_to_none=True)
            return out

        return dataclasses.replace(phase, loss=loss)

    trainer.run.phases[:] = [spied(phase) for phase in trainer.run.phases]  # the trainer calls phase.loss
    trainer.fit()
    assert seen, "the generator phase did not run"
    assert all(g is None for g in seen["critic"] + seen["head"])
    assert any(g is not None and g.abs().sum() > 0 for g in seen["student"])  # gradients flowed through them
    assert all(p.requires_grad for p in critic.parameters())  # restored after the phase


# ----------------------------------------------------------------------------- experts


def test_experts_route_each_sample_to_the_expert_of_its_interval():
    from tiny import MLPDenoiser

    from fastgen.schedules import VPSchedule

    schedule = VPSchedule(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0))
    experts = [MLPDenoiser(schedule, dim=2, hidden=8) for _ in range(3)]
    mixture = ExpertsDenoiser(experts, [700.0, 300.0])
    t = torch.tensor([999.0, 700.0, 500.0, 300.0, 10.0])
    assert expert_index(t, [700.0, 300.0]).tolist() == [0, 1, 1, 2, 2]
    x = torch.randn(5, 2)
    expected = torch.cat([experts[k](x[i:i + 1], t[i:i + 1]) for i, k in enumerate([0, 1, 1, 2, 2])])
    torch.testing.assert_close(mixture(x, t), expected)
    assert default_boundaries([999, 749, 499, 249], 2) == [624.0]
    assert default_boundaries([999, 749, 499, 249], 4) == [874.0, 624.0, 374.0]
    with pytest.raises(ValueError, match="student.experts"):
        default_boundaries([999], 2)
    with pytest.raises(ValueError, match="expert_boundaries"):
        ExpertsDenoiser(experts, [300.0, 700.0])


def test_a_student_of_experts_trains_each_with_its_own_ema_and_resumes_exactly(ddpm, tmp_path):
    overrides = ["student.experts=2", "student.num_steps=2", "train.sample_every=3", "train.checkpoint_every=2"]
    trainer = Trainer(run_config(ddpm, tmp_path / "run", "experts_probe", *overrides))
    assert trainer.student.boundaries == [pytest.approx(sum(trainer.objective.timesteps) / 2)]
    start = [[p.detach().clone() for p in e.model.parameters()] for e in trainer.student.experts]
    trainer.fit()
    assert set(trainer.emas) == {"student.0", "student.1"}
    for k, expert in enumerate(trainer.student.experts):
        assert any(not torch.equal(a, b) for a, b in zip(start[k], expert.model.parameters())), f"expert {k}"
        assert trainer.emas[f"student.{k}"].optimization_step == 3
    assert (tmp_path / "run" / "samples" / "step-00000003.png").is_file()
    _, final = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert set(final["networks"]) == {"student.0", "student.1"} and set(final["ema"]) == {"student.0", "student.1"}

    resumed = Trainer(run_config(ddpm, tmp_path / "run", "experts_probe", *overrides), resume=str(
        tmp_path / "run" / "checkpoints" / "step-00000002"))
    resumed.fit()
    _, again = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for name in ("student.0", "student.1"):
        for key, value in final["networks"][name].items():
            assert torch.equal(again["networks"][name][key], value), (name, key)


def test_an_objective_whose_rule_the_export_cannot_replay_fails_when_built():
    from fastgen.analytic import GaussianMixtureDenoiser
    from fastgen.losses.base import Objective
    from fastgen.plan import resolve_plan
    from fastgen.schedules import FlowSchedule

    class HeunStudent(Objective):
        name, rule = "heun_student", "heun"

    schedule = FlowSchedule()
    teacher = GaussianMixtureDenoiser(torch.zeros(1, 2), 1.0, [1.0], schedule)
    plan = resolve_plan(HeunStudent, None, schedule, schedule, 1)
    with pytest.raises(ValueError, match="'heun'.*cannot replay"):
        HeunStudent(teacher, {"student": teacher}, None, plan)
