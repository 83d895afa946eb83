"""The wheel holds every listed package and bundled file and installs nothing but ``fastgen`` at the top level;
the installed ``fastgen`` holds its listed sub-packages and nothing else of the checkout."""

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastgen
import fastgen.losses
import fastgen.losses.dmd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory, packages):
    """The wheel built from a copy of pyproject.toml, README.md and the package folders: a build in the checkout
    would write there, and its leftover ``build/`` would add stale modules to the wheel."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in packages.values():
        shutil.copytree(folder, source / folder.relative_to(ROOT), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-w", str(out), "-q"], check=True, cwd=out)
    (wheel,) = out.glob("fastgen_distill-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_the_wheel_holds_the_modules_of_the_listed_packages_and_no_others(wheel_names, packages):
    expected = {"fastgen", "fastgen.data", "fastgen.losses", "fastgen.samplers", "fastgen.pipelines", "fastgen.eval"}
    assert expected <= set(packages), expected - set(packages)
    modules = set()
    for package, source in packages.items():
        assert (source / "__init__.py").is_file(), source
        modules |= {f"{package.replace('.', '/')}/{p.name}" for p in source.glob("*.py")}
    in_wheel = {name for name in wheel_names if name.endswith(".py")}
    assert not modules - in_wheel, f"missing from the wheel: {sorted(modules - in_wheel)}"
    assert not in_wheel - modules, f"in the wheel without a source: {sorted(in_wheel - modules)}"


def test_every_package_folder_is_listed(packages):
    """setuptools leaves a package out of the wheel, silently, unless pyproject.toml lists it."""
    folders = {source.resolve() for source in packages.values()}
    for source in packages.values():
        for init in source.rglob("__init__.py"):
            assert init.parent.resolve() in folders, f"{init.parent} is not in pyproject.toml's packages"


def test_bundled_toy_assets_and_presets_are_in_the_wheel(wheel_names):
    bundled = [*(ROOT / "fastgen" / "assets").rglob("*"), *(ROOT / "fastgen" / "configs").glob("*.yaml")]
    files = [p.relative_to(ROOT).as_posix() for p in bundled if p.is_file()]
    assert any(f.startswith("fastgen/configs/toy_") for f in files)
    assert any(f.endswith("toy_teacher/unet/diffusion_pytorch_model.safetensors") for f in files)
    assert any(f.startswith("fastgen/assets/toy_features/") for f in files)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "model_index.json"):
        assert f"fastgen/assets/toy_t2i/{part}" in files, part
    for f in files:
        assert f in wheel_names, f"{f} missing from the wheel"


def test_nothing_but_fastgen_at_the_top_level(wheel_names):
    top = {name.split("/")[0] for name in wheel_names}
    top = {t for t in top if not t.endswith(".dist-info")}
    assert top == {"fastgen"}, top


@pytest.mark.parametrize("name", ["fastgen.tests", "fastgen.scripts", "fastgen.docs", "fastgen.fastgen"])
def test_only_listed_packages_import_under_fastgen(name):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_fastgen_is_one_folder():
    assert len(fastgen.__path__) == 1, fastgen.__path__


def test_the_registry_holds_the_classes_of_the_modules():
    """One copy of each module: none imported again under a top-level name (``losses.dmd``)."""
    assert fastgen.losses.OBJECTIVES["dmd"] is fastgen.losses.dmd.DMD
    for method, objective in fastgen.losses.OBJECTIVES.items():
        if objective.__module__ == "probes":  # the engine tests' own objectives (tests/probes.py)
            continue
        assert objective.__module__.startswith("fastgen.losses."), (method, objective.__module__)
        assert getattr(sys.modules[objective.__module__], objective.__qualname__) is objective, method
    assert not {"losses", "samplers", "pipelines", "eval"} & set(sys.modules)
