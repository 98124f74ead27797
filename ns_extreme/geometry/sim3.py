"""Similarity transforms x ↦ s·R·x + t: Umeyama, robust (IRLS) fitting, and moving cameras with the world.

Used to stitch chunked reconstructions into one frame. Cameras are OpenCV world-to-camera [3, 4].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ns_extreme.geometry.conventions import _as_pose, camera_centres_from_w2c
from ns_extreme.geometry.rotations import nearest_rotation


@dataclass(frozen=True, eq=False)
class Sim3:
    """x ↦ scale · rotation · x + translation."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def __post_init__(self) -> None:
        R = np.array(self.rotation, dtype=np.float64).reshape(3, 3)
        t = np.array(self.translation, dtype=np.float64).reshape(3)
        R.setflags(write=False)
        t.setflags(write=False)
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation", R)
        object.__setattr__(self, "translation", t)
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Sim3 scale must be positive and finite, got {self.scale}")

    @classmethod
    def identity(cls) -> Sim3:
        return cls(1.0, np.eye(3), np.zeros(3))

    @classmethod
    def from_matrix(cls, M: np.ndarray) -> Sim3:
        """From a 4×4 (or 3×4) [sR | t]; s is the cube root of det(sR)."""
        M = np.asarray(M, dtype=np.float64)
        sR = M[:3, :3]
        s = float(np.cbrt(np.linalg.det(sR)))
        return cls(s, sR / s, M[:3, 3])

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points [..., 3]."""
        p = np.asarray(points, dtype=np.float64)
        return self.scale * (p @ self.rotation.T) + self.translation

    def inverse(self) -> Sim3:
        R_inv = self.rotation.T
        return Sim3(1.0 / self.scale, R_inv, -(R_inv @ self.translation) / self.scale)

    def compose(self, other: Sim3) -> Sim3:
        """``self ∘ other``: apply ``other`` first, then ``self``."""
        return Sim3(
            self.scale * other.scale,
            self.rotation @ other.rotation,
            self.scale * (self.rotation @ other.translation) + self.translation,
        )

    def matrix(self) -> np.ndarray:
        """4×4 homogeneous matrix [[sR, t], [0, 1]]."""
        M = np.eye(4)
        M[:3, :3] = self.scale * self.rotation
        M[:3, 3] = self.translation
        return M


def _check_pair(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"src and dst must both be [N, 3], got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("src/dst contain NaN or inf")
    return src, dst


def umeyama_sim3(src: np.ndarray, dst: np.ndarray, with_scale: bool = True, weights: np.ndarray | None = None) -> Sim3:
    """Least-squares (weighted) similarity with dst ≈ s·R·src + t (Umeyama 1991). Needs ≥ 3 points."""
    src, dst = _check_pair(src, dst)
    n = src.shape[0]
    if n < 3:
        raise ValueError(f"umeyama_sim3 needs at least 3 point pairs, got {n}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = w / w.sum()
    mu_src = w @ src
    mu_dst = w @ dst
    xs = src - mu_src
    xd = dst - mu_dst
    cov = (xd * w[:, None]).T @ xs
    U, D, Vt = np.linalg.svd(cov)
    S = np.ones(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2] = -1.0
    R = (U * S) @ Vt
    if with_scale:
        var_src = float(w @ np.sum(xs * xs, axis=1))
        if var_src <= 0:
            raise ValueError("src points are all identical; scale is undefined")
        s = float(np.dot(D, S) / var_src)
    else:
        s = 1.0
    return Sim3(s, R, mu_dst - s * (R @ mu_src))


def robust_sim3(
    src: np.ndarray,
    dst: np.ndarray,
    loss: Literal["huber", "cauchy"] = "cauchy",
    threshold: float | None = None,
    with_scale: bool = True,
    weights: np.ndarray | None = None,
    max_iters: int = 50,
    tol: float = 1e-12,
) -> tuple[Sim3, np.ndarray]:
    """IRLS similarity fit robust to outliers; returns (Sim3, residuals [N] = |dst − sim3(src)|).

    ``threshold`` is the loss scale in dst units; if None it is re-estimated each iteration from the
    median residual (1.4826·MAD-style σ times 1.345 for Huber, 2.385 for Cauchy). ``weights`` are prior
    per-point weights (e.g. confidences) multiplied into the robust ones.
    """
    src, dst = _check_pair(src, dst)
    n = src.shape[0]
    prior = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)
    if loss not in ("huber", "cauchy"):
        raise ValueError(f"loss must be 'huber' or 'cauchy', got {loss!r}")
    k = 1.345 if loss == "huber" else 2.385
    # Floor for the adaptive scale so exact inliers (zero residual) cannot make it vanish.
    spread = float(np.sqrt(np.mean(np.sum((dst - dst.mean(0)) ** 2, axis=1))))
    min_scale = 1e-12 * max(spread, 1.0)

    sim = umeyama_sim3(src, dst, with_scale=with_scale, weights=prior)
    residuals = np.linalg.norm(dst - sim.apply(src), axis=1)
    prev_cost = np.inf
    for _ in range(max_iters):
        c = threshold if threshold is not None else k * 1.4826 * float(np.median(residuals))
        c = max(c, min_scale)
        r = residuals / c
        if loss == "huber":
            w_robust = np.where(r <= 1.0, 1.0, 1.0 / np.maximum(r, 1e-300))
            cost = float(np.sum(prior * np.where(r <= 1.0, 0.5 * r**2, r - 0.5)))
        else:
            w_robust = 1.0 / (1.0 + r**2)
            cost = float(np.sum(prior * 0.5 * np.log1p(r**2)))
        sim = umeyama_sim3(src, dst, with_scale=with_scale, weights=prior * w_robust)
        residuals = np.linalg.norm(dst - sim.apply(src), axis=1)
        if abs(prev_cost - cost) <= tol * max(1.0, abs(cost)):
            break
        prev_cost = cost
    return sim, residuals


def transform_w2c_opencv(w2c: np.ndarray, sim3: Sim3) -> np.ndarray:
    """w2c of the same camera after the world is mapped by ``sim3``; same shape as the input.

    Camera centres map by the Sim3, the rotation becomes ``R_w2c·Rᵀ`` and the translation
    ``s·t_w2c − R_w2c·Rᵀ·t`` (camera coordinates, hence depths, scale by s; pixels are unchanged).
    """
    w2c = _as_pose(w2c, "w2c")
    R_c = w2c[..., :3, :3]
    t_c = w2c[..., :3, 3]
    R_new = R_c @ sim3.rotation.T
    t_new = sim3.scale * t_c - R_new @ sim3.translation
    out = w2c.copy()
    out[..., :3, :3] = R_new
    out[..., :3, 3] = t_new
    return out


def sim3_from_camera_pairs(w2c_src: np.ndarray, w2c_dst: np.ndarray) -> Sim3:
    """Sim3 mapping the src world onto the dst world from the same N cameras posed in both ([N, 3, 4]).

    N ≥ 3 with non-collinear centres: Umeyama on the camera centres. Otherwise the rotation is the
    chordal mean of ``R_dst_iᵀ·R_src_i``, the scale the ratio of centre spreads (1.0 when N = 1, where
    the scale is unobservable from poses), and the translation matches the mean centre.
    """
    w2c_src = _as_pose(w2c_src, "w2c_src")
    w2c_dst = _as_pose(w2c_dst, "w2c_dst")
    w2c_src = w2c_src.reshape((-1,) + w2c_src.shape[-2:])
    w2c_dst = w2c_dst.reshape((-1,) + w2c_dst.shape[-2:])
    if w2c_src.shape[0] != w2c_dst.shape[0] or w2c_src.shape[0] == 0:
        raise ValueError(f"need the same N ≥ 1 cameras on both sides, got {w2c_src.shape[0]} and {w2c_dst.shape[0]}")
    C_src = camera_centres_from_w2c(w2c_src)
    C_dst = camera_centres_from_w2c(w2c_dst)
    n = C_src.shape[0]
    if n >= 3:
        sv_src = np.linalg.svd(C_src - C_src.mean(0), compute_uv=False)
        sv_dst = np.linalg.svd(C_dst - C_dst.mean(0), compute_uv=False)
        if sv_src[1] > 1e-6 * max(sv_src[0], 1e-300) and sv_dst[1] > 1e-6 * max(sv_dst[0], 1e-300):
            return umeyama_sim3(C_src, C_dst, with_scale=True)
    # R_dst = R_src·Rᵀ  ⇒  R = R_dstᵀ·R_src; average over cameras and project back onto SO(3).
    R = nearest_rotation(np.einsum("nji,njk->ik", w2c_dst[:, :3, :3], w2c_src[:, :3, :3]))
    spread_src = float(np.sum((C_src - C_src.mean(0)) ** 2))
    spread_dst = float(np.sum((C_dst - C_dst.mean(0)) ** 2))
    s = float(np.sqrt(spread_dst / spread_src)) if n >= 2 and spread_src > 0 and spread_dst > 0 else 1.0
    t = C_dst.mean(0) - s * (R @ C_src.mean(0))
    return Sim3(s, R, t)


def sim3_from_camera_poses(
    w2c_src: np.ndarray, w2c_dst: np.ndarray, weights: np.ndarray | None = None, iters: int = 20
) -> Sim3:
    """Sim3 mapping the src world onto the dst world from N ≥ 2 cameras posed in both, rotation first.

    The rotation is the weighted chordal mean of ``R_dst_iᵀ·R_src_i`` (every camera's orientation counts, which
    pins the rotation even for cameras on a line), then scale and translation fit the centres with that rotation
    by Cauchy-weighted least squares (a camera far off its counterpart barely pulls). For one camera the scale is 1.
    """
    w2c_src = _as_pose(w2c_src, "w2c_src").reshape(-1, *np.shape(w2c_src)[-2:])
    w2c_dst = _as_pose(w2c_dst, "w2c_dst").reshape(-1, *np.shape(w2c_dst)[-2:])
    n = len(w2c_src)
    if len(w2c_dst) != n or n == 0:
        raise ValueError(f"need the same N ≥ 1 cameras on both sides, got {n} and {len(w2c_dst)}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)
    R = nearest_rotation(np.einsum("n,nji,njk->ik", w, w2c_dst[:, :3, :3], w2c_src[:, :3, :3]))
    C_src = camera_centres_from_w2c(w2c_src) @ R.T
    C_dst = camera_centres_from_w2c(w2c_dst)
    if n == 1:
        return Sim3(1.0, R, C_dst[0] - C_src[0])
    robust = np.ones(n)
    s, t = 1.0, np.zeros(3)
    for _ in range(iters):
        ww = w * robust
        mu_src, mu_dst = ww @ C_src / ww.sum(), ww @ C_dst / ww.sum()
        xs, xd = C_src - mu_src, C_dst - mu_dst
        denom = float(ww @ np.sum(xs * xs, axis=1))
        s = float(ww @ np.sum(xs * xd, axis=1)) / denom if denom > 0 else 1.0
        s = s if s > 0 else 1.0
        t = mu_dst - s * mu_src
        residuals = np.linalg.norm(C_dst - (s * C_src + t), axis=1)
        c = 2.385 * 1.4826 * float(np.median(residuals)) + 1e-12 * (1.0 + float(np.abs(C_dst).max()))
        robust = 1.0 / (1.0 + (residuals / c) ** 2)
    return Sim3(s, R, t)
