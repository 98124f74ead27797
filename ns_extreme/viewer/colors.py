"""Frustum colours for per-view confidence, and the legend that explains them.

Views are coloured red → yellow → green (ColorBrewer RdYlGn) on a scale that does not stretch small
differences into "worst" and "best":

* **Spread within noise**: when max − min is under ``NOISE_FRACTION`` (1 %) of the median, every view is grey
  and the legend says why. A view's confidence is the mean of the model's depth-confidence map; on CUDA the
  model runs in bfloat16 by default, whose relative resolution is 2⁻⁸ ≈ 0.4 %, so differences of that order
  can come from arithmetic precision rather than from the views, and the scale has no business ranking them.
* Otherwise the scale runs from the 5th to the 95th percentile (one outlier does not squeeze the other views
  into one colour), widened about its middle to at least ``MIN_RANGE_FRACTION`` (20 %) of the median: a
  spread of a few percent shows as neighbouring hues. Values beyond the ends take the end colours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ns_extreme.viewer.images import png_data_url

__all__ = [
    "NOISE_FRACTION",
    "MIN_RANGE_FRACTION",
    "UNKNOWN_COLOR",
    "ConfidenceScale",
    "confidence_scale",
    "confidence_colors",
    "legend_markdown",
]

NOISE_FRACTION = 0.01
MIN_RANGE_FRACTION = 0.2
ROBUST_PERCENTILES = (5.0, 95.0)
UNKNOWN_COLOR = (110, 110, 110)
"""No confidence, or no meaningful difference between the views."""
_RAMP = np.array([[215, 48, 39], [252, 141, 89], [254, 224, 139], [145, 207, 96], [26, 152, 80]], dtype=np.float64)


@dataclass(frozen=True)
class ConfidenceScale:
    """How per-view confidence maps to colours: ``low`` and below red, ``high`` and above green."""

    low: float
    high: float
    minimum: float
    maximum: float
    median: float
    within_noise: bool

    @property
    def relative_spread(self) -> float:
        return (self.maximum - self.minimum) / max(abs(self.median), 1e-12)

    def colors(self, conf: np.ndarray) -> np.ndarray:
        """uint8 [N, 3]; grey where NaN, and everywhere when the spread is within noise."""
        conf = np.asarray(conf, dtype=np.float64)
        out = np.tile(np.array(UNKNOWN_COLOR, dtype=np.uint8), (len(conf), 1))
        ok = np.isfinite(conf)
        if not self.within_noise:
            out[ok] = ramp((conf[ok] - self.low) / (self.high - self.low))
        return out


def confidence_scale(conf: Optional[np.ndarray]) -> Optional[ConfidenceScale]:
    """The colour scale of these per-view confidences (None when there is none)."""
    if conf is None:
        return None
    values = np.asarray(conf, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi, median = float(values.min()), float(values.max()), float(np.median(values))
    within_noise = hi - lo <= NOISE_FRACTION * abs(median)
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    min_width = MIN_RANGE_FRACTION * abs(median)
    if high - low < min_width:
        middle = (low + high) / 2
        low, high = middle - min_width / 2, middle + min_width / 2
    if high <= low:  # a median of 0 and no spread: within noise anyway, any non-empty range will do
        high = low + 1.0
    return ConfidenceScale(low, high, lo, hi, median, within_noise)


def confidence_colors(conf: Optional[np.ndarray]) -> np.ndarray:
    """uint8 [N, 3] frustum colours of per-view confidences (see the module docstring)."""
    scale = confidence_scale(conf)
    if scale is None:
        n = 0 if conf is None else len(conf)
        return np.tile(np.array(UNKNOWN_COLOR, dtype=np.uint8), (n, 1))
    return scale.colors(np.asarray(conf))


def ramp(u: np.ndarray) -> np.ndarray:
    """uint8 [N, 3] colours of positions ``u`` on the red → green ramp (clipped to [0, 1])."""
    x = np.clip(np.asarray(u, dtype=np.float64), 0, 1) * (len(_RAMP) - 1)
    k = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    f = (x - k)[:, None]
    return np.round(_RAMP[k] * (1 - f) + _RAMP[k + 1] * f).astype(np.uint8)


def colorbar_data_url(width: int = 240, height: int = 12) -> str:
    row = ramp(np.linspace(0, 1, width))
    return png_data_url(np.repeat(row[None], height, axis=0))


def legend_markdown(scale: Optional[ConfidenceScale]) -> str:
    if scale is None:
        return "Frustum colour: grey (no per-view confidence in this dataset)"
    lo, hi = distinct_digits(scale.minimum, scale.maximum)
    if scale.within_noise:
        return (
            f"Frustum colour: grey, **confidence spread within noise**: views {lo} – {hi} "
            f"(max − min = {100 * scale.relative_spread:.2g} % of the median, under {100 * NOISE_FRACTION:g} %)"
        )
    low, high = distinct_digits(scale.low, scale.high)
    return (
        f"Frustum colour = view confidence  \n![confidence colour scale]({colorbar_data_url()})  \n"
        f"red ≤ **{low}**, green ≥ **{high}**  \nviews: {lo} – {hi}, median {scale.median:.4g}"
    )


def distinct_digits(lo: float, hi: float) -> tuple[str, str]:
    """``lo`` and ``hi`` with enough significant digits to tell them apart."""
    for digits in range(3, 8):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b or lo == hi:
            return a, b
    return a, b
