"""Video input: sample frames evenly from a video file, skip blurry ones, write them as numbered PNG files.

Decoded with PyAV (FFmpeg's libraries as a Python wheel; no ``ffmpeg`` program needed). Like nerfstudio's
``ns-process-data video``, about ``num_frames_target`` frames are kept, evenly spread over the video (all of
them when it has fewer). Each kept frame is the sharpest (variance of the Laplacian of a downscaled grey
copy) of up to ``MAX_CANDIDATES`` consecutive frames around its sample position, so a motion-blurred frame
gives way to a sharp neighbour while the spacing stays even. Files are named ``frame_00001.png``, ... in
video order. Phone videos' rotation metadata is applied, as ffmpeg does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
DEFAULT_NUM_FRAMES_TARGET = 300
"""As nerfstudio's ``ns-process-data video``."""
MAX_CANDIDATES = 9
"""Consecutive frames compared for sharpness around each sample position (±4 frames: 0.13 s at 30 fps)."""
SHARPNESS_MAX_SIDE = 320
"""Sharpness is measured on a grey copy at most this many pixels wide and high (cheap, and robust to noise)."""
PNG_COMPRESS_LEVEL = 3
"""zlib level of the written frames: near level 6's size at about twice its speed."""
FRAME_NAME = "frame_{:05d}.png"
TRUNCATION_TOLERANCE = 0.9
"""A video whose frames end before this fraction of its declared duration is reported as truncated."""


class VideoReadError(ValueError):
    """A video file could not be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")


def is_video_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a file with a video suffix (by name only)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class ExtractedFrames:
    """Frames written by ``extract_frames``."""

    paths: list[Path]
    """The PNG files, in video order."""
    source_indices: list[int]
    """For each file, the index (from 0) of its frame in the video."""
    video_frames: int
    """Frames the video holds."""


def sample_windows(num_frames: int, target: int, max_candidates: int = MAX_CANDIDATES) -> list[range]:
    """Frame indices compared for each kept frame: ``min(target, num_frames)`` evenly spaced stretches of the
    video, and in each the at most ``max_candidates`` frames around its middle."""
    count = min(max(target, 1), num_frames)
    windows = []
    for k in range(count):
        start, stop = k * num_frames // count, (k + 1) * num_frames // count
        size = min(stop - start, max(max_candidates, 1))
        first = start + (stop - start - size) // 2
        windows.append(range(first, first + size))
    return windows


def sharpness(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D image: low for blurred images."""
    g = np.asarray(grey, dtype=np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    laplacian = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(laplacian.var())


@dataclass(frozen=True)
class _Scan:
    frames: int
    end_s: Optional[float]
    declared_s: Optional[float]


def _av_errors() -> tuple[type[BaseException], ...]:
    import av.error

    return (av.error.FFmpegError, EOFError)


def _open(path: Path) -> Any:
    import av

    try:
        container = av.open(str(path), mode="r")
    except _av_errors() as err:
        raise VideoReadError(path, f"not a readable video ({_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, "the file has no video stream")
    return container


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:200]


def _seconds(value: Optional[int], time_base: Any) -> Optional[float]:
    return None if value is None or time_base is None else float(value * time_base)


def _scan(path: Path) -> _Scan:
    """Count the video's frames by demuxing it (reads packets, decodes nothing) and find where they end."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        frames, end = 0, None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's final flush packet
                    continue
                frames += 1
                start = _seconds(packet.pts if packet.pts is not None else packet.dts, packet.time_base)
                if start is not None:
                    finish = start + (_seconds(packet.duration, packet.time_base) or 0.0)
                    end = finish if end is None else max(end, finish)
        except _av_errors() as err:
            raise VideoReadError(path, f"damaged or truncated video data ({_reason(err)})") from None
        declared = _seconds(stream.duration, stream.time_base)
        if declared is None and container.duration:
            declared = container.duration / 1_000_000  # av.time_base: microseconds
        start_s = _seconds(stream.start_time, stream.time_base) or 0.0
        return _Scan(frames, None if end is None else end - start_s, declared)
    finally:
        container.close()


def _decoded_frames(container: Any, path: Path) -> Iterator[Any]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        yield from container.decode(stream)
    except _av_errors() as err:
        raise VideoReadError(path, f"damaged or truncated video data ({_reason(err)})") from None


def _grey_thumbnail(frame: Any) -> np.ndarray:
    scale = min(1.0, SHARPNESS_MAX_SIDE / max(frame.width, frame.height))
    width, height = max(3, round(frame.width * scale)), max(3, round(frame.height * scale))
    return frame.reformat(width=width, height=height, format="gray").to_ndarray()


def _write_png(frame: Any, path: Path) -> None:
    from PIL import Image

    rgb = frame.to_ndarray(format="rgb24")
    # Display-matrix rotation (phone videos), counter-clockwise degrees; ffmpeg applies it by default too.
    quarter_turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
    if quarter_turns:
        rgb = np.rot90(rgb, quarter_turns)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, compress_level=PNG_COMPRESS_LEVEL)


def extract_frames(
    video: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    num_frames_target: int = DEFAULT_NUM_FRAMES_TARGET,
    progress: bool = True,
) -> ExtractedFrames:
    """Write about ``num_frames_target`` sharp, evenly spaced frames of ``video`` into ``output_dir`` (which
    must exist) as ``frame_00001.png``, ...; raises VideoReadError for missing, empty, truncated, damaged or
    frameless files and files that are not videos."""
    from tqdm import tqdm

    path = Path(video)
    out = Path(output_dir)
    if num_frames_target < 1:
        raise ValueError(f"--num-frames-target must be at least 1, got {num_frames_target}")
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "the file is empty")
    scan = _scan(path)
    if scan.frames == 0:
        raise VideoReadError(path, "the video has no frames")
    if scan.declared_s and scan.end_s is not None and scan.end_s < TRUNCATION_TOLERANCE * scan.declared_s:
        raise VideoReadError(
            path, f"truncated video (its frames end at {scan.end_s:.1f} s of a declared {scan.declared_s:.1f} s)"
        )

    windows = sample_windows(scan.frames, num_frames_target)
    window_of = {index: k for k, window in enumerate(windows) for index in window}
    best: dict[int, tuple[float, int, Any]] = {}  # window -> (sharpness, frame index, frame)
    paths: list[Path] = []
    sources: list[int] = []

    def keep(k: int) -> None:
        _, index, frame = best.pop(k)
        target = out / FRAME_NAME.format(len(paths) + 1)
        _write_png(frame, target)
        paths.append(target)
        sources.append(index)

    decoded = 0
    container = _open(path)
    try:
        bar = tqdm(total=scan.frames, desc=f"reading {path.name}", unit="frame", disable=not progress, leave=False)
        with bar:
            for index, frame in enumerate(_decoded_frames(container, path)):
                decoded += 1
                bar.update()
                k = window_of.get(index)
                if k is None:
                    continue
                score = sharpness(_grey_thumbnail(frame))
                if k not in best or score > best[k][0]:
                    best[k] = (score, index, frame)
                if index == windows[k][-1]:
                    keep(k)
    finally:
        container.close()
    if decoded < TRUNCATION_TOLERANCE * scan.frames:
        raise VideoReadError(path, f"damaged video data (decoded {decoded} of its {scan.frames} frames)")
    for k in sorted(best):  # windows cut short by a few frames the decoder did not return
        keep(k)
    if not paths:
        raise VideoReadError(path, "no frame could be decoded")
    return ExtractedFrames(paths, sources, scan.frames)
