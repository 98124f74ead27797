"""WorldMirror in ns_extreme (the model itself: test_worldmirror_model.py): priors fed into the network (known
intrinsics at network pixels, known poses, depth maps; views without a prior), the w2c/c2w direction of its rotation
reader in the alignment loss, normals and splats outputs, ``extreme-poses --model worldmirror`` end to end, and
``ns-extreme-align train/eval --model worldmirror``. Tiny random WorldMirror on CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from ns_extreme.align.loss import rotation_loss
from ns_extreme.geometry.conventions import invert_rigid
from ns_extreme.geometry.pose_encoding import pose_encoding_from_w2c_intrinsics
from ns_extreme.io.depth import write_depth_npy, write_depth_png_mm
from ns_extreme.io.gaussian_ply import SH_C0, read_gaussian_ply, write_gaussian_ply
from ns_extreme.io.images import preprocess_images
from ns_extreme.io.normals import read_normals_png, write_normals_png
from ns_extreme.io.ply import read_ply
from ns_extreme.io.transforms_json import write_transforms_json
from ns_extreme.models import get_spec, load_model
from ns_extreme.models.rotation_readers import w2c_rotations_from_c2w
from ns_extreme.posing.chunking import predict_in_chunks
from ns_extreme.posing.priors import FramePriors, network_priors
from ns_extreme.posing.splats import place_splats
from ns_extreme.posing.worldmirror import PixelGaussians, WorldMirrorBackbone

BIN = Path(sys.executable).parent
SCENE = "strecha_Herz-Jesus-P8"  # 8 images, 768x512, COLMAP model in sparse/0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_wm() -> torch.nn.Module:
    spec = get_spec("worldmirror")
    return load_model("worldmirror", weights="random", alignment="pretrained", config=spec.config("tiny"))


def rot(axis: str, deg: float) -> np.ndarray:
    return Rotation.from_euler(axis, deg, degrees=True).as_matrix()


# ------------------------------------------------------------------------------------------------ rotation reader


def test_rotation_reader_reads_world_to_camera_and_the_loss_sees_the_direction(tiny_wm) -> None:
    """The camera head's encodings are world-to-camera; its ``camera_poses`` are camera-to-world. Reading them the
    wrong way round turns a 70° relative rotation into a 140° error."""
    spec = get_spec("worldmirror")
    assert spec.reference_frame is True
    w2c = torch.zeros(1, 2, 3, 4)
    w2c[0, 0, :, :3] = torch.eye(3)
    w2c[0, 1, :, :3] = torch.tensor(rot("y", 70), dtype=torch.float32)
    w2c[..., 3] = torch.tensor([0.2, 0.0, 1.0])
    K = torch.tensor([[50.0, 0, 28], [0, 50.0, 21], [0, 0, 1]]).expand(1, 2, 3, 3)
    enc = pose_encoding_from_w2c_intrinsics(w2c, K, (42, 56))
    estimates = spec.w2c_rotations({"camera_params_list": [enc, enc]})
    assert len(estimates) == 2
    torch.testing.assert_close(estimates[-1], w2c[..., :3], atol=1e-5, rtol=0)
    R_gt = w2c[..., :3]
    assert rotation_loss(estimates, R_gt, True).loss.item() == pytest.approx(0.0, abs=3e-3)
    wrong = [w2c_rotations_from_c2w(w2c)]  # the w2c matrices misread as camera-to-world
    assert math.degrees(rotation_loss(wrong, R_gt, False).loss.item()) == pytest.approx(140.0, abs=0.2)
    # On the model: the reader's last estimate is the transpose of the predicted camera-to-world rotation.
    with torch.no_grad():
        out = tiny_wm(torch.rand(2, 3, 42, 56), heads=("camera",))
    read = spec.w2c_rotations(out)
    assert len(read) == len(out["camera_params_list"]) == tiny_wm.cfg.camera_iterations
    torch.testing.assert_close(read[-1], out["camera_poses"][..., :3, :3].transpose(-1, -2), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ priors


@pytest.fixture(scope="module")
def scene_images(dev_small: Path) -> list[Path]:
    return sorted((dev_small / SCENE / "images").iterdir())[:3]


@pytest.fixture(scope="module")
def scene_batch(scene_images):
    return preprocess_images(scene_images, target_size=518)


def sizes_of(batch) -> np.ndarray:
    return np.array([(r.original_hw[1], r.original_hw[0]) for r in batch.records])


def test_given_intrinsics_become_network_pixel_intrinsics(scene_images, scene_batch) -> None:
    """768x512 photos -> 518x350 network input (crop mode, height rounded to 14): K scales per axis."""
    rec = scene_batch.records
    assert rec[0].final_hw == (350, 518)
    priors = network_priors(
        get_spec("worldmirror").priors, rec, scene_images, sizes_of(scene_batch), "1000,900,384,256", None, None
    )
    assert priors.names() == ["intrinsics"] and priors.views_with("intrinsics") == 3
    sx, sy = 518 / 768, 350 / 512
    want = np.array([[1000 * sx, 0, 384 * sx], [0, 900 * sy, 256 * sy], [0, 0, 1]])
    np.testing.assert_allclose(priors.intrinsics, np.broadcast_to(want, (3, 3, 3)), rtol=1e-12)
    # predicted-only options give no prior; a model without priors gets none
    for option in ("auto", "shared"):
        assert network_priors(("intrinsics",), rec, scene_images, sizes_of(scene_batch), option, None, None) is None
    assert network_priors((), rec, scene_images, sizes_of(scene_batch), "1000,900,384,256", None, None) is None


def test_known_poses_of_some_views_are_c2w_relative_to_the_first_known_one(scene_images, scene_batch, tmp_path):
    """--poses-from holding views 1 and 2 only: view 0 gets no pose / intrinsics prior (NaN), view 1 the identity,
    view 2 its pose relative to view 1; their cameras (auto intrinsics) become the ray-token prior."""
    c2w = [np.eye(4), np.eye(4)]
    c2w[0][:3, :3], c2w[0][:3, 3] = rot("y", 20), [1.0, 2.0, 3.0]
    c2w[1][:3, :3], c2w[1][:3, 3] = rot("x", -30) @ rot("y", 50), [4.0, 2.0, 1.0]
    w2c = np.stack([invert_rigid(T)[:3] for T in c2w])
    K = np.array([[[700.0, 0, 380], [0, 710.0, 250], [0, 0, 1]]] * 2)
    names = [f"images/{p.name}" for p in scene_images[1:]]
    write_transforms_json(tmp_path / "transforms.json", names, w2c, K, np.array([[768, 512]] * 2))
    priors = network_priors(
        ("intrinsics", "poses", "depth"), scene_batch.records, scene_images, sizes_of(scene_batch), "auto",
        tmp_path / "transforms.json", None,
    )  # fmt: skip
    assert priors.names() == ["intrinsics", "poses"]
    assert priors.views_with("poses") == priors.views_with("intrinsics") == 2
    assert np.isnan(priors.poses_c2w[0]).all() and np.isnan(priors.intrinsics[0]).all()
    np.testing.assert_allclose(priors.poses_c2w[1], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(priors.poses_c2w[2], np.linalg.inv(c2w[0]) @ c2w[1], atol=1e-12)
    np.testing.assert_allclose(priors.intrinsics[2], scene_batch.records[2].intrinsics_to_preprocessed(K[1]))
    chunk = priors.subset([0, 2])  # a chunk of --max-frames-per-pass: re-anchored on its own first known view
    assert chunk.views_with("poses") == 1
    np.testing.assert_allclose(chunk.poses_c2w[1], np.eye(4), atol=1e-12)


def test_depth_files_are_matched_by_stem_and_resized_like_the_images(tmp_path: Path) -> None:
    """a: 16-bit mm PNG at full size; b: .npy at half size; c: no file (no prior). Tall images are cropped."""
    W, H = 112, 140  # portrait: crop mode resizes to 56 x 70, then keeps the centre 56 rows
    imgs = [np.full((H, W, 3), 128, np.uint8)] * 3
    batch = preprocess_images(imgs, target_size=56)
    rec = batch.records[0]
    assert (rec.resized_hw, rec.crop_offset_xy, rec.final_hw) == ((70, 56), (0, 7), (56, 56))
    rows = np.arange(H, dtype=np.float32)[:, None]
    depth_a = np.broadcast_to(1.0 + rows / 100.0, (H, W)).astype(np.float32)  # depth grows downwards, 1 cm per row
    depth_a[:, :4] = 0.0  # a hole
    folder = tmp_path / "depth"
    folder.mkdir()
    write_depth_png_mm(folder / "a.png", depth_a)
    write_depth_npy(folder / "b.npy", np.full((H // 2, W // 2), 3.0, np.float32))
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"]
    priors = network_priors(("depth",), batch.records, paths, np.array([[W, H]] * 3), "auto", None, folder)
    assert priors.depth.shape == (3, 56, 56) and priors.views_with("depth") == 2
    # network row r shows resized row r + 7, i.e. original rows around (r + 7.5) * 2: nearest neighbour
    r = np.arange(56)
    want_rows = np.floor((r + 7 + 0.5) * H / 70).astype(int)
    np.testing.assert_allclose(priors.depth[0][:, 30], 1.0 + want_rows / 100.0, atol=1e-6)
    assert (priors.depth[0][:, :2] == 0).all()  # the hole stays a hole
    assert (priors.depth[1] == 3.0).all() and (priors.depth[2] == 0).all()

    write_depth_npy(folder / "c.npy", np.ones((H, H), np.float32))
    with pytest.raises(ValueError, match="c.npy is 140x140, but its image is 112x140"):
        network_priors(("depth",), batch.records, paths, np.array([[W, H]] * 3), "auto", None, folder)
    (folder / "c.npy").unlink()
    write_depth_npy(folder / "a.npy", depth_a)
    with pytest.raises(ValueError, match="both a.png and a.npy"):
        network_priors(("depth",), batch.records, paths, np.array([[W, H]] * 3), "auto", None, folder)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="no depth file matches"):
        network_priors(("depth",), batch.records, paths, np.array([[W, H]] * 3), "auto", None, tmp_path / "other")


def test_priors_reach_the_network_and_views_without_one_get_the_empty_token(tiny_wm, monkeypatch) -> None:
    """What the backbone's token encoders receive from ``predict(priors=...)``: the ray vector (fx/W, fy/H, cx/W,
    cy/H) at network pixels, per-view validity for partial priors, and nothing at all for an all-missing prior
    (then the outputs are bit-identical to running without it)."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 42, 56)
    backbone = WorldMirrorBackbone(tiny_wm, target_size=56)
    vgt = tiny_wm.visual_geometry_transformer
    seen: list[dict] = []
    real = type(vgt).forward

    def spy(self, images, keep, **priors):
        seen.append({k: v for k, v in priors.items() if v is not None})
        return real(self, images, keep, **priors)

    monkeypatch.setattr(type(vgt), "forward", spy)
    base = backbone.predict(images)
    assert seen.pop() == {}
    K = np.array([[40.0, 0, 28], [0, 35.0, 20], [0, 0, 1]])
    Ks = np.stack([K, np.full((3, 3), np.nan), K])  # view 1 without intrinsics
    poses = np.stack([np.eye(4)] * 3)
    poses[1:, :3, 3] = [[1.0, 0, 0], [2.0, 0.5, 0]]
    depth = np.linspace(1, 3, 3 * 42 * 56, dtype=np.float32).reshape(3, 42, 56)
    depth[2] = 0.0  # view 2 without depth
    used = backbone.predict(images, priors=FramePriors(intrinsics=Ks, poses_c2w=poses, depth=depth))
    got = seen.pop()
    assert set(got) == {"ray_vectors", "ray_valid", "pose_vectors", "depth_maps", "depth_valid"}  # all poses given
    torch.testing.assert_close(got["ray_vectors"][0, 0], torch.tensor([40 / 56, 35 / 42, 28 / 56, 20 / 42]))
    assert got["ray_valid"].tolist() == [[True, False, True]] and got["depth_valid"].tolist() == [[True, True, False]]
    assert got["pose_vectors"].shape == (1, 3, 7) and got["depth_maps"].shape == (1, 3, 42, 56)
    assert not np.array_equal(used.w2c_opencv, base.w2c_opencv) and not np.array_equal(used.depth, base.depth)
    none = FramePriors(np.full((3, 3, 3), np.nan), np.full((3, 4, 4), np.nan), np.zeros((3, 42, 56), np.float32))
    empty = backbone.predict(images, priors=none)
    assert seen.pop() == {}
    assert np.array_equal(empty.w2c_opencv, base.w2c_opencv) and np.array_equal(empty.depth, base.depth)
    assert base.normals.shape == (3, 42, 56, 3)
    np.testing.assert_allclose(np.linalg.norm(base.normals, axis=-1), 1.0, atol=1e-4)


def test_chunked_passes_get_the_priors_of_their_own_views(tiny_wm) -> None:
    torch.manual_seed(1)
    images = torch.rand(5, 3, 42, 56)
    backbone = WorldMirrorBackbone(tiny_wm, target_size=56)
    K = np.stack([np.array([[30.0 + i, 0, 28], [0, 30.0 + i, 21], [0, 0, 1]]) for i in range(5)])
    seen = []

    def spy(chunk, priors=None):
        seen.append(priors.intrinsics[:, 0, 0].tolist())
        return backbone.predict(chunk, priors=priors)

    pred, _ = predict_in_chunks(spy, images, max_frames=3, overlap=1, priors=FramePriors(intrinsics=K))
    assert seen == [[30.0, 31.0, 32.0], [32.0, 33.0, 34.0]]
    assert pred.normals.shape == (5, 42, 56, 3)
    whole = backbone.predict(images[:3], priors=FramePriors(intrinsics=K[:3]))
    np.testing.assert_array_equal(pred.normals[:3], whole.normals)


# ------------------------------------------------------------------------------------------------ splats, files


def gaussians_1view(H: int = 2, W: int = 3) -> PixelGaussians:
    return PixelGaussians(
        depth=np.full((1, H, W), 2.0, np.float32),
        confidence=np.arange(1, H * W + 1, dtype=np.float32).reshape(1, H, W),
        quats_wxyz=np.tile(np.array([1.0, 0, 0, 0], np.float32), (1, H, W, 1)),
        scales=np.full((1, H, W, 3), 0.1, np.float32),
        opacity=np.full((1, H, W), 0.5, np.float32),
        f_dc=np.zeros((1, H, W, 3), np.float32),
    )


def test_splats_sit_on_their_pixel_rays_in_the_world_and_are_filtered():
    g = gaussians_1view()
    K = np.array([[[2.0, 0, 1.5], [0, 2.0, 1.0], [0, 0, 1]]])
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot("y", 90), [1.0, 0.0, 0.0]
    w2c = invert_rigid(c2w)[None, :3]
    valid = np.ones((1, 2, 3), bool)
    s = place_splats(g, w2c, K, valid, conf_percentile=0.0)
    assert len(s) == 6
    v, u = np.mgrid[0:2, 0:3] + 0.5
    cam = np.stack(((u - 1.5) / 2 * 2, (v - 1.0) / 2 * 2, np.full((2, 3), 2.0)), -1).reshape(-1, 3)
    np.testing.assert_allclose(s.means, cam @ c2w[:3, :3].T + c2w[:3, 3], atol=1e-6)
    want_q = Rotation.from_matrix(c2w[:3, :3]).as_quat(scalar_first=True, canonical=True)
    np.testing.assert_allclose(s.quats_wxyz, np.tile(want_q, (6, 1)), atol=1e-6)
    assert (s.scales == np.float32(0.1)).all() and (s.view == 0).all()
    assert len(place_splats(g, w2c, K, valid, conf_percentile=50.0)) == 3  # confidences 4, 5, 6 of 1..6
    valid[0, 1] = False
    assert len(place_splats(g, w2c, K, valid, conf_percentile=0.0)) == 3
    g.opacity[0, 0, 0] = 0.01
    assert len(place_splats(g, w2c, K, valid, conf_percentile=0.0)) == 2
    assert len(place_splats(g, w2c, K, valid, conf_percentile=0.0, max_splats=1)) == 1
    assert len(place_splats(g, w2c, K, np.zeros_like(valid))) == 0


def test_exported_splats_are_the_reference_inference_splats():
    """The export chain (per-pixel Gaussians, placed with the cameras, voxel-merged) gives the splats of the
    reference's own inference path (ported as ``splats_from_gaussian_params``): same centres, colours, scales,
    rotations and, above all, opacities, which the reference takes from its merge weights, not its opacity channel."""
    from ns_extreme.models.worldmirror.modules import splats_from_gaussian_params
    from ns_extreme.posing.splats import merge_voxels
    from ns_extreme.posing.worldmirror import pixel_gaussians

    S, H, W = 3, 6, 8
    g = torch.Generator().manual_seed(0)
    params = torch.randn(1, S, H, W, 12, generator=g)
    params[..., 0] += 3.0  # scalar parts > 0: the export's canonical rotations are the reference's own
    depth = torch.rand(1, S, H, W, 1, generator=g) + 1.0
    images = torch.rand(S, 3, H, W, generator=g)
    R_w2c = Rotation.random(S, random_state=1).as_matrix()
    w2c = np.concatenate((R_w2c, np.random.default_rng(2).normal(size=(S, 3, 1))), axis=-1)
    K = np.tile(np.array([[5.0, 0, W / 2], [0, 5.0, H / 2], [0, 0, 1]]), (S, 1, 1))  # pixel centres at +0.5
    out = {"gs_params": params, "gs_depth": depth, "gs_depth_conf": torch.ones(1, S, H, W)}

    ours = pixel_gaussians(out, images, torch.from_numpy(R_w2c).float())
    placed = place_splats(ours, w2c, K, np.ones((S, H, W), bool), conf_percentile=0.0, min_opacity=0.0,
                          max_splats=None)  # fmt: skip
    c2w = torch.from_numpy(np.stack([invert_rigid(np.vstack([m, [0, 0, 0, 1]])) for m in w2c])).float()
    K_ref = torch.from_numpy(K).float().clone()
    K_ref[:, :2, 2] -= 0.5  # the reference's pixel centres are at integers
    for voxel in (1e-4, 0.4):  # every Gaussian alone, then many merged
        merged = merge_voxels(placed, voxel)
        ref = splats_from_gaussian_params(params[0].permute(0, 3, 1, 2), images[None], depth, c2w[None], K_ref[None],
                                          1, voxel)  # fmt: skip
        ref = {k: v[0].numpy() for k, v in ref.items()}
        assert len(merged) == len(ref["means"]) and (len(merged) < S * H * W) == (voxel > 0.01)
        a, b = np.lexsort(merged.means.T), np.lexsort(ref["means"].T)
        np.testing.assert_allclose(merged.means[a], ref["means"][b], atol=1e-5)
        np.testing.assert_allclose(merged.opacity[a], ref["opacities"][b], atol=1e-6)
        np.testing.assert_allclose(merged.scales[a], ref["scales"][b], atol=1e-6)
        np.testing.assert_allclose(merged.f_dc[a], ref["sh"][b][:, 0], atol=1e-5)
        np.testing.assert_allclose(merged.quats_wxyz[a], ref["quats"][b], atol=1e-5)


def test_splat_rotations_stay_in_the_network_world_for_every_view():
    """The reference's Gaussian rotations are in the network's world (camera 0), never per view: taken into each
    view's camera frame with the predicted pose and placed back with that same pose, every view gives them back."""
    from ns_extreme.posing.worldmirror import pixel_gaussians

    S, H, W = 3, 2, 2
    q_world = Rotation.random(S * H * W, random_state=4).as_quat(scalar_first=True).reshape(S, H, W, 4)
    params = torch.zeros(1, S, H, W, 12)
    params[..., :4] = torch.from_numpy(q_world).float()
    out = {"gs_params": params, "gs_depth": torch.full((1, S, H, W, 1), 2.0), "gs_depth_conf": torch.ones(1, S, H, W)}
    R_w2c = Rotation.random(S, random_state=5).as_matrix()
    R_w2c[0] = np.eye(3)
    g = pixel_gaussians(out, torch.full((S, 3, H, W), 0.5), torch.from_numpy(R_w2c).float())
    w2c = np.concatenate((R_w2c, np.zeros((S, 3, 1))), axis=-1)
    K = np.tile(np.array([[2.0, 0, 1.0], [0, 2.0, 1.0], [0, 0, 1]]), (S, 1, 1))
    s = place_splats(g, w2c, K, np.ones((S, H, W), bool), conf_percentile=0.0, min_opacity=0.0)
    assert len(s) == S * H * W
    want = Rotation.from_quat(q_world.reshape(-1, 4), scalar_first=True)
    got = Rotation.from_quat(s.quats_wxyz, scalar_first=True)
    assert np.degrees((want.inv() * got).magnitude()).max() < 1e-3


def test_splats_follow_the_world_scale_of_scale_from(tiny_wm, dev_small: Path, tmp_path: Path) -> None:
    """--scale-from rescales the world after inference: the Gaussians' depth must follow it like the depth maps,
    or the splats of a dataset in metres sit at the model's arbitrary distances."""
    from ns_extreme.posing import PosingOptions, pose_images
    from ns_extreme.posing.refine import RefineOptions

    photos = sorted(first_photos(dev_small, tmp_path / "photos", 3).iterdir())
    backbone = WorldMirrorBackbone(tiny_wm, target_size=56, splats=True)
    recons = [
        pose_images(
            photos,
            backbone,
            PosingOptions(
                scale_from=f"{photos[0].name},{photos[2].name},{metres}",
                orient="none",
                refinement=RefineOptions(refine=False),
            ),
            progress=False,
        )
        for metres in (1.0, 2.0)
    ]
    np.testing.assert_allclose(recons[1].depth, 2 * recons[0].depth, rtol=1e-5)
    np.testing.assert_allclose(recons[1].gaussians.depth, 2 * recons[0].gaussians.depth, rtol=1e-5)
    np.testing.assert_allclose(recons[1].gaussians.scales, 2 * recons[0].gaussians.scales, rtol=1e-5)


def test_gaussian_ply_round_trip_and_point_cloud_view(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 50
    q = Rotation.random(n, random_state=1).as_quat(scalar_first=True).astype(np.float32)
    g = dict(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        quats_wxyz=q,
        scales=rng.uniform(0.01, 0.3, (n, 3)).astype(np.float32),
        opacity=rng.uniform(0.05, 0.95, n).astype(np.float32),
        f_dc=rng.normal(size=(n, 3)).astype(np.float32),
    )
    write_gaussian_ply(tmp_path / "s.ply", **g)
    header = (tmp_path / "s.ply").read_bytes().split(b"end_header")[0].decode()
    props = [ln.split()[-1] for ln in header.splitlines() if ln.startswith("property")]
    assert props == ["x", "y", "z", "red", "green", "blue", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    assert "binary_little_endian" in header
    back = read_gaussian_ply(tmp_path / "s.ply")
    for k, v in g.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    _, rgb, _ = read_ply(tmp_path / "s.ply")
    np.testing.assert_array_equal(rgb, np.clip(np.round((0.5 + SH_C0 * g["f_dc"]) * 255), 0, 255).astype(np.uint8))


def test_normals_png_round_trip(tmp_path: Path) -> None:
    n = Rotation.random(12, random_state=2).apply([0.0, 0.0, -1.0]).reshape(3, 4, 3)
    n[0, 0] = 0.0  # no normal
    write_normals_png(tmp_path / "n.png", n)
    back = read_normals_png(tmp_path / "n.png")
    assert (back[0, 0] == 0).all()
    assert np.degrees(np.arccos(np.clip((back * n).sum(-1)[n.any(-1)], -1, 1))).max() < 0.7
    assert Image.open(tmp_path / "n.png").mode == "RGB"


# ------------------------------------------------------------------------------------------------ CLI


def first_photos(dev_small: Path, folder: Path, n: int) -> Path:
    """A folder with copies of the first ``n`` photos of SCENE."""
    folder.mkdir()
    for p in sorted((dev_small / SCENE / "images").iterdir())[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "150"}


def test_extreme_poses_with_worldmirror_priors_normals_and_splats(dev_small: Path, tmp_path: Path) -> None:
    """Known poses for all views and depth for two of four: every prior goes in, known poses come out exactly,
    normals/ and splats.ply are written in the dataset's world and listed."""
    images = first_photos(dev_small, tmp_path / "photos", 4)
    depth = tmp_path / "depth"
    depth.mkdir()
    names = sorted(p.stem for p in images.iterdir())
    for stem in names[:2]:
        write_depth_png_mm(depth / f"{stem}.png", np.full((512, 768), 4.0, np.float32))
    out = tmp_path / "dataset"
    args = ["extreme-poses", "--data", str(images), "--output-dir", str(out), "--model", "worldmirror",
            "--model-size", "tiny", "--weights", "random", "--no-refine", "--write-splats", "--max-splats", "4000",
            "--poses-from", str(dev_small / SCENE / "sparse" / "0"), "--depth-from", str(depth)]  # fmt: skip
    cmd = [str(BIN / "ns-process-data"), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "HunyuanWorld-Mirror Community License" in proc.stdout and "network priors" in proc.stdout

    prov = json.loads((out / "extreme_poses.json").read_text())
    assert prov["backbone"] == "worldmirror"
    assert prov["network_priors"] == {"intrinsics": 4, "poses": 4, "depth": 2}
    meta = json.loads((out / "transforms.json").read_text())
    files = [f["normal_file_path"] for f in meta["frames"]]
    assert files == prov["outputs"]["normals"]["files"] == [f"normals/{s}.png" for s in names]
    n = read_normals_png(out / files[0])
    assert n.shape == (512, 768, 3)
    seen = n.any(-1)
    assert seen.mean() > 0.9
    np.testing.assert_allclose(np.linalg.norm(n[seen], axis=-1), 1.0, atol=1e-5)

    # the viewers show the normal map of the selected view
    from ns_extreme.viewer.images import image_data_url
    from ns_extreme.viewer.panel_text import view_markdown
    from ns_extreme.viewer.scene_data import load_scene

    scene = load_scene(out)
    assert scene.normal_maps == [out / f for f in files]
    text = view_markdown(scene, 1, "", image_data_url(scene.normal_maps[1]))
    assert f"![normals of {names[1]}](data:image/jpeg;base64," in text

    splats = read_gaussian_ply(out / "splats.ply")
    assert 0 < len(splats["means"]) == prov["outputs"]["splats"]["count"] <= 4000
    assert prov["splat_voxel_size"] == 0.002
    np.testing.assert_allclose(np.linalg.norm(splats["quats_wxyz"], axis=-1), 1.0, atol=1e-5)
    assert (splats["opacity"] >= 0.05 - 1e-6).all()
    # same world as sparse_pc.ply (transforms.json's): the splats' centre lies inside the point cloud's extent
    points, _, _ = read_ply(out / "sparse_pc.ply")
    lo, hi = np.percentile(points, 1, axis=0), np.percentile(points, 99, axis=0)
    assert ((np.median(splats["means"], axis=0) > lo) & (np.median(splats["means"], axis=0) < hi)).all()


@pytest.fixture(scope="module")
def castle_pairs(tmp_path_factory: pytest.TempPathFactory, dev_small: Path) -> Path:
    from ns_extreme.cli import align as cli

    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    args = ["pairs", "--sources", str(dev_small / "strecha_castle-P19_odd9"), "--output", str(path)]
    assert cli.main([*args, "--model", "worldmirror"]) == 0
    return path


def test_align_train_resumes_and_eval_reports_per_overlap_class(castle_pairs: Path, tmp_path: Path) -> None:
    from ns_extreme.align.train import find_checkpoints
    from ns_extreme.cli import align as cli
    from ns_extreme.models.bias import read_bias_checkpoint

    common = ["--model", "worldmirror", "--model-size", "tiny", "--weights", "random", "--image-size", "56",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    train = ["train", "--pairs", str(castle_pairs), "--batch-size", "2", "--epochs", "2", "--lr", "1e-2",
             "--warmup-steps", "0", "--swap-prob", "0", *common]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main([*train, "--output-dir", str(whole)]) == 0
    assert cli.main([*train, "--output-dir", str(split), "--max-steps", "2"]) == 0
    assert [s for s, _ in find_checkpoints(split)][-1] == 2
    assert cli.main([*train, "--output-dir", str(split), "--resume"]) == 0
    a, b = read_bias_checkpoint(whole / "biases.pth"), read_bias_checkpoint(split / "biases.pth")
    spec = get_spec("worldmirror")
    initial = load_model("worldmirror", weights="random", alignment="pretrained", config=spec.config("tiny"))
    assert list(a) == spec.paper_bias_set.select(initial) and len(a) == 32
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    params = dict(initial.named_parameters())
    assert all(not torch.equal(a[k], params[k]) for k in a)  # every tuned bias moved

    report_dir = tmp_path / "eval"
    args = ["eval", "--pairs", str(castle_pairs), "--output-dir", str(report_dir), "--no-plots", *common,
            "--models", "pretrained", f"mine={whole / 'biases.pth'}"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((report_dir / "report.json").read_text())
    pairs = json.loads(castle_pairs.read_text())["pairs"]
    counts = {c: sum(p["overlap"] == c for p in pairs) for c in ("large", "small", "none")}
    assert report["model"] == "worldmirror" and report["counts"] == counts and all(counts.values())
    for label in ("pretrained", "mine"):
        summary = report["models"][label]["summary"]
        errors = np.array([p["errors_deg"][label] for p in report["pairs"]], dtype=float)
        overlap = np.array([p["overlap"] for p in report["pairs"]])
        for c, k in counts.items():
            assert summary[c]["count"] == k and summary[c]["failed"] == 0, (label, c)
            assert summary[c]["mre"] == pytest.approx(float(np.median(errors[overlap == c])), abs=1e-9)


def test_extreme3d_dataparser_poses_a_raw_folder_with_worldmirror_and_its_depth_prior(dev_small: Path, tmp_path):
    from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParserConfig
    from ns_extreme.posing import PoseModelOptions, PosingOptions
    from ns_extreme.posing.refine import RefineOptions

    images = first_photos(dev_small, tmp_path / "photos", 3)
    depth = tmp_path / "depth"
    depth.mkdir()
    write_depth_npy(depth / f"{sorted(images.iterdir())[0].stem}.npy", np.full((256, 384), 2.0, np.float32))
    posing = PosingOptions(depth_from=depth, refinement=RefineOptions(refine=False))
    tiny = dict(model_size="tiny", weights="random", device="cpu", dtype="fp32")
    wm = PoseModelOptions(model="worldmirror", **tiny)
    config = Extreme3DDataParserConfig(data=images, backbone=wm, posing=posing)
    out = config.setup().get_dataparser_outputs(split="train")
    assert len(out.image_filenames) == 3
    prov = json.loads((images / ".extreme3d" / "extreme_poses.json").read_text())
    assert prov["backbone"] == "worldmirror" and prov["network_priors"] == {"depth": 1}
    assert len(prov["outputs"]["normals"]["files"]) == 3
    config = Extreme3DDataParserConfig(data=images, backbone=PoseModelOptions(model="vggt", **tiny), posing=posing)
    with pytest.raises(ValueError, match="--depth-from: vggt takes no depth prior"):
        config.setup().get_dataparser_outputs(split="train")


def test_masked_pixels_give_no_splats(tiny_wm, dev_small: Path, tmp_path: Path) -> None:
    """--masks (left half ignored): every Gaussian comes from a kept pixel, so it projects into the kept half of the
    view it came from; without the masks, the left half gives Gaussians too."""
    from PIL import Image

    from ns_extreme.geometry.projection import project_points
    from ns_extreme.posing import PosingOptions, pose_images
    from ns_extreme.posing.refine import RefineOptions
    from ns_extreme.posing.splats import splats_from_reconstruction

    photos = sorted(first_photos(dev_small, tmp_path / "photos", 3).iterdir())
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in photos:
        w, h = Image.open(p).size
        keep = np.full((h, w), 255, np.uint8)
        keep[:, : w // 2] = 0
        Image.fromarray(keep).save(masks / f"{p.stem}.png")
    backbone = WorldMirrorBackbone(tiny_wm, target_size=56, splats=True)
    left_share = {}
    for masked in (False, True):
        opts = PosingOptions(masks=masks if masked else None, orient="none", refinement=RefineOptions(refine=False))
        recon = pose_images(photos, backbone, opts, progress=False)
        splats = splats_from_reconstruction(recon, conf_percentile=0.0)
        assert len(splats) > 0
        u = np.concatenate([
            project_points(splats.means[splats.view == i], recon.w2c_opencv[i], recon.intrinsics[i])[0][:, 0]
            / recon.sizes_wh[i][0]
            for i in range(len(photos))
        ])  # fmt: skip
        left_share[masked] = float((u < 0.5).mean())
    assert left_share[True] == 0.0 and left_share[False] > 0.2, left_share
