"""Camera pose conventions: OpenCV world-to-camera ⇄ OpenGL camera-to-world (nerfstudio) ⇄ COLMAP.

- Models and COLMAP: world-to-camera (``w2c``), OpenCV camera axes (x right, y down, z forward).
- nerfstudio ``transforms.json``: camera-to-world (``c2w``), OpenGL axes (x right, y up, z back),
  i.e. ``c2w_opengl = c2w_opencv · diag(1, −1, −1, 1)``.
- COLMAP stores the w2c rotation as a quaternion ``qw qx qy qz`` plus the translation ``tvec``.

All functions take numpy arrays (any leading batch dims) and return float64.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


OPENCV_TO_OPENGL: np.ndarray = _read_only(np.diag([1.0, -1.0, -1.0]))
"""Camera-axis flip between OpenCV and OpenGL (its own inverse)."""


def _as_pose(T: np.ndarray, name: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.ndim < 2 or T.shape[-1] != 4 or T.shape[-2] not in (3, 4):
        raise ValueError(f"{name} must have shape [..., 3, 4] or [..., 4, 4], got {T.shape}")
    return T


def to_homogeneous(T: np.ndarray) -> np.ndarray:
    """[..., 3, 4] → [..., 4, 4] by appending the row (0, 0, 0, 1); [..., 4, 4] is returned as a copy."""
    T = _as_pose(T, "T")
    if T.shape[-2] == 4:
        return T.copy()
    out = np.zeros(T.shape[:-2] + (4, 4), dtype=np.float64)
    out[..., :3, :] = T
    out[..., 3, 3] = 1.0
    return out


def camera_centres_from_w2c(w2c: np.ndarray) -> np.ndarray:
    """Camera centres ``-Rᵀt`` [..., 3] of world-to-camera poses [..., 3, 4] or [..., 4, 4] (any axis convention)."""
    w2c = _as_pose(w2c, "w2c")
    return -np.einsum("...ji,...j->...i", w2c[..., :3, :3], w2c[..., :3, 3])


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform [R | t] → [Rᵀ | −Rᵀt]; keeps the input shape ([..., 3, 4] or [..., 4, 4])."""
    T = _as_pose(T, "T")
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    R_inv = np.swapaxes(R, -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = R_inv
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", R_inv, t)
    if T.shape[-2] == 4:
        out[..., 3, 3] = 1.0
    return out


def c2w_opencv_from_w2c_opencv(w2c: np.ndarray) -> np.ndarray:
    """Camera-to-world in OpenCV axes; same shape as the input."""
    return invert_rigid(w2c)


def c2w_opengl_from_w2c_opencv(w2c: np.ndarray) -> np.ndarray:
    """nerfstudio ``transform_matrix`` (c2w, OpenGL axes) from an OpenCV w2c; same shape as the input."""
    c2w = invert_rigid(w2c)
    c2w[..., :3, 1:3] *= -1.0
    return c2w


def w2c_opencv_from_c2w_opengl(c2w: np.ndarray) -> np.ndarray:
    """OpenCV w2c from a nerfstudio ``transform_matrix`` (c2w, OpenGL axes); same shape as the input."""
    c2w_opencv = _as_pose(c2w, "c2w").copy()
    c2w_opencv[..., :3, 1:3] *= -1.0
    return invert_rigid(c2w_opencv)


def colmap_qvec_tvec_from_w2c_opencv(w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COLMAP ``(qvec [..., 4] as w, x, y, z with w ≥ 0, tvec [..., 3])`` from w2c [..., 3|4, 4]."""
    w2c = _as_pose(w2c, "w2c")
    batch = w2c.shape[:-2]
    R = w2c[..., :3, :3].reshape(-1, 3, 3)
    q_xyzw = Rotation.from_matrix(R).as_quat()
    q_xyzw = np.where(q_xyzw[:, 3:4] < 0.0, -q_xyzw, q_xyzw)
    qvec_wxyz = np.concatenate([q_xyzw[:, 3:4], q_xyzw[:, :3]], axis=-1).reshape(batch + (4,))
    return qvec_wxyz, w2c[..., :3, 3].copy()


def w2c_opencv_from_colmap(qvec_wxyz: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """w2c [..., 3, 4] from COLMAP ``qvec`` (w, x, y, z; normalised here) and ``tvec``."""
    q = np.asarray(qvec_wxyz, dtype=np.float64)
    t = np.asarray(tvec, dtype=np.float64)
    if q.shape[-1] != 4 or t.shape[-1] != 3 or q.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"qvec [..., 4] and tvec [..., 3] with equal batch dims expected, got {q.shape}, {t.shape}")
    batch = q.shape[:-1]
    q_xyzw = np.concatenate([q[..., 1:], q[..., :1]], axis=-1).reshape(-1, 4)
    R = Rotation.from_quat(q_xyzw).as_matrix().reshape(batch + (3, 3))
    return np.concatenate([R, t[..., None]], axis=-1)
