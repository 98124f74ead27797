"""Datasets other trainers open as they are: drop-in layout (sparse/0, images_N, EXIF), masks, a level world, real
scale, lens distortion.

The ground-truth test backbone (``posing_helpers``) poses real dev_small photos, so every exported quantity is known:
the analytic scene gives exact depths and points, the reference cameras the poses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from posing_helpers import (
    GroundTruthBackbone,
    Reference,
    SphereScene,
    camera_centres,
    load_reference,
    make_scene,
    umeyama,
)

from ns_extreme.io.dataset import write_dataset
from ns_extreme.io.depth import read_depth_png_mm
from ns_extreme.io.masks import photo_masks
from ns_extreme.posing import PosingOptions, pose_images
from ns_extreme.posing.refine import RefineOptions

HERZ_JESUS = "strecha_Herz-Jesus-P8"  # 768 x 512
FOUNTAIN = "strecha_fountain-P11"
TARGET = 140
VIEWS = [0, 2, 4, 6]


def _pose(ref: Reference, scene=None, **options):
    backbone = GroundTruthBackbone.for_reference(ref, "crop", TARGET, scene=scene)
    opts = PosingOptions(max_points=20_000, refinement=RefineOptions(refine=False), **options)
    return pose_images(ref.paths, backbone, opts, progress=False)


@pytest.fixture(scope="module")
def herz(dev_small: Path) -> Reference:
    return load_reference(dev_small / HERZ_JESUS).subset(VIEWS)


# ---------------------------------------------------------------------------------------------- layout


@pytest.fixture(scope="module")
def plain(herz: Reference, tmp_path_factory) -> Path:
    return write_dataset(_pose(herz), tmp_path_factory.mktemp("plain") / "dataset")


def test_sparse0_is_the_colmap_model_and_images_n_have_nerfstudio_sizes(plain: Path, herz: Reference) -> None:
    import pycolmap

    a = pycolmap.Reconstruction(str(plain / "colmap" / "sparse" / "0"))
    b = pycolmap.Reconstruction(str(plain / "sparse" / "0"))
    assert sorted(im.name for im in b.images.values()) == [p.name for p in herz.paths]
    for image_id, im in a.images.items():
        other = b.images[image_id]
        assert other.name == im.name and np.allclose(other.cam_from_world().matrix(), im.cam_from_world().matrix())
        assert other.camera.model == pycolmap.CameraModelId.PINHOLE  # what 3DGS's train.py accepts
    assert b.num_points3D() == a.num_points3D() > 0
    for factor in (2, 4, 8):
        names = sorted(p.name for p in (plain / f"images_{factor}").iterdir())
        assert names == sorted(p.name for p in (plain / "images").iterdir())  # gsplat pairs them by sorted name
        for name in names:
            w, h = Image.open(plain / "images" / name).size
            assert Image.open(plain / f"images_{factor}" / name).size == (w // factor, h // factor)
    assert not (plain / "images_16").exists()


@pytest.mark.parametrize("factor", [1, 4])
def test_nerfstudio_parsers_read_each_downscale(plain: Path, herz: Reference, factor: int) -> None:
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    colmap = ColmapDataParserConfig(
        data=plain, colmap_path=Path("sparse/0"), downscale_factor=factor, orientation_method="none",
        center_method="none", auto_scale_poses=False, eval_mode="all",
    ).setup().get_dataparser_outputs("train")  # fmt: skip
    transforms = NerfstudioDataParserConfig(
        data=plain, downscale_factor=factor, orientation_method="none", center_method="none",
        auto_scale_poses=False, eval_mode="all",
    ).setup().get_dataparser_outputs("train")  # fmt: skip
    for outputs in (colmap, transforms):
        assert len(outputs.image_filenames) == len(herz.paths)
        for i, f in enumerate(outputs.image_filenames):
            assert f.parent.name == ("images" if factor == 1 else f"images_{factor}")
            size = Image.open(f).size
            assert size == (int(outputs.cameras.width[i]), int(outputs.cameras.height[i]))
            j = [p.name for p in herz.paths].index(f.name)
            assert np.isclose(float(outputs.cameras.fx[i]), herz.K[j, 0, 0] / factor, rtol=2e-3)


def test_exif_kept_for_copies_and_carried_to_reencoded_and_downscaled(tmp_path: Path, herz: Reference) -> None:
    from ns_extreme.io.dataset import _export_image
    from ns_extreme.io.layout import write_downscaled_images

    src = tmp_path / "src"
    src.mkdir()
    img = Image.open(herz.paths[0])
    exif = Image.Exif()
    exif[0x010F] = "TestMake"  # Make
    exif.get_ifd(0x8769)[0x829A] = (1, 250)  # ExposureTime
    img.save(src / "upright.jpg", exif=exif, quality=90)
    exif[0x0112] = 6  # rotated 90° clockwise: re-encoded upright as PNG
    img.save(src / "rotated.jpg", exif=exif, quality=90)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    used: set[str] = set()
    files = [_export_image(src / n, out / "images", used) for n in ("upright.jpg", "rotated.jpg")]
    assert files == ["images/upright.jpg", "images/rotated.png"]
    assert (out / files[0]).read_bytes() == (src / "upright.jpg").read_bytes()
    write_downscaled_images(out, files, 1)
    for rel in (files[1], "images_2/upright.jpg", "images_2/rotated.png"):
        got = Image.open(out / rel).getexif()
        exposure = got.get_ifd(0x8769)[0x829A]
        exposure = exposure[0] / exposure[1] if isinstance(exposure, tuple) else float(exposure)
        assert got[0x010F] == "TestMake" and exposure == pytest.approx(1 / 250), rel
        assert got.get(0x0112, 1) == 1, rel
    assert Image.open(out / "images_2" / "rotated.png").size == (512 // 2, 768 // 2)


# ---------------------------------------------------------------------------------------------- masks


def _small_sphere_masks(ref: Reference, scene: SphereScene, folder: Path, scale: float = 0.5) -> list[np.ndarray]:
    """Masks (saved at ``scale`` x the photo size) that ignore every pixel seeing the small sphere, dilated a bit."""
    folder.mkdir()
    big, small = scene.spheres
    masks = []
    for i, path in enumerate(ref.paths):
        w, h = int(ref.sizes_wh[i, 0] * scale), int(ref.sizes_wh[i, 1] * scale)
        u, v = np.meshgrid((np.arange(w) + 0.5) / scale, (np.arange(h) + 0.5) / scale)
        rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(ref.K[i]).T @ ref.w2c[i, :3, :3]
        origin = camera_centres(ref.w2c[i : i + 1])[0]
        hits_small = small.intersect(origin, rays.reshape(-1, 3)).reshape(h, w) < np.inf
        from scipy.ndimage import binary_dilation

        ignore = binary_dilation(hits_small, iterations=3)
        Image.fromarray(np.where(ignore, 0, 255).astype(np.uint8)).save(folder / f"{path.stem}.png")
        masks.append(~ignore)
    return masks


@pytest.fixture(scope="module")
def masked(herz: Reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    scene = make_scene(herz.w2c)
    masks = _small_sphere_masks(herz, scene, root / "masks")
    recon = _pose(herz, masks=root / "masks", orient="none")
    return herz, scene, masks, recon, write_dataset(recon, root / "dataset")


def test_masked_pixels_give_no_points_and_depth_zero(masked) -> None:
    ref, scene, masks_small, recon, out = masked
    big, small = scene.spheres
    sim = umeyama(camera_centres(recon.w2c_opencv), ref.centres)
    xyz = sim.apply(recon.points_xyz)
    on_small = small.distance(xyz) < 1e-3 * small.radius
    on_big = big.distance(xyz) < 1e-3 * big.radius
    assert on_big.sum() > 1000 and on_small.sum() == 0
    unmasked = _pose(ref, orient="none")  # the same scene without masks does put points on the small sphere
    xyz0 = umeyama(camera_centres(unmasked.w2c_opencv), ref.centres).apply(unmasked.points_xyz)
    assert (small.distance(xyz0) < 1e-3 * small.radius).sum() > 100
    frames = json.loads((out / "transforms.json").read_text())["frames"]
    for i, frame in enumerate(frames):
        mask = np.asarray(Image.open(out / frame["mask_path"])) > 0
        assert mask.shape == (frame["h"], frame["w"])
        depth = read_depth_png_mm(out / frame["depth_file_path"])
        assert np.all(depth[~mask] == 0) and (~mask).sum() > 1000
        assert (depth[mask] > 0).mean() > 0.9
        # written at the photo's size: the half-size input mask, upsampled by nearest neighbour
        assert np.array_equal(mask[::2, ::2], masks_small[i])


def test_nerfstudio_parser_loads_the_masks(masked) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.utils.data_utils import get_image_mask_tensor_from_path

    *_, out = masked
    outputs = NerfstudioDataParserConfig(
        data=out, orientation_method="none", center_method="none", auto_scale_poses=False, eval_mode="all"
    ).setup().get_dataparser_outputs("train")  # fmt: skip
    assert outputs.mask_filenames is not None and len(outputs.mask_filenames) == len(outputs.image_filenames)
    for f, m in zip(outputs.image_filenames, outputs.mask_filenames):
        mask = get_image_mask_tensor_from_path(m)
        assert tuple(mask.shape[:2]) == Image.open(f).size[::-1] and 0 < float(mask.float().mean()) < 1


def test_extreme3d_parser_passes_the_masks_on(masked) -> None:
    from nerfstudio.data.utils.data_utils import get_image_mask_tensor_from_path

    from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParserConfig

    *_, out = masked
    outputs = Extreme3DDataParserConfig(data=out).setup().get_dataparser_outputs("train")
    assert outputs.mask_filenames is not None and len(outputs.mask_filenames) == len(outputs.image_filenames)
    for f, m in zip(outputs.image_filenames, outputs.mask_filenames):
        assert m.parent.name == "masks" and m.stem == f.stem
        assert 0 < float(get_image_mask_tensor_from_path(m).float().mean()) < 1


def test_rgba_photo_yields_its_alpha_mask(tmp_path: Path, herz: Reference) -> None:
    rgb = np.asarray(Image.open(herz.paths[0]))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :200] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "cutout.png")
    sizes = np.array([herz.sizes_wh[0], herz.sizes_wh[1]])
    masks = photo_masks([tmp_path / "cutout.png", herz.paths[1]], sizes)
    assert masks is not None and np.array_equal(masks[0], alpha > 0) and masks[1].all()
    assert photo_masks(herz.paths[:2], sizes) is None


def test_masked_regions_get_no_sift_features(tmp_path: Path, herz: Reference) -> None:
    import pycolmap

    from ns_extreme.posing.refine.matching import extract_features, open_database

    mask = np.ones((512, 768), bool)
    mask[:, :384] = False
    features = extract_features(herz.paths[:2], herz.sizes_wh[:2], herz.K[:2], tmp_path, 384, False, [mask, None])
    assert pycolmap is not None
    with open_database(features.database) as db:  # keypoints at the feature size (half the original)
        left = db.read_keypoints(features.image_ids[0])[:, 0] * features.to_original[0, 0]
        right = db.read_keypoints(features.image_ids[1])[:, 0] * features.to_original[1, 0]
    assert len(left) > 100 and left.min() >= 384 - 2
    assert right.min() < 300


# ---------------------------------------------------------------------------------------------- level world


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1.0, 1.0))))


def _mean_up(w2c: np.ndarray) -> np.ndarray:
    """Mean of the cameras' up vectors (OpenCV -y axis in the world), computed here independently."""
    up = -w2c[:, 1, :3].sum(0)
    return up / np.linalg.norm(up)


def test_orient_up_levels_the_world_and_none_keeps_the_first_camera(herz: Reference, tmp_path: Path) -> None:
    kept = _pose(herz, orient="none")
    np.testing.assert_allclose(kept.w2c_opencv[0], np.eye(4)[:3], atol=1e-9)
    tilt = _angle_deg(_mean_up(kept.w2c_opencv), np.array([0.0, -1.0, 0.0]))
    assert tilt > 1.0  # the first camera's frame is not level: the test is not vacuous
    level = _pose(herz)
    assert _angle_deg(_mean_up(level.w2c_opencv), np.array([0.0, -1.0, 0.0])) < 1e-6  # gravity along +y
    # a pure rotation of the same world: relative poses and scale unchanged
    R = level.w2c_opencv[0, :3, :3].T
    np.testing.assert_allclose(kept.w2c_opencv[:, :3, :3] @ R.T, level.w2c_opencv[:, :3, :3], atol=1e-9)
    np.testing.assert_allclose(camera_centres(kept.w2c_opencv) @ R.T, camera_centres(level.w2c_opencv), atol=1e-9)
    out = write_dataset(level, tmp_path / "dataset", num_downscales=0)
    frames = json.loads((out / "transforms.json").read_text())["frames"]
    up = np.sum([np.asarray(f["transform_matrix"])[:3, 1] for f in frames], axis=0)  # OpenGL camera y = up
    assert _angle_deg(up, np.array([0.0, 0.0, 1.0])) < 1e-6
    world = json.loads((out / "extreme_poses.json").read_text())["world_frame"]
    assert world["orientation"]["method"] == "cameras" and world["scale"]["method"] == "none"


@dataclass(frozen=True)
class GroundScene(SphereScene):
    """The spheres plus a ground plane {X : normal·X = offset} (normal = up)."""

    normal: np.ndarray = None  # type: ignore[assignment]
    offset: float = 0.0

    def raycast(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        t_spheres = super().raycast(origin, dirs)
        denom = dirs @ self.normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.offset - float(origin @ self.normal)) / denom
        return np.minimum(t_spheres, np.where(t > 0, t, np.inf))


def test_ground_plane_levels_a_world_whose_cameras_are_tilted(dev_small: Path) -> None:
    """Every camera pitched down 12° against gravity (looking down at the scene from a height): the ground plane,
    fitted to the points, gives the true up where the cameras' mean up is 12° off."""
    ref = load_reference(dev_small / FOUNTAIN).subset([0, 3, 6, 9])
    cam_up = _mean_up(ref.w2c)
    axis = np.cross(cam_up, ref.w2c[0, 2, :3])  # horizontal axis: tilting about it pitches every camera
    axis /= np.linalg.norm(axis)
    a = np.radians(-12.0)
    true_up = cam_up * np.cos(a) + np.cross(axis, cam_up) * np.sin(a)
    C = ref.centres
    big = make_scene(ref.w2c).spheres[0]
    assert _angle_deg(true_up, ref.w2c[0, 2, :3]) > 95.0  # the optical axis points below the horizon
    scene = GroundScene((big,), normal=true_up, offset=float((C @ true_up).min() - 0.3 * ref.extent))
    recon = _pose(ref, scene=scene)
    assert recon.provenance["world_frame"]["orientation"]["method"] == "ground-plane"
    sim = umeyama(camera_centres(recon.w2c_opencv), ref.centres)  # output world -> reference world
    up_out = sim.R.T @ true_up
    assert _angle_deg(up_out, np.array([0.0, -1.0, 0.0])) < 1.0
    assert _angle_deg(_mean_up(recon.w2c_opencv), np.array([0.0, -1.0, 0.0])) > 10.0


# ---------------------------------------------------------------------------------------------- real scale

_M_PER_REF_UNIT = 3.7


def _enu_to_lla(enu: np.ndarray, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    """Local ENU metres -> (lat°, lon°, alt m) with WGS84's radii of curvature at the origin (exact to ~1e-9 m/m over
    tens of metres), written independently of ns_extreme.posing.metric_scale."""
    a, e2 = 6378137.0, 6.69437999014e-3
    phi = np.radians(lat0)
    w = np.sqrt(1.0 - e2 * np.sin(phi) ** 2)
    meridian, normal = a * (1.0 - e2) / w**3, a / w
    lat = lat0 + np.degrees(enu[:, 1] / (meridian + alt0))
    lon = lon0 + np.degrees(enu[:, 0] / ((normal + alt0) * np.cos(phi)))
    return np.stack([lat, lon, alt0 + enu[:, 2]], axis=-1)


def _dms(value: float) -> tuple[float, float, float]:
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60.0) * 3600.0, 6)


@pytest.fixture(scope="module")
def gps_scene(herz: Reference, tmp_path_factory) -> Reference:
    """Copies of the photos with EXIF GPS: reference centres in metres (x 3.7), in a rotated ENU frame, plus noise."""
    folder = tmp_path_factory.mktemp("gps")
    rng = np.random.default_rng(3)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    R = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    enu = _M_PER_REF_UNIT * herz.centres @ R.T
    enu += rng.normal(scale=0.003 * _M_PER_REF_UNIT * herz.extent, size=enu.shape)
    lla = _enu_to_lla(enu - enu[0], 48.8867, 2.3431, 130.0)
    paths = []
    for path, (lat, lon, alt) in zip(herz.paths, lla):
        exif = Image.Exif()
        gps = exif.get_ifd(0x8825)
        gps.update({1: "N", 2: _dms(lat), 3: "E", 4: _dms(lon), 5: b"\x00", 6: float(alt)})
        Image.open(path).save(folder / path.name, quality=95, exif=exif)
        paths.append(folder / path.name)
    return Reference(folder, herz.names, paths, herz.w2c, herz.K, herz.sizes_wh)


def test_exif_gps_gives_the_reference_scale_in_metres(gps_scene: Reference, tmp_path: Path) -> None:
    recon = _pose(gps_scene, scale_from="exif-gps")
    sim = umeyama(camera_centres(recon.w2c_opencv), gps_scene.centres)
    assert 1.0 / sim.s == pytest.approx(_M_PER_REF_UNIT, rel=0.01)
    scale = recon.provenance["world_frame"]["scale"]
    assert scale["method"] == "exif-gps" and len(scale["residuals_m"]) == 4
    assert scale["median_residual_m"] < 0.02 * _M_PER_REF_UNIT * gps_scene.extent
    # depth PNGs in real millimetres (read back in metres; the 16-bit PNG ends at 65.535 m)
    out = write_dataset(recon, tmp_path / "dataset", num_downscales=0)
    frame = json.loads((out / "transforms.json").read_text())["frames"][1]
    depth_m = read_depth_png_mm(out / frame["depth_file_path"])
    i = [p.name for p in gps_scene.paths].index(Path(frame["file_path"]).name)
    rows, cols = np.nonzero((depth_m > 0) & (depth_m < 65.0))
    pick = np.random.default_rng(0).choice(len(rows), 200, replace=False)
    uv = np.stack([cols[pick] + 0.5, rows[pick] + 0.5], -1)
    truth_m = make_scene(gps_scene.w2c).depth(gps_scene.w2c[i], gps_scene.K[i], uv) * _M_PER_REF_UNIT
    assert np.median(depth_m[rows[pick], cols[pick]] / truth_m) == pytest.approx(1.0, rel=0.01)


def test_known_distance_sets_the_scale(herz: Reference) -> None:
    recon = _pose(herz, scale_from=f"{herz.names[0]},{herz.names[2]}, 2.5")
    C = camera_centres(recon.w2c_opencv)
    assert np.linalg.norm(C[0] - C[2]) == pytest.approx(2.5, rel=1e-9)
    with pytest.raises(ValueError, match="no posed photo is named 'nope.jpg'"):
        _pose(herz, scale_from=f"{herz.names[0]},nope.jpg,2.5")
    for bad in ("gps", "a.jpg,b.jpg", "a.jpg,b.jpg,-1", "a.jpg,a.jpg,2"):
        with pytest.raises(ValueError, match="--scale-from must be exif-gps or A.jpg,B.jpg,METRES"):
            _pose(herz, scale_from=bad)
    with pytest.raises(ValueError, match="cannot be used with --poses-from"):
        PosingOptions(scale_from="exif-gps", poses_from=Path("model")).check_world_options()


# ---------------------------------------------------------------------------------------------- lens distortion


def _dots(size_wh, uv: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """A white image with black discs (anti-aliased by 4x supersampling) centred at continuous positions ``uv``."""
    w, h = int(size_wh[0]), int(size_wh[1])
    ss, r = 4, int(radius) + 2
    img = np.full((h, w), 255.0)
    for u, v in uv:
        c0, r0 = int(u) - r, int(v) - r
        yy, xx = np.mgrid[0 : 2 * r * ss, 0 : 2 * r * ss]
        x, y = c0 + (xx + 0.5) / ss, r0 + (yy + 0.5) / ss
        cover = (((x - u) ** 2 + (y - v) ** 2) < radius**2).reshape(2 * r, ss, 2 * r, ss).mean(axis=(1, 3))
        img[r0 : r0 + 2 * r, c0 : c0 + 2 * r] -= 255.0 * cover
    return np.repeat(img[..., None], 3, -1).round().astype(np.uint8)


def _centroids(img: np.ndarray, uv_guess: np.ndarray, window: int = 12) -> np.ndarray:
    dark = 255.0 - img[..., 0].astype(np.float64)
    out = []
    for u, v in uv_guess:
        c0, r0 = int(u) - window, int(v) - window
        patch = dark[r0 : r0 + 2 * window, c0 : c0 + 2 * window]
        yy, xx = np.mgrid[r0 : r0 + 2 * window, c0 : c0 + 2 * window]
        out.append([(patch * (xx + 0.5)).sum() / patch.sum(), (patch * (yy + 0.5)).sum() / patch.sum()])
    return np.asarray(out)


def test_opencv_distortion_is_undone_and_known_points_reproject(herz: Reference, tmp_path: Path) -> None:
    """A reference camera with OPENCV distortion: a photo of known points taken through it is undistorted, and the
    points reproject through the new pinhole camera within 0.5 px."""
    import cv2

    from ns_extreme.io.undistort import parse_lens, undistort_photo

    K, (w, h) = herz.K[0], herz.sizes_wh[0]
    coeffs = [-0.12, 0.05, 0.001, -0.0015]
    lens = parse_lens("OPENCV", ",".join(map(str, [K[0, 0], K[1, 1], K[0, 2], K[1, 2], *coeffs])))
    # known points: a grid of directions in the camera (pinhole pixels of the undistorted camera K)
    gu, gv = np.meshgrid(np.linspace(0.1 * w, 0.9 * w, 7), np.linspace(0.12 * h, 0.88 * h, 5))
    rays = np.stack([gu.ravel(), gv.ravel(), np.ones(gu.size)], -1) @ np.linalg.inv(K).T
    K_cv = K.copy()
    K_cv[:2, 2] -= 0.5
    distorted, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), K_cv, np.array(coeffs))
    uv_distorted = distorted.reshape(-1, 2) + 0.5
    Image.fromarray(_dots((w, h), uv_distorted)).save(tmp_path / "distorted.png")
    new_K = undistort_photo(tmp_path / "distorted.png", tmp_path / "undistorted.png", lens)
    uv_expected = rays @ new_K.T
    uv_expected = uv_expected[:, :2] / uv_expected[:, 2:]
    found = _centroids(np.asarray(Image.open(tmp_path / "undistorted.png")), uv_expected)
    errors = np.linalg.norm(found - uv_expected, axis=1)
    assert errors.max() < 0.5, errors
    # not vacuous: the distortion moved the points by pixels
    assert np.linalg.norm(uv_distorted - np.stack([gu.ravel(), gv.ravel()], -1), axis=1).max() > 10


def test_fisheye_becomes_a_pinhole_view_of_the_documented_field_of_view(herz: Reference, tmp_path: Path) -> None:
    import cv2

    from ns_extreme.io.undistort import parse_lens, undistort_photo

    (w, h), f = herz.sizes_wh[0], 300.0
    coeffs = [0.05, -0.01, 0.002, -0.0005]
    lens = parse_lens("OPENCV_FISHEYE", ",".join(map(str, [f, f, w / 2, h / 2, *coeffs])))
    gu, gv = np.meshgrid(np.linspace(-0.8, 0.8, 5), np.linspace(-0.5, 0.5, 3))  # x/z, y/z of the rays
    rays = np.stack([gu.ravel(), gv.ravel(), np.ones(gu.size)], -1)
    K_cv = np.array([[f, 0, w / 2 - 0.5], [0, f, h / 2 - 0.5], [0, 0, 1.0]])
    fish, _ = cv2.fisheye.projectPoints(rays[:, None], np.zeros(3), np.zeros(3), K_cv, np.array(coeffs))
    Image.fromarray(_dots((w, h), fish.reshape(-1, 2) + 0.5)).save(tmp_path / "fisheye.png")
    new_K = undistort_photo(tmp_path / "fisheye.png", tmp_path / "pinhole.png", lens, fisheye_fov_deg=100.0)
    assert np.degrees(2 * np.arctan(w / 2 / new_K[0, 0])) == pytest.approx(100.0)
    uv_expected = (rays @ new_K.T)[:, :2]
    found = _centroids(np.asarray(Image.open(tmp_path / "pinhole.png")), uv_expected)
    assert np.linalg.norm(found - uv_expected, axis=1).max() < 0.5


def _extreme_poses(photos: Path, out: Path, *options: str) -> dict:
    """``ns-process-data extreme-poses`` (tiny random model, no refinement) as a user runs it; its provenance."""
    import os
    import subprocess
    import sys

    cmd = [
        str(Path(sys.executable).parent / "ns-process-data"), "extreme-poses", "--data", str(photos),
        "--output-dir", str(out), "--model-size", "tiny", "--weights", "random", "--no-refine", *options,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "extreme_poses.json").read_text())


# ---------------------------------------------------------------------------------------------- the command


def test_command_with_lens_masks_and_one_downscale(herz: Reference, tmp_path: Path) -> None:
    """ns-process-data extreme-poses end to end (tiny random model): undistorted pinhole photos, masks, images_2."""

    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for p in herz.paths[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
        keep = np.full((64, 96), 255, np.uint8)
        keep[:, :48] = 0  # the left half
        Image.fromarray(keep).save(masks / f"{p.stem}.png")
    K = herz.K[0]
    params = ",".join(map(str, [K[0, 0], K[1, 1], K[0, 2], K[1, 2], -0.1, 0.02, 0.0, 0.0]))
    out = tmp_path / "dataset"
    prov = _extreme_poses(photos, out, "--masks", str(masks), "--camera-model", "OPENCV", "--camera-params", params,
                          "--num-downscales", "1")  # fmt: skip
    lens = prov["lens_distortion"]
    assert lens["model"] == "OPENCV" and lens["params"][4] == -0.1
    frames = json.loads((out / "transforms.json").read_text())["frames"]
    assert all(f["fl_x"] == pytest.approx(lens["undistorted_K"][0][0]) and f["k1"] == 0.0 for f in frames)
    for f in frames:  # the masks went through the same undistortion: still about the left half, black corners
        keep = np.asarray(Image.open(out / f["mask_path"])) > 0
        assert keep.shape == (f["h"], f["w"]) and not keep[:, : f["w"] // 2 - 20].any()
        assert keep[f["h"] // 2, f["w"] // 2 + 20 :].all()
    assert (out / "images_2").is_dir() and not (out / "images_4").exists() and (out / "sparse" / "0").is_dir()
    assert prov["world_frame"]["orientation"]["method"] in ("cameras", "ground-plane")
    # the exported photos are the undistorted ones, not byte copies of the originals
    assert (out / frames[0]["file_path"]).read_bytes() != (photos / Path(frames[0]["file_path"]).name).read_bytes()


SACRE = "hloc_sacre_coeur"  # SIMPLE_RADIAL cameras, one per photo


def test_poses_from_distortion_is_undone_with_the_models_own_lens(dev_small: Path, tmp_path: Path) -> None:
    """Sacré-Cœur's SIMPLE_RADIAL cameras: each undistorted photo samples its original exactly where pycolmap's
    own camera model puts a ray that the new pinhole camera maps to the output pixel (within 0.01 px)."""
    import pycolmap

    from ns_extreme.io.undistort import lens_from_colmap, undistort_with_known_poses, undistorted_camera

    model = dev_small / SACRE / "sparse" / "0"
    photos = sorted((dev_small / SACRE / "images").iterdir())[:2]
    paths, new_model, lenses = undistort_with_known_poses(model, photos, tmp_path)
    assert [p.parent for p in paths] == [tmp_path, tmp_path] and set(lenses) == {p.name for p in photos}
    original, rewritten = pycolmap.Reconstruction(str(model)), pycolmap.Reconstruction(str(new_model))
    for photo in photos:
        image = next(im for im in original.images.values() if im.name == photo.name)
        cam, new_cam = original.cameras[image.camera_id], rewritten.cameras[image.camera_id]
        assert cam.model.name == "SIMPLE_RADIAL" and new_cam.model.name == "PINHOLE"
        K, map_x, map_y = undistorted_camera(lens_from_colmap("SIMPLE_RADIAL", cam.params), (cam.width, cam.height))
        np.testing.assert_allclose(new_cam.calibration_matrix(), K)
        jj, ii = np.mgrid[10 : cam.height - 10 : 37, 10 : cam.width - 10 : 41]
        rays = np.stack([ii + 0.5, jj + 0.5, np.ones_like(ii)], -1).reshape(-1, 3) @ np.linalg.inv(K).T
        expected = cam.img_from_cam(np.ascontiguousarray(rays))  # COLMAP pixels (+0.5 convention)
        sampled = np.stack([map_x[jj, ii].ravel(), map_y[jj, ii].ravel()], -1) + 0.5
        assert np.abs(sampled - expected).max() < 0.01
        assert Image.open(tmp_path / photo.name).size == (cam.width, cam.height)


def test_command_poses_from_a_distorted_model(dev_small: Path, tmp_path: Path) -> None:

    import pycolmap

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((dev_small / SACRE / "images").iterdir())[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "dataset"
    prov = _extreme_poses(photos, out, "--poses-from", str(dev_small / SACRE / "sparse" / "0"), "--num-downscales", "0")
    assert not any("distortion" in w for w in prov["warnings"]), prov["warnings"]
    lenses = prov["lens_distortion"]["photos"]
    assert len(lenses) == 3 and all(v["colmap_model"] == "SIMPLE_RADIAL" for v in lenses.values())
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    for image in rec.images.values():
        np.testing.assert_allclose(image.camera.calibration_matrix(), lenses[image.name]["undistorted_K"], rtol=1e-9)


# nerfstudio's OPENCV lens, [k1, k2, k3, k4, p1, p2]: k3 (the r⁶ term) makes it COLMAP's FULL_OPENCV
NS_LENS = {"k1": -0.1, "k2": 0.02, "k3": 0.004, "k4": 0.0, "p1": 0.001, "p2": -0.0008}


def _transforms_with_lens(ref: Reference, folder: Path, lens: dict, camera_model: str = "OPENCV") -> Path:
    """A transforms.json of ``ref``'s cameras whose photos were taken through ``lens`` (global keys)."""
    from ns_extreme.io.transforms_json import write_transforms_json

    path = write_transforms_json(folder / "transforms.json", [f"images/{n}" for n in ref.names], ref.w2c, ref.K,
                                 ref.sizes_wh)  # fmt: skip
    data = json.loads(path.read_text())
    for frame in data["frames"]:  # the writer puts zero distortion on each frame; the file's lens is global
        for key in NS_LENS:
            frame.pop(key, None)
    data.update(lens, camera_model=camera_model)
    path.write_text(json.dumps(data))
    return path


def test_poses_from_transforms_json_lens_is_undone_with_nerfstudios_own_model(herz: Reference, tmp_path: Path) -> None:
    """A transforms.json with nerfstudio's OPENCV lens (k1, k2, k3, p1, p2): each undistorted photo samples its
    original exactly where nerfstudio's own distortion model puts the ray of the output pixel (within 0.01 px), and
    the rewritten transforms.json gives those frames the pinhole camera and zero distortion."""
    import torch
    from nerfstudio.cameras.camera_utils import _compute_residual_and_jacobian

    from ns_extreme.io.undistort import LensDistortion, undistort_with_known_poses, undistorted_camera
    from ns_extreme.posing.known_poses import read_known_poses

    ref = herz.subset([0, 1])
    json_path = _transforms_with_lens(ref, tmp_path / "given", NS_LENS)
    assert read_known_poses(json_path).distorted == ref.names  # before: the lens would be dropped
    (tmp_path / "out").mkdir()
    paths, new_json, lenses = undistort_with_known_poses(json_path, ref.paths, tmp_path / "out")
    assert [p.parent for p in paths] == [tmp_path / "out"] * 2 and set(lenses) == set(ref.names)
    known = read_known_poses(new_json)
    assert known.distorted == [] and known.names == ref.names
    np.testing.assert_allclose(known.w2c_opencv, ref.w2c, atol=1e-9)  # poses untouched
    dist = torch.tensor([NS_LENS[k] for k in ("k1", "k2", "k3", "k4", "p1", "p2")], dtype=torch.float64)
    for k, name in enumerate(ref.names):
        lens = lenses[name]
        assert lens["model"] == "FULL_OPENCV" and lens["nerfstudio_model"] == "OPENCV"
        (w, h), K = ref.sizes_wh[k], ref.K[k]
        new_K, map_x, map_y = undistorted_camera(LensDistortion(lens["model"], lens["params"]), (w, h))
        np.testing.assert_allclose(known.intrinsics[k], new_K, rtol=1e-12)
        np.testing.assert_allclose(lens["undistorted_K"], new_K, rtol=1e-12)
        jj, ii = np.mgrid[10 : h - 10 : 37, 10 : w - 10 : 41]
        rays = np.stack([ii + 0.5, jj + 0.5, np.ones_like(ii)], -1).reshape(-1, 3) @ np.linalg.inv(new_K).T
        x, y = (torch.from_numpy(np.ascontiguousarray(rays[:, c])) for c in (0, 1))
        zero = torch.zeros_like(x)
        xd, yd = _compute_residual_and_jacobian(x, y, zero, zero, dist)[:2]  # nerfstudio's forward distortion
        expected = np.stack([K[0, 0] * xd.numpy() + K[0, 2], K[1, 1] * yd.numpy() + K[1, 2]], -1)
        sampled = np.stack([map_x[jj, ii].ravel(), map_y[jj, ii].ravel()], -1) + 0.5
        assert np.abs(sampled - expected).max() < 0.01
        assert np.abs(expected - (np.stack([ii, jj], -1).reshape(-1, 2) + 0.5)).max() > 5  # the lens moved pixels


def test_poses_from_transforms_json_fisheye_without_coefficients_is_still_a_fisheye(
    herz: Reference, tmp_path: Path
) -> None:
    """OPENCV_FISHEYE with k1..k4 = 0 is the equidistant projection, not a pinhole: undistorted all the same."""
    from ns_extreme.io.undistort import undistort_with_known_poses
    from ns_extreme.posing.known_poses import read_known_poses

    ref = herz.subset([0])
    json_path = _transforms_with_lens(ref, tmp_path / "given", {}, camera_model="OPENCV_FISHEYE")
    assert read_known_poses(json_path).distorted == ref.names  # posing without undistortion warns about it
    (tmp_path / "out").mkdir()
    _, new_json, lenses = undistort_with_known_poses(json_path, ref.paths, tmp_path / "out", fisheye_fov_deg=100.0)
    assert lenses[ref.names[0]]["model"] == "OPENCV_FISHEYE"
    fx = read_known_poses(new_json).intrinsics[0][0, 0]
    assert np.degrees(2 * np.arctan(ref.sizes_wh[0][0] / 2 / fx)) == pytest.approx(100.0)


def test_command_poses_from_a_transforms_json_with_a_lens(herz: Reference, tmp_path: Path) -> None:
    """ns-process-data extreme-poses --poses-from transforms.json with a lens: photos undistorted, no lens warning,
    the given poses kept (relative poses exactly) with the undistorted pinhole cameras."""

    from ns_extreme.io.colmap_model import read_colmap_model

    ref = herz.subset([0, 1, 2])
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in ref.paths:
        (photos / p.name).write_bytes(p.read_bytes())
    json_path = _transforms_with_lens(ref, tmp_path / "given", NS_LENS)
    out = tmp_path / "dataset"
    prov = _extreme_poses(photos, out, "--poses-from", str(json_path), "--num-downscales", "0")
    assert not any("distortion" in w for w in prov["warnings"]), prov["warnings"]
    lenses = prov["lens_distortion"]["photos"]
    assert sorted(lenses) == ref.names and all(v["nerfstudio_model"] == "OPENCV" for v in lenses.values())
    model = read_colmap_model(out / "sparse" / "0")
    order = [model.image_names.index(n) for n in ref.names]
    for k, i in enumerate(order):
        np.testing.assert_allclose(model.K[i], lenses[ref.names[k]]["undistorted_K"], rtol=1e-9)
    np.testing.assert_allclose(_relative_poses(model.w2c_opencv[order]), _relative_poses(ref.w2c), atol=1e-6)


def _relative_poses(w2c: np.ndarray) -> np.ndarray:
    """Every camera-to-camera transform [N, N, 4, 4]: the same in any world the cameras are moved to rigidly."""
    from ns_extreme.geometry.conventions import invert_rigid, to_homogeneous

    T = to_homogeneous(w2c)
    return np.stack([np.stack([T[a] @ invert_rigid(T[b]) for b in range(len(T))]) for a in range(len(T))])


@pytest.mark.parametrize(
    "model, coefficients",
    [("FULL_OPENCV", [-0.1, 0.02, 0.001, -0.0008, 0.004, 0.01, -0.002, 0.003]), ("OPENCV_FISHEYE", [0.0] * 4)],
)
def test_colmap_lens_maps_match_pycolmaps_own_camera_model(model: str, coefficients: list[float]) -> None:
    """COLMAP's FULL_OPENCV (k1, k2, p1, p2, k3..k6: OpenCV's rational model) and a coefficient-free fisheye: each
    output pixel samples the original where pycolmap's own camera puts its ray (within 0.01 px)."""
    import pycolmap

    from ns_extreme.io.undistort import lens_from_colmap, undistorted_camera

    w, h = 640, 480
    params = [500.0, 505.0, 321.0, 239.0, *coefficients]
    cam = pycolmap.Camera(model=model, width=w, height=h, params=params)
    lens = lens_from_colmap(model, params)
    assert lens is not None and lens.model == model
    K, map_x, map_y = undistorted_camera(lens, (w, h))
    jj, ii = np.mgrid[10 : h - 10 : 23, 10 : w - 10 : 29]
    rays = np.stack([ii + 0.5, jj + 0.5, np.ones_like(ii)], -1).reshape(-1, 3) @ np.linalg.inv(K).T
    expected = cam.img_from_cam(np.ascontiguousarray(rays))
    sampled = np.stack([map_x[jj, ii].ravel(), map_y[jj, ii].ravel()], -1) + 0.5
    assert np.abs(sampled - expected).max() < 0.01
