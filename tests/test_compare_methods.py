"""scripts/compare_methods.py: every method's run config at every step count builds a trainer."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "compare_methods.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_presets_experts_and_phase_boundaries_apply_at_its_own_step_count_only(compare, tmp_path):
    from fastgen.trainer import Trainer

    args = compare.parse_args(["--max-steps", "2"])
    own = compare.run_config(args, "phased_dmd", 2, tmp_path / "two", None)  # toy_phased_dmd: 2 steps, 2 experts
    assert (own.student.experts, own.student.timesteps, own.objective["boundaries"]) == (2, [452.0, 226.0], [226])
    for steps in (1, 4):  # the preset's 2-expert split and its boundary [226] would not fit these grids
        config = compare.run_config(args, "phased_dmd", steps, tmp_path / f"run{steps}", None)
        assert config.student.experts == 1 and config.student.timesteps is None
        assert "boundaries" not in config.objective
        trainer = Trainer(config)
        assert len(trainer.objective.plan) == steps  # one phase per step on the method's default grid
        assert trainer.objective.timesteps == trainer.objective.default_timesteps(steps)
