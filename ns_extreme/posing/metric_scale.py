"""Real-world scale (metres) for a model's world: from EXIF GPS positions or one known camera-to-camera distance.

``--scale-from exif-gps``: the robust Sim(3) (``geometry.sim3.robust_sim3``, Cauchy) from the camera centres to the
photos' GPS positions in local East-North-Up metres (WGS84, around the first photo with GPS); its scale is applied.
``--scale-from A.jpg,B.jpg,METRES``: the distance between the centres of the two named photos becomes METRES.
Only the scale is applied (the world keeps its orientation, e.g. the levelled one); the fit is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ns_extreme.geometry.sim3 import robust_sim3

GPS_IFD = 0x8825
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3
MIN_GPS_PHOTOS = 3


@dataclass
class ScaleFromDistance:
    a: str
    b: str
    metres: float


def parse_scale_from(value: Optional[str]) -> Optional[str | ScaleFromDistance]:
    """None, ``"exif-gps"`` or a ``ScaleFromDistance``; ValueError for anything else."""
    if value is None or value == "":
        return None
    if value == "exif-gps":
        return value
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 3:
        try:
            metres = float(parts[2])
        except ValueError:
            metres = float("nan")
        if parts[0] and parts[1] and parts[0] != parts[1] and np.isfinite(metres) and metres > 0:
            return ScaleFromDistance(parts[0], parts[1], metres)
    raise ValueError(
        f"--scale-from must be exif-gps or A.jpg,B.jpg,METRES (two different photo names and a positive "
        f"distance in metres between their cameras), got {value!r}"
    )


@dataclass
class MetricScale:
    scale: float
    """Factor applied to the world (dataset unit -> metres)."""
    method: str
    residuals_m: list[float] = field(default_factory=list)
    """Per used photo: distance between its scaled camera centre and its GPS position after the fit, metres."""
    photos: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        r = np.asarray(self.residuals_m)
        return {
            "method": self.method,
            "scale": self.scale,
            "unit": "metre",
            "photos": self.photos,
            "residuals_m": self.residuals_m,
            "median_residual_m": float(np.median(r)) if len(r) else None,
        }


def _rational(x) -> float:
    return float(x[0]) / float(x[1]) if isinstance(x, tuple) else float(x)


def read_exif_gps(path: Path) -> Optional[tuple[float, float, float]]:
    """(latitude°, longitude°, altitude m) from a photo's EXIF GPS block, None without one (altitude 0 if absent)."""
    try:
        with Image.open(path) as img:
            gps = img.getexif().get_ifd(GPS_IFD)
    except OSError:
        return None
    if not gps or 2 not in gps or 4 not in gps:
        return None

    def degrees(dms, ref: str, negative: str) -> float:
        d, m, s = (_rational(v) for v in dms)
        value = d + m / 60.0 + s / 3600.0
        return -value if str(ref).upper().startswith(negative) else value

    lat = degrees(gps[2], gps.get(1, "N"), "S")
    lon = degrees(gps[4], gps.get(3, "E"), "W")
    alt = _rational(gps[6]) if 6 in gps else 0.0
    if gps.get(5) in (1, b"\x01"):
        alt = -alt
    return lat, lon, alt


def lla_to_ecef(lla: np.ndarray) -> np.ndarray:
    lat, lon, alt = np.radians(lla[:, 0]), np.radians(lla[:, 1]), lla[:, 2]
    n = _WGS84_A / np.sqrt(1.0 - _WGS84_E2 * np.sin(lat) ** 2)
    return np.stack(
        [
            (n + alt) * np.cos(lat) * np.cos(lon),
            (n + alt) * np.cos(lat) * np.sin(lon),
            (n * (1.0 - _WGS84_E2) + alt) * np.sin(lat),
        ],
        axis=-1,
    )


def lla_to_enu(lla: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """[N, 3] East-North-Up metres of (lat°, lon°, alt m) rows around ``origin`` (lat°, lon°, alt m)."""
    d = lla_to_ecef(lla) - lla_to_ecef(origin[None])[0]
    lat, lon = np.radians(origin[0]), np.radians(origin[1])
    R = np.array(
        [
            [-np.sin(lon), np.cos(lon), 0.0],
            [-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)],
            [np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)],
        ]
    )
    return d @ R.T


def scale_from_gps(image_paths: Sequence[Path], centres: np.ndarray) -> MetricScale:
    gps = [read_exif_gps(p) for p in image_paths]
    have = [i for i, g in enumerate(gps) if g is not None]
    if len(have) < MIN_GPS_PHOTOS:
        raise ValueError(
            f"--scale-from exif-gps: {len(have)} of {len(image_paths)} photos carry EXIF GPS positions, at least "
            f"{MIN_GPS_PHOTOS} are needed (or use --scale-from A.jpg,B.jpg,METRES)"
        )
    lla = np.array([gps[i] for i in have])
    enu = lla_to_enu(lla, lla[0])
    src = centres[have]
    if np.linalg.norm(src - src.mean(0), axis=1).max() < 1e-9 or np.linalg.norm(enu - enu.mean(0), axis=1).max() < 1e-3:
        raise ValueError("--scale-from exif-gps: the cameras (or their GPS positions) do not move; no scale follows")
    sim, residuals = robust_sim3(src, enu, loss="cauchy")
    return MetricScale(sim.scale, "exif-gps", residuals.tolist(), [image_paths[i].name for i in have])


def scale_from_distance(image_paths: Sequence[Path], centres: np.ndarray, spec: ScaleFromDistance) -> MetricScale:
    names = [p.name for p in image_paths]
    for name in (spec.a, spec.b):
        if name not in names:
            raise ValueError(f"--scale-from: no posed photo is named {name!r} (photos: {', '.join(names[:5])} ...)")
    i, j = names.index(spec.a), names.index(spec.b)
    distance = float(np.linalg.norm(centres[i] - centres[j]))
    if distance < 1e-12:
        raise ValueError(f"--scale-from: {spec.a} and {spec.b} have the same camera centre; choose two apart")
    return MetricScale(spec.metres / distance, "distance", [0.0], [spec.a, spec.b])


def metric_scale(image_paths: Sequence[Path], centres: np.ndarray, value: str) -> MetricScale:
    spec = parse_scale_from(value)
    if spec == "exif-gps":
        return scale_from_gps(image_paths, centres)
    return scale_from_distance(image_paths, centres, spec)
