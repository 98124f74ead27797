"""Tolerant readers of single values from extreme_poses.json: a missing or malformed value becomes None, so that
one bad field never stops the viewer."""

from __future__ import annotations

import math
from typing import Any, Optional


def opt_float(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def opt_int(v: Any) -> Optional[int]:
    f = opt_float(v)
    return None if f is None else int(f)


def opt_str(v: Any) -> Optional[str]:
    return None if v is None else str(v)
