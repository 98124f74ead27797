"""Which views share one camera in the bundle adjustment (COLMAP's automatic camera mode)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

_MAKE, _MODEL, _EXIF_IFD, _FOCAL = 0x010F, 0x0110, 0x8769, 0x920A


def _exif_camera(path: Path) -> tuple:
    try:
        with Image.open(path) as img:
            exif = img.getexif()
            return (exif.get(_MAKE), exif.get(_MODEL), exif.get_ifd(_EXIF_IFD).get(_FOCAL))
    except (OSError, ValueError):
        return (None, None, None)


def camera_groups(image_paths: Sequence[Path], sizes_wh: np.ndarray, constant_focal: np.ndarray) -> np.ndarray:
    """[N] group id: views of the same size and the same EXIF make, model and focal length share a camera (one
    focal length refined from all of them, as COLMAP does), which keeps focal lengths observable in small, narrow
    sets; a view whose focal length is kept has a camera of its own."""
    keys: dict[tuple, int] = {}
    groups = np.zeros(len(image_paths), dtype=np.int64)
    for i, path in enumerate(image_paths):
        key = ("own", i) if constant_focal[i] else (int(sizes_wh[i, 0]), int(sizes_wh[i, 1]), *_exif_camera(Path(path)))
        groups[i] = keys.setdefault(key, len(keys))
    return groups
