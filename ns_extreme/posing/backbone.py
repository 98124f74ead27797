"""The one interface the posing pipeline needs from a 3D foundation model, and its VGGT adapter."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch
from torch import nn

from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN/Inf (usually fp16 overflow or broken weights)."""


@dataclass
class FramePredictions:
    """Per-frame outputs for one pass, in the model's world (frame 0 = identity, arbitrary scale)."""

    w2c_opencv: np.ndarray
    """[S, 3, 4] float64 world-to-camera, OpenCV axes."""
    intrinsics: Optional[np.ndarray]
    """[S, 3, 3] float64 at the preprocessed resolution, or None when the model predicts none."""
    depth: np.ndarray
    """[S, H, W] float32 z-depth at the preprocessed resolution."""
    confidence: np.ndarray
    """[S, H, W] float32, larger is better (VGGT: 1 + exp(.), >= 1)."""


class PosingBackbone(Protocol):
    name: str
    target_size: int
    patch_size: int

    def predict(self, images: torch.Tensor) -> FramePredictions:
        """images [S, 3, H, W] in [0, 1] (preprocessed) -> predictions for the S frames as one sequence."""
        ...


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_finite(name: str, *arrays: np.ndarray) -> None:
    for a in arrays:
        if not np.isfinite(a).all():
            raise NonFiniteOutputError(
                f"{name} produced NaN/Inf values; try --dtype fp32, or check the weights and alignment checkpoint"
            )


class VGGTBackbone:
    """Runs VGGT's camera and depth heads; points are unprojected from depth with the chosen cameras,
    which keeps them consistent when the user overrides intrinsics."""

    patch_size = 14

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, target_size: int = 518, name: str = "vggt") -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = dtype
        self.target_size = target_size
        self.name = name

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> FramePredictions:
        H, W = images.shape[-2:]
        weights_dtype = next(self.model.parameters()).dtype
        autocast = _autocast(self.device, self.dtype) if self.dtype != weights_dtype else contextlib.nullcontext()
        with autocast:
            out = self.model(images.to(self.device, weights_dtype)[None], heads=("camera", "depth"))
        w2c, K = w2c_intrinsics_from_pose_encoding(out["pose_enc"][0].float(), (H, W))
        pred = FramePredictions(
            w2c_opencv=w2c.double().cpu().numpy(),
            intrinsics=K.double().cpu().numpy(),
            depth=out["depth"][0, ..., 0].float().cpu().numpy(),
            confidence=out["depth_conf"][0].float().cpu().numpy(),
        )
        check_finite(self.name, pred.w2c_opencv, pred.intrinsics, pred.depth, pred.confidence)
        fov = out["pose_enc"][0, :, 7:].float()
        if not bool(((fov > 0) & (fov < torch.pi)).all()):
            raise NonFiniteOutputError(f"{self.name} predicted a field of view outside (0, 180) degrees; check the weights")
        return pred
