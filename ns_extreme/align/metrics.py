"""Relative-rotation metrics of the paper's protocol (arXiv 2511.22686, evaluation), per overlap class.

- error: geodesic angle of ``R_pred_rel · R_gt_relᵀ`` in degrees (float64, cosine clamped to [−1, 1]);
- MRE: median error (degrees);
- RA15 / RA30: percentage of pairs with error **≤** 15° / ≤ 30° (as in the paper's tables, 0–100).

Classes: ``large``, ``small``, ``none`` (by each pair's label) and ``all``. An empty class has count 0 and
metrics ``None``. Non-finite errors (a model that returned NaN) count as failures: they are reported in
``failed``, count as 180° for the median and never pass a threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ns_extreme.geometry.overlap import OVERLAP_CLASSES
from ns_extreme.geometry.rotations import geodesic_angle_deg

__all__ = ["SUMMARY_CLASSES", "THRESHOLDS_DEG", "rotation_errors_deg", "class_metrics", "summarize", "format_table"]

SUMMARY_CLASSES: tuple[str, ...] = (*OVERLAP_CLASSES, "all")
THRESHOLDS_DEG: tuple[float, float] = (15.0, 30.0)


def rotation_errors_deg(R_pred_rel: np.ndarray, R_gt_rel: np.ndarray) -> np.ndarray:
    """Per-pair geodesic error in degrees, ``[N]`` float64, from predicted and GT relative rotations ``[N, 3, 3]``."""
    pred = np.asarray(R_pred_rel, dtype=np.float64)
    gt = np.asarray(R_gt_rel, dtype=np.float64)
    if pred.shape != gt.shape or pred.shape[-2:] != (3, 3):
        raise ValueError(f"expected two [N,3,3] arrays of the same shape, got {pred.shape} and {gt.shape}")
    return np.atleast_1d(np.asarray(geodesic_angle_deg(pred, gt), dtype=np.float64)).reshape(pred.shape[:-2])


def class_metrics(errors: np.ndarray) -> dict[str, Any]:
    """``count``, ``failed``, ``mre``, ``ra15``, ``ra30`` of one group of errors (metrics None when empty)."""
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    n = int(e.size)
    if n == 0:
        return {"count": 0, "failed": 0, "mre": None, "ra15": None, "ra30": None}
    finite = np.isfinite(e)
    filled = np.where(finite, e, 180.0)
    ok15 = finite & (e <= THRESHOLDS_DEG[0])
    ok30 = finite & (e <= THRESHOLDS_DEG[1])
    return {
        "count": n,
        "failed": int(n - finite.sum()),
        "mre": float(np.median(filled)),
        "ra15": float(100.0 * ok15.mean()),
        "ra30": float(100.0 * ok30.mean()),
    }


def summarize(errors: Sequence[float] | np.ndarray, overlap_labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Metrics per class in (large, small, none, all) from per-pair errors and their overlap labels."""
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    labels = np.asarray(list(overlap_labels), dtype=object)
    if labels.shape[0] != e.shape[0]:
        raise ValueError(f"{e.shape[0]} errors but {labels.shape[0]} overlap labels")
    unknown = sorted({str(x) for x in labels if x not in OVERLAP_CLASSES})
    if unknown:
        raise ValueError(f"unknown overlap labels {unknown}; expected {OVERLAP_CLASSES}")
    out = {c: class_metrics(e[labels == c]) for c in OVERLAP_CLASSES}
    out["all"] = class_metrics(e)
    return out


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Side-by-side text table: one row per class, MRE / RA15 / RA30 columns per model (e.g. pretrained, aligned).

    The pair count column shows one number when all models were evaluated on the same number of pairs,
    else the counts separated by ``/`` in model order.
    """
    models = list(summaries)
    if not models:
        return "(no results)"
    header = ["class", "pairs"]
    for m in models:
        header += [f"{m} MRE°", f"{m} RA15%", f"{m} RA30%"]
    rows = [header]
    for c in SUMMARY_CLASSES:
        counts = [int(summaries[m].get(c, {}).get("count", 0)) for m in models]
        row = [c, str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))]
        for m in models:
            s = summaries[m].get(c, {})
            row += [_fmt(s.get("mre"), 2), _fmt(s.get("ra15"), 1), _fmt(s.get("ra30"), 1)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
