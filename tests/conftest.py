"""Shared fixtures. Real scenes come from ../shared/data/dev_small (research data, never packaged)."""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("NS_EXTREME_SHARED", REPO_ROOT.parent / "shared"))
DEV_SMALL = SHARED_DIR / "data" / "dev_small"
BIAS_CKPTS = SHARED_DIR / "fixtures" / "bias_ckpts"
STATE_DICT_KEYS = SHARED_DIR / "fixtures" / "state_dict_keys"
# --dtype auto must not depend on the CPU the suite runs on (bf16 on AMX / AVX-512 BF16 CPUs): fp32 everywhere, in
# this process and the commands it starts; tests/test_runtime_precision.py fakes the detection instead.
os.environ["NS_EXTREME_CPU_BF16"] = "0"

SCENES = ("strecha_fountain-P11", "strecha_Herz-Jesus-P8", "strecha_castle-P19_odd9", "hloc_sacre_coeur")


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits an ignored SIGINT,
    # and so would every command the tests start: Python then never raises KeyboardInterrupt in them, and the
    # Ctrl-C tests would see a command that cannot be interrupted. Restore the normal Ctrl-C for the children.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: the tiny test models gain nothing from threads, and on a busy
    2-core machine OpenMP oversubscription makes them 10-20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dev_small() -> Path:
    if not DEV_SMALL.is_dir():
        pytest.fail(f"test data missing: {DEV_SMALL} (clone the project next to ../shared)")
    return DEV_SMALL


@pytest.fixture(scope="session")
def bias_ckpts() -> Path:
    return BIAS_CKPTS


@pytest.fixture(scope="session")
def state_dict_keys() -> Path:
    return STATE_DICT_KEYS


def read_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    """``name (shape) dtype`` lines of ../shared/fixtures/state_dict_keys/*.txt -> {name: shape}."""
    keys = {}
    for line in path.read_text().splitlines():
        name, rest = line.split(" ", 1)
        keys[name] = tuple(ast.literal_eval(rest.rsplit(" ", 1)[0]))
    return keys


def colmap_w2c_rotations(images_txt: Path) -> dict[str, np.ndarray]:
    """Independent reader of a COLMAP images.txt: image name -> world-to-camera rotation (from QW QX QY QZ)."""
    from scipy.spatial.transform import Rotation

    out = {}
    for line in images_txt.read_text().splitlines():
        p = line.split()
        if line.startswith("#") or len(p) != 10:
            continue
        qw, qx, qy, qz = (float(v) for v in p[1:5])
        out[p[9]] = Rotation.from_quat([qx, qy, qz, qw]).as_matrix()
    return out
