"""Transformer building blocks shared by the VGGT and pi3 backbones.

Module and parameter names (``attn.qkv``, ``ls1.gamma``, ``mlp.fc1`` ...) follow the official checkpoints so
that their state dicts load without renaming.

Speed notes (all bit-exact with the straightforward formulation in float32, see benchmarks/README.md):

* RoPE cos/sin rows are gathered once per forward (:class:`RopeTables`) and shared by every block, q and k,
  instead of being rebuilt 4 times per block; the rotation runs in the ``[B, N, heads, D]`` layout that the
  fused qkv projection produces, so q and k need no permute copies;
* without autograd, LayerScale and the rotation work in place (fewer multi-MB temporaries);
* :class:`Linear` accepts weights stored in a narrower dtype than its input (``bfloat16`` weights, ``float32``
  math: half the weight memory at float32 speed on CPUs without fast bfloat16), see
  :func:`store_weights_in`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose weights may be stored in a narrower dtype
    than the activations: they are then cast to the input's dtype for each call (weight-only compression).
    With matching dtypes (or under autocast) it is exactly ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)


def narrowable_linears(model: nn.Module, heads: bool = False) -> list[tuple[str, Linear]]:
    """The :class:`Linear` layers of ``model`` that :func:`store_weights_in` narrows: all but (unless ``heads``)
    those inside the submodules the model lists in ``float32_modules`` (its heads, which compute in float32 as
    the reference does, with float32 weights, under autocast)."""
    keep = () if heads else tuple(f"{name}." for name in getattr(model, "float32_modules", ()))
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Linear) and not f"{name}.".startswith(keep)
    ]


def store_weights_in(model: nn.Module, dtype: torch.dtype, heads: bool = False) -> int:
    """Store the matrices of the :func:`narrowable_linears` of ``model`` in ``dtype`` (e.g. bfloat16), leaving all
    other parameters (biases, norms, LayerScale, tokens, convolutions, the heads) as they are. Returns the number
    of converted parameters. Inputs keep the model's compute dtype; each Linear upcasts its weight per call.
    ``heads``: narrow the heads' matrices too (``--dtype bf16-weights``: no autocast, the least memory)."""
    converted = 0
    for _, module in narrowable_linears(model, heads):
        if module.weight.dtype != dtype:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=module.weight.requires_grad)
            converted += module.weight.numel()
    return converted


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place when nothing needs the unscaled branch output (inference) and no dtype promotion happens.
        if not torch.is_grad_enabled() and x.dtype == self.gamma.dtype:
            return x.mul_(self.gamma)
        return x * self.gamma


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE: the first half of each head is rotated by the row position, the second by the column.

    Within a half, channel i is paired with channel i + d/2 (half-split, not interleaved).
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = frequency

    def _cos_sin(
        self, dim: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.frequency ** (torch.arange(0, dim, 2, device=device).float() / dim))
        angles = torch.outer(torch.arange(length, device=device, dtype=inv_freq.dtype), inv_freq).to(dtype)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def tables(self, positions: torch.Tensor) -> "RopeTables":
        """Per-token cos/sin rows for ``positions`` [B, N, 2]: build once, pass as ``pos`` to every block."""
        return RopeTables(self, positions)

    def forward(self, x: torch.Tensor, positions: Union[torch.Tensor, "RopeTables"]) -> torch.Tensor:
        """x: [B, heads, N, D]; positions: [B, N, 2] integer (row, col), or their :class:`RopeTables`."""
        tables = positions if isinstance(positions, RopeTables) else RopeTables(self, positions)
        return tables.rotate(x.transpose(1, 2)).transpose(1, 2)


class RopeTables:
    """cos/sin rows of the 2D RoPE for one set of token positions, per (head_dim, dtype, device), cached.

    Element for element this computes ``x * cos + rotate_half(x) * sin`` on each half of a head (exactly the
    same float operations); the sign of ``rotate_half`` is folded into the sine table, which is exact.
    """

    def __init__(self, rope: RotaryPositionEmbedding2D, positions: torch.Tensor) -> None:
        self.rope = rope
        self.positions = positions
        self._length: Optional[int] = None
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each [B, N, head_dim]."""
        key = (head_dim, dtype, device)
        if key not in self._cache:
            if self._length is None:
                self._length = int(self.positions.max()) + 1
            half = head_dim // 2
            cos, sin = self.rope._cos_sin(half, self._length, device, dtype)
            quarter = half // 2
            sin = torch.cat((-sin[:, :quarter], sin[:, quarter:]), dim=-1)
            pos = self.positions.to(device)
            rows, cols = pos[..., 0], pos[..., 1]
            self._cache[key] = (
                torch.cat((F.embedding(rows, cos), F.embedding(cols, cos)), dim=-1),
                torch.cat((F.embedding(rows, sin), F.embedding(cols, sin)), dim=-1),
            )
        return self._cache[key]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, heads, D] -> rotated, same layout."""
        B, N, H, D = x.shape
        cos, sin = self.get(D, x.dtype, x.device)
        cos, sin = cos[:, :, None], sin[:, :, None]
        # Swap the two quarters inside each half: [a, b, c, d] -> [b, a, d, c]; the sine table carries the sign.
        swapped = x.reshape(B, N, H, 2, 2, D // 4).flip(-2).reshape(B, N, H, D)
        if torch.is_grad_enabled():
            return x * cos + swapped * sin
        out = x * cos
        return out.add_(swapped.mul_(sin))


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        rope: Optional[RotaryPositionEmbedding2D] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)
        self.rope = rope  # one parameter-free instance shared by all blocks

    def forward(self, x: torch.Tensor, pos: Optional[Union[torch.Tensor, RopeTables]] = None) -> torch.Tensor:
        B, N, C = x.shape
        # [B, N, 3, heads, D]: q, k, v stay in the token-major layout (SDPA takes the transposed views).
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            tables = pos if isinstance(pos, RopeTables) else self.rope.tables(pos)
            q, k = tables.rotate(q), tables.rotate(k)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: Optional[float] = None,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        rope: Optional[RotaryPositionEmbedding2D] = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor, pos: Optional[Union[torch.Tensor, RopeTables]] = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


def patch_positions(batch: int, rows: int, cols: int, num_special: int, device: torch.device) -> torch.Tensor:
    """RoPE positions [batch, num_special + rows*cols, 2]: specials at (0, 0), patch (r, c) at (r+1, c+1)."""
    grid = torch.cartesian_prod(torch.arange(rows, device=device), torch.arange(cols, device=device)) + 1
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat((special, grid)).expand(batch, -1, -1)
