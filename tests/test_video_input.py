"""Video input (``--data clip.mp4``): even sampling, blurry frames skipped, errors, extreme-poses and extreme3d.

The videos are made here with PyAV: a fixed noise texture sliding by one pixel per frame under a white vertical
bar at x = index + 10, so every written frame tells which video frame it came from; chosen frames are blurred.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ns_extreme.io.video import (
    FRAME_NAME,
    MAX_CANDIDATES,
    VideoReadError,
    extract_frames,
    is_video_file,
    sample_windows,
    sharpness,
)

av = pytest.importorskip("av")

BIN = Path(sys.executable).parent
W, H = 64, 48
BLURRED = (6, 17, 25)
"""Blurred frames of the 40-frame test video; with 10 frames wanted, each lies in a 4-frame stretch of sharp ones."""
FORMATS = [("mp4", "libx264"), ("mov", "mpeg4"), ("mkv", "ffv1"), ("webm", "libvpx"), ("avi", "mpeg4")]


def make_video(path: Path, codec: str = "libx264", frames: int = 40, blurred: tuple[int, ...] = BLURRED) -> Path:
    texture = np.random.default_rng(0).integers(0, 256, (H, W + frames), dtype=np.uint8)
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    if codec == "libx264":
        stream.options = {"crf": "10"}
    for i in range(frames):
        rgb = np.repeat(texture[:, i : i + W, None], 3, axis=2)
        rgb[:, i + 10 : i + 14] = 255
        if i in blurred:
            rgb = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(3)))
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def bar_index(png: Path) -> float:
    """The video frame a written frame shows: the bar's centre minus 11.5 (it spans x = index + 10 ... + 13)."""
    columns = np.asarray(Image.open(png).convert("L"), dtype=np.float64).mean(axis=0)
    bright = np.flatnonzero(columns > 0.8 * columns.max())
    return float(bright.mean()) - 11.5


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """tempfile's folder for this test only: what the commands leave behind there is visible."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# ------------------------------------------------------------------------------------------ sampling


def test_sample_windows_are_even_and_centred():
    assert sample_windows(40, 10) == [range(4 * k, 4 * k + 4) for k in range(10)]
    assert sample_windows(5, 300) == [range(k, k + 1) for k in range(5)]
    long = sample_windows(9000, 300)
    assert len(long) == 300 and all(len(w) == MAX_CANDIDATES for w in long)
    assert long[:2] == [range(10, 19), range(40, 49)]  # the middle of each 30-frame stretch


def test_sharpness_is_lower_for_a_blurred_image():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64), dtype=np.uint8))
    assert sharpness(np.asarray(image.filter(ImageFilter.GaussianBlur(2)))) < 0.2 * sharpness(np.asarray(image))


def test_video_suffixes():
    assert all(is_video_file(f"clip.{ext.upper()}") for ext, _ in FORMATS)
    assert not is_video_file("photo.jpg")


@pytest.mark.parametrize("ext,codec", FORMATS)
def test_frames_are_even_in_order_and_sharp(tmp_path, ext, codec):
    video = make_video(tmp_path / f"clip.{ext}", codec)
    out = tmp_path / "frames"
    out.mkdir()
    frames = extract_frames(video, out, num_frames_target=10, progress=False)
    assert frames.video_frames == 40
    assert [p.name for p in frames.paths] == [FRAME_NAME.format(k) for k in range(1, 11)]
    assert sorted(out.iterdir()) == frames.paths
    for k, index in enumerate(frames.source_indices):
        assert 4 * k <= index < 4 * k + 4, frames.source_indices  # one per 4-frame stretch, in video order
    assert not set(BLURRED) & set(frames.source_indices), frames.source_indices
    shown = [bar_index(p) for p in frames.paths]
    assert np.allclose(shown, frames.source_indices, atol=1.0), (shown, frames.source_indices)
    assert Image.open(frames.paths[0]).size == (W, H)


def test_short_video_gives_every_frame(tmp_path):
    video = make_video(tmp_path / "short.mp4", frames=5, blurred=())
    out = tmp_path / "frames"
    out.mkdir()
    frames = extract_frames(video, out, progress=False)  # default target: 300
    assert frames.source_indices == [0, 1, 2, 3, 4] and len(frames.paths) == 5


# ------------------------------------------------------------------------------------------ bad videos


def _zero_frame_mkv(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("ffv1", rate=10)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    container.start_encoding()
    container.close()
    return path


def _audio_only(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=44100)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 44100
    for packet in [*stream.encode(frame), *stream.encode()]:
        container.mux(packet)
    container.close()
    return path


def _truncated(path: Path, codec: str) -> Path:
    whole = make_video(path.with_name("whole" + path.suffix), codec).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


BAD_VIDEOS = {
    "empty": (lambda p: (p.write_bytes(b""), p)[1], "clip.mp4", "the file is empty"),
    "not-a-video": (lambda p: (p.write_text("just text\n"), p)[1], "clip.mov", "not a readable video"),
    "truncated-mp4": (lambda p: _truncated(p, "libx264"), "clip.mp4", "not a readable video"),
    "truncated-mkv": (lambda p: _truncated(p, "ffv1"), "clip.mkv", "truncated video (its frames end at"),
    "truncated-webm": (lambda p: _truncated(p, "libvpx"), "clip.webm", "truncated video"),
    "zero-frames": (_zero_frame_mkv, "clip.mkv", "cannot read video"),
    "audio-only": (_audio_only, "clip.mp4", "no video stream"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_VIDEOS))
def test_bad_video_is_one_error_line_exit_2(case, tmp_path, private_tmp, monkeypatch, capsys):
    make, name, fragment = BAD_VIDEOS[case]
    video = make(tmp_path / name)
    with pytest.raises(VideoReadError, match="cannot read video"):
        extract_frames(video, private_tmp, progress=False)

    from ns_extreme.cli import process

    out = tmp_path / "out"
    args = ["--data", str(video), "--output-dir", str(out), "--model-size", "tiny", "--weights", "random"]
    monkeypatch.setattr(sys, "argv", ["extreme-poses", *args])
    with pytest.raises(SystemExit) as exit_info:
        process.entrypoint()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "reading clip" not in line]  # progress bar
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read video {video}: "), stderr
    assert fragment in lines[0], lines[0]
    assert not out.exists() and not [p for p in private_tmp.iterdir() if p.name.startswith("ns_extreme_frames_")]


def test_missing_video_and_other_files_are_named(tmp_path, monkeypatch, capsys):
    from ns_extreme.cli import process

    (tmp_path / "notes.txt").write_text("x")
    cases = [(tmp_path / "nowhere.mp4", "--data: video not found"), (tmp_path / "notes.txt", "or a video file (.mp4")]
    for data, fragment in cases:
        monkeypatch.setattr(sys, "argv", ["extreme-poses", "--data", str(data), "--output-dir", str(tmp_path / "out")])
        with pytest.raises(SystemExit) as exit_info:
            process.entrypoint()
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and fragment in stderr, stderr


# ------------------------------------------------------------------------------------------ end to end


def test_extreme_poses_on_a_video_writes_a_dataset(tmp_path):
    video = make_video(tmp_path / "clip.mp4")
    out = tmp_path / "dataset"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "120",
           "TMPDIR": str(tmp_path)}  # fmt: skip
    cmd = [str(BIN / "ns-process-data"), "extreme-poses", "--data", str(video), "--output-dir", str(out),
           "--num-frames-target", "10", "--model-size", "tiny", "--weights", "random"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [FRAME_NAME.format(k) for k in range(1, 11)]
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    meta = json.loads((out / "transforms.json").read_text())
    assert sorted(Path(f["file_path"]).name for f in meta["frames"]) == names
    assert {(f["w"], f["h"]) for f in meta["frames"]} == {(W, H)}
    video_record = json.loads((out / "extreme_poses.json").read_text())["input"]["video"]
    assert video_record["file"] == str(video) and video_record["frames_in_video"] == 40
    indices = video_record["source_frame_indices"]
    assert len(indices) == 10 and indices == sorted(indices) and not set(BLURRED) & set(indices)
    shown = [bar_index(out / "images" / n) for n in names]
    assert np.allclose(shown, indices, atol=1.0), (shown, indices)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ns_extreme_frames_")]  # temporary frames removed


def test_extreme3d_dataparser_poses_a_video_once(tmp_path, private_tmp, one_thread, capsys, monkeypatch):
    from ns_extreme.cli.process import PoseModelOptions
    from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParserConfig

    video = make_video(tmp_path / "clip.webm", "libvpx")
    tiny = PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype="fp32")

    def parse():
        config = Extreme3DDataParserConfig(data=video, backbone=tiny, num_frames_target=8)
        return config.setup().get_dataparser_outputs(split="train")

    outputs = parse()
    cache = tmp_path / ".clip.webm.extreme3d"
    assert [p.name for p in outputs.image_filenames] == [FRAME_NAME.format(k) for k in range(1, 9)]
    assert all(p.parent == cache / "images" for p in outputs.image_filenames)
    assert not list(private_tmp.iterdir())  # the sampled frames' temporary folder is gone
    capsys.readouterr()

    import ns_extreme.io.video as video_io

    monkeypatch.setattr(video_io, "extract_frames", lambda *a, **k: pytest.fail("a cached video was decoded again"))
    assert len(parse().image_filenames) == 8
    assert "reusing cached poses" in capsys.readouterr().out
