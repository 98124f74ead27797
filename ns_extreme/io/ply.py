"""Point-cloud PLY files as nerfstudio writes and reads them (`sparse_pc.ply`).

The header is byte-identical to nerfstudio's `create_ply_from_colmap` (`property float x|y|z`,
`property uint8 red|green|blue`), ASCII by default; nerfstudio loads it with open3d, which reads
ASCII and binary alike. Floats are printed with enough digits to read back bit-exactly.
Reading uses plyfile, so any vertex PLY (binary or ASCII, extra properties) can be loaded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from plyfile import PlyData

from ns_extreme.io.atomic import atomic_write_bytes

__all__ = ["write_ply", "read_ply"]

_XYZ = ("x", "y", "z")
_RGB = ("red", "green", "blue")
_PLY_TYPE = {  # numpy dtype -> PLY type name (names as nerfstudio spells them where it uses them)
    np.dtype("f4"): ("float", "%.9g"),
    np.dtype("f8"): ("double", "%.17g"),
    np.dtype("u1"): ("uint8", "%d"),
    np.dtype("i1"): ("int8", "%d"),
    np.dtype("u2"): ("uint16", "%d"),
    np.dtype("i2"): ("int16", "%d"),
    np.dtype("u4"): ("uint32", "%d"),
    np.dtype("i4"): ("int32", "%d"),
}


def _vertex_table(xyz: np.ndarray, rgb: np.ndarray, extra: dict[str, np.ndarray] | None) -> np.ndarray:
    """Validate inputs and pack them into one little-endian structured array."""
    xyz = np.asarray(xyz)
    rgb = np.asarray(rgb)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be [N,3], got {xyz.shape}")
    if rgb.shape != xyz.shape:
        raise ValueError(f"rgb must be [N,3] like xyz {xyz.shape}, got {rgb.shape}")
    if not np.all(np.isfinite(xyz)):
        raise ValueError("xyz contains NaN or infinite values")
    if rgb.dtype != np.uint8:
        if not np.issubdtype(rgb.dtype, np.integer) or (rgb.size and (rgb.min() < 0 or rgb.max() > 255)):
            raise ValueError(f"rgb must be uint8 0-255 (got dtype {rgb.dtype})")
    columns: list[tuple[str, np.ndarray]] = [(n, xyz[:, i].astype("<f4")) for i, n in enumerate(_XYZ)]
    columns += [(n, rgb[:, i].astype("u1")) for i, n in enumerate(_RGB)]
    for name, values in (extra or {}).items():
        values = np.asarray(values)
        if name in _XYZ + _RGB or not name.isidentifier():
            raise ValueError(f"invalid extra property name {name!r}")
        if values.shape != (len(xyz),):
            raise ValueError(f"extra property {name!r} must have shape [{len(xyz)}], got {values.shape}")
        if values.dtype == np.bool_:
            values = values.astype("u1")
        if values.dtype.newbyteorder("=") not in _PLY_TYPE:
            raise ValueError(f"extra property {name!r}: unsupported dtype {values.dtype}")
        columns.append((name, values.astype(values.dtype.newbyteorder("<"))))
    table = np.empty(len(xyz), dtype=[(n, v.dtype) for n, v in columns])
    for name, values in columns:
        table[name] = values
    return table


def _header(table: np.ndarray, binary: bool) -> str:
    fmt = "binary_little_endian" if binary else "ascii"
    lines = ["ply", f"format {fmt} 1.0", f"element vertex {len(table)}"]
    lines += [f"property {_PLY_TYPE[table.dtype[n].newbyteorder('=')][0]} {n}" for n in table.dtype.names]
    return "\n".join(lines + ["end_header"]) + "\n"


def write_ply(
    path: str | os.PathLike[str],
    xyz: np.ndarray,
    rgb: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
    binary: bool = False,
) -> Path:
    """Write points `xyz` [N,3] (stored float32) with colours `rgb` uint8 [N,3] atomically.

    `extra` adds per-point scalar properties after the colours, e.g. {"confidence": float32[N]}.
    """
    table = _vertex_table(xyz, rgb, extra)
    out = io.BytesIO()
    out.write(_header(table, binary).encode("ascii"))
    if binary:
        out.write(table.tobytes())
    elif len(table):
        fmts = [_PLY_TYPE[table.dtype[n].newbyteorder("=")][1] for n in table.dtype.names]
        np.savetxt(out, table, fmt=fmts, delimiter=" ", newline="\n")
    return atomic_write_bytes(path, out.getvalue())


def read_ply(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Read a vertex PLY: (xyz float64 [N,3], rgb uint8 [N,3] or None if absent, other properties)."""
    vertex = PlyData.read(str(path))["vertex"].data
    names = vertex.dtype.names or ()
    missing = [n for n in _XYZ if n not in names]
    if missing:
        raise ValueError(f"{path}: PLY vertex element lacks {missing}")
    xyz = np.stack([vertex[n] for n in _XYZ], axis=1).astype(np.float64)
    rgb = None
    if all(n in names for n in _RGB):
        rgb_raw = np.stack([vertex[n] for n in _RGB], axis=1)
        if np.issubdtype(rgb_raw.dtype, np.floating):  # some writers store colours as 0-1 floats
            rgb_raw = np.clip(np.round(rgb_raw * 255.0), 0, 255)
        rgb = rgb_raw.astype(np.uint8)
    extra = {n: np.asarray(vertex[n]) for n in names if n not in _XYZ + _RGB}
    return xyz, rgb, extra
