from ns_extreme.models.pi3.config import Pi3Config
from ns_extreme.models.pi3.model import Pi3

__all__ = ["Pi3", "Pi3Config"]
