"""Shared helpers of the benchmarks: fresh-subprocess workers, peak memory, timing, inputs, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ns_extreme.malloc import return_freed_memory_to_os

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = Path(os.environ.get("NS_EXTREME_BENCH_RESULTS", HERE / "results"))
EXAMPLE_IMAGES = REPO / "examples" / "sacre_coeur" / "images"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------ workers


def available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable")) / 1024.0
    except (OSError, StopIteration):
        return float("inf")


def run_worker(
    script: Path,
    spec: dict[str, Any],
    timeout: Optional[float] = None,
    min_available_mb: float = 0,
    max_wait_s: float = 900,
) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh Python process; returns the JSON dict it prints last.

    Each measured configuration runs in its own process so that peak memory (``ru_maxrss`` /
    ``max_memory_allocated``) and allocator state never carry over between configurations. On a shared
    machine, first waits (up to ``max_wait_s``) until ``min_available_mb`` of memory is available."""
    waited = 0.0
    while available_mb() < min_available_mb and waited < max_wait_s:
        if waited == 0:
            print(
                f"   waiting for {min_available_mb:.0f} MB of free memory (now {available_mb():.0f} MB) ...", flush=True
            )
        time.sleep(10)
        waited += 10
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"error": f"worker exited with {proc.returncode}: {tail}", "spec": spec, "process_s": wall}
    out = json.loads(lines[-1][len("RESULT ") :])
    out["process_s"] = wall
    out["waited_for_memory_s"] = waited
    return out


def worker_main(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If invoked as ``--worker JSON``: run ``fn(spec)``, print its result, return True.

    Workers tune glibc's allocator like the console scripts do, except for the plain baseline (``spec["plain"]``)."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        malloc_tuned = False if spec.get("plain") else return_freed_memory_to_os()
        result = fn(spec)
        result.setdefault("malloc_tuned", malloc_tuned)
        print("RESULT " + json.dumps(result), flush=True)
        return True
    return False


# ------------------------------------------------------------------------------------------------ memory / time


class Memory:
    """Peak memory of this process: resident set on CPU (``ru_maxrss``), allocated tensors on CUDA.

    ``reset()`` starts a new peak window (Linux ``/proc/self/clear_refs`` resets the resident high-water mark;
    CUDA resets its allocator statistics) so that loading and the forward pass are measured separately."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def rss_peak_mb() -> float:
        """Linux: ``VmHWM`` (the high-water mark that ``reset`` clears; ``ru_maxrss`` also keeps the peak seen
        when any thread exited, so it cannot be reset reliably); elsewhere ``ru_maxrss``."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0

    @staticmethod
    def rss_now_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:
            return float("nan")

    def reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return self.rss_peak_mb()

    def now_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return self.rss_now_mb()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Wall and process-CPU seconds (CPU seconds / wall ≈ cores we actually got when others share the box)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self.t
        self.cpu = time.process_time() - self.c


# ------------------------------------------------------------------------------------------------ inputs


def example_frames(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, H, W] in [0, 1]: the example scene's photos resized to H×W; beyond its 10 photos, mirrored and
    jittered copies (so no two frames are identical)."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    paths = sorted(p for p in EXAMPLE_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        img = Image.open(paths[i % len(paths)]).convert("RGB")
        if i >= len(paths):
            img = ImageOps.mirror(img) if (i // len(paths)) % 2 else img
            img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
            w, h = img.size
            dx, dy = int(rng.integers(0, w // 10)), int(rng.integers(0, h // 10))
            img = img.crop((dx, dy, w - w // 10 + dx, h - h // 10 + dy))
        img = img.resize((width, height), Image.BICUBIC)
        frames.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(frames)


def write_image_folder(folder: Path, n: int, width: int = 640, height: int = 480, seed: int = 0) -> list[Path]:
    """n JPEGs (the example photos, then jittered copies) of one size in ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    frames = example_frames(n, height, width, seed)
    paths = []
    for i, f in enumerate(frames):
        p = folder / f"img_{i:04d}.jpg"
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(p, quality=92)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------ weights


_TOKEN_NAMES = ("camera_token", "register_token", "cls_token", "register_tokens", "empty_pose_tokens")
_TOKEN_NAMES += ("cam_token", "reg_token", "init_token")  # WorldMirror's


@torch.no_grad()
def enrich_random_weights(
    model: torch.nn.Module, seed: int, dense_heads: tuple[str, ...] = ("depth_head", "point_head")
) -> None:
    """Give the parameters that default init leaves trivial (LayerScale 0.01, zero biases and tokens, the convs of
    the ``dense_heads`` that shrink activations ~6× per layer) non-trivial values, so that output differences
    between precisions or implementations are not hidden by near-constant outputs (VGGT's and WorldMirror's token
    names both listed: they do not overlap)."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    def normal_(p: torch.Tensor, mean: float, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=g) * std + mean)

    norms = set()
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            normal_(mod.weight, 1.0, 0.2)
            normal_(mod.bias, 0.0, 0.2)
            norms.update((id(mod.weight), id(mod.bias)))
    for name, p in model.named_parameters():
        if id(p) in norms:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            normal_(p, 0.0, 0.3)
        elif leaf == "bias":
            normal_(p, 0.0, 0.05)
        elif leaf in _TOKEN_NAMES:
            normal_(p, 0.0, 0.5)
        elif leaf == "pos_embed":
            normal_(p, 0.0, 0.1)
    for head_name in dense_heads:
        for mod in getattr(model, head_name).modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                w = mod.weight
                fan_in = w.shape[1] * w.shape[2] * w.shape[3] if isinstance(mod, nn.Conv2d) else w.shape[0]
                normal_(w, 0.0, 1.0 / fan_in**0.5)


def weights_file(cache_dir: Path, config: str = "full", seed: int = 0) -> Path:
    """A float32 safetensors file of randomly initialised (enriched) VGGT weights, created once and reused."""

    path = Path(cache_dir) / f"vggt_{config}_random_seed{seed}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"creating random weights file {path} (once) ...", flush=True)
    code = (
        "import sys, torch; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "from _common import enrich_random_weights, model_config\n"
        "from ns_extreme.models.vggt import VGGT\n"
        "from safetensors.torch import save_file\n"
        "torch.manual_seed(%d); m = VGGT(model_config(%r)); enrich_random_weights(m, %d)\n"
        "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, %r)\n"
    ) % (str(REPO), str(HERE), seed, config, seed + 1, str(path) + ".tmp")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))
    os.replace(str(path) + ".tmp", path)
    return path


def model_config(name: str):
    """``full`` = VGGT-1B; ``small`` = same structure at width 128 (chunked-posing sweeps); ``tiny`` = tests."""
    from ns_extreme.models.vggt import VGGTConfig

    if name == "full":
        return VGGTConfig()
    if name == "small":
        return VGGTConfig(
            embed_dim=128,
            num_heads=2,
            dino_depth=4,
            dino_num_heads=2,
            camera_trunk_depth=1,
            camera_num_heads=2,
            dpt_features=32,
            dpt_out_channels=(32, 64, 128, 128),
        )
    if name == "tiny":
        return VGGTConfig.tiny()
    raise ValueError(f"unknown config {name!r}")


# ------------------------------------------------------------------------------------------------ results


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            env["mem_total_gb"] = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    from ns_extreme.runtime import FAST_BF16_CPU_FLAGS, auto_precision_name, cpu_flags, cpu_has_fast_bf16

    env["cpu_bf16_flags"] = sorted(cpu_flags() & FAST_BF16_CPU_FLAGS)
    env["cpu_fast_bf16"] = cpu_has_fast_bf16()
    env["dtype_auto"] = auto_precision_name(device)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_capability"] = list(torch.cuda.get_device_capability(device))
    env["machine_label"] = machine_label(env)
    return env


def machine_label(env: dict[str, Any]) -> str:
    """One line naming the machine of a result (GPU name, or CPU model and whether it has fast bfloat16),
    torch version and threads: results from different machines are never mixed."""
    if env.get("gpu"):
        where = f"GPU {env['gpu']}"
    else:
        bf16 = env.get("cpu_fast_bf16")
        if bf16 is None and env.get("cpu_capability") in ("AVX2", "DEFAULT", "NO AVX"):
            bf16 = False  # older records: no AVX-512 at all, so neither AMX nor AVX-512 BF16
        kind = (
            "unknown bf16"
            if bf16 is None
            else ("fast bf16: " + "/".join(env.get("cpu_bf16_flags", [])) if bf16 else "")
        )
        kind = kind or f"no fast bf16 ({env.get('cpu_capability')})"
        where = f"{env.get('cpu_model') or env.get('machine')}, {kind}"
    return f"{where}; torch {env.get('torch')}, {env.get('threads')} threads"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NS_EXTREME_BENCH_CACHE", Path(tempfile.gettempdir()) / "ns_extreme_bench"))


def results_path(name: str, device: torch.device, suffix: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}_{device.type}.{suffix}"


def write_results(name: str, device: torch.device, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Every result file names its machine: ``data["environment"]`` (added here when missing) and a
    ``Machine:`` line under the markdown's title."""
    env = data.setdefault("environment", environment(device))
    label = env.get("machine_label") or machine_label(env)
    if "Machine: " not in markdown:
        title, sep, rest = markdown.partition("\n") if markdown.startswith("# ") else ("", "", markdown)
        markdown = f"{title}{sep}{sep}Machine: {label}\n\n{rest.lstrip()}"
    j, m = results_path(name, device, "json"), results_path(name, device, "md")
    j.write_text(json.dumps(data, indent=2) + "\n")
    m.write_text(markdown.rstrip() + "\n")
    return j, m


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            if v != v:
                return "–"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
