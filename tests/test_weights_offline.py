"""Weights neither cached nor downloadable: every command that loads them ends with one error line, in seconds.

The Hub is made unreachable by pointing HF_ENDPOINT at a name that cannot resolve (``.invalid`` is reserved),
and HF_HOME at an empty folder, so nothing is cached. (Before ``ns_extreme.models.hub``, huggingface_hub's
retries made ``extreme-poses`` take 48 s and print 24 retry warnings, each twice.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from ns_extreme.models import WeightsNotFoundError, hub

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sacre_coeur" / "images"
CASTLE = "strecha_castle-P19_odd9"
UNREACHABLE = "http://nonexistent.invalid"
REPO_ID = "facebook/VGGT-1B"

TOTAL_BOUND_S = 20.0
"""Whole process, imports (torch, nerfstudio) included, on a shared 2-core machine: typically 5-10 s there."""
AFTER_IMPORTS_BOUND_S = 5.0
"""From the command's first output line (printed after its heavy imports) to its exit: typically about 1 s."""

MESSAGE_START = f"error: weights '{REPO_ID}' are not in the local cache and cannot be downloaded "
MESSAGE_END = (
    f"On a machine with internet run `huggingface-cli download {REPO_ID} model.safetensors`, then either copy its "
    "Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME) here or pass the file with "
    "`--weights /path/to/model.safetensors`."
)
UNREACHABLE_REASON = f"(cannot reach the Hugging Face Hub at {UNREACHABLE}: "
OFFLINE_REASON = "(offline mode (HF_HUB_OFFLINE=1)). "


def env_without_hub(home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_ENDPOINT": UNREACHABLE,
        "PYTHONUNBUFFERED": "1",  # stdout lines arrive when printed: they time the command's phases
        "OMP_NUM_THREADS": "1",
        "NO_COLOR": "1",
        "COLUMNS": "200",
        "PYTHONWARNINGS": "ignore",
    }
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    env.pop("NS_EXTREME_TRACEBACK", None)
    env.update(extra)
    return env


@dataclass
class Timed:
    returncode: int
    stdout: str
    stderr: str
    total_s: float
    """Wall time of the whole process."""
    after_first_line_s: Optional[float]
    """Wall time from the first stdout line to the exit (None without stdout)."""


def run_timed(cmd: list[str], env: dict[str, str], scratch: Path, timeout: float = 180) -> Timed:
    err_path = scratch / "stderr.txt"
    start = time.perf_counter()
    first_line_at = None
    lines = []
    with open(err_path, "w") as err:  # a file, not a pipe: a flood of warnings must not block the process
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                first_line_at = first_line_at or time.perf_counter()
                lines.append(line)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    end = time.perf_counter()
    after_first_line = None if first_line_at is None else end - first_line_at
    return Timed(proc.returncode, "".join(lines), err_path.read_text(), end - start, after_first_line)


def assert_fast_single_error(res: Timed, reason: str, after_first_line: bool = True) -> None:
    lines = res.stderr.splitlines()
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert len(lines) == 1, res.stderr[-3000:]  # no retry warnings, no duplicated log lines
    line = lines[0]
    assert line.startswith(MESSAGE_START + reason) and line.endswith(MESSAGE_END), line
    assert "Retry" not in res.stdout and "WARNING" not in res.stdout, res.stdout
    print(f"total {res.total_s:.1f} s, after the first output line {res.after_first_line_s} s")
    assert res.total_s < TOTAL_BOUND_S, res.total_s
    if after_first_line:
        assert res.after_first_line_s is not None and res.after_first_line_s < AFTER_IMPORTS_BOUND_S, res


def extreme_poses(out: Path) -> list[str]:
    return [str(BIN / "ns-process-data"), "extreme-poses", "--data", str(EXAMPLE), "--output-dir", str(out)]


def test_extreme_poses_without_network_answers_in_seconds(tmp_path):
    res = run_timed(extreme_poses(tmp_path / "out"), env_without_hub(tmp_path / "hf_home"), tmp_path)
    assert_fast_single_error(res, UNREACHABLE_REASON)
    assert res.stdout.startswith("extreme-poses: 10 images")
    assert not (tmp_path / "out").exists()


def test_offline_mode_is_honoured_at_once(tmp_path):
    env = env_without_hub(tmp_path / "hf_home", HF_HUB_OFFLINE="1")
    res = run_timed(extreme_poses(tmp_path / "out"), env, tmp_path)
    assert_fast_single_error(res, OFFLINE_REASON)


@pytest.fixture(scope="module")
def pairs_json(tmp_path_factory, dev_small) -> Path:
    from ns_extreme.cli import align

    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    args = ["pairs", "--sources", str(dev_small / CASTLE), "--strategy", "all", "--max-pairs-per-scene", "2"]
    assert align.main([*args, "--output", str(path)]) == 0
    return path


@pytest.mark.parametrize("sub", ["train", "eval"])
def test_align_without_network_answers_in_seconds(sub, tmp_path, pairs_json):
    args = ["--pairs", str(pairs_json), "--output-dir", str(tmp_path / "run"), "--weights", REPO_ID, "--device", "cpu"]
    if sub == "eval":
        args += ["--models", "pretrained"]
    res = run_timed([str(BIN / "ns-extreme-align"), sub, *args], env_without_hub(tmp_path / "hf_home"), tmp_path)
    assert_fast_single_error(res, UNREACHABLE_REASON, after_first_line=False)


DATAPARSER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ns_extreme.cli.process import PoseModelOptions
    from ns_extreme.nerfstudio.extreme3d_dataparser import Extreme3DDataParserConfig

    backbone = PoseModelOptions(weights=sys.argv[2], device="cpu")
    config = Extreme3DDataParserConfig(data=Path(sys.argv[1]), backbone=backbone)
    start = time.perf_counter()
    try:
        config.setup().get_dataparser_outputs(split="train")
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"seconds": time.perf_counter() - start, "error": error}))
    """
)


def test_dataparser_posing_without_network_answers_in_seconds(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted(EXAMPLE.iterdir())[:2]:
        shutil.copy(src, photos)
    env = env_without_hub(tmp_path / "hf_home")
    res = run_timed([sys.executable, "-c", DATAPARSER_SCRIPT, str(photos), REPO_ID], env, tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-3000:]
    outcome = json.loads(res.stdout.splitlines()[-1])
    assert outcome["error"].startswith("WeightsNotFoundError: " + MESSAGE_START[len("error: ") :] + UNREACHABLE_REASON)
    assert "Retry" not in res.stdout and "WARNING" not in res.stdout, res.stdout
    assert outcome["seconds"] < AFTER_IMPORTS_BOUND_S, outcome


def test_probe_has_one_deadline_even_when_name_resolution_hangs(monkeypatch):
    monkeypatch.setattr(hub, "_head", lambda url, timeout: time.sleep(30))  # a resolver that never answers
    start = time.perf_counter()
    with pytest.raises(hub.HubUnreachableError, match="no answer within 0.5 s"):
        hub.find_on_hub(REPO_ID, ["model.safetensors", "model.pt"], timeout=0.5)
    assert time.perf_counter() - start < 3


def test_cache_is_used_without_asking_the_hub(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--someone--cached" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_requests(*args, **kwargs):
        raise AssertionError("the Hub was asked although the file is cached")

    monkeypatch.setattr(hub, "find_on_hub", no_requests)
    monkeypatch.setattr(hub, "download", no_requests)
    from ns_extreme.models.weights import resolve_weights

    assert resolve_weights("someone/cached").path == snapshot / "model.safetensors"
    with pytest.raises(WeightsNotFoundError, match="someone/other"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        resolve_weights("someone/other")
