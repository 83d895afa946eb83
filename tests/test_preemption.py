"""A run meets the world outside its arguments: SIGTERM/SIGINT stop it after a checkpoint and a resume ends bit
for bit as an uninterrupted run; ``--resume auto`` serves the first start and every restart; one process writes a
run folder (``RUN/.lock``) and a finished run is never trained over; a NaN teacher, a phase that never stepped
and non-finite student weights are one-line errors, never an export; config.yaml's paths work from any folder.

Signals and locks go through child processes (``python -m fastgen``); the rest through ``fastgen.cli.main``."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny import make_ddpm_folder

from fastgen.atomic import HOST
from fastgen.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fastgen.cli import main
from fastgen.config import DistillConfig, load_config
from fastgen.errors import InputError
from fastgen.losses import OBJECTIVES, Objective, Phase
from fastgen.runlock import RunLock
from fastgen.teacher import load_teacher
from fastgen.trainer import NonFiniteWeightsError, StopSignals, Trainer, probe_teacher, truncate_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
STOPPED = re.compile(r"stopped at step (\d+) by (SIG\w+); resume with: (fastgen distill .*)")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_ddpm_folder(tmp_path_factory.mktemp("preemption") / "teacher", sample_size=8)


def distill(teacher, run, *extra) -> list[str]:
    """``fastgen distill`` arguments of a tiny consistency run of ``teacher`` into ``run``."""
    return ["distill", "--teacher", str(teacher), "--method", "consistency", "--data", "teacher", "--output",
            str(run), "seed=3", "teacher_samples=8", "teacher_sample_steps=2", "train.batch_size=4",
            "train.log_every=1", *extra]


def steps(run: Path) -> list[int]:
    """The steps of ``run``'s metrics records, in file order."""
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_line(err: str) -> str:
    """The one ``error:`` line of a failed command's stderr (loading bars may come before it), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    return lines[0]


def stop_while_training(args: list[str], run: Path, signum: int, cwd: Path) -> tuple[int, str]:
    """Start ``fastgen *args``, send it ``signum`` once ``run`` has a metrics record, and return its exit status
    and stderr."""
    log = cwd / f"{run.name}-{signum}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fastgen", *args], env=ENV, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().strip():
                proc.send_signal(signum)
                break
            time.sleep(0.01)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def stopped_line(err: str) -> tuple[int, str, list[str]]:
    """Step, signal name and resume command of the stopped line, which must end stderr (no traceback)."""
    assert "Traceback" not in err
    stopped = STOPPED.fullmatch(err.strip().splitlines()[-1])
    assert stopped, err[-2000:]
    return int(stopped[1]), stopped[2], shlex.split(stopped[3])


# ----------------------------------------------------------------------------- signals


def test_sigterm_checkpoints_the_step_and_resume_ends_as_an_uninterrupted_run(teacher, tmp_path, monkeypatch,
                                                                              capsys):
    run = tmp_path / "run"
    status, err = stop_while_training(distill(teacher, run, "--max-steps", "200"), run, signal.SIGTERM, tmp_path)
    assert status == 143, err[-2000:]
    step, name, command = stopped_line(err)
    assert name == "SIGTERM" and 1 <= step < 200
    assert command == ["fastgen", "distill", "--config", str(run / "config.yaml"), "--resume", "latest"]
    assert [p.name for p in list_checkpoints(run)] == [f"step-{step:08d}"]  # the stop's own (no checkpoint_every)
    assert load_checkpoint(latest_checkpoint(run))[0] == step
    assert steps(run) == list(range(1, step + 1))
    assert not (run / "export").exists()

    # the printed command, run from another folder, finishes the run (two steps more than it had)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    total = step + 2
    assert main(command[1:] + ["--max-steps", str(total)]) == 0
    assert steps(run) == list(range(1, total + 1))  # no step twice
    straight = tmp_path / "straight"
    assert main(distill(teacher, straight, "--max-steps", str(total))) == 0
    resumed, reference = load_file(str(run / "export" / WEIGHTS)), load_file(str(straight / "export" / WEIGHTS))
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert list(elsewhere.iterdir()) == []

    # the finished run is not trained over by a distill without --resume
    checkpoints, metrics = list_checkpoints(run), (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(distill(teacher, run, "--max-steps", "2")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"output {run} holds a run already" in line and "--resume latest" in line and "a new --output" in line
    assert list_checkpoints(run) == checkpoints and (run / "metrics.jsonl").read_bytes() == metrics


def test_sigint_under_resume_auto_and_auto_resumes_with_one_record_per_step(teacher, tmp_path, capsys):
    run = tmp_path / "run"
    # --resume auto on a new folder starts a new run
    status, err = stop_while_training(distill(teacher, run, "--max-steps", "200", "--resume", "auto"), run,
                                      signal.SIGINT, tmp_path)
    assert status == 130, err[-2000:]
    step, name, command = stopped_line(err)
    assert name == "SIGINT" and command[-2:] == ["--resume", "auto"]
    # a mark in the first record: a resumed run keeps it, a new one would write the file anew
    records = (run / "metrics.jsonl").read_text().splitlines()
    records[0] = json.dumps({**json.loads(records[0]), "mark": 1})
    (run / "metrics.jsonl").write_text("\n".join(records) + "\n")

    assert main(command[1:] + ["--max-steps", str(step + 2)]) == 0
    assert steps(run) == list(range(1, step + 3))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["mark"] == 1
    # the last checkpoint lost (as if killed before writing it) and a record cut short: the records after the
    # checkpoint it resumes from are written once more, not twice
    shutil.rmtree(latest_checkpoint(run))
    assert load_checkpoint(latest_checkpoint(run))[0] == step
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "ti')
    assert main(command[1:] + ["--max-steps", str(step + 2)]) == 0
    assert steps(run) == list(range(1, step + 3))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["mark"] == 1


def test_ranks_agree_to_stop_when_one_process_is_signalled(teacher, tmp_path):
    """Two processes (torchrun on the CPU, as tests/test_distributed.py): SIGTERM to one worker stops both after
    the same step; the main process writes that step's checkpoint and prints the stopped line, once."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastgen",
               *distill(teacher, run, "--max-steps", "300")]
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf")}
    log = tmp_path / "launch.log"
    with log.open("w") as stderr:
        launcher = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while launcher.poll() is None and time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().strip():
                workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
                assert len(workers) == 2, workers
                os.kill(int(workers[-1]), signal.SIGTERM)
                break
            time.sleep(0.01)
        launcher.wait(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    err = log.read_text()
    stopped = [STOPPED.search(line) for line in err.replace("\r", "\n").splitlines() if STOPPED.search(line)]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0][1])
    assert launcher.returncode != 0 and step < 300
    assert [p.name for p in list_checkpoints(run)] == [f"step-{step:08d}"]
    assert steps(run) == list(range(1, step + 1))


def test_stop_signals_set_a_flag_a_second_one_ends_the_process_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        assert signals.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before
    # not installed outside the main thread, where Python runs no handlers
    seen = []

    def fit_in_a_thread():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=fit_in_a_thread)
    thread.start()
    thread.join()
    assert seen == [before[signal.SIGTERM]]

    script = ("import os, signal, time\n"
              "from fastgen.trainer import StopSignals\n"
              "with StopSignals() as signals:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.2)\n"
              "    print(signals.signum, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "    print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM and done.stdout.split() == [str(int(signal.SIGTERM))], done
    assert done.stderr.strip().splitlines() == [
        "error: a second SIGTERM stopped the run at once, without a checkpoint of the step in progress; the earlier "
        "checkpoints are intact (resume with --resume auto)"]


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    """Records (``step``: steps done) after the checkpoint go, and events (``step``: the index of the step they
    happened in) from its step on; so does a line cut short. A log with nothing to cut is left as it is."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 0.5}, {"step": 1, "event": "nonfinite_loss_skipped"}, {"step": 2, "loss": 0.4},
            {"step": 2, "event": "nonfinite_loss_skipped"}, {"step": 3, "loss": 0.3}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    before = path.stat()
    truncate_metrics(path, 2)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    truncate_metrics(tmp_path / "none.jsonl", 2)
    assert not (tmp_path / "none.jsonl").exists()


# ----------------------------------------------------------------------------- one writer per run folder


def test_a_second_writer_is_refused_while_another_process_holds_the_run_folder(teacher, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom fastgen.runlock import RunLock\n"
                               "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\nsys.stdin.read()\n",
                               str(run)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(distill(teacher, run, "--max-steps", "1")) == 1
        line = error_line(capsys.readouterr().err)
        assert f"output {run} is in use by process {holder.pid} on host {HOST}" in line
        assert "a new --output" in line
        # the folder is the holder's: the refused run wrote nothing there and removed nothing
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
        # a run in progress there (its config written): still "in use", not "continue it with --resume latest"
        (run / "config.yaml").write_text("teacher: x\n")
        assert main(distill(teacher, run, "--max-steps", "1")) == 1
        assert f"output {run} is in use by process {holder.pid}" in error_line(capsys.readouterr().err)
        (run / "config.yaml").unlink()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder's end released its lock
    assert main(distill(teacher, run, "--max-steps", "1")) == 0
    assert load_checkpoint(latest_checkpoint(run))[0] == 1


def test_a_run_lock_is_shared_within_a_process_and_discards_only_what_it_made(tmp_path):
    new = RunLock(tmp_path / "new").acquire()
    again = RunLock(tmp_path / "new").acquire()  # a second Trainer of this process on the same folder
    assert new.created == [tmp_path / "new"] and again.created == [] and new.held and again.held
    assert (tmp_path / "new" / ".lock").read_text() == f"{os.getpid()}@{HOST}\n"
    probe = [sys.executable, "-c", "import sys\nfrom fastgen.runlock import RunLock, RunLockedError\n"
             "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLockedError:\n    sys.exit(3)\n",
             str(tmp_path / "new")]
    new.release()
    assert subprocess.run(probe, env=ENV).returncode == 3  # still held by `again`
    again.release()
    again.release()  # idempotent
    assert subprocess.run(probe, env=ENV).returncode == 0

    # a failed start removes the folders it made, and no folder it did not make or that another run uses
    lock = RunLock(tmp_path / "a" / "b" / "run").acquire()
    assert lock.created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "run"]
    (tmp_path / "a" / "other-run").mkdir()  # another process's, made meanwhile
    lock.discard()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["other-run"] and not lock.held
    RunLock(tmp_path / "new").acquire().discard()  # an existing folder stays
    assert (tmp_path / "new" / ".lock").is_file()


# ----------------------------------------------------------------------------- numerics


def nan_teacher(teacher: Path, folder: Path) -> Path:
    shutil.copytree(teacher, folder)
    weights = load_file(str(folder / WEIGHTS))
    weights["conv_in.bias"][0] = math.nan
    save_file(weights, str(folder / WEIGHTS))
    return folder


def test_a_teacher_with_a_nan_weight_is_refused_at_the_start_with_one_forward(teacher, tmp_path, capsys):
    bad = nan_teacher(teacher, tmp_path / "nan-teacher")
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(distill(bad, run, "--max-steps", "2")) == 1
    line = error_line(capsys.readouterr().err)
    assert f"teacher {bad} gives non-finite values" in line and "conv_in.bias" in line
    assert not run.exists()  # refused before any teacher sample was drawn or cached

    for folder, finite in ((teacher, True), (bad, False)):
        loaded = load_teacher(folder)
        calls = []
        loaded.model.register_forward_hook(lambda *args: calls.append(1))
        if finite:
            probe_teacher(loaded)
        else:
            with pytest.raises(InputError, match="probe batch"):
                probe_teacher(loaded)
        assert len(calls) == 1


@dataclass
class NoSettings:
    pass


class AlwaysNaN(Objective):
    """A data-free objective whose loss is never finite: every step of its phase is skipped."""

    name = "always_nan"
    Config = NoSettings

    def phases(self):
        return [Phase("generator", ("student",), self.loss)]

    def loss(self, batch, step):
        x_t = torch.randn(2, 3, 8, 8)
        return {"loss": self.student(x_t, torch.full((2,), 500.0)).square().mean() * math.nan}


def test_a_phase_that_never_stepped_is_an_error_not_an_export(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(OBJECTIVES, AlwaysNaN.name, AlwaysNaN)
    args = ["distill", "--teacher", str(teacher), "--method", AlwaysNaN.name, "train.log_every=1"]
    run = tmp_path / "run"
    capsys.readouterr()
    # fewer steps than train.max_nonfinite: every one skipped, the run ends, its export is refused
    assert main([*args, "--output", str(run), "--max-steps", "2", "train.max_nonfinite=3"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "no step of the 'generator' phase succeeded" in line and "all 2 steps it ran (up to step 2)" in line
    assert f"checkpoints in {run / 'checkpoints'} are kept" in line and "train.lr" in line
    assert load_checkpoint(latest_checkpoint(run))[0] == 2 and not (run / "export").exists()
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "out")]) == 1
    assert "no step of the 'generator' phase succeeded" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    # train.max_nonfinite in a row: one line naming the phase, the step and what to try
    assert main([*args, "--output", str(tmp_path / "limit"), "--max-steps", "4", "train.max_nonfinite=2"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "the 'generator' loss was not finite in 2 steps in a row (last at step 1" in line
    assert "lower train.lr" in line


def test_a_student_with_nonfinite_weights_is_never_exported(teacher, tmp_path, capsys):
    run = tmp_path / "run"
    config = load_config(DistillConfig, None, [f"teacher={teacher}", "method=consistency", "data=teacher",
                                               f"output={run}", "teacher_samples=8", "teacher_sample_steps=2",
                                               "train.batch_size=4", "train.ema_decay=null"])
    trainer = Trainer(config)
    try:
        with torch.no_grad():
            next(trainer.accelerator.unwrap_model(trainer.run.module("student")).parameters()).view(-1)[0] = math.inf
        with pytest.raises(NonFiniteWeightsError, match="'student' holds non-finite weights at step 0"):
            trainer.export(tmp_path / "export")
        trainer.save()
    finally:
        trainer.close()
    assert not (tmp_path / "export").exists()
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "out")]) == 1
    line = error_line(capsys.readouterr().err)
    assert "'student' holds non-finite weights at step 0" in line and "are kept" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- paths


def test_relative_paths_are_stored_absolute_and_the_run_resumes_and_exports_from_elsewhere(teacher, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(teacher, tmp_path)
    assert main(distill(relative, "run", "--max-steps", "1", "cache_dir=cache")) == 0
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"] == "teacher"  # a name, not a path
    for key, path in (("teacher", teacher), ("output", tmp_path / "run"), ("cache_dir", tmp_path / "cache")):
        assert os.path.isabs(stored[key]) and Path(stored[key]).resolve() == path.resolve(), key

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["distill", "--config", str(tmp_path / "run" / "config.yaml"), "--resume", "latest",
                 "--max-steps", "2"]) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))[0] == 2
    assert main(["export", "--run", str(tmp_path / "run"), "--output", "out"]) == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == ["out"]
