"""Image listing, robust RGB loading and VGGT-identical preprocessing with invertible records.

Preprocessing reproduces ``vggt.utils.load_fn.load_and_preprocess_images`` (crop / pad modes, PIL
bicubic, padding with 1.0, centre-padding of mixed shapes), but also records every resize, crop and
pad so intrinsics and pixel positions map exactly between the original and the network input.

Pixel coordinates are continuous: an image spans [0, W]×[0, H] and pixel (i, j) has its centre at
(j + 0.5, i + 0.5) (COLMAP / nerfstudio convention, see ``ns_extreme.geometry.intrinsics``). Resizing by
(sx, sy) maps (x, y) ↦ (sx·x, sy·y), which is also how PIL's resize samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error
from typing import TYPE_CHECKING, Literal, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

MAX_CROP_ASPECT = 32
"""``crop`` preprocessing scales the width to the network size first, so a strip taller than this many times its
width would be resized to millions of rows before the crop (gigabytes); such images are refused (use ``pad``)."""

MAX_IMAGE_PIXELS = 250_000_000
"""Larger images are refused (``ImageReadError``) before decoding: 250 MP (e.g. 20,000 x 12,500) needs ~1 GB as
RGB. Pillow's own decompression-bomb limit (~179 MP) is lifted up to this, so 200 MP phone photos load."""

PreprocessMode = Literal["crop", "pad"]
ImageSource = Union[str, "os.PathLike[str]", np.ndarray, Image.Image]


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# ---------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ImageListing:
    """Images of a folder (sorted by name) and the non-image files that were skipped."""

    images: tuple[Path, ...]
    skipped: tuple[Path, ...]


def scan_images(folder: str | os.PathLike[str]) -> ImageListing:
    """Image files directly in ``folder`` (extensions case-insensitive, hidden files and sub-folders ignored)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except PermissionError as e:
        raise PermissionError(f"image folder is not readable: {folder} ({e.strerror})") from e
    images: list[Path] = []
    skipped: list[Path] = []
    for p in entries:
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(p)
    return ImageListing(tuple(images), tuple(skipped))


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Sorted image paths of ``folder``; use ``scan_images`` to also get the skipped files."""
    return list(scan_images(folder).images)


# ---------------------------------------------------------------------------------------------- loading


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_to_rgb(gray_u8: np.ndarray) -> np.ndarray:
    return np.repeat(gray_u8[..., None], 3, axis=-1)


def _scale_to_u8(values: np.ndarray, full_scale: float) -> np.ndarray:
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=full_scale, neginf=0.0)
    return np.round(np.clip(v, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


def _pil_to_rgb_u8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB uint8; alpha composited on white, 16-bit scaled by 0..65535."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        return np.asarray(_composite_on_white(img), dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (PNG/TIFF): scale the full 0..65535 range, do not clip at 255.
        return _gray_to_rgb(_scale_to_u8(np.asarray(img), 65535.0))
    if mode == "F":
        # Float images carry no range; assume [0, 1], else 8-bit, else 16-bit, by their maximum.
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        peak = float(finite.max()) if finite.size else 0.0
        full = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        return _gray_to_rgb(_scale_to_u8(arr, full))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Translate whatever Pillow / the OS raise while reading ``path`` into ``ImageReadError`` naming it."""
    try:
        yield
    except ImageReadError:
        raise
    except FileNotFoundError as e:
        raise ImageReadError(path, "file not found") from e
    except PermissionError as e:
        raise ImageReadError(path, "permission denied (make the file readable, or remove it)") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(path, "not a recognised image format (corrupt or not an image)") from e
    except MemoryError as e:
        raise ImageReadError(path, "out of memory while decoding (image too large?)") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct_error) as e:
        # Pillow reports truncated/corrupt data with assorted exception types.
        raise ImageReadError(path, f"corrupt or truncated image data ({type(e).__name__}: {e})") from e


def _open_image(path: Path) -> Image.Image:
    """``Image.open`` (header only) with our pixel limit instead of Pillow's; the caller closes the image."""
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not a file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    with _PIL_LIMIT_LOCK:  # Pillow checks its global limit in open(); swap it for ours just there
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageReadError(path, f"image has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageReadError(
            path,
            f"image too large ({w}x{h} = {w * h / 1e6:.0f} MP, limit "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP); downscale it first",
        )
    return img


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) from the file header (before EXIF rotation) without decoding the pixels.

    Raises ``ImageReadError`` for missing, empty, unreadable, unrecognised or too large files. Truncated pixel
    data is only found by decoding (``load_rgb``).
    """
    path = Path(path)
    with _read_errors(path):
        with _open_image(path) as img:
            return img.size


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as RGB uint8 [H, W, 3] with its EXIF orientation applied.

    Raises ``ImageReadError`` naming the file for missing, empty, truncated, corrupt, too large or unsupported files.
    """
    path = Path(path)
    with _read_errors(path):
        with _open_image(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _pil_to_rgb_u8(upright if upright is not None else img)


# ---------------------------------------------------------------------------------------------- screening


@dataclass(frozen=True)
class SkippedImage:
    """An image file left out of posing, and why (one line, for warnings and extreme_poses.json)."""

    path: Path
    reason: str

    def describe(self) -> str:
        return f"{self.path.name}: {self.reason}"


@dataclass(frozen=True)
class ImageScreen:
    """``screen_images`` result: the images to pose (input order) and the ones left out."""

    usable: tuple[Path, ...]
    skipped: tuple[SkippedImage, ...]


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def screen_images(paths: Sequence[str | os.PathLike[str]], dedupe: bool = True) -> ImageScreen:
    """Leave out files that cannot be posed, without decoding any pixels (fast; the documented fallback).

    Skipped: missing, empty (0 bytes), unreadable (permissions), unrecognised / corrupt headers, images above
    ``MAX_IMAGE_PIXELS``, and (``dedupe``) byte-identical copies of an earlier file (the first is kept). Only
    files whose size equals another's are hashed. Truncated pixel data is found later, while decoding
    (``preprocess_images(..., on_error="skip")``).
    """
    usable: list[Path] = []
    skipped: list[SkippedImage] = []
    for p in (Path(p) for p in paths):
        try:
            probe_image(p)
        except ImageReadError as e:
            skipped.append(SkippedImage(p, e.reason))
            continue
        usable.append(p)
    if dedupe and len(usable) > 1:
        by_size: dict[int, list[Path]] = {}
        for p in usable:
            by_size.setdefault(p.stat().st_size, []).append(p)
        first_of: dict[str, Path] = {}
        copies: dict[Path, Path] = {}
        for group in by_size.values():
            if len(group) < 2:
                continue
            for p in group:
                try:
                    digest = _file_digest(p)
                except OSError:
                    continue  # reported when it is loaded
                if digest in first_of:
                    copies[p] = first_of[digest]
                else:
                    first_of[digest] = p
        if copies:
            skipped += [SkippedImage(p, f"duplicate of {copies[p].name} (same bytes)") for p in usable if p in copies]
            usable = [p for p in usable if p not in copies]
    return ImageScreen(tuple(usable), tuple(skipped))


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PreprocessRecord:
    """How one image became a network input: resize → crop → pad (all sizes as (H, W), offsets as (x, y))."""

    original_hw: tuple[int, int]  # after EXIF transpose
    resized_hw: tuple[int, int]
    crop_offset_xy: tuple[int, int]  # pixels removed at the left / top of the resized image
    content_hw: tuple[int, int]  # real pixels kept after the crop
    pad_offset_xy: tuple[int, int]  # padding added at the left / top (mode padding + batch padding)
    final_hw: tuple[int, int]
    mode: str = "crop"

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(resized_w / original_w, resized_h / original_h); differ slightly because of the rounding to 14."""
        return (self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0])

    @property
    def shift_xy(self) -> tuple[int, int]:
        """Offset added after scaling: pad − crop."""
        return (
            self.pad_offset_xy[0] - self.crop_offset_xy[0],
            self.pad_offset_xy[1] - self.crop_offset_xy[1],
        )

    def _affine_to_preprocessed(self) -> np.ndarray:
        sx, sy = self.scale_xy
        tx, ty = self.shift_xy
        return np.array([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]])

    def _affine_to_original(self) -> np.ndarray:
        sx, sy = self.scale_xy
        tx, ty = self.shift_xy
        return np.array([[1.0 / sx, 0.0, -tx / sx], [0.0, 1.0 / sy, -ty / sy], [0.0, 0.0, 1.0]])

    def intrinsics_to_preprocessed(self, K_orig: np.ndarray) -> np.ndarray:
        """K [..., 3, 3] of the original image → K of the preprocessed image."""
        return self._affine_to_preprocessed() @ np.asarray(K_orig, dtype=np.float64)

    def intrinsics_to_original(self, K_pre: np.ndarray) -> np.ndarray:
        """K [..., 3, 3] of the preprocessed image → K of the original image."""
        return self._affine_to_original() @ np.asarray(K_pre, dtype=np.float64)

    def points_to_preprocessed(self, uv_orig: np.ndarray) -> np.ndarray:
        """Continuous pixel positions [..., 2] in the original image → preprocessed image."""
        uv = np.asarray(uv_orig, dtype=np.float64)
        return uv * np.array(self.scale_xy) + np.array(self.shift_xy, dtype=np.float64)

    def points_to_original(self, uv_pre: np.ndarray) -> np.ndarray:
        """Continuous pixel positions [..., 2] in the preprocessed image → original image."""
        uv = np.asarray(uv_pre, dtype=np.float64)
        return (uv - np.array(self.shift_xy, dtype=np.float64)) / np.array(self.scale_xy)

    def valid_region_preprocessed(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), half-open, of the final image covered by real pixels (not padding)."""
        x0, y0 = self.pad_offset_xy
        return (x0, y0, x0 + self.content_hw[1], y0 + self.content_hw[0])

    def valid_mask_preprocessed(self) -> np.ndarray:
        """Boolean [H, W] mask of the final image, True on real pixels."""
        mask = np.zeros(self.final_hw, dtype=bool)
        x0, y0, x1, y1 = self.valid_region_preprocessed()
        mask[y0:y1, x0:x1] = True
        return mask


@dataclass(frozen=True)
class PreprocessedBatch:
    """Network input [N, 3, H, W] float32 in [0, 1], one record per image, and the source paths (None for arrays).

    ``skipped``: files left out because they could not be read (only with ``on_error="skip"``).
    """

    images: torch.Tensor
    records: list[PreprocessRecord]
    paths: list[Path | None]
    skipped: list[SkippedImage] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- preprocessing


def resized_size(
    original_hw: tuple[int, int], mode: PreprocessMode = "crop", target_size: int = 518, patch_size: int = 14
) -> tuple[int, int]:
    """(H, W) after VGGT's resize step, before crop/pad (Python ``round``, as in the reference)."""
    h, w = original_hw
    if mode == "pad" and h > w:
        new_h = target_size
        new_w = round(w * (new_h / h) / patch_size) * patch_size
    else:  # crop mode, or pad mode with a landscape/square image
        new_w = target_size
        new_h = round(h * (new_w / w) / patch_size) * patch_size
    # Only extreme aspect ratios (> 2·target/patch : 1) round to 0, which VGGT would crash on.
    return max(new_h, patch_size), max(new_w, patch_size)


def _source_to_rgb(source: ImageSource) -> tuple[np.ndarray, Path | None]:
    if isinstance(source, Image.Image):
        return _pil_to_rgb_u8(source), None
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))):
            raise ValueError(
                f"image arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4], got {source.dtype} {source.shape}"
            )
        return _pil_to_rgb_u8(Image.fromarray(source)), None
    path = Path(source)
    return load_rgb(path), path


def preprocess_images(
    sources: Sequence[ImageSource],
    mode: PreprocessMode = "crop",
    target_size: int = 518,
    patch_size: int = 14,
    on_error: Literal["raise", "skip"] = "raise",
) -> PreprocessedBatch:
    """Load (paths) or take (uint8 arrays / PIL images) images and preprocess them exactly like VGGT.

    crop: width → target, height → round(h·target/w/patch)·patch, bicubic, centre-crop rows to target.
    pad: longer side → target, other rounded to the patch size, centre-pad to target² with 1.0.
    Mixed output shapes are centre-padded with 1.0 to the largest H and W.
    ``on_error="skip"``: files that cannot be read are left out and listed in ``skipped`` (``ImageReadError``
    only if none can be read); ``"raise"``: the first unreadable file raises ``ImageReadError``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if target_size <= 0 or patch_size <= 0 or target_size % patch_size:
        raise ValueError(f"target_size ({target_size}) must be a positive multiple of patch_size ({patch_size})")
    if len(sources) == 0:
        raise ValueError("preprocess_images needs at least one image")
    import torch  # here, not at the top: scanning and reading images must not wait for torch to load

    tensors: list[torch.Tensor] = []
    partial: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]] = []
    paths: list[Path | None] = []
    skipped: list[SkippedImage] = []
    for source in sources:
        try:
            rgb, path = _source_to_rgb(source)
        except ImageReadError as e:
            if on_error == "raise":
                raise
            skipped.append(SkippedImage(e.path, e.reason))
            continue
        orig_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        if mode == "crop" and orig_hw[0] > MAX_CROP_ASPECT * orig_hw[1]:
            reason = (
                f"too tall for --preprocess crop ({orig_hw[1]}x{orig_hw[0]}, height > {MAX_CROP_ASPECT}x width); "
                "use --preprocess pad, or crop the image"
            )
            if path is None:
                raise ValueError(f"image array {orig_hw[1]}x{orig_hw[0]}: {reason}")
            if on_error == "raise":
                raise ImageReadError(path, reason)
            skipped.append(SkippedImage(path, reason))
            continue
        new_h, new_w = resized_size(orig_hw, mode, target_size, patch_size)
        resized = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC)
        img = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
        crop_top = 0
        if mode == "crop" and new_h > target_size:
            crop_top = (new_h - target_size) // 2
            img = img[:, crop_top : crop_top + target_size, :]
        content_hw = (int(img.shape[1]), int(img.shape[2]))
        tensors.append(img)
        partial.append((orig_hw, (new_h, new_w), (0, crop_top), content_hw))
        paths.append(path)
        del rgb, resized  # keep one decoded original in memory at a time (large photos)
    if not tensors:
        first = skipped[0]
        raise ImageReadError(
            first.path, f"{first.reason} (and none of the other {len(skipped) - 1} image(s) could be read either)"
        )

    if mode == "pad":
        max_h = max_w = target_size
    else:
        max_h = max(t.shape[1] for t in tensors)
        max_w = max(t.shape[2] for t in tensors)
    out = torch.ones((len(tensors), 3, max_h, max_w), dtype=torch.float32)
    records: list[PreprocessRecord] = []
    for i, (img, (orig_hw, res_hw, crop_xy, content_hw)) in enumerate(zip(tensors, partial)):
        # Padding to the square (pad mode) and to the batch maximum compose to one centring offset.
        top = (max_h - content_hw[0]) // 2
        left = (max_w - content_hw[1]) // 2
        out[i, :, top : top + content_hw[0], left : left + content_hw[1]] = img
        records.append(
            PreprocessRecord(
                original_hw=orig_hw,
                resized_hw=res_hw,
                crop_offset_xy=crop_xy,
                content_hw=content_hw,
                pad_offset_xy=(left, top),
                final_hw=(max_h, max_w),
                mode=mode,
            )
        )
    return PreprocessedBatch(images=out, records=records, paths=paths, skipped=skipped)
