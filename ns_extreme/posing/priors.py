"""Priors fed into the network (``ModelSpec.priors``): known intrinsics, known poses and depth maps, per view, in
the frame and pixels of the preprocessed network input.

What is given, per option:

* intrinsics: ``--intrinsics fx,fy,cx,cy`` (every view), ``--intrinsics exif`` (views with a 35 mm EXIF focal length;
  principal point at the image centre), and with ``--intrinsics auto`` the cameras of ``--poses-from`` for the views
  it poses. ``shared`` is derived from predictions, so it gives no prior.
* poses: the ``--poses-from`` poses of the views it holds, camera-to-world OpenCV, re-expressed relative to the first
  view that has one (the network's world is its first camera).
* depth: ``--depth-from DIR``, one file per image matched by file stem: ``<stem>.png`` (16-bit millimetres, as
  ns_extreme writes ``depth/``) or ``<stem>.npy`` (float32); 0, negative or non-finite = no depth there.

Priors for only some views: a view without one gets exactly what every view gets when the prior is absent (the
network's empty token / no depth tokens) and takes no part in the normalisation of the others; the outputs of all
views are then mapped onto the known poses by the usual Sim(3). A prior a model cannot take is refused
(``check_priors_supported``), never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ns_extreme.geometry.conventions import invert_rigid, to_homogeneous

DEPTH_SUFFIXES = (".png", ".npy")
ASPECT_TOLERANCE = 0.02
"""A depth map whose aspect ratio differs from its image's by more than this (relative) is refused."""


@dataclass(frozen=True)
class FramePriors:
    """Network priors for a sequence of preprocessed frames; None = that prior is not given for any view."""

    intrinsics: Optional[np.ndarray] = None
    """[S, 3, 3] float64 in pixels of the network input; NaN matrix = no prior for that view."""
    poses_c2w: Optional[np.ndarray] = None
    """[S, 4, 4] float64 camera-to-world, OpenCV axes; NaN matrix = no prior for that view."""
    depth: Optional[np.ndarray] = None
    """[S, H, W] float32 on the network input's pixel grid; 0 = no depth (padding, holes, views without a file)."""

    def names(self) -> list[str]:
        return [n for n in ("intrinsics", "poses", "depth") if self.get(n) is not None]

    def get(self, name: str) -> Optional[np.ndarray]:
        return {"intrinsics": self.intrinsics, "poses": self.poses_c2w, "depth": self.depth}[name]

    def views_with(self, name: str) -> int:
        """Number of views that have prior ``name``."""
        value = self.get(name)
        if value is None:
            return 0
        if name == "depth":
            return int((value > 0).reshape(len(value), -1).any(axis=1).sum())
        return int(np.isfinite(value).reshape(len(value), -1).all(axis=1).sum())

    def subset(self, frames: Sequence[int]) -> "FramePriors":
        """The priors of ``frames`` (a chunk of the sequence), poses re-anchored on the chunk's first known view."""
        idx = list(frames)
        return replace(
            self,
            intrinsics=None if self.intrinsics is None else self.intrinsics[idx],
            poses_c2w=None if self.poses_c2w is None else anchored_on_first_known(self.poses_c2w[idx]),
            depth=None if self.depth is None else self.depth[idx],
        )

    def is_empty(self) -> bool:
        return not self.names()


def anchored_on_first_known(poses_c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world poses [S, 4, 4] (NaN = unknown) re-expressed in the camera of the first known one (the
    network's world is its first camera; the relative layout is unchanged)."""
    known = np.flatnonzero(np.isfinite(poses_c2w).reshape(len(poses_c2w), -1).all(axis=1))
    if not len(known):
        return poses_c2w
    return np.linalg.inv(poses_c2w[known[0]]) @ poses_c2w


def requested_priors(intrinsics_option: str, poses_from: Optional[Path], depth_from: Optional[Path]) -> list[str]:
    """The network priors the options ask for (before any file is read)."""
    from ns_extreme.posing.intrinsics import parse_intrinsics_option

    names = []
    parsed = parse_intrinsics_option(intrinsics_option)
    if isinstance(parsed, tuple) or parsed == "exif" or poses_from is not None:
        names.append("intrinsics")
    if poses_from is not None:
        names.append("poses")
    if depth_from is not None:
        names.append("depth")
    return names


def check_priors_supported(model: str, depth_from: Optional[Path]) -> None:
    """Refuse a prior that ``model`` cannot use at all. Intrinsics and poses are used by every model (the exported
    cameras, the Sim(3) onto known poses), and also fed into the network by models that take them; depth is only
    ever a network input."""
    from ns_extreme.models.registry import MODELS, get_spec

    if depth_from is not None and "depth" not in get_spec(model).priors:
        able = [name for name, spec in MODELS.items() if "depth" in spec.priors]
        raise ValueError(
            f"--depth-from: {model} takes no depth prior; use --model {' or '.join(able)}"
            if able
            else f"--depth-from: {model} takes no depth prior"
        )


def _depth_files(folder: Path, stems: Sequence[str]) -> dict[int, Path]:
    """view -> depth file ``<stem>.png`` or ``<stem>.npy`` in ``folder``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--depth-from: folder not found: {folder}")
    found: dict[int, Path] = {}
    for i, stem in enumerate(stems):
        candidates = [folder / f"{stem}{s}" for s in DEPTH_SUFFIXES if (folder / f"{stem}{s}").is_file()]
        if len(candidates) > 1:
            raise ValueError(f"--depth-from {folder}: both {candidates[0].name} and {candidates[1].name}; keep one")
        if candidates:
            found[i] = candidates[0]
    if not found:
        raise ValueError(
            f"--depth-from {folder}: no depth file matches an input image (expected <image stem>.png, 16-bit "
            "millimetres, or <image stem>.npy)"
        )
    return found


def read_depth_file(path: Path) -> np.ndarray:
    """A depth map [H, W] float32 (units as stored; 0 = invalid) from a 16-bit PNG in millimetres or a .npy."""
    from ns_extreme.io.depth import read_depth_npy, read_depth_png_mm

    try:
        depth = read_depth_npy(path) if path.suffix == ".npy" else read_depth_png_mm(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--depth-from: cannot read {path} ({err})") from None
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0.0)).astype(np.float32)


def depth_to_preprocessed(depth: np.ndarray, record, name: str) -> np.ndarray:
    """A depth map of the original image (any resolution of the same aspect ratio) on the network input's pixel
    grid, resized, cropped and padded exactly like the image (nearest neighbour: no depth mixes across edges or
    into holes; padding = 0)."""
    import torch
    import torch.nn.functional as F

    oh, ow = record.original_hw
    dh, dw = depth.shape
    if abs((dw / dh) / (ow / oh) - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(f"--depth-from: {name} is {dw}x{dh}, but its image is {ow}x{oh} (another aspect ratio)")
    rh, rw = record.resized_hw
    resized = F.interpolate(torch.from_numpy(depth)[None, None], size=(rh, rw), mode="nearest-exact")[0, 0].numpy()
    x0, y0 = record.crop_offset_xy
    ch, cw = record.content_hw
    out = np.zeros(record.final_hw, dtype=np.float32)
    px, py = record.pad_offset_xy
    out[py : py + ch, px : px + cw] = resized[y0 : y0 + ch, x0 : x0 + cw]
    return out


def network_priors(
    accepted: Sequence[str],
    records: Sequence,
    image_paths: Sequence[Path],
    sizes_wh: np.ndarray,
    intrinsics_option: str,
    poses_from: Optional[Path],
    depth_from: Optional[Path],
) -> Optional[FramePriors]:
    """The priors of the options that the backbone ``accepted`` (``ModelSpec.priors``), for the preprocessed frames
    ``records``; None when there are none."""
    n = len(records)
    wanted = set(accepted) & set(requested_priors(intrinsics_option, poses_from, depth_from))
    if not wanted:
        return None
    intrinsics = poses = depth = None
    known = matches = None
    if poses_from is not None and {"intrinsics", "poses"} & wanted:
        from ns_extreme.posing.known_poses import match_known, read_known_poses

        known = read_known_poses(poses_from)
        matches = match_known(list(image_paths), known)
    if "intrinsics" in wanted:
        intrinsics = _intrinsics_priors(records, image_paths, sizes_wh, intrinsics_option, known, matches)
    if "poses" in wanted and matches:
        poses = np.full((n, 4, 4), np.nan)
        for i, k in matches.items():
            poses[i] = invert_rigid(to_homogeneous(known.w2c_opencv[k]))
        poses = anchored_on_first_known(poses)
    if "depth" in wanted:
        files = _depth_files(Path(depth_from), [Path(p).stem for p in image_paths])
        depth = np.zeros((n, *records[0].final_hw), dtype=np.float32)
        for i, path in files.items():
            depth[i] = depth_to_preprocessed(read_depth_file(path), records[i], path.name)
    priors = FramePriors(intrinsics, poses, depth)
    return None if priors.is_empty() else priors


def _intrinsics_priors(records, image_paths, sizes_wh, option, known, matches) -> Optional[np.ndarray]:
    """Given / EXIF / --poses-from intrinsics of each view at network-input pixels (NaN where none)."""
    from ns_extreme.posing.intrinsics import choose_intrinsics
    from ns_extreme.posing.known_poses import known_intrinsics

    n = len(records)
    unknown = np.zeros((n, 3, 3))
    unknown[:, 0, 0] = unknown[:, 1, 1] = np.nan
    unknown[:, 0, 2], unknown[:, 1, 2], unknown[:, 2, 2] = sizes_wh[:, 0] / 2.0, sizes_wh[:, 1] / 2.0, 1.0
    K_orig = np.full((n, 3, 3), np.nan)
    if option not in ("auto", "shared"):
        K, sources = choose_intrinsics(option, unknown, sizes_wh, list(image_paths))
        for i, source in enumerate(sources):
            if source in ("given", "exif"):
                K_orig[i] = K[i]
    elif option == "auto" and matches:
        for i, k in matches.items():
            K_orig[i] = known_intrinsics(known, k, sizes_wh[i])
    if not np.isfinite(K_orig).any():
        return None
    out = np.full((n, 3, 3), np.nan)
    for i in range(n):
        if np.isfinite(K_orig[i]).all():
            out[i] = records[i].intrinsics_to_preprocessed(K_orig[i])
    return out
