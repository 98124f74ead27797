"""π³'s own input rule (``pi3/utils/basic.py``: ``load_images_as_tensor``), with invertible records.

Every image is resized — no crop, no padding — to one size chosen from the *first* image: its aspect ratio,
at most ``pixel_limit`` (255,000) pixels, both sides multiples of 14 (4:3 → 574×434, 16:9 → 672×378,
3:2 → 616×406), with PIL's LANCZOS filter. Images of another aspect ratio are stretched to that size; the
records keep separate x / y scales, so intrinsics still map exactly.

The posing pipeline uses the shared VGGT-style ``preprocess_images`` instead (see ``Pi3Backbone``); this
module is for callers that want π³'s native resolution.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ns_extreme.io.images import ImageSource, PreprocessedBatch, PreprocessRecord, _source_to_rgb

PIXEL_LIMIT = 255_000


def pi3_resize_hw(
    original_hw: tuple[int, int], pixel_limit: int = PIXEL_LIMIT, patch_size: int = 14
) -> tuple[int, int]:
    """(H, W) π³ resizes an image of ``original_hw`` to: the largest multiple-of-patch size near the original
    aspect ratio whose area is at most ``pixel_limit`` (the reference's rounding and shrinking loop)."""
    h, w = original_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {original_hw}")
    scale = math.sqrt(pixel_limit / (w * h))
    target_w, target_h = w * scale, h * scale
    cols, rows = round(target_w / patch_size), round(target_h / patch_size)
    while cols * rows * patch_size**2 > pixel_limit:
        if cols / rows > target_w / target_h:
            cols -= 1
        else:
            rows -= 1
    return max(1, rows) * patch_size, max(1, cols) * patch_size


def preprocess_images_pi3(
    sources: Sequence[ImageSource], pixel_limit: int = PIXEL_LIMIT, patch_size: int = 14
) -> PreprocessedBatch:
    """Load (paths) or take (uint8 arrays / PIL images) images and resize all of them like π³'s loader.

    Unlike the reference loader, EXIF orientation is applied and alpha is composited on white (the project's
    ``load_rgb`` conventions). Returns [N, 3, H, W] float32 in [0, 1] and one ``PreprocessRecord`` per image
    (mode "pi3": resize only).
    """
    if len(sources) == 0:
        raise ValueError("preprocess_images_pi3 needs at least one image")
    tensors, records, paths = [], [], []
    size_hw = None
    for source in sources:
        rgb, path = _source_to_rgb(source)
        original_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        if size_hw is None:
            size_hw = pi3_resize_hw(original_hw, pixel_limit, patch_size)
        H, W = size_hw
        resized = Image.fromarray(rgb).resize((W, H), Image.Resampling.LANCZOS)
        tensors.append(torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0))
        records.append(
            PreprocessRecord(
                original_hw=original_hw,
                resized_hw=(H, W),
                crop_offset_xy=(0, 0),
                content_hw=(H, W),
                pad_offset_xy=(0, 0),
                final_hw=(H, W),
                mode="pi3",
            )
        )
        paths.append(path)
    return PreprocessedBatch(images=torch.stack(tensors), records=records, paths=paths)
