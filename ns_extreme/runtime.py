"""Choosing a device and precision from the user's ``--device auto|cpu|cuda|mps`` and ``--dtype`` options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from ns_extreme.distributed import local_rank

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under torchrun (one GPU per rank), plain ``cuda`` in a single process."""
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda")
    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"local rank {index} needs GPU {index}, but torch sees {count} CUDA device(s): start at most {count} "
            "processes per machine (torchrun --nproc_per_node), or use --device cpu"
        )
    return torch.device("cuda", index)


def resolve_device(name: str) -> torch.device:
    """The device of ``--device``; under torchrun a CUDA device is ``cuda:LOCAL_RANK``."""
    if name == "auto":
        if torch.cuda.is_available():
            return _cuda_device()
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for, but MPS is not available (use --device cpu or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return _cuda_device() if name == "cuda" else torch.device(name)


FAST_BF16_ENV = "NS_EXTREME_CPU_BF16"
"""Set to 1 or 0 to say whether this CPU has fast bfloat16 instead of detecting it (what ``--dtype auto`` picks on
CPU); the test suite sets 0 so its numbers do not depend on the machine it runs on."""

FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""/proc/cpuinfo flags of x86 CPUs whose bfloat16 matmuls outrun float32 (AMX tiles, AVX-512 BF16 dot products)."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where the file is absent: macOS, Windows)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def torch_sees_fast_bf16() -> bool:
    """torch's own CPU probe (cpuinfo library) for AMX tiles or AVX-512 BF16.

    Not ``get_cpu_capability()``: it names the vector ISA torch's kernels were built for (``"AVX512"`` on an AMX
    Xeon), and not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it is true on any AVX-512BW CPU, where oneDNN
    emulates bfloat16 at float32 speed or worse."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and bool(probe()) for probe in probes)


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AMX or AVX-512 BF16 make bfloat16 matmuls several times faster than float32 on CPU; AVX2 and plain
    AVX-512 do not (bfloat16 is then emulated and no faster). The CPU's own flags, or torch's probe; the
    ``NS_EXTREME_CPU_BF16`` environment variable (1 or 0) overrides both."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_flags(cpuinfo) & FAST_BF16_CPU_FLAGS) or torch_sees_fast_bf16()


def auto_precision_name(device: torch.device) -> str:
    """What ``--dtype auto`` means on ``device``: bf16 (fp16 without bf16 support) on CUDA, bf16 on CPUs with fast
    bfloat16 (AMX / AVX-512 BF16), else fp32. The one place every command resolves ``auto``."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``--dtype`` (float32: none); ``auto`` as :func:`auto_precision_name`."""
    if name == "auto":
        name = auto_precision_name(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, fp32, bf16 or fp16")
    return DTYPES[name]


PRECISIONS = ("auto", "fp32", "bf16-weights", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How a backbone stores its weights and computes (see benchmarks/README.md for measured trade-offs).

    ``fp32``: everything float32 (bit-exact with the reference). ``bf16-weights``: linear-layer matrices stored
    in bfloat16 (half the weight memory), all arithmetic float32: the low-memory choice on CPUs without fast
    bfloat16. ``bf16`` / ``fp16``: weights stored narrow and matmuls / attention under autocast in that dtype,
    norms and the residual stream in float32 (the reference recipe, minus the float32 weight copy).
    """

    name: str
    weights: torch.dtype
    """Storage dtype of the linear-layer matrices (``load_model(storage_dtype=...)``)."""
    params: torch.dtype
    """dtype of every other parameter and of the model's inputs (``load_model(dtype=...)``)."""
    autocast: Optional[torch.dtype]
    """Autocast dtype for the forward pass, or None."""
    narrow_heads: bool = False
    """Store the heads' matrices in ``weights`` too (``load_model(narrow_heads=...)``). Under autocast the heads
    keep float32 weights and arithmetic, as the reference; without autocast narrowing them only saves memory."""

    @property
    def compute(self) -> torch.dtype:
        """The dtype the backbone adapters take (``VGGTBackbone(dtype=...)``)."""
        return self.autocast or self.params


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 (fp16 without bf16 support) on CUDA, bf16 on CPUs with AMX / AVX-512 BF16, else fp32."""
    if name == "auto":
        name = auto_precision_name(device)
    f32 = torch.float32
    table = {
        "fp32": Precision("fp32", f32, f32, None),
        "bf16-weights": Precision("bf16-weights", torch.bfloat16, f32, None, narrow_heads=True),
        "bf16": Precision("bf16", torch.bfloat16, f32, torch.bfloat16),
        "fp16": Precision("fp16", torch.float16, f32, torch.float16),
    }
    if name not in table:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return table[name]
