"""Geometry of the posing pipeline end to end, with an exact ground-truth backbone (tests/posing_helpers.py).

``pose_images`` → ``write_dataset`` → read back with nerfstudio's *stock* parsers (transforms.json and the
COLMAP export) → undo each parser's ``dataparser_transform`` → one Sim(3) to the reference cameras (the
documented output world is "frame-0 camera, arbitrary scale"). Because the backbone is exact, every error
below is numerical noise: thresholds are far below what any convention slip (a half pixel, a crop offset,
an axis flip, a transposed rotation, a per-chunk scale) would produce.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from posing_helpers import (
    GroundTruthBackbone,
    Reference,
    Similarity,
    camera_centres,
    load_reference,
    pose_errors,
    project,
    rotation_angle_deg,
)
from scipy.spatial.transform import Rotation

from ns_extreme.io.dataset import write_dataset
from ns_extreme.io.depth import read_depth_png_mm
from ns_extreme.posing import PosingOptions, Reconstruction, pose_images
from ns_extreme.posing.refine import RefineOptions

CASTLE = "strecha_castle-P19_odd9"  # courtyard seen from all sides, 9 views
SACRE = "hloc_sacre_coeur"  # 10 Flickr photos, mixed sizes, portrait and landscape
FOUNTAIN = "strecha_fountain-P11"  # 11 views on a 108 deg arc
MAIN_SCENES = (CASTLE, SACRE, FOUNTAIN)
MODES = ("crop", "pad")
TARGET = 518  # VGGT's real input size, so the real rounding to multiples of 14 is exercised
TARGET_FAST = 280  # for the option tests: still rounds (768x512 -> 280x182, not 280x186.7)

MAX_ROT_DEG = 0.01
MAX_POS_REL = 1e-4
MAX_K_REL = 1e-6
MAX_REPROJ_PX_F64 = 1e-4  # cameras read from transforms.json in float64
MAX_REPROJ_PX_F32 = 1e-2  # cameras as nerfstudio holds them (float32 tensors)
MAX_POINT_DIST_REL = 1e-5  # sparse_pc.ply stores float32

FEED_FORWARD = RefineOptions(refine=False)
"""These tests check the feed-forward geometry exactly; refinement has its own tests (test_refine.py)."""

METRICS: dict[str, dict[str, float]] = {}
"""Measured errors per run, printed at the end of the module (run pytest with -s to see them)."""


def _record(key: str, **values: float) -> None:
    METRICS.setdefault(key, {}).update({k: float(v) for k, v in values.items()})


@pytest.fixture(scope="module", autouse=True)
def _print_metrics():
    yield
    if METRICS:
        print("\nmeasured posing errors (max over views):")
        for key in sorted(METRICS):
            print(f"  {key:45s} " + "  ".join(f"{k}={v:.3g}" for k, v in sorted(METRICS[key].items())))


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    ref: Reference
    backbone: GroundTruthBackbone
    recon: Reconstruction
    out: Path
    options: PosingOptions


_RUNS: dict[tuple, Run] = {}
_REFS: dict[str, Reference] = {}


def _ref(dev_small: Path, scene: str) -> Reference:
    if scene not in _REFS:
        _REFS[scene] = load_reference(dev_small / scene)
    return _REFS[scene]


def _run(
    dev_small: Path, factory, scene: str, mode: str, target: int = TARGET, backbone_kwargs: Optional[dict] = None,
    depth_format: str = "png", **options: Any,
) -> Run:  # fmt: skip
    """Pose a scene with the GT backbone and write the dataset (memoised per configuration)."""
    key = (
        scene,
        mode,
        target,
        depth_format,
        repr(sorted((backbone_kwargs or {}).items())),
        repr(sorted(options.items())),
    )
    if key not in _RUNS:
        ref = _ref(dev_small, scene)
        # --orient none: the documented frame-0 world these checks assert (the levelled one: test_trainer_data.py)
        options = {"orient": "none", **options}
        opts = PosingOptions(preprocess=mode, max_points=20_000, refinement=FEED_FORWARD, **options)
        backbone = GroundTruthBackbone.for_reference(ref, mode, target, **(backbone_kwargs or {}))
        recon = pose_images(ref.paths, backbone, opts, progress=False)
        out = write_dataset(recon, factory.mktemp(f"{scene}-{mode}") / "dataset", depth_format=depth_format)
        _RUNS[key] = Run(ref, backbone, recon, out, opts)
    return _RUNS[key]


@pytest.fixture(scope="module", params=[(s, m) for s in MAIN_SCENES for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, dev_small: Path, tmp_path_factory) -> Run:
    scene, mode = request.param
    return _run(dev_small, tmp_path_factory, scene, mode)


# ---------------------------------------------------------------------------------------------- read-back


@dataclass
class Cameras:
    """Cameras in the reconstruction's own world (all parser transforms undone), OpenCV w2c."""

    names: list[str]
    w2c: np.ndarray
    K: np.ndarray
    sizes_wh: np.ndarray
    points: Optional[np.ndarray] = None
    ns_cameras: Any = None  # nerfstudio Cameras (dataparser world)
    to_dataparser: Optional[tuple[np.ndarray, float]] = None  # (dataparser_transform [3,4], dataparser_scale)


def _w2c_from_c2w_opengl(c2w: np.ndarray) -> np.ndarray:
    R = c2w[..., :3, :3] * np.array([1.0, -1.0, -1.0])  # OpenGL -> OpenCV camera axes (columns)
    Rt = np.swapaxes(R, -1, -2)
    return np.concatenate([Rt, -np.einsum("...ij,...j->...i", Rt, c2w[..., :3, 3])[..., None]], axis=-1)


_PARSED: dict[tuple[Path, str], Cameras] = {}


def read_with_nerfstudio(out: Path, which: str) -> Cameras:
    """Parse with nerfstudio's stock dataparser, then undo its dataparser_transform / dataparser_scale."""
    if (out, which) not in _PARSED:
        _PARSED[(out, which)] = _read_with_nerfstudio(out, which)
    return _PARSED[(out, which)]


def _read_with_nerfstudio(out: Path, which: str) -> Cameras:
    if which == "transforms":
        from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

        config = NerfstudioDataParserConfig(
            data=out, orientation_method="none", center_method="none", auto_scale_poses=False,
            scale_factor=1.0, eval_mode="all", load_3D_points=True,
        )  # fmt: skip
    else:
        from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

        config = ColmapDataParserConfig(
            data=out, colmap_path=Path("colmap/sparse/0"), images_path=Path("images"), orientation_method="none",
            center_method="none", auto_scale_poses=False, scale_factor=1.0, eval_mode="all", load_3D_points=True,
        )  # fmt: skip
    outputs = config.setup().get_dataparser_outputs(split="train")
    cams = outputs.cameras
    T = outputs.dataparser_transform.double().numpy()[:3]
    s = float(outputs.dataparser_scale)
    A_inv = np.linalg.inv(T[:, :3])
    c2w = cams.camera_to_worlds.double().numpy()
    c2w_orig = np.concatenate([A_inv @ c2w[:, :, :3], ((c2w[:, :, 3] / s - T[:, 3]) @ A_inv.T)[..., None]], axis=-1)
    K = np.zeros((len(c2w), 3, 3))
    K[:, 0, 0] = cams.fx[:, 0].double().numpy()
    K[:, 1, 1] = cams.fy[:, 0].double().numpy()
    K[:, 0, 2] = cams.cx[:, 0].double().numpy()
    K[:, 1, 2] = cams.cy[:, 0].double().numpy()
    K[:, 2, 2] = 1.0
    sizes = np.stack([cams.width[:, 0].numpy(), cams.height[:, 0].numpy()], axis=1).astype(np.int64)
    points = None
    if "points3D_xyz" in outputs.metadata:
        points = (outputs.metadata["points3D_xyz"].double().numpy() / s - T[:, 3]) @ A_inv.T
    assert cams.distortion_params is None or float(cams.distortion_params.abs().max()) == 0.0
    return Cameras(
        [Path(p).name for p in outputs.image_filenames], _w2c_from_c2w_opengl(c2w_orig), K, sizes, points, cams, (T, s)
    )


def read_transforms_f64(out: Path) -> Cameras:
    """transforms.json read with plain json in float64, applied_transform undone (no ns_extreme reader)."""
    data = json.loads((out / "transforms.json").read_text())
    A = np.eye(4)
    A[:3] = np.asarray(data["applied_transform"], dtype=np.float64)
    c2w = np.stack([np.asarray(f["transform_matrix"], dtype=np.float64) for f in data["frames"]])
    c2w_orig = np.linalg.inv(A) @ c2w
    K = np.zeros((len(c2w), 3, 3))
    for i, f in enumerate(data["frames"]):
        K[i] = [[f["fl_x"], 0, f["cx"]], [0, f["fl_y"], f["cy"]], [0, 0, 1]]
    sizes = np.array([(f["w"], f["h"]) for f in data["frames"]], dtype=np.int64)
    names = [Path(f["file_path"]).name for f in data["frames"]]
    return Cameras(names, _w2c_from_c2w_opengl(c2w_orig[:, :3]), K, sizes)


def read_ply_xyz_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x y z red green blue of a vertex PLY as nerfstudio writes it (ASCII or binary little-endian)."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    props = [tuple(line.split()[1:3]) for line in header if line.startswith("property")]
    names = [n for _, n in props]
    assert names[:6] == ["x", "y", "z", "red", "green", "blue"], names
    if "format ascii" in header[1]:
        table = np.loadtxt(raw[end:].decode("ascii").splitlines(), ndmin=2, max_rows=count)
        return table[:, :3], table[:, 3:6].astype(np.uint8)
    types = {"float": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1"}
    table = np.frombuffer(raw[end:], dtype=[(n, types[t]) for t, n in props], count=count)
    xyz = np.stack([table[n] for n in ("x", "y", "z")], 1).astype(np.float64)
    return xyz, np.stack([table[n] for n in ("red", "green", "blue")], 1)


def _ply_points_in_model_world(out: Path) -> tuple[np.ndarray, np.ndarray]:
    data = json.loads((out / "transforms.json").read_text())
    A = np.asarray(data["applied_transform"], dtype=np.float64)
    xyz, rgb = read_ply_xyz_rgb(out / data["ply_file_path"])
    return (xyz - A[:, 3]) @ A[:, :3], rgb  # A is rigid: inverse = Rᵀ (x − t)


def _check_cameras(cams: Cameras, run: Run, key: str) -> None:
    ref = run.ref
    assert cams.names == ref.names
    np.testing.assert_array_equal(cams.sizes_wh, ref.sizes_wh)
    err = pose_errors(cams.w2c, ref)
    k_rel = np.abs(cams.K - ref.K).max(axis=(1, 2)) / ref.K[:, 0, 0]
    _record(key, rot_deg=err.max_rot_deg, pos_rel=err.max_pos_rel, K_rel=k_rel.max())
    assert err.max_rot_deg < MAX_ROT_DEG, err.rot_deg
    assert err.max_pos_rel < MAX_POS_REL, err.pos_rel
    assert k_rel.max() < MAX_K_REL, k_rel
    # The documented output world: camera of frame 0 (identity), scale 1/0.37 of the reference units.
    aligned0 = cams.w2c[0]
    assert np.abs(aligned0[:, :3] - np.eye(3)).max() < 1e-6 and np.abs(aligned0[:, 3]).max() < 1e-6 * ref.extent
    assert err.sim.s == pytest.approx(1.0 / run.backbone.scales[0], rel=1e-6)


def _check_points_on_surface(points: np.ndarray, sim: Similarity, run: Run, key: str, name: str) -> None:
    assert len(points) > 1000
    dist = run.backbone.scene.distance(sim.apply(points)) / run.ref.extent
    _record(key, **{name: dist.max()})
    assert dist.max() < MAX_POINT_DIST_REL


# ---------------------------------------------------------------------------------------------- the GT backbone


def test_ground_truth_backbone_mimics_vggt_outputs(dev_small: Path) -> None:
    """Self-check of the test oracle: frame 0 = identity, scale per call, depth on the GT surface, the small
    sphere really occludes the big one in some views, padding has confidence 1 and garbage depth."""
    ref = _ref(dev_small, SACRE)
    backbone = GroundTruthBackbone.for_reference(ref, "crop", TARGET_FAST)
    frames = [3, 4, 5]
    for call in range(2):
        pred = backbone.predict(backbone.images[frames])
        s = backbone.scales[call]
        assert np.abs(pred.w2c_opencv[0] - np.eye(4)[:3]).max() < 1e-12
        # Model world -> reference world: x_ref = R0ᵀ (x / s − t0).
        R0, t0 = ref.w2c[frames[0], :3, :3], ref.w2c[frames[0], :3, 3]
        for local, k in enumerate(frames):
            record = backbone.records[k]
            valid = record.valid_mask_preprocessed()
            H, W = record.final_hw
            u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
            rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(pred.intrinsics[local]).T
            Xc = rays[valid] * pred.depth[local][valid, None].astype(np.float64)
            X_model = (Xc - pred.w2c_opencv[local, :, 3]) @ pred.w2c_opencv[local, :, :3]
            X_ref = (X_model / s - t0) @ R0
            assert backbone.scene.distance(X_ref).max() < 1e-5 * ref.extent
            assert pred.confidence[local][valid].min() >= 2.0 and (pred.confidence[local][~valid] == 1.0).all()
    assert backbone.calls == [frames, frames]
    small = backbone.scene.spheres[1]
    hits_small = [
        float(np.mean(np.abs(np.linalg.norm(
            backbone.scene.points(ref.w2c[k], ref.K[k],
                                  np.stack(np.meshgrid(np.arange(0, w, 8) + 0.5, np.arange(0, h, 8) + 0.5), -1))
            - small.centre, axis=-1) - small.radius) < 1e-6 * ref.extent))
        for k, (w, h) in enumerate(ref.sizes_wh)
    ]  # fmt: skip
    assert max(hits_small) > 0.05  # occlusion boundaries exist (edge filtering and depth jumps are exercised)
    with pytest.raises(AssertionError, match="not in its preprocessed batch"):
        backbone.predict(backbone.images[:2] * 0.5)


# ---------------------------------------------------------------------------------------------- 1. read-back


def test_transforms_json_through_nerfstudio_parser(run: Run) -> None:
    key = f"{run.ref.scene_dir.name}/{run.options.preprocess}"
    cams = read_with_nerfstudio(run.out, "transforms")
    _check_cameras(cams, run, key + " transforms.json")
    assert cams.points is not None
    _check_points_on_surface(
        cams.points, pose_errors(cams.w2c, run.ref).sim, run, key + " transforms.json", "ply_dist_rel"
    )
    for name, src in zip(cams.names, run.ref.paths):  # the originals, unchanged
        assert (run.out / "images" / name).read_bytes() == src.read_bytes()


def test_colmap_export_through_nerfstudio_parser(run: Run) -> None:
    key = f"{run.ref.scene_dir.name}/{run.options.preprocess}"
    cams = read_with_nerfstudio(run.out, "colmap")
    _check_cameras(cams, run, key + " colmap")
    assert cams.points is not None
    _check_points_on_surface(cams.points, pose_errors(cams.w2c, run.ref).sim, run, key + " colmap", "points3D_dist_rel")


def test_colmap_export_matches_transforms_json(run: Run) -> None:
    """Both exports describe the same cameras in the same world (up to float32 in nerfstudio's tensors)."""
    a = read_with_nerfstudio(run.out, "transforms")
    b = read_with_nerfstudio(run.out, "colmap")
    assert rotation_angle_deg(a.w2c, b.w2c).max() < 1e-4
    assert np.abs(camera_centres(a.w2c) - camera_centres(b.w2c)).max() < 1e-6 * run.ref.extent
    np.testing.assert_allclose(a.K, b.K, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- 2. reprojection


def test_reprojection_of_surface_points(run: Run) -> None:
    """Points on the GT surface seen through random original pixels of each view project to the same
    pixels (in every view whose image they fall in) with the exported cameras as with the reference ones."""
    key = f"{run.ref.scene_dir.name}/{run.options.preprocess}"
    ref, scene = run.ref, run.backbone.scene
    exported = read_transforms_f64(run.out)
    ns = read_with_nerfstudio(run.out, "transforms")
    sim_inv = _inverse(pose_errors(exported.w2c, ref).sim)  # reference world -> exported world
    rng = np.random.default_rng(0)
    worst64 = worst32 = 0.0
    for i in range(len(ref.names)):
        W, H = ref.sizes_wh[i]
        uv = rng.uniform([0, 0], [W, H], size=(300, 2))
        X_ref = scene.points(ref.w2c[i], ref.K[i], uv)
        X_exp = sim_inv.apply(X_ref)
        for j in range(len(ref.names)):
            uv_ref, z = project(X_ref, ref.w2c[j], ref.K[j])
            front = (z > 0) & np.all((uv_ref >= 0) & (uv_ref <= ref.sizes_wh[j]), axis=1)  # in view j's image
            for cams, worst_name in ((exported, "64"), (ns, "32")):
                uv_exp, z_exp = project(X_exp, cams.w2c[j], cams.K[j])
                assert np.all((z_exp > 0) == (z > 0))
                e = float(np.abs(uv_exp - uv_ref)[front].max()) if front.any() else 0.0
                if worst_name == "64":
                    worst64 = max(worst64, e)
                else:
                    worst32 = max(worst32, e)
            if j == i:
                np.testing.assert_allclose(uv_ref, uv, atol=1e-8)  # the helper itself is consistent
    _record(key, reproj_px_f64=worst64, reproj_px_f32=worst32)
    assert worst64 < MAX_REPROJ_PX_F64
    assert worst32 < MAX_REPROJ_PX_F32


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
def test_nerfstudio_rays_pass_through_surface_points(run: Run) -> None:
    """nerfstudio's own ray generation (OpenGL axes, pixel coordinates) through an original pixel hits the
    GT point seen there: the angle between the ray and the point, in pixels, is ~0."""
    import torch

    ref, scene = run.ref, run.backbone.scene
    ns = read_with_nerfstudio(run.out, "transforms")
    T, s = ns.to_dataparser
    sim_inv = _inverse(pose_errors(ns.w2c, ref).sim)
    rng = np.random.default_rng(1)
    worst = 0.0
    for i in range(len(ref.names)):
        W, H = ref.sizes_wh[i]
        uv = rng.uniform([0, 0], [W, H], size=(200, 2))
        X_dp = s * (sim_inv.apply(scene.points(ref.w2c[i], ref.K[i], uv)) @ T[:, :3].T + T[:, 3])
        coords = torch.from_numpy(uv[:, ::-1].copy()).float()  # nerfstudio coords are (y, x)
        rays = ns.ns_cameras.generate_rays(camera_indices=i, coords=coords)
        o = rays.origins.double().numpy()
        d = rays.directions.double().numpy()
        to_point = X_dp - o
        cos = np.einsum("ij,ij->i", to_point, d) / np.linalg.norm(to_point, axis=1) / np.linalg.norm(d, axis=1)
        angle = np.arccos(np.clip(cos, -1.0, 1.0))
        worst = max(worst, float(angle.max() * ref.K[i, 0, 0]))
    _record(f"{ref.scene_dir.name}/{run.options.preprocess}", ns_ray_px=worst)
    assert worst < 0.05  # float32 rays (arccos near 1 limits this to ~1e-3 px)


def _inverse(sim: Similarity) -> Similarity:
    R_inv = sim.R.T
    return Similarity(1.0 / sim.s, R_inv, -(R_inv @ sim.t) / sim.s)


# ---------------------------------------------------------------------------------------------- point cloud


def _check_points_seen(
    points: np.ndarray, rgb: np.ndarray, w2c: np.ndarray, K: np.ndarray, run: Run, tol_px: float = 1e-2
) -> None:
    """Every point projects (with the given cameras, original resolution) onto a preprocessed pixel centre
    inside the real-pixel region of some view, in front of it, with that pixel's colour."""
    seen = np.zeros(len(points), dtype=bool)
    images = (run.backbone.images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    for v, record in enumerate(run.backbone.records):
        uv, z = project(points, w2c[v], K[v])
        uv_pre = record.points_to_preprocessed(uv)
        centre = np.floor(uv_pre) + 0.5
        x0, y0, x1, y1 = record.valid_region_preprocessed()
        ok = (z > 0) & (np.abs(uv_pre - centre).max(axis=1) < tol_px)
        col, row = np.floor(uv_pre[:, 0]).astype(int), np.floor(uv_pre[:, 1]).astype(int)
        ok &= (col >= x0) & (col < x1) & (row >= y0) & (row < y1)
        idx = np.flatnonzero(ok)
        ok[idx] = np.all(images[v, row[idx], col[idx]] == rgb[idx], axis=1)
        seen |= ok
    assert seen.all(), f"{(~seen).sum()} of {len(points)} points are not where any view saw them"


def test_point_cloud_on_surface_and_where_seen(run: Run) -> None:
    exported = read_transforms_f64(run.out)
    sim = pose_errors(exported.w2c, run.ref).sim
    xyz, rgb = _ply_points_in_model_world(run.out)
    _check_points_on_surface(xyz, sim, run, f"{run.ref.scene_dir.name}/{run.options.preprocess}", "ply_dist_rel")
    _check_points_seen(xyz, rgb, exported.w2c, exported.K, run)
    # Padding never produces points, and crop mode keeps only the rows the model saw.
    assert len(xyz) == len(run.recon.points_xyz)


# ---------------------------------------------------------------------------------------------- depth files


def _expected_depth_original(
    run: Run, k: int, scale: float, w2c: np.ndarray, K: np.ndarray, pixels: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """(seen [H, W], GT z-depth in output units [len(pixels)]) for the original image of view k: a pixel is
    seen when the preprocessed pixel nearest to its centre is a real pixel (not cropped away); its depth is
    the GT depth at that preprocessed pixel's centre (0 where not seen). ``pixels``: flat indices (all if None)."""
    record = run.backbone.records[k]
    H, W = record.original_hw
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    uv_pre = record.points_to_preprocessed(np.stack([u, v], axis=-1))
    col, row = np.floor(uv_pre[..., 0]), np.floor(uv_pre[..., 1])
    x0, y0, x1, y1 = record.valid_region_preprocessed()
    seen = (col >= x0) & (col < x1) & (row >= y0) & (row < y1)
    pixels = np.arange(H * W) if pixels is None else pixels
    centre_orig = record.points_to_original(np.stack([col.ravel()[pixels] + 0.5, row.ravel()[pixels] + 0.5], axis=-1))
    z = run.backbone.scene.depth(w2c, K, centre_orig) * scale
    return seen, np.where(seen.ravel()[pixels], z, 0.0)


def test_depth_pngs_match_ground_truth(run: Run) -> None:
    ref = run.ref
    sim = pose_errors(read_transforms_f64(run.out).w2c, ref).sim
    data = json.loads((run.out / "transforms.json").read_text())
    rng = np.random.default_rng(2)
    worst = 0.0
    for k, frame in enumerate(data["frames"]):
        depth = read_depth_png_mm(run.out / frame["depth_file_path"])
        assert depth.shape == (ref.sizes_wh[k, 1], ref.sizes_wh[k, 0])
        pixels = rng.choice(depth.size, size=40_000, replace=False)
        seen, expected = _expected_depth_original(run, k, 1.0 / sim.s, ref.w2c[k], ref.K[k], pixels)
        assert expected.max() < 65.0  # inside the PNG's range, so no clipping is expected
        np.testing.assert_array_equal(depth > 0, seen)
        if run.options.preprocess == "pad":
            assert seen.all()
        assert (run.recon.depth[k][~run.backbone.records[k].valid_mask_preprocessed()] == 0).all()  # "0 = padding"
        err = np.abs(depth.ravel()[pixels].astype(np.float64) - expected)
        worst = max(worst, float(err.max()))
    _record(f"{ref.scene_dir.name}/{run.options.preprocess}", depth_png_err_units=worst)
    assert worst <= 0.0005 + 1e-5  # half a millimetre of quantisation, float32 rounding


# ---------------------------------------------------------------------------------------------- diagnostics


def _overlap_class_independent(R_rel: np.ndarray, fov_a: tuple[float, float], fov_b: tuple[float, float]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, x, y = Rotation.from_matrix(R_rel).as_euler("ZXY", degrees=True)
    yaw, pitch = abs(y), abs(-x)
    fx, fy = (fov_a[0] + fov_b[0]) / 2.0, (fov_a[1] + fov_b[1]) / 2.0
    if yaw > fx or pitch > fy:
        return "none"
    if yaw < fx / 2 and pitch < fy / 2:
        return "large"
    return "small"


def test_pair_diagnostics_equal_reference(run: Run) -> None:
    ref = run.ref
    report = json.loads((run.out / "extreme_poses.json").read_text())
    n = len(ref.names)
    pairs = {(p["i"], p["j"]): p for p in report["pairs"]}
    assert set(pairs) == {(i, j) for i in range(n) for j in range(i + 1, n)}
    fov = [
        (math.degrees(2 * math.atan(w / (2 * K[0, 0]))), math.degrees(2 * math.atan(h / (2 * K[1, 1]))))
        for K, (w, h) in zip(ref.K, ref.sizes_wh)
    ]
    worst = 0.0
    for (i, j), p in pairs.items():
        R_rel = ref.w2c[j, :3, :3] @ ref.w2c[i, :3, :3].T
        angle = float(rotation_angle_deg(R_rel, np.eye(3)))
        worst = max(worst, abs(p["angle_deg"] - angle))
        assert p["overlap"] == _overlap_class_independent(R_rel, fov[i], fov[j]), (i, j)
    _record(f"{ref.scene_dir.name}/{run.options.preprocess}", pair_angle_err_deg=worst)
    assert worst < 1e-6
    for v, view in enumerate(report["views"]):
        assert (view["width"], view["height"]) == tuple(ref.sizes_wh[v])
        assert view["file"] == f"images/{ref.names[v]}"


def test_castle_pair_angles_match_pair_overlap_json(dev_small: Path, tmp_path_factory) -> None:
    run = _run(dev_small, tmp_path_factory, CASTLE, "crop")
    table = json.loads((dev_small / CASTLE / "pair_overlap.json").read_text())
    assert table["names"] == run.ref.names
    report = json.loads((run.out / "extreme_poses.json").read_text())
    rel = np.asarray(table["rel_rot_deg"])
    diffs = [abs(p["angle_deg"] - rel[p["i"], p["j"]]) for p in report["pairs"]]
    assert max(diffs) < 0.01
    # The courtyard really is extreme: most pairs face more than 90 degrees apart, many share nothing.
    assert sum(p["angle_deg"] > 90 for p in report["pairs"]) >= len(report["pairs"]) // 2
    assert sum(p["overlap"] == "none" for p in report["pairs"]) >= len(report["pairs"]) // 3


# ---------------------------------------------------------------------------------------------- 4. chunking


@pytest.mark.parametrize("scene,mode", [(CASTLE, "crop"), (SACRE, "pad")])
def test_chunked_equals_unchunked(dev_small: Path, tmp_path_factory, scene: str, mode: str) -> None:
    """4-frame passes sharing 2 frames, each pass in its own world and scale (0.37, 2.9, 0.61, 1.7):
    stitched by Sim(3) on the shared frames, the result is as exact as one pass."""
    run = _run(
        dev_small,
        tmp_path_factory,
        scene,
        mode,
        TARGET_FAST,
        depth_format="none",
        max_frames_per_pass=4,
        chunk_overlap=2,
    )
    n = len(run.ref.names)
    expected_calls = [list(range(s, min(s + 4, n))) for s in range(0, n - 2, 2)]
    assert run.backbone.calls == expected_calls
    residuals = run.recon.chunk_residuals
    assert [r["chunk"] for r in residuals] == list(range(1, len(expected_calls)))
    assert all(r["shared_frames"] == 2 for r in residuals)
    key = f"{scene}/{mode} chunked"
    _record(key, join_median=max(r["median"] for r in residuals), join_p90=max(r["p90"] for r in residuals))
    assert max(r["p90"] for r in residuals) < 1e-6
    cams = read_with_nerfstudio(run.out, "transforms")
    _check_cameras(cams, run, key)
    sim = pose_errors(cams.w2c, run.ref).sim
    xyz, rgb = _ply_points_in_model_world(run.out)
    _check_points_on_surface(xyz, sim, run, key, "ply_dist_rel")
    exported = read_transforms_f64(run.out)
    _check_points_seen(xyz, rgb, exported.w2c, exported.K, run)
    # Depth of frames from later chunks is rescaled into the first chunk's units.
    for k in range(n):
        valid = run.backbone.records[k].valid_mask_preprocessed()
        gt = run.backbone.gt_depth_pre(k)[valid] / sim.s
        np.testing.assert_allclose(run.recon.depth[k][valid], gt, rtol=1e-5)


def test_chunk_join_ignores_outliers_in_shared_frames(dev_small: Path, tmp_path_factory) -> None:
    """20 % gross depth outliers (at high confidence) in the shared frames of the second pass: the robust
    join still lands exactly, the residual report shows them, and no corrupted depth reaches the output."""
    corrupt = {1: {2: 0.2, 3: 0.2}}  # call 1 = frames 2..5; frames 2, 3 are the ones shared with call 0
    run = _run(
        dev_small, tmp_path_factory, FOUNTAIN, "crop", TARGET_FAST, backbone_kwargs={"corrupt": corrupt},
        depth_format="none", max_frames_per_pass=4, chunk_overlap=2,
    )  # fmt: skip
    residuals = run.recon.chunk_residuals
    _record(f"{FOUNTAIN}/crop chunked+outliers", join_median=residuals[0]["median"], join_p90=residuals[0]["p90"])
    assert residuals[0]["median"] < 1e-6
    assert residuals[0]["p90"] > 1e-3  # the outliers are reported, not hidden
    assert max(r["p90"] for r in residuals[1:]) < 1e-6
    cams = read_with_nerfstudio(run.out, "transforms")
    _check_cameras(cams, run, f"{FOUNTAIN}/crop chunked+outliers")
    xyz, _ = _ply_points_in_model_world(run.out)
    _check_points_on_surface(
        xyz, pose_errors(cams.w2c, run.ref).sim, run, f"{FOUNTAIN}/crop chunked+outliers", "ply_dist_rel"
    )


def test_chunking_wide_images_joins_on_real_pixels_only(dev_small: Path, tmp_path_factory) -> None:
    """768x240 strips in pad mode: 70 % of each network input is padding, whose depth is arbitrary and
    differs between passes. The join must use real pixels only (it used to land 48 degrees off)."""
    from PIL import Image

    ref = _ref(dev_small, FOUNTAIN)
    folder = tmp_path_factory.mktemp("wide")
    paths = []
    for p in ref.paths:
        with Image.open(p) as img:
            img.crop((0, 136, 768, 376)).save(folder / f"{p.stem}.png")
        paths.append(folder / f"{p.stem}.png")
    K = ref.K.copy()
    K[:, 1, 2] -= 136
    wide = Reference(folder, [p.name for p in paths], paths, ref.w2c, K, np.tile([768, 240], (len(paths), 1)))
    backbone = GroundTruthBackbone.for_reference(wide, "pad", TARGET_FAST)
    assert backbone.records[0].valid_mask_preprocessed().mean() < 0.35
    options = PosingOptions(
        preprocess="pad", max_points=5_000, max_frames_per_pass=4, chunk_overlap=2, refinement=FEED_FORWARD
    )
    recon = pose_images(paths, backbone, options, progress=False)
    err = pose_errors(recon.w2c_opencv, wide)
    _record(f"{FOUNTAIN} 768x240 strips/pad chunked", rot_deg=err.max_rot_deg, pos_rel=err.max_pos_rel,
            join_p90=max(r["p90"] for r in recon.chunk_residuals))  # fmt: skip
    assert max(r["p90"] for r in recon.chunk_residuals) < 1e-6
    assert err.max_rot_deg < MAX_ROT_DEG and err.max_pos_rel < MAX_POS_REL
    np.testing.assert_allclose(recon.intrinsics, K, rtol=1e-9)


def test_exif_rotated_originals(dev_small: Path, tmp_path_factory) -> None:
    """Half the castle photos stored sideways with an EXIF orientation tag (6 = rotate to display): the
    upright image is posed, and the dataset holds upright images nerfstudio reads as they were posed."""
    from PIL import Image

    ref = _ref(dev_small, CASTLE)
    folder = tmp_path_factory.mktemp("exif")
    paths = []
    for i, p in enumerate(ref.paths):
        with Image.open(p) as img:
            if i % 2:
                exif = Image.Exif()
                exif[0x0112] = 6
                img.transpose(Image.Transpose.ROTATE_90).save(folder / p.name, quality=95, exif=exif.tobytes())
            else:
                img.save(folder / p.name, quality=95)
        paths.append(folder / p.name)
    exif_ref = Reference(folder, ref.names, paths, ref.w2c, ref.K, ref.sizes_wh)
    backbone = GroundTruthBackbone.for_reference(exif_ref, "crop", TARGET_FAST)
    recon = pose_images(paths, backbone, PosingOptions(max_points=5_000, refinement=FEED_FORWARD), progress=False)
    np.testing.assert_array_equal(recon.sizes_wh, ref.sizes_wh)
    out = write_dataset(recon, folder / "dataset", depth_format="none")
    cams = read_with_nerfstudio(out, "transforms")
    err = pose_errors(cams.w2c, ref)
    assert err.max_rot_deg < MAX_ROT_DEG and err.max_pos_rel < MAX_POS_REL
    np.testing.assert_allclose(cams.K, ref.K, rtol=MAX_K_REL)
    data = json.loads((out / "transforms.json").read_text())
    for i, frame in enumerate(data["frames"]):
        with Image.open(out / frame["file_path"]) as img:  # what nerfstudio sees: plain PIL, no EXIF transpose
            assert img.size == tuple(ref.sizes_wh[i]) == (frame["w"], frame["h"])
            assert img.getexif().get(0x0112, 1) == 1


# ---------------------------------------------------------------------------------------------- 5. known poses


def test_known_poses_from_reference_colmap_are_kept_exactly(dev_small: Path, tmp_path_factory) -> None:
    import pycolmap

    # The backbone errs on every view but the first (1 deg, +2 % focal): the known cameras must win.
    run = _run(
        dev_small, tmp_path_factory, FOUNTAIN, "pad", TARGET_FAST, backbone_kwargs={"perturbed": tuple(range(1, 11))},
        poses_from=dev_small / FOUNTAIN / "sparse" / "0",
    )  # fmt: skip
    ref = run.ref
    assert run.recon.world_source == "colmap"
    rec = pycolmap.Reconstruction(str(run.out / "colmap" / "sparse" / "0"))
    images = sorted((rec.images[i] for i in rec.images), key=lambda im: im.name)
    assert [im.name for im in images] == ref.names
    w2c = np.stack([im.cam_from_world().matrix() for im in images])
    K = np.stack([im.camera.calibration_matrix() for im in images])
    np.testing.assert_allclose(w2c, ref.w2c, rtol=0, atol=1e-9)
    np.testing.assert_allclose(K, ref.K, rtol=0, atol=1e-9)
    np.testing.assert_array_equal([(im.camera.width, im.camera.height) for im in images], ref.sizes_wh)
    assert run.recon.intrinsics_source == ["known-pose"] * len(ref.names)
    # The world is the reference world: points lie on the GT surface without any alignment, depth in its units.
    identity = Similarity(1.0, np.eye(3), np.zeros(3))
    xyz, _ = _ply_points_in_model_world(run.out)
    _check_points_on_surface(xyz, identity, run, f"{FOUNTAIN}/pad poses-from colmap", "ply_dist_rel")
    ns = read_with_nerfstudio(run.out, "transforms")
    assert rotation_angle_deg(ns.w2c, ref.w2c).max() < 1e-4
    assert np.abs(camera_centres(ns.w2c) - ref.centres).max() < 1e-6 * ref.extent
    frame = json.loads((run.out / "transforms.json").read_text())["frames"][3]
    depth = read_depth_png_mm(run.out / frame["depth_file_path"])
    seen, expected = _expected_depth_original(run, 3, 1.0, ref.w2c[3], ref.K[3])
    np.testing.assert_array_equal(depth > 0, seen)
    assert np.abs(depth.ravel() - expected).max() <= 0.0005 + 1e-5


@pytest.mark.parametrize("given", ["half", "two"])
def test_known_poses_from_partial_transforms_json(dev_small: Path, tmp_path_factory, given: str) -> None:
    """Some views' poses given in a transforms.json (the reference world, mixed sizes): those are exported
    unchanged, the others are placed by the model (exact backbone -> exact placement, also with 2 views)."""
    scene = SACRE
    ref = _ref(dev_small, scene)
    source = json.loads((dev_small / scene / "transforms.json").read_text())
    by_name = {Path(f["file_path"]).name: f for f in source["frames"]}
    keep = list(range(0, len(ref.names), 2)) if given == "half" else [1, 6]
    known_dir = tmp_path_factory.mktemp(f"known-{given}")
    subset = {k: v for k, v in source.items() if k != "frames"}
    subset["frames"] = [by_name[ref.names[i]] for i in keep]
    (known_dir / "transforms.json").write_text(json.dumps(subset))

    # With 5 known views the backbone errs on the known ones but the first (1 deg, +2 % focal; the Sim(3)
    # uses camera centres only, which stay exact): the file's cameras must replace them. With 2 views
    # the Sim(3) also uses the rotations, so the backbone stays exact there.
    perturbed = tuple(keep[1:]) if given == "half" else ()
    run = _run(
        dev_small, tmp_path_factory, scene, "crop", TARGET_FAST, backbone_kwargs={"perturbed": perturbed},
        depth_format="none", poses_from=known_dir / "transforms.json",
    )  # fmt: skip
    assert run.recon.world_source == "transforms"
    # sacre_coeur's reference cameras have k1 != 0: the user is told the export drops it.
    assert any("lens distortion" in note for note in run.recon.warnings)
    assert json.loads((run.out / "extreme_poses.json").read_text())["warnings"] == run.recon.warnings
    out = json.loads((run.out / "transforms.json").read_text())
    np.testing.assert_allclose(np.asarray(out["applied_transform"]), np.eye(4)[:3], atol=0)
    for i in keep:
        frame, src = out["frames"][i], by_name[ref.names[i]]
        np.testing.assert_allclose(frame["transform_matrix"], src["transform_matrix"], rtol=0, atol=1e-9)
        for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
            assert frame[k] == pytest.approx(src[k], rel=1e-12, abs=1e-12), k
    exported = read_transforms_f64(run.out)
    others = [i for i in range(len(ref.names)) if i not in keep]
    rot = rotation_angle_deg(exported.w2c[others], ref.w2c[others])
    pos = np.linalg.norm(camera_centres(exported.w2c[others]) - ref.centres[others], axis=1) / ref.extent
    _record(f"{scene}/crop poses-from transforms ({given})", rot_deg=rot.max(), pos_rel=pos.max())
    assert rot.max() < MAX_ROT_DEG and pos.max() < MAX_POS_REL
    np.testing.assert_allclose(exported.K, ref.K, rtol=1e-9)
    assert [run.recon.intrinsics_source[i] for i in keep] == ["known-pose"] * len(keep)
    identity = Similarity(1.0, np.eye(3), np.zeros(3))
    xyz, _ = _ply_points_in_model_world(run.out)
    _check_points_on_surface(xyz, identity, run, f"{scene}/crop poses-from transforms ({given})", "ply_dist_rel")


# ---------------------------------------------------------------------------------------------- 6. known intrinsics


def test_given_true_intrinsics_are_exported_and_exact(dev_small: Path, tmp_path_factory) -> None:
    fx, fy, cx, cy = 689.87, 691.04, 380.1725, 251.7025  # the Strecha calibration
    run = _run(
        dev_small, tmp_path_factory, CASTLE, "pad", TARGET_FAST, depth_format="none", intrinsics=f"{fx},{fy},{cx},{cy}"
    )
    exported = read_transforms_f64(run.out)
    np.testing.assert_array_equal(exported.K[:, [0, 1, 0, 1], [0, 1, 2, 2]], np.tile([fx, fy, cx, cy], (9, 1)))
    assert run.recon.intrinsics_source == ["given"] * 9
    err = pose_errors(exported.w2c, run.ref)
    assert err.max_rot_deg < MAX_ROT_DEG and err.max_pos_rel < MAX_POS_REL
    xyz, rgb = _ply_points_in_model_world(run.out)
    _check_points_on_surface(xyz, err.sim, run, f"{CASTLE}/pad given K", "ply_dist_rel")
    _check_points_seen(xyz, rgb, exported.w2c, exported.K, run)


def test_given_wrong_intrinsics_keep_points_consistent_with_them(dev_small: Path, tmp_path_factory) -> None:
    """A focal length and principal point that differ from the truth: the exported cameras carry exactly the
    given values, and the points are unprojected with them (they re-project where they came from)."""
    given = (640.0, 655.0, 371.5, 262.25)
    run = _run(
        dev_small,
        tmp_path_factory,
        FOUNTAIN,
        "crop",
        TARGET_FAST,
        depth_format="none",
        intrinsics=",".join(map(str, given)),
    )
    exported = read_transforms_f64(run.out)
    np.testing.assert_array_equal(exported.K[:, [0, 1, 0, 1], [0, 1, 2, 2]], np.tile(given, (11, 1)))
    colmap = read_with_nerfstudio(run.out, "colmap")
    np.testing.assert_allclose(colmap.K[:, [0, 1, 0, 1], [0, 1, 2, 2]], np.tile(given, (11, 1)), rtol=1e-7)
    xyz, rgb = _ply_points_in_model_world(run.out)
    _check_points_seen(xyz, rgb, exported.w2c, exported.K, run)
    # ...and they are no longer on the GT surface (the test would notice predicted K being used instead).
    dist = run.backbone.scene.distance(pose_errors(exported.w2c, run.ref).sim.apply(xyz)) / run.ref.extent
    assert np.median(dist) > 1e-3
