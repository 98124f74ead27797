"""WorldMirror (HunyuanWorld-Mirror 1.0): VGGT-1B plus prior encoders, a normal head and a 3DGS head.

Priors (all optional, any combination; the reference's ``cond_flags`` follow from which arguments are given):

* ``poses_c2w`` [(B,) S, 4, 4] (or 3x4): camera-to-world, OpenCV axes -> one pose token per view. The camera centres
  are normalised into the unit cube per batch element (min/max over the views with a pose, 5 %/95 % quantiles from 11
  such views on), so only the relative layout counts; outputs stay in the network's own frame (camera 0, its scale):
  map them onto the given poses with a Sim(3) afterwards.
* ``intrinsics`` [(B,) S, 3, 3] in pixels **of the network input** (after resize/crop) -> one ray token per view
  from (fx/W, fy/H, cx/W, cy/H).
* ``depth`` [(B,) S, h, w], any unit (each map is min-max normalised on its own: scale is lost), resized bilinearly
  to the input size if it differs; pixels <= 0, NaN or Inf are invalid.

Priors for only some views: mark a view without a pose (intrinsics) by NaN in *every* entry of its matrix, a view
without depth by a map with no positive finite value. Such a view gets exactly what every view gets when that prior
is not given at all (the zero pose / ray token, no depth tokens), and takes no part in the pose normalisation. A
matrix that is only partly non-finite is an error. The reference has no per-view notion: with all views given,
ours is the reference's computation.

The 2 prior tokens are in every sequence, as zeros when absent (``patch_start_idx`` = 7): zero tokens still take
part in attention, so this is what the released weights expect.

Precision: the backbone runs in whatever autocast context the caller sets; the heads always run in the dtype of
their parameters (float32 for loaded weights) with autocast disabled, as the reference does.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ns_extreme.geometry.pose_encoding import w2c_intrinsics_from_pose_encoding
from ns_extreme.models.heads import batched_images, check_head_names, check_heads_present, drop_heads
from ns_extreme.models.vggt.dpt_head import DPTHead
from ns_extreme.models.worldmirror.config import WorldMirrorConfig
from ns_extreme.models.worldmirror.modules import (
    GaussianDPTHead,
    SplatParamHead,
    VisualGeometryTransformer,
    WorldMirrorCameraHead,
    splats_from_gaussian_params,
)
from ns_extreme.models.worldmirror.priors import (
    normalize_depth,
    pose_prior_vectors,
    ray_prior_vectors,
    resize_depth,
)

WORLDMIRROR_HEADS = ("camera", "depth", "points", "normals", "gs")
"""Head names for ``heads=``: camera (``camera_params``, ``camera_poses``, ``camera_intrs``), depth (``depth``),
points (``pts3d``), normals (``normals``) and gs (``gs_depth`` and the splats; needs the camera, which then runs
too)."""
HEAD_MODULES = {
    "camera": ("cam_head",),
    "depth": ("depth_head",),
    "points": ("pts_head",),
    "normals": ("norm_head",),
    "gs": ("gs_head", "gs_renderer"),
}
DENSE_HEADS = ("depth", "points", "normals", "gs")


class WorldMirror(nn.Module):
    float32_modules = tuple(attr for attrs in HEAD_MODULES.values() for attr in attrs)
    """Heads whose weights ``store_weights_in`` never narrows under autocast precisions (they run in float32)."""

    def __init__(self, cfg: WorldMirrorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or WorldMirrorConfig()
        self.visual_geometry_transformer = VisualGeometryTransformer(cfg)
        dim = 2 * cfg.embed_dim
        self.cam_head = WorldMirrorCameraHead(dim, cfg.camera_trunk_depth, cfg.camera_num_heads, cfg.mlp_ratio)
        dpt = dict(patch_size=cfg.patch_size, out_channels=cfg.dpt_out_channels, taps=cfg.dpt_taps)
        self.pts_head = DPTHead(dim, output_dim=4, activation="inv_log", features=cfg.dpt_features, **dpt)
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", features=cfg.dpt_features, **dpt)
        self.norm_head = DPTHead(dim, output_dim=4, activation="norm", features=cfg.dpt_features, **dpt)
        self.gs_head = GaussianDPTHead(dim, features=cfg.gs_features, **dpt)
        self.gs_renderer = SplatParamHead(cfg.gs_features, cfg.sh_degree)

    def drop_heads(self, keep: Iterable[str]) -> list[str]:
        """Remove the heads not in ``keep`` (gs keeps the camera it needs); returns the state-dict prefixes removed."""
        keep = set(keep)
        return drop_heads(self, keep | ({"camera"} if "gs" in keep else set()), HEAD_MODULES)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.visual_geometry_transformer.gradient_checkpointing = enabled
        self.visual_geometry_transformer.patch_embed.gradient_checkpointing = enabled

    def forward(
        self,
        images: torch.Tensor,
        poses_c2w: Optional[torch.Tensor] = None,
        intrinsics: Optional[torch.Tensor] = None,
        depth: Optional[torch.Tensor] = None,
        heads: Optional[Iterable[str]] = None,
        dpt_frames_chunk: Optional[int] = None,
    ) -> dict:
        """images [S, 3, H, W] or [B, S, 3, H, W] in [0, 1], H and W multiples of the patch size; priors as in the
        module docstring (batch dimension optional, like the images'). ``heads``: None (all) or names from
        ``WORLDMIRROR_HEADS``. ``dpt_frames_chunk`` overrides ``cfg.dpt_frames_chunk``.

        Returns (for the heads run; always with a batch dimension): ``camera_params [B,S,9]`` (world-to-camera
        ``[t, q_xyzw, fov_v, fov_u]``, OpenCV, world = camera 0), ``camera_params_list`` (all 4 refinement steps),
        ``camera_poses [B,S,4,4]`` (camera-to-world), ``camera_intrs [B,S,3,3]`` (network pixels, principal point
        at the centre), ``depth [B,S,H,W,1]``, ``depth_conf``, ``pts3d [B,S,H,W,3]`` (world), ``pts3d_conf``,
        ``normals [B,S,H,W,3]`` (unit, camera frame), ``normals_conf``, ``gs_depth [B,S,H,W,1]``, ``gs_depth_conf``,
        ``gs_params [B,S,H,W,12]`` (raw per-pixel Gaussian parameters, for filtering before
        :func:`splats_from_gaussian_params`) and ``splats`` (the reference's voxel-merged Gaussians: dict of lists
        per batch element). Confidences are ``[B,S,H,W]``, >= 1.
        """
        heads = WORLDMIRROR_HEADS if heads is None else tuple(heads)
        check_head_names(heads, HEAD_MODULES)
        run = set(heads) | ({"camera"} if "gs" in heads else set())
        check_heads_present(self, [h for h in WORLDMIRROR_HEADS if h in run], HEAD_MODULES)
        batched = images.ndim == 5
        images = batched_images(images, self.cfg.patch_size)
        B, S, _, H, W = images.shape
        priors = self._priors(images, batched, poses_c2w, intrinsics, depth)

        last = self.cfg.depth - 1
        keep = set(self.cfg.dpt_taps) if run & set(DENSE_HEADS) else set()
        if "camera" in run:
            keep.add(last)
        layers = self.visual_geometry_transformer(images, keep, **priors)
        start = self.visual_geometry_transformer.patch_start_idx
        chunk = self.cfg.dpt_frames_chunk if dpt_frames_chunk is None else dpt_frames_chunk
        out: dict = {}
        with torch.autocast(images.device.type, enabled=False):
            dtype = self._head_dtype()
            layers = {k: v.to(dtype) for k, v in layers.items()}
            images = images.to(dtype)
            if "camera" in run:
                encodings = self.cam_head(layers[last][:, :, 0], self.cfg.camera_iterations)
                out["camera_params"], out["camera_params_list"] = encodings[-1], encodings
                w2c, K = w2c_intrinsics_from_pose_encoding(encodings[-1], (H, W))
                bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=w2c.dtype, device=w2c.device).expand(B, S, 1, 4)
                out["camera_poses"] = torch.linalg.inv(torch.cat((w2c, bottom), dim=-2))
                out["camera_intrs"] = K
            for head, module, name in (
                ("depth", self.depth_head, "depth"),
                ("points", self.pts_head, "pts3d"),
                ("normals", self.norm_head, "normals"),
            ):
                if head in run:
                    out[name], out[f"{name}_conf"] = module(layers, start, (H, W), chunk)
            if "gs" in run:
                feats, out["gs_depth"], out["gs_depth_conf"] = self.gs_head(layers, start, images, chunk)
                params = self.gs_renderer(feats.flatten(0, 1))
                out["gs_params"] = params.view(B, S, -1, H, W).permute(0, 1, 3, 4, 2)
                out["splats"] = splats_from_gaussian_params(
                    params,
                    images,
                    out["gs_depth"],
                    out["camera_poses"],
                    out["camera_intrs"],
                    self.gs_renderer.num_sh,
                    self.cfg.splat_voxel_size,
                )
        return out

    def _head_dtype(self) -> torch.dtype:
        """The dtype the heads compute in: their parameters' (float32 for loaded weights)."""
        heads = [getattr(self, attr) for attrs in HEAD_MODULES.values() for attr in attrs]
        return next((p.dtype for m in heads if m is not None for p in m.parameters()), torch.float32)

    def _priors(
        self,
        images: torch.Tensor,
        batched: bool,
        poses_c2w: Optional[torch.Tensor],
        intrinsics: Optional[torch.Tensor],
        depth: Optional[torch.Tensor],
    ) -> dict[str, Optional[torch.Tensor]]:
        """Validated, normalised priors and per-view validity masks for the backbone (None where not given)."""
        B, S, _, H, W = images.shape
        out: dict[str, Optional[torch.Tensor]] = {}
        if poses_c2w is not None:
            poses = _batched(poses_c2w, batched, "poses_c2w", (B, S), ((4, 4), (3, 4)))
            valid = _matrix_views(poses[..., :3, :4], "poses_c2w")
            if valid.any():
                out["pose_vectors"] = pose_prior_vectors(poses.float(), valid)
                out["pose_valid"] = None if valid.all() else valid
        if intrinsics is not None:
            K = _batched(intrinsics, batched, "intrinsics", (B, S), ((3, 3),))
            valid = _matrix_views(K, "intrinsics")
            focal = torch.stack((K[..., 0, 0], K[..., 1, 1]), dim=-1)
            if (focal[valid] <= 0).any():
                raise ValueError("intrinsics: focal lengths (K[0,0], K[1,1]) must be positive")
            if valid.any():
                out["ray_vectors"] = torch.nan_to_num(ray_prior_vectors(K.float(), (H, W)))
                out["ray_valid"] = None if valid.all() else valid
        if depth is not None:
            d = _batched(depth, batched, "depth", (B, S), None)
            finite_positive = torch.isfinite(d) & (d > 0)
            valid = finite_positive.flatten(2).any(dim=-1)
            if valid.any():
                out["depth_maps"] = normalize_depth(resize_depth(d.float(), (H, W)))
                out["depth_valid"] = None if valid.all() else valid
        return out


def _batched(
    x: torch.Tensor, batched: bool, name: str, BS: tuple[int, int], matrix: Optional[tuple[tuple[int, int], ...]]
) -> torch.Tensor:
    """Add the batch dimension the images lacked and check the leading [B, S] (and the matrix shape)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    want = 4 if batched else 3  # [(B,) S, 4, 4], [(B,) S, 3, 3], [(B,) S, h, w]
    if x.ndim != want:
        layout = "[B, S, ...] like the images" if batched else "[S, ...] like the images"
        raise ValueError(f"{name}: expected {want} dimensions ({layout}), got shape {tuple(x.shape)}")
    if not batched:
        x = x[None]
    if tuple(x.shape[:2]) != BS:
        raise ValueError(f"{name}: expected one entry per image ({BS[1]} views), got shape {tuple(x.shape)}")
    if matrix is not None and tuple(x.shape[-2:]) not in matrix:
        raise ValueError(
            f"{name}: expected {' or '.join('x'.join(map(str, m)) for m in matrix)} matrices, got {tuple(x.shape)}"
        )
    return x


def _matrix_views(m: torch.Tensor, name: str) -> torch.Tensor:
    """[B, S] bool: views whose matrix is finite; all-NaN marks a view without this prior; anything else is an error."""
    finite = torch.isfinite(m).flatten(2)
    missing = torch.isnan(m).flatten(2).all(dim=-1)
    partial = ~finite.all(dim=-1) & ~missing
    if partial.any():
        views = partial.nonzero()[:, 1].tolist()
        raise ValueError(
            f"{name}: views {views} are partly NaN/Inf; give a finite matrix, or NaN in every entry for a view "
            "without this prior"
        )
    return ~missing


def build_worldmirror(config: WorldMirrorConfig | None = None) -> WorldMirror:
    """WorldMirror with random weights (full size by default); load weights with ``ns_extreme.models.load_model``."""
    return WorldMirror(config)
