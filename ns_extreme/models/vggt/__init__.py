from ns_extreme.models.vggt.config import VGGTConfig
from ns_extreme.models.vggt.model import VGGT

__all__ = ["VGGT", "VGGTConfig"]
