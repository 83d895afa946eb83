"""Test-session settings: the installed fastgen, one CPU thread per process, one layer per test module.

Tests run against the installed package (``pip install -e ".[test]"`` while developing, ``pip install ".[test]"``
in CI). ``python -m pytest`` puts the working directory first on ``sys.path``; from the repository root its
``fastgen/`` folder would shadow the installed package, and that folder alone lacks the sub-packages which
pyproject.toml maps from ``losses/``, ``samplers/``, ``pipelines/`` and ``eval/``. So the session drops the
checkout from ``sys.path``, checks that every listed package imports from the installation (and, for a regular
install, that it holds this checkout's code), and runs tests, and the Python processes they start, outside the
checkout.

On a busy 2-core machine, multithreaded torch and BLAS kernels fight each other: measured here, the
same files ran 3-5x faster with one thread. The variables must be set before numpy loads its BLAS.
"""

import filecmp
import importlib.util
import os
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML dependency
    import tomli as tomllib

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Each test module's layer (its heaviest test's): `python -m pytest -m unit` runs the fast ones.
#   unit         pure math, config and file formats, in this process
#   integration  tiny diffusers pipelines and teachers, real networks, a few training steps, in this process
#   e2e          the command line, child processes, whole distillations, the wheel
LAYERS = {
    "test_allocator": "e2e",
    "test_analytic": "unit",
    "test_asd": "integration",
    "test_attention": "integration",
    "test_bad_inputs": "e2e",
    "test_bench_gpu": "e2e",
    "test_checkpoint": "e2e",
    "test_cli": "e2e",
    "test_clip_score": "e2e",
    "test_compare_methods": "e2e",
    "test_config": "unit",
    "test_data": "integration",
    "test_data_captions": "integration",
    "test_data_sharding": "e2e",
    "test_demo": "e2e",
    "test_distributed": "e2e",
    "test_dmd": "integration",
    "test_estimate": "e2e",
    "test_export": "e2e",
    "test_export_experts": "e2e",
    "test_faults": "e2e",
    "test_families": "e2e",
    "test_family_presets": "e2e",
    "test_features": "integration",
    "test_fid": "integration",
    "test_health": "e2e",
    "test_jvp": "integration",
    "test_kid": "unit",
    "test_meanflow": "integration",
    "test_networks": "integration",
    "test_objectives": "integration",
    "test_objectives_families": "integration",
    "test_packaging": "e2e",
    "test_phased_dmd": "integration",
    "test_policies": "e2e",
    "test_preemption": "e2e",
    "test_quiet": "integration",
    "test_rcm": "integration",
    "test_reference": "unit",
    "test_samplers": "unit",
    "test_schedules": "unit",
    "test_scm": "integration",
    "test_sharding": "e2e",
    "test_sid": "integration",
    "test_sweep": "unit",
    "test_teacher": "integration",
    "test_toy": "integration",
    "test_toy_t2i": "e2e",
    "test_trainer": "e2e",
    "test_validation": "e2e",
    "test_video_tooling": "e2e",
    "test_zoo": "integration",
}


def listed_packages() -> dict[str, Path]:
    """``[tool.setuptools] packages`` of pyproject.toml, each with its source folder: its ``package-dir`` entry,
    else its parent's folder and its own name."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools.get("package-dir", {})

    def folder(package: str) -> Path:
        parent, _, name = package.rpartition(".")
        return ROOT / mapping[package] if package in mapping else folder(parent) / name

    return {package: folder(package) for package in setuptools["packages"]}


@pytest.fixture(scope="session")
def packages() -> dict[str, Path]:
    return listed_packages()


def installed_fastgen_problem() -> str | None:
    """Why the fastgen that imports here is not this checkout's, installed; None when it is."""
    if importlib.util.find_spec("fastgen") is None:
        return f"fastgen is not installed for {sys.executable}"
    for package, source in listed_packages().items():
        spec = importlib.util.find_spec(package)
        if spec is None:
            return f"{package} does not import from the installed fastgen"
        installed = Path(spec.origin).parent
        if installed == source:  # an editable install of this checkout
            continue
        for module in sorted(source.glob("*.py")):
            copy = installed / module.name
            if not copy.is_file() or not filecmp.cmp(module, copy, shallow=False):
                return (f"the installed {package} ({installed}) is not this checkout's: "
                        f"{module.relative_to(ROOT)} differs")
    return None


def pytest_sessionstart(session):
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
    problem = installed_fastgen_problem()
    if problem:
        raise pytest.UsageError(f'{problem}; from the repository root run `pip install -e ".[test]"` (or reinstall '
                                f'with `pip install ".[test]"` after every change)')


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every test with its module's layer, and run the modules layer by layer, slowest layer first: the two
    worker processes (pytest-xdist, one module each at a time) then end on short modules, not one long one."""
    for item in items:
        layer = LAYERS.get(item.path.stem)
        if layer is None:
            raise pytest.UsageError(f"{item.path.name} has no layer: add it to LAYERS in tests/conftest.py "
                                    "(unit, integration or e2e)")
        item.add_marker(layer)
    order = {"e2e": 0, "integration": 1, "unit": 2}
    items.sort(key=lambda item: order[LAYERS[item.path.stem]])


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """A Python process started in the checkout (``python -m fastgen``, ``python -c``) would import its
    ``fastgen/`` folder instead of the installed package: tests start theirs in a folder of their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """accelerate keeps process-wide state (mixed precision among it); every test starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
