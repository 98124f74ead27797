"""Geometry conventions checked against the independent reference poses of dev_small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from conftest import SCENES
from scipy.spatial.transform import Rotation

from ns_extreme.geometry import (
    OPENCV_TO_OPENGL,
    Sim3,
    c2w_opencv_from_w2c_opencv,
    c2w_opengl_from_w2c_opencv,
    colmap_qvec_tvec_from_w2c_opencv,
    focal_from_fov,
    fov_from_focal,
    geodesic_angle_deg,
    geodesic_angle_torch,
    intrinsics_matrix,
    invert_rigid,
    matrix_to_quat_xyzw_torch,
    pose_encoding_from_w2c_intrinsics,
    project_points,
    quat_xyzw_to_matrix_torch,
    relative_rotation,
    robust_sim3,
    sim3_from_camera_pairs,
    to_homogeneous,
    transform_w2c_opencv,
    umeyama_sim3,
    unproject_depth,
    w2c_intrinsics_from_pose_encoding,
    w2c_opencv_from_c2w_opengl,
    w2c_opencv_from_colmap,
)


def _load_scene(scene_dir: Path) -> dict[str, dict]:
    """name → {w2c [3,4], K [3,3], hw, qvec, tvec} from the COLMAP text model (via pycolmap)."""
    rec = pycolmap.Reconstruction(str(scene_dir / "sparse" / "0"))
    out = {}
    for image in rec.images.values():
        cam = rec.cameras[image.camera_id]
        rigid = image.cam_from_world()
        out[image.name] = {
            "w2c": np.asarray(rigid.matrix(), dtype=np.float64),
            "qvec_xyzw": np.asarray(rigid.rotation.quat, dtype=np.float64),
            "K": np.asarray(cam.calibration_matrix(), dtype=np.float64),
            "hw": (int(cam.height), int(cam.width)),
        }
    return out


def _load_transforms(scene_dir: Path) -> dict[str, np.ndarray]:
    meta = json.loads((scene_dir / "transforms.json").read_text())
    return {Path(f["file_path"]).name: np.asarray(f["transform_matrix"], dtype=np.float64) for f in meta["frames"]}


def _random_rotations(n: int, seed: int) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_matrix()


def _random_w2c(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([_random_rotations(n, seed), rng.normal(size=(n, 3, 1)) * 3.0], axis=-1)


# ------------------------------------------------------------------------------------------ conventions


@pytest.mark.parametrize("scene", SCENES)
def test_colmap_to_transforms_json_matches_reference(dev_small: Path, scene: str) -> None:
    cams = _load_scene(dev_small / scene)
    transforms = _load_transforms(dev_small / scene)
    assert set(cams) == set(transforms) and len(cams) >= 8
    for name, cam in cams.items():
        c2w_gl = c2w_opengl_from_w2c_opencv(to_homogeneous(cam["w2c"]))
        ref = transforms[name]
        assert c2w_gl.shape == (4, 4)
        np.testing.assert_array_equal(c2w_gl[3], [0.0, 0.0, 0.0, 1.0])
        np.testing.assert_allclose(c2w_gl[:3, :3], ref[:3, :3], atol=1e-6, err_msg=f"{scene}/{name}")
        # Strecha's reference rotations are printed to 6 decimals (orthonormal to ~1e-6) while COLMAP's are
        # re-orthonormalised quaternions, so centres ~20 units away agree to 1e-6 relative, not absolute.
        t_tol = 1e-6 * max(1.0, float(np.linalg.norm(ref[:3, 3])))
        np.testing.assert_allclose(c2w_gl[:3, 3], ref[:3, 3], atol=t_tol, rtol=0, err_msg=f"{scene}/{name}")
        # and back, through the OpenGL → OpenCV inverse
        w2c_back = w2c_opencv_from_c2w_opengl(ref)
        np.testing.assert_allclose(w2c_back[:3, :3], cam["w2c"][:, :3], atol=1e-6)
        np.testing.assert_allclose(w2c_back[:3, 3], cam["w2c"][:, 3], atol=t_tol, rtol=0)


@pytest.mark.parametrize("scene", SCENES)
def test_colmap_qvec_round_trip_on_reference(dev_small: Path, scene: str) -> None:
    cams = _load_scene(dev_small / scene)
    w2c = np.stack([c["w2c"] for c in cams.values()])
    qvec, tvec = colmap_qvec_tvec_from_w2c_opencv(w2c)
    assert qvec.shape == (len(cams), 4) and tvec.shape == (len(cams), 3)
    assert (qvec[:, 0] >= 0).all()
    # pycolmap's own quaternion (x, y, z, w) up to sign
    ref = np.stack([c["qvec_xyzw"] for c in cams.values()])
    ref_wxyz = np.concatenate([ref[:, 3:], ref[:, :3]], axis=1)
    ref_wxyz *= np.sign(ref_wxyz[:, :1])
    np.testing.assert_allclose(qvec, ref_wxyz, atol=1e-9)
    np.testing.assert_allclose(w2c_opencv_from_colmap(qvec, tvec), w2c, atol=1e-9)


def test_colmap_quaternion_matches_images_txt(dev_small: Path) -> None:
    # First data line of castle images.txt: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME
    lines = (dev_small / SCENES[2] / "sparse/0/images.txt").read_text().splitlines()
    fields = next(line for line in lines if line and not line.startswith("#")).split()
    q = np.array(fields[1:5], dtype=np.float64)
    t = np.array(fields[5:8], dtype=np.float64)
    w2c = w2c_opencv_from_colmap(q, t)
    cams = _load_scene(dev_small / SCENES[2])
    np.testing.assert_allclose(w2c, cams[fields[9]]["w2c"], atol=1e-9)
    q_back, t_back = colmap_qvec_tvec_from_w2c_opencv(w2c)
    np.testing.assert_allclose(q_back, q * np.sign(q[0]) / np.linalg.norm(q), atol=1e-12)
    np.testing.assert_allclose(t_back, t)


def test_invert_rigid_and_shapes() -> None:
    w2c = _random_w2c(6, 0).reshape(2, 3, 3, 4)
    inv = invert_rigid(w2c)
    assert inv.shape == w2c.shape
    prod = to_homogeneous(w2c) @ to_homogeneous(inv)
    np.testing.assert_allclose(prod, np.broadcast_to(np.eye(4), prod.shape), atol=1e-12)
    inv4 = invert_rigid(to_homogeneous(w2c))
    assert inv4.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(inv4[..., :3, :], inv, atol=1e-15)
    np.testing.assert_array_equal(inv4[..., 3, :], np.broadcast_to([0, 0, 0, 1.0], (2, 3, 4)))
    # camera centre: w2c maps it to the origin
    c2w = c2w_opencv_from_w2c_opencv(w2c)
    centres = c2w[..., :3, 3]
    np.testing.assert_allclose(np.einsum("...ij,...j->...i", w2c[..., :3], centres) + w2c[..., 3], 0, atol=1e-12)
    with pytest.raises(ValueError):
        invert_rigid(np.eye(3))


def test_opengl_flip_semantics() -> None:
    np.testing.assert_array_equal(OPENCV_TO_OPENGL, np.diag([1.0, -1.0, -1.0]))
    assert not OPENCV_TO_OPENGL.flags.writeable
    w2c = _random_w2c(1, 3)[0]
    c2w_gl = c2w_opengl_from_w2c_opencv(w2c)
    # The OpenGL camera looks down −z: its −z axis in world = the OpenCV +z (viewing) axis = row 2 of R_w2c.
    np.testing.assert_allclose(-c2w_gl[:3, 2], w2c[2, :3], atol=1e-12)
    np.testing.assert_allclose(c2w_gl[:3, :3], c2w_opencv_from_w2c_opencv(w2c)[:3, :3] @ OPENCV_TO_OPENGL, atol=1e-15)
    np.testing.assert_allclose(w2c_opencv_from_c2w_opengl(c2w_gl), w2c, atol=1e-12)


# ------------------------------------------------------------------------------------------ rotations


def test_geodesic_angle_hand_made() -> None:
    Ry30 = Rotation.from_euler("y", 30, degrees=True).as_matrix()
    assert geodesic_angle_deg(Ry30, np.eye(3)) == pytest.approx(30.0, abs=1e-10)
    assert geodesic_angle_deg(np.eye(3), Ry30) == pytest.approx(30.0, abs=1e-10)
    Rx180 = np.diag([1.0, -1.0, -1.0])
    assert geodesic_angle_deg(Rx180, np.eye(3)) == pytest.approx(180.0, abs=1e-10)
    assert geodesic_angle_deg(np.eye(3), np.eye(3)) == 0.0
    # slightly non-orthonormal input must clamp, not NaN
    assert geodesic_angle_deg(np.eye(3) * (1 + 1e-9), np.eye(3)) == 0.0
    angles = np.array([0.0, 10.0, 45.0, 90.0, 135.0, 179.0])
    R_a = Rotation.from_rotvec(np.outer(np.radians(angles), [1.0, 2.0, -2.0]) / 3.0).as_matrix()
    R_common = _random_rotations(1, 4)[0]
    batch = geodesic_angle_deg(R_a @ R_common, np.broadcast_to(R_common, R_a.shape))
    assert batch.shape == (6,) and batch.dtype == np.float64
    np.testing.assert_allclose(batch, angles, atol=1e-6)


def test_relative_rotation_definition() -> None:
    R1, R2 = _random_rotations(2, 5)
    R = relative_rotation(R1, R2)
    np.testing.assert_allclose(R @ R1, R2, atol=1e-12)
    # a point in camera-1 coordinates expressed in camera 2: R2 R1ᵀ x_c1
    np.testing.assert_allclose(relative_rotation(R1[None], R2[None])[0], R2 @ R1.T, atol=1e-15)


def test_castle_relative_rotation_angles(dev_small: Path) -> None:
    scene = dev_small / "strecha_castle-P19_odd9"
    ref = json.loads((scene / "pair_overlap.json").read_text())
    cams = _load_scene(scene)
    R = np.stack([cams[n]["w2c"][:, :3] for n in ref["names"]])
    n = len(ref["names"])
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    R_rel = relative_rotation(R[i], R[j])
    angles = geodesic_angle_deg(R_rel, np.broadcast_to(np.eye(3), R_rel.shape))
    np.testing.assert_array_equal(np.round(angles, 2), np.asarray(ref["rel_rot_deg"]))
    # and directly, without forming the relative rotation
    np.testing.assert_allclose(geodesic_angle_deg(R[i], R[j]), angles, atol=1e-6, rtol=0)


def test_torch_quaternion_round_trip_and_geodesic() -> None:
    R_np = _random_rotations(64, 6)
    # include the awkward cases: identity and 180° turns (w = 0)
    R_np = np.concatenate([R_np, np.eye(3)[None], np.diag([1.0, -1, -1])[None], np.diag([-1.0, -1, 1])[None]])
    R = torch.from_numpy(R_np)
    q = matrix_to_quat_xyzw_torch(R)
    assert (q[:, 3] >= 0).all()
    np.testing.assert_allclose(q.norm(dim=-1).numpy(), 1.0, atol=1e-12)
    q_scipy = Rotation.from_matrix(R_np).as_quat()
    q_scipy *= np.where(q_scipy[:, 3:] < 0, -1.0, 1.0)
    # 180° turns have w = 0 and a sign ambiguity
    sign = np.sign(np.sum(q.numpy() * q_scipy, axis=1, keepdims=True))
    np.testing.assert_allclose(q.numpy() * sign, q_scipy, atol=1e-12)
    np.testing.assert_allclose(quat_xyzw_to_matrix_torch(q).numpy(), R_np, atol=1e-12)
    # non-unit quaternion → same rotation
    np.testing.assert_allclose(quat_xyzw_to_matrix_torch(q * 3.7).numpy(), R_np, atol=1e-12)

    # geodesic (radians), differentiable, finite gradient at identity
    Ry30 = torch.from_numpy(Rotation.from_euler("y", 30, degrees=True).as_matrix())
    assert float(geodesic_angle_torch(Ry30, torch.eye(3, dtype=torch.float64))) == pytest.approx(
        np.radians(30.0), abs=1e-12
    )
    R_a = torch.eye(3, dtype=torch.float64, requires_grad=True)
    loss = geodesic_angle_torch(R_a, torch.eye(3, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(R_a.grad).all()
    assert float(loss.detach()) == pytest.approx(np.arccos(1 - 1e-6), rel=1e-9)
    batched = geodesic_angle_torch(R[:4], R[4:8])
    np.testing.assert_allclose(np.degrees(batched.numpy()), geodesic_angle_deg(R_np[:4], R_np[4:8]), atol=1e-4)


# ------------------------------------------------------------------------------------------ pose encoding


@pytest.mark.parametrize("scene", SCENES)
def test_pose_encoding_round_trip_on_reference(dev_small: Path, scene: str) -> None:
    cams = _load_scene(dev_small / scene)
    for name, cam in cams.items():
        H, W = cam["hw"]
        K = cam["K"].copy()
        K[0, 2], K[1, 2] = W / 2.0, H / 2.0  # the encoding forces the principal point to the centre
        w2c = torch.from_numpy(cam["w2c"])
        enc = pose_encoding_from_w2c_intrinsics(w2c, torch.from_numpy(K), (H, W))
        assert enc.shape == (9,) and enc.dtype == torch.float64
        np.testing.assert_allclose(enc[:3].numpy(), cam["w2c"][:, 3], atol=1e-12)
        assert float(enc[6]) >= 0.0
        # vertical first: fov_h from fy and H
        assert float(enc[7]) == pytest.approx(2 * np.arctan(H / 2 / K[1, 1]), abs=1e-12)
        assert float(enc[8]) == pytest.approx(2 * np.arctan(W / 2 / K[0, 0]), abs=1e-12)
        w2c_back, K_back = w2c_intrinsics_from_pose_encoding(enc, (H, W))
        np.testing.assert_allclose(w2c_back.numpy(), cam["w2c"], atol=1e-6, err_msg=f"{scene}/{name}")
        np.testing.assert_allclose(K_back.numpy(), K, atol=1e-6)
        # quaternion matches the COLMAP/pycolmap one up to sign
        np.testing.assert_allclose(np.abs(enc[3:7].numpy()), np.abs(cam["qvec_xyzw"]), atol=1e-9)


def test_pose_encoding_batched_float32() -> None:
    w2c = torch.from_numpy(_random_w2c(6, 7)).float().reshape(2, 3, 3, 4)
    K = torch.from_numpy(intrinsics_matrix([300.0, 350.0, 400.0], [310.0, 360.0, 390.0], 259.0, 175.0)).float()
    K = K.expand(2, 3, 3, 3)
    enc = pose_encoding_from_w2c_intrinsics(w2c, K, (350, 518))
    assert enc.shape == (2, 3, 9) and enc.dtype == torch.float32
    w2c_back, K_back = w2c_intrinsics_from_pose_encoding(enc, (350, 518))
    assert w2c_back.shape == (2, 3, 3, 4) and K_back.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(w2c_back.numpy(), w2c.numpy(), atol=1e-5)
    np.testing.assert_allclose(K_back.numpy(), K.numpy(), rtol=1e-5)


def test_fov_focal_helpers() -> None:
    assert fov_from_focal(259.0, 518.0) == pytest.approx(np.pi / 2)
    assert focal_from_fov(np.pi / 2, 518.0) == pytest.approx(259.0)
    f = np.array([100.0, 500.0, 2000.0])
    np.testing.assert_allclose(focal_from_fov(fov_from_focal(f, 640.0), 640.0), f, rtol=1e-14)
    K = intrinsics_matrix(1.0, 2.0, 3.0, 4.0)
    np.testing.assert_array_equal(K, [[1.0, 0, 3.0], [0, 2.0, 4.0], [0, 0, 1.0]])


# ------------------------------------------------------------------------------------------ projection


def test_project_unproject_round_trip(dev_small: Path) -> None:
    cam = _load_scene(dev_small / "strecha_fountain-P11")["0000.jpg"]
    H, W = 8, 12
    K = intrinsics_matrix(20.0, 22.0, W / 2, H / 2)
    depth = np.random.default_rng(8).uniform(2.0, 5.0, size=(H, W))
    pts = unproject_depth(depth, K, cam["w2c"])
    assert pts.shape == (H, W, 3)
    uv, z = project_points(pts.reshape(-1, 3), cam["w2c"], K)
    np.testing.assert_allclose(z, depth.ravel(), atol=1e-9)
    jj, ii = np.meshgrid(np.arange(W), np.arange(H))
    np.testing.assert_allclose(uv, np.stack([jj.ravel() + 0.5, ii.ravel() + 0.5], axis=1), atol=1e-9)
    # principal point = image centre: the optical axis hits (W/2, H/2)
    centre_world = c2w_opencv_from_w2c_opencv(cam["w2c"])[:3, 3] + 3.0 * cam["w2c"][2, :3]
    uv_c, z_c = project_points(centre_world[None], cam["w2c"], K)
    np.testing.assert_allclose(uv_c[0], [W / 2, H / 2], atol=1e-9)
    assert z_c[0] == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------ Sim(3)


def _random_sim3(seed: int) -> Sim3:
    rng = np.random.default_rng(seed)
    return Sim3(float(rng.uniform(0.2, 5.0)), _random_rotations(1, seed)[0], rng.normal(size=3) * 10)


def test_sim3_algebra() -> None:
    a, b = _random_sim3(10), _random_sim3(11)
    x = np.random.default_rng(12).normal(size=(20, 3))
    np.testing.assert_allclose(a.compose(b).apply(x), a.apply(b.apply(x)), atol=1e-10)
    np.testing.assert_allclose(a.inverse().apply(a.apply(x)), x, atol=1e-10)
    xh = np.concatenate([x, np.ones((20, 1))], axis=1)
    np.testing.assert_allclose((xh @ a.matrix().T)[:, :3], a.apply(x), atol=1e-10)
    c = Sim3.from_matrix(a.matrix())
    assert c.scale == pytest.approx(a.scale) and np.allclose(c.rotation, a.rotation)
    with pytest.raises(ValueError):
        Sim3(-1.0, np.eye(3), np.zeros(3))
    with pytest.raises((AttributeError, TypeError)):
        a.scale = 2.0  # type: ignore[misc]


def test_umeyama_recovers_known_similarity() -> None:
    truth = _random_sim3(20)
    src = np.random.default_rng(21).normal(size=(50, 3)) * 4.0
    est = umeyama_sim3(src, truth.apply(src))
    assert est.scale == pytest.approx(truth.scale, abs=1e-9)
    np.testing.assert_allclose(est.rotation, truth.rotation, atol=1e-9)
    np.testing.assert_allclose(est.translation, truth.translation, atol=1e-9)
    # without scale: the rotation is still recovered for a rigid truth
    rigid = Sim3(1.0, truth.rotation, truth.translation)
    est_r = umeyama_sim3(src, rigid.apply(src), with_scale=False)
    assert est_r.scale == 1.0
    np.testing.assert_allclose(est_r.matrix(), rigid.matrix(), atol=1e-9)
    # zero weights remove points entirely
    dst = truth.apply(src)
    dst[:10] += 100.0
    w = np.ones(50)
    w[:10] = 0.0
    np.testing.assert_allclose(umeyama_sim3(src, dst, weights=w).matrix(), truth.matrix(), atol=1e-9)
    with pytest.raises(ValueError):
        umeyama_sim3(src[:2], dst[:2])


@pytest.mark.parametrize("loss", ["cauchy", "huber"])
def test_robust_sim3_ignores_outliers(loss: str) -> None:
    rng = np.random.default_rng(30)
    truth = _random_sim3(31)
    src = rng.normal(size=(200, 3)) * 3.0
    dst = truth.apply(src) + rng.normal(size=(200, 3)) * 1e-3
    outliers = rng.choice(200, size=40, replace=False)
    dst[outliers] += rng.normal(size=(40, 3)) * 20.0 + 10.0
    plain = umeyama_sim3(src, dst)
    assert abs(plain.scale - truth.scale) > 1e-2 or np.abs(plain.translation - truth.translation).max() > 0.1
    est, residuals = robust_sim3(src, dst, loss=loss)  # type: ignore[arg-type]
    assert residuals.shape == (200,)
    assert est.scale == pytest.approx(truth.scale, rel=1e-3)
    np.testing.assert_allclose(est.rotation, truth.rotation, atol=1e-3)
    np.testing.assert_allclose(est.translation, truth.translation, atol=1e-2)
    inlier = np.setdiff1d(np.arange(200), outliers)
    assert np.median(residuals[inlier]) < 5e-3
    assert residuals[outliers].min() > 1.0


def test_transform_w2c_keeps_reprojections() -> None:
    sim = _random_sim3(40)
    w2c = _random_w2c(5, 41)
    K = intrinsics_matrix(500.0, 500.0, 320.0, 240.0)
    pts = np.random.default_rng(42).normal(size=(30, 3))
    w2c_new = transform_w2c_opencv(w2c, sim)
    assert w2c_new.shape == w2c.shape
    pts_new = sim.apply(pts)
    for i in range(5):
        uv, z = project_points(pts, w2c[i], K)
        uv_new, z_new = project_points(pts_new, w2c_new[i], K)
        np.testing.assert_allclose(uv_new, uv, atol=1e-8)
        np.testing.assert_allclose(z_new, sim.scale * z, atol=1e-9)
    # camera centres map by the Sim3 and the result is still a rotation
    np.testing.assert_allclose(
        c2w_opencv_from_w2c_opencv(w2c_new)[:, :3, 3], sim.apply(c2w_opencv_from_w2c_opencv(w2c)[:, :3, 3]), atol=1e-9
    )
    np.testing.assert_allclose(
        w2c_new[:, :, :3] @ np.swapaxes(w2c_new[:, :, :3], 1, 2), np.broadcast_to(np.eye(3), (5, 3, 3)), atol=1e-12
    )


@pytest.mark.parametrize("n", [5, 2, 1])
def test_sim3_from_camera_pairs(n: int) -> None:
    truth = _random_sim3(50)
    w2c_src = _random_w2c(n, 51)
    w2c_dst = transform_w2c_opencv(w2c_src, truth)
    est = sim3_from_camera_pairs(w2c_src, w2c_dst)
    np.testing.assert_allclose(est.rotation, truth.rotation, atol=1e-9)
    if n >= 2:
        assert est.scale == pytest.approx(truth.scale, rel=1e-9)
        np.testing.assert_allclose(est.translation, truth.translation, atol=1e-8)
    else:
        assert est.scale == 1.0  # unobservable from one camera; the shared camera still lines up
    np.testing.assert_allclose(transform_w2c_opencv(w2c_src, est)[..., :3], w2c_dst[..., :3], atol=1e-9)
    np.testing.assert_allclose(
        c2w_opencv_from_w2c_opencv(transform_w2c_opencv(w2c_src, est))[:, :3, 3],
        c2w_opencv_from_w2c_opencv(w2c_dst)[:, :3, 3],
        atol=1e-8,
    )


def test_sim3_from_collinear_cameras_uses_rotations() -> None:
    truth = _random_sim3(60)
    w2c_src = _random_w2c(4, 61)
    # put the four camera centres on one line: centre C ⇒ t = −R C
    centres = np.outer(np.arange(4.0), [1.0, 2.0, 0.5])
    w2c_src[:, :, 3] = -np.einsum("nij,nj->ni", w2c_src[:, :, :3], centres)
    w2c_dst = transform_w2c_opencv(w2c_src, truth)
    est = sim3_from_camera_pairs(w2c_src, w2c_dst)
    np.testing.assert_allclose(est.matrix(), truth.matrix(), atol=1e-8)
