"""Which views to match: all pairs for small collections, else each view's most co-visible partners."""

from __future__ import annotations

import numpy as np

from ns_extreme.geometry.projection import project_points, unproject_depth

SAMPLES_PER_VIEW = 400


def covisibility(depth: np.ndarray, K_pre: np.ndarray, w2c: np.ndarray, valid: np.ndarray, seed: int = 0) -> np.ndarray:
    """[N, N] fraction of view i's depth points (a random sample) that land inside view j in front of it, from the
    model's own depth and poses; symmetrised with the mean of both directions."""
    rng = np.random.default_rng(seed)
    n, h, w = depth.shape
    seen = np.zeros((n, n))
    for i in range(n):
        rows, cols = np.nonzero(valid[i] & (depth[i] > 0) & np.isfinite(depth[i]))
        if len(rows) == 0:
            continue
        pick = rng.choice(len(rows), size=min(SAMPLES_PER_VIEW, len(rows)), replace=False)
        xyz = unproject_depth(depth[i], K_pre[i], w2c[i])[rows[pick], cols[pick]]
        for j in range(n):
            if j == i:
                continue
            uv, z = project_points(xyz, w2c[j], K_pre[j])
            x0, y0, x1, y1 = _valid_box(valid[j])
            inside = (z > 0) & (uv[:, 0] >= x0) & (uv[:, 0] < x1) & (uv[:, 1] >= y0) & (uv[:, 1] < y1)
            seen[i, j] = inside.mean()
    return (seen + seen.T) / 2.0


def _valid_box(valid: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if len(rows) == 0:
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def select_pairs(num_views: int, partners: int, scores: np.ndarray | None = None) -> list[tuple[int, int]]:
    """All pairs i < j when ``num_views <= partners + 1`` or no scores are given; otherwise the union of each
    view's ``partners`` highest-scoring pairs (ties broken by index distance, which favours video order)."""
    if num_views <= partners + 1 or scores is None:
        return [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
    chosen: set[tuple[int, int]] = set()
    index = np.arange(num_views)
    for i in range(num_views):
        order = np.lexsort((np.abs(index - i), -scores[i]))
        for j in [int(k) for k in order if k != i][:partners]:
            chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)
