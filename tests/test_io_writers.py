"""Writers/readers in ns_extreme.io, checked against pycolmap, nerfstudio's own parsers and open3d."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from conftest import SCENES

from ns_extreme.geometry.conventions import c2w_opengl_from_w2c_opencv, to_homogeneous
from ns_extreme.io.atomic import (
    OutputExistsError,
    atomic_write_bytes,
    atomic_write_json,
    staged_output_dir,
    torch_save_atomic,
)
from ns_extreme.io.colmap_model import read_colmap_model, write_colmap_model
from ns_extreme.io.dataset import point_properties
from ns_extreme.io.depth import read_depth_npy, read_depth_png_mm, write_depth_npy, write_depth_png_mm
from ns_extreme.io.ply import read_ply, write_ply
from ns_extreme.io.transforms_json import apply_world_transform, read_transforms_json, write_transforms_json

# nerfstudio's ns-process-data world change (COLMAP -> z up), plus a shift so translation matters too.
APPLIED = np.array([[1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, -1.0], [0.0, -1.0, 0.0, 2.0]])


def _reference_cameras(scene_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Names, w2c [N,3,4], K [N,3,3], sizes [N,2] of a reference model, read with plain pycolmap."""
    rec = pycolmap.Reconstruction(str(scene_dir / "sparse" / "0"))
    images = [rec.images[i] for i in sorted(rec.images)]
    names = [im.name for im in images]
    w2c = np.stack([im.cam_from_world().matrix() for im in images])
    K = np.stack([im.camera.calibration_matrix() for im in images])
    sizes = np.array([(im.camera.width, im.camera.height) for im in images])
    return names, w2c, K, sizes


def _points_near_cameras(w2c: np.ndarray, n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])
    lo, hi = centres.min(0) - 1.0, centres.max(0) + 1.0
    xyz = rng.uniform(lo, hi, size=(n, 3))
    rgb = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    return xyz, rgb


# ---------------------------------------------------------------------------------------------- COLMAP


@pytest.mark.parametrize("scene", SCENES)
def test_colmap_model_round_trip_matches_reference(dev_small: Path, tmp_path: Path, scene: str) -> None:
    names, w2c, K, sizes = _reference_cameras(dev_small / scene)
    xyz, rgb = _points_near_cameras(w2c)
    out = write_colmap_model(tmp_path / "sparse" / "0", names, w2c, K, sizes, xyz, rgb)
    assert {"cameras.bin", "images.bin", "points3D.bin"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    rec = pycolmap.Reconstruction(str(out))
    back = {rec.images[i].name: rec.images[i] for i in rec.images}
    assert sorted(back) == sorted(names)
    for name, T, Ki, (w, h) in zip(names, w2c, K, sizes):
        im = back[name]
        np.testing.assert_allclose(im.cam_from_world().matrix(), T, rtol=0, atol=1e-9)
        assert im.camera.model.name == "PINHOLE"
        np.testing.assert_array_equal(im.camera.calibration_matrix(), Ki)
        assert (im.camera.width, im.camera.height) == (w, h)
    n_distinct = len({(int(w), int(h), *Ki[:2].ravel().tolist()) for Ki, (w, h) in zip(K, sizes)})
    assert rec.num_cameras() == n_distinct  # shared when identical (1 for Strecha, 10 for sacre coeur)
    pts = [rec.points3D[i] for i in sorted(rec.points3D)]
    np.testing.assert_array_equal(np.array([p.xyz for p in pts]), xyz)
    np.testing.assert_array_equal(np.array([p.color for p in pts]), rgb)

    model = read_colmap_model(out)  # our reader agrees with pycolmap
    assert model.image_names == names and model.camera_models == ["PINHOLE"] * len(names)
    np.testing.assert_allclose(model.w2c_opencv, w2c, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(model.K, K)
    np.testing.assert_array_equal(model.sizes_wh, sizes)
    np.testing.assert_array_equal(model.points_rgb, rgb)


def test_colmap_text_model_and_nerfstudio_reader(dev_small: Path, tmp_path: Path) -> None:
    """Text output reads back; the binary files also parse with nerfstudio's (pre-rig) COLMAP reader."""
    from nerfstudio.data.utils.colmap_parsing_utils import qvec2rotmat, read_cameras_binary, read_images_binary

    names, w2c, K, sizes = _reference_cameras(dev_small / "hloc_sacre_coeur")
    txt = write_colmap_model(tmp_path / "txt", names, w2c, K, sizes, binary=False)
    assert (txt / "images.txt").is_file() and not (txt / "images.bin").exists()
    model = read_colmap_model(txt)
    np.testing.assert_allclose(model.w2c_opencv, w2c, rtol=0, atol=1e-9)
    assert model.points_xyz.shape == (0, 3)

    binary = write_colmap_model(tmp_path / "bin", names, w2c, K, sizes)
    cams = read_cameras_binary(binary / "cameras.bin")
    for im in read_images_binary(binary / "images.bin").values():
        i = names.index(im.name)
        np.testing.assert_allclose(qvec2rotmat(im.qvec), w2c[i, :, :3], atol=1e-9)
        np.testing.assert_allclose(im.tvec, w2c[i, :, 3], atol=1e-9)
        assert cams[im.camera_id].model == "PINHOLE"
        np.testing.assert_array_equal(cams[im.camera_id].params, K[i][[0, 1, 0, 1], [0, 1, 2, 2]])


def test_read_colmap_model_reports_distortion(dev_small: Path) -> None:
    model = read_colmap_model(dev_small / "hloc_sacre_coeur" / "sparse" / "0")
    assert set(model.camera_models) == {"SIMPLE_RADIAL"}
    assert model.extra_params[0] == pytest.approx([0.01609139887])
    assert model.K[0, 0, 0] == pytest.approx(756.3056322) and model.K[0, 1, 1] == pytest.approx(756.3056322)
    assert tuple(model.sizes_wh[0]) == (470, 640)
    with pytest.raises(FileNotFoundError):
        read_colmap_model(dev_small)


def test_write_colmap_model_rejects_bad_input(tmp_path: Path) -> None:
    w2c = np.eye(4)[None, :3]
    K = np.array([[[100.0, 0, 50], [0, 100, 40], [0, 0, 1]]])
    with pytest.raises(ValueError, match="rotation"):
        write_colmap_model(tmp_path, ["a.jpg"], w2c * 2.0, K, np.array([[100, 80]]))
    with pytest.raises(ValueError, match="unique"):
        write_colmap_model(
            tmp_path, ["a.jpg", "a.jpg"], np.repeat(w2c, 2, 0), np.repeat(K, 2, 0), np.array([[1, 1]] * 2)
        )
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- transforms.json


def test_transforms_json_through_nerfstudio_parser(dev_small: Path, tmp_path: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    scene = dev_small / "hloc_sacre_coeur"  # per-image intrinsics and sizes
    names, w2c, K, sizes = _reference_cameras(scene)
    xyz, rgb = _points_near_cameras(w2c, n=300)
    data = tmp_path / "ds"
    (data / "images").mkdir(parents=True)
    for n in names:
        (data / "images" / n).symlink_to(scene / "images" / n)
    # A COLMAP model next to transforms.json makes nerfstudio assume a legacy applied_transform
    # unless ours is recorded: this checks that it is.
    write_colmap_model(data / "colmap" / "sparse" / "0", names, w2c, K, sizes, xyz, rgb)
    # As write_dataset writes it: with the per-point confidence, which nerfstudio's reader (open3d) skips.
    conf = np.random.default_rng(3).random(len(xyz)).astype(np.float32)
    write_ply(data / "sparse_pc.ply", apply_world_transform(APPLIED, xyz), rgb, extra=point_properties(conf, len(xyz)))
    write_transforms_json(
        data / "transforms.json", [f"images/{n}" for n in names], w2c, K, sizes,
        applied_transform=APPLIED, ply_file_path="sparse_pc.ply",
    )  # fmt: skip

    config = NerfstudioDataParserConfig(
        data=data, orientation_method="none", center_method="none", auto_scale_poses=False,
        scale_factor=1.0, load_3D_points=True, eval_mode="all",
    )  # fmt: skip
    outputs = config.setup().get_dataparser_outputs(split="train")

    to_output = to_homogeneous(outputs.dataparser_transform.double().numpy())  # original world -> output
    np.testing.assert_allclose(to_output, to_homogeneous(APPLIED), atol=1e-7)
    order = [names.index(Path(f).name) for f in outputs.image_filenames]
    assert sorted(order) == list(range(len(names)))
    expected_c2w = to_output @ c2w_opengl_from_w2c_opencv(to_homogeneous(w2c[order]))
    np.testing.assert_allclose(outputs.cameras.camera_to_worlds.double().numpy(), expected_c2w[:, :3], atol=1e-5)
    cams = outputs.cameras
    for got, (r, c) in zip((cams.fx, cams.fy, cams.cx, cams.cy), ((0, 0), (1, 1), (0, 2), (1, 2))):
        want = K[order, r, c]
        np.testing.assert_array_equal(got[:, 0].numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(cams.width[:, 0].numpy(), sizes[order, 0])
    np.testing.assert_array_equal(cams.height[:, 0].numpy(), sizes[order, 1])
    assert not cams.distortion_params.any()

    pts = outputs.metadata["points3D_xyz"].double().numpy()
    np.testing.assert_allclose(pts, xyz @ to_output[:3, :3].T + to_output[:3, 3], rtol=1e-6, atol=1e-5)
    # nerfstudio round-trips colours through open3d floats and truncates: allow its 1-level loss only
    rgb_back = outputs.metadata["points3D_rgb"].numpy().astype(int)
    assert np.all((rgb.astype(int) - rgb_back >= 0) & (rgb.astype(int) - rgb_back <= 1))

    # and our own reader returns the cameras we wrote, in either world
    names_back, w2c_back, K_back, sizes_back, meta = read_transforms_json(data)
    assert names_back == [f"images/{n}" for n in names]
    np.testing.assert_allclose(w2c_back, w2c @ np.linalg.inv(to_homogeneous(APPLIED)), atol=1e-9)
    _, w2c_orig, *_ = read_transforms_json(data / "transforms.json", in_original_world=True)
    np.testing.assert_allclose(w2c_orig, w2c, atol=1e-9)
    np.testing.assert_array_equal(K_back, K)
    np.testing.assert_array_equal(sizes_back, sizes)
    assert meta["camera_model"] == "OPENCV" and not meta["distortion_params"].any()
    np.testing.assert_array_equal(meta["applied_transform"], APPLIED)
    assert meta["ply_file_path"] == "sparse_pc.ply" and meta["depth_paths"] is None


def test_transforms_json_keys_depth_mask_extra(tmp_path: Path) -> None:
    w2c = np.eye(4)[None, :3].repeat(2, 0)
    K = np.array([[[100.0, 0, 50], [0, 90, 40], [0, 0, 1]]] * 2)
    sizes = np.array([[100, 80], [100, 80]])
    path = write_transforms_json(
        tmp_path / "transforms.json", ["images/a.png", "images/b.png"], w2c, K, sizes,
        depth_paths_rel=["depths/a.png", "depths/b.png"], mask_paths_rel=["masks/a.png", "masks/b.png"],
        extra={"ns_extreme_version": "0.1.0"},
    )  # fmt: skip
    data = json.loads(path.read_text())
    assert data["camera_model"] == "OPENCV" and data["ns_extreme_version"] == "0.1.0"
    assert data["applied_transform"] == np.eye(4)[:3].tolist() and "ply_file_path" not in data
    frame = data["frames"][1]
    assert frame["depth_file_path"] == "depths/b.png" and frame["mask_path"] == "masks/b.png"
    assert {k: frame[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "p1", "p2")} == {
        "fl_x": 100.0, "fl_y": 90.0, "cx": 50.0, "cy": 40.0, "w": 100, "h": 80,
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
    }  # fmt: skip
    assert frame["transform_matrix"] == np.diag([1.0, -1.0, -1.0, 1.0]).tolist()
    _, _, _, _, meta = read_transforms_json(path)
    assert meta["depth_paths"] == ["depths/a.png", "depths/b.png"] and meta["mask_paths"] == [
        "masks/a.png",
        "masks/b.png",
    ]
    with pytest.raises(ValueError, match="clash"):
        write_transforms_json(tmp_path / "t2.json", ["a.png"], w2c[:1], K[:1], sizes[:1], extra={"frames": []})
    with pytest.raises(ValueError, match="rigid"):
        write_transforms_json(
            tmp_path / "t3.json", ["a.png"], w2c[:1], K[:1], sizes[:1], applied_transform=2 * np.eye(4)[:3]
        )
    assert not (tmp_path / "t2.json").exists() and not (tmp_path / "t3.json").exists()


@pytest.mark.parametrize("scene", SCENES)
def test_read_reference_transforms_json(dev_small: Path, scene: str) -> None:
    names, w2c, K, sizes = _reference_cameras(dev_small / scene)
    paths, w2c_j, K_j, sizes_j, meta = read_transforms_json(dev_small / scene / "transforms.json")
    order = [names.index(Path(p).name) for p in paths]
    # the reference files store 6-digit Strecha rotations, COLMAP quaternions: agree to ~2e-5
    np.testing.assert_allclose(w2c_j, w2c[order], atol=1e-4)
    np.testing.assert_allclose(K_j, K[order], rtol=1e-8)
    np.testing.assert_array_equal(sizes_j, sizes[order])
    if scene == "hloc_sacre_coeur":
        assert meta["camera_model"] == "OPENCV" and meta["distortion_params"][0, 0] == pytest.approx(
            0.016091398870649847
        )


def test_read_transforms_json_global_intrinsics(tmp_path: Path) -> None:
    c2w = np.eye(4)
    c2w[:3, 3] = [1.0, 2.0, 3.0]
    doc = {
        "fl_x": 500.0,
        "w": 640,
        "h": 480,
        "k1": 0.1,
        "frames": [{"file_path": "a.jpg", "transform_matrix": c2w.tolist()}],
    }
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    paths, w2c, K, sizes, meta = read_transforms_json(tmp_path)
    np.testing.assert_array_equal(K[0], [[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    np.testing.assert_array_equal(sizes, [[640, 480]])
    np.testing.assert_allclose(w2c[0], [[1, 0, 0, -1], [0, -1, 0, 2], [0, 0, -1, 3]], atol=1e-12)
    assert meta["distortion_params"][0, 0] == 0.1 and meta["applied_transform"] is None


# ------------------------------------------------------------------------------------------------- PLY

NS_HEADER = [  # nerfstudio/process_data/colmap_utils.py create_ply_from_colmap, v1.1.5
    "ply", "format ascii 1.0", "element vertex {n}", "property float x", "property float y", "property float z",
    "property uint8 red", "property uint8 green", "property uint8 blue", "end_header",
]  # fmt: skip


def test_ply_round_trip_exact_and_nerfstudio_header(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    xyz = (rng.normal(size=(257, 3)) * [1e-3, 10.0, 1e4]).astype(np.float32)
    rgb = rng.integers(0, 256, size=(257, 3), dtype=np.uint8)
    conf = rng.random(257).astype(np.float32)
    for binary in (False, True):
        path = write_ply(tmp_path / f"pc_{binary}.ply", xyz, rgb, extra={"confidence": conf}, binary=binary)
        xyz_b, rgb_b, extra_b = read_ply(path)
        np.testing.assert_array_equal(xyz_b, xyz.astype(np.float64))
        np.testing.assert_array_equal(rgb_b, rgb)
        np.testing.assert_array_equal(extra_b["confidence"], conf)

    plain = write_ply(tmp_path / "sparse_pc.ply", xyz, rgb)
    lines = plain.read_bytes().split(b"\n")
    assert [x.decode() for x in lines[:10]] == [h.format(n=257) for h in NS_HEADER]
    assert len(lines) == 10 + 257 + 1 and lines[-1] == b""

    # nerfstudio's own writer produces exactly the same header (from a COLMAP model we write)
    from nerfstudio.process_data.colmap_utils import create_ply_from_colmap

    one_camera = (["a.jpg"], np.eye(4)[None, :3], np.eye(3)[None], np.array([[1, 1]]))
    model = write_colmap_model(tmp_path / "sparse", *one_camera, xyz, rgb)
    create_ply_from_colmap("ns.ply", model, tmp_path, applied_transform=None)
    ns_lines = (tmp_path / "ns.ply").read_bytes().split(b"\n")
    assert ns_lines[:10] == lines[:10]
    # sparse_pc.ply as write_dataset writes it: nerfstudio's header plus two properties before end_header.
    with_conf = write_ply(tmp_path / "with_conf.ply", xyz, rgb, extra=point_properties(conf, len(xyz)))
    header = with_conf.read_bytes().split(b"\n")[:12]
    assert [x.decode() for x in header] == [h.format(n=257) for h in NS_HEADER[:-1]] + [
        "property float confidence",
        "property uint8 source",
        "end_header",
    ]
    xyz_ns, rgb_ns, _ = read_ply(tmp_path / "ns.ply")  # nerfstudio prints 6 decimals
    np.testing.assert_allclose(xyz_ns, xyz, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rgb_ns, rgb)


def test_ply_fast_reader_matches_plyfile(tmp_path: Path) -> None:
    """read_ply parses the simple files we write with numpy; the result equals plyfile's, dtypes included."""
    from plyfile import PlyData, PlyElement

    from ns_extreme.io.ply import _fast_vertex_columns, _plyfile_vertex_columns

    rng = np.random.default_rng(4)
    xyz = rng.normal(size=(500, 3)) * 1e3
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    extra = {
        "confidence": rng.random(500).astype(np.float32),
        "view": rng.integers(-5, 2**31 - 1, 500).astype(np.int32),
    }
    for binary in (False, True):
        path = write_ply(tmp_path / f"p{binary}.ply", xyz, rgb, extra=extra, binary=binary)
        fast, slow = _fast_vertex_columns(path), _plyfile_vertex_columns(path)
        assert fast is not None and list(fast) == list(slow)
        for name in slow:
            assert fast[name].dtype == slow[name].dtype, name
            np.testing.assert_array_equal(fast[name], slow[name])
    # Anything else (here big-endian, with a face element) goes through plyfile.
    table = np.array([tuple(p) + tuple(c) for p, c in zip(xyz[:4].astype("f4"), rgb[:4])],
                     dtype=[("x", ">f4"), ("y", ">f4"), ("z", ">f4"),
                            ("red", "u1"), ("green", "u1"), ("blue", "u1")])  # fmt: skip
    faces = np.array([([0, 1, 2],)], dtype=[("vertex_indices", "i4", (3,))])
    PlyData([PlyElement.describe(table, "vertex"), PlyElement.describe(faces, "face")], byte_order=">").write(
        str(tmp_path / "be.ply")
    )
    assert _fast_vertex_columns(tmp_path / "be.ply") is None
    xyz_be, rgb_be, extra_be = read_ply(tmp_path / "be.ply")
    np.testing.assert_array_equal(xyz_be, xyz[:4].astype("f4"))
    np.testing.assert_array_equal(rgb_be, rgb[:4])
    assert extra_be == {}


def test_ply_read_by_open3d(tmp_path: Path) -> None:
    o3d = pytest.importorskip("open3d", reason="open3d needs libusb-1.0.so.0")
    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(100, 3))
    rgb = rng.integers(0, 256, size=(100, 3), dtype=np.uint8)
    conf = rng.random(100).astype(np.float32)
    for binary, extra in ((False, None), (True, None), (False, {"confidence": conf}), (True, {"confidence": conf})):
        pcd = o3d.io.read_point_cloud(
            str(write_ply(tmp_path / f"o3d_{binary}.ply", xyz, rgb, extra=extra, binary=binary))
        )
        assert len(pcd.points) == len(xyz) and not pcd.has_normals()
        # binary holds the float32 bits; ASCII holds 9 significant digits, parsed by open3d as double
        np.testing.assert_allclose(np.asarray(pcd.points), xyz.astype(np.float32), rtol=0 if binary else 1e-7, atol=0)
        np.testing.assert_array_equal(np.rint(np.asarray(pcd.colors) * 255).astype(np.uint8), rgb)


def test_point_properties_are_float32_confidence_and_uint8_source_per_point() -> None:
    props = point_properties(np.array([1.5, 2.0, 7.25]), 3)
    assert list(props) == ["confidence", "source"] and props["confidence"].dtype == np.float32
    np.testing.assert_array_equal(props["confidence"], [1.5, 2.0, 7.25])
    np.testing.assert_array_equal(props["source"], [0, 0, 0])  # no source given: all model points
    props = point_properties(np.ones(3), 3, np.array([1, 0, 1]))
    assert props["source"].dtype == np.uint8 and props["source"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="shape"):
        point_properties(np.ones(2), 3)
    with pytest.raises(ValueError, match="points_source"):
        point_properties(np.ones(3), 3, np.ones(2))


def test_ply_rejects_bad_input(tmp_path: Path) -> None:
    xyz = np.zeros((3, 3))
    with pytest.raises(ValueError, match="uint8"):
        write_ply(tmp_path / "a.ply", xyz, np.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        write_ply(tmp_path / "a.ply", np.full((3, 3), np.nan), np.zeros((3, 3), np.uint8))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- depth


def test_depth_png_mm_round_trip_and_nerfstudio_reader(tmp_path: Path) -> None:
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path

    rng = np.random.default_rng(3)
    depth = rng.uniform(0.05, 60.0, size=(48, 64))
    depth[0, :4] = [np.nan, np.inf, -1.0, 0.0]
    depth[1, 0] = 70.0  # beyond 65.535 -> clipped
    with np.errstate(all="raise"):  # warn-free on NaN/inf
        n_clipped = write_depth_png_mm(tmp_path / "d.png", depth)
    assert n_clipped == 1
    back = read_depth_png_mm(tmp_path / "d.png")
    assert back.dtype == np.float32 and back.shape == depth.shape
    assert np.all(back[0, :4] == 0) and back[1, 0] == pytest.approx(65.535)
    ok = np.isfinite(depth) & (depth > 0) & (depth < 65.5)
    assert np.abs(back[ok] - depth[ok]).max() <= 0.0005 + 1e-6  # rounded to the nearest mm

    ns = get_depth_image_from_path(tmp_path / "d.png", height=48, width=64, scale_factor=1e-3).numpy()[..., 0]
    assert np.abs(ns[ok] - depth[ok]).max() < 1e-3
    np.testing.assert_allclose(ns, back, rtol=1e-6)


def test_depth_npy_round_trip(tmp_path: Path) -> None:
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path

    depth = np.random.default_rng(4).uniform(0.1, 5.0, size=(10, 12)).astype(np.float32)
    write_depth_npy(tmp_path / "d.npy", depth)
    np.testing.assert_array_equal(read_depth_npy(tmp_path / "d.npy"), depth)
    ns = get_depth_image_from_path(tmp_path / "d.npy", height=10, width=12, scale_factor=1.0).numpy()[..., 0]
    np.testing.assert_array_equal(ns, depth)


# ---------------------------------------------------------------------------------------------- atomic


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_staged_output_dir_leaves_no_trace_on_error(tmp_path: Path) -> None:
    final = tmp_path / "out"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with staged_output_dir(final) as stage:
                assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-")
                atomic_write_json(stage / "transforms.json", {"frames": []})
                (stage / "images").mkdir()
                raise exc
        assert _siblings(tmp_path) == []


def test_staged_output_dir_refuses_existing_before_work(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    ran = False
    with pytest.raises(OutputExistsError, match="--overwrite") as info:
        with staged_output_dir(final):
            ran = True
    assert isinstance(info.value, FileExistsError) and not ran
    assert _siblings(tmp_path) == ["out"] and (final / "keep.txt").read_text() == "old"


def test_staged_output_dir_overwrite_replaces(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with staged_output_dir(final) as stage:
        (stage / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first"
    assert oct(final.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    with staged_output_dir(final, overwrite=True) as stage:
        (stage / "b.txt").write_text("second")
    assert _siblings(final) == ["b.txt"] and _siblings(tmp_path) == ["out"]


def test_disk_full_while_writing_keeps_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "transforms.json").write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        with staged_output_dir(final, overwrite=True) as stage:
            monkeypatch.setattr(os, "fsync", no_space)
            atomic_write_json(stage / "transforms.json", {"frames": [1, 2, 3]})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert _siblings(tmp_path) == ["out"] and _siblings(final) == ["transforms.json"]
    assert (final / "transforms.json").read_text() == "old"


def test_failed_publish_restores_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    real_rename = os.rename

    def failing_rename(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(errno.ENOSPC, "no space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        with staged_output_dir(final, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")
    assert _siblings(tmp_path) == ["out"] and (final / "keep.txt").read_text() == "old"


def test_atomic_file_write_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()

    def no_space(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "no space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and _siblings(tmp_path) == ["f.bin"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")})
    assert _siblings(tmp_path) == ["f.bin"]


def test_torch_save_atomic(tmp_path: Path) -> None:
    import torch

    state = {"bias_state_dict": {"blocks.0.attn.qkv.bias": torch.arange(6.0)}}
    path = torch_save_atomic(state, tmp_path / "ckpt.pth")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["bias_state_dict"]["blocks.0.attn.qkv.bias"], torch.arange(6.0))
    assert _siblings(tmp_path) == ["ckpt.pth"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_staged_output_dir_output_appearing_meanwhile_is_not_clobbered(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with staged_output_dir(final) as stage:
            (stage / "new.txt").write_text("new")
            final.mkdir()  # another run published first
            (final / "theirs.txt").write_text("theirs")
    assert _siblings(tmp_path) == ["out"] and _siblings(final) == ["theirs.txt"]
