"""Posing options and the small pieces of the pipeline: option validation, chunk windows, point filtering,
voxel downsampling, the point budget and the --intrinsics choices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ns_extreme.posing.chunking import chunk_ranges
from ns_extreme.posing.intrinsics import (
    FULL_FRAME_DIAGONAL_MM,
    choose_intrinsics,
    exif_focal_px,
    parse_intrinsics_option,
)
from ns_extreme.posing.options import PosingOptions
from ns_extreme.posing.points import PointCloud, edge_mask, limit_points, voxel_downsample

# ---------------------------------------------------------------------------------------------- options


def test_default_options_are_valid() -> None:
    o = PosingOptions()
    assert (o.preprocess, o.intrinsics, o.max_frames_per_pass) == ("crop", "auto", 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"conf_percentile": -1.0}, "--conf-percentile"),
        ({"conf_percentile": 100.0}, "--conf-percentile"),
        ({"max_points": 0}, "--max-points"),
        ({"max_frames_per_pass": 4, "chunk_overlap": 4}, "must exceed --chunk-overlap"),
        ({"max_frames_per_pass": 3, "chunk_overlap": 4}, "must exceed --chunk-overlap"),
        ({"chunk_overlap": 0}, "--chunk-overlap must be at least 1"),
        ({"intrinsics": "focal"}, "--intrinsics must be auto, exif, shared"),
        ({"intrinsics": "500,500,320"}, "--intrinsics must be auto, exif, shared"),
        ({"intrinsics": "0,500,320,240"}, "focal lengths must be positive"),
        ({"intrinsics": "nan,500,320,240"}, "finite"),
        ({"preprocess": "resize"}, "--preprocess"),
    ],
)
def test_invalid_options_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PosingOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"conf_percentile": 0.0},
        {"conf_percentile": 99.9},
        {"max_points": 1},
        {"max_frames_per_pass": 5, "chunk_overlap": 4},
        {"max_frames_per_pass": 2, "chunk_overlap": 1},
        {"intrinsics": "exif"},
        {"intrinsics": "shared"},
        {"intrinsics": "500, 510.5, 320, 240"},
        {"preprocess": "pad"},
    ],
)
def test_valid_options(kwargs: dict) -> None:
    PosingOptions(**kwargs)


def test_parse_intrinsics_option() -> None:
    assert parse_intrinsics_option("auto") == "auto"
    assert parse_intrinsics_option("500,501.5,-3,240.25") == (500.0, 501.5, -3.0, 240.25)
    with pytest.raises(ValueError):
        parse_intrinsics_option("500,500,inf,240")


# ---------------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    "n, max_frames, overlap, expected",
    [
        (10, 0, 4, [list(range(10))]),
        (5, 8, 2, [list(range(5))]),
        (8, 8, 2, [list(range(8))]),
        (9, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8]]),
        (10, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]),
        (11, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9], [8, 9, 10]]),
        (7, 5, 4, [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]),
        (6, 3, 1, [[0, 1, 2], [2, 3, 4], [4, 5]]),
    ],
)
def test_chunk_ranges_cases(n: int, max_frames: int, overlap: int, expected: list[list[int]]) -> None:
    assert chunk_ranges(n, max_frames, overlap) == expected


@pytest.mark.parametrize("n", [2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("max_frames, overlap", [(2, 1), (4, 2), (5, 4), (8, 3), (24, 4)])
def test_chunk_ranges_properties(n: int, max_frames: int, overlap: int) -> None:
    ranges = chunk_ranges(n, max_frames, overlap)
    assert ranges[0][0] == 0 and ranges[-1][-1] == n - 1
    assert sorted(set().union(*map(set, ranges))) == list(range(n))
    for r in ranges:
        assert r == list(range(r[0], r[-1] + 1)) and len(r) <= max_frames
    for a, b in zip(ranges, ranges[1:]):
        assert len(set(a) & set(b)) == overlap  # exactly `overlap` frames to join on
        assert len(set(b) - set(a)) >= 1  # every chunk brings new frames
    if n <= max_frames:
        assert len(ranges) == 1


# ---------------------------------------------------------------------------------------------- points


def test_edge_mask_flat_and_gentle_slope_are_kept() -> None:
    assert edge_mask(np.full((5, 6), 3.0), 0.05).all()
    slope = 10.0 + 0.01 * np.arange(30.0).reshape(5, 6)  # 0.1 % per pixel
    assert edge_mask(slope, 0.05).all()


def test_edge_mask_removes_both_sides_of_a_step() -> None:
    depth = np.full((4, 6), 2.0)
    depth[:, 3:] = 4.0  # step between columns 2 and 3
    mask = edge_mask(depth, 0.05)
    expected = np.ones((4, 6), bool)
    expected[:, 2:4] = False
    np.testing.assert_array_equal(mask, expected)
    # The threshold is relative to the nearer depth: a 4 % step survives 0.05, not 0.03.
    depth = np.full((3, 3), 1.0)
    depth[1, 1] = 1.04
    assert edge_mask(depth, 0.05).all()
    m = edge_mask(depth, 0.03)
    assert not m[1, 1] and not m[0, 1] and not m[1, 0] and m[0, 0]


def _cloud(xyz, conf) -> PointCloud:
    xyz = np.asarray(xyz, dtype=np.float64)
    rgb = np.arange(len(xyz) * 3, dtype=np.uint8).reshape(-1, 3)
    n = len(xyz)
    return PointCloud(
        xyz,
        rgb,
        np.asarray(conf, dtype=np.float32),
        np.zeros(n, np.int64),
        np.zeros((n, 2), np.float32),
        np.zeros(n, np.uint8),
    )


def test_voxel_downsample_keeps_most_confident_point_per_voxel() -> None:
    cloud = _cloud(
        [[0.1, 0.1, 0.1], [0.9, 0.2, 0.3], [0.5, 0.5, 0.5],  # voxel (0,0,0)
         [1.2, 0.1, 0.1], [1.8, 0.9, 0.2],  # voxel (1,0,0)
         [-0.5, 0.5, 0.5],  # voxel (-1,0,0)
         [0.2, 0.2, 3.7], [0.3, 0.3, 3.1]],  # voxel (0,0,3)
        [2.0, 5.0, 3.0, 1.5, 1.2, 9.0, 4.0, 4.0],
    )  # fmt: skip
    out = voxel_downsample(cloud, 1.0)
    # Index 1 (conf 5) for voxel 0; 3 (1.5 > 1.2); 5; a tie keeps the first (6). Original order kept.
    np.testing.assert_array_equal(out.xyz, cloud.xyz[[1, 3, 5, 6]])
    np.testing.assert_array_equal(out.rgb, cloud.rgb[[1, 3, 5, 6]])
    np.testing.assert_array_equal(out.conf, cloud.conf[[1, 3, 5, 6]])
    assert voxel_downsample(cloud, 0.0) is cloud
    assert len(voxel_downsample(cloud, 100.0).xyz) == 2  # negative x falls in its own voxel
    np.testing.assert_array_equal(voxel_downsample(cloud, 100.0).conf, [5.0, 9.0])


def test_voxel_downsample_random_cloud_invariants() -> None:
    rng = np.random.default_rng(3)
    cloud = _cloud(rng.uniform(-2, 2, size=(5000, 3)), rng.uniform(1, 5, size=5000))
    out = voxel_downsample(cloud, 0.5)
    keys_all = np.floor(cloud.xyz / 0.5).astype(int)
    keys_out = np.floor(out.xyz / 0.5).astype(int)
    assert len(np.unique(keys_out, axis=0)) == len(out.xyz) == len(np.unique(keys_all, axis=0))
    for key, conf in zip(keys_out[:200], out.conf[:200]):
        same = np.all(keys_all == key, axis=1)
        assert conf == cloud.conf[same].max()


def test_limit_points_is_deterministic_and_sorted() -> None:
    rng = np.random.default_rng(0)
    cloud = _cloud(rng.normal(size=(1000, 3)), rng.uniform(1, 2, size=1000))
    a, b, c = limit_points(cloud, 100, seed=0), limit_points(cloud, 100, seed=0), limit_points(cloud, 100, seed=1)
    np.testing.assert_array_equal(a.xyz, b.xyz)
    assert len(a.xyz) == 100 and not np.array_equal(a.xyz, c.xyz)
    # A subset of distinct original points, in their original order.
    index = [int(np.flatnonzero(np.all(cloud.xyz == p, axis=1))[0]) for p in a.xyz]
    assert index == sorted(set(index))
    np.testing.assert_array_equal(a.rgb, cloud.rgb[index])
    assert limit_points(cloud, 1000, seed=0) is cloud
    assert limit_points(cloud, 5000, seed=0) is cloud


# ---------------------------------------------------------------------------------------------- intrinsics


def _K(f, cx, cy, fy=None) -> np.ndarray:
    return np.array([[f, 0.0, cx], [0.0, f if fy is None else fy, cy], [0.0, 0.0, 1.0]])


def _jpeg(path: Path, size_wh: tuple[int, int], focal_35mm: int | None = None, orientation: int | None = None) -> Path:
    img = Image.new("RGB", size_wh, (120, 80, 40))
    exif = Image.Exif()
    if focal_35mm is not None:
        exif.get_ifd(0x8769)[0xA405] = focal_35mm  # ExifIFD / FocalLengthIn35mmFilm
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes())
    return path


def test_auto_keeps_predictions() -> None:
    K = np.stack([_K(500, 320, 240), _K(610, 300, 250, fy=612)])
    out, src = choose_intrinsics("auto", K, np.array([[640, 480], [640, 480]]), [Path("a"), Path("b")])
    np.testing.assert_array_equal(out, K)
    assert src == ["predicted", "predicted"]


def test_given_intrinsics_replace_all_views() -> None:
    K = np.stack([_K(500, 320, 240)] * 3)
    out, src = choose_intrinsics("700,710.5,330.25,250", K, np.array([[640, 480]] * 3), [Path("x")] * 3)
    np.testing.assert_array_equal(out, np.stack([_K(700, 330.25, 250, fy=710.5)] * 3))
    assert src == ["given"] * 3


def test_shared_uses_median_focal_and_keeps_principal_points() -> None:
    sizes = np.array([[640, 480]] * 4)
    K = np.stack([_K(500, 320, 240), _K(520, 321, 239, fy=530), _K(900, 318, 242), _K(505, 320, 240)])
    out, src = choose_intrinsics("shared", K, sizes, [Path("x")] * 4)
    median = np.median([500, 520, 900, 505, 500, 530, 900, 505])  # fx and fy of every view
    np.testing.assert_allclose(out[:, 0, 0], median)
    np.testing.assert_allclose(out[:, 1, 1], median)
    np.testing.assert_array_equal(out[:, :2, 2], K[:, :2, 2])
    assert src == ["shared"] * 4


def test_shared_focal_is_the_same_for_portrait_and_landscape_shots() -> None:
    """One camera, held both ways (640x480 and 480x640), and the same photos downscaled by 2: the focal
    length in pixels is 500 for the full-size shots and 250 for the half-size ones, whatever the orientation."""
    sizes = np.array([[640, 480], [480, 640], [640, 480], [320, 240], [240, 320]])
    true_f = np.array([500.0, 500.0, 500.0, 250.0, 250.0])
    predicted = np.stack(
        [_K(f * (1 + e), w / 2, h / 2) for f, e, (w, h) in zip(true_f, [0.0, 0.02, -0.02, 0.0, 0.0], sizes)]
    )
    out, _ = choose_intrinsics("shared", predicted, sizes, [Path("x")] * 5)
    np.testing.assert_allclose(out[:, 0, 0], true_f, rtol=1e-12)
    np.testing.assert_allclose(out[:, 1, 1], true_f, rtol=1e-12)


def test_exif_focal_35mm(tmp_path: Path) -> None:
    with_exif = _jpeg(tmp_path / "a.jpg", (640, 480), focal_35mm=28)
    without = _jpeg(tmp_path / "b.jpg", (640, 480))
    rotated = _jpeg(tmp_path / "c.jpg", (640, 480), focal_35mm=50, orientation=6)  # stored landscape, shown portrait
    diag = math.hypot(640, 480)
    assert FULL_FRAME_DIAGONAL_MM == pytest.approx(43.2666, abs=1e-4)
    assert exif_focal_px(with_exif, (640, 480)) == pytest.approx(28 * diag / 43.2666, rel=1e-5)
    assert exif_focal_px(without, (640, 480)) is None
    K = np.stack([_K(450, 320, 240), _K(450, 320, 240), _K(450, 240, 320)])
    sizes = np.array([[640, 480], [640, 480], [480, 640]])
    out, src = choose_intrinsics("exif", K, sizes, [with_exif, without, rotated])
    assert src == ["exif", "predicted", "exif"]
    assert out[0, 0, 0] == out[0, 1, 1] == pytest.approx(28 * diag / FULL_FRAME_DIAGONAL_MM, rel=1e-12)
    np.testing.assert_array_equal(out[1], K[1])
    assert out[2, 0, 0] == out[2, 1, 1] == pytest.approx(50 * diag / FULL_FRAME_DIAGONAL_MM, rel=1e-12)
    np.testing.assert_array_equal(out[:, :2, 2], K[:, :2, 2])  # principal points stay predicted


def test_exif_on_unreadable_or_zero_focal(tmp_path: Path) -> None:
    zero = _jpeg(tmp_path / "z.jpg", (64, 48), focal_35mm=0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert exif_focal_px(zero, (64, 48)) is None
    assert exif_focal_px(broken, (64, 48)) is None


def test_given_intrinsics_refuse_mixed_image_sizes():
    from ns_extreme.posing.intrinsics import choose_intrinsics

    K = np.repeat(np.eye(3)[None], 2, axis=0)
    with pytest.raises(ValueError, match="several sizes"):
        choose_intrinsics("500,500,320,240", K, np.array([[640, 480], [480, 640]]), [Path("a.jpg"), Path("b.jpg")])


def test_known_poses_report_distortion_and_a_single_known_view(dev_small, tmp_path):
    """sacre_coeur's reference model is SIMPLE_RADIAL: its k1 is dropped, and the user is told."""
    from ns_extreme.posing.known_poses import read_known_poses

    known = read_known_poses(dev_small / "hloc_sacre_coeur" / "sparse" / "0")
    assert len(known.distorted) == 10
    strecha = read_known_poses(dev_small / "strecha_fountain-P11" / "transforms.json")
    assert strecha.distorted == []
