"""Per-photo masks: which pixels belong to the scene (nerfstudio's convention: 0 = ignore, 255 = keep).

Masks come from ``--masks DIR`` (one image per photo, matched by file stem, any size: resized to the photo with
nearest-neighbour sampling) or, without it, from the alpha channel of RGBA / LA / transparent-palette photos. Arrays
are boolean [H, W] at the photo's upright (EXIF-applied) size, True = keep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from ns_extreme.io.images import IMAGE_EXTENSIONS, ImageReadError, PreprocessRecord, _open_image, _read_errors

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_files_by_stem(mask_dir: str | os.PathLike[str], image_paths: Sequence[Path]) -> list[Path]:
    """The mask file of each photo in ``mask_dir`` (same stem, any image extension, case-insensitive).

    Raises ValueError naming the photos without a mask, or with more than one candidate."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"--masks: folder not found: {mask_dir}")
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(mask_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(p.stem.casefold(), []).append(p)
    missing = [p.name for p in image_paths if p.stem.casefold() not in by_stem]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"--masks {mask_dir}: no mask for {len(missing)} photo(s): {shown} (masks are matched by file stem, "
            "e.g. IMG_01.jpg <-> IMG_01.png; 0 = ignore, 255 = keep)"
        )
    ambiguous = [p.name for p in image_paths if len(by_stem[p.stem.casefold()]) > 1]
    if ambiguous:
        raise ValueError(f"--masks {mask_dir}: more than one mask file for {', '.join(ambiguous[:5])}")
    return [by_stem[p.stem.casefold()][0] for p in image_paths]


def load_mask(path: str | os.PathLike[str], size_wh: Sequence[int]) -> np.ndarray:
    """A mask image as bool [H, W] at ``size_wh`` (True where the value is >= 128; alpha used if present)."""
    path = Path(path)
    with _read_errors(path):
        with _open_image(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            grey = img.getchannel("A") if img.mode in _ALPHA_MODES else img.convert("L")
            size = (int(size_wh[0]), int(size_wh[1]))
            if grey.size != size:
                grey = grey.resize(size, Image.Resampling.NEAREST)
            return np.asarray(grey) >= 128


def alpha_mask(path: str | os.PathLike[str]) -> Optional[np.ndarray]:
    """The alpha channel of a photo as bool [H, W] (upright; True = opaque), None when it has no transparency."""
    path = Path(path)
    with _read_errors(path):
        with _open_image(path) as img:
            has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
            if not has_alpha:
                return None
            img.load()
            upright = ImageOps.exif_transpose(img) or img
            return np.asarray(upright.convert("RGBA").getchannel("A")) >= 128


def photo_masks(
    image_paths: Sequence[Path], sizes_wh: np.ndarray, mask_dir: Optional[str | os.PathLike[str]] = None
) -> Optional[list[np.ndarray]]:
    """Masks of all photos (from ``mask_dir``, else their alpha channels; all-True where a photo has none), or None
    when no photo has one."""
    if mask_dir is not None:
        files = mask_files_by_stem(mask_dir, image_paths)
        return [load_mask(f, sizes_wh[i]) for i, f in enumerate(files)]
    alphas = [alpha_mask(p) for p in image_paths]
    if all(a is None for a in alphas):
        return None
    for i, a in enumerate(alphas):
        if a is not None and a.shape != (sizes_wh[i][1], sizes_wh[i][0]):
            raise ImageReadError(image_paths[i], f"alpha channel size {a.shape[::-1]} differs from the photo's")
    return [a if a is not None else np.ones((h, w), bool) for a, (w, h) in zip(alphas, sizes_wh)]


def kept_pixels_preprocessed(records: Sequence[PreprocessRecord], masks: Optional[Sequence[np.ndarray]]) -> np.ndarray:
    """[N, H, W] bool at the network's resolution: real (unpadded) pixels that the photo masks keep."""
    valid = np.stack([r.valid_mask_preprocessed() for r in records])
    if masks is not None:
        valid &= np.stack([mask_to_preprocessed(m, r) for m, r in zip(masks, records)])
    return valid


def mask_to_preprocessed(mask: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Nearest-neighbour sample of an original-resolution mask at the preprocessed pixel centres (False outside)."""
    H, W = record.final_hw
    oh, ow = mask.shape
    u = record.points_to_original(np.stack([np.arange(W) + 0.5, np.full(W, 0.5)], axis=-1))[:, 0]
    v = record.points_to_original(np.stack([np.full(H, 0.5), np.arange(H) + 0.5], axis=-1))[:, 1]
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    cols_in, rows_in = (col >= 0) & (col < ow), (row >= 0) & (row < oh)
    out = np.zeros((H, W), dtype=bool)
    out[np.ix_(rows_in, cols_in)] = mask[np.ix_(row[rows_in], col[cols_in])]
    return out


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """A single-channel PNG: 255 = keep, 0 = ignore (what nerfstudio's ``mask_path`` expects)."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)
