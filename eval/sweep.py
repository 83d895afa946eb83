"""Quality against the number of sampling steps: every curve (e.g. "student", "teacher") at every step
count, under every metric (FID, toy FID, CLIP score, ... any ``images -> float``).

Writes to ``out_dir``: ``sweep.csv`` (full precision), ``sweep.md`` (a Markdown table) and ``sweep.png``
(one subplot per metric, metric against steps on a log2 axis, one line per curve). The CSV and Markdown
files are rewritten after every row, so an interrupted sweep keeps what it measured; every file is
replaced atomically. Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from tqdm.auto import tqdm

from fastgen.atomic import write_bytes

RESERVED_COLUMNS = ("curve", "steps")


def run_sweep(curves: Mapping[str, Callable[[int], Any]], steps: Sequence[int],
              metrics: Mapping[str, Callable[[Any], float]], out_dir: str | os.PathLike,
              float_format: str = ".4g", progress: bool = True, note: str | None = None) -> list[dict]:
    """Evaluate ``metric(curve(n))`` for every curve, step count ``n`` and metric; return the rows
    ``{"curve": name, "steps": n, <metric>: value, ...}`` in curve-major order.

    ``float_format`` formats the Markdown table only; ``note``, a paragraph written under it.
    """
    _validate(curves, steps, metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(RESERVED_COLUMNS) + list(metrics)
    rows: list[dict] = []
    with tqdm(total=len(curves) * len(steps), desc="sweep", unit="run", disable=not progress) as bar:
        for curve_name, curve in curves.items():
            for num_steps in steps:
                bar.set_postfix_str(f"{curve_name} @ {num_steps} steps")
                images = curve(num_steps)
                row = {"curve": curve_name, "steps": num_steps}
                for metric_name, metric in metrics.items():
                    row[metric_name] = _as_float(metric(images), metric_name, curve_name, num_steps)
                rows.append(row)
                write_bytes(out_dir / "sweep.csv", _csv_text(rows, columns))
                write_bytes(out_dir / "sweep.md", _markdown_text(rows, columns, float_format, note))
                bar.update(1)
    write_bytes(out_dir / "sweep.png", _plot_png(rows, list(curves), list(steps), list(metrics)))
    return rows


def _validate(curves, steps, metrics) -> None:
    if not curves or not all(callable(curve) for curve in curves.values()):
        raise ValueError(f"run_sweep: curves={dict(curves)!r}, expected a non-empty mapping of name -> callable(steps)")
    if not metrics or not all(callable(metric) for metric in metrics.values()):
        raise ValueError(f"run_sweep: metrics={dict(metrics)!r}, expected a non-empty mapping of name -> "
                         f"callable(images)")
    clashes = [name for name in metrics if name in RESERVED_COLUMNS]
    if clashes:
        raise ValueError(f"run_sweep: metric name(s) {clashes} clash with the columns {RESERVED_COLUMNS}")
    if not steps or not all(isinstance(n, int) and n >= 1 for n in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"run_sweep: steps={list(steps)!r}, expected distinct positive ints")


def _as_float(value, metric_name: str, curve_name: str, num_steps: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"run_sweep: metric {metric_name!r} returned {value!r} for curve {curve_name!r} at "
                         f"{num_steps} steps, expected a number") from None


def _csv_text(rows: list[dict], columns: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _markdown_text(rows: list[dict], columns: list[str], float_format: str, note: str | None = None) -> bytes:
    def cell(value) -> str:
        return format(value, float_format) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    lines += ["", note] if note else []
    return ("\n".join(lines) + "\n").encode()


def _plot_png(rows: list[dict], curve_names: list[str], steps: list[int], metric_names: list[str]) -> bytes:
    figure = Figure(figsize=(4.5 * len(metric_names), 3.5), layout="constrained")
    axes = figure.subplots(1, len(metric_names), squeeze=False)[0]
    ordered = sorted(steps)
    for ax, metric_name in zip(axes, metric_names):
        for curve_name in curve_names:
            value = {row["steps"]: row[metric_name] for row in rows if row["curve"] == curve_name}
            ax.plot(ordered, [value[n] for n in ordered], marker="o", label=curve_name)
        ax.set_xscale("log", base=2)
        values = [row[metric_name] for row in rows]
        if min(values) > 0 and max(values) > 10 * min(values):  # FID spans decades between 1 and 64 steps
            ax.set_yscale("log")
        ax.set_xticks(ordered, [str(n) for n in ordered])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric_name)
        ax.set_title(metric_name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
