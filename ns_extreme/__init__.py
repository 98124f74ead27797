"""ns_extreme: pose sparse, extreme-view photo collections with bias-aligned 3D foundation models."""

__version__ = "0.1.0"
