"""Point-cloud PLY files as nerfstudio writes and reads them (`sparse_pc.ply`).

The header is byte-identical to nerfstudio's `create_ply_from_colmap` (`property float x|y|z`,
`property uint8 red|green|blue`), ASCII by default, optionally followed by extra scalar properties
(sparse_pc.ply adds `property float confidence`); nerfstudio loads it with open3d, which reads ASCII and
binary alike and skips properties it does not know. Floats are printed with enough digits to read back
bit-exactly.
Reading parses the simple files ns_extreme and nerfstudio write with numpy and anything else (big-endian,
list properties, several elements) with plyfile, so any vertex PLY can be loaded.
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


_PLY_DTYPES = {  # PLY type name (both spellings) -> numpy dtype
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1", "char": "i1",
    "int8": "i1", "ushort": "u2", "uint16": "u2", "short": "i2", "int16": "i2", "uint": "u4", "uint32": "u4",
    "int": "i4", "int32": "i4",
}  # fmt: skip


def _read_header(path: str | os.PathLike[str]) -> tuple[list[str], int]:
    """Header lines up to ``end_header`` and the byte offset of the body."""
    header: list[str] = []
    with open(path, "rb") as f:
        while len(header) <= 200:
            line = f.readline()
            if not line:
                break
            header.append(line.decode("ascii", "replace").strip())
            if header[-1] == "end_header":
                break
        return header, f.tell()


def _fast_vertex_columns(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """Vertex columns of an ASCII or little-endian PLY whose only element is a scalar ``vertex`` (what
    ns_extreme and nerfstudio write), parsed with numpy; None for anything else. plyfile parses ASCII row by
    row in Python: ~2 s for 60k points, which ns-train pays for every split it parses."""
    header, body_start = _read_header(path)
    elements = [h.split() for h in header if h.startswith("element ")]
    props = [h.split() for h in header if h.startswith("property ")]
    fmt = next((h.split()[1] for h in header if h.startswith("format ") and len(h.split()) > 1), "")
    simple = (
        header[:1] == ["ply"] and header[-1:] == ["end_header"] and len(elements) == 1 and len(elements[0]) == 3
        and elements[0][1] == "vertex" and elements[0][2].isdigit()
        and all(len(p) == 3 and p[1] in _PLY_DTYPES for p in props)
        and fmt in ("ascii", "binary_little_endian")
    )  # fmt: skip
    if not simple:
        return None
    n = int(elements[0][2])
    dtype = np.dtype([(p[2], "<" + _PLY_DTYPES[p[1]]) for p in props])
    with open(path, "rb") as f:
        f.seek(body_start)
        body = f.read() if fmt == "ascii" else f.read(n * dtype.itemsize)
    if fmt == "ascii":
        values = np.array(body.split(), dtype=np.float64)
        if values.size != n * len(props):
            raise ValueError(f"{path}: expected {n} vertices of {len(props)} values, found {values.size} values")
        table = values.reshape(n, len(props))
        # float64 holds every int32 and the 9-digit text of a float32 exactly, so the casts are lossless.
        return {p[2]: table[:, k].astype(dtype[p[2]].newbyteorder("=")) for k, p in enumerate(props)}
    if len(body) != n * dtype.itemsize:
        raise ValueError(f"{path}: truncated PLY ({len(body)} of {n * dtype.itemsize} bytes)")
    table = np.frombuffer(body, dtype=dtype)
    return {p[2]: table[p[2]].astype(dtype[p[2]].newbyteorder("=")) for p in props}


def _plyfile_vertex_columns(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    vertex = PlyData.read(str(path))["vertex"].data
    return {n: np.asarray(vertex[n]) for n in vertex.dtype.names or ()}


def read_ply(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Read a vertex PLY: (xyz float64 [N,3], rgb uint8 [N,3] or None if absent, other properties in their
    stored dtype, e.g. ``confidence`` float32)."""
    columns = _fast_vertex_columns(path)
    if columns is None:
        columns = _plyfile_vertex_columns(path)
    missing = [n for n in _XYZ if n not in columns]
    if missing:
        raise ValueError(f"{path}: PLY vertex element lacks {missing}")
    xyz = np.stack([columns[n] for n in _XYZ], axis=1).astype(np.float64)
    rgb = None
    if all(n in columns for n in _RGB):
        rgb_raw = np.stack([columns[n] for n in _RGB], axis=1)
        if np.issubdtype(rgb_raw.dtype, np.floating):  # some writers store colours as 0-1 floats
            rgb_raw = np.clip(np.round(rgb_raw * 255.0), 0, 255)
        rgb = rgb_raw.astype(np.uint8)
    extra = {n: v for n, v in columns.items() if n not in _XYZ + _RGB}
    return xyz, rgb, extra
