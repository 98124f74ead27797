"""Which backbone poses the images and where it runs (shared by ``extreme-poses`` and the ``extreme3d`` parser).

No torch import: command lines check these options before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

from ns_extreme.models.registry import ModelName, ModelSizeName, model_choices_help


@dataclass
class PoseModelOptions:
    """Which backbone to run and where (shared by ``extreme-poses`` and the ``extreme3d`` dataparser)."""

    model: Annotated[ModelName, tyro.conf.arg(help=model_choices_help())] = "vggt"
    weights: Optional[str] = None
    """Base weights: a Hugging Face id, a local .safetensors/.pt/.pth file or folder, or 'random' (default: the model's
    official weights, see the README's model table)."""
    alignment: str = "aligned"
    """aligned: the paper's bias checkpoint for this model; pretrained: unmodified weights; or a path to a bias
    checkpoint (from ns-extreme-align)."""
    model_size: ModelSizeName = "full"
    """Model size. 'tiny' is a few-MB wiring-test model for the test-suite only (use with --weights random);
    its poses mean nothing."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to run the model (auto: cuda, then mps, then cpu)."""
    dtype: Literal["auto", "fp32", "bf16-weights", "bf16", "fp16"] = "auto"
    """Precision. fp32: exact. bf16-weights: linear-layer weights stored in bfloat16, float32 arithmetic (about half
    the memory, for CPUs without fast bfloat16 or when memory is short). bf16 / fp16: narrow weights and
    autocast. auto: bf16 (fp16 without bf16 support) on CUDA, bf16 on CPUs with AMX / AVX-512 BF16, else fp32.
    The heads always compute in float32 (as the reference)."""
    compile: bool = False
    """Compile the model's forward with torch.compile (inductor; on CPU with frozen weights, which needs a C++
    compiler). Each new frame count or image size compiles again (a minute or more); off by default because on
    the CPUs measured it did not pay back (benchmarks/README.md)."""
