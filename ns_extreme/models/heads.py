"""What every backbone does with its heads and inputs: drop the heads a caller does not run, refuse to run a dropped
or unknown one, and take images as [S, 3, H, W] or [B, S, 3, H, W] at a multiple of the patch size."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

HeadModules = Mapping[str, tuple[str, ...]]
"""Head name -> the attribute names of its modules (``drop_heads`` sets them to None)."""


def check_head_names(heads: Iterable[str], head_modules: HeadModules) -> None:
    unknown = set(heads) - set(head_modules)
    if unknown:
        raise ValueError(f"unknown heads {sorted(unknown)}; choose from {tuple(head_modules)}")


def drop_heads(model: nn.Module, keep: Iterable[str], head_modules: HeadModules) -> list[str]:
    """Set the modules of the heads not in ``keep`` to None (their weights are then neither loaded nor kept in
    memory). Returns the state-dict prefixes removed."""
    keep = set(keep)
    check_head_names(keep, head_modules)
    dropped = []
    for head, attrs in head_modules.items():
        for attr in attrs:
            if head not in keep and getattr(model, attr) is not None:
                setattr(model, attr, None)
                dropped.append(attr + ".")
    return dropped


def check_heads_present(model: nn.Module, heads: Iterable[str], head_modules: HeadModules) -> None:
    heads = tuple(heads)
    check_head_names(heads, head_modules)
    absent = [h for h in heads if any(getattr(model, attr) is None for attr in head_modules[h])]
    if absent:
        raise ValueError(
            f"this model was built without the {', '.join(absent)} head(s) (drop_heads / load_model(heads=...))"
        )


def batched_images(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``images`` as [B, S, 3, H, W] (a leading batch axis added to [S, 3, H, W]); H and W multiples of the patch."""
    if images.ndim == 4:
        images = images[None]
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"expected images [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image height and width must be multiples of {patch_size}, got {H}x{W}")
    return images
