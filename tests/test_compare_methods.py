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
    assert (own.student.experts, own.student.timesteps, own.objective.boundaries) == (2, [452.0, 226.0], [226])
    for steps in (1, 4):  # the preset's 2-expert split and its boundary [226] would not fit these grids
        config = compare.run_config(args, "phased_dmd", steps, tmp_path / f"run{steps}", None)
        assert config.student.experts == 1 and config.student.timesteps is None
        assert config.objective.boundaries is None
        trainer = Trainer(config)
        objective = trainer.objective
        # the default split: one phase for one step, two (at the middle step) for more
        assert [c.end for c in objective.critics] == ([None] if steps == 1 else [objective.timesteps[2], None])
        assert trainer.plan.expert_boundaries is None
        default = type(objective).default_grid(objective.schedule, objective.student.schedule, objective.config, steps)
        assert objective.timesteps == trainer.plan.timesteps == default


def test_merge_writes_one_table_from_split_runs_and_a_later_row_replaces_an_earlier_one(compare, tmp_path):
    row = {"steps": 1, "student_toy_fid": 50.0, "teacher_ddim_toy_fid": 674.5, "train_wall_s": 60.0,
           "max_steps": 500, "batch_size": 32, "lr": 1e-4, "data": "teacher"}
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    compare.write_tables([{**row, "method": "dmd2"}, {**row, "method": "sid", "steps": 2}],
                         compare.parse_args(["--out-dir", str(tmp_path / "a")]))
    (tmp_path / "a" / "compare_methods.csv").rename(first)
    compare.write_tables([{**row, "method": "dmd2", "student_toy_fid": 20.25}],
                         compare.parse_args(["--out-dir", str(tmp_path / "b")]))
    (tmp_path / "b" / "compare_methods.csv").rename(second)
    compare.main(["--merge", str(first), str(second), "--out-dir", str(tmp_path / "merged")])
    table = (tmp_path / "merged" / "compare_methods.md").read_text()
    assert "| dmd2 | 1 | 20.25 | 674.50 | 60 | 32 | 0.0001 | teacher |" in table
    assert "| sid | 2 | 50.00 |" in table and "| 50.00 |" not in table.split("| sid |")[0]
    assert table.count("| dmd2 |") == 1 and "every run 500 training steps" in table


def test_merge_of_a_missing_empty_or_old_csv_is_a_one_line_error_and_writes_nothing(compare, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(compare.COLUMNS) + "\n")
    old = tmp_path / "old.csv"  # a CSV of an older version of the script, without the lr and data columns
    old.write_text("method,steps,student_toy_fid,teacher_ddim_toy_fid,train_wall_s,max_steps,batch_size\n"
                   "dmd2,1,50.0,674.5,60.0,500,32\n")
    for path, what in ((tmp_path / "absent.csv", "no such file"), (empty, "no rows"),
                       (old, "columns method,.*,batch_size; expected method,.*,lr,data")):
        with pytest.raises(SystemExit, match=f"^error: --merge {path}.*{what}"):
            compare.main(["--merge", str(path), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
