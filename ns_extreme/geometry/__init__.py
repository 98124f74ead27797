"""Geometry: camera conventions, rotations, VGGT pose encoding, intrinsics, projection and Sim(3).

Names are imported on first use: the numpy-only modules load without torch.
"""

from __future__ import annotations

from ns_extreme._lazy import lazy_exports

_EXPORTS = {
    "c2w_opencv_from_w2c_opencv": "ns_extreme.geometry.conventions",
    "camera_centres_from_w2c": "ns_extreme.geometry.conventions",
    "c2w_opengl_from_w2c_opencv": "ns_extreme.geometry.conventions",
    "colmap_qvec_tvec_from_w2c_opencv": "ns_extreme.geometry.conventions",
    "focal_from_fov": "ns_extreme.geometry.intrinsics",
    "fov_from_focal": "ns_extreme.geometry.intrinsics",
    "geodesic_angle_deg": "ns_extreme.geometry.rotations",
    "geodesic_angle_torch": "ns_extreme.geometry.rotations_torch",
    "intrinsics_matrix": "ns_extreme.geometry.intrinsics",
    "invert_rigid": "ns_extreme.geometry.conventions",
    "nearest_rotation": "ns_extreme.geometry.rotations",
    "matrix_to_quat_xyzw_torch": "ns_extreme.geometry.rotations_torch",
    "OPENCV_TO_OPENGL": "ns_extreme.geometry.conventions",
    "pose_encoding_from_w2c_intrinsics": "ns_extreme.geometry.pose_encoding",
    "project_points": "ns_extreme.geometry.projection",
    "quat_xyzw_to_matrix_torch": "ns_extreme.geometry.rotations_torch",
    "relative_rotation": "ns_extreme.geometry.rotations",
    "robust_sim3": "ns_extreme.geometry.sim3",
    "Sim3": "ns_extreme.geometry.sim3",
    "sim3_from_camera_pairs": "ns_extreme.geometry.sim3",
    "to_homogeneous": "ns_extreme.geometry.conventions",
    "transform_w2c_opencv": "ns_extreme.geometry.sim3",
    "umeyama_sim3": "ns_extreme.geometry.sim3",
    "unproject_depth": "ns_extreme.geometry.projection",
    "w2c_intrinsics_from_pose_encoding": "ns_extreme.geometry.pose_encoding",
    "w2c_opencv_from_c2w_opengl": "ns_extreme.geometry.conventions",
    "w2c_opencv_from_colmap": "ns_extreme.geometry.conventions",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
