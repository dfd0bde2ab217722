"""ViT-branch building blocks of LViT (LViT paper §3.1, Eq. 3-7, appendix C).

Tokens are kept as ``[B, N, C]`` (``N = h * w`` tokens of the ``(h, w)`` grid,
row-major). In LViT every level has the same grid ``(H / 16, W / 16)``: level
``i`` (1-based) sees CNN features at ``1 / 2**(i-1)`` resolution and embeds them
with patch size ``TOTAL_STRIDE / 2**(i-1)`` (16, 8, 4, 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtextseg.nets.blocks import NUM_LEVELS, TOTAL_STRIDE

__all__ = [
    "CTBN",
    "CTBN_KERNEL_SIZE",
    "DROPOUT",
    "MLP",
    "MLP_RATIO",
    "NUM_HEADS",
    "Attention",
    "DownViT",
    "PatchEmbedding",
    "Reconstruct",
    "Transformer",
    "TransformerBlock",
    "UpViT",
    "patch_size_for_level",
    "resize_tokens",
]

#: Transformer defaults of LViT (official configuration): 8 heads, MLP ratio 4,
#: dropout 0.1 on embeddings, attention weights, projections and MLPs.
NUM_HEADS, MLP_RATIO, DROPOUT = 8, 4.0, 0.1

#: Kernel size of every CTBN Conv1d. With 3 (and padding 1) the LViT-T parameter
#: count is the paper's 29.7M (Table 1); with 1 it would be 29.0M.
CTBN_KERNEL_SIZE = 3


def patch_size_for_level(level: int) -> int:
    """Patch size of ViT level ``level`` (1-based): 16, 8, 4, 2 for levels 1-4.

    Level ``i`` works on features down-sampled ``2**(i-1)`` times, so this patch
    size gives every level the same ``(H/16, W/16)`` token grid.
    """
    if not 1 <= level <= NUM_LEVELS:
        raise ValueError(f"ViT level must be in 1..{NUM_LEVELS}, got {level}")
    return TOTAL_STRIDE // 2 ** (level - 1)


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, h*w, C] -> [B, C, h, w]`` as a channels_last *view* (no copy)."""
    b, _n, c = tokens.shape
    return tokens.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def map_to_tokens(x: Tensor) -> Tensor:
    """``[B, C, h, w] -> [B, h*w, C]``; free for channels_last input."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def resize_tokens(tokens: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """Bilinearly resample a token sequence laid out on ``src_grid`` to ``dst_grid``.

    Shapes: ``[B, src_h*src_w, C] -> [B, dst_h*dst_w, C]``. Used for the position
    embeddings and the text tokens when an image arrives at a different size
    than the ``img_size`` the network was built for. Identity if the grids match.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return tokens
    x = tokens_to_map(tokens, src_grid)
    x = F.interpolate(x, size=dst_grid, mode="bilinear", align_corners=False)
    return map_to_tokens(x)


class CTBN(nn.Module):
    """Conv1d -> BatchNorm1d -> ReLU over a sequence ``[B, C_in, L] -> [B, C_out, L]``.

    The paper's "CTBN block" (Eq. 3) that aligns text and image token shapes;
    LViT also uses it to halve / merge channels between ViT levels (Eq. 7 and
    the UpViT path). Which axis is "channels" depends on the caller: for text the
    *token* axis is the channel axis (``L`` words -> ``N`` image tokens), for the
    ViT levels the feature axis is. Padding keeps the length unchanged.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = CTBN_KERNEL_SIZE
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm1d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """Apply along the feature axis of tokens: ``[B, N, C_in] -> [B, N, C_out]``."""
        return self.forward(tokens.transpose(1, 2)).transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Patch embedding + learned position embedding + dropout (Eq. 4).

    ``Conv2d(C, C, kernel=stride=patch_size)`` turns ``[B, C, h*p, w*p]`` into
    ``[B, h*w, C]`` tokens. The position embedding is built for ``grid_size`` and
    bilinearly interpolated when a different grid arrives at run time.
    """

    def __init__(
        self, channels: int, patch_size: int, grid_size: tuple[int, int], dropout: float = DROPOUT
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = tuple(grid_size)
        self.proj = nn.Conv2d(channels, channels, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], channels))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.dropout(map_to_tokens(x) + resize_tokens(self.position, self.grid_size, grid))


class Attention(nn.Module):
    """Multi-head self-attention (the MHSA of Eq. 5) via ``F.scaled_dot_product_attention``.

    Shapes: ``[B, N, C] -> [B, N, C]``; ``C`` must be divisible by ``num_heads``.
    """

    def __init__(
        self, dim: int, num_heads: int = NUM_HEADS, qkv_bias: bool = True, dropout: float = DROPOUT
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj_dropout(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class MLP(nn.Sequential):
    """Linear -> GELU -> Dropout -> Linear -> Dropout (the MLP of Eq. 6)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = DROPOUT) -> None:
        super().__init__(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )


class TransformerBlock(nn.Module):
    """Pre-LN Transformer encoder block: Eq. 5 ``x' = MHSA(LN(x)) + x`` and Eq. 6
    ``y = MLP(LN(x')) + x'``. Shapes: ``[B, N, C] -> [B, N, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = NUM_HEADS,
        mlp_ratio: float = MLP_RATIO,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Sequential):
    """``depth`` x :class:`TransformerBlock` (the "ViT" of Eq. 3 and 7); LViT-T/S/M/L
    use depth 1/4/6/12 in every ViT module."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int = NUM_HEADS,
        mlp_ratio: float = MLP_RATIO,
        dropout: float = DROPOUT,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        super().__init__(
            *(TransformerBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        )


class DownViT(nn.Module):
    """One level of the ViT branch's down path (Eq. 3, 4, 7).

    ``z = ViT(PatchEmbedding(x_cnn) [+ extra])`` where ``extra`` is the text
    tokens at level 1 (Eq. 3). For levels ``i > 1`` a :class:`CTBN` halves the
    channels of ``z`` and the result is *concatenated* with the previous level's
    output ``y_{i-1}`` (``C/2`` channels) to give ``y_i`` with ``C`` channels.
    Eq. 7 writes ``ViT(Y_i + x_img,i+1)``; we follow the official code's
    concatenation because that is the architecture whose size (29.7M) and cost
    (54 GFLOPs) the paper reports.

    Shapes: ``x_cnn [B, C, h*p, w*p]``, ``previous [B, h*w, C/2]`` -> ``[B, h*w, C]``.
    """

    def __init__(
        self,
        channels: int,
        patch_size: int,
        grid_size: tuple[int, int],
        depth: int,
        fuse_previous: bool,
        num_heads: int = NUM_HEADS,
        mlp_ratio: float = MLP_RATIO,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbedding(channels, patch_size, grid_size, dropout)
        self.transformer = Transformer(channels, depth, num_heads, mlp_ratio, dropout)
        self.halve = CTBN(channels, channels // 2) if fuse_previous else None

    def forward(
        self, x_cnn: Tensor, previous: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        tokens = self.embed(x_cnn)
        if extra is not None:
            tokens = tokens + extra
        tokens = self.transformer(tokens)
        if self.halve is None:
            return tokens
        if previous is None:
            raise ValueError("DownViT levels > 1 need the previous level's tokens")
        return torch.cat([previous, self.halve.forward_tokens(tokens)], dim=-1)


class UpViT(nn.Module):
    """One level of the ViT branch's up path.

    ``u_i = ViT(y_i) + CTBN(u_{i+1})`` where the :class:`CTBN` maps the lower
    level's ``2C`` channels to ``C``; the deepest level is just ``ViT(y_4)``.
    Shapes: ``y [B, N, C]``, ``lower [B, N, 2C]`` -> ``[B, N, C]``.
    """

    def __init__(
        self,
        channels: int,
        depth: int,
        fuse_lower: bool,
        num_heads: int = NUM_HEADS,
        mlp_ratio: float = MLP_RATIO,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.transformer = Transformer(channels, depth, num_heads, mlp_ratio, dropout)
        self.merge = CTBN(2 * channels, channels) if fuse_lower else None

    def forward(self, tokens: Tensor, lower: Tensor | None = None) -> Tensor:
        tokens = self.transformer(tokens)
        if self.merge is None:
            return tokens
        if lower is None:
            raise ValueError("UpViT levels < 4 need the lower level's tokens")
        return tokens + self.merge.forward_tokens(lower)


class Reconstruct(nn.Module):
    """CNN-ViT interaction module (appendix C, Fig. 7): tokens back to a feature map.

    Tokens ``[B, h*w, C]`` -> map ``[B, C, h, w]`` -> 1x1 Conv-BN-ReLU ->
    nearest upsample x``scale`` -> ``[B, C, h*scale, w*scale]``, which LViT adds
    to the CNN skip (a residual connection, §3.1).

    The paper/official order is upsample-then-convolve; we convolve on the token
    grid first. Nearest upsampling replicates each pixel ``scale**2`` times and
    the 1x1 conv, BN and ReLU act per pixel, so the outputs are identical (BN's
    batch mean/variance are unchanged by uniform replication; only the unbiased
    correction of the *running* variance differs, by a factor ~1 + 1/(B*h*w)),
    while the conv costs ``scale**2`` times less (0.8 GMAC less at 224x224).
    """

    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.act(self.norm(self.conv(tokens_to_map(tokens, grid))))
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")
