"""Known lens distortion, undone before posing (shared by ``ns-process-data extreme-poses`` and the ``extreme3d``
parser): the photos are undistorted into a folder and posed and exported as the pinhole dataset.

The lens comes from ``--camera-model`` / ``--camera-params`` (one camera for all photos) or, without them, from the
``--poses-from`` cameras (COLMAP model or transforms.json). ``--masks`` follow their photos through the same maps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from ns_extreme.io.undistort import FISHEYE_FOV_DEG, LensDistortion
from ns_extreme.posing.options import PosingOptions


@dataclass
class LensOptions:
    camera_model: Optional[Literal["OPENCV", "FULL_OPENCV", "OPENCV_FISHEYE"]] = None
    """Lens of the photos when known (one camera for all, COLMAP's models): they are undistorted first (OpenCV) and
    posed and exported as pinhole images; the original distortion goes to extreme_poses.json. Needs --camera-params.
    Without it, photos whose --poses-from camera has a lens are undistorted with that camera."""
    camera_params: Optional[str] = None
    """OPENCV: fx,fy,cx,cy,k1,k2,p1,p2; FULL_OPENCV: fx,fy,cx,cy,k1,k2,p1,p2,k3,k4,k5,k6; OPENCV_FISHEYE:
    fx,fy,cx,cy,k1,k2,k3,k4 (pixels of the upright originals, COLMAP convention)."""
    fisheye_fov: float = FISHEYE_FOV_DEG
    """Fisheye lenses only: horizontal field of view, degrees, of the pinhole view fisheye photos are undistorted to
    (same size and principal point)."""

    def lens(self, posing: PosingOptions) -> Optional[LensDistortion]:
        """The --camera-model lens (None without one), after the checks that need no photo (ValueError)."""
        from ns_extreme.io.undistort import parse_lens

        if not 10.0 <= self.fisheye_fov <= 170.0:
            raise ValueError(f"--fisheye-fov must be between 10 and 170 degrees, got {self.fisheye_fov}")
        if self.camera_model is None and self.camera_params is None:
            return None
        if self.camera_model is None or self.camera_params is None:
            raise ValueError("--camera-model and --camera-params go together (e.g. --camera-model OPENCV "
                             "--camera-params fx,fy,cx,cy,k1,k2,p1,p2)")  # fmt: skip
        if posing.intrinsics != "auto":
            raise ValueError("--camera-params already gives the intrinsics; leave out --intrinsics")
        return parse_lens(self.camera_model, self.camera_params)


@dataclass
class UndistortedInputs:
    images: list[Path]
    """The photos to pose: undistorted copies where a lens was undone, the originals elsewhere."""
    posing: PosingOptions
    """The posing options for them: --intrinsics the undistorted pinhole camera, --poses-from a copy with pinhole
    cameras, --masks undistorted copies (the caller's options are not changed)."""
    record: Optional[dict]
    """``lens_distortion`` of extreme_poses.json: the original lens and the pinhole camera; None when none was
    undone."""


def undistort_inputs(
    images: Sequence[Path],
    lens_options: LensOptions,
    posing: PosingOptions,
    folder: Path,
    status: Callable[[str], object] = lambda message: None,
) -> UndistortedInputs:
    """Undo the known lens of ``images`` into ``folder`` (an empty folder the caller removes). ``status`` is told
    what is being done before the slow part (each photo is decoded, remapped and re-encoded)."""
    from ns_extreme.io.undistort import undistort_photos, undistort_with_known_poses

    images = list(images)
    lens = lens_options.lens(posing)
    if lens is not None:
        status(f"undistorting {len(images)} photos ({lens.model}) ...")
        paths, K = undistort_photos(images, folder, lens, lens_options.fisheye_fov)
        intrinsics = ",".join(f"{v:.10g}" for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
        record = {
            **lens.summary(),
            "undistorted_K": K.tolist(),
            **({"fisheye_fov_deg": lens_options.fisheye_fov} if lens.model == "OPENCV_FISHEYE" else {}),
        }
        masks = _undistorted_masks(images, posing.masks, {p.name: lens for p in images}, folder, lens_options)
        return UndistortedInputs(paths, dataclasses.replace(posing, intrinsics=intrinsics, masks=masks), record)
    if posing.poses_from is None:
        return UndistortedInputs(images, posing, None)
    if not Path(posing.poses_from).exists():
        raise FileNotFoundError(f"--poses-from: {posing.poses_from} not found")
    status("checking the --poses-from cameras for lens distortion ...")
    paths, poses, lenses = undistort_with_known_poses(Path(posing.poses_from), images, folder, lens_options.fisheye_fov)
    if poses is None:
        return UndistortedInputs(images, posing, None)
    per_photo = {name: LensDistortion(v["model"], v["params"]) for name, v in lenses.items()}
    masks = _undistorted_masks(images, posing.masks, per_photo, folder, lens_options)
    record = {"source": f"--poses-from {posing.poses_from}", "photos": lenses}
    return UndistortedInputs(paths, dataclasses.replace(posing, poses_from=poses, masks=masks), record)


def _undistorted_masks(
    images: list[Path], masks: Optional[Path], lenses: dict[str, LensDistortion], folder: Path, options: LensOptions
) -> Optional[Path]:
    """--masks follow their photos through the undistortion (photos without a lens keep theirs as they are)."""
    if masks is None:
        return None
    from ns_extreme.io.images import load_rgb
    from ns_extreme.io.masks import load_mask, mask_files_by_stem, write_mask_png
    from ns_extreme.io.undistort import undistort_mask

    mask_dir = folder / "masks"
    mask_dir.mkdir()
    for photo, mask_file in zip(images, mask_files_by_stem(masks, images)):
        size = load_rgb(photo).shape[1::-1]  # upright; undistortion keeps the size
        mask, dst = load_mask(mask_file, size), mask_dir / f"{photo.stem}.png"
        if photo.name in lenses:
            undistort_mask(mask, dst, lenses[photo.name], options.fisheye_fov)
        else:
            write_mask_png(dst, mask)
    return mask_dir
