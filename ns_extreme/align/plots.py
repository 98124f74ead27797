"""PNG plots of rotation errors per overlap class (large / small / none / all), one curve per model.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global figure state) and writes files
atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ns_extreme.align.metrics import SUMMARY_CLASSES, THRESHOLDS_DEG
from ns_extreme.io.atomic import atomic_write_bytes

__all__ = ["plot_error_histograms", "plot_error_cdfs"]


def _prepare(
    errors_by_model: Mapping[str, Sequence[float] | np.ndarray], labels: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if not errors_by_model:
        raise ValueError("no models to plot")
    lab = np.asarray(list(labels), dtype=object)
    errs = {}
    for name, e in errors_by_model.items():
        arr = np.asarray(e, dtype=np.float64).reshape(-1)
        if arr.shape[0] != lab.shape[0]:
            raise ValueError(f"model {name!r}: {arr.shape[0]} errors but {lab.shape[0]} labels")
        errs[name] = np.where(np.isfinite(arr), arr, 180.0)  # failed predictions count as 180°
    return errs, lab


def _select(errs: np.ndarray, lab: np.ndarray, cls: str) -> np.ndarray:
    return errs if cls == "all" else errs[lab == cls]


def _figure(title: str | None) -> tuple[Figure, list]:
    fig = Figure(figsize=(4.0 * len(SUMMARY_CLASSES), 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, len(SUMMARY_CLASSES), sharey=False))
    if title:
        fig.suptitle(title)
    return fig, axes


def _write(fig: Figure, path_png: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path_png, buf.getvalue())


def plot_error_histograms(
    errors_by_model: Mapping[str, Sequence[float] | np.ndarray],
    labels: Sequence[str],
    path_png: str | os.PathLike[str],
    *,
    bin_width_deg: float = 5.0,
    title: str | None = "Relative rotation error",
) -> Path:
    """Histogram of errors (0–180°) per overlap class panel, models overlaid; returns the PNG path."""
    errs, lab = _prepare(errors_by_model, labels)
    bins = np.arange(0.0, 180.0 + bin_width_deg, bin_width_deg)
    fig, axes = _figure(title)
    for ax, cls in zip(axes, SUMMARY_CLASSES):
        n = int((lab == cls).sum()) if cls != "all" else lab.shape[0]
        for name, e in errs.items():
            sel = _select(e, lab, cls)
            if sel.size:
                ax.hist(sel, bins=bins, histtype="step", linewidth=1.5, label=name)
        for t in THRESHOLDS_DEG:
            ax.axvline(t, color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"{cls} (n={n})")
        ax.set_xlim(0, 180)
        ax.set_xlabel("error (deg)")
        if n == 0:
            ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("pairs")
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        next(ax for ax in axes if ax.get_legend_handles_labels()[0]).legend(fontsize="small")
    return _write(fig, path_png)


def plot_error_cdfs(
    errors_by_model: Mapping[str, Sequence[float] | np.ndarray],
    labels: Sequence[str],
    path_png: str | os.PathLike[str],
    *,
    title: str | None = "Cumulative relative rotation error",
) -> Path:
    """Empirical CDF (% of pairs with error ≤ x) per overlap class panel, models overlaid; returns the PNG path."""
    errs, lab = _prepare(errors_by_model, labels)
    fig, axes = _figure(title)
    for ax, cls in zip(axes, SUMMARY_CLASSES):
        n = int((lab == cls).sum()) if cls != "all" else lab.shape[0]
        for name, e in errs.items():
            sel = np.sort(_select(e, lab, cls))
            if sel.size:
                x = np.concatenate([[0.0], sel, [180.0]])
                y = 100.0 * np.concatenate([[0.0], np.arange(1, sel.size + 1) / sel.size, [1.0]])
                ax.step(x, y, where="post", linewidth=1.5, label=name)
        for t in THRESHOLDS_DEG:
            ax.axvline(t, color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"{cls} (n={n})")
        ax.set_xlim(0, 180)
        ax.set_ylim(0, 100)
        ax.set_xlabel("error (deg)")
        if n == 0:
            ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("pairs with error ≤ x (%)")
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        next(ax for ax in axes if ax.get_legend_handles_labels()[0]).legend(fontsize="small", loc="lower right")
    return _write(fig, path_png)
