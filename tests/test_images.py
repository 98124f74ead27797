"""Image listing, loading of awkward files, and VGGT-identical preprocessing with exact coordinate records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image, ImageFile

from ns_extreme.geometry import project_points, unproject_depth
from ns_extreme.io.images import (
    ImageReadError,
    PreprocessedBatch,
    PreprocessRecord,
    list_images,
    load_rgb,
    preprocess_images,
    resized_size,
    scan_images,
)

STRECHA = "strecha_fountain-P11"
SACRE = "hloc_sacre_coeur"


def _vggt_size(h: int, w: int, mode: str, target: int = 518, patch: int = 14) -> tuple[int, int]:
    """VGGT's resize rule, written out independently of the module under test."""
    if mode == "pad" and h > w:
        return target, int(round(w * (target / h) / patch)) * patch
    return int(round(h * (target / w) / patch)) * patch, target


def _scene_cameras(scene_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """name → (w2c [3,4], pinhole K [3,3], (H, W)); SIMPLE_RADIAL distortion ignored."""
    rec = pycolmap.Reconstruction(str(scene_dir / "sparse" / "0"))
    out = {}
    for image in rec.images.values():
        cam = rec.cameras[image.camera_id]
        out[image.name] = (
            np.asarray(image.cam_from_world().matrix()),
            np.asarray(cam.calibration_matrix()),
            (int(cam.height), int(cam.width)),
        )
    return out


# ------------------------------------------------------------------------------------------ listing


def test_list_images_sorts_filters_and_reports_skipped(tmp_path: Path) -> None:
    for name in [
        "b.PNG",
        "a.jpg",
        "c.JpEg",
        "d.webp",
        "e.bmp",
        "f.tif",
        "g.TIFF",
        "notes.txt",
        "model.ply",
        ".hidden.jpg",
    ]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    listing = scan_images(tmp_path)
    assert [p.name for p in listing.images] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp", "f.tif", "g.TIFF"]
    assert [p.name for p in listing.skipped] == ["model.ply", "notes.txt"]
    assert list_images(tmp_path) == list(listing.images)
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "notes.txt")


def test_list_images_real_scene(dev_small: Path) -> None:
    images = list_images(dev_small / STRECHA / "images")
    assert [p.name for p in images] == [f"{i:04d}.jpg" for i in range(11)]


# ------------------------------------------------------------------------------------------ loading


def _save_with_orientation(path: Path, img: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # stored 40 wide × 20 high: top half red, bottom half blue
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:10] = (255, 0, 0)
    arr[10:] = (0, 0, 255)
    path = tmp_path / "rotated.jpg"
    _save_with_orientation(path, Image.fromarray(arr), 6)
    rgb = load_rgb(path)
    # orientation 6 = rotate 90° clockwise for display: the stored top ends up on the right
    assert rgb.shape == (40, 20, 3) and rgb.dtype == np.uint8
    right, left = rgb[5:35, 13:18].reshape(-1, 3).mean(0), rgb[5:35, 2:7].reshape(-1, 3).mean(0)
    assert right[0] > 200 and right[2] < 50, right
    assert left[2] > 200 and left[0] < 50, left


def test_exif_orientation_changes_preprocessed_shape(tmp_path: Path) -> None:
    path = tmp_path / "portrait.jpg"
    _save_with_orientation(path, Image.new("RGB", (64, 48), (10, 20, 30)), 6)
    batch = preprocess_images([path], target_size=56, patch_size=14)
    rec = batch.records[0]
    assert rec.original_hw == (64, 48)  # after transpose: portrait
    assert rec.resized_hw == _vggt_size(64, 48, "crop", 56) == (70, 56)
    assert tuple(batch.images.shape) == (1, 3, 56, 56) and rec.crop_offset_xy == (0, 7)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black → white
    arr[0, 1] = (200, 10, 20, 255)  # opaque → unchanged
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black → mid grey
    path = tmp_path / "alpha.png"
    Image.fromarray(arr, "RGBA").save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 1], [200, 10, 20])
    assert np.all(np.abs(rgb[0, 2].astype(int) - 127) <= 1)
    # LA (grey + alpha) too
    la = np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgb_la = load_rgb(tmp_path / "la.png")
    np.testing.assert_array_equal(rgb_la[:, :, 0], [[255, 50], [50, 255]])


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32768, 65535, 300]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_rgb(path)
    expected = np.array([[0, 1, 4, 128, 255, 1]], dtype=np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)
    # 32-bit integer ("I") images are read on the same 16-bit scale
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "deep32.tif")
    assert Image.open(tmp_path / "deep32.tif").mode == "I"
    np.testing.assert_array_equal(load_rgb(tmp_path / "deep32.tif")[..., 1], expected)


def test_float_tiff_in_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "float.tif")[..., 0], [[0, 128, 255, 0]])


def test_palette_grayscale_and_cmyk(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 2, 1, 0])
    pal.save(tmp_path / "pal.png")
    rgb = load_rgb(tmp_path / "pal.png")
    np.testing.assert_array_equal(rgb[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])

    pal.info["transparency"] = 1  # green index transparent → white
    pal.save(tmp_path / "pal_t.png", transparency=1)
    np.testing.assert_array_equal(load_rgb(tmp_path / "pal_t.png")[0, 1], [255, 255, 255])

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgb = load_rgb(tmp_path / "gray.png")
    assert rgb.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)

    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure cyan
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb = load_rgb(tmp_path / "cmyk.jpg")
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb.reshape(-1, 3).mean(0) - [0, 255, 255]).max() < 8


@pytest.mark.parametrize("kind", ["truncated", "empty", "not_an_image", "missing", "folder"])
def test_bad_files_raise_image_read_error(tmp_path: Path, dev_small: Path, kind: str) -> None:
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "truncated":
        data = (dev_small / STRECHA / "images" / "0000.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("this is a text file, not a JPEG\n")
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert path.name in str(info.value) and info.value.path == path
    assert isinstance(info.value, ValueError)
    # one line, says what is wrong
    assert "\n" not in str(info.value) and len(info.value.reason) > 5
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_preprocess_names_the_bad_file(tmp_path: Path, dev_small: Path) -> None:
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    with pytest.raises(ImageReadError, match="zero.png"):
        preprocess_images([dev_small / STRECHA / "images" / "0000.jpg", bad])


# ------------------------------------------------------------------------------------------ preprocessing


def test_resize_rule_numbers() -> None:
    # 768×512 (3:2): 512·518/768 = 345.33 → /14 = 24.67 → 25·14 = 350
    assert _vggt_size(512, 768, "crop") == (350, 518)
    assert resized_size((512, 768), "crop") == (350, 518)
    assert resized_size((512, 768), "pad") == (350, 518)
    assert resized_size((3, 4), "crop") == (392, 518)  # 4:3 → 518×392
    assert resized_size((9, 16), "crop") == (294, 518)  # 16:9 → 518×294
    assert resized_size((640, 470), "crop") == (700, 518)
    assert resized_size((640, 470), "pad") == (518, 378)
    assert resized_size((512, 768), "crop", 56, 14) == (42, 56)
    assert resized_size((1, 5000), "crop") == (14, 518)  # would round to 0


def test_crop_and_pad_shapes_strecha(dev_small: Path) -> None:
    paths = list_images(dev_small / STRECHA / "images")[:3]
    crop = preprocess_images(paths, mode="crop")
    assert tuple(crop.images.shape) == (3, 3, 350, 518) and crop.images.dtype == torch.float32
    assert crop.paths == paths
    rec = crop.records[0]
    assert rec == PreprocessRecord((512, 768), (350, 518), (0, 0), (350, 518), (0, 0), (350, 518), "crop")
    assert rec.valid_region_preprocessed() == (0, 0, 518, 350)

    pad = preprocess_images(paths, mode="pad")
    assert tuple(pad.images.shape) == (3, 3, 518, 518)
    rec = pad.records[0]
    top = (518 - 350) // 2
    assert rec.pad_offset_xy == (0, top) == (0, 84) and rec.final_hw == (518, 518)
    assert rec.valid_region_preprocessed() == (0, 84, 518, 434)
    mask = torch.from_numpy(rec.valid_mask_preprocessed())
    assert int(mask.sum()) == 350 * 518
    assert torch.all(pad.images[0][:, ~mask] == 1.0)
    assert torch.equal(pad.images[:, :, 84:434, :], crop.images)


def test_crop_matches_direct_pil_bicubic(dev_small: Path) -> None:
    path = dev_small / STRECHA / "images" / "0005.jpg"
    batch = preprocess_images([path])
    ref = Image.open(path).convert("RGB").resize((518, 350), Image.Resampling.BICUBIC)
    ref_t = torch.from_numpy(np.asarray(ref).astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)
    assert torch.equal(batch.images[0], ref_t)
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0


@pytest.fixture(scope="module")
def sacre_batches(dev_small: Path) -> dict[str, PreprocessedBatch]:
    paths = list_images(dev_small / SACRE / "images")
    return {mode: preprocess_images(paths, mode=mode) for mode in ("crop", "pad")}


def test_mixed_sizes_sacre_coeur(dev_small: Path, sacre_batches: dict[str, PreprocessedBatch]) -> None:
    paths = list_images(dev_small / SACRE / "images")
    cams = _scene_cameras(dev_small / SACRE)
    sizes = {p.name: cams[p.name][2] for p in paths}
    assert (
        len(set(sizes.values())) > 3 and any(h > w for h, w in sizes.values()) and any(w > h for h, w in sizes.values())
    )

    for mode in ("crop", "pad"):
        batch = sacre_batches[mode]
        assert batch.paths == paths
        assert tuple(batch.images.shape) == (len(paths), 3, 518, 518)  # a portrait image fills 518 rows
        for p, rec, img in zip(paths, batch.records, batch.images):
            h, w = sizes[p.name]
            assert rec.original_hw == (h, w)
            rh, rw = _vggt_size(h, w, mode)
            assert rec.resized_hw == (rh, rw)
            ch = min(rh, 518) if mode == "crop" else rh
            crop_top = (rh - 518) // 2 if mode == "crop" and rh > 518 else 0
            assert rec.crop_offset_xy == (0, crop_top)
            assert rec.content_hw == (ch, rw)
            assert rec.pad_offset_xy == ((518 - rw) // 2, (518 - ch) // 2)
            x0, y0, x1, y1 = rec.valid_region_preprocessed()
            outside = torch.ones(518, 518, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.all(img[:, outside] == 1.0)
            assert float(img[:, y0:y1, x0:x1].mean()) < 0.95  # real photo content, not padding


def test_intrinsics_and_projection_round_trip_sacre_coeur(
    dev_small: Path, sacre_batches: dict[str, PreprocessedBatch]
) -> None:
    paths = list_images(dev_small / SACRE / "images")
    cams = _scene_cameras(dev_small / SACRE)
    rng = np.random.default_rng(0)
    for mode in ("crop", "pad"):
        batch = sacre_batches[mode]
        for p, rec in zip(paths, batch.records):
            w2c, K, (h, w) = cams[p.name]
            K_pre = rec.intrinsics_to_preprocessed(K)
            np.testing.assert_allclose(rec.intrinsics_to_original(K_pre), K, rtol=1e-12, atol=1e-9)
            # these cameras have their principal point at the image centre; so must the network input
            Hf, Wf = rec.final_hw
            assert abs(K_pre[0, 2] - Wf / 2) <= 0.5 and abs(K_pre[1, 2] - Hf / 2) <= 0.5
            # 3D points seen at random pixels of the original image, 2-8 units in front of the camera
            depth = rng.uniform(2.0, 8.0, size=(h // 16, w // 16))
            pts = unproject_depth(depth, K / np.array([[16.0], [16.0], [1.0]]), w2c).reshape(-1, 3)
            uv_orig, z = project_points(pts, w2c, K)
            uv_pre, z_pre = project_points(pts, w2c, K_pre)
            np.testing.assert_allclose(z_pre, z)
            back = rec.points_to_original(uv_pre)
            assert np.abs(back - uv_orig).max() < 0.5
            np.testing.assert_allclose(back, uv_orig, atol=1e-9)
            np.testing.assert_allclose(rec.points_to_preprocessed(uv_orig), uv_pre, atol=1e-9)
            # points the crop removed project outside the valid region, kept ones inside
            x0, y0, x1, y1 = rec.valid_region_preprocessed()
            inside = (uv_pre[:, 0] >= x0) & (uv_pre[:, 0] <= x1) & (uv_pre[:, 1] >= y0) & (uv_pre[:, 1] <= y1)
            if mode == "pad" or rec.crop_offset_xy == (0, 0):
                assert inside.all()
            else:
                assert 0 < inside.sum() < len(inside)


def _blob_centroid(img: torch.Tensor, x: float, y: float, background: float, radius: int = 10) -> np.ndarray:
    """Background-subtracted, intensity-weighted centroid (continuous coordinates) of the blob near (x, y)."""
    a = img[0].numpy().astype(np.float64) - background
    i0, j0 = int(y), int(x)
    win = a[i0 - radius : i0 + radius + 1, j0 - radius : j0 + radius + 1]
    ii, jj = np.mgrid[i0 - radius : i0 + radius + 1, j0 - radius : j0 + radius + 1]
    return np.array([(win * (jj + 0.5)).sum() / win.sum(), (win * (ii + 0.5)).sum() / win.sum()])


@pytest.mark.parametrize(
    ("hw", "mode"), [((512, 768), "crop"), ((640, 470), "crop"), ((640, 470), "pad"), ((412, 640), "pad")]
)
def test_record_maps_where_pil_puts_the_pixels(hw: tuple[int, int], mode: str) -> None:
    # Gaussian blobs (σ = 2 px, no clipping) centred on pixels (row cy, col cx), i.e. at (cx + 0.5, cy + 0.5).
    # Checks the +0.5 convention against PIL's actual resampling: measured error < 0.01 px, while a
    # pixel-index convention (x_pre = s·x_idx) is off by 0.05-0.17 px on these sizes.
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    centres = [(301, 201), (100, h - 150), (w - 60, 320)]
    blobs = sum(np.exp(-((xx - cx - 0.5) ** 2 + (yy - cy - 0.5) ** 2) / (2 * 2.0**2)) for cx, cy in centres)
    arr = np.repeat(np.round(20 + 200 * blobs).astype(np.uint8)[..., None], 3, axis=-1)
    batch = preprocess_images([arr], mode=mode)
    rec = batch.records[0]
    assert batch.paths == [None]
    for cx, cy in centres:
        expected = rec.points_to_preprocessed(np.array([cx + 0.5, cy + 0.5]))
        got = _blob_centroid(batch.images[0], *expected, background=20 / 255)
        np.testing.assert_allclose(got, expected, atol=0.02)
