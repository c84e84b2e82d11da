"""The files `circuits bench` writes: results.csv (its rows), results.md (a table and notes) and
the plots, each written whole to a temporary file and renamed over the old one.

Nothing here runs a model: the runner (`circuits.bench`) hands over its rows and a sentence
describing the run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError
from .evaluate import MIB_FRACTIONS
from .io import write_atomic

CURVE_COLUMNS = tuple(f"f_{100 * x:g}%" for x in MIB_FRACTIONS)
COLUMNS = (
    "task", "model", "method", "cpr", "cmd", "f_1%", "f_5%", "f_10%", "edges_f0.8", "roc_auc",
    "seconds", "forward", "backward", "peak_memory_mb", "n_discovery", "n_heldout", "n_edges",
    "options", "config",
) + tuple(c for c in CURVE_COLUMNS if c not in ("f_1%", "f_5%", "f_10%"))


# -- rows ---------------------------------------------------------------------------------------
def _atomic_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def _save_png(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG file, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    write_atomic(path, buf.getvalue())


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV (empty when there is none yet)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"task", "model", "method", "config"} <= set(
            reader.fieldnames
        ):
            raise OptionError(f"{path} is not a results table of `circuits bench`; move it away "
                              "or pass another --out folder")
        return list(reader)


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write the results CSV atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    _atomic_text(path, buf.getvalue())


def order_rows(rows: list[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str]
               ) -> list[dict[str, Any]]:
    """Rows grouped by task and model in run order (`tasks`), methods in the order of
    `methods`, then any rows of earlier runs that this one did not cover."""
    task_at = {t: i for i, t in enumerate(tasks)}
    method_at = {m: i for i, m in enumerate(methods)}
    big = len(task_at) + len(method_at) + 1
    return sorted(rows, key=lambda r: (task_at.get(r["task"], big), r["task"], r["model"],
                                       method_at.get(r["method"], big), r["method"]))


# -- report -------------------------------------------------------------------------------------
#: Each method's colour in every plot (matplotlib's tab10), so a method looks alike everywhere.
METHOD_COLOURS = {
    "eap": "#1f77b4", "eap-ig": "#ff7f0e", "eap-ig-stages": "#2ca02c", "exact": "#d62728",
    "acdc": "#9467bd", "eap-ig-activations": "#8c564b", "random": "#7f7f7f",
    "activation": "#e377c2", "grad-x-act": "#bcbd22", "attention-rollout": "#17becf",
    "edge-pruning": "#393b79", "ugs": "#637939",
}
# methods not named above take one of these, chosen by a hash of the name (tab20's light shades)
_SPARE_COLOURS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
                  "#dbdb8d", "#9edae5")


def method_colour(method: str) -> str:
    """The colour a method has in every plot `circuits bench` writes: fixed by its name.

    Examples
    --------
    >>> method_colour("eap"), method_colour("acdc")
    ('#1f77b4', '#9467bd')
    >>> method_colour("my-method") == method_colour("my-method")  # not in the table: a hash
    True
    """
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    digest = hashlib.sha256(method.encode("utf-8")).digest()
    return _SPARE_COLOURS[digest[0] % len(_SPARE_COLOURS)]


_MD_COLUMNS = (
    ("task", "task"), ("model", "model"), ("method", "method"), ("cpr", "CPR ↑"),
    ("cmd", "CMD ↓"), ("f_1%", "f@1%"), ("f_5%", "f@5%"), ("f_10%", "f@10%"),
    ("edges_f0.8", "edges f≥0.8"), ("roc_auc", "ROC AUC"), ("seconds", "time (s)"),
    ("forward", "fwd"), ("backward", "bwd"), ("peak_memory_mb", "peak MiB"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a markdown table (blank cells where a value is not known)."""
    lines = ["| " + " | ".join(h for _, h in _MD_COLUMNS) + " |",
             "|" + "|".join("---" if c in ("task", "model", "method") else "---:"
                            for c, _ in _MD_COLUMNS) + "|"]
    for row in rows:
        cells = []
        for col, _ in _MD_COLUMNS:
            value = row.get(col, "")
            value = "" if value is None else str(value)
            if col in ("cpr", "cmd", "f_1%", "f_5%", "f_10%", "roc_auc") and value not in ("",
                                                                                       "nan"):
                value = f"{float(value):.3f}"
            elif col == "seconds" and value:
                value = f"{float(value):.2f}"
            elif col in ("forward", "backward") and value:
                value = f"{float(value):g}"
            elif col == "peak_memory_mb" and value not in ("", "nan"):
                mib = float(value)
                value = f"{mib:.1f}" if mib >= 1 else f"{mib:.3f}"
            cells.append(value)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: Sequence[dict[str, Any]], command: str, settings: str,
                 notes: Sequence[str]) -> None:
    """Write results.md and the plots (curves per task, time against CPR) for `rows`, which
    `command` (``circuits bench --quick``) wrote with `settings` (prompts, split, seed, ...)."""
    plots = plot_results(out, rows)
    when = time.strftime("%Y-%m-%d %H:%M")
    head = [
        "# circuits bench results", "",
        f"Written {when} by `{command}` ({settings}).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__} with {torch.get_num_threads()} thread(s); load average "
        f"{os.getloadavg()[0]:.1f} when the report was written (other work on the machine "
        "slows every timing, and more torch threads than free cores slow it many times).", "",
        "Every column but time, passes and memory is measured on the held-out prompts: CPR "
        "and CMD are MIB's, the areas under f (edges ranked by signed score) and under |1 - f| "
        "(edges ranked by |score|) over MIB's edge fractions (0.1% ... 100% of the ungrouped "
        "edges); f@x is the faithfulness of the top x of the edges by signed score (pruned), "
        "the curve CPR is the area of, *edges f≥0.8* the smallest circuit reaching 0.8 and ROC "
        "AUC the ranking against the planted circuit, both in the method's own ranking "
        "(|score|, ACDC's signed). "
        "Time, passes and peak memory are those of scoring on the discovery prompts, the "
        "ablated run every method shares done beforehand: passes are forward-equivalents over "
        "the prompts (one plain forward of every prompt is 1), peak memory the most the method "
        "added at once on top of what was in use when it began (on the CPU the growth of the "
        "process's peak resident memory; see `circuits/cost.py`).", "",
        markdown_table(rows),
    ]
    if notes:
        head += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if plots:
        head += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    _atomic_text(out / "results.md", "\n".join(head))


def plot_results(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Faithfulness curves per task and model (one line per method) and time against CPR;
    a method has one colour in all of them (`method_colour`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["model"]), []).append(row)
    xs = list(MIB_FRACTIONS)
    for (task, model), group in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in group:
            ys = [float(row[c]) for c in CURVE_COLUMNS]
            label = f"{row['method']} (CPR {float(row['cpr']):.2f})"
            ax.plot(xs, ys, marker="o", ms=3, label=label, color=method_colour(row["method"]))
        ax.set_xscale("log")
        ax.set_xlabel("fraction of edges kept")
        ax.set_ylabel("faithfulness (held out)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"{task} on {model}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves_{_slug(task)}__{_slug(model)}.png"
        _save_png(fig, path)
        plt.close(fig)
        written.append(path)
    if rows:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        methods = sorted({r["method"] for r in rows})
        tasks = sorted({r["task"] for r in rows})
        markers = "osD^v<>pP*Xh"
        for row in rows:
            ax.scatter(max(float(row["seconds"]), 1e-4), float(row["cpr"]),
                       color=method_colour(row["method"]),
                       marker=markers[tasks.index(row["task"]) % len(markers)])
        # Legend proxies: colour names the method, marker the task (hollow, not a method's
        # colour).
        for method in methods:
            ax.scatter([], [], color=method_colour(method), marker="o", label=method)
        for j, task in enumerate(tasks):
            ax.scatter([], [], facecolors="none", edgecolors="black",
                       marker=markers[j % len(markers)], label=task)
        ax.set_xscale("log")
        ax.set_xlabel("scoring wall time (s, log)")
        ax.set_ylabel("CPR (held out)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / "time_vs_cpr.png"
        _save_png(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
