"""Geometry: camera conventions, rotations, VGGT pose encoding, intrinsics, projection and Sim(3)."""

from ns_extreme.geometry.conventions import (
    OPENCV_TO_OPENGL,
    c2w_opencv_from_w2c_opencv,
    c2w_opengl_from_w2c_opencv,
    colmap_qvec_tvec_from_w2c_opencv,
    invert_rigid,
    to_homogeneous,
    w2c_opencv_from_c2w_opengl,
    w2c_opencv_from_colmap,
)
from ns_extreme.geometry.intrinsics import focal_from_fov, fov_from_focal, intrinsics_matrix
from ns_extreme.geometry.pose_encoding import pose_encoding_from_w2c_intrinsics, w2c_intrinsics_from_pose_encoding
from ns_extreme.geometry.projection import project_points, unproject_depth
from ns_extreme.geometry.rotations import (
    geodesic_angle_deg,
    geodesic_angle_torch,
    matrix_to_quat_xyzw_torch,
    quat_xyzw_to_matrix_torch,
    relative_rotation,
)
from ns_extreme.geometry.sim3 import Sim3, robust_sim3, sim3_from_camera_pairs, transform_w2c_opencv, umeyama_sim3

__all__ = [
    "OPENCV_TO_OPENGL",
    "Sim3",
    "c2w_opencv_from_w2c_opencv",
    "c2w_opengl_from_w2c_opencv",
    "colmap_qvec_tvec_from_w2c_opencv",
    "focal_from_fov",
    "fov_from_focal",
    "geodesic_angle_deg",
    "geodesic_angle_torch",
    "intrinsics_matrix",
    "invert_rigid",
    "matrix_to_quat_xyzw_torch",
    "pose_encoding_from_w2c_intrinsics",
    "project_points",
    "quat_xyzw_to_matrix_torch",
    "relative_rotation",
    "robust_sim3",
    "sim3_from_camera_pairs",
    "to_homogeneous",
    "transform_w2c_opencv",
    "umeyama_sim3",
    "unproject_depth",
    "w2c_intrinsics_from_pose_encoding",
    "w2c_opencv_from_c2w_opengl",
    "w2c_opencv_from_colmap",
]
