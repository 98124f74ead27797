"""The refinement stage: SfM-grade poses wherever views share image evidence, input poses everywhere else.

``refine_poses`` never makes a result worse and never fails: views in no linked component keep their input pose
bit for bit, a refined view that leaves the trust region, gets a worse reprojection error or has too few
observations reverts to its input pose (with the reason recorded), and any failure of the stage (no features, no
matches, a pycolmap exception, pycolmap missing) returns the input unchanged with a one-line warning.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from ns_extreme.geometry.conventions import camera_centres_from_w2c
from ns_extreme.geometry.projection import project_points
from ns_extreme.geometry.rotations import geodesic_angle_deg
from ns_extreme.geometry.sim3 import Sim3, sim3_from_camera_poses, transform_w2c_opencv
from ns_extreme.io.sfm_points import SfmPoints
from ns_extreme.posing.refine.options import RefineOptions

FINAL_MAX_ERROR_PX = 4.0
"""Observations reprojecting worse than this (feature-image pixels) after the last round are dropped."""

MAX_FOCAL_CHANGE = 0.2
"""Trust region of focal lengths: a predicted focal length is rarely off by more; beyond it the view is too weakly
constrained for its focal length to be trusted."""

Status = Literal["refined", "failed", "off"]


@dataclass
class ViewRefinement:
    status: Literal["refined", "kept"]
    reason: Optional[str] = None
    partners: list[int] = field(default_factory=list)
    inliers: int = 0
    """Verified matches with the accepted partners."""
    tracks: int = 0
    """Track observations of this view after refinement."""
    reproj_before_px: Optional[float] = None
    """Mean reprojection error of the view's observations with its input camera (original pixels)."""
    reproj_after_px: Optional[float] = None
    rotation_change_deg: Optional[float] = None
    centre_change: Optional[float] = None
    """Camera centre change as a fraction of the scene extent."""
    focal_change: Optional[float] = None
    """Relative change of fx."""


@dataclass
class PairRefinement:
    i: int
    j: int
    inliers: int
    rotation_disagreement_deg: Optional[float]
    accepted: bool


@dataclass
class Refinement:
    w2c_opencv: np.ndarray
    intrinsics: np.ndarray
    views: list[ViewRefinement]
    pairs: list[PairRefinement] = field(default_factory=list)
    sfm_points: SfmPoints = field(default_factory=SfmPoints.empty)
    status: Status = "refined"
    warning: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_refined(self) -> int:
        return sum(v.status == "refined" for v in self.views)

    def median_reproj_px(self) -> Optional[float]:
        errors = [v.reproj_after_px for v in self.views if v.status == "refined" and v.reproj_after_px is not None]
        return float(np.median(errors)) if errors else None

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "warning": self.warning,
            "views_refined": self.num_refined,
            "views_kept": len(self.views) - self.num_refined,
            "median_reproj_px": self.median_reproj_px(),
            "sfm_points": len(self.sfm_points),
            "pairs": [vars(p) for p in self.pairs],
            "timings_s": self.timings,
        }


def unchanged(w2c: np.ndarray, K: np.ndarray, status: Status, warning: Optional[str], reason: str) -> Refinement:
    return Refinement(
        w2c_opencv=w2c.copy(),
        intrinsics=K.copy(),
        views=[ViewRefinement("kept", reason) for _ in range(len(w2c))],
        status=status,
        warning=warning,
    )


def refine_poses(
    image_paths: Sequence[Path],
    w2c: np.ndarray,
    K: np.ndarray,
    sizes_wh: np.ndarray,
    options: RefineOptions,
    constant_pose: Optional[np.ndarray] = None,
    constant_focal: Optional[np.ndarray] = None,
    gauge_weights: Optional[np.ndarray] = None,
    pair_scores: Optional[np.ndarray] = None,
    progress: bool = True,
    masks: Optional[Sequence[np.ndarray]] = None,
) -> Refinement:
    """Refine ``w2c`` [N, 3, 4] (OpenCV) and ``K`` [N, 3, 3] (original pixels) of ``image_paths``.

    ``constant_pose`` [N] bool: poses kept exactly; a component holding one keeps its frame. Any other component is
    placed onto the input frame by the Sim(3) that best aligns its refined cameras to their input ones, weighted
    by ``gauge_weights`` (e.g. given pose priors over model poses). ``constant_focal`` [N] bool: focal lengths
    kept. ``pair_scores`` [N, N]: co-visibility used to choose partners in large collections. ``masks``: per view
    bool [H, W] at the original size, False = no features there (``--masks``, alpha channels).
    """
    n = len(w2c)
    constant_pose = np.zeros(n, bool) if constant_pose is None else np.asarray(constant_pose, bool)
    constant_focal = np.zeros(n, bool) if constant_focal is None else np.asarray(constant_focal, bool)
    gauge_weights = np.ones(n) if gauge_weights is None else np.asarray(gauge_weights, np.float64)
    try:
        import pycolmap  # noqa: F401  (an optional native dependency at run time: never fatal)
    except ImportError as exc:
        return unchanged(
            w2c, K, "failed", f"refinement skipped: pycolmap cannot be imported ({exc})", "refinement failed"
        )
    from ns_extreme.posing.refine.matching import quiet_colmap

    try:
        with tempfile.TemporaryDirectory(prefix="ns_extreme-refine-") as work, quiet_colmap():
            inputs = (list(map(Path, image_paths)), np.asarray(w2c, np.float64), np.asarray(K, np.float64))
            return _refine(
                *inputs, np.asarray(sizes_wh), options, constant_pose, constant_focal, gauge_weights, pair_scores,
                progress, Path(work), masks,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the stage must never fail the command
        message = " ".join(str(exc).split()) or type(exc).__name__
        return unchanged(
            w2c, K, "failed", f"refinement failed ({message}); the model's poses are kept", "refinement failed"
        )


def _components(n: int, pairs: Sequence[Any]) -> list[list[int]]:
    """Connected components (size ≥ 2) of the accepted pairs, largest first."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for p in pairs:
        if p.accepted:
            parent[root(p.i)] = root(p.j)
    groups: dict[int, list[int]] = {}
    for v in range(n):
        groups.setdefault(root(v), []).append(v)
    return sorted((g for g in groups.values() if len(g) >= 2), key=lambda g: (-len(g), g[0]))


def scene_extent(w2c: np.ndarray) -> float:
    """Largest camera distance from the centroid of the camera centres (1.0 when all coincide)."""
    centres = camera_centres_from_w2c(w2c)
    extent = float(np.linalg.norm(centres - centres.mean(0), axis=1).max()) if len(centres) else 0.0
    return extent if extent > 0 else 1.0


def _gauge(w2c_ref: np.ndarray, w2c_in: np.ndarray, constant: np.ndarray, weights: np.ndarray) -> Sim3:
    """Sim(3) taking the component's adjusted frame onto the input frame."""
    if constant.sum() >= 2:
        return Sim3.identity()
    if constant.sum() == 1:
        # The constant camera pins rotation and translation; only the scale about its centre is free.
        anchor = camera_centres_from_w2c(w2c_in[constant])[0]
        d_ref, d_in = camera_centres_from_w2c(w2c_ref) - anchor, camera_centres_from_w2c(w2c_in) - anchor
        denom = float(np.sum(d_ref * d_ref))
        s = float(np.sum(d_ref * d_in)) / denom if denom > 0 else 1.0
        s = s if s > 0 else 1.0
        return Sim3(s, np.eye(3), anchor - s * anchor)
    return sim3_from_camera_poses(w2c_ref, w2c_in, weights=weights)


def _errors_px(obs_xy: np.ndarray, xyz: np.ndarray, w2c: np.ndarray, K: np.ndarray) -> np.ndarray:
    uv, z = project_points(xyz, w2c, K)
    err = np.linalg.norm(uv - obs_xy, axis=1)
    return np.where(z > 0, err, np.inf)


def _colours(image_paths: Sequence[Path], sfm: SfmPoints) -> np.ndarray:
    """Mean colour of each point over its observations, sampled from the original images."""
    from ns_extreme.io.images import load_rgb

    total = np.zeros((len(sfm), 3))
    count = np.zeros(len(sfm))
    for v in np.unique(sfm.obs_view):
        rgb = load_rgb(image_paths[v])
        mine = np.flatnonzero(sfm.obs_view == v)
        cols = np.clip(np.floor(sfm.obs_xy[mine, 0]).astype(int), 0, rgb.shape[1] - 1)
        rows = np.clip(np.floor(sfm.obs_xy[mine, 1]).astype(int), 0, rgb.shape[0] - 1)
        np.add.at(total, sfm.obs_point[mine], rgb[rows, cols])
        np.add.at(count, sfm.obs_point[mine], 1.0)
    return np.round(total / np.maximum(count, 1.0)[:, None]).astype(np.uint8)


def _refine(
    image_paths: list[Path],
    w2c_in: np.ndarray,
    K_in: np.ndarray,
    sizes_wh: np.ndarray,
    options: RefineOptions,
    constant_pose: np.ndarray,
    constant_focal: np.ndarray,
    gauge_weights: np.ndarray,
    pair_scores: Optional[np.ndarray],
    progress: bool,
    work_dir: Path,
    masks: Optional[Sequence[np.ndarray]] = None,
) -> Refinement:
    from ns_extreme.posing.refine.bundle import Component, adjust_component, observations
    from ns_extreme.posing.refine.cameras import camera_groups
    from ns_extreme.posing.refine.matching import extract_features, match_pairs, screen_verified_pairs, share_cameras
    from ns_extreme.posing.refine.pairs import select_pairs

    n = len(w2c_in)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    features = extract_features(image_paths, sizes_wh, K_in, work_dir, options.feature_size, progress, masks)
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = select_pairs(n, options.match_partners, pair_scores)
    match_pairs(features, candidates, progress)
    verified = screen_verified_pairs(
        features, candidates, w2c_in, K_in, options.min_inliers, options.max_rotation_disagreement
    )
    pairs = [PairRefinement(p.i, p.j, p.inliers, p.rotation_disagreement_deg, p.accepted) for p in verified]
    timings["matching_s"] = time.perf_counter() - t
    components = _components(n, pairs)
    if not components:
        result = unchanged(
            w2c_in, K_in, "failed",
            "refinement found no two views with enough verified matches; the model's poses are kept",
            "no verified partner",
        )  # fmt: skip
        result.pairs, result.timings = pairs, timings
        return result

    t = time.perf_counter()
    w2c_out, K_out = w2c_in.copy(), K_in.copy()
    views = [ViewRefinement("kept", "no verified partner") for _ in range(n)]
    for p in pairs:
        if p.accepted:
            for a, b in ((p.i, p.j), (p.j, p.i)):
                views[a].partners.append(b)
                views[a].inliers += p.inliers
    extent = scene_extent(w2c_in)
    K_f_in = features.intrinsics_at_features(K_in)
    groups = camera_groups(image_paths, sizes_wh, constant_focal)
    share_cameras(features, groups)
    parts: list[SfmPoints] = []
    for index in components:
        component = Component(index, constant_pose[index], constant_focal[index], groups[index])
        w2c_adj, K_f_adj, rec = adjust_component(features, component, w2c_in, K_f_in, options.robust_loss, work_dir)
        sim = _gauge(w2c_adj, w2c_in[index], constant_pose[index], gauge_weights[index])
        w2c_new = transform_w2c_opencv(w2c_adj, sim)
        w2c_new[constant_pose[index]] = w2c_in[index][constant_pose[index]]
        K_new = features.intrinsics_at_original(np.asarray(K_f_adj), index)
        obs = observations(rec, {features.image_ids[v]: v for v in index})
        xyz = sim.apply(obs.xyz) if len(obs.xyz) else obs.xyz
        obs_xy = obs.xy * features.to_original[obs.view]
        err_after = np.zeros(len(obs.view))
        err_before = np.zeros(len(obs.view))
        for k, v in enumerate(index):
            mine = obs.view == v
            err_after[mine] = _errors_px(obs_xy[mine], xyz[obs.point[mine]], w2c_new[k], K_new[k])
            err_before[mine] = _errors_px(obs_xy[mine], xyz[obs.point[mine]], w2c_in[v], K_in[v])
        keep_obs = err_after <= FINAL_MAX_ERROR_PX * features.to_original[obs.view].max(axis=1)
        for k, v in enumerate(index):
            mine = (obs.view == v) & keep_obs
            view = views[v]
            view.tracks = int(mine.sum())
            view.reproj_after_px = float(err_after[mine].mean()) if mine.any() else None
            finite = mine & np.isfinite(err_before)
            view.reproj_before_px = float(err_before[finite].mean()) if finite.any() else None
            view.rotation_change_deg = float(geodesic_angle_deg(w2c_new[k, :3, :3], w2c_in[v, :3, :3]))
            view.centre_change = float(
                np.linalg.norm(camera_centres_from_w2c(w2c_new[k]) - camera_centres_from_w2c(w2c_in[v])) / extent
            )
            view.focal_change = float(K_new[k, 0, 0] / K_in[v, 0, 0] - 1.0)
            reason = _reject_reason(view, options, bool(constant_pose[v]))
            if reason is None:
                view.status, view.reason = "refined", None
                w2c_out[v], K_out[v] = w2c_new[k], K_new[k]
            else:
                view.status, view.reason = "kept", reason
                keep_obs &= obs.view != v
        # Refined views' final cameras are w2c_new / K_new, so err_after is each kept observation's final error.
        per_point = np.bincount(obs.point[keep_obs], minlength=len(xyz))
        error_sum = np.bincount(obs.point[keep_obs], weights=err_after[keep_obs], minlength=len(xyz))
        error = error_sum / np.maximum(per_point, 1)
        sfm = SfmPoints(xyz, np.zeros((len(xyz), 3), np.uint8), error, obs.point, obs.view, obs_xy)
        sfm = sfm.subset(per_point >= 2, keep_obs)
        parts.append(sfm)
    timings["bundle_adjustment_s"] = time.perf_counter() - t
    sfm = _concatenate(parts)
    sfm.rgb = _colours(image_paths, sfm)
    warning = None
    if not any(v.status == "refined" for v in views):
        warning = "refinement kept every view's input pose (reasons per view in extreme_poses.json)"
    return Refinement(w2c_out, K_out, views, pairs, sfm, "refined", warning, timings)


def _reject_reason(view: ViewRefinement, options: RefineOptions, constant: bool) -> Optional[str]:
    if constant:
        return "known pose kept (--known-poses fixed)"
    if view.tracks < options.min_inliers:
        return f"too few track observations ({view.tracks} < {options.min_inliers})"
    if view.rotation_change_deg > options.max_rotation_change:
        return f"rotation moved {view.rotation_change_deg:.1f}° (> {options.max_rotation_change:g}° trust region)"
    if view.centre_change > options.max_centre_change:
        return f"centre moved {view.centre_change:.1%} of the scene extent (> {options.max_centre_change:.0%})"
    if abs(view.focal_change) > MAX_FOCAL_CHANGE:
        return f"focal length changed {view.focal_change:+.1%} (> {MAX_FOCAL_CHANGE:.0%})"
    if view.reproj_before_px is not None and view.reproj_after_px is not None:
        if view.reproj_after_px > view.reproj_before_px:
            return "reprojection error got worse"
    return None


def _concatenate(parts: list[SfmPoints]) -> SfmPoints:
    if not parts:
        return SfmPoints.empty()
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    return SfmPoints(
        np.concatenate([p.xyz for p in parts]),
        np.concatenate([p.rgb for p in parts]),
        np.concatenate([p.error for p in parts]),
        np.concatenate([p.obs_point + o for p, o in zip(parts, offsets)]),
        np.concatenate([p.obs_view for p in parts]),
        np.concatenate([p.obs_xy for p in parts]),
    )
