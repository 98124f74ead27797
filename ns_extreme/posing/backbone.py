"""The one interface the posing pipeline needs from a 3D foundation model, and an adapter per backbone (each named
by its ``ModelSpec.posing_adapter`` in ``ns_extreme.models.registry``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol

import numpy as np
import torch
from torch import nn

from ns_extreme.geometry.conventions import invert_rigid
from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding
from ns_extreme.geometry.rotations import nearest_rotation
from ns_extreme.models.registry import PI3_SPEC, VGGT_SPEC


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
    normals: Optional[np.ndarray] = None
    """[S, H, W, 3] float32 unit normals in each camera's frame (OpenCV), for models with a normal head."""
    normals_confidence: Optional[np.ndarray] = None
    """[S, H, W] float32, larger is better."""
    gaussians: Optional[Any] = None
    """Per-pixel 3D Gaussians in camera frames (``ns_extreme.posing.worldmirror.PixelGaussians``), when asked for."""


class PosingBackbone(Protocol):
    name: str
    target_size: int
    patch_size: int
    heads: ClassVar[Optional[tuple[str, ...]]]
    """The model heads ``predict`` runs: the registry's ``ModelSpec.posing_heads`` (None: all)."""
    priors: ClassVar[tuple[str, ...]]
    """The network priors ``predict`` takes (``ModelSpec.priors``); empty: ``predict(images)`` only."""

    def predict(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> FramePredictions:
        """images [S, 3, H, W] in [0, 1] (preprocessed) -> predictions for the S frames as one sequence;
        ``priors=FramePriors`` for backbones with ``priors``."""
        ...


def _forward(model: nn.Module, images: torch.Tensor, dtype: torch.dtype, **kwargs) -> dict[str, torch.Tensor]:
    """``model(images[None], **kwargs)`` with the images in the dtype of the model's (non-narrowed) parameters,
    under autocast when ``dtype`` is narrower than those."""
    first = next(model.parameters())  # a token, never a Linear matrix stored narrow (store_weights_in)
    autocast = (
        torch.autocast(device_type=first.device.type, dtype=dtype) if dtype != first.dtype else contextlib.nullcontext()
    )
    with autocast:
        return model(images.to(first.device, first.dtype)[None], **kwargs)


def check_finite(name: str, *arrays: np.ndarray) -> None:
    for a in arrays:
        if not np.isfinite(a).all():
            raise NonFiniteOutputError(
                f"{name} produced NaN/Inf values; try --dtype fp32, or check the weights and alignment checkpoint"
            )


class VGGTBackbone:
    """Runs VGGT's camera and depth heads; points are unprojected from depth with the chosen cameras,
    which keeps them consistent when the user overrides intrinsics.

    ``dtype`` bf16/fp16 with a float32 model: autocast, and (``narrow_weights``) the model's linear-layer
    matrices are stored in that dtype once, so that autocast does not re-cast 1.2 B weights on every pass and
    the float32 copies are freed (half the weight memory). ``dpt_frames_chunk``: frames per DPT pass (memory
    of the depth head grows with it; 2 keeps batched convolutions at a few hundred MB).
    """

    patch_size = VGGT_SPEC.patch_size
    heads: ClassVar[Optional[tuple[str, ...]]] = VGGT_SPEC.posing_heads
    priors: ClassVar[tuple[str, ...]] = VGGT_SPEC.priors

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype = torch.float32,
        target_size: int = 518,
        name: str = "vggt",
        dpt_frames_chunk: int = 2,
        narrow_weights: bool = True,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.target_size = target_size
        self.name = name
        self.dpt_frames_chunk = dpt_frames_chunk
        if narrow_weights and dtype in (torch.bfloat16, torch.float16):
            from ns_extreme.models.layers import store_weights_in

            store_weights_in(model, dtype)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> FramePredictions:
        H, W = images.shape[-2:]
        out = _forward(self.model, images, self.dtype, heads=self.heads, dpt_frames_chunk=self.dpt_frames_chunk)
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
            raise NonFiniteOutputError(
                f"{self.name} predicted a field of view outside (0, 180) degrees; check the weights"
            )
        return pred


class Pi3Backbone:
    """Runs π³'s point, confidence and camera heads on the frames as one (unordered) set.

    * Poses: π³ predicts camera-to-world (OpenCV) in an arbitrary world; ``w2c`` is its inverse, re-expressed
      in the camera of frame 0 (``anchor_first_frame``, default) so that FramePredictions' convention
      (frame 0 = identity) holds. This rigid change of world leaves relative poses, depth and scale untouched.
    * Intrinsics: π³ predicts none; ``ns_extreme.posing.focal.recover_focal`` fits one focal length per view
      (or one shared, ``shared_focal``) to the local point maps, principal point at the image centre,
      confidence-weighted, ignoring constant white border padding (pad mode / mixed shapes).
    * Depth: z of the local points. Confidence: sigmoid of π³'s logits (a probability in (0, 1); larger is
      better; the pipeline only uses it through percentiles, medians and as relative weights).
    * Input size: the pipeline's shared preprocessing (``preprocess_images``) at ``target_size``. Default 518
      (crop: 4:3 → 518×392, 203k pixels, inside π³'s 255k-pixel training budget), which keeps the batch
      identical for a ``compare_backbone`` run with VGGT; ``target_size=574`` reproduces π³'s own size for
      4:3 photos (574×434). ``ns_extreme.models.pi3.preprocess.preprocess_images_pi3`` implements π³'s
      exact resize rule for callers that want it.
    """

    patch_size = PI3_SPEC.patch_size
    heads: ClassVar[Optional[tuple[str, ...]]] = PI3_SPEC.posing_heads
    priors: ClassVar[tuple[str, ...]] = PI3_SPEC.priors

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype = torch.float32,
        target_size: int = 518,
        name: str = "pi3",
        shared_focal: bool = False,
        anchor_first_frame: bool = True,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.target_size = target_size
        self.name = name
        self.shared_focal = shared_focal
        self.anchor_first_frame = anchor_first_frame

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> FramePredictions:
        from ns_extreme.posing.focal import padding_mask, recover_focal

        H, W = images.shape[-2:]
        out = _forward(self.model, images, self.dtype, heads=("points", "conf", "camera"))
        local = out["local_points"][0].float().cpu()
        confidence = torch.sigmoid(out["conf"][0, ..., 0].float()).cpu().numpy()
        c2w = out["camera_poses"][0].double().cpu().numpy()
        check_finite(self.name, c2w, local.numpy(), confidence)
        c2w[:, :3, :3] = nearest_rotation(c2w[:, :3, :3])
        w2c = invert_rigid(c2w)
        if self.anchor_first_frame:
            w2c = w2c @ c2w[0]  # world := camera of frame 0
        K = recover_focal(local, confidence, (H, W), mask=padding_mask(images), shared=self.shared_focal)
        focal = K[:, 0, 0]
        if not bool(np.all(np.isfinite(focal) & (focal > 0))):
            raise NonFiniteOutputError(
                f"{self.name}: no positive focal length fits the predicted point maps (focal "
                f"lengths {focal}); check the weights"
            )
        return FramePredictions(
            w2c_opencv=w2c[:, :3, :],
            intrinsics=K,
            depth=local[..., 2].numpy(),
            confidence=confidence.astype(np.float32),
        )
