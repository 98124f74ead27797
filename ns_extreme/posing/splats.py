"""``--write-splats``: the 3DGS head's per-pixel Gaussians placed in the final world and filtered by confidence.

The raw per-pixel Gaussians of WorldMirror are unusable as they are (one per pixel, many in the sky, on edges and
on padding). Kept: real (unpadded) pixels that the photo masks keep (``--masks``, alpha channels), whose 3DGS-depth
confidence reaches the view's ``conf_percentile`` and whose opacity reaches ``min_opacity``, then at most
``max_splats`` at random. Each is placed with the view's final camera (after the Sim(3) onto known poses and
refinement) and the final intrinsics at the network resolution, like the depth points of ``sparse_pc.ply``.
Gaussians whose centres share a voxel are then merged into one, as the reference's export does (views that see the
same surface give it one Gaussian, not one per view).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ns_extreme.geometry.conventions import invert_rigid, to_homogeneous
from ns_extreme.io.masks import kept_pixels_preprocessed

DEFAULT_MAX_SPLATS = 1_000_000
DEFAULT_MIN_OPACITY = 0.05
DEFAULT_VOXEL_SIZE = 0.002
"""Voxel edge of the merge, relative to the median depth of the Gaussians. The reference merges at 0.002 units of
its predicted, relative-scale world; here the edge follows the scene, whatever the dataset's units (metres after
--scale-from, a --poses-from world's own)."""


@dataclass
class Splats:
    """3D Gaussians in the reconstruction's world (OpenCV axes, world units)."""

    means: np.ndarray
    """[K, 3] float32 centres."""
    quats_wxyz: np.ndarray
    """[K, 4] float32 unit rotations (scalar first), world frame."""
    scales: np.ndarray
    """[K, 3] float32 standard deviations."""
    opacity: np.ndarray
    """[K] float32 in (0, 1)."""
    f_dc: np.ndarray
    """[K, 3] float32 degree-0 SH colour coefficients."""
    view: np.ndarray
    """[K] int32 index of the view each Gaussian came from."""

    def __len__(self) -> int:
        return len(self.means)


def place_splats(
    gaussians,
    w2c_opencv: np.ndarray,
    K_preprocessed: np.ndarray,
    valid: np.ndarray,
    conf_percentile: float = 50.0,
    min_opacity: float = DEFAULT_MIN_OPACITY,
    max_splats: int | None = DEFAULT_MAX_SPLATS,
    seed: int = 0,
) -> Splats:
    """Filter ``gaussians`` (``PixelGaussians`` in world units) and place them with cameras ``w2c_opencv`` [N, 3, 4]
    and ``K_preprocessed`` [N, 3, 3] (network-input pixels); ``valid`` [N, H, W] marks real pixels."""
    parts = []
    n, H, W = gaussians.depth.shape
    v, u = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    for i in range(n):
        conf = gaussians.confidence[i]
        keep = valid[i] & (gaussians.depth[i] > 0) & (gaussians.opacity[i] >= min_opacity)
        if keep.any():
            keep &= conf >= np.percentile(conf[valid[i]], conf_percentile)
        if not keep.any():
            continue
        z = gaussians.depth[i][keep].astype(np.float64)
        K = K_preprocessed[i]
        cam = np.stack(((u[keep] - K[0, 2]) / K[0, 0] * z, (v[keep] - K[1, 2]) / K[1, 1] * z, z), axis=-1)
        c2w = invert_rigid(to_homogeneous(w2c_opencv[i]))
        means = cam @ c2w[:3, :3].T + c2w[:3, 3]
        rot = Rotation.from_matrix(c2w[:3, :3]) * Rotation.from_quat(gaussians.quats_wxyz[i][keep], scalar_first=True)
        quats = rot.as_quat(scalar_first=True, canonical=True)
        parts.append(
            Splats(
                means=means.astype(np.float32),
                quats_wxyz=quats.astype(np.float32),
                scales=gaussians.scales[i][keep].astype(np.float32),
                opacity=gaussians.opacity[i][keep].astype(np.float32),
                f_dc=gaussians.f_dc[i][keep].astype(np.float32),
                view=np.full(len(z), i, dtype=np.int32),
            )
        )
    fields = Splats.__dataclass_fields__
    if not parts:
        return Splats(**{f: np.zeros((0, *_WIDTH[f]), dtype=_DTYPE.get(f, np.float32)) for f in fields})
    return _at_most(Splats(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}), max_splats, seed)


def _at_most(splats: Splats, max_splats: int | None, seed: int) -> Splats:
    """At most ``max_splats`` of ``splats`` (None: all), chosen at random (in their order)."""
    if max_splats is None or len(splats) <= max_splats:
        return splats
    pick = np.sort(np.random.default_rng(seed).choice(len(splats), size=max_splats, replace=False))
    return Splats(**{f: getattr(splats, f)[pick] for f in Splats.__dataclass_fields__})


def merge_voxels(splats: Splats, voxel_size: float) -> Splats:
    """Gaussians whose centres share a voxel of edge ``voxel_size`` (world units; 0 = no merge) become one, as in the
    reference's export: opacity-weighted means of centre, colour, scale and rotation (renormalised; the rotations
    are canonical, scalar part >= 0, so they average without sign flips), opacity sum(w²) / sum(w), and the view of
    its most opaque Gaussian."""
    if voxel_size <= 0 or len(splats) == 0:
        return splats
    cells = np.floor(splats.means.astype(np.float64) / voxel_size).astype(np.int64)
    _, inverse = np.unique(cells, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = int(inverse.max()) + 1
    w = splats.opacity.astype(np.float64)
    w_sum = np.bincount(inverse, w, n)

    def weighted_mean(x: np.ndarray) -> np.ndarray:
        columns = x.reshape(len(x), -1).astype(np.float64)
        sums = np.stack([np.bincount(inverse, columns[:, c] * w, n) for c in range(columns.shape[1])], axis=1)
        return (sums / w_sum[:, None]).reshape(n, *x.shape[1:])

    quats = weighted_mean(splats.quats_wxyz)
    order = np.lexsort((-w, inverse))  # per voxel, most opaque first
    heaviest = order[np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]]
    return Splats(
        means=weighted_mean(splats.means).astype(np.float32),
        quats_wxyz=(quats / np.linalg.norm(quats, axis=1, keepdims=True)).astype(np.float32),
        scales=weighted_mean(splats.scales).astype(np.float32),
        opacity=(np.bincount(inverse, w * w, n) / w_sum).astype(np.float32),
        f_dc=weighted_mean(splats.f_dc).astype(np.float32),
        view=splats.view[heaviest],
    )


_WIDTH = {"means": (3,), "quats_wxyz": (4,), "scales": (3,), "opacity": (), "f_dc": (3,), "view": ()}
_DTYPE = {"view": np.int32}


def splats_from_reconstruction(
    recon,
    conf_percentile: float = 50.0,
    max_splats: int = DEFAULT_MAX_SPLATS,
    seed: int = 0,
    voxel_size: float = DEFAULT_VOXEL_SIZE,
) -> Splats:
    """``place_splats`` with the reconstruction's final cameras (``recon.gaussians`` must be set), merged per voxel
    (``voxel_size`` relative to the Gaussians' median depth; 0 = no merge), then at most ``max_splats``."""
    if recon.gaussians is None:
        raise ValueError("this reconstruction has no Gaussians (pose with a backbone built with splats=True)")
    K_pre = np.stack([r.intrinsics_to_preprocessed(k) for r, k in zip(recon.records, recon.intrinsics)])
    valid = kept_pixels_preprocessed(recon.records, recon.masks)
    placed = place_splats(recon.gaussians, recon.w2c_opencv, K_pre, valid, conf_percentile, max_splats=None)
    depth = recon.gaussians.depth[valid & (recon.gaussians.depth > 0)]
    merged = merge_voxels(placed, voxel_size * float(np.median(depth)) if depth.size else 0.0)
    return _at_most(merged, max_splats, seed)
