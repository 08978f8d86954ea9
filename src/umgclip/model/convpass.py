"""Convpass: convolutional bypasses for parameter-efficient adaptation of a frozen image tower.

Convpass (Jie & Deng, arXiv 2207.07039) adds, in parallel with the attention and with the MLP of
every ViT block, a small bottleneck that restores the 2-D inductive bias: 1x1 down to a hidden
width, 3x3 conv on the patch grid, 1x1 up, QuickGELU between, scaled by ``s``::

    x = x + attn(ln_1(x)) + s * convpass_attn(ln_1(x))
    x = x + mlp(ln_2(x))  + s * convpass_mlp(ln_2(x))

The up-projection is zero-initialised, so the adapted model equals the original at step 0.

Class / prefix tokens: as in the reference Convpass code, the prefix tokens go through the same
1x1 down/up projections and through the 3x3 conv as a 1x1 "image" with zero padding, i.e. only
the centre tap of the 3x3 kernel touches them (no spatial mixing with patches).

For CNN towers (umg-lite's EfficientNet-Lite0) there is no token sequence; the nearest honest
equivalent is :class:`ConvBypass`: per stage, a bypass parallel to the stage (1x1 down, 3x3 with
the stage's stride, 1x1 up zero-initialised) whose output is added to the stage output. It is a
convolutional bypass in the Convpass spirit, not the paper's ViT design, and is documented so.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBypass", "Convpass", "QuickGELU", "attach_convpass_to_block", "attach_stage_bypass"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI CLIP and of the Convpass paper."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Convpass(nn.Module):
    """One Convpass bypass on a token sequence ``(B, N, D)`` whose last ``H*W`` tokens form a grid.

    Args:
        dim: token width.
        hidden: bottleneck width (the paper uses 8).
        grid: the patch grid (H, W) at the model's native input size; other sizes are inferred
            from the sequence length when the grid is square.
        scale: the bypass output multiplier ``s``.
    """

    def __init__(
        self, dim: int, hidden: int = 8, grid: tuple[int, int] = (14, 14), scale: float = 0.1
    ):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.up = nn.Linear(hidden, dim)
        self.act = QuickGELU()
        self.grid = tuple(grid)
        self.scale = scale
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        # Zero up-projection: the adapted block is exactly the frozen block at step 0.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _grid_for(self, n: int) -> tuple[int, int, int]:
        gh, gw = self.grid
        if n >= gh * gw and n - gh * gw <= 8:
            return gh, gw, n - gh * gw
        side = int(math.isqrt(n - 1)) if n > 1 else 0
        if side * side == n - 1:
            return side, side, 1
        raise ValueError(
            f"Convpass: cannot lay {n} tokens on a patch grid (native grid {self.grid}); "
            "token reduction must be off when adapters are active"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        gh, gw, n_prefix = self._grid_for(n)
        h = self.act(self.down(x))
        patches = h[:, n_prefix:].transpose(1, 2).reshape(b, -1, gh, gw)
        patches = self.conv(patches).flatten(2).transpose(1, 2)
        if n_prefix:
            # A 3x3 conv on a zero-padded 1x1 map only sees its centre tap: apply that tap.
            prefix = F.linear(h[:, :n_prefix], self.conv.weight[:, :, 1, 1], self.conv.bias)
            patches = torch.cat([prefix, patches], dim=1)
        return self.up(self.act(patches)) * self.scale


def _convpass_block_forward(
    self: nn.Module,
    q_x: torch.Tensor,
    k_x: torch.Tensor | None = None,
    v_x: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock.forward`` with the two parallel Convpass branches."""
    seq_first = not self.convpass_batch_first
    y = self.ln_1(q_x)
    attn = self.ls_1(self.attention(q_x=y, attn_mask=attn_mask))
    bp = self.convpass_attn(y.transpose(0, 1) if seq_first else y)
    x = q_x + attn + (bp.transpose(0, 1) if seq_first else bp)
    y = self.ln_2(x)
    bp = self.convpass_mlp(y.transpose(0, 1) if seq_first else y)
    return x + self.ls_2(self.mlp(y)) + (bp.transpose(0, 1) if seq_first else bp)


def attach_convpass_to_block(
    block: nn.Module, dim: int, hidden: int, grid: tuple[int, int], scale: float, batch_first: bool
) -> None:
    """Give an open_clip ``ResidualAttentionBlock`` two Convpass branches (in place).

    The adapters become sub-modules ``convpass_attn`` / ``convpass_mlp`` so the frozen weights keep
    their original names (backbone checkpoints still load) and adapter weights are selectable by
    name. The block's forward is rebound on the instance (not the class) so other blocks and
    models are untouched.
    """
    if hasattr(block, "ln_1_kv"):
        raise ValueError("Convpass supports self-attention blocks only (no cross-attention)")
    block.convpass_attn = Convpass(dim, hidden, grid, scale)
    block.convpass_mlp = Convpass(dim, hidden, grid, scale)
    block.convpass_batch_first = batch_first
    block.forward = types.MethodType(_convpass_block_forward, block)


class ConvBypass(nn.Module):
    """A convolutional bypass parallel to one CNN stage: ``(B,Cin,H,W) -> (B,Cout,H/s,W/s)``."""

    def __init__(self, c_in: int, c_out: int, hidden: int = 8, stride: int = 1, scale: float = 0.1):
        super().__init__()
        self.down = nn.Conv2d(c_in, hidden, 1)
        self.conv = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1)
        self.up = nn.Conv2d(hidden, c_out, 1)
        self.act = QuickGELU()
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.conv(self.act(self.down(x))))) * self.scale


def attach_stage_bypass(stage: nn.Module, bypass: ConvBypass) -> Callable[[], None]:
    """Make ``stage`` return ``stage(x) + bypass(x)`` through a forward hook (in place).

    The stage's code and parameter names stay untouched. The caller must register ``bypass``
    as a sub-module somewhere other than ``stage`` (a ``Sequential`` stage would otherwise run it
    as one more layer). Returns a function that removes the hook.
    """

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return out + bypass(inputs[0])

    handle = stage.register_forward_hook(hook)
    return handle.remove
