"""The plain float32 eager baseline: the model's straightforward formulation, as before the optimisations.

Applied by monkeypatching inside a baseline worker process only. Numerically it is the same model (the
optimised float32 path is bit-exact with it, which the forward benchmark re-checks); what differs is the
work done: RoPE tables rebuilt and gathered 4× per block, q/k permute copies, out-of-place LayerScale,
the DPT UV embedding recomputed per chunk, all three heads with 8-frame DPT chunks, and weights read with
``safetensors.torch.load_file`` (the whole file into memory, then assigned).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _rope_forward(self, x: torch.Tensor, positions) -> torch.Tensor:
    from ns_extreme.models.layers import RopeTables

    if isinstance(positions, RopeTables):
        positions = positions.positions
    cos, sin = self._cos_sin(x.shape[-1] // 2, int(positions.max()) + 1, x.device, x.dtype)

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)

    def rotate(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos_p = F.embedding(pos, cos)[:, None]
        sin_p = F.embedding(pos, sin)[:, None]
        return t * cos_p + rotate_half(t) * sin_p

    rows, cols = x.chunk(2, dim=-1)
    return torch.cat((rotate(rows, positions[..., 0]), rotate(cols, positions[..., 1])), dim=-1)


def _attention_forward(self, x: torch.Tensor, pos=None) -> torch.Tensor:
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.rope is not None and pos is not None:
        q, k = _rope_forward(self.rope, q, pos), _rope_forward(self.rope, k, pos)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(B, N, C))


def _layerscale_forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.gamma


def _add_uv_embedding(x: torch.Tensor, image_w: int, image_h: int, ratio: float = 0.1, cache=None) -> torch.Tensor:
    from ns_extreme.models.vggt.dpt_head import uv_embedding

    return x + uv_embedding(x.shape[1], x.shape[2], x.shape[3], image_w, image_h, x.dtype, x.device, ratio)


def apply() -> None:
    """Switch this process to the plain formulation."""
    from ns_extreme.models import layers
    from ns_extreme.models.vggt import dpt_head

    layers.Attention.forward = _attention_forward
    layers.LayerScale.forward = _layerscale_forward
    layers.RotaryPositionEmbedding2D.forward = _rope_forward
    dpt_head.add_uv_embedding = _add_uv_embedding


def load_plain(path: Path, config, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The loader as it was: ``load_file`` (whole state dict in memory), strict check, assign, ``.to``."""
    from safetensors.torch import load_file

    from ns_extreme.models import get_spec
    from ns_extreme.models.weights import check_state_dict

    spec = get_spec("vggt")
    with torch.device("meta"):
        model = spec.build(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = check_state_dict(expected, load_file(str(path)), spec.ignored_checkpoint_prefixes, str(path))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
