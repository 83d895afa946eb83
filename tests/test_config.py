"""Config loading: defaults, YAML merge, dotted overrides, error messages, save/load round trip."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from fastgen.config import (
    ConfigError,
    DistillConfig,
    StudentConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from fastgen.errors import UsageError
from fastgen.losses.consistency import ConsistencyConfig
from fastgen.losses.dmd import DMD2Config


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(DistillConfig, overrides=overrides)
    return str(info.value)


def test_defaults():
    cfg = load_config(DistillConfig)
    assert cfg == DistillConfig()
    assert cfg.student.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.train.betas == (0.9, 0.999)
    assert cfg.train.mixed_precision == "no"
    assert cfg.objective == {}
    assert DistillConfig().student.lora_targets is not DistillConfig().student.lora_targets


def test_yaml_merge_keeps_unset_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "teacher: toy\nmethod: dmd2\n"
        "student:\n  num_steps: 4\n  timesteps: [999, 749, 499, 249]\n"
        "train:\n  lr: 5e-7\n  mixed_precision: no\n  betas: [0.0, 0.99]\n"
        "objective:\n  guidance_scale: 8\n  gan_weight: 5.0e-3\n  gan_t_range: [0.1, 0.9]\n"
    )
    cfg = load_config(DistillConfig, path)
    assert cfg.teacher == "toy" and cfg.method == "dmd2"
    assert cfg.student.timesteps == [999, 749, 499, 249] and cfg.student.lora_rank == 0
    assert cfg.train.lr == 5e-7 and isinstance(cfg.train.lr, float)
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.betas == (0.0, 0.99)
    assert cfg.train.batch_size == TrainConfig().batch_size
    # the objective section becomes the method's typed Config: values typed, unset keys at its defaults
    assert isinstance(cfg.objective, DMD2Config)
    assert cfg.objective == DMD2Config(guidance_scale=8.0, gan_weight=5e-3, gan_t_range=(0.1, 0.9))
    assert isinstance(cfg.objective.guidance_scale, float) and cfg.objective.critic_every == DMD2Config().critic_every
    assert config_to_dict(cfg)["objective"]["gan_t_range"] == [0.1, 0.9]


def test_overrides_apply_after_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  batch_size: 4\n")
    cfg = load_config(DistillConfig, path, ["train.lr=2e-5"])
    assert cfg.train.lr == 2e-5 and cfg.train.batch_size == 4


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(DistillConfig, path) == DistillConfig()


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("train.max_steps=20", lambda c: c.train.max_steps, 20),
        ("train.max_steps=1e3", lambda c: c.train.max_steps, 1000),
        ("train.max_steps=2.0", lambda c: c.train.max_steps, 2),
        ("train.lr=1e-5", lambda c: c.train.lr, 1e-5),
        ("train.lr=1", lambda c: c.train.lr, 1.0),
        ("train.gradient_checkpointing=true", lambda c: c.train.gradient_checkpointing, True),
        ("train.gradient_checkpointing=yes", lambda c: c.train.gradient_checkpointing, True),
        ("train.mixed_precision=bf16", lambda c: c.train.mixed_precision, "bf16"),
        ("train.mixed_precision=no", lambda c: c.train.mixed_precision, "no"),
        ("train.attention=sdpa", lambda c: c.train.attention, "sdpa"),
        ("train.ema_decay=null", lambda c: c.train.ema_decay, None),
        ("train.ema_decay=0.95", lambda c: c.train.ema_decay, 0.95),
        ("train.grad_clip=~", lambda c: c.train.grad_clip, None),
        ("train.betas=[0, 0.99]", lambda c: c.train.betas, (0.0, 0.99)),
        ("student.timesteps=[999,499]", lambda c: c.student.timesteps, [999, 499]),
        ("student.lora_targets=[to_q, proj_in]", lambda c: c.student.lora_targets, ["to_q", "proj_in"]),
        ("student.lora_alpha=8", lambda c: c.student.lora_alpha, 8.0),
        ("student={num_steps: 2, lora_rank: 4}", lambda c: (c.student.num_steps, c.student.lora_rank), (2, 4)),
        ("teacher=models/toy teacher", lambda c: c.teacher, "models/toy teacher"),
        ("output=2024", lambda c: c.output, "2024"),
        ("data=1e-5", lambda c: c.data, "1e-5"),
        ("data=null", lambda c: c.data, None),
        ("seed= 7 ", lambda c: c.seed, 7),
        ("objective.guidance_scale=2", lambda c: c.objective, {"guidance_scale": 2}),
        ("objective.gan.weight=5e-3", lambda c: c.objective, {"gan": {"weight": 5e-3}}),
        ("objective.ratio=[5, 10]", lambda c: c.objective, {"ratio": [5, 10]}),
    ],
)
def test_override_types(override, getter, expected):
    value = getter(load_config(DistillConfig, overrides=[override]))
    assert value == expected and type(value) is type(expected)


def test_overrides_merge_into_free_dict_and_later_wins():
    cfg = load_config(DistillConfig, overrides=["objective.a=1", "objective.b.c=2", "objective.a=3"])
    assert cfg.objective == {"a": 3, "b": {"c": 2}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr=1", "unknown config key 'trian.lr'; did you mean 'train.lr'?"),
        ("lr=1", "unknown config key 'lr'; did you mean 'train.lr'?"),
        ("student.num_step=2", "unknown config key 'student.num_step'; did you mean 'student.num_steps'?"),
        ("train.max_steps=ten", "train.max_steps: expected int, got 'ten' (str)"),
        ("train.max_steps=true", "train.max_steps: expected int, got True (bool)"),
        ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5 (float)"),
        ("train.lr=fast", "train.lr: expected float, got 'fast' (str)"),
        ("train.lr=false", "train.lr: expected float, got False (bool)"),
        ("train.ema_decay=abc", "train.ema_decay: expected float or None, got 'abc' (str)"),
        ("train.gradient_checkpointing=2", "train.gradient_checkpointing: expected bool, got 2 (int)"),
        ("teacher=[a]", "teacher: expected str, got ['a'] (list)"),
        ("teacher=null", "teacher: expected str, got None (NoneType)"),
        (
            "train.mixed_precision=fp32",
            "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp32' (str)",
        ),
        ("student.timesteps=999", "student.timesteps: expected list[int] or None, got 999 (int)"),
        ("student.timesteps=[999, x]", "student.timesteps[1]: expected int, got 'x' (str)"),
        ("student.lora_targets=to_q", "student.lora_targets: expected list[str], got 'to_q' (str)"),
        ("train.betas=[0.9]", "train.betas: expected tuple[float, float] with 2 items, got [0.9] (1 items)"),
        ("objective=3", "objective: expected mapping, got 3 (int)"),
        ("train.lr.x=1", "config key 'train.lr.x': 'train.lr' is a value (float), not a section"),
        ("student", "override 'student' is not of the form key=value"),
        ("train.lr", "override 'train.lr' is not of the form key=value"),
        ("student=", "config key 'student' is a section (StudentConfig)"),
        ("train=3", "config key 'train' is a section (TrainConfig)"),
        ("=3", "override '=3' has an empty key"),
        ("train..lr=3", "override 'train..lr=3' has an empty key"),
        ("train.lr=[1,", "override 'train.lr=[1,': invalid YAML value"),
    ],
)
def test_override_errors(override, message):
    assert message in _error([override])


def test_unknown_key_without_close_match_lists_the_level():
    message = _error(["zzzz=1"])
    assert "unknown config key 'zzzz'; valid keys here: teacher, method, output" in message


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_yaml_errors_name_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 1e-4\n")
    expected = r"unknown config key 'train.lrr'; did you mean 'train.lr'\? \(in .*bad.yaml\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(DistillConfig, path)
    path.write_text("student:\n  num_steps: two\n")
    with pytest.raises(ConfigError, match=r"student.num_steps: expected int, got 'two' \(str\)"):
        load_config(DistillConfig, path)
    path.write_text("student: 3\n")
    with pytest.raises(ConfigError, match=r"student: expected a mapping for StudentConfig, got 3 \(int\)"):
        load_config(DistillConfig, path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of config keys"):
        load_config(DistillConfig, path)
    path.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(DistillConfig, path)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        DistillConfig,
        overrides=[
            "teacher=toy", "method=dmd2", "output=1e-5", "student.num_steps=4",
            "student.timesteps=[999,749,499,249]", "train.mixed_precision=no", "train.betas=[0.0,0.99]",
            "train.ema_decay=null", "train.lr_scheduler=cosine", "train.lr_warmup_steps=10", "data=off",
            "objective.guidance_scale=1.75", "objective.gan_loss=hinge", "objective.t_range=[0.1, 0.9]",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(DistillConfig, path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    plain = yaml.safe_load(path.read_text())  # a YAML 1.1 reader gets the same values
    assert plain["train"]["mixed_precision"] == "no" and plain["output"] == "1e-5" and plain["data"] == "off"
    assert plain["objective"]["gan_loss"] == "hinge" and plain["objective"]["t_range"] == [0.1, 0.9]
    assert plain["train"]["lr_scheduler"] == "cosine" and plain["train"]["lr_warmup_steps"] == 10
    # without a method the objective section stays a free mapping, and round-trips as one
    free = load_config(DistillConfig, overrides=["objective.mode=off", "objective.nested={a: [1, 2], b: yes}"])
    path = save_config(free, tmp_path / "free.yaml")
    assert free.objective == {"mode": "off", "nested": {"a": [1, 2], "b": "yes"}}
    assert load_config(DistillConfig, path) == free
    assert yaml.safe_load(path.read_text())["objective"]["mode"] == "off"


def test_save_config_failure_leaves_previous_file(tmp_path, monkeypatch):
    path = save_config(DistillConfig(teacher="old"), tmp_path / "config.yaml")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("fastgen.atomic.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_config(DistillConfig(teacher="new"), path)
    monkeypatch.undo()
    assert load_config(DistillConfig, path).teacher == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_dict_round_trip():
    cfg = DistillConfig(teacher="t", method="consistency", student=StudentConfig(num_steps=2, timesteps=[999, 499]),
                        objective={"skip": 10})
    assert cfg.objective == ConsistencyConfig(skip=10)  # typed when the config is built
    plain = config_to_dict(cfg)
    assert plain["train"]["betas"] == [0.9, 0.999]
    assert plain["objective"] == {**config_to_dict(ConsistencyConfig()), "skip": 10}
    assert config_from_dict(DistillConfig, plain) == cfg
    with pytest.raises(UsageError, match="method 'm' is unknown"):
        DistillConfig(teacher="t", method="m")
    with pytest.raises(TypeError):
        config_to_dict(DistillConfig)


@dataclass
class _Inner:
    name: str
    weights: tuple[float, ...] = ()


@dataclass
class _Outer:
    inner: _Inner
    maybe: _Inner | None = None
    table: dict[str, int] = field(default_factory=dict)
    anything: Any = None


def test_generic_required_fields_optional_sections_and_typed_dicts():
    with pytest.raises(ConfigError, match=r"missing required config key 'inner'"):
        load_config(_Outer)
    with pytest.raises(ConfigError, match=r"missing required config key 'inner.name' \(str\)"):
        load_config(_Outer, overrides=["inner.weights=[1]"])
    cfg = load_config(_Outer, overrides=["inner.name=a", "maybe.name=b", "maybe.weights=[1, 2.5]", "table.x=3"])
    assert cfg == _Outer(_Inner("a"), _Inner("b", (1.0, 2.5)), {"x": 3})
    assert load_config(_Outer, overrides=["inner.name=a", "maybe=null"]).maybe is None
    assert load_config(_Outer, overrides=["inner.name=a", "anything=[1, {b: 2}]"]).anything == [1, {"b": 2}]
    with pytest.raises(ConfigError, match=r"table.x: expected int, got 'y' \(str\)"):
        load_config(_Outer, overrides=["inner.name=a", "table.x=y"])
    with pytest.raises(ConfigError, match=r"maybe.weights\[1\]: expected float, got 'z' \(str\)"):
        load_config(_Outer, overrides=["inner.name=a", "maybe.name=b", "maybe.weights=[1, z]"])


def test_validate_accepts_a_complete_config():
    DistillConfig(teacher="toy", method="dmd2").validate()
    DistillConfig(teacher="toy", method="dmd2", student=StudentConfig(num_steps=2, timesteps=[999, 499])).validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teacher="], "teacher: expected a teacher folder or hub id (required), got ''"),
        (["method="], "method: expected a distillation method name (required), got ''"),
        (["student.num_steps=0"], "student.num_steps: expected >= 1, got 0"),
        (["student.num_steps=4", "student.timesteps=[999,499]"],
         "student.timesteps: expected 4 timesteps (one per student.num_steps), got [999, 499]"),
        (["train.lr=0"], "train.lr: expected > 0, got 0.0"),
        (["train.grad_accum=0"], "train.grad_accum: expected >= 1, got 0"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints: expected >= 1, got 0"),
        (["train.ema_decay=1"], "train.ema_decay: expected in [0, 1) or None, got 1.0"),
        (["train.ema_decay=-0.1"], "train.ema_decay: expected in [0, 1) or None, got -0.1"),
        (["train.batch_size=0"], "train.batch_size: expected >= 1, got 0"),
        (["train.betas=[0.9, 1.0]"], "train.betas: expected each in [0, 1), got (0.9, 1.0)"),
    ],
)
def test_validate_errors(overrides, message):
    cfg = load_config(DistillConfig, overrides=["teacher=toy", "method=dmd2", *overrides])
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert message in str(info.value)


def test_validate_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        load_config(DistillConfig, overrides=["train.lr=-1"]).validate()
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["teacher", "method", "train.lr"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=dmd2", "objective.guidance_scael=2"],
         "unknown config key 'objective.guidance_scael'; did you mean 'objective.guidance_scale'?"),
        (["method=dmd2", "objective.guidance_scale=high"], "objective.guidance_scale: expected float, got 'high'"),
        (["method=dmd2", "objective.gan_loss=wasserstein"],
         "objective.gan_loss is 'wasserstein'; expected one of ['nonsaturating', 'hinge']"),
        (["method=consistency", "objective.critic_every=5"], "unknown config key 'objective.critic_every'"),
        (["train.lr_scheduler=cosin"],
         "train.lr_scheduler: expected one of 'constant', 'linear', 'cosine', got 'cosin' (str)"),
        (["train.optimizer=adam8bit"], "train.optimizer: expected one of 'adamw', 'fused', '8bit', got 'adam8bit'"),
    ],
)
def test_objective_settings_and_new_train_keys_are_checked_when_the_config_is_built(overrides, message):
    """The ``objective`` section is the method's typed Config: a typo or a bad value fails in ``load_config``
    (a ``UsageError``; unknown keys and wrong types as ``ConfigError``), before any teacher is read."""
    with pytest.raises(UsageError) as info:
        load_config(DistillConfig, overrides=["teacher=somewhere", *overrides])
    assert message in str(info.value)


def test_new_train_keys_default_and_validate():
    t = load_config(DistillConfig).train
    assert (t.lr_scheduler, t.lr_warmup_steps, t.num_workers) == ("constant", 0, 0)
    assert (t.optimizer, t.allow_tf32, t.validation_prompts, t.validation_seed) == ("adamw", False, None, None)
    cfg = load_config(DistillConfig, overrides=["teacher=toy", "method=dmd2", "train.lr_warmup_steps=-1",
                                                "train.num_workers=-2"])
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert "train.lr_warmup_steps: expected >= 0, got -1" in str(info.value)
    assert "train.num_workers: expected >= 0, got -2" in str(info.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("report_to=tensorboard", "unknown config key 'report_to'; did you mean 'train.trackers'?"),
        ("train.report_to=[wandb]", "unknown config key 'train.report_to'; did you mean 'train.trackers'?"),
        ("gradient_accumulation_steps=4", "did you mean 'train.grad_accum'?"),
        ("train.learning_rate=1e-5", "did you mean 'train.lr'?"),
        ("checkpointing_steps=500", "did you mean 'train.checkpoint_every'?"),
        ("enable_xformers_memory_efficient_attention=true", "did you mean 'train.attention=xformers'?"),
        ("train.adam_beta2=0.99", "did you mean 'train.betas'?"),
        ("use_8bit_adam=true", "did you mean 'train.optimizer=8bit'? (diffusers' training-script flag "
                               "--use_8bit_adam)"),
        ("validation_prompts=[a cat]", "did you mean 'train.validation_prompts'?"),
        ("train.validation_steps=500", "did you mean 'train.sample_every'?"),
        ("validation_epochs=5", "did you mean 'train.sample_every'? (diffusers' training-script flag "
                                "--validation_epochs; counted in steps: fastgen has no epochs)"),
        ("allow_tf32=true", "did you mean 'train.allow_tf32'?"),
        ("resume_from_checkpoint=latest", "use the command-line flag --resume latest of `fastgen distill`"),
        ("output_dir=runs/x", "use the command-line flag --output of `fastgen distill`"),
        ("train.seed=1", "unknown config key 'train.seed'; did you mean 'seed'?"),
    ],
)
def test_diffusers_script_flags_suggest_fastgens_key(override, expected):
    message = _error([override])
    assert message.startswith(f"unknown config key '{override.split('=')[0]}'; ") and expected in message


def test_diffusers_script_flags_in_a_yaml_file_suggest_fastgens_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  report_to: tensorboard\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.report_to'; did you mean 'train.trackers'\?"):
        load_config(DistillConfig, path)
    path.write_text("max_train_steps: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_train_steps'; did you mean 'train.max_steps'\?"):
        load_config(DistillConfig, path)


def test_script_flag_table_names_existing_keys_and_flags():
    from fastgen.cli import build_parser
    from fastgen.config import SCRIPT_FLAGS
    from fastgen.typed_config import _dotted_keys

    keys = set(_dotted_keys(DistillConfig))
    distill = build_parser()._subparsers._group_actions[0].choices["distill"]
    flags = {s for action in distill._actions for s in action.option_strings}
    for flag, target in SCRIPT_FLAGS.items():
        assert flag not in keys or flag == target  # an alias never hides another key (``seed`` is fastgen's too)
        name = target.split()[0]
        assert (name in flags) if name.startswith("--") else (name.split("=")[0] in keys), (flag, target)


def test_train_optimizer_and_fastgen_estimate_share_one_list_of_optimizer_names():
    import fastgen.estimate
    from fastgen.cli import build_parser
    from fastgen.config import OPTIMIZERS, TrainConfig

    assert OPTIMIZERS == ("adamw", "fused", "8bit") and fastgen.estimate.OPTIMIZERS is OPTIMIZERS
    assert typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"]) == OPTIMIZERS
    estimate = build_parser()._subparsers._group_actions[0].choices["estimate"]
    [flag] = [a for a in estimate._actions if "--optimizer" in a.option_strings]
    assert tuple(flag.choices) == OPTIMIZERS


def test_a_presets_grid_holds_for_its_own_teacher_only(capsys, tmp_path, monkeypatch):
    """toy_dmd2's one-step 399 is a time of the toy's linear betas: another teacher takes the method's rule."""
    from fastgen.config import load_distill_config

    own = load_distill_config("toy_dmd2")
    assert own.student.timesteps == [399] and capsys.readouterr().err == ""
    other = load_distill_config("toy_dmd2", ["teacher=./my-teacher"])
    assert other.student.timesteps is None
    assert "toy_dmd2.yaml sets student.timesteps=[399] for its teacher 'toy'" in capsys.readouterr().err
    kept = load_distill_config("toy_dmd2", ["teacher=./my-teacher", "student.timesteps=[500]"])
    assert kept.student.timesteps == [500] and capsys.readouterr().err == ""
    phased = load_distill_config("toy_phased_dmd", ["teacher=./my-teacher"])
    assert (phased.student.timesteps, phased.student.expert_boundaries, phased.objective.boundaries) == (None,) * 3
    assert phased.student.experts == 2 and phased.objective.phase_order == "sequential"  # the rest of the preset holds
    (tmp_path / "sd").mkdir()  # a file naming a folder keeps its grid when --teacher spells that folder otherwise
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"teacher: {tmp_path / 'sd'}\nmethod: dmd2\nstudent:\n  timesteps: [399]\n")
    monkeypatch.chdir(tmp_path)
    assert load_distill_config(str(mine), ["teacher=./sd/"]).student.timesteps == [399]
    assert load_distill_config(str(mine), ["teacher=elsewhere"]).student.timesteps is None
