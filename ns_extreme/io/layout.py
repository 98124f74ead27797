"""The drop-in parts of the dataset layout that other trainers look for.

- ``sparse/0``: the COLMAP model again, where gsplat's ``simple_trainer.py --data_dir``, the original 3DGS
  ``train.py -s`` and Brush look (nerfstudio's ``colmap`` parser reads ``colmap/sparse/0``).
- ``images_2``, ``images_4``, ``images_8``: downscaled copies named like ``images/``, as nerfstudio's
  ``ns-process-data`` writes them (ffmpeg ``scale=iw/N:ih/N``: sizes rounded down), which nerfstudio's parsers
  (``--downscale-factor N``) and gsplat (``--data_factor N``) read.
- EXIF: re-encoded photos and the downscaled copies carry the original's EXIF block (exposure, camera, GPS) with
  the orientation tag reset to 1 (the pixels are upright already).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

EXIF_ORIENTATION = 0x0112


def upright_exif(img: Image.Image) -> Optional[Image.Exif]:
    """``img``'s EXIF with the orientation tag set to 1 (None when the file has none)."""
    exif = img.getexif()
    if not len(exif):
        return None
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1
    return exif


def save_with_exif(rgb: Image.Image, dst: Path, exif: Optional[Image.Exif], quality: int = 95) -> None:
    """Save ``rgb`` as ``dst`` (format by suffix) with ``exif`` attached where the format supports it."""
    kwargs = {"exif": exif} if exif is not None else {}
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = quality
    rgb.save(dst, **kwargs)


def downscaled_size(size_wh: Sequence[int], factor: int) -> tuple[int, int]:
    """(W, H) of the copy downscaled by ``factor``: ffmpeg's ``iw/N:ih/N``, rounded down, at least 1 pixel."""
    return max(1, int(size_wh[0]) // factor), max(1, int(size_wh[1]) // factor)


def downscale_factors(num_downscales: int) -> list[int]:
    """2, 4, ... 2**num_downscales (nerfstudio's ``--num-downscales``)."""
    return [2**k for k in range(1, num_downscales + 1)]


def write_downscaled_images(root: Path, image_files: Sequence[str], num_downscales: int) -> list[int]:
    """Write ``root/images_N/<name>`` for every ``root/images/<name>`` in ``image_files`` (``images/<name>``) and
    every factor N; returns the factors. The exported photos are upright, so their pixels are used as stored."""
    factors = downscale_factors(num_downscales)
    for factor in factors:
        (root / f"images_{factor}").mkdir()
    for rel in image_files:
        src = root / rel
        with Image.open(src) as img:
            img.load()
            exif = upright_exif(img)
            rgb = img.convert("RGB") if img.mode not in ("RGB", "L") else img
            for factor in factors:
                small = rgb.resize(downscaled_size(rgb.size, factor), Image.Resampling.LANCZOS)
                save_with_exif(small, root / f"images_{factor}" / Path(rel).name, exif)
    return factors


def reencode_with_exif(src: Path, rgb: Image.Image, dst: Path) -> None:
    """Save the decoded, upright ``rgb`` of ``src`` as ``dst`` with ``src``'s EXIF carried over."""
    with Image.open(src) as img:
        exif = upright_exif(img)
    save_with_exif(rgb, dst, exif)


def copy_colmap_model(model_dir: Path, root: Path) -> Path:
    """The model of ``colmap/sparse/0`` also as ``root/sparse/0`` (returns it)."""
    dst = root / "sparse" / "0"
    shutil.copytree(model_dir, dst)
    return dst
