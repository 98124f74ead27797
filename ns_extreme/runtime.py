"""Choosing a device and precision from the user's ``--device auto|cpu|cuda|mps`` and ``--dtype`` options."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16 make bfloat16 matmuls faster than float32 on CPU; plain AVX2 does not."""
    return (
        torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
        or "AMX" in torch.backends.cpu.get_cpu_capability()
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto, fp32, bf16 or fp16")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


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

    @property
    def compute(self) -> torch.dtype:
        """The dtype the backbone adapters take (``VGGTBackbone(dtype=...)``)."""
        return self.autocast or self.params


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 (fp16 without bf16 support) on CUDA, bf16 on CPUs with AMX / AVX-512 BF16, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_fast_bf16():
            name = "bf16"
        else:
            name = "fp32"
    f32 = torch.float32
    table = {
        "fp32": Precision("fp32", f32, f32, None),
        "bf16-weights": Precision("bf16-weights", torch.bfloat16, f32, None),
        "bf16": Precision("bf16", torch.bfloat16, f32, torch.bfloat16),
        "fp16": Precision("fp16", torch.float16, f32, torch.float16),
    }
    if name not in table:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return table[name]
