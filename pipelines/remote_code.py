"""The custom code an export ships for loaders without fastgen, generated from the package's own classes.

diffusers loads a component whose class is not its own from a ``.py`` file in the component's folder
(``model_index.json`` entry ``["scheduling_few_step", "FewStepScheduler"]`` with
``scheduler/scheduling_few_step.py``) and a custom pipeline from a ``.py`` in the folder root
(``"_class_name": ["pipeline_few_step", "FewStepPipeline"]``), when the caller passes
``trust_remote_code=True``. ``module_source`` writes such a file from live objects: their own source
(``inspect.getsource``) and, transitively, the source of every fastgen function, class and literal constant
they name, preceded by the imports of everything else they name. There is one source, the package's; a
generated file imports only torch, numpy, diffusers and the standard library (checked here, so a dependency
on the rest of fastgen fails the export instead of the receiver) and is the same in every export of a version.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types

ALLOWED_ROOTS = ("torch", "numpy", "diffusers")
LITERALS = (str, int, float, bool, type(None))


def _is_literal(value) -> bool:
    if isinstance(value, (tuple, list, frozenset)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(_is_literal(k) and _is_literal(v) for k, v in value.items())
    return isinstance(value, LITERALS)


def _annotations(tree: ast.AST) -> set[int]:
    """The nodes of ``tree``'s annotations: the generated module postpones them (``from __future__ import
    annotations``), so the names they read need no import."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {id(sub) for root in roots if root is not None for sub in ast.walk(root)}


def _names(source: str, annotations: bool = False) -> list[str]:
    """Every name ``source`` reads outside annotations (``annotations``: inside them only), in order of first
    appearance."""
    tree = ast.parse(textwrap.dedent(source))
    inside = _annotations(tree)
    seen = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and (id(node) in inside) == annotations:
            seen.setdefault(node.id, None)
    return list(seen)


def _annotation_import(name: str, value) -> str | None:
    """The import of a name an annotation reads, where it comes from outside fastgen and from a module a generated
    file may import: diffusers resolves a pipeline's ``__init__`` annotations (its check of the components'
    types warns "cannot get type annotation" for a name it cannot find); ``None`` for anything else (annotations
    are postponed, so nothing fails without it)."""
    if getattr(value, "__module__", "fastgen").startswith("fastgen") or _is_literal(value):
        return None
    try:
        line = _import_line(name, value)
        _check_import(line)
    except (TypeError, ValueError):
        return None
    return line


def _import_line(name: str, value) -> str:
    if isinstance(value, types.ModuleType):
        return f"import {value.__name__}" + ("" if value.__name__ == name else f" as {name}")
    module = getattr(value, "__module__", None)
    if not module or getattr(sys.modules.get(module), name, None) is not value:
        raise TypeError(f"remote code: cannot import {name!r} ({value!r}) by name from its module {module!r}")
    return f"from {module} import {name}"


def _check_import(line: str) -> None:
    root = line.split()[1].split(".")[0]
    if root not in ALLOWED_ROOTS and root not in sys.stdlib_module_names:
        raise ValueError(f"remote code would need {line!r}; expected imports of {list(ALLOWED_ROOTS)} "
                         "or the standard library only")


def module_source(*objects, title: str) -> str:
    """The text of a module defining ``objects`` (fastgen classes or functions) and what they depend on."""
    imports: dict[str, None] = {}
    constants: dict[str, str] = {}
    definitions: list[str] = []
    done: set[int] = set()

    def visit(obj) -> None:
        if id(obj) in done:
            return
        done.add(id(obj))
        source = inspect.getsource(obj)
        module = sys.modules[obj.__module__]
        for name in _names(source, annotations=True):
            line = _annotation_import(name, vars(module)[name]) if name in vars(module) else None
            if line is not None:
                imports.setdefault(line, None)
        for name in _names(source):
            if name not in vars(module) or name == obj.__name__:
                continue
            value = vars(module)[name]
            if isinstance(value, (type, types.FunctionType)) and value.__module__.startswith("fastgen"):
                visit(value)
            elif _is_literal(value):
                constants.setdefault(name, f"{name} = {value!r}")
            else:
                imports.setdefault(_import_line(name, value), None)
        definitions.append(textwrap.dedent(source).rstrip())

    for obj in objects:
        visit(obj)
    for line in imports:
        _check_import(line)
    from fastgen import __version__

    header = f'"""{title}\n\nGenerated by fastgen {__version__} from its own source; do not edit."""'
    parts = [header, "from __future__ import annotations", "\n".join(sorted(imports)), "\n".join(constants.values()),
             *definitions]
    return "\n\n\n".join(p for p in parts if p) + "\n"


def scheduler_source() -> str:
    """``scheduling_few_step.py``: ``FewStepScheduler`` and the noise schedules and steps it uses."""
    from fastgen.samplers.scheduler import FewStepScheduler

    return module_source(FewStepScheduler, title="FewStepScheduler: the scheduler of a fastgen few-step student.")


def pipeline_source() -> str:
    """``pipeline_few_step.py``: ``FewStepPipeline``, the pipeline of a pixel-space student."""
    from fastgen.pipelines.few_step import FewStepPipeline

    return module_source(FewStepPipeline, title="FewStepPipeline: the pipeline of a fastgen pixel-space student.")


def denoiser_source(name: str) -> str:
    """``modeling_experts.py`` or ``modeling_meanflow.py``: fastgen's own denoiser model ``name`` (a key of
    ``fastgen.pipelines.export.CUSTOM_DENOISERS``: ``TimestepExperts``, ``MeanFlowModel``) and what it uses."""
    import importlib

    from fastgen.pipelines.export import CUSTOM_DENOISERS

    _, installed, what = CUSTOM_DENOISERS[name]
    return module_source(getattr(importlib.import_module(installed), name), title=f"{name}: {what}")
