"""``extreme-poses``: pose a folder of photos and write a nerfstudio dataset (no nerfstudio import here).

The same ``ExtremePoses`` command is offered by ``ns-process-data extreme-poses`` (nerfstudio's stock
subcommands plus ours, see ``ns_extreme.nerfstudio.process_data``), by ``ns-extreme-process-data
extreme-poses`` and by ``python -m ns_extreme.cli.process``. Errors, interruptions and exit codes follow
``ns_extreme.cli.runtime``; the dataset writer stages everything in a hidden folder, so an interrupted or
failed run leaves no output at all.
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import tyro
from typing_extensions import Annotated

from ns_extreme.cli.runtime import jsonable, rearm_interrupt_signals, run_cli
from ns_extreme.io.video import DEFAULT_NUM_FRAMES_TARGET, VIDEO_SUFFIXES, is_video_file
from ns_extreme.posing.lens import LensOptions
from ns_extreme.posing.model_options import PoseModelOptions
from ns_extreme.posing.options import PosingOptions

OUT_OF_MEMORY = (
    "out of memory while posing; try --max-frames-per-pass 16 (overlapping chunks), "
    "--dtype bf16-weights (about half the memory), --dtype bf16/fp16 on a GPU, or fewer images"
)


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


_UNSUPPORTED = {
    (
        ".heic",
        ".heif",
        ".avif",
    ): "HEIC/HEIF/AVIF photos are not read: convert them to JPEG first (e.g. `heif-convert`, or export as JPEG)",
    (
        ".dng",
        ".cr2",
        ".cr3",
        ".nef",
        ".arw",
        ".orf",
        ".rw2",
        ".raf",
    ): "camera RAW files are not read: export them as JPEG/PNG/TIFF first",
    (".mp4", ".mov", ".avi", ".mkv", ".webm"): "videos in a folder are not read: pass one video file itself as --data",
}


def _unsupported_hint(skipped: Sequence[Path]) -> str:
    """``; <what to do>`` for skipped files of formats users expect to work (iPhone HEIC, RAW, video)."""
    hints = [h for exts, h in _UNSUPPORTED.items() if any(p.suffix.lower() in exts for p in skipped)]
    return "".join(f"; {h}" for h in hints)


def refinement_summary(recon: Any) -> str:
    """One line for the summary table: views refined / kept, median reprojection error, SfM points, time."""
    ref = recon.refinement
    if ref is None:
        return "off (--no-refine)"
    if ref.status == "failed":
        return f"none: {ref.warning}"
    median = ref.median_reproj_px()
    error = f", median reprojection error {median:.2f} px" if median is not None else ""
    return (
        f"{ref.num_refined} views refined, {len(ref.views) - ref.num_refined} kept{error}, "
        f"{len(ref.sfm_points):,} SfM points ({recon.timings.get('refine_s', 0.0):.1f} s)"
    )


def fetch_weights(opts: PoseModelOptions) -> None:
    """Bring Hugging Face weights into the local cache (one progress bar) before any status spinner starts:
    rich's spinner would hold huggingface_hub's progress bar back until the download ends."""
    from ns_extreme.models import get_spec
    from ns_extreme.models.loading import RANDOM_WEIGHTS
    from ns_extreme.models.weights import resolve_weights

    weights = opts.weights or get_spec(opts.model).default_weights
    if weights != RANDOM_WEIGHTS:
        resolve_weights(weights)


@dataclass
class ExtremePoses:
    """Pose a sparse photo collection (any view overlap) with a bias-aligned VGGT and write a nerfstudio
    dataset: images/, transforms.json (original resolution), sparse_pc.ply, depth/, colmap/sparse/0 and
    extreme_poses.json (provenance and per-pair diagnostics). Train with
    `ns-train splatfacto --data OUTPUT_DIR` or `ns-train splatfacto extreme3d --data OUTPUT_DIR`."""

    data: Path
    """Folder of images (JPEG/PNG/WebP/BMP/TIFF, any sizes; EXIF orientation honoured; at least 2), or a video file
    (mp4/mov/mkv/webm/avi): frames are sampled evenly (see --num-frames-target), blurry ones skipped."""
    output_dir: Path
    """Dataset folder to create (written atomically; refuses an existing folder without --overwrite)."""
    num_frames_target: int = DEFAULT_NUM_FRAMES_TARGET
    """Video --data only: how many frames to take, evenly spread over the video (all when it has fewer); each is
    the sharpest of a few consecutive frames around its position."""
    backbone: Annotated[PoseModelOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PoseModelOptions)
    posing: Annotated[PosingOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PosingOptions)
    compare_pretrained: bool = False
    """Also run the pretrained (unaligned) model and store its poses in extreme_poses.json for comparison."""
    depth_format: Literal["png", "npy", "none"] = "png"
    """Per-view depth maps: 16-bit PNG in millimetres of the dataset unit, float32 .npy, or none."""
    lens: Annotated[LensOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=LensOptions)
    """Known lens distortion, undone before posing."""
    num_downscales: int = 3
    """Also write images_2, images_4, ... images_(2**N) downscaled copies (as nerfstudio's ns-process-data does;
    gsplat --data_factor N, nerfstudio --downscale-factor N); 0 = none."""
    write_normals: bool = True
    """Models with a normal head (worldmirror): write normals/ (camera-frame unit normals as RGB PNG, original
    resolution; listed in transforms.json as normal_file_path)."""
    write_splats: bool = False
    """Models with a 3D Gaussian head (worldmirror): also write splats.ply, the head's Gaussians as a standard 3DGS
    PLY in the dataset's world, filtered by confidence (--conf-percentile) and opacity; it is also a coloured point
    cloud, usable as a splatfacto initialisation (set "ply_file_path": "splats.ply" in transforms.json)."""
    max_splats: int = 1_000_000
    """With --write-splats: keep at most this many Gaussians (a random subset of those that pass the filters)."""
    splat_voxel_size: float = 0.002
    """With --write-splats: Gaussians whose centres share a voxel of this edge, relative to their median depth, are
    merged into one (opacity-weighted, as the reference's export); 0 = one Gaussian per kept pixel."""
    overwrite: bool = False
    """Replace an existing output folder."""
    verbose: bool = False
    """Log more, and print tracebacks on errors."""
    collective_timeout: float = 1800.0
    """Under torchrun: seconds a rank waits for the others (e.g. for rank 0 loading images) before it stops with
    an error (a rank that died or hangs)."""

    def _check_model_options(self) -> None:
        """Options the chosen model cannot honour fail before any image is read (torch-free checks)."""
        from ns_extreme.posing.loading import check_splats_supported
        from ns_extreme.posing.priors import check_priors_supported

        check_priors_supported(self.backbone.model, self.posing.depth_from)
        if self.write_splats:
            check_splats_supported(self.backbone.model)
        if self.max_splats < 1:
            raise ValueError(f"--max-splats must be positive, got {self.max_splats}")
        if not 0 <= self.splat_voxel_size < 1:
            raise ValueError(f"--splat-voxel-size must be in [0, 1) (relative to the median depth), got "
                             f"{self.splat_voxel_size}")  # fmt: skip

    def _check_paths(self) -> list[Path]:
        """Check the input and output before any model is loaded; returns the images to pose.

        Non-image files, empty / unreadable / corrupt image files and byte-identical copies are skipped with a
        warning (listed in extreme_poses.json); an error only if fewer than 2 usable images remain.
        """
        from rich.markup import escape

        from ns_extreme.io.atomic import OutputExistsError, check_output_location

        self._check_model_options()
        from ns_extreme.io.images import scan_images, screen_images

        data = Path(self.data)
        if not data.exists():
            raise FileNotFoundError(f"--data: {'video' if is_video_file(data) else 'image folder'} not found: {data}")
        video = data if data.is_file() and is_video_file(data) else None
        if not data.is_dir() and video is None:
            raise ValueError(
                f"--data must be a folder of images or a video file ({', '.join(VIDEO_SUFFIXES)}), got a file: {data}"
            )
        out = Path(self.output_dir).absolute()
        src = data.absolute()
        if out == src or out in src.parents:
            what = "video" if video else "images"
            raise ValueError(f"--output-dir {self.output_dir} contains the input {what}; choose another folder")
        if (out.exists() or out.is_symlink()) and not self.overwrite:
            raise OutputExistsError(f"output folder already exists: {self.output_dir} (pass --overwrite to replace it)")
        if (out.exists() or out.is_symlink()) and (out.is_symlink() or not out.is_dir()):
            raise OutputExistsError(f"--output-dir {out} exists and is not a folder; refusing to replace it")
        check_output_location(out, "--output-dir")
        if video is not None:
            data = self._extract_video_frames(video)
        listing = scan_images(data)
        console = self._console()
        self._skipped = [p.name for p in listing.skipped]
        self._skip_reasons = {p.name: "not an image file (by extension)" for p in listing.skipped}
        self._skip_notes: list[str] = []
        hint = _unsupported_hint(listing.skipped)
        if listing.skipped:
            names = ", ".join(self._skipped[:5]) + (" ..." if len(self._skipped) > 5 else "")
            console.print(
                f"[yellow]warning:[/yellow] skipping {len(listing.skipped)} non-image "
                f"file(s): {escape(names)}{escape(hint)}"
            )
        if len(listing.images) < 2:
            raise ValueError(
                f"--data {data}: found {len(listing.images)} image(s); posing needs at least 2 "
                f"(JPEG/PNG/WebP/BMP/TIFF files directly in the folder){hint}"
            )
        screen = screen_images(listing.images)
        self._skipped_images = [{"file": s.path.name, "path": str(s.path), "reason": s.reason} for s in screen.skipped]
        for s in screen.skipped:
            self._skipped.append(s.path.name)
            self._skip_reasons[s.path.name] = s.reason
            note = f"skipping {s.describe()}"
            self._skip_notes.append(note)
            console.print(f"[yellow]warning:[/yellow] {escape(note)}")
        if len(screen.usable) < 2:
            shown = "; ".join(s.describe() for s in screen.skipped[:5]) + ("; ..." if len(screen.skipped) > 5 else "")
            raise ValueError(
                f"--data {data}: only {len(screen.usable)} of {len(listing.images)} images "
                "can be used, posing needs at "
                f"least 2 (skipped: {shown}); replace or remove the unreadable files, or add more photos"
            )
        usable = list(screen.usable)
        # every quick check before the undistortion, which writes a copy of each photo
        if self.num_downscales < 0:
            raise ValueError(f"--num-downscales must be 0 or more, got {self.num_downscales}")
        if self.posing.masks is not None:
            from ns_extreme.io.masks import mask_files_by_stem

            mask_files_by_stem(self.posing.masks, usable)
        from ns_extreme.posing.metric_scale import ScaleFromDistance, parse_scale_from

        self.posing.check_world_options()
        spec = parse_scale_from(self.posing.scale_from)
        names = [p.name for p in usable]
        if isinstance(spec, ScaleFromDistance):
            for name in (spec.a, spec.b):
                if name not in names:
                    raise ValueError(f"--scale-from: no photo in --data is named {name!r}")
        from ns_extreme.posing.lens import undistort_inputs

        if self.lens.lens(self.posing) is None and self.posing.poses_from is None:  # quick checks first
            return usable
        self._undistorted_dir = Path(tempfile.mkdtemp(prefix="ns_extreme_undistorted_"))
        with self._console().status("undistorting photos ...") as status:
            undistorted = undistort_inputs(usable, self.lens, self.posing, self._undistorted_dir, status.update)
        self.posing, self._lens = undistorted.posing, undistorted.record
        return undistorted.images

    def _extract_video_frames(self, video: Path) -> Path:
        """Sample the video's frames into a temporary folder (removed when ``main`` ends); returns the folder."""
        from ns_extreme.io.video import extract_frames

        self._frames_dir = Path(tempfile.mkdtemp(prefix="ns_extreme_frames_"))
        frames = extract_frames(video, self._frames_dir, self.num_frames_target, progress=True)
        self._video = {
            "file": str(video.absolute()),
            "frames_in_video": frames.video_frames,
            "num_frames_target": self.num_frames_target,
            "source_frame_indices": frames.source_indices,
        }
        if len(frames.paths) < 2:
            raise ValueError(f"--data {video}: the video gave {len(frames.paths)} frame(s); posing needs at least 2")
        return self._frames_dir

    def _console(self):
        from rich.console import Console

        from ns_extreme.distributed import env_rank

        return Console(soft_wrap=True, quiet=env_rank() != 0)  # under torchrun only rank 0 speaks

    def main(self) -> None:
        self._frames_dir: Optional[Path] = None
        self._undistorted_dir: Optional[Path] = None
        self._video: Optional[dict] = None
        self._lens: Optional[dict] = None
        try:
            self._pose_and_write()
        finally:
            for folder in (self._frames_dir, self._undistorted_dir):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)

    def _pose_and_write(self) -> None:
        from rich.markup import escape
        from rich.table import Table

        logging.basicConfig(
            level=logging.INFO if self.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        console = self._console()
        t0 = time.perf_counter()
        images = self._check_paths()  # before the slow imports: a mistyped path is reported at once

        from ns_extreme.io.dataset import write_dataset
        from ns_extreme.posing.loading import load_backbone
        from ns_extreme.posing.pipeline import pose_images

        rearm_interrupt_signals()  # pycolmap (imported by write_dataset) replaces the SIGTERM handler
        console.print(f"[bold]extreme-poses[/bold]: {len(images)} images in {escape(str(self.data))}")
        if self.posing.depth_from is not None and not Path(self.posing.depth_from).is_dir():
            raise FileNotFoundError(f"--depth-from: folder not found: {self.posing.depth_from}")

        from ns_extreme import distributed
        from ns_extreme.runtime import resolve_device

        with distributed.process_group(resolve_device(self.backbone.device), self.collective_timeout) as spread:
            if spread:
                # names, not paths: video frames go to a temporary folder of each rank
                distributed.check_same_on_all_ranks("options or images", [jsonable(self), [p.name for p in images]])
            fetch_weights(self.backbone)
            with console.status(f"loading {self.backbone.model} model ..."):
                t = time.perf_counter()
                backbone, compare, report = load_backbone(
                    self.backbone, self.compare_pretrained, say=console.print, splats=self.write_splats
                )
                load_s = time.perf_counter() - t
            console.print(escape(report.summary()))  # names the weights' licence
            main = distributed.is_main_process()
            recon = pose_images(
                images, backbone, self.posing, compare_backbone=compare, progress=main, distribute=spread
            )
        if recon is None:  # a rank other than 0: its chunks went to rank 0, which writes the dataset
            return
        recon.timings["model_load_s"] = load_s
        for note in recon.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(note)}")
        for s in recon.provenance.get("skipped_images", []):  # found while decoding (truncated data, ...)
            self._skipped.append(s["file"])
            self._skip_reasons[s["file"]] = s["reason"]
            self._skipped_images.append(s)
        recon.warnings[:0] = self._skip_notes  # the early ones were printed before the model loaded

        extra = {
            "command": "extreme-poses",
            "argv": list(sys.argv),
            "model": jsonable(report),
            "model_size": self.backbone.model_size,
            "network_input_size": backbone.target_size,
            "input": {
                "folder": str(Path(self.data).absolute()),
                "images": recon.num_views,
                "skipped_files": self._skipped,
                "skipped_reasons": self._skip_reasons,
                "video": self._video,
            },
            "skipped_images": self._skipped_images,
            "compare_pretrained": self.compare_pretrained,
            "depth_format": self.depth_format,
            "lens_distortion": self._lens,
        }
        splats = None
        if self.write_splats:
            from ns_extreme.posing.splats import splats_from_reconstruction

            splats = splats_from_reconstruction(
                recon, self.posing.conf_percentile, self.max_splats, self.posing.seed, self.splat_voxel_size
            )
            extra["splat_voxel_size"] = self.splat_voxel_size
        with console.status("writing dataset ..."):
            t = time.perf_counter()
            out = write_dataset(
                recon,
                self.output_dir,
                overwrite=self.overwrite,
                depth_format=self.depth_format,
                extra_provenance=extra,
                num_downscales=self.num_downscales,
                splats=splats,
                normals=self.write_normals,
            )
            write_s = time.perf_counter() - t

        total = time.perf_counter() - t0
        table = Table(title="extreme-poses summary", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        table.add_row("views posed", f"{recon.num_views}")
        table.add_row(
            "mean view confidence",
            f"{float(recon.view_confidence.mean()):.3f} (min {float(recon.view_confidence.min()):.3f})",
        )
        table.add_row("points kept", f"{len(recon.points_xyz):,}")
        priors = recon.provenance.get("network_priors") or {}
        if priors:
            table.add_row("network priors", ", ".join(f"{k}: {v} views" for k, v in priors.items()))
        if splats is not None:
            table.add_row("splats", f"{len(splats):,} Gaussians (splats.ply)")
        sources = {s: recon.intrinsics_source.count(s) for s in sorted(set(recon.intrinsics_source))}
        table.add_row("intrinsics", ", ".join(f"{k}: {v}" for k, v in sources.items()))
        table.add_row("refinement", refinement_summary(recon))
        overlaps = {}
        for p in recon.pairs:
            overlaps[p.overlap] = overlaps.get(p.overlap, 0) + 1
        if overlaps:
            table.add_row("pair overlap (estimated)", ", ".join(f"{k}: {v}" for k, v in sorted(overlaps.items())))
        table.add_row(
            "time",
            f"{total:.1f} s (model load {load_s:.1f} s, inference "
            f"{recon.timings.get('inference_s', 0.0):.1f} s, write {write_s:.1f} s)",
        )
        memory = f"{peak_memory_mb():,.0f} MB (process RSS)"
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            memory += f", {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB (CUDA)"
        table.add_row("peak memory", memory)
        table.add_row("output", escape(str(out)))
        console.print(table)
        console.print(
            f"next: [bold]ns-train splatfacto --data {escape(str(out))}[/bold] "
            f"(or [bold]ns-train splatfacto extreme3d --data {escape(str(out))}[/bold])"
        )


def entrypoint() -> None:
    """``python -m ns_extreme.cli.process --data ... --output-dir ...`` (the command without nerfstudio)."""
    raise SystemExit(run_cli(ExtremePoses, out_of_memory=OUT_OF_MEMORY))


if __name__ == "__main__":
    entrypoint()
