"""Per-pair diagnostics: predicted relative rotation angle and estimated overlap class."""

from __future__ import annotations

import numpy as np

from ns_extreme.geometry.overlap import fov_xy_deg, overlap_class_from_angles, yaw_pitch_deg
from ns_extreme.geometry.rotations import geodesic_angle_deg
from ns_extreme.posing.reconstruction import PairDiagnostic

MAX_PAIRS = 50_000


def pair_indices(n: int, max_pairs: int = MAX_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j, or, for large collections, pairs within an index window that fits ``max_pairs``."""
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        window = max(1, max_pairs // max(n, 1))
        keep = (j - i) <= window
        i, j = i[keep], j[keep]
    return i, j


def pair_diagnostics(
    w2c: np.ndarray, K: np.ndarray, sizes_wh: np.ndarray, pretrained_w2c: np.ndarray | None = None
) -> list[PairDiagnostic]:
    i, j = pair_indices(len(w2c))
    R = w2c[:, :3, :3]
    R_rel = R[j] @ np.swapaxes(R[i], -1, -2)
    angles = np.atleast_1d(geodesic_angle_deg(R_rel, np.broadcast_to(np.eye(3), R_rel.shape)))
    if len(i) == 0:
        return []
    yaw, pitch = yaw_pitch_deg(R_rel)
    fov = [fov_xy_deg(K[k, 0, 0], K[k, 1, 1], sizes_wh[k, 0], sizes_wh[k, 1]) for k in range(len(w2c))]
    pt_angles = disagreement = None
    if pretrained_w2c is not None:
        Rp = pretrained_w2c[:, :3, :3]
        Rp_rel = Rp[j] @ np.swapaxes(Rp[i], -1, -2)
        pt_angles = np.atleast_1d(geodesic_angle_deg(Rp_rel, np.broadcast_to(np.eye(3), Rp_rel.shape)))
        disagreement = np.atleast_1d(geodesic_angle_deg(R_rel, Rp_rel))
    return [
        PairDiagnostic(
            int(a),
            int(b),
            float(angles[k]),
            overlap_class_from_angles(yaw[k], pitch[k], fov[a], fov[b]),
            None if pt_angles is None else float(pt_angles[k]),
            None if disagreement is None else float(disagreement[k]),
        )
        for k, (a, b) in enumerate(zip(i, j))
    ]
