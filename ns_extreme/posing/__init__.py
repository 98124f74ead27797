"""Images -> Reconstruction (cameras at original resolution, depth, confidence, coloured points, diagnostics)."""

from ns_extreme.posing.backbone import BACKBONES, FramePredictions, NonFiniteOutputError, Pi3Backbone, PosingBackbone, VGGTBackbone
from ns_extreme.posing.options import PosingOptions
from ns_extreme.posing.pipeline import pose_images
from ns_extreme.posing.reconstruction import Reconstruction

__all__ = [
    "BACKBONES",
    "Pi3Backbone",
    "FramePredictions",
    "NonFiniteOutputError",
    "PosingBackbone",
    "PosingOptions",
    "Reconstruction",
    "VGGTBackbone",
    "pose_images",
]
