"""The ``extreme3d`` dataparser: reads datasets written by ``ns-process-data extreme-poses``, or poses a raw
image folder on the fly (cached), and hands nerfstudio cameras + a seed point cloud.

Usage (tyro selects dataparsers by a positional subcommand; trainer/model options go before it, dataparser
options after it)::

    ns-train splatfacto [trainer/model options] extreme3d --data DATASET_OR_IMAGE_FOLDER [extreme3d options]

``--data`` may be
* a folder holding a ``transforms.json`` (ours, or any nerfstudio-style one), or that file itself;
* a folder of images: it is posed with the same pipeline as ``extreme-poses`` (same options, given after
  ``extreme3d``) and the dataset is cached in ``<data>/.extreme3d`` (hidden, so the image folder still lists
  the same images; choose another place with ``--cache-dir``). The cache is reused while the image files
  (names, sizes, modification times) and the posing options are unchanged; ``--refresh-cache True`` re-poses.
* a video file (mp4/mov/mkv/webm/avi): frames are sampled as by ``extreme-poses --data VIDEO`` into a temporary
  folder and posed; the dataset (frames in its images/) is cached in ``<video folder>/.<video name>.extreme3d``,
  reused while the video file and the options are unchanged.

Frames: the same orientation / centring / scaling as nerfstudio's stock parsers
(``camera_utils.auto_orient_and_center_poses`` then ``1 / max|t|`` times ``--scale-factor``); the seed
points ``points3D_xyz`` (float32) / ``points3D_rgb`` (uint8) are mapped by the same transform and scale;
``dataparser_transform`` = transform @ applied_transform, so ``dataparser_transforms.json`` maps the
model's original world to the training frame, like nerfstudio's.

Viewer: the parser is also a nerfstudio ``ViewerControl``. nerfstudio's viewer finds it as
``pipeline.datamanager.dataparser`` and calls ``_setup(viewer)``, which adds the "Extreme poses" panel
(``ns_extreme.viewer.panel``: confidence-coloured frusta, seed point cloud, pretrained/aligned toggle, pair
table) drawn in the training frame (``display_frame()``), with any method (splatfacto, nerfacto, ...), in
``ns-train`` and ``ns-viewer``. A failure there is reported and never stops the stock viewer.

This module is imported while nerfstudio itself is still importing (entry point, see
``dataparser_spec``): keep its top-level imports to cameras / base_dataparser / scene_box / utils /
viewer_elements.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
import tyro
from nerfstudio.cameras import camera_utils
from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE, Cameras
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils.dataparsers_utils import (
    get_train_eval_split_all,
    get_train_eval_split_filename,
    get_train_eval_split_fraction,
    get_train_eval_split_interval,
)
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerControl
from typing_extensions import Annotated

from ns_extreme.cli.runtime import jsonable
from ns_extreme.io.video import DEFAULT_NUM_FRAMES_TARGET, VIDEO_SUFFIXES, is_video_file
from ns_extreme.posing.lens import LensOptions, undistort_inputs
from ns_extreme.posing.model_options import PoseModelOptions
from ns_extreme.posing.options import PosingOptions

CACHE_NAME = ".extreme3d"
"""Default on-the-fly cache: ``<image folder>/.extreme3d``."""
CACHE_KEY = "extreme3d_cache_key"
"""Key in the cached dataset's extreme_poses.json that says what was posed and how."""


@dataclass
class Extreme3DDataParserConfig(DataParserConfig):
    """ns_extreme datasets (ns-process-data extreme-poses), or raw image folders posed on the fly with VGGT."""

    _target: Type = field(default_factory=lambda: Extreme3DDataParser)
    """target class to instantiate"""
    data: Path = Path()
    """A dataset folder from ns-process-data extreme-poses (or its transforms.json), or a folder of images or a video
    file to pose on the fly (cached in <data>/.extreme3d, for a video in .<video name>.extreme3d beside it)."""
    scale_factor: float = 1.0
    """How much to scale the camera origins by (after --auto-scale-poses)."""
    scene_scale: float = 1.0
    """How much to scale the region of interest by (aabb = [-scene_scale, scene_scale]^3)."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "up"
    """The method to use for orientation (nerfstudio's; 'none' keeps the saved world's axes)."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """The method to use to center the poses (nerfstudio's)."""
    auto_scale_poses: bool = True
    """Whether to automatically scale the poses to fit in +/- 1 bounding box."""
    eval_mode: Literal["auto", "fraction", "filename", "interval", "all"] = "auto"
    """Train/eval split. auto: 'all' (every view trains and evaluates) for very sparse captures of at most
    --sparse-max-views views, else 'fraction'. fraction / filename / interval / all: as in nerfstudio's parser."""
    sparse_max_views: int = 12
    """With --eval-mode auto, captures of at most this many views train on all views."""
    train_split_fraction: float = 0.9
    """The fraction of views used for training (eval-mode fraction)."""
    eval_interval: int = 8
    """Every n-th view is held out for eval (eval-mode interval)."""
    load_3D_points: bool = True
    """Load the point cloud (ply_file_path) as points3D_xyz / points3D_rgb metadata (seeds splatfacto)."""
    load_depth: bool = True
    """Pass per-view depth maps (depth_file_path) on to nerfstudio when the dataset has them."""
    depth_unit_scale_factor: Optional[float] = None
    """Depth file unit in dataset units (None: 1e-3 for 16-bit millimetre PNGs, 1.0 for .npy files)."""
    mask_color: Optional[Tuple[float, float, float]] = None
    """Replace the unknown pixels with this color. Relevant if you have a mask but still sample everywhere."""
    cache_dir: Optional[Path] = None
    """Raw image folders only: where the posed dataset is cached (default: <data>/.extreme3d)."""
    refresh_cache: bool = False
    """Raw image folders only: pose again even if a matching cached dataset exists."""
    backbone: Annotated[PoseModelOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PoseModelOptions)
    """Raw image folders only: the model used to pose them."""
    posing: Annotated[PosingOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PosingOptions)
    """Raw image folders only: posing options (as for ns-process-data extreme-poses)."""
    lens: Annotated[LensOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=LensOptions)
    """Raw image folders only: known lens distortion, undone before posing (as for ns-process-data extreme-poses)."""
    depth_format: Literal["png", "npy", "none"] = "png"
    """Raw image folders only: depth maps written into the cached dataset."""
    num_frames_target: int = DEFAULT_NUM_FRAMES_TARGET
    """Video --data only: how many frames to take, evenly spread over the video (all when it has fewer); each is
    the sharpest of a few consecutive frames around its position."""


def _image_fingerprint(images: List[Path]) -> List[List[Any]]:
    out = []
    for p in images:
        st = p.stat()
        out.append([p.name, int(st.st_size), int(st.st_mtime_ns)])
    return out


@dataclass(frozen=True)
class DisplayFrame:
    """Where the "Extreme poses" viewer panel draws a dataset: its saved world mapped into the training frame."""

    transforms_json: Path
    """The dataset's transforms.json (the panel reads the cameras, points and diagnostics it names)."""
    transform: np.ndarray
    """[3, 4] float64 map from the model's original world to the training frame, before scaling
    (``dataparser_transform``)."""
    scale: float
    """Scale applied after ``transform`` (auto scale times --scale-factor)."""


@dataclass
class _Scene:
    """A dataset in the training frame, all views in nerfstudio's order (sorted by file name)."""

    json_path: Path
    image_filenames: List[Path]
    camera_to_worlds: torch.Tensor
    """[N, 3, 4] float32, OpenGL axes, oriented, centred and scaled."""
    K: np.ndarray
    """[N, 3, 3] intrinsics at the original resolution."""
    sizes_wh: np.ndarray
    """[N, 2] image width and height."""
    distortion: torch.Tensor
    """[N, 6] OPENCV distortion parameters (k1, k2, k3, k4, p1, p2)."""
    camera_type: Any
    """nerfstudio's CameraType of the dataset's camera_model."""
    depth_filenames: List[Path]
    """Empty without depth maps (or with --load-depth False)."""
    mask_filenames: List[Path]
    dataparser_transform: torch.Tensor
    """[3, 4] model world -> training frame before scaling (transform @ applied_transform)."""
    scale_factor: float
    """Scale of the training frame relative to the saved world."""
    dataparser_scale: float
    """``scale_factor`` times the dataset's applied_scale (nerfstudio's ``dataparser_scale``)."""
    points: Optional[Dict[str, torch.Tensor]]
    """points3D_xyz / points3D_rgb in the training frame, or None."""


@dataclass
class Extreme3DDataParser(DataParser, ViewerControl):
    """Reads an extreme-poses dataset (or poses an image folder first) into nerfstudio's DataparserOutputs.

    Also a ``ViewerControl``: nerfstudio's viewer calls ``_setup(viewer)``, which adds the "Extreme poses"
    panel (see the module docstring).
    """

    config: Extreme3DDataParserConfig

    # ------------------------------------------------------------------ viewer

    def _setup(self, viewer: Any) -> None:
        super()._setup(viewer)
        self.extreme_panel = None
        try:
            self.extreme_panel = self.build_viewer_panel(viewer.viser_server)
        except Exception as exc:  # noqa: BLE001 -- the stock viewer must keep working
            CONSOLE.print(
                "[yellow]extreme3d: the 'Extreme poses' viewer panel is unavailable: "
                f"{type(exc).__name__}: {exc}[/yellow]"
            )

    def build_viewer_panel(self, server: Any) -> Any:
        """Draw the dataset's cameras, points and diagnostics on ``server`` in the training frame (x10, like
        nerfstudio's viewer); returns the ``ns_extreme.viewer.panel.ExtremePanel``."""
        from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

        from ns_extreme.viewer.frames import nerfstudio_frame
        from ns_extreme.viewer.panel import ExtremePanel
        from ns_extreme.viewer.scene_data import load_scene

        frame = self.display_frame()
        data = load_scene(frame.transforms_json)
        return ExtremePanel(server, data, nerfstudio_frame(frame.transform, frame.scale, VISER_NERFSTUDIO_SCALE_RATIO))

    # ------------------------------------------------------------------ locating / producing the dataset

    def dataset_json(self) -> Path:
        """The transforms.json to read (posing a raw image folder first if needed)."""
        data = Path(self.config.data)
        if data.suffix == ".json":
            if not data.is_file():
                raise FileNotFoundError(f"extreme3d: {data} does not exist")
            return data
        if (data / "transforms.json").is_file():
            return data / "transforms.json"
        if data == Path():
            raise ValueError("extreme3d: no dataset given; pass --data DATASET_OR_IMAGE_FOLDER")
        if not data.exists():
            raise FileNotFoundError(f"extreme3d: data folder {data} does not exist")
        if data.is_file() and is_video_file(data):
            return self._posed_video(data) / "transforms.json"
        if not data.is_dir():
            raise ValueError(
                f"extreme3d: --data must be a dataset folder, a transforms.json, an image folder or a video file "
                f"({', '.join(VIDEO_SUFFIXES)}), got {data}"
            )
        from ns_extreme.io.images import scan_images

        images = list(scan_images(data).images)
        if not images:
            raise ValueError(
                f"extreme3d: {data} holds neither a transforms.json nor images; "
                "point --data at an ns-process-data extreme-poses output or at a folder of photos"
            )
        return self._posed_image_folder(data, images) / "transforms.json"

    def cache_folder(self) -> Path:
        data = Path(self.config.data)
        if self.config.cache_dir is not None:
            return Path(self.config.cache_dir)
        return data.parent / f".{data.name}{CACHE_NAME}" if data.is_file() else data / CACHE_NAME

    def cache_key(self, images: List[Path], video: Optional[Path] = None) -> Dict[str, Any]:
        source = (
            {"video": _image_fingerprint([video]), "num_frames_target": self.config.num_frames_target}
            if video is not None
            else {"images": _image_fingerprint(images)}
        )
        return {
            **source,
            "backbone": jsonable(self.config.backbone),
            "posing": jsonable(self.config.posing),
            "depth_format": self.config.depth_format,
            # only when set: caches written before lens options existed stay valid
            **({"lens": jsonable(self.config.lens)} if self.config.lens != LensOptions() else {}),
        }

    def _posed_image_folder(self, data: Path, images: List[Path]) -> Path:
        return self._posed_and_cached(data, self.cache_key(images), lambda: images)

    def _posed_video(self, video: Path) -> Path:
        """Frames sampled from ``video`` into a temporary folder (only when the cache does not match), posed, and
        cached with the frames in the dataset's images/."""
        from ns_extreme.io.video import extract_frames

        with tempfile.TemporaryDirectory(prefix="ns_extreme_frames_") as frames_dir:
            num_frames = self.config.num_frames_target
            return self._posed_and_cached(
                video, self.cache_key([], video=video), lambda: extract_frames(video, frames_dir, num_frames).paths
            )

    def _posed_and_cached(self, data: Path, key: Dict[str, Any], list_images: Callable[[], List[Path]]) -> Path:
        """The cache folder, posed again from ``list_images()`` unless it was written with this ``key``."""
        cache = self.cache_folder()
        provenance = cache / "extreme_poses.json"
        exists = cache.exists() or cache.is_symlink()
        if exists and not provenance.is_file():
            raise FileExistsError(
                f"extreme3d: cache folder {cache} exists but is not an extreme3d cache; remove it or pass --cache-dir"
            )
        if exists and not self.config.refresh_cache:
            try:
                stored = json.loads(provenance.read_text(encoding="utf-8")).get(CACHE_KEY)
            except (OSError, ValueError):
                stored = None
            if stored == key and (cache / "transforms.json").is_file():
                CONSOLE.print(f"[bold green]extreme3d:[/bold green] reusing cached poses in {cache}")
                return cache
            CONSOLE.print(
                f"[yellow]extreme3d: images or posing options changed since {cache} was written; posing again[/yellow]"
            )
        images = list_images()
        if len(images) < 2:
            raise ValueError(f"extreme3d: {data} has {len(images)} image(s); posing needs at least 2")

        from ns_extreme.io.dataset import write_dataset
        from ns_extreme.posing.loading import load_backbone
        from ns_extreme.posing.pipeline import pose_images
        from ns_extreme.posing.priors import check_priors_supported

        check_priors_supported(self.config.backbone.model, self.config.posing.depth_from)
        self.config.lens.lens(self.config.posing)  # its quick checks before any photo is copied

        CONSOLE.print(f"[bold]extreme3d:[/bold] posing {len(images)} images of {data} (cache: {cache})")
        backbone, _, report = load_backbone(self.config.backbone, say=CONSOLE.print)
        CONSOLE.print(report.summary())  # names the weights' licence
        with tempfile.TemporaryDirectory(prefix="ns_extreme_undistorted_") as folder:
            inputs = undistort_inputs(images, self.config.lens, self.config.posing, Path(folder), CONSOLE.print)
            recon = pose_images(inputs.images, backbone, inputs.posing, progress=True)
            extra = {
                "command": "extreme3d dataparser (on the fly)",
                "model": jsonable(report),
                "model_size": self.config.backbone.model_size,
                "network_input_size": backbone.target_size,
                "input": {"folder": str(data.absolute()), "images": len(images)},
                "depth_format": self.config.depth_format,
                "lens_distortion": inputs.record,
                CACHE_KEY: key,
            }
            write_dataset(recon, cache, overwrite=exists, depth_format=self.config.depth_format, extra_provenance=extra)
        return cache

    # ------------------------------------------------------------------ parsing

    def _split_indices(self, image_filenames: List[Path], split: str) -> np.ndarray:
        mode = self.config.eval_mode
        if mode == "auto":
            mode = "all" if len(image_filenames) <= self.config.sparse_max_views else "fraction"
        if mode == "fraction":
            i_train, i_eval = get_train_eval_split_fraction(image_filenames, self.config.train_split_fraction)
        elif mode == "filename":
            i_train, i_eval = get_train_eval_split_filename(image_filenames)
        elif mode == "interval":
            i_train, i_eval = get_train_eval_split_interval(image_filenames, self.config.eval_interval)
        elif mode == "all":
            i_train, i_eval = get_train_eval_split_all(image_filenames)
        else:
            raise ValueError(f"Unknown eval mode {self.config.eval_mode}")
        if split == "train":
            return np.asarray(i_train)
        if split in ("val", "test"):
            return np.asarray(i_eval)
        raise ValueError(f"Unknown dataparser split {split}")

    @functools.cached_property
    def _scene(self) -> _Scene:
        """transforms.json read once per parser (nerfstudio asks for each split) and mapped into the training
        frame; split-independent."""
        from ns_extreme.io.transforms_json import read_transforms_json

        json_path = self.dataset_json()
        data_dir = json_path.parent
        try:
            names, _w2c, K, sizes_wh, meta = read_transforms_json(json_path)
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path}: not valid JSON ({err}); re-run ns-process-data extreme-poses") from None
        top = meta["top_level"]

        # Same frame order as nerfstudio's parser (sorted by file name).
        order = np.argsort([str(data_dir / n) for n in names], kind="stable")
        poses = torch.from_numpy(meta["c2w_opengl"][order].astype(np.float32))
        depth_paths = meta["depth_paths"] if self.config.load_depth else None
        mask_paths = meta["mask_paths"]

        orientation_method = top.get("orientation_override", self.config.orientation_method)
        if "orientation_override" in top:
            CONSOLE.log(f"[yellow] Dataset is overriding orientation method to {orientation_method}")
        poses, transform_matrix = camera_utils.auto_orient_and_center_poses(
            poses, method=orientation_method, center_method=self.config.center_method
        )
        scale_factor = 1.0
        if self.config.auto_scale_poses:
            max_t = float(torch.max(torch.abs(poses[:, :3, 3])))
            if max_t > 1e-12:
                scale_factor /= max_t
            else:
                CONSOLE.print(
                    "[yellow]extreme3d: all cameras sit at one point; --auto-scale-poses has "
                    "nothing to normalise[/yellow]"
                )
        scale_factor *= self.config.scale_factor
        poses[:, :3, 3] *= scale_factor

        camera_model = meta["camera_model"]
        if camera_model not in CAMERA_MODEL_TO_TYPE:
            raise ValueError(f"extreme3d: unsupported camera_model {camera_model!r} in {json_path}")
        applied = meta["applied_transform"]
        if applied is not None:
            applied_h = torch.cat(
                [
                    torch.tensor(applied, dtype=transform_matrix.dtype),
                    torch.tensor([[0, 0, 0, 1]], dtype=transform_matrix.dtype),
                ],
                0,
            )
            dataparser_transform = transform_matrix @ applied_h
        else:
            dataparser_transform = transform_matrix

        points = None
        if self.config.load_3D_points:
            points = self._load_points(data_dir, meta.get("ply_file_path"), transform_matrix, scale_factor)
            if points is None:
                CONSOLE.print(
                    "[bold yellow]extreme3d: no point cloud in this dataset; splatfacto will use random initialisation"
                )

        return _Scene(
            json_path=json_path,
            image_filenames=[data_dir / names[i] for i in order],
            camera_to_worlds=poses[:, :3, :4],
            K=K[order],
            sizes_wh=sizes_wh[order],
            distortion=torch.from_numpy(meta["distortion_params"][order].astype(np.float32)),
            camera_type=CAMERA_MODEL_TO_TYPE[camera_model],
            depth_filenames=[data_dir / depth_paths[i] for i in order] if depth_paths else [],
            mask_filenames=[data_dir / mask_paths[i] for i in order] if mask_paths else [],
            dataparser_transform=dataparser_transform,
            scale_factor=scale_factor,
            dataparser_scale=scale_factor * float(top.get("applied_scale", 1.0)),
            points=points,
        )

    def display_frame(self) -> DisplayFrame:
        """Where the viewer panel draws this dataset: its transforms.json and the saved world -> training frame
        map, the same for every split."""
        scene = self._scene
        return DisplayFrame(scene.json_path, scene.dataparser_transform.numpy().astype(np.float64), scene.scale_factor)

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs: Any) -> DataparserOutputs:
        scene = self._scene
        indices = self._split_indices(scene.image_filenames, split)
        K, sizes_wh = scene.K[indices], scene.sizes_wh[indices]
        idx = torch.tensor(indices, dtype=torch.long)
        cameras = Cameras(
            fx=torch.from_numpy(K[:, 0, 0].astype(np.float32))[:, None],
            fy=torch.from_numpy(K[:, 1, 1].astype(np.float32))[:, None],
            cx=torch.from_numpy(K[:, 0, 2].astype(np.float32))[:, None],
            cy=torch.from_numpy(K[:, 1, 2].astype(np.float32))[:, None],
            width=torch.from_numpy(sizes_wh[:, 0].astype(np.int32))[:, None],
            height=torch.from_numpy(sizes_wh[:, 1].astype(np.int32))[:, None],
            distortion_params=scene.distortion[idx],
            camera_to_worlds=scene.camera_to_worlds[idx],
            camera_type=scene.camera_type,
        )
        depth_filenames = [scene.depth_filenames[i] for i in indices] if scene.depth_filenames else []
        mask_filenames = [scene.mask_filenames[i] for i in indices] if scene.mask_filenames else []
        depth_scale = self.config.depth_unit_scale_factor
        if depth_scale is None:
            depth_scale = 1.0 if depth_filenames and depth_filenames[0].suffix == ".npy" else 1e-3

        scene_scale = self.config.scene_scale
        return DataparserOutputs(
            image_filenames=[scene.image_filenames[i] for i in indices],
            cameras=cameras,
            scene_box=SceneBox(aabb=torch.tensor([[-scene_scale] * 3, [scene_scale] * 3], dtype=torch.float32)),
            mask_filenames=mask_filenames or None,
            dataparser_scale=scene.dataparser_scale,
            dataparser_transform=scene.dataparser_transform,
            metadata={
                "depth_filenames": depth_filenames or None,
                "depth_unit_scale_factor": depth_scale,
                "mask_color": self.config.mask_color,
                **(scene.points or {}),
            },
        )

    @staticmethod
    def _load_points(data_dir: Path, ply_file_path: Optional[str], transform_matrix: torch.Tensor, scale_factor: float):
        """points3D_xyz float32 [N,3] in the output frame and points3D_rgb uint8 [N,3] (None if absent/empty)."""
        if not ply_file_path:
            return None
        from ns_extreme.io.ply import read_ply

        path = data_dir / ply_file_path
        if not path.is_file():
            raise FileNotFoundError(f"extreme3d: ply_file_path {path} does not exist")
        xyz, rgb, _ = read_ply(path)
        if len(xyz) == 0:
            return None
        xyz_t = torch.from_numpy(np.asarray(xyz, dtype=np.float32))
        xyz_t = torch.cat([xyz_t, torch.ones_like(xyz_t[:, :1])], -1) @ transform_matrix.T.to(torch.float32)
        xyz_t = xyz_t * scale_factor
        if rgb is None:
            rgb = np.full((len(xyz), 3), 128, dtype=np.uint8)
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8:  # float colours in [0, 1]
            rgb = np.clip(np.round(rgb.astype(np.float64) * (255.0 if rgb.max() <= 1.0 else 1.0)), 0, 255).astype(
                np.uint8
            )
        return {"points3D_xyz": xyz_t.contiguous(), "points3D_rgb": torch.from_numpy(np.ascontiguousarray(rgb))}
