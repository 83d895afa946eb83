"""Faults outside the arguments: damaged checkpoints, caches and exports, a full disk, hostile data, stale temporaries.

Each user-facing case runs the command line (``fastgen.cli.main`` in-process, or ``python -m fastgen`` where the
real terminal matters) and checks its exit status, that stderr holds no traceback and that its last line is its
only ``error:`` line. Trainings are 2-3 steps of a tiny pixel teacher.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import make_ddpm_folder, make_sd_folder

import fastgen.checkpoint
import fastgen.data.cache
from fastgen.atomic import HOST, atomic_folder, atomic_path
from fastgen.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from fastgen.cli import main
from fastgen.data.images import load_image, open_image
from fastgen.data.teacher_pairs import teacher_samples
from fastgen.errors import InputError, NoSpaceError
from fastgen.integrity import MANIFEST, DamagedFileError
from fastgen.teacher import load_teacher

STEP = "step-{:08d}".format


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_ddpm_folder(tmp_path_factory.mktemp("faults") / "teacher", sample_size=8)


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory) -> Path:
    return make_sd_folder(tmp_path_factory.mktemp("faults-sd") / "teacher")


def distill(teacher: Path, run: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--method", "consistency", "--data", "teacher", "--output", str(run),
            "--steps", "2", "teacher_samples=8", "teacher_sample_steps=2", "train.batch_size=4",
            "train.checkpoint_every=1", *extra]


@pytest.fixture(scope="module")
def finished(teacher, tmp_path_factory) -> Path:
    """A 2-step run with checkpoints step-1 and step-2 and its export in ``run/export``."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(distill(teacher, run, "--max-steps", "2")) == 0
    assert [p.name for p in list_checkpoints(run)] == [STEP(1), STEP(2)]
    return run


def copy_run(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def flip_byte(file: Path, from_end: int = 10) -> None:
    """Flip one bit of the byte ``from_end`` bytes before the end (in a safetensors file: tensor data, so the
    header still parses and only a hash can tell)."""
    with file.open("r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a failed command, checked to be stderr's last line, with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    return lines[0]


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- damaged checkpoints


def test_a_damaged_checkpoint_is_named_and_skipped_by_export_and_resume(teacher, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    damaged = run / "checkpoints" / STEP(2) / "state.safetensors"
    flip_byte(damaged)
    with pytest.raises(DamagedFileError, match=rf"{damaged} is damaged: its sha256 differs"):
        load_checkpoint(damaged.parent)

    argv = ["export", "--run", str(run), "--output", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "fastgen", *argv], capture_output=True, text=True,
                          env={**os.environ, "FASTGEN_DEBUG": ""})
    assert done.returncode == 0, done.stderr
    assert warnings_of(done.stderr) == [
        f"warning: skipped damaged checkpoint {STEP(2)} ({damaged} is damaged: its sha256 differs from the one "
        f"{MANIFEST} recorded when it was written (same size, other bytes)); using {run / 'checkpoints' / STEP(1)}"]
    assert main(["export", "--run", str(run), "--checkpoint", str(run / "checkpoints" / STEP(1)),
                 "--output", str(tmp_path / "from-step-1")]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    exported, reference = load_file(tmp_path / "out" / weights), load_file(tmp_path / "from-step-1" / weights)
    assert all(torch.equal(exported[k], reference[k]) for k in reference)

    capsys.readouterr()
    assert main(distill(teacher, run, "--max-steps", "3", "--resume", "latest")) == 0
    err = capsys.readouterr().err
    superseded = run / "checkpoints" / f"superseded-{STEP(2)}"
    assert len(warnings_of(err)) == 2 and f"skipped damaged checkpoint {STEP(2)}" in warnings_of(err)[0]
    assert warnings_of(err)[1] == f"warning: resuming from step 1: set the later checkpoints aside, kept but no " \
                                  f"longer used: {superseded}"
    # resumed from step 1, it wrote step 2 again (intact now) and step 3; the damaged step 2 is kept aside
    assert [p.name for p in list_checkpoints(run)] == [STEP(2), STEP(3)]
    assert load_checkpoint(run / "checkpoints" / STEP(2))[0] == 2 and latest_checkpoint(run).name == STEP(3)
    with pytest.raises(DamagedFileError):  # the damaged one, kept as it was
        load_checkpoint(superseded)


def test_a_resume_past_a_damaged_checkpoint_keeps_the_intact_one_it_resumed_from(teacher, finished, tmp_path):
    """Checkpoints 1 (intact) and 2 (damaged), a resume to step 3 that saves only at its end: pruning to the
    newest two kept the damaged 2 and deleted 1, the only intact fallback; now 2 is set aside first."""
    run = copy_run(finished, tmp_path)
    flip_byte(run / "checkpoints" / STEP(2) / "state.safetensors")
    assert main(distill(teacher, run, "--max-steps", "3", "--resume", "latest", "train.checkpoint_every=0")) == 0
    assert [p.name for p in list_checkpoints(run)] == [STEP(1), STEP(3)]
    assert load_checkpoint(run / "checkpoints" / STEP(1))[0] == 1
    assert (run / "checkpoints" / f"superseded-{STEP(2)}" / "state.safetensors").is_file()


def test_a_checkpoint_of_another_run_is_checked_by_export_and_resume_takes_a_name(teacher, finished, tmp_path,
                                                                                    capsys, monkeypatch):
    """``export --run A --checkpoint <B's>`` exported B's consistency student as A's dmd2 one (A's method, grid and
    card); it is refused as ``--resume`` refuses it. ``--resume step-N`` names a checkpoint of the run, from any
    working directory, as ``export --checkpoint`` does."""
    other = tmp_path / "other"
    assert main(["distill", "--teacher", str(teacher), "--method", "dmd2", "--data", "teacher", "--output", str(other),
                 "--max-steps", "1", "teacher_samples=8", "teacher_sample_steps=2", "train.batch_size=4"]) == 0
    capsys.readouterr()
    foreign = finished / "checkpoints" / STEP(2)
    assert main(["export", "--run", str(other), "--checkpoint", str(foreign), "--output", str(tmp_path / "x")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --checkpoint {foreign}: a checkpoint of run {finished.resolve()}, trained with "
                           "other settings") and "method 'consistency' -> 'dmd2'" in line, line
    assert not (tmp_path / "x").exists()

    run = copy_run(finished, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(distill(teacher, run, "--max-steps", "3", "--resume", STEP(1))) == 0
    assert load_checkpoint(latest_checkpoint(run))[0] == 3
    capsys.readouterr()
    assert main(distill(teacher, run, "--max-steps", "4", "--resume", "step-9")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"available in {run / 'checkpoints'}: " in line and line.endswith(STEP(3)), line


def test_a_resume_at_or_past_max_steps_says_nothing_is_trained(teacher, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    capsys.readouterr()
    assert main(distill(teacher, run, "--max-steps", "1", "--resume", "latest")) == 0
    assert warnings_of(capsys.readouterr().err) == [
        "warning: resuming at step 2, at or past train.max_steps = 1: nothing is trained and step 2 is exported; "
        "expected a larger --max-steps to train further"]
    assert load_checkpoint(latest_checkpoint(run))[0] == 2


def test_no_intact_checkpoint_is_one_error_naming_each(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    flip_byte(run / "checkpoints" / STEP(2) / "state.safetensors")
    (run / "checkpoints" / STEP(1) / "state.json").write_text("{")  # a changed size: cut short
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"no intact checkpoint in {run / 'checkpoints'}" in line
    assert f"{STEP(2)} (" in line and "state.safetensors is damaged" in line
    assert f"{STEP(1)} (" in line and "state.json is damaged: it is 1 bytes" in line
    assert not (tmp_path / "out").exists()


def test_checkpoints_without_manifest_still_load_and_a_removed_manifest_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.arange(3)})
    (path / MANIFEST).unlink()
    with pytest.raises(InputError, match=rf"{path / MANIFEST} is missing"):
        load_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({"format_version": 1, "step": 1}))  # as written before manifests
    assert torch.equal(load_checkpoint(path)[1]["w"], torch.arange(3))


# ----------------------------------------------------------------------------- damaged caches


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_cache_is_rebuilt_with_one_warning(teacher, tmp_path, capsys, damage):
    model = load_teacher(teacher)
    first = teacher_samples(model, tmp_path, count=8, steps=2, seed=0, uncond=None, batch_size=4)
    [file] = tmp_path.glob("teacher-samples-*.safetensors")
    written = file.read_bytes()
    if damage == "flipped byte":
        flip_byte(file)
    else:
        file.write_bytes(written[: len(written) // 2])
    capsys.readouterr()
    again = teacher_samples(model, tmp_path, count=8, steps=2, seed=0, uncond=None, batch_size=4)
    [warning] = warnings_of(capsys.readouterr().err)
    expected = "its tensors differ from the digest" if damage == "flipped byte" else "is incomplete or corrupt"
    assert warning.startswith(f"warning: rebuilding {file}: ") and expected in warning
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    rebuilt = load_file(file)
    assert all(torch.equal(rebuilt[k], first[k]) for k in first)
    capsys.readouterr()
    teacher_samples(model, tmp_path, count=8, steps=2, seed=0, uncond=None, batch_size=4)
    assert warnings_of(capsys.readouterr().err) == []  # intact now: read, not rebuilt


# ----------------------------------------------------------------------------- damaged exports


def export_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished / "export", tmp_path / "student"))


def sample(folder: Path, tmp_path: Path) -> list[str]:
    return ["sample", "--model", str(folder), "--steps", "1", "--num", "1", "--out", str(tmp_path / "g.png")]


def test_an_export_records_a_manifest_that_is_verified_on_load(finished, tmp_path, capsys):
    folder = export_copy(finished, tmp_path)
    listed = json.loads((folder / MANIFEST).read_text())  # written by the export itself, the card left out
    assert "unet/diffusion_pytorch_model.safetensors" in json.dumps(listed) and "README.md" not in json.dumps(listed)
    assert main(sample(folder, tmp_path)) == 0
    (folder / "README.md").write_text("edited card")  # not in the manifest
    assert main(sample(folder, tmp_path)) == 0
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    flip_byte(weights, from_end=100)
    capsys.readouterr()
    assert main(sample(folder, tmp_path)) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {weights} is damaged: its sha256 differs from the one {MANIFEST} recorded when it was written "
        "(same size, other bytes)")


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def cut(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def pickled_weights(folder: Path) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()


# (id, damage (folder) -> None, substrings of the one error line)
EXPORT_DAMAGE = [
    ("index-cut", lambda f: cut(f / "model_index.json"), ["model_index.json is not valid JSON", "model index"]),
    ("metadata-cut", lambda f: cut(f / "fastgen_export.json", 0.1),
     ["fastgen_export.json is not valid JSON", "fastgen export metadata"]),
    ("metadata-key-missing", lambda f: edit_json(f / "fastgen_export.json", few_step_scheduler=None),
     ["fastgen_export.json has no key 'few_step_scheduler'", "scheduler's settings"]),
    ("metadata-not-object", lambda f: (f / "fastgen_export.json").write_text("[1]"),
     ["fastgen_export.json holds a list", "JSON object"]),
    ("weights-cut", lambda f: cut(f / "unet" / "diffusion_pytorch_model.safetensors"),
     ["diffusion_pytorch_model.safetensors is incomplete or corrupt"]),
    ("config-cut", lambda f: cut(f / "unet" / "config.json"), ["unet/config.json is not valid JSON"]),
    ("custom-component", lambda f: edit_json(f / "model_index.json", unet=["my_unet", "MyUNet"]),
     ["component 'unet' is ['my_unet', 'MyUNet']", "class of diffusers or transformers"]),
    ("non-class-component", lambda f: edit_json(f / "model_index.json", unet=["diffusers", "utils"]),
     ["component 'unet' is ['diffusers', 'utils']"]),
    ("custom-pipeline", lambda f: edit_json(f / "model_index.json", _class_name=["evil", "EvilPipeline"]),
     ["_class_name is ['evil', 'EvilPipeline']", "expected 'DDPMPipeline'"]),
    ("metadata-pipeline", lambda f: edit_json(f / "fastgen_export.json", pipeline="EvilPipeline"),
     ["pipeline is 'EvilPipeline'", "diffusers pipeline class"]),
    ("auto-map", lambda f: edit_json(f / "unet" / "config.json", auto_map={"AutoModel": "modeling.Evil"}),
     ["unet/config.json names custom code (auto_map", "runs no code from the folder"]),
    ("pickled-weights", pickled_weights, ["diffusion_pytorch_model.bin is a pickle file", ".safetensors only"]),
    ("denoiser-missing", lambda f: edit_json(f / "model_index.json", unet=None),
     ["model_index.json has no component 'unet'"]),
]


@pytest.mark.parametrize("name, damage, expected", EXPORT_DAMAGE, ids=[c[0] for c in EXPORT_DAMAGE])
def test_a_damaged_export_is_one_error_line_naming_the_file(finished, tmp_path, capsys, name, damage, expected):
    """Each file's own check, as for an export without a manifest (written before manifests, or edited by hand
    and its manifest removed); with the manifest the first damaged file is named by it."""
    folder = export_copy(finished, tmp_path)
    (folder / MANIFEST).unlink()
    damage(folder)
    capsys.readouterr()
    assert main(sample(folder, tmp_path)) == 1
    line = one_error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert not (tmp_path / "g.png").exists()


def test_eval_of_a_damaged_export_is_one_error_line(finished, tmp_path, capsys):
    folder = export_copy(finished, tmp_path)
    (folder / MANIFEST).unlink()
    cut(folder / "model_index.json")
    capsys.readouterr()
    code = main(["eval", "--model", str(folder), "--steps", "1", "--features", "toy", "--num-samples", "4", "--out",
                 str(tmp_path / "e")])
    assert code == 1 and "model_index.json is not valid JSON" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- disk full, file too large


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoints(teacher, finished, tmp_path, monkeypatch,
                                                                        capsys):
    run = copy_run(finished, tmp_path)
    real_save_file = fastgen.checkpoint.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)  # what had fit
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(fastgen.checkpoint, "save_file", full_disk)
    capsys.readouterr()
    assert main(distill(teacher, run, "--max-steps", "3", "--resume", "latest")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {run / 'checkpoints' / STEP(3)}: No space left on device; it needs "
                           "about ")
    assert f"the earlier checkpoints in {run / 'checkpoints'} are intact and the partial write was removed" in line
    assert line.endswith(f"free space (or write elsewhere) and resume with: fastgen distill --config "
                         f"{run / 'config.yaml'} --resume auto")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == [STEP(1), STEP(2)]
    assert hidden(run / "checkpoints") == []
    assert load_checkpoint(latest_checkpoint(run))[0] == 2


def test_disk_full_at_a_runs_first_checkpoint_says_so_and_its_advice_works(teacher, tmp_path, monkeypatch, capsys):
    """No checkpoint before the full disk: the error says so (not "the earlier checkpoints are intact"), and the
    command it gives continues the run (running the first command again is refused: the folder holds a run)."""
    run = tmp_path / "run"

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(fastgen.checkpoint, "save_file", full_disk)
    assert main(distill(teacher, run, "--max-steps", "1")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no checkpoint of this run was written before and the partial write was removed" in line
    monkeypatch.undo()
    command = line.split("resume with: ")[1].split()
    assert command[:2] == ["fastgen", "distill"] and main(command[1:]) == 0
    assert [p.name for p in list_checkpoints(run)] == [STEP(1)] and (run / "export" / "model_index.json").is_file()


def test_file_too_large_for_real_through_the_command(teacher, finished, tmp_path):
    """A file-size limit (``ulimit -f``) makes safetensors' own writer fail with EFBIG, as a full disk would."""
    run = copy_run(finished, tmp_path)
    limit = (run / "checkpoints" / STEP(2) / "state.safetensors").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = distill(teacher, run, "--max-steps", "3", "--resume", "latest")
    done = subprocess.run([sys.executable, "-m", "fastgen", *argv], capture_output=True, text=True,
                          preexec_fn=small_files, env={**os.environ, "FASTGEN_DEBUG": ""})
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: cannot write {run / 'checkpoints' / STEP(3)}: File too large")
    assert "are intact" in line and "ulimit -f" in line
    assert [p.name for p in list_checkpoints(run)] == [STEP(1), STEP(2)] and hidden(run / "checkpoints") == []
    assert load_checkpoint(latest_checkpoint(run))[0] == 2


def test_disk_full_while_caching_is_one_line_and_leaves_no_file(teacher, tmp_path, monkeypatch, capsys):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fastgen.data.cache, "save_file", full_disk)
    cache = tmp_path / "cache"
    capsys.readouterr()
    assert main(distill(teacher, tmp_path / "run", "--max-steps", "1", f"cache_dir={cache}")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {cache}/teacher-samples-")
    assert "No space left on device; it needs about" in line and "nothing was written to" in line
    assert list(cache.iterdir()) == []


def test_atomic_folder_out_of_space_keeps_the_previous_folder(tmp_path):
    """What an export writer gets from ``atomic_folder``: the previous folder as it was, no temporary left."""
    out = tmp_path / "export"
    with atomic_folder(out) as folder:
        (folder / "weights").write_text("previous")
    with pytest.raises(NoSpaceError) as info:
        with atomic_folder(out, needed=123_456) as folder:
            (folder / "weights").write_text("partial")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(info.value).startswith(f"cannot write {out}: Disk quota exceeded; it needs about 123,456 bytes, ")
    assert f"the previous {out} is intact" in str(info.value) and info.value.errno == errno.EDQUOT
    assert (out / "weights").read_text() == "previous" and hidden(tmp_path) == []
    with pytest.raises(OSError, match="Permission denied"):  # other errors pass through unchanged
        with atomic_path(tmp_path / "file"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ----------------------------------------------------------------------------- hostile data


def captioned_folder(tmp_path: Path, names: list[str], metadata: str = "metadata.jsonl") -> Path:
    folder = tmp_path / "captioned"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(folder / "a.png")
    if metadata.endswith(".jsonl"):
        (folder / metadata).write_text("".join(json.dumps({"file_name": n, "text": "red"}) + "\n" for n in names))
    else:
        (folder / metadata).write_text("file_name,text\n" + "".join(f"{n},red\n" for n in names))
    return folder


def symlink_shard(tmp_path: Path) -> Path:
    """A webdataset shard with an image and a caption member that is a symbolic link to /etc/passwd."""
    path = tmp_path / "train.tar"
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    link = tarfile.TarInfo("0.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "a.png", arcname="0.png")
        tar.addfile(link)
    return path


DATA_CASES = [
    ("absolute-file-name", lambda t: captioned_folder(t, ["a.png", "/etc/passwd"]),
     ["metadata.jsonl line 2: file_name '/etc/passwd' leaves the folder"]),
    ("parent-file-name", lambda t: captioned_folder(t, ["../../secret.png", "a.png"]),
     ["metadata.jsonl line 1: file_name '../../secret.png' leaves the folder"]),
    ("csv-parent-file-name", lambda t: captioned_folder(t, ["a.png", "sub/../../x.png"], "metadata.csv"),
     ["metadata.csv line 3: file_name 'sub/../../x.png' leaves the folder"]),
    ("shard-symlink", symlink_shard,
     ["train.tar: member '0.txt' is a symbolic link (to '/etc/passwd')"]),
]


@pytest.mark.parametrize("name, make, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_captioned_data_leaving_its_folder_is_one_error_line(sd_teacher, tmp_path, capsys, name, make, expected):
    data = make(tmp_path)
    argv = ["distill", "--teacher", str(sd_teacher), "--method", "consistency", "--data", str(data), "--output",
            str(tmp_path / "run"), "--max-steps", "1", "train.batch_size=1"]
    capsys.readouterr()
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert not (tmp_path / "run").exists()


def test_a_shard_member_outside_the_shard_is_refused(tmp_path):
    from fastgen.data.captions import check_shard

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    path = tmp_path / "train.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(tmp_path / "a.png", arcname="../../escape.png")
    with pytest.raises(InputError, match=r"member '\.\./\.\./escape\.png' lies outside the shard"):
        check_shard(path)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` 8-bit RGB pixels, with almost no data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_from_its_header(teacher, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    png_header(images / "bomb.png", 10_000, 10_000)  # above PIL.Image.MAX_IMAGE_PIXELS, below twice it
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--method", "consistency", "--data", str(images), "--output",
                 str(tmp_path / "run"), "--max-steps", "1", "train.batch_size=1"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"image {images / 'bomb.png'} is 10000x10000 (100,000,000 pixels), above the limit of " in line
    assert "refused before decoding" in line and not (tmp_path / "run").exists()
    with pytest.raises(InputError, match=r"huge\.png is refused before decoding: .*exceeds limit"):  # PIL's own check
        open_image(png_header(tmp_path / "huge.png", 100_000, 100_000), f"image {tmp_path / 'huge.png'}")


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = (np.arange(8 * 64).reshape(8, 64) * 128).astype(np.uint16)  # 0 .. 65408
    Image.fromarray(levels).save(tmp_path / "gradient.png")
    with Image.open(tmp_path / "gradient.png") as image:
        assert image.mode == "I;16"
    expected = torch.from_numpy(np.round(levels / 65535 * 255).astype(np.float32) / 127.5 - 1.0)
    rgb = load_image(tmp_path / "gradient.png", (8, 64), channels=3)
    assert rgb.shape == (3, 8, 64) and all(torch.equal(rgb[c], expected) for c in range(3))
    assert torch.equal(load_image(tmp_path / "gradient.png", (8, 64), channels=1)[0], expected)
    assert len(rgb.unique()) == 256 and float((rgb == 1.0).float().mean()) < 0.01  # a gradient, not white


# ----------------------------------------------------------------------------- stale temporaries


def gone_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temporaries_are_removed_on_the_next_write_and_live_ones_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = tmp_path / "checkpoints"
        root.mkdir()
        killed = root / f".step-00000002.tmp-{gone_pid()}-{HOST}-0123abcd"
        running = root / f".step-00000003.tmp-{live.pid}-{HOST}-4567cdef"
        old_elsewhere = root / ".step-00000004.tmp-77-other-host-89abcdef"
        new_elsewhere = root / ".step-00000005.tmp-78-other-host-89abcdef"
        for folder in (killed, running, old_elsewhere, new_elsewhere):
            folder.mkdir()
            (folder / "state.safetensors").write_bytes(b"partial")
        two_days_ago = time.time() - 2 * 24 * 3600
        for path in (old_elsewhere / "state.safetensors", old_elsewhere):
            os.utime(path, (two_days_ago, two_days_ago))
        cache = tmp_path / "cache"
        cache.mkdir()
        killed_file = cache / f".uncond-1.safetensors.tmp-{gone_pid()}-{HOST}-0123abcd"
        killed_file.write_bytes(b"partial")
        other_file = cache / "notes.tmp"

        other_file.write_text("not ours")
        save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
        with atomic_path(cache / "prompts-2.safetensors") as tmp:
            tmp.write_bytes(b"new")
        assert hidden(root) == sorted([running.name, new_elsewhere.name])
        assert sorted(p.name for p in cache.iterdir()) == ["notes.tmp", "prompts-2.safetensors"]
        assert [p.name for p in list_checkpoints(tmp_path)] == [STEP(1)]
    finally:
        live.kill()
        live.wait()
    save_checkpoint(tmp_path, 2, {"w": torch.ones(1)})
    assert hidden(tmp_path / "checkpoints") == [new_elsewhere.name]  # its writer is gone now


# ----------------------------------------------------------------------------- a damaged config.yaml


def resume(run: Path, *extra: str) -> list[str]:
    return ["distill", "--config", str(run / "config.yaml"), "--output", str(run), "--resume", "latest", *extra]


def test_a_config_cut_short_is_refused_on_resume_not_trained_on_defaults(finished, tmp_path, capsys):
    """Cut before ``train:`` (the sections every config.yaml has), or one line of ``train`` gone (the keys the
    checkpoint recorded): one line naming what is missing, and the run left as it was."""
    run = copy_run(finished, tmp_path)
    text = (run / "config.yaml").read_text()
    for damaged, missing in [(text[: text.index("\ntrain:")], "train"),
                             ("".join(line for line in text.splitlines(keepends=True)
                                      if not line.strip().startswith("batch_size:")), "train.batch_size")]:
        (run / "config.yaml").write_text(damaged)
        before = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
        capsys.readouterr()
        assert main(resume(run, "--max-steps", "3")) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "config.yaml is cut short or damaged" in line and missing in line, line
        assert (run / "config.yaml").read_text() == damaged  # not rewritten
        assert sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file()) == before


def test_a_resume_with_other_settings_than_the_checkpoint_recorded_says_so(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    capsys.readouterr()
    assert main(resume(run, "--max-steps", "3", "train.lr=3e-4")) == 0
    said = [line for line in warnings_of(capsys.readouterr().err) if "other than it was trained with" in line]
    assert len(said) == 1 and said[0].endswith("train.lr 0.0001 -> 0.0003"), said  # (more steps: expected)


@pytest.mark.parametrize("name, content, expected", [
    ("metadata.csv", b"file_name,text\nx.png,hello,extra\n", "line 2 has 1 more field(s) than its header"),
    ("metadata.jsonl", '{"file_name": "x.png", "text": "caf\xe9"}\n'.encode("latin-1"), "is not UTF-8 text"),
], ids=["csv-extra-field", "not-utf8"])
def test_a_malformed_metadata_file_is_one_line_naming_it(tmp_path, name, content, expected):
    from fastgen.data.captions import check_metadata

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as info:
        check_metadata(tmp_path / name)
    assert str(info.value).startswith(f"{tmp_path / name}") and expected in str(info.value)
