"""The ``--intrinsics auto|exif|shared|fx,fy,cx,cy`` option: which focal lengths the exported cameras use."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ns_extreme.geometry.intrinsics import intrinsics_matrix

FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
EXIF_IFD = 0x8769
FOCAL_35MM_TAG = 0xA405


def parse_intrinsics_option(value: str) -> str | tuple[float, float, float, float]:
    if value in ("auto", "exif", "shared"):
        return value
    try:
        fx, fy, cx, cy = (float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--intrinsics must be auto, exif, shared or 'fx,fy,cx,cy' in pixels, got {value!r}") from None
    if not all(math.isfinite(v) for v in (fx, fy, cx, cy)):
        raise ValueError(f"--intrinsics values must be finite numbers, got {value!r}")
    if fx <= 0 or fy <= 0:
        raise ValueError(f"--intrinsics focal lengths must be positive, got {value!r}")
    return fx, fy, cx, cy


def exif_focal_px(path: Path, size_wh: tuple[int, int]) -> Optional[float]:
    """Focal length in pixels from the 35 mm-equivalent EXIF tag (diagonal convention), or None."""
    try:
        with Image.open(path) as img:
            f35 = img.getexif().get_ifd(EXIF_IFD).get(FOCAL_35MM_TAG)
    except (OSError, ValueError, AttributeError):
        return None
    if not f35 or float(f35) <= 0:
        return None
    return float(f35) * math.hypot(*size_wh) / FULL_FRAME_DIAGONAL_MM


def choose_intrinsics(
    option: str, predicted: np.ndarray, sizes_wh: np.ndarray, paths: list[Path]
) -> tuple[np.ndarray, list[str]]:
    """Final K [N,3,3] (original pixels) and a per-view source label."""
    parsed = parse_intrinsics_option(option)
    K = predicted.copy()
    n = len(K)
    if parsed == "auto":
        return K, ["predicted"] * n
    if isinstance(parsed, tuple):
        if len({tuple(wh) for wh in sizes_wh.tolist()}) > 1:
            raise ValueError(
                "--intrinsics fx,fy,cx,cy describes one image size, but the images have several sizes; "
                "use --intrinsics exif or shared, or pose each size separately"
            )
        fx, fy, cx, cy = parsed
        return np.repeat(intrinsics_matrix(fx, fy, cx, cy)[None], n, axis=0), ["given"] * n
    if parsed == "shared":
        # One physical camera: the median focal relative to the image diagonal, applied to every view.
        # The diagonal (unlike the width) is the same for portrait and landscape shots of one camera and
        # scales with resizing, like the focal length in pixels.
        diag = np.hypot(sizes_wh[:, 0], sizes_wh[:, 1]).astype(np.float64)
        rel = np.median(np.concatenate([K[:, 0, 0] / diag, K[:, 1, 1] / diag]))
        K[:, 0, 0] = K[:, 1, 1] = rel * diag
        return K, ["shared"] * n
    sources = []
    for i, path in enumerate(paths):
        f = exif_focal_px(path, (int(sizes_wh[i, 0]), int(sizes_wh[i, 1])))
        if f is None:
            sources.append("predicted")
        else:
            K[i, 0, 0] = K[i, 1, 1] = f
            sources.append("exif")
    return K, sources
