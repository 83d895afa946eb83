"""The wheel holds every sub-package and bundled file, and installs nothing but ``fastgen`` at the top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"fastgen": "fastgen", "fastgen/losses": "losses", "fastgen/samplers": "samplers",
               "fastgen/pipelines": "pipelines", "fastgen/eval": "eval"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(out), "-q"], check=True, cwd=out)
    (wheel,) = out.glob("fastgen_distill-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_every_module_of_every_subpackage_is_in_the_wheel(wheel_names):
    for installed, source in SUBPACKAGES.items():
        modules = sorted(p.name for p in (ROOT / source).glob("*.py"))
        assert "__init__.py" in modules, source
        for module in modules:
            assert f"{installed}/{module}" in wheel_names, f"{source}/{module} missing from the wheel"


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
