"""WorldMirror (HunyuanWorld-Mirror 1.0, Tencent): VGGT-1B plus prior encoders, a normal head and a 3DGS head.

Code and weights: Tencent HunyuanWorld-Mirror Community License (commercial use allowed, but not in the EU, UK or
South Korea, not above 1M monthly active users without a licence from Tencent, not to improve other AI models).
"""

from ns_extreme.models.worldmirror.config import WorldMirrorConfig
from ns_extreme.models.worldmirror.model import WORLDMIRROR_HEADS, WorldMirror, build_worldmirror
from ns_extreme.models.worldmirror.modules import splats_from_gaussian_params

__all__ = ["WORLDMIRROR_HEADS", "WorldMirror", "WorldMirrorConfig", "build_worldmirror", "splats_from_gaussian_params"]
