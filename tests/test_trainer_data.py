"""Datasets other trainers open as they are: drop-in layout (sparse/0, images_N, EXIF), masks, a level world, real
scale, lens distortion.

The ground-truth test backbone (``posing_helpers``) poses real dev_small photos, so every exported quantity is known:
the analytic scene gives exact depths and points, the reference cameras the poses.
"""

from __future__ import annotations

import json
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
