"""DPT head of VGGT: fuses four aggregator layers into dense per-pixel predictions and confidences."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[height, width, 2] normalised coordinates spanning +-aspect/diag by +-1/diag, pixel centres inset."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device)
    ys = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype, device=device
    )
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def sincos_embed(values: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """[N] -> [N, dim] = [sin(v*w_k)..., cos(v*w_k)...], w_k = omega_0^(-k/(dim/2)), computed in float64."""
    omega = 1.0 / omega_0 ** (torch.arange(dim // 2, dtype=torch.float64, device=values.device) / (dim / 2.0))
    angles = values.reshape(-1, 1).double() * omega
    return torch.cat((angles.sin(), angles.cos()), dim=1).float()


def uv_embedding(
    channels: int,
    h: int,
    w: int,
    image_w: int,
    image_h: int,
    dtype: torch.dtype,
    device: torch.device,
    ratio: float = 0.1,
) -> torch.Tensor:
    """[1, channels, h, w] sin-cos embedding of the UV grid, scaled by ``ratio``."""
    grid = uv_grid(w, h, image_w / image_h, dtype, device).reshape(-1, 2)
    emb = torch.cat((sincos_embed(grid[:, 0], channels // 2), sincos_embed(grid[:, 1], channels // 2)), dim=-1)
    return (emb.view(h, w, channels) * ratio).permute(2, 0, 1).to(dtype)[None]


def add_uv_embedding(
    x: torch.Tensor, image_w: int, image_h: int, ratio: float = 0.1, cache: Optional[dict] = None
) -> torch.Tensor:
    """x + its UV embedding. ``cache`` (a dict kept for one forward) reuses embeddings across frame chunks;
    without autograd the sum is taken in place (x must then be a fresh tensor)."""
    channels, h, w = x.shape[1], x.shape[2], x.shape[3]
    key = (channels, h, w, image_w, image_h, ratio, x.dtype, x.device)
    emb = cache.get(key) if cache is not None else None
    if emb is None:
        emb = uv_embedding(channels, h, w, image_w, image_h, x.dtype, x.device, ratio)
        if cache is not None:
            cache[key] = emb
    if not torch.is_grad_enabled():
        return x.add_(emb)
    return x + emb


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference applies an in-place ReLU to its input, so the skip connection adds relu(x), not x.
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, in_channels: Sequence[int], features: int, output_dim: int) -> None:
        super().__init__()
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.refinenet1 = FusionBlock(features)
        self.refinenet2 = FusionBlock(features)
        self.refinenet3 = FusionBlock(features)
        self.refinenet4 = FusionBlock(features, has_residual=False)
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
        )

    def fuse(self, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor, l4: torch.Tensor) -> torch.Tensor:
        l1, l2, l3, l4 = self.layer1_rn(l1), self.layer2_rn(l2), self.layer3_rn(l3), self.layer4_rn(l4)
        x = self.refinenet4(l4, size=l3.shape[2:])
        x = self.refinenet3(x, l3, size=l2.shape[2:])
        x = self.refinenet2(x, l2, size=l1.shape[2:])
        x = self.refinenet1(x, l1)
        return self.output_conv1(x)


class DPTHead(nn.Module):
    """Outputs (prediction [B, S, H, W, output_dim-1], confidence [B, S, H, W]).

    ``activation``: "exp" (depth), "inv_log" (points: sign(x) * expm1(|x|)) or "norm" (x / |x|, normals);
    confidence is 1 + exp(c).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int,
        output_dim: int,
        activation: str,
        features: int,
        out_channels: Sequence[int],
        taps: Sequence[int],
    ) -> None:
        super().__init__()
        if activation not in ("exp", "inv_log", "norm"):
            raise ValueError(f"unknown activation {activation!r}")
        self.patch_size = patch_size
        self.activation = activation
        self.taps = tuple(taps)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in out_channels)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = Scratch(out_channels, features, output_dim)

    def _frames(
        self, layers: dict[int, torch.Tensor], patch_start: int, image_hw: tuple[int, int], cache: Optional[dict] = None
    ) -> torch.Tensor:
        return self.scratch.output_conv2(self._fused(layers, patch_start, image_hw, cache))

    def _fused(
        self, layers: dict[int, torch.Tensor], patch_start: int, image_hw: tuple[int, int], cache: Optional[dict] = None
    ) -> torch.Tensor:
        """The fused, upsampled, UV-embedded feature map [frames, features // 2, H, W] (input of output_conv2)."""
        H, W = image_hw
        h, w = H // self.patch_size, W // self.patch_size
        feats = []
        for k, tap in enumerate(self.taps):
            x = layers[tap][:, :, patch_start:]
            x = self.norm(x.reshape(-1, x.shape[-2], x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], h, w)
            x = add_uv_embedding(self.projects[k](x), W, H, cache=cache)
            feats.append(self.resize_layers[k](x))
        x = self.scratch.fuse(*feats)
        x = F.interpolate(x, size=(h * self.patch_size, w * self.patch_size), mode="bilinear", align_corners=True)
        return add_uv_embedding(x, W, H, cache=cache)

    def forward(
        self, layers: dict[int, torch.Tensor], patch_start: int, image_hw: tuple[int, int], frames_chunk: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, S = layers[self.taps[0]].shape[:2]
        chunk = frames_chunk if frames_chunk and frames_chunk > 0 else S
        cache: dict = {}  # UV embeddings, computed once for all chunks
        outs = [
            self._frames({t: layers[t][:, s : s + chunk] for t in self.taps}, patch_start, image_hw, cache)
            for s in range(0, S, chunk)
        ]
        # Frames were flattened batch-major within each chunk: restore [B, chunk, ...] before joining.
        out = torch.cat([o.view(B, -1, *o.shape[1:]) for o in outs], dim=1).permute(0, 1, 3, 4, 2)
        values, conf = out[..., :-1], out[..., -1]
        if self.activation == "exp":
            values = torch.exp(values)
        elif self.activation == "norm":  # unit vectors (WorldMirror's normals); no epsilon, as in the reference
            values = values / values.norm(dim=-1, keepdim=True)
        else:
            values = torch.sign(values) * torch.expm1(values.abs())
        return values, 1 + torch.exp(conf)
