"""``--compile``: the model's forward through torch.compile (inductor; on CPU with frozen weights)."""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn


class CompileUnavailableError(ValueError):
    """torch.compile cannot run here (no C++ compiler for inductor on CPU); the message says what to do."""


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would call on CPU ($CXX, else c++ / g++ / clang++ on PATH), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def compile_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``; the module, its parameters and state-dict keys
    stay the same). On CPU, inductor freezes the weights into the graph (constant folding, oneDNN-packed
    matmuls), which is valid only for inference under ``no_grad``; it needs a C++ compiler. Each new input shape
    (frame count, image size) compiles again: worth it only when many passes share a shape."""
    if device.type == "cpu" and cpu_compiler() is None:
        raise CompileUnavailableError(
            "--compile on CPU needs a C++ compiler for torch's inductor (install g++ or clang++, or set $CXX); "
            "run without --compile"
        )
    if device.type == "mps":
        raise CompileUnavailableError("--compile is not supported on MPS; run without --compile")
    model.compile(options={"freezing": True} if device.type == "cpu" else None)
    return model
