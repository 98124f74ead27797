"""Images for the viewers' GUI panels: thumbnails and data URLs (markdown ``![](data:...)``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["THUMBNAIL_SIDE", "image_data_url", "png_data_url", "thumbnail_array"]

THUMBNAIL_SIDE = 320


def png_data_url(rgb: np.ndarray) -> str:
    """A uint8 [H, W, 3] array as a PNG data URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _load_thumbnail(path: Path, max_side: int) -> Any:
    """PIL RGB thumbnail, upright (EXIF). Unusual modes (16-bit, float) go through ns_extreme's full loader."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"):
            im.draft("RGB", (max_side, max_side))  # fast JPEG downscale on decode
            img = ImageOps.exif_transpose(im)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            img = img.convert("RGB")
        else:
            from ns_extreme.io.images import load_rgb

            img = Image.fromarray(load_rgb(path))
    img.thumbnail((max_side, max_side))
    return img


def image_data_url(path: Path, max_side: int = THUMBNAIL_SIDE) -> str:
    """A JPEG thumbnail of an image file as a data URL (EXIF orientation, 16-bit, RGBA handled)."""
    img = _load_thumbnail(path, max_side)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_array(path: Path, max_side: int = 160) -> np.ndarray:
    return np.asarray(_load_thumbnail(path, max_side))
