"""Bad inputs for every command (issue "Reliability and security"): one parametrised table per
command. Each row feeds one bad input to the real command and checks the documented outcome:

* an error: exit code 2, exactly one ``error: ...`` line on stderr that names the file / option and the fix,
  no "Traceback", and nothing left behind (no output folder, no hidden staging folder, no temp files);
* or a documented fallback (e.g. unreadable images are skipped with a warning and listed under
  ``skipped_files`` in extreme_poses.json);
* interruptions (SIGINT / SIGTERM) exit with 128 + signal and leave nothing half-written.

Console scripts run as subprocesses. To keep the file fast on a 2-core machine, most error rows of a command run
in one "batch" subprocess that executes the installed console script (``runpy.run_path(.venv/bin/<script>)``,
i.e. exactly what the shell runs) once per row, capturing each row's stdout / stderr / exit code; rows that need
a process of their own (signals, file-size limit, permissions, the fallback run) start the console script
directly. All subprocesses start when the table's fixture is first used and run 3 at a time. The ``extreme3d``
dataparser runs in-process. Inputs are tiny (64x48 images) and the model is the tiny random one.

Permissions: as root, files with mode 000 are still readable; rows that need a real EACCES then run under
``setpriv`` without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (still uid 0), and are skipped if that is impossible.

Related tests elsewhere (not repeated here): training interrupted in-process by SIGTERM, resumed bit-exactly,
and checkpoints written atomically (tests/test_align_train.py); atomic files / folders (tests/test_io_writers.py);
loader errors in-process (tests/test_loading.py, tests/test_images.py, tests/test_pairs.py).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

BIN = Path(sys.executable).parent
PROCESS = BIN / "ns-process-data"
ALIGN = BIN / "ns-extreme-align"
VIEW = BIN / "ns-extreme-view"
TINY = ["--model-size", "tiny", "--weights", "random", "--max-points", "5000"]
TINY_ALIGN = ["--model-size", "tiny", "--image-size", "56", "--device", "cpu", "--no-progress", "--weights", "random"]
W, H = 64, 48
PARALLEL = 3
TIMEOUT = 300
PANORAMA_WH = (12000, 1000)
PROGRESS = re.compile(r"\d+%\||^\s*$")  # tqdm bars (written to stderr) and blank lines


# ------------------------------------------------------------------------------------------------ helpers


class _Exploit:
    """Unpickling this runs code (creates the folder ``path``): the marker that pickled code was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    def lines(self, stream: str = "stderr") -> list[str]:
        text = getattr(self, stream)
        return [ln for ln in re.split(r"[\r\n]+", text) if not PROGRESS.search(ln)]


def error_line(res: Result, code: int = 2) -> str:
    """Assert one ``error:`` line (progress bars aside) and no traceback; return the line."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = res.lines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Everything under ``folder`` (relative names), e.g. a staging folder or temp file left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def env_for(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "HF_HUB_OFFLINE": "1",  # "no network": nothing may be downloaded
        "HF_HOME": str(root / "hf_home"),  # empty cache
        "TQDM_MININTERVAL": "0",
    }
    env.pop("NS_EXTREME_TRACEBACK", None)
    return env


def no_dac_prefix(probe_file: Path) -> Optional[list[str]]:
    """Command prefix under which file permissions apply to us ([] when not root), or None if impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [
        setpriv,
        "--bounding-set=-dac_override,-dac_read_search",
        "--inh-caps=-dac_override,-dac_read_search",
        "--",
    ]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"open({str(probe_file)!r}).read()"], capture_output=True, text=True
    )
    return prefix if "PermissionError" in probe.stderr else None


DRIVER = r'''
"""Run the installed console script once per case (as the shell would), capturing each case's output."""
import contextlib, errno, io, json, os, runpy, sys, time, traceback

def patch(name):
    if name.startswith("fsize:"):  # a file-size limit (`ulimit -f`), soft only so that it can be lifted again
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(name.split(":")[1]), hard))
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    if name.startswith("sigint_at_step:"):  # Ctrl-C arrives while training step N runs
        import signal
        import ns_extreme.align.train as tr
        real_loss, at, calls = tr.rotation_loss, int(name.split(":")[1]), [0]
        def loss(*a, **k):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGINT)
            return real_loss(*a, **k)
        tr.rotation_loss = loss
        return lambda: setattr(tr, "rotation_loss", real_loss)
    import ns_extreme.io.dataset as ds
    real = ds.write_ply
    if name == "enospc":  # the disk fills up while the dataset is being written
        def write_ply(path, *a, **k):
            with open(path, "wb") as f:
                f.write(b"ply\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    elif name == "slow_write":  # a long write: the test interrupts it
        def write_ply(path, *a, **k):
            sys.__stderr__.write("STAGING\n")
            sys.__stderr__.flush()
            time.sleep(120)
            return real(path, *a, **k)
    else:
        raise ValueError(name)
    ds.write_ply = write_ply
    return lambda: setattr(ds, "write_ply", real)

cases_file, results_file = sys.argv[1], sys.argv[2]
cases = json.loads(open(cases_file, encoding="utf-8").read())
results = {}
for case in cases:
    out, err = io.StringIO(), io.StringIO()
    undo = patch(case["patch"]) if case.get("patch") else None
    sys.argv = [case["script"], *case["args"]]
    code = 0
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(case["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    if undo:
        undo()
    results[case["key"]] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                            "seconds": time.perf_counter() - t0}
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)
'''


class Lab:
    """Runs the table's subprocesses in the background (PARALLEL at a time); rows wait for their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = env_for(root)
        self.driver = root / "driver.py"
        self.driver.write_text(DRIVER, encoding="utf-8")
        self.pool = ThreadPoolExecutor(max_workers=PARALLEL)
        self.futures: dict[str, Future] = {}
        self.batch_of: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def submit(self, name: str, fn: Callable[[], Any]) -> None:
        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.timings[name] = round(time.perf_counter() - t0, 1)

        self.futures[name] = self.pool.submit(timed)

    def batch(self, name: str, cases: list[dict[str, Any]], prefix: Optional[list[str]] = None) -> None:
        """Run ``cases`` ({key, script, args[, patch]}) through the driver in one subprocess."""
        cases_file = self.root / f"{name}.cases.json"
        results_file = self.root / f"{name}.results.json"
        cases_file.write_text(json.dumps(cases), encoding="utf-8")
        for c in cases:
            self.batch_of[c["key"]] = name

        def run() -> dict[str, Result]:
            cmd = [*(prefix or []), sys.executable, str(self.driver), str(cases_file), str(results_file)]
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, cwd=self.root)
            done = json.loads(results_file.read_text(encoding="utf-8")) if results_file.exists() else {}
            if proc.returncode != 0 or len(done) != len(cases):
                raise AssertionError(f"batch {name} failed ({proc.returncode}): {proc.stderr[-3000:]}")
            return {k: Result(**v) for k, v in done.items()}

        self.submit(name, run)

    def result(self, key: str) -> Any:
        name = self.batch_of.get(key, key)
        out = self.futures[name].result(timeout=TIMEOUT)
        return out[key] if key in self.batch_of else out

    def run(self, cmd: list[str], **kw: Any) -> Result:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, cwd=self.root, **kw)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def interrupt(self, cmd: list[str], when: Callable[[str], bool], sig: int) -> Result:
        """Start ``cmd``, send ``sig`` as soon as ``when(stderr so far)`` is true, collect the result."""
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = bytearray()
        out = bytearray()
        t_out = threading.Thread(target=lambda: out.extend(proc.stdout.read()), daemon=True)
        t_out.start()
        sent = False
        deadline = time.monotonic() + TIMEOUT
        fd = proc.stderr.fileno()
        while time.monotonic() < deadline:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            err.extend(chunk)
            if not sent and when(err.decode("utf-8", "replace")):
                assert proc.poll() is None, f"the process ended before the signal could be sent: {err.decode()[-2000:]}"
                proc.send_signal(sig)
                sent = True
        proc.wait(timeout=TIMEOUT)
        t_out.join(timeout=10)
        text = err.decode("utf-8", "replace")
        assert sent, f"the signal was never sent (the trigger did not appear): {text[-2000:]}"
        return Result(proc.returncode, out.decode("utf-8", "replace"), text)


# ------------------------------------------------------------------------------------------------ inputs


def noise_image(seed: int, w: int = W, h: int = H) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_bag(folder: Path) -> dict[str, tuple[int, int]]:
    """Odd-but-valid images (expected upright sizes) plus files that must be skipped; unicode + spaces."""
    folder.mkdir(parents=True)
    sizes: dict[str, tuple[int, int]] = {}

    def save(name: str, img: Image.Image, size: Optional[tuple[int, int]] = None, **kw: Any) -> None:
        img.save(folder / name, **kw)
        sizes[name] = size or img.size

    save("café 1.jpg", noise_image(1), quality=90)  # unicode and a space in the name
    save("gray.jpg", noise_image(2).convert("L"), quality=90)
    rgba = noise_image(3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((W, H)))
    save("rgba.png", rgba)
    g16 = (np.random.default_rng(4).random((H, W)) * 65535).astype(np.uint16)
    save("gray16.png", Image.fromarray(g16))  # 16-bit greyscale (mode I;16)
    save("cmyk.jpg", noise_image(5).convert("CMYK"), quality=90)
    save("palette.png", noise_image(6).quantize(64))
    pal = noise_image(7).quantize(16)
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° to display
    save("exif_rotated.jpg", noise_image(8), (H, W), quality=90, exif=exif.tobytes())
    pano = Image.linear_gradient("L").resize((PANORAMA_WH[0] // 10, PANORAMA_WH[1] // 10)).resize(PANORAMA_WH)
    save(
        "panorama 12000px.jpg",
        Image.merge("RGB", (pano, pano.transpose(Image.Transpose.FLIP_LEFT_RIGHT), pano)),
        quality=80,
    )
    save("portrait.png", noise_image(9, 30, 90))  # mixed sizes and aspect ratios
    save("small.webp", noise_image(10, 40, 30))
    save("b.bmp", noise_image(11))
    save("c.tif", noise_image(12))
    # to be skipped (documented fallback)
    noise_image(16, 8, 400).save(folder / "strip.png")  # 1:50, too tall to crop (would resize to 7000 rows)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "zero.jpg").write_bytes(b"")
    whole = jpeg_bytes(noise_image(13))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # header intact, pixel data cut
    png = (folder / "rgba.png").read_bytes()
    (folder / "corrupt.png").write_bytes(
        png[:40] + bytes(np.random.default_rng(14).integers(0, 256, 400, dtype=np.uint8))
    )
    (folder / "unreadable.jpg").write_bytes(jpeg_bytes(noise_image(15)))
    os.chmod(folder / "unreadable.jpg", 0)
    shutil.copy(folder / "café 1.jpg", folder / "zz copy of café 1.jpg")
    return sizes


BAG_SKIPPED = {
    "notes.txt": "not an image",
    "zero.jpg": "empty",
    "truncated.jpg": "truncated",
    "corrupt.png": "corrupt",
    "unreadable.jpg": "permission denied",
    "zz copy of café 1.jpg": "duplicate of café 1.jpg",
    "strip.png": "too tall for --preprocess crop",
}


def make_inputs(root: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ns_extreme.align.pairs import PairList, mine_pairs, views_from_transforms
    from ns_extreme.models import load_model
    from ns_extreme.models.vggt import VGGTConfig

    A: dict[str, Any] = {"root": root}

    def folder(name: str) -> Path:
        p = root / "inputs" / name
        p.mkdir(parents=True)
        A[name] = p
        return p

    good = folder("good")
    for i, name in enumerate(("a.jpg", "b.jpg", "c.png")):
        noise_image(100 + i).save(good / name)
    shutil.copy(good / "a.jpg", folder("one") / "a.jpg")
    folder("empty")
    nonimg = folder("nonimg")
    (nonimg / "notes.txt").write_text("x")
    (nonimg / "readme.md").write_text("x")
    (nonimg / ".DS_Store").write_bytes(b"\x00")
    heic = folder("heic")  # what an iPhone exports by default
    (heic / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (heic / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(65))
    broken = folder("broken")
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("this is not a JPEG\n")
    (broken / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    dups = folder("dups")
    shutil.copy(good / "a.jpg", dups / "x.jpg")
    shutil.copy(good / "a.jpg", dups / "x copy.jpg")
    many = folder("many")
    for i in range(24):
        noise_image(200 + i).save(many / f"{i:02d}.jpg")
    exists = folder("exists")
    (exists / "keep.txt").write_text("user data")
    A["afile"] = root / "inputs" / "afile.txt"
    A["afile"].write_text("a file, not a folder")
    A["bag_sizes"] = make_bag(root / "inputs" / "Fotos été 写真 bag")
    A["bag"] = root / "inputs" / "Fotos été 写真 bag"
    locked = folder("locked")  # unreadable folder
    noise_image(1).save(locked / "a.jpg")
    noise_image(2).save(locked / "b.jpg")
    os.chmod(locked, 0)
    ro = folder("readonly")  # output parent that is not writable
    os.chmod(ro, 0o555)

    # weights and checkpoints
    w = folder("weights")
    model = load_model("vggt", weights="random", alignment="pretrained", config=VGGTConfig.tiny())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    bias_name = "aggregator.frame_blocks.0.attn.qkv.bias"
    assert bias_name in state
    nan_state = dict(state)
    nan_state["camera_head.trunk.0.norm1.weight"] = torch.full_like(
        state["camera_head.trunk.0.norm1.weight"], float("nan")
    )
    save_file(nan_state, str(w / "nan.safetensors"))
    torch.save(state, w / "legacy.pt", _use_new_zipfile_serialization=False)  # valid, old torch format
    save_file({"conv1.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(10, 8)}, str(w / "resnet.safetensors"))
    (w / "garbage.safetensors").write_bytes(bytes(range(256)) * 4)
    (w / "weights.txt").write_text("not weights")
    A["marker_weights"] = root / "PWNED_weights"
    torch.save({"aggregator.camera_token": _Exploit(A["marker_weights"])}, w / "evil.pt")
    (w / "evil_legacy.pt").write_bytes(pickle.dumps({"aggregator.camera_token": _Exploit(A["marker_weights"])}))
    A["marker_bias"] = root / "PWNED_bias"
    torch.save({"bias_state_dict": {bias_name: _Exploit(A["marker_bias"])}}, w / "evil_bias.pth")
    shape = state[bias_name].shape
    torch.save(
        {"bias_state_dict": {"aggregator.frame_blocks.0.attn.nope.bias": torch.zeros(shape)}}, w / "bias_wrong_name.pth"
    )
    torch.save({"bias_state_dict": {bias_name: torch.zeros(shape[0] + 3)}}, w / "bias_wrong_shape.pth")
    torch.save({"bias_state_dict": {bias_name: torch.zeros(shape, dtype=torch.int64)}}, w / "bias_wrong_dtype.pth")
    torch.save({"bias_state_dict": {bias_name: torch.full(shape, float("inf"))}}, w / "bias_inf.pth")
    torch.save({"state_dict": {bias_name: torch.zeros(shape)}}, w / "bias_not_ours.pth")
    torch.save({bias_name: torch.zeros(shape)}, w / "bias_plain_state.pth")
    A["w"] = w

    # a tiny posed dataset and pair lists for ns-extreme-align
    from scipy.spatial.transform import Rotation

    posed = folder("posed")
    (posed / "images").mkdir()
    (posed / "broken").mkdir()
    frames = []
    for i in range(4):
        noise_image(300 + i).save(posed / "images" / f"{i}.png")
        c2w = np.eye(4)
        c2w[:3, :3] = Rotation.from_euler("y", 40 * i, degrees=True).as_matrix()
        c2w[:3, 3] = [0.1 * i, 0.0, 0.0]
        frames.append({"file_path": f"images/{i}.png", "transform_matrix": c2w.tolist(), "fl_x": 60.0, "fl_y": 60.0,
                       "cx": 32.0, "cy": 24.0, "w": W, "h": H})  # fmt: skip
    (posed / "transforms.json").write_text(json.dumps({"camera_model": "OPENCV", "frames": frames}))
    whole = (posed / "images" / "1.png").read_bytes()
    (posed / "broken" / "1.png").write_bytes(whole[: len(whole) // 3])
    pairs = PairList(
        str(posed), mine_pairs(views_from_transforms(posed / "transforms.json"), "posed", strategy="all", balance=False)
    )
    p = folder("pairs")
    pairs.save_json(p / "pairs.json")
    base = json.loads((p / "pairs.json").read_text())

    def variant(name: str, edit: Callable[[dict], None]) -> None:
        d = json.loads(json.dumps(base))
        edit(d)
        (p / name).write_text(json.dumps(d))

    variant("missing_field.json", lambda d: d["pairs"][0]["view1"].pop("fx"))
    variant("dotdot.json", lambda d: d["pairs"][0]["view1"].update(path="../../outside.png"))
    variant("absolute.json", lambda d: d["pairs"][0]["view2"].update(path="/etc/passwd"))
    variant("missing_image.json", lambda d: d["pairs"][0]["view1"].update(path="images/nope.png"))
    variant(
        "corrupt_image.json",
        lambda d: [
            pr[v].update(path="broken/1.png")
            for pr in d["pairs"]
            for v in ("view1", "view2")
            if pr[v]["path"] == "images/1.png"
        ],
    )
    variant("empty_list.json", lambda d: d.update(pairs=[]))
    (p / "invalid.json").write_text('{"format": "ns_extreme.pairs", "root": ".", "pairs": [')
    np.save(p / "pickled.npy", np.array({0: {"img1": {}}}, dtype=object), allow_pickle=True)
    A["marker_npy"] = root / "PWNED_npy"
    np.save(p / "evil.npy", np.array(_Exploit(A["marker_npy"]), dtype=object), allow_pickle=True)
    view = {
        "path": "../../etc/passwd",
        "qw": 1.0,
        "qx": 0.0,
        "qy": 0.0,
        "qz": 0.0,
        "fx": 50.0,
        "fy": 50.0,
        "width": 64,
        "height": 48,
    }
    np.save(
        p / "unscene_dotdot.npy",
        np.array({0: {"img1": view, "img2": dict(view, path="a/b.jpg"), "scene": "s"}}, dtype=object),
        allow_pickle=True,
    )

    # transforms.json sources for `pairs`
    for name, edit in {
        "t_missing_focal": lambda d: d["frames"][1].pop("fl_x"),
        "t_dotdot": lambda d: d["frames"][1].update(file_path="../../outside.png"),
        "t_no_matrix": lambda d: d["frames"][0].pop("transform_matrix"),
    }.items():
        t = folder(name)
        d = json.loads((posed / "transforms.json").read_text())
        edit(d)
        (t / "transforms.json").write_text(json.dumps(d))
    (folder("t_invalid") / "transforms.json").write_text('{"frames": [')

    # training run folders with bad checkpoints
    for name, content in {
        "run_truncated": b"PK\x03\x04truncated",
        "run_evil": pickle.dumps({"format": "ns_extreme.align.train", "biases": _Exploit(root / "PWNED_ckpt")}),
    }.items():
        (folder(name) / "checkpoints").mkdir()
        (A[name] / "checkpoints" / "step-000001.ckpt").write_bytes(content)
    A["marker_ckpt"] = root / "PWNED_ckpt"
    return A


# ------------------------------------------------------------------------------------------------ tables

# extreme-poses error rows: (id, args, fragments the error line must contain). {out} is this row's output
# folder (must not exist afterwards); {case} its parent (must stay empty unless the row pre-fills it).
POSES_ERRORS = [
    ("empty-folder", ["--data", "{empty}"], ["found 0 image(s)", "{empty}", "at least 2"]),
    ("one-image", ["--data", "{one}"], ["found 1 image(s)", "at least 2"]),
    ("only-non-image-files", ["--data", "{nonimg}"], ["found 0 image(s)"]),
    ("iphone-heic-photos", ["--data", "{heic}"], ["found 0 image(s)", "HEIC", "convert them to JPEG"]),
    ("data-missing", ["--data", "{root}/nowhere"], ["image folder not found", "nowhere"]),
    ("data-is-a-file", ["--data", "{good}/a.jpg"], ["must be a folder", "a.jpg"]),
    (
        "all-images-broken",
        ["--data", "{broken}"],
        ["only 0 of 3 images", "zero.jpg: file is empty", "text.jpg", "corrupt.png", "remove the unreadable files"],
    ),
    ("duplicates-only", ["--data", "{dups}"], ["only 1 of 2 images", "duplicate of x copy.jpg"]),
    ("output-exists", ["--output-dir", "{exists}"], ["already exists", "{exists}", "--overwrite"]),
    ("output-is-a-file", ["--output-dir", "{afile}", "--overwrite"], ["not a folder", "afile.txt"]),
    ("output-under-a-file", ["--output-dir", "{afile}/out"], ["afile.txt is a file, not a folder"]),
    ("output-is-the-input", ["--data", "{good}", "--output-dir", "{good}"], ["contains the input images"]),
    ("weights-file-missing", ["--weights", "{root}/nope.safetensors"], ["weights file not found", "nope.safetensors"]),
    (
        "weights-offline-not-cached",
        ["--weights", "facebook/VGGT-1B", "--model-size", "full"],
        ["not in the local cache", "HF_HUB_OFFLINE", "huggingface-cli download", "--weights"],
    ),
    (
        "weights-of-another-model",
        ["--weights", "{w}/resnet.safetensors"],
        ["resnet.safetensors does not fit this model", "missing keys"],
    ),
    (
        "weights-corrupt",
        ["--weights", "{w}/garbage.safetensors"],
        ["garbage.safetensors", "not a readable safetensors file"],
    ),
    ("weights-wrong-file-type", ["--weights", "{w}/weights.txt"], ["weights.txt", "unsupported weights file type"]),
    ("weights-pickled-code", ["--weights", "{w}/evil.pt"], ["evil.pt", "weights_only=True", "refused"]),
    (
        "weights-pickled-code-legacy-format",
        ["--weights", "{w}/evil_legacy.pt"],
        ["evil_legacy.pt", "weights_only=True", "refused"],
    ),
    ("bias-missing", ["--alignment", "{root}/nope.pth"], ["bias checkpoint not found", "nope.pth"]),
    (
        "bias-wrong-name",
        ["--alignment", "{w}/bias_wrong_name.pth"],
        ["bias_wrong_name.pth", "not parameters of this model"],
    ),
    ("bias-wrong-shape", ["--alignment", "{w}/bias_wrong_shape.pth"], ["bias_wrong_shape.pth", "wrong shapes"]),
    (
        "bias-wrong-dtype",
        ["--alignment", "{w}/bias_wrong_dtype.pth"],
        ["bias_wrong_dtype.pth", "not a floating-point tensor"],
    ),
    ("bias-inf-values", ["--alignment", "{w}/bias_inf.pth"], ["bias_inf.pth", "NaN or Inf"]),
    ("bias-not-a-bias-checkpoint", ["--alignment", "{w}/bias_not_ours.pth"], ["bias_not_ours.pth", "bias_state_dict"]),
    ("bias-plain-state-dict", ["--alignment", "{w}/bias_plain_state.pth"], ["bias_plain_state.pth", "bias_state_dict"]),
    ("bias-pickled-code", ["--alignment", "{w}/evil_bias.pth"], ["evil_bias.pth", "weights_only=True"]),
    ("nan-model-outputs", ["--weights", "{w}/nan.safetensors"], ["NaN/Inf", "--dtype fp32", "check the weights"]),
    ("masks-folder-missing", ["--masks", "{root}/nomasks"], ["--masks: folder not found", "nomasks"]),
    ("masks-missing-for-photos", ["--masks", "{empty}"], ["no mask for 3 photo(s)", "a.jpg", "matched by file stem"]),
    ("scale-from-bad-string", ["--scale-from", "a.jpg,b.jpg"], ["--scale-from must be exif-gps or A.jpg,B.jpg,METRES"]),
    ("scale-from-unknown-photo", ["--scale-from", "a.jpg,zz.jpg,2"], ["no photo in --data is named 'zz.jpg'"]),
    (
        "camera-params-wrong-count",
        ["--camera-model", "OPENCV", "--camera-params", "1,2,3"],
        ["--camera-params for OPENCV must be fx,fy,cx,cy,k1,k2,p1,p2"],
    ),
    ("camera-params-without-model", ["--camera-params", "1,1,1,1,0,0,0,0"], ["--camera-model and --camera-params"]),
    ("num-downscales-negative", ["--num-downscales", "-1"], ["--num-downscales must be 0 or more"]),
    ("poses-from-missing", ["--poses-from", "{root}/nomodel"], ["--poses-from: ", "nomodel not found"]),
    (
        "poses-from-not-a-model",
        ["--poses-from", "{empty}"],
        ["--poses-from", "expected a COLMAP model folder (cameras, images .bin or .txt) or a transforms.json"],
    ),
    ("depth-prior-for-a-model-without-one", ["--depth-from", "{root}"], ["--depth-from: vggt takes no depth prior"]),
    ("splats-from-a-model-without-them", ["--write-splats"], ["--write-splats: vggt predicts no 3D Gaussians"]),
    (
        "splat-voxel-size-negative",
        ["--model", "worldmirror", "--write-splats", "--splat-voxel-size", "-0.1"],
        ["--splat-voxel-size must be in [0, 1)"],
    ),
    (
        "depth-prior-folder-missing",
        ["--model", "worldmirror", "--depth-from", "{root}/nodepth"],
        ["--depth-from: folder not found", "nodepth"],
    ),
    (
        "depth-prior-no-matching-file",
        ["--model", "worldmirror", "--depth-from", "{empty}"],
        ["--depth-from", "no depth file matches an input image", "<image stem>.png"],
    ),
    (
        "disk-full-while-writing",
        ["--patch=enospc"],
        ["could not write {out}", "sparse_pc.ply", "no space left on device", "nothing was written"],
    ),
    (
        "file-size-limit-while-writing",
        ["--patch=fsize:16384"],
        ["could not write {out}", "file too large", "ulimit -f", "nothing was written"],
    ),
]
# rows whose process needs file permissions to apply (run without CAP_DAC_OVERRIDE when root)
POSES_PERMISSION_ERRORS = [
    ("folder-unreadable", ["--data", "{locked}"], ["image folder is not readable", "{locked}"]),
    ("output-not-writable", ["--output-dir", "{readonly}/out"], ["cannot write in {readonly}", "permission denied"]),
]
# the fallback run: every odd-but-valid image is posed, every broken file skipped with a warning
BAG_ROWS = [
    "non-image-files-mixed-in", "hidden-files-ignored", "zero-byte-file", "truncated-jpeg", "corrupt-png",
    "unreadable-file", "duplicate-images", "grayscale", "rgba", "16-bit", "cmyk", "palette", "palette-transparency",
    "exif-rotated", "12000px-wide", "mixed-sizes-and-aspect-ratios", "webp-bmp-tiff", "unicode-and-spaces-in-paths",
    "extreme-aspect-ratio",
]  # fmt: skip
POSES_OTHER = ["sigint-during-inference", "sigterm-during-inference", "sigterm-while-writing"]

ALIGN_ERRORS = [
    # pairs
    ("pairs: source missing", ["pairs", "--sources", "{root}/nowhere", "--output", "{case}/p.json"],
     ["source not found", "nowhere"]),
    ("pairs: empty folder", ["pairs", "--sources", "{empty}", "--output", "{case}/p.json"],
     ["{empty}", "not a COLMAP model"]),
    ("pairs: pickled npy without --allow-pickle", ["pairs", "--sources", "{pairs}/pickled.npy", "--output",
      "{case}/p.json"], ["pickled.npy", "--allow-pickle"]),
    ("pairs: pickled code without --allow-pickle", ["pairs", "--sources", "{pairs}/evil.npy", "--output",
      "{case}/p.json"], ["evil.npy", "--allow-pickle"]),
    ("pairs: npy path escaping its root", ["pairs", "--sources", "{pairs}/unscene_dotdot.npy", "--allow-pickle",
      "--output", "{case}/p.json"], ["unscene_dotdot.npy", "escapes", "'..'"]),
    ("pairs: transforms missing focal", ["pairs", "--sources", "{t_missing_focal}", "--output", "{case}/p.json"],
     ["t_missing_focal", "focal length missing"]),
    ("pairs: transforms missing matrix", ["pairs", "--sources", "{t_no_matrix}", "--output", "{case}/p.json"],
     ["t_no_matrix", "transform_matrix"]),
    ("pairs: transforms invalid JSON", ["pairs", "--sources", "{t_invalid}", "--output", "{case}/p.json"],
     ["t_invalid", "invalid JSON"]),
    ("pairs: transforms path escaping its root", ["pairs", "--sources", "{t_dotdot}", "--output", "{case}/p.json"],
     ["outside.png", "not inside the root folder"]),
    ("pairs: output under a file", ["pairs", "--sources", "{posed}", "--output", "{afile}/p.json"], ["afile.txt"]),
    # train
    ("train: pair list missing", ["train", "--pairs", "{root}/nope.json", "--output-dir", "{out}"],
     ["nope.json", "pair list not found", "ns-extreme-align pairs"]),
    ("train: missing field", ["train", "--pairs", "{pairs}/missing_field.json", "--output-dir", "{out}"],
     ["missing_field.json: pair 0: field 'view1.fx'", "missing field"]),
    ("train: path escaping root", ["train", "--pairs", "{pairs}/dotdot.json", "--output-dir", "{out}"],
     ["dotdot.json: pair 0", "escapes the pair list's root"]),
    ("train: absolute path", ["train", "--pairs", "{pairs}/absolute.json", "--output-dir", "{out}"],
     ["absolute.json: pair 0", "absolute path"]),
    ("train: pickled pair file", ["train", "--pairs", "{pairs}/pickled.npy", "--output-dir", "{out}"],
     ["pickled.npy", "not a JSON pair list", "--allow-pickle"]),
    ("train: invalid JSON", ["train", "--pairs", "{pairs}/invalid.json", "--output-dir", "{out}"],
     ["invalid.json", "invalid JSON"]),
    ("train: empty pair list", ["train", "--pairs", "{pairs}/empty_list.json", "--output-dir", "{out}"],
     ["empty_list.json", "no pairs"]),
    ("train: image missing", ["train", "--pairs", "{pairs}/missing_image.json", "--output-dir", "{out}"],
     ["nope.png", "missing"]),
    ("train: corrupt image in a worker", ["train", "--pairs", "{pairs}/corrupt_image.json", "--output-dir", "{out}",
      "--num-workers", "1", "--max-steps", "6", "--batch-size", "1", "--weights", "random"],
     ["cannot read image", "broken/1.png", "truncated"]),
    ("train: bias wrong name", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--init-alignment",
      "{w}/bias_wrong_name.pth"], ["bias_wrong_name.pth", "not parameters"]),
    ("train: bias wrong shape", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--init-alignment",
      "{w}/bias_wrong_shape.pth"], ["bias_wrong_shape.pth", "wrong shapes"]),
    ("train: bias wrong dtype", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--init-alignment",
      "{w}/bias_wrong_dtype.pth"], ["bias_wrong_dtype.pth", "floating-point"]),
    ("train: bias pickled code", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--init-alignment",
      "{w}/evil_bias.pth"], ["evil_bias.pth", "weights_only=True"]),
    ("train: weights of another model", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--weights",
      "{w}/resnet.safetensors"], ["resnet.safetensors does not fit this model"]),
    ("train: weights offline", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--weights",
      "facebook/VGGT-1B"], ["not in the local cache", "huggingface-cli download"]),
    ("train: weights pickled code", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--weights",
      "{w}/evil.pt"], ["evil.pt", "weights_only=True"]),
    ("train: nan weights", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{out}", "--weights",
      "{w}/nan.safetensors", "--max-steps", "1"], ["non-finite loss", "check --weights"]),
    ("train: resume truncated checkpoint", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{run_truncated}",
      "--resume"], ["step-000001.ckpt", "not a readable training checkpoint", "Delete this file"]),
    ("train: resume pickled-code checkpoint", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{run_evil}",
      "--resume"], ["step-000001.ckpt", "refused", "weights_only=True", "Delete this file"]),
    ("train: checkpoints exist without --resume", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir",
      "{run_truncated}"], ["already holds training checkpoints", "--resume"]),
    ("train: output under a file", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{afile}/run",
      "--max-steps", "1", "--weights", "random"], ["afile.txt"]),
    # eval
    ("eval: pair list missing", ["eval", "--pairs", "{root}/nope.json", "--models", "pretrained", "--output-dir",
      "{out}"], ["nope.json", "pair list not found"]),
    ("eval: bias checkpoint missing", ["eval", "--pairs", "{pairs}/pairs.json", "--models", "mine={root}/nope.pth",
      "--output-dir", "{out}"], ["nope.pth", "not found"]),
    ("eval: bias wrong name", ["eval", "--pairs", "{pairs}/pairs.json", "--models", "{w}/bias_wrong_name.pth",
      "--output-dir", "{out}"], ["bias_wrong_name.pth", "not parameters"]),
    ("eval: bias pickled code", ["eval", "--pairs", "{pairs}/pairs.json", "--models", "{w}/evil_bias.pth",
      "--output-dir", "{out}"], ["evil_bias.pth", "weights_only=True"]),
    ("eval: nan weights", ["eval", "--pairs", "{pairs}/pairs.json", "--models", "pretrained", "--weights",
      "{w}/nan.safetensors", "--output-dir", "{out}"], ["NaN/Inf", "check --weights"]),
    ("eval: corrupt image", ["eval", "--pairs", "{pairs}/corrupt_image.json", "--models", "pretrained", "--output-dir",
      "{out}", "--weights", "random"], ["cannot read image", "broken/1.png"]),
    ("eval: pickled pair file", ["eval", "--pairs", "{pairs}/evil.npy", "--models", "pretrained", "--output-dir",
      "{out}"], ["evil.npy", "not a JSON pair list"]),
    ("eval: weights of another model", ["eval", "--pairs", "{pairs}/pairs.json", "--models", "pretrained", "--weights",
      "{w}/resnet.safetensors", "--output-dir", "{out}"], ["does not fit this model"]),
]  # fmt: skip
ALIGN_PERMISSION_ERRORS = [
    ("pairs: output not writable", ["pairs", "--sources", "{posed}", "--output", "{readonly}/p.json"],
     ["could not write {readonly}/p.json", "permission denied"]),
    ("train: output not writable", ["train", "--pairs", "{pairs}/pairs.json", "--output-dir", "{readonly}/run",
      "--weights", "random", "--max-steps", "1"], ["{readonly}/run", "permission denied"]),
    ("eval: output not writable", ["eval", "--pairs", "{pairs}/pairs.json", "--models", "pretrained", "--weights",
      "random", "--output-dir", "{readonly}/ev", "--no-plots"], ["{readonly}/ev", "permission denied"]),
]  # fmt: skip
ALIGN_OTHER = ["train: sigint mid-run, checkpoint valid, --resume completes"]

VIEW_ERRORS = [
    ("folder missing", ["{root}/nowhere"], ["nowhere does not exist"]),
    ("empty folder", ["{empty}"], ["{empty}", "not a dataset folder", "ns-process-data extreme-poses"]),
    (
        "image folder, not a dataset",
        ["{good}"],
        ["folder of images, not a posed dataset", "ns-process-data extreme-poses"],
    ),
    ("invalid transforms.json", ["{t_invalid}/transforms.json"], ["transforms.json", "not a readable transforms.json"]),
    ("bad port", ["{posed}", "--port", "70000"], ["--port must be in 0..65535"]),
]


def _key(table: str, row_id: str) -> str:
    return f"{table}:{row_id}"


def _fmt(A: dict[str, Any], case: Path, items: list[str]) -> list[str]:
    values = {k: str(v) for k, v in A.items() if isinstance(v, Path)}
    values.update(case=str(case), out=str(case / "out"))
    return [s.format(**values) for s in items]


def _case_dir(A: dict[str, Any], table: str, row_id: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", row_id).strip("-")
    case = A["root"] / "cases" / table / slug
    case.mkdir(parents=True, exist_ok=True)
    return case


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad_inputs")
    os.chmod(root, 0o755)
    A = make_inputs(root)
    lab = Lab(root)
    lab.inputs = A
    lab.no_dac = no_dac_prefix(A["bag"] / "unreadable.jpg")

    # -- extreme-poses
    def poses_case(table: str, row_id: str, args: list[str]) -> dict[str, Any]:
        case = _case_dir(A, table, row_id)
        base = {"--data": str(A["good"]), "--output-dir": str(case / "out")}
        patch = None
        rest: list[str] = []
        it = iter(_fmt(A, case, args))
        for a in it:
            if a.startswith("--patch="):
                patch = a.split("=", 1)[1]
            elif a in base:
                base[a] = next(it)
            else:
                rest.append(a)
        argv = ["extreme-poses", "--data", base["--data"], "--output-dir", base["--output-dir"], *TINY, *rest]
        return {"key": _key(table, row_id), "script": str(PROCESS), "args": argv, "patch": patch}

    legacy = poses_case("poses", "legacy-torch-weights", ["--weights", "{w}/legacy.pt", "--depth-format", "none"])
    lab.batch("poses", [poses_case("poses", r[0], r[1]) for r in POSES_ERRORS] + [legacy])

    # -- ns-extreme-align
    def align_case(table: str, row_id: str, args: list[str]) -> dict[str, Any]:
        case = _case_dir(A, table, row_id)
        argv = _fmt(A, case, args)
        if argv[0] in ("train", "eval"):
            argv = [argv[0], *TINY_ALIGN, *argv[1:]]  # the row's own options come last and win
        return {"key": _key(table, row_id), "script": str(ALIGN), "args": argv}

    cases = [align_case("align", r[0], r[1]) for r in ALIGN_ERRORS]
    lab.batch("align-a", [c for c in cases if c["args"][0] != "train"])
    run = _case_dir(A, "align", "train-interrupt") / "run"
    lab.train_run = run
    train = ["train", *TINY_ALIGN, "--pairs", str(A["pairs"] / "pairs.json"), "--output-dir", str(run),
             "--epochs", "500", "--batch-size", "1", "--checkpoint-every", "100000"]  # fmt: skip
    interrupted = [
        {"key": "train-interrupted", "script": str(ALIGN), "args": train, "patch": "sigint_at_step:2"},
        {"key": "train-resumed", "script": str(ALIGN), "args": [*train, "--resume", "--max-steps", "4"]},
    ]
    lab.batch("align-b", [c for c in cases if c["args"][0] == "train"] + interrupted)
    # -- the fallback run, and rows that need file permissions to apply (one process without DAC override)
    bag_out = root / "cases" / "bag" / "dataset été 1"
    bag_out.parent.mkdir(parents=True)
    lab.bag_out = bag_out
    bag = {
        "key": "bag",
        "script": str(PROCESS),
        "args": ["extreme-poses", "--data", str(A["bag"]), "--output-dir", str(bag_out), *TINY],
    }
    view = [
        {"key": _key("view", r[0]), "script": str(VIEW), "args": _fmt(A, _case_dir(A, "view", r[0]), r[1])}
        for r in VIEW_ERRORS
    ]
    if lab.no_dac is not None:
        perm = [poses_case("poses", r[0], r[1]) for r in POSES_PERMISSION_ERRORS]
        perm += [align_case("align", r[0], r[1]) for r in ALIGN_PERMISSION_ERRORS]
        lab.batch("permissions", [bag, *perm, *view], prefix=lab.no_dac)
    else:
        lab.batch("permissions", [bag, *view])

    # -- processes of their own
    # Many short passes (11 for 24 images) keep inference running for seconds, not one: the signal must land
    # while it runs even when this test's reader of the progress bar is late on a loaded machine.
    many = ["extreme-poses", "--data", str(A["many"]), *TINY, "--max-frames-per-pass", "4", "--chunk-overlap", "2"]

    def sig_run(row: str, sig: int) -> Result:
        case = _case_dir(A, "poses", row)
        return lab.interrupt([str(PROCESS), *many, "--output-dir", str(case / "out")], lambda e: "inference" in e, sig)

    lab.submit("poses:sigint-during-inference", lambda: sig_run("sigint-during-inference", signal.SIGINT))
    lab.submit("poses:sigterm-during-inference", lambda: sig_run("sigterm-during-inference", signal.SIGTERM))

    def sigterm_while_writing() -> Result:
        case = _case_dir(A, "poses", "sigterm-while-writing")
        cases = [
            {
                "key": "w",
                "script": str(PROCESS),
                "patch": "slow_write",
                "args": [*many, "--output-dir", str(case / "out")],
            }
        ]
        (root / "slow.cases.json").write_text(json.dumps(cases))
        cmd = [sys.executable, str(lab.driver), str(root / "slow.cases.json"), str(root / "slow.results.json")]
        driver = lab.interrupt(cmd, lambda e: "STAGING" in e, signal.SIGTERM)
        assert driver.returncode == 0, driver.stderr[-3000:]
        return Result(**json.loads((root / "slow.results.json").read_text())["w"])

    lab.submit("poses:sigterm-while-writing", sigterm_while_writing)

    yield lab
    lab.pool.shutdown(wait=True, cancel_futures=True)
    print(f"\nbad-input subprocess wall times (s, {PARALLEL} at a time): {lab.timings}")
    if os.environ.get("NS_EXTREME_BAD_INPUT_TIMES"):
        for name, fut in lab.futures.items():
            if name in lab.batch_of.values() and not fut.exception():
                print(name, {k: round(r.seconds, 1) for k, r in fut.result().items()})
                for k, r in fut.result().items():
                    print(f"  {k} [{r.returncode}] {[ln for ln in r.lines() if ln.startswith('error')][:1]}")
    for p in (A["locked"], A["readonly"]):
        os.chmod(p, 0o755)


# ------------------------------------------------------------------------------------------------ extreme-poses


def assert_clean_case(lab: Lab, table: str, row_id: str, allowed: tuple[str, ...] = ()) -> None:
    case = _case_dir(lab.inputs, table, row_id)
    left = [p for p in leftovers(case) if not p.startswith(allowed) or not allowed]
    assert left == [], f"left behind: {left}"


@pytest.mark.parametrize("row_id, args, fragments", POSES_ERRORS, ids=[r[0] for r in POSES_ERRORS])
def test_extreme_poses_errors(lab: Lab, row_id: str, args: list[str], fragments: list[str]) -> None:
    res = lab.result(_key("poses", row_id))
    line = error_line(res)
    for f in _fmt(lab.inputs, _case_dir(lab.inputs, "poses", row_id), fragments):
        assert f in line, (f, line)
    assert_clean_case(lab, "poses", row_id)
    A = lab.inputs
    assert (A["exists"] / "keep.txt").read_text() == "user data" and sorted(os.listdir(A["exists"])) == ["keep.txt"]
    assert A["afile"].read_text() == "a file, not a folder"
    assert not A["marker_weights"].exists() and not A["marker_bias"].exists(), "pickled code ran"
    assert leftovers(A["good"]) == ["a.jpg", "b.jpg", "c.png"]


@pytest.mark.parametrize(
    "row_id, args, fragments", POSES_PERMISSION_ERRORS, ids=[r[0] for r in POSES_PERMISSION_ERRORS]
)
def test_extreme_poses_permission_errors(lab: Lab, row_id: str, args: list[str], fragments: list[str]) -> None:
    if lab.no_dac is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    line = error_line(lab.result(_key("poses", row_id)))
    for f in _fmt(lab.inputs, _case_dir(lab.inputs, "poses", row_id), fragments):
        assert f in line, (f, line)
    assert_clean_case(lab, "poses", row_id)
    assert os.listdir(lab.inputs["readonly"]) == []


def test_extreme_poses_legacy_torch_weights(lab: Lab) -> None:
    """Not a bad input: a valid state dict saved by old torch (non-zip format) must load (weights_only=True)."""
    res = lab.result("poses:legacy-torch-weights")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.fixture(scope="module")
def bag(lab: Lab) -> tuple[Result, dict[str, Any], dict[str, Any]]:
    res = lab.result("bag")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    out = lab.bag_out
    meta = json.loads((out / "transforms.json").read_text(encoding="utf-8"))
    prov = json.loads((out / "extreme_poses.json").read_text(encoding="utf-8"))
    return res, meta, prov


@pytest.mark.parametrize("row_id", BAG_ROWS)
def test_extreme_poses_fallbacks(lab: Lab, bag, row_id: str) -> None:
    """One run on a folder (unicode + spaces in its name) mixing every odd-but-valid image with broken files."""
    res, meta, prov = bag
    A = lab.inputs
    sizes = A["bag_sizes"]
    frames = {Path(f["file_path"]).stem: f for f in meta["frames"]}
    skipped = prov["input"]["skipped_files"]
    reasons = prov["input"]["skipped_reasons"]
    warnings = "\n".join(prov["warnings"])

    def posed(name: str) -> dict[str, Any]:
        f = frames[Path(name).stem]
        assert (f["w"], f["h"]) == sizes[name], (name, f["w"], f["h"])
        with Image.open(lab.bag_out / f["file_path"]) as img:  # what nerfstudio reads: plain PIL
            assert img.size == sizes[name] and img.mode in ("RGB", "L"), (name, img.mode)
        return f

    def was_skipped(name: str) -> None:
        if name == "unreadable.jpg" and lab.no_dac is None:
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        assert name in skipped and BAG_SKIPPED[name] in reasons[name], (name, reasons.get(name))
        assert name in res.stdout  # the warning names the file
        assert Path(name).stem not in frames
        if name != "notes.txt":
            assert name in warnings and any(s["file"] == name for s in prov["skipped_images"])

    assert len(meta["frames"]) == len(sizes) and prov["input"]["images"] == len(sizes)
    assert leftovers(lab.bag_out.parent) == sorted(leftovers(lab.bag_out.parent))  # listing works
    assert [p.name for p in lab.bag_out.parent.iterdir()] == [lab.bag_out.name]  # no staging folder left
    checks: dict[str, Callable[[], Any]] = {
        "non-image-files-mixed-in": lambda: was_skipped("notes.txt"),
        "hidden-files-ignored": lambda: (not any(".DS_Store" in s for s in skipped)) and None,
        "zero-byte-file": lambda: was_skipped("zero.jpg"),
        "truncated-jpeg": lambda: was_skipped("truncated.jpg"),
        "corrupt-png": lambda: was_skipped("corrupt.png"),
        "unreadable-file": lambda: was_skipped("unreadable.jpg"),
        "duplicate-images": lambda: (was_skipped("zz copy of café 1.jpg"), posed("café 1.jpg")),
        "grayscale": lambda: posed("gray.jpg"),
        "rgba": lambda: posed("rgba.png"),
        "16-bit": lambda: posed("gray16.png"),
        "cmyk": lambda: posed("cmyk.jpg"),
        "palette": lambda: posed("palette.png"),
        "palette-transparency": lambda: posed("palette_transparent.png"),
        "exif-rotated": lambda: posed("exif_rotated.jpg"),
        "12000px-wide": lambda: posed("panorama 12000px.jpg"),
        "mixed-sizes-and-aspect-ratios": lambda: (posed("portrait.png"), posed("small.webp")),
        "webp-bmp-tiff": lambda: (posed("small.webp"), posed("b.bmp"), posed("c.tif")),
        "unicode-and-spaces-in-paths": lambda: posed("café 1.jpg"),
        "extreme-aspect-ratio": lambda: was_skipped("strip.png"),
    }
    checks[row_id]()
    if row_id == "12000px-wide":
        peak = re.search(r"peak memory\W+([\d,]+) MB", res.stdout)
        assert peak is not None, res.stdout[-2000:]
        assert int(peak.group(1).replace(",", "")) < 3000, peak.group(0)  # whole process, torch included
        depth = frames["panorama 12000px"]["depth_file_path"]
        with Image.open(lab.bag_out / depth) as d:
            assert d.size == PANORAMA_WH


@pytest.mark.parametrize("row_id", POSES_OTHER)
def test_extreme_poses_interrupted_or_limited(lab: Lab, row_id: str) -> None:
    res = lab.result(f"poses:{row_id}")
    code = 130 if row_id.startswith("sigint") else 143
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert "interrupted" in res.stderr and "no file was left half-written" in res.stderr
    assert_clean_case(lab, "poses", row_id)


# ------------------------------------------------------------------------------------------------ ns-extreme-align


@pytest.mark.parametrize("row_id, args, fragments", ALIGN_ERRORS, ids=[r[0] for r in ALIGN_ERRORS])
def test_align_errors(lab: Lab, row_id: str, args: list[str], fragments: list[str]) -> None:
    A = lab.inputs
    res = lab.result(_key("align", row_id))
    line = error_line(res)
    case = _case_dir(A, "align", row_id)
    for f in _fmt(A, case, fragments):
        assert f in line, (f, line)
    left = leftovers(case)
    if row_id in ("train: corrupt image in a worker", "train: nan weights"):
        # the run folder is created when training starts: config and TensorBoard log only, no checkpoint / biases
        assert not [p for p in left if p.endswith((".ckpt", ".pth")) or "tmp" in p], left
    else:
        assert left == [], left
    for marker in ("marker_npy", "marker_bias", "marker_weights", "marker_ckpt"):
        assert not A[marker].exists(), "pickled code ran"
    for run in ("run_truncated", "run_evil"):
        assert leftovers(A[run]) == ["checkpoints", "checkpoints/step-000001.ckpt"]
    assert A["afile"].read_text() == "a file, not a folder"


@pytest.mark.parametrize(
    "row_id, args, fragments", ALIGN_PERMISSION_ERRORS, ids=[r[0] for r in ALIGN_PERMISSION_ERRORS]
)
def test_align_permission_errors(lab: Lab, row_id: str, args: list[str], fragments: list[str]) -> None:
    if lab.no_dac is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    line = error_line(lab.result(_key("align", row_id)))
    for f in _fmt(lab.inputs, _case_dir(lab.inputs, "align", row_id), fragments):
        assert f in line, (f, line)
    assert os.listdir(lab.inputs["readonly"]) == []


@pytest.mark.parametrize("row_id", ALIGN_OTHER)
def test_align_train_interrupted_and_resumed(lab: Lab, row_id: str) -> None:
    """Ctrl-C (a real SIGINT, sent while step 2 runs): the step finishes, a valid checkpoint is written, exit 130;
    ``--resume`` then completes. Bit-exact resume and SIGTERM: tests/test_align_train.py."""
    from ns_extreme.align.train import find_checkpoints, read_train_checkpoint
    from ns_extreme.models import read_bias_checkpoint

    first, second = lab.result("train-interrupted"), lab.result("train-resumed")
    assert first.returncode == 130, (first.returncode, first.stdout[-2000:], first.stderr[-2000:])
    assert "Traceback" not in first.stderr + first.stdout
    assert "interrupted at step 2/3000" in first.stdout and "continue with --resume" in first.stdout
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "Traceback" not in second.stderr and "resuming at step 2" in second.stdout
    out = lab.train_run
    assert [s for s, _ in find_checkpoints(out)] == [2, 4]
    ckpt = read_train_checkpoint(find_checkpoints(out)[0][1])  # the checkpoint the interrupted run wrote
    assert ckpt["step"] == 2 and ckpt["total_steps"] == 3000
    assert not [p for p in leftovers(out) if "tmp" in p]
    assert read_bias_checkpoint(out / "biases.pth")


# ------------------------------------------------------------------------------------------------ viewer


@pytest.mark.parametrize("row_id, args, fragments", VIEW_ERRORS, ids=[r[0] for r in VIEW_ERRORS])
def test_view_errors(lab: Lab, row_id: str, args: list[str], fragments: list[str]) -> None:
    line = error_line(lab.result(_key("view", row_id)))
    for f in _fmt(lab.inputs, _case_dir(lab.inputs, "view", row_id), fragments):
        assert f in line, (f, line)


def test_viewers_bind_to_loopback_by_default() -> None:
    import dataclasses

    from ns_extreme.cli.view import View
    from ns_extreme.viewer.standalone import DEFAULT_HOST, start_viewer

    assert DEFAULT_HOST == "127.0.0.1"
    assert {f.name: f.default for f in dataclasses.fields(View)}["host"] == "127.0.0.1"
    import inspect

    assert inspect.signature(start_viewer).parameters["host"].default == "127.0.0.1"


# ------------------------------------------------------------------------------------------------ extreme3d


def _parse(data: Path, **kw: Any):
    from ns_extreme.cli.process import PoseModelOptions
    from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParserConfig

    kw.setdefault("backbone", PoseModelOptions(model_size="tiny", weights="random", device="cpu", dtype="fp32"))
    return Extreme3DDataParserConfig(data=data, **kw).setup().get_dataparser_outputs(split="train")


def _dataset(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the posed dataset ``src`` with its transforms.json edited."""
    shutil.copytree(src, dst)
    d = json.loads((dst / "transforms.json").read_text())
    edit(d)
    (dst / "transforms.json").write_text(json.dumps(d))
    return dst


DATAPARSER_ROWS = [
    "data missing", "empty folder", "one image", "only non-image files", "all images broken",
    "weights of another model", "nan model outputs", "disk full while caching", "transforms frame without matrix",
    "ply file missing", "transforms.json invalid JSON", "broken images among good ones (fallback)",
]  # fmt: skip


@pytest.mark.parametrize("row_id", DATAPARSER_ROWS)
def test_extreme3d_dataparser(
    lab: Lab, one_thread, row_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (it runs inside ns-train): a one-line exception naming the file, and no half-written cache."""
    from ns_extreme.cli.process import PoseModelOptions

    A = lab.inputs

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(A[name], dst)
        return dst

    def fails(data: Path, exc: type[BaseException], *fragments: str, **kw: Any) -> str:
        with pytest.raises(exc) as info:
            _parse(data, **kw)
        message = str(info.value)
        assert "\n" not in message and message, message
        for f in fragments:
            assert f in message, (f, message)
        if data.is_dir():
            assert not [p for p in os.listdir(data) if p.startswith(".extreme3d")], os.listdir(data)
        return message

    if row_id == "data missing":
        fails(tmp_path / "nowhere", FileNotFoundError, "nowhere", "does not exist")
    elif row_id == "empty folder":
        fails(copy("empty"), ValueError, "neither a transforms.json nor images")
    elif row_id == "one image":
        fails(copy("one"), ValueError, "has 1 image(s)", "at least 2")
    elif row_id == "only non-image files":
        fails(copy("nonimg"), ValueError, "neither a transforms.json nor images")
    elif row_id == "all images broken":
        fails(copy("broken"), ValueError, "only 0 of 3 images", "zero.jpg", "remove the unreadable files")
    elif row_id == "weights of another model":
        opts = PoseModelOptions(
            model_size="tiny", weights=str(A["w"] / "resnet.safetensors"), device="cpu", dtype="fp32"
        )
        fails(copy("good"), ValueError, "resnet.safetensors does not fit this model", backbone=opts)
    elif row_id == "nan model outputs":
        from ns_extreme.posing import NonFiniteOutputError

        opts = PoseModelOptions(model_size="tiny", weights=str(A["w"] / "nan.safetensors"), device="cpu", dtype="fp32")
        fails(copy("good"), NonFiniteOutputError, "NaN/Inf", backbone=opts)
    elif row_id == "disk full while caching":
        import ns_extreme.io.dataset as ds

        def no_space(path, *a, **k):
            Path(path).write_bytes(b"ply\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(ds, "write_ply", no_space)
        data = copy("good")
        msg = fails(data, OSError, "could not write", ".extreme3d", "no space left on device")
        assert "sparse_pc.ply" in msg and leftovers(data) == ["a.jpg", "b.jpg", "c.png"]
    elif row_id == "transforms frame without matrix":
        data = _dataset(A["posed"], tmp_path / "nomatrix", lambda d: d["frames"][0].pop("transform_matrix"))
        fails(data, ValueError, "transforms.json", "frame 0 lacks")
    elif row_id == "ply file missing":
        data = _dataset(A["posed"], tmp_path / "noply", lambda d: d.update(ply_file_path="gone.ply"))
        fails(data, FileNotFoundError, "gone.ply", "does not exist")
    elif row_id == "transforms.json invalid JSON":
        data = _dataset(A["posed"], tmp_path / "invalid", lambda d: None)
        (data / "transforms.json").write_text('{"frames": [')
        try:
            _parse(data)
        except ValueError as exc:
            assert "transforms.json" in str(exc) and "not valid JSON" in str(exc), exc
        else:
            raise AssertionError("no error")
    elif row_id == "broken images among good ones (fallback)":
        data = copy("good")
        for name in ("zero.jpg", "text.jpg", "corrupt.png"):
            shutil.copy(A["broken"] / name, data / name)
        shutil.copy(data / "a.jpg", data / "a copy.jpg")
        out = _parse(data)
        # "a copy.jpg" sorts before "a.jpg": the first of two identical files is kept
        assert sorted(p.name for p in out.image_filenames) == ["a copy.jpg", "b.jpg", "c.png"]
        prov = json.loads((data / ".extreme3d" / "extreme_poses.json").read_text())
        skipped = {s["file"]: s["reason"] for s in prov["skipped_images"]}
        assert set(skipped) == {"zero.jpg", "text.jpg", "corrupt.png", "a.jpg"}, skipped
        assert skipped["a.jpg"] == "duplicate of a copy.jpg (same bytes)"
        assert any("skipped 4 of 7" in w for w in prov["warnings"])
    else:
        raise AssertionError(row_id)


def test_bad_input_count(lab: Lab) -> None:
    """The closing note's count (every row of the tables above)."""
    rows = (
        len(POSES_ERRORS) + len(POSES_PERMISSION_ERRORS) + len(BAG_ROWS) + len(POSES_OTHER)
        + len(ALIGN_ERRORS) + len(ALIGN_PERMISSION_ERRORS) + len(ALIGN_OTHER) + len(VIEW_ERRORS) + 1
        + len(DATAPARSER_ROWS) + 1
    )  # fmt: skip
    assert rows >= 90, rows
