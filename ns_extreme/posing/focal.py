"""Focal lengths from camera-frame point maps (for backbones such as π³ that predict no intrinsics).

A pinhole camera with square pixels and its principal point at the image centre maps a camera-frame point
(x, y, z), z > 0, to the pixel position (cx + f·x/z, cy + f·y/z). Given a point map — one 3D point per pixel —
the focal length is the scalar ``f`` minimising

    Σ_pixels  w · ρ(‖(u − cx, v − cy) − f · (x/z, y/z)‖)

with ``w`` the model's confidence and ρ robust: iteratively reweighted least squares with Tukey's biweight
(scale = MAD of the residuals, re-estimated every step), started from the confidence-weighted median of the
per-pixel estimates (a·p)/(p·p). Gross outliers end with zero weight. Each weighted least-squares step has
the closed form f = Σ W (a·p) / Σ W (p·p), a = pixel offset from the centre, p = (x/z, y/z). (Huber is not
enough: it bounds an outlier's residual but not its leverage |x/z|, which for stray points near z = 0 is
huge, and a few such points drag f towards 0.)

Pixel coordinates follow ``ns_extreme.geometry.intrinsics``: pixel (i, j) has its centre at (j + 0.5, i + 0.5),
so the image centre is (W/2, H/2).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

TUKEY_C = 4.685
MAD_TO_SIGMA = 1.4826
MIN_PIXELS = 16


def _numpy(a: Optional[ArrayLike]) -> Optional[np.ndarray]:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _robust_focal(a: np.ndarray, p: np.ndarray, w: np.ndarray, iterations: int) -> float:
    """Robust scalar fit a ≈ f·p for 2-vectors a, p [N, 2] with prior weights w [N]."""
    pp = np.einsum("ni,ni->n", p, p)
    ap = np.einsum("ni,ni->n", a, p)
    aa = np.einsum("ni,ni->n", a, a)
    keep = (pp > 0) & (w > 0)
    pp, ap, aa, w = pp[keep], ap[keep], aa[keep], w[keep]
    if len(w) < MIN_PIXELS:
        return float("nan")
    # Start: the (confidence-weighted) median of the per-pixel focal estimates (50 % breakdown point).
    # Not weighted by |p|² as least squares would be: outliers often have huge x/z and would dominate.
    f = _weighted_median(ap / pp, w)
    for _ in range(iterations):
        r = np.sqrt(np.maximum(aa - 2.0 * f * ap + f * f * pp, 0.0))  # ‖a − f·p‖
        sigma = MAD_TO_SIGMA * float(np.median(r))
        if not sigma > 0:  # exact fit
            break
        robust = np.square(np.clip(1.0 - np.square(r / (TUKEY_C * sigma)), 0.0, None))
        W = w * robust
        denominator = float(np.sum(W * pp))
        if not denominator > 0:
            break
        f_new = float(np.sum(W * ap)) / denominator
        converged = abs(f_new - f) <= 1e-10 * abs(f)
        f = f_new
        if converged:
            break
    return f


def recover_focal(
    local_points: ArrayLike,
    conf: Optional[ArrayLike] = None,
    image_hw: Optional[tuple[int, int]] = None,
    mask: Optional[ArrayLike] = None,
    shared: bool = False,
    iterations: int = 30,
) -> np.ndarray:
    """Intrinsics K [S, 3, 3] (float64, pixels of the point maps' resolution) from point maps.

    ``local_points`` [S, H, W, 3]: camera-frame points (OpenCV axes) per pixel; ``conf`` [S, H, W] (or
    [S, H, W, 1]): non-negative weights, e.g. sigmoid of π³'s confidence logits (None = uniform);
    ``image_hw``: (H, W), checked against the point maps; ``mask`` [S, H, W] bool: pixels to use (e.g.
    not padding); ``shared``: one focal length for all views (one physical camera).
    fx = fy = f, principal point (W/2, H/2). Views without enough usable pixels get NaN focal lengths.
    """
    pts = _numpy(local_points)
    if pts is None or pts.ndim != 4 or pts.shape[-1] != 3:
        raise ValueError(f"local_points must be [S, H, W, 3], got {None if pts is None else pts.shape}")
    S, H, W, _ = pts.shape
    if image_hw is not None and tuple(image_hw) != (H, W):
        raise ValueError(f"image_hw {tuple(image_hw)} does not match the point maps ({H}, {W})")
    w = np.ones((S, H, W)) if conf is None else _numpy(conf).reshape(S, H, W)
    valid = np.isfinite(pts).all(-1) & (pts[..., 2] > 0) & np.isfinite(w) & (w > 0)
    if mask is not None:
        valid &= _numpy(mask).reshape(S, H, W).astype(bool)
    w = np.where(valid, w, 0.0)

    cx, cy = W / 2.0, H / 2.0
    u, v = np.meshgrid(np.arange(W) + 0.5 - cx, np.arange(H) + 0.5 - cy)
    offsets = np.broadcast_to(np.stack((u, v), -1), (S, H, W, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        rays = np.where(valid[..., None], pts[..., :2] / pts[..., 2:3], 0.0)

    if shared:
        f = _robust_focal(offsets[valid], rays[valid], w[valid], iterations)
        focals = np.full(S, f)
    else:
        focals = np.array(
            [_robust_focal(offsets[s][valid[s]], rays[s][valid[s]], w[s][valid[s]], iterations) for s in range(S)]
        )

    K = np.zeros((S, 3, 3))
    K[:, 0, 0] = K[:, 1, 1] = focals
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = cx, cy, 1.0
    return K


def padding_mask(images: ArrayLike, value: float = 1.0) -> np.ndarray:
    """[S, H, W] bool, False on the constant border that preprocessing pads with (``value`` in every channel).

    Only whole rows/columns at the edges count as padding, scanning inwards until one holds another value,
    so an image's own white areas are not masked unless they span an entire border row or column (then a
    few real pixels are merely left out of the focal fit)."""
    x = _numpy(images)
    S, _, H, W = x.shape
    is_pad = (x == value).all(axis=1)  # [S, H, W]
    mask = np.ones((S, H, W), dtype=bool)
    for s in range(S):
        rows = is_pad[s].all(axis=1)
        cols = is_pad[s].all(axis=0)
        top = int(np.argmin(rows)) if not rows.all() else H
        bottom = int(np.argmin(rows[::-1])) if not rows.all() else H
        left = int(np.argmin(cols)) if not cols.all() else W
        right = int(np.argmin(cols[::-1])) if not cols.all() else W
        mask[s, :top] = False
        mask[s, H - bottom :] = False
        mask[s, :, :left] = False
        mask[s, :, W - right :] = False
    return mask
