"""Figures for the evaluations: a metric against NFE (the paper's Figure 3(b)) and the
exact-kernel grid of stmd_fast.gmm.kernel_grid as heat maps.

matplotlib is optional: it is imported inside the functions, and figures are drawn on
matplotlib's Agg canvas directly (no pyplot), so calling these changes no global backend
or pyplot state and works without a display.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

_MISSING = "pip install matplotlib (or stmd_fast[plot])"


def _figure(**kwargs):
    """A matplotlib Figure on an Agg canvas; ImportError with the install hint if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_MISSING) from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    """Rendered in memory, written atomically: a kill or a full disk leaves the earlier plot, not half a new one."""
    from .files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    write_atomic(path, buffer.getvalue())


def _require(rows: list[dict], keys: tuple[str, ...], what: str) -> None:
    if not rows:
        raise ValueError(f"no rows to plot ({what})")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing} ({what} rows need {list(keys)}): {row!r}")


def plot_metric_vs_nfe(rows: list[dict], path, metric: str = "FD") -> None:
    """One line per rows' "label" of "value" against "nfe" (log2 axis, ticks at the NFEs present),
    with markers and a legend, titled f"{metric} vs NFE"; written to `path` as a PNG.

    rows: {"label": e.g. "stmd M=1 (runs/digits-stmd)", "nfe": int >= 1, "value": float}. Lines keep
    the order in which their labels first appear; points within a line are sorted by NFE.
    """
    _require(rows, ("label", "nfe", "value"), "plot_metric_vs_nfe")
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        nfe = float(row["nfe"])
        if not nfe > 0:
            raise ValueError(f"nfe must be > 0 for a log axis, got {row!r}")
        lines.setdefault(str(row["label"]), []).append((nfe, float(row["value"])))

    fig = _figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for label, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for points in lines.values() for p in points})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs NFE")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def _kernel_matrix(rows: list[dict], key: str, s_from: list[float], s_to: list[float]):
    cells = np.full((len(s_from), len(s_to)), np.nan)
    for row in rows:
        if float(row["s_to"]) >= float(row["s_from"]):  # no transition there: left empty
            continue
        cells[s_from.index(float(row["s_from"])), s_to.index(float(row["s_to"]))] = float(row[key])
    return np.ma.masked_invalid(cells)


def plot_kernel_heatmap(rows: list[dict], path, flow_steps: int = 1) -> None:
    """Two heat maps side by side on one colour scale: the energy distance to the exact kernel of
    the model's transition (M = flow_steps) and of the exact-posterior-mean bridge (the best DDPM
    step), s_from up the rows and s_to along the columns, every cell annotated with its number;
    cells with s_to >= s_from (or not in rows) stay empty. rows: kernel_grid's; written as a PNG.
    """
    _require(rows, ("s_from", "s_to", "flow_steps", "energy_model", "energy_mean_bridge"), "kernel_grid")
    available = sorted({int(r["flow_steps"]) for r in rows})
    rows = [r for r in rows if int(r["flow_steps"]) == flow_steps]
    if not rows:
        raise ValueError(f"no rows with flow_steps={flow_steps}; the rows have M in {available}")
    seen = set()
    for r in rows:
        cell = (float(r["s_from"]), float(r["s_to"]))
        if cell in seen:
            raise ValueError(f"two rows for (s_from, s_to) = {cell} at flow_steps={flow_steps}")
        seen.add(cell)
    s_from = sorted({c[0] for c in seen})
    s_to = sorted({c[1] for c in seen})
    panels = [(_kernel_matrix(rows, "energy_model", s_from, s_to), f"model transition (M={flow_steps})"),
              (_kernel_matrix(rows, "energy_mean_bridge", s_from, s_to), "exact-posterior-mean bridge\n(best DDPM step)")]
    finite = [float(v) for m, _ in panels for v in m.compressed() if math.isfinite(v)]
    vmin = min([0.0, *finite])  # the U-statistic can dip just below 0
    vmax = max([vmin + 1e-12, *finite])

    width = 1.2 + 0.95 * len(s_to)
    fig = _figure(figsize=(2 * width + 1.2, 1.8 + 0.7 * len(s_from)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, (cells, title) in zip(axes, panels):
        image = ax.imshow(cells, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(s_to)), [f"{s:g}" for s in s_to])
        ax.set_yticks(range(len(s_from)), [f"{s:g}" for s in s_from])
        ax.set_xlabel("s_to")
        ax.set_title(title, fontsize="medium")
        for i in range(len(s_from)):
            for j in range(len(s_to)):
                if np.ma.getmaskarray(cells)[i, j]:
                    continue
                value = float(cells[i, j])
                # dark text on the bright end of viridis, light on the dark end
                bright = (value - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="small",
                        color="black" if bright else "white")
    axes[0].set_ylabel("s_from")
    fig.suptitle(r"energy distance to the exact kernel $p(x_{s_\mathrm{to}} \mid x_{s_\mathrm{from}})$")
    fig.colorbar(image, ax=list(axes), label="energy distance", shrink=0.9)
    _save(fig, path)
