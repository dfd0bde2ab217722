"""LViT: Language meets Vision Transformer (Li et al., 2022; ``papers/lvit.txt``).

A "Double-U": the U-shaped CNN branch of :mod:`medtextseg.nets.blocks` (Eq. 1-2)
plus a U-shaped ViT branch (:mod:`medtextseg.nets.vit`, Eq. 3-7) whose outputs
are added back onto the CNN skips (CNN-ViT interaction, appendix C), and a
pixel-level attention module (PLAM, Eq. 8) on every skip.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medtextseg.nets.blocks import (
    NUM_LEVELS,
    TOTAL_STRIDE,
    CNNDecoder,
    CNNEncoder,
    check_image_size,
    inference_layout,
)
from medtextseg.nets.registry import DOMAIN_OPTIONS, register_network, without
from medtextseg.nets.vit import (
    CTBN,
    DROPOUT,
    MLP_RATIO,
    NUM_HEADS,
    DownViT,
    Reconstruct,
    UpViT,
    patch_size_for_level,
    resize_tokens,
)

__all__ = ["LVIT_DEPTHS", "PLAM", "LViT", "TextConvPath"]


class PLAM(nn.Module):
    """Pixel-Level Attention Module (§3.1, Fig. 2b, Eq. 8): ``Y = MLP(x_cat) (x) x``.

    An average branch (1x1 conv, ReLU, mean over channels) and a max branch
    (1x1 conv, ReLU, max over channels) give two ``[B, 1, H, W]`` maps; the
    per-pixel MLP ``Linear(3, 6)-ReLU-Linear(6, 1)`` reads ``[avg, max, avg+max]``
    (the paper's concat *and* add) and its output scales the input pixel-wise.

    Eq. 8 writes the bare product, and so does the official code. By default
    (``gate=True``), following CBAM, which PLAM is modelled on, the MLP output goes
    through a sigmoid so it acts as a gate in (0, 1) rather than an unbounded
    (possibly sign-flipping) factor; every LViT figure in benchmarks/RESULTS.md was
    measured so. ``gate=False`` is Eq. 8 as written. Neither adds parameters, so the
    two load each other's weights.
    The two branch convolutions run as one ``C -> 2C`` convolution (same
    weights, one kernel launch).

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, hidden: int = 6, gate: bool = True) -> None:
        super().__init__()
        self.branches = nn.Conv2d(channels, 2 * channels, kernel_size=1, bias=False)
        self.mlp = nn.Sequential(
            nn.Conv2d(3, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.Sigmoid() if gate else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        # In place: the convolution does not need its output for its backward.
        avg_branch, max_branch = torch.relu_(self.branches(x)).chunk(2, dim=1)
        avg = avg_branch.mean(dim=1, keepdim=True)
        mx = max_branch.amax(dim=1, keepdim=True)
        return x * self.mlp(torch.cat([avg, mx, avg + mx], dim=1))


class TextConvPath(nn.Module):
    """Text feature path: Conv1d stack along the word axis (kernel 3, padding 1).

    For LViT-T (base 64, BERT 768-d words) the widths are 768 -> 512 -> 256 ->
    128 -> 64, i.e. the ViT widths of levels 4 .. 1; only the last (level-1)
    output enters the network (Eq. 3). As in the official code there is no
    nonlinearity between the convolutions; the CTBN that follows has one.

    Shapes: ``[B, L, text_dim] -> [B, L, widths[-1]]``.
    """

    def __init__(self, text_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        dims = [text_dim, *widths]
        self.convs = nn.Sequential(
            *(
                nn.Conv1d(d_in, d_out, kernel_size=3, padding=1)
                for d_in, d_out in itertools.pairwise(dims)
            )
        )

    def forward(self, text: Tensor) -> Tensor:
        return self.convs(text.transpose(1, 2)).transpose(1, 2)


class LViT(nn.Module):
    """LViT segmentation network (LViT paper §3.1; sizes T/S/M/L of Table 3).

    Args:
        in_channels: image channels ``C``.
        num_classes: output channels ``K`` (logits; 1 for binary segmentation).
        base_width: width ``b`` of the first CNN level; levels use
            ``(b, 2b, 4b, 8b)`` channels and the ViT level ``i`` the same width.
        img_size: ``int`` or ``(H, W)`` the position embeddings and the text
            CTBN are built for; both sides divisible by 16. Other sizes divisible
            by 16 are accepted at run time (see *Input size* below).
        text_dim: dimension ``D`` of the word embeddings (768 for BERT-base).
        text_len: number of words ``L`` per text (the text CTBN has ``L`` input
            channels, so ``L`` is fixed at construction).
        use_text: ``False`` builds LViT-TW: no text modules are built at all and
            ``text`` is ignored.
        depth: Transformer blocks per ViT module (T=1, S=4, M=6, L=12).
        num_heads: attention heads (must divide ``b``).
        mlp_ratio: hidden width of the Transformer MLP relative to its input.
        dropout: dropout of the patch embeddings, attention and MLPs.

    Forward:
        ``images [B, C, H, W]`` (float, in [0, 1]) and ``text [B, L, D]`` ->
        logits ``[B, K, H, W]``.

    Architecture (base 64, 224x224): CNN encoder ``x1..x5`` (64@224, 128@112,
    256@56, 512@28, 512@14); ViT level ``i = 1..4`` embeds ``x_i`` with patch
    ``16 / 2**(i-1)`` into the common 14x14 grid. Down path:
    ``y_1 = ViT(PE(x_1) + CTBN(text))`` (Eq. 3), ``y_i = [y_{i-1}, CTBN(ViT(PE(x_i)))]``
    (Eq. 7, concatenated as in the official code, see :class:`~medtextseg.nets.vit.DownViT`).
    Up path: ``u_4 = ViT(y_4)``, ``u_i = ViT(y_i) + CTBN(u_{i+1})``. Each ``u_i`` is
    reconstructed to a feature map and added to ``x_i``; the decoder then runs
    PLAM on every skip, concatenates and convolves (nearest x2 upsampling);
    ``plam_gate=False`` gives PLAM Eq. 8's bare product instead of a sigmoid gate
    (:class:`PLAM`; ``network.options={plam_gate: false}`` in a config).

    Input size: the token grid is ``(H/16, W/16)`` at every level. If it differs
    from the grid of ``img_size``, the position embeddings and the ``N`` text
    tokens produced by the text CTBN (which maps ``L`` words to the ``N`` tokens
    of the build grid) are bilinearly resampled on their 2-D grid to the new
    one, so a network trained at one size still runs at another.

    Size: with base 64, 224x224, ``text_dim=768``, ``text_len=10`` LViT-T has
    29.9M parameters (29.7M without position embeddings, the paper's Table 1
    figure), LViT-TW 28.2M (28.0M), and costs 52.7 GFLOPs per image (paper:
    54.1, which convolves the CNN-ViT interaction at full resolution; see
    :mod:`medtextseg.nets.profile`).

    Example:
        >>> import torch
        >>> from medtextseg.nets import LViT
        >>> net = LViT(base_width=16, img_size=64, text_dim=32, text_len=5).eval()
        >>> logits = net(torch.rand(2, 3, 64, 64), torch.randn(2, 5, 32))
        >>> tuple(logits.shape)
        (2, 1, 64, 64)
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        base_width: int = 64,
        img_size: int | tuple[int, int] = 224,
        text_dim: int = 768,
        text_len: int = 10,
        use_text: bool = True,
        depth: int = 1,
        num_heads: int = NUM_HEADS,
        mlp_ratio: float = MLP_RATIO,
        dropout: float = DROPOUT,
        plam_gate: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("text_dim", text_dim),
            ("text_len", text_len),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if base_width % num_heads:
            raise ValueError(
                f"base_width ({base_width}) must be divisible by num_heads ({num_heads})"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.img_size = check_image_size(img_size)
        self.grid_size = (self.img_size[0] // TOTAL_STRIDE, self.img_size[1] // TOTAL_STRIDE)
        self.text_dim = text_dim
        self.text_len = text_len
        self.use_text = bool(use_text)
        self.depth = depth

        self.encoder = CNNEncoder(in_channels, base_width)
        widths = self.encoder.channels[:NUM_LEVELS]
        vit = {"num_heads": num_heads, "mlp_ratio": mlp_ratio, "dropout": dropout}
        self.down_vits = nn.ModuleList(
            DownViT(
                c, patch_size_for_level(i + 1), self.grid_size, depth, fuse_previous=i > 0, **vit
            )
            for i, c in enumerate(widths)
        )
        self.up_vits = nn.ModuleList(
            UpViT(c, depth, fuse_lower=i < NUM_LEVELS - 1, **vit) for i, c in enumerate(widths)
        )
        self.reconstructs = nn.ModuleList(
            Reconstruct(c, patch_size_for_level(i + 1)) for i, c in enumerate(widths)
        )
        self.decoder = CNNDecoder(base_width, num_classes, upsample="nearest",
                                  skip_attention=functools.partial(PLAM, gate=bool(plam_gate)))
        if self.use_text:
            num_tokens = self.grid_size[0] * self.grid_size[1]
            self.text_encoder = TextConvPath(text_dim, widths[::-1])
            self.text_ctbn = CTBN(text_len, num_tokens)

    def _check_inputs(self, images: Tensor, text: Tensor | None) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape [B, {self.in_channels}, H, W], got {list(images.shape)}"
            )
        check_image_size(tuple(images.shape[-2:]), what="image size")
        if not self.use_text:
            return
        expected = [images.shape[0], self.text_len, self.text_dim]
        if text is None:
            raise ValueError(
                f"this LViT was built with use_text=True and needs text embeddings of shape "
                f"[B, L, D] = {expected}; pass text=..., or build it with use_text=False (LViT-TW)"
            )
        if list(text.shape) != expected:
            raise ValueError(
                f"expected text of shape [B, L, D] = {expected} (text_len={self.text_len}, "
                f"text_dim={self.text_dim}), got {list(text.shape)}"
            )

    def text_tokens(self, text: Tensor, grid: tuple[int, int]) -> Tensor:
        """Text ``[B, L, D]`` -> level-1 tokens ``[B, h*w, b]`` for the token grid ``grid`` (Eq. 3)."""
        tokens = self.text_ctbn(self.text_encoder(text))
        return resize_tokens(tokens, self.grid_size, grid)

    def forward(self, images: Tensor, text: Tensor | None = None, domain: Tensor | None = None) -> Tensor:
        """``images [B, C, H, W]``, ``text [B, L, D]`` -> logits ``[B, K, H, W]``; ``domain``
        (the modality of composite data) is ignored: LViT has no indicator."""
        self._check_inputs(images, text)
        features = self.encoder(inference_layout(images))
        grid = (images.shape[-2] // TOTAL_STRIDE, images.shape[-1] // TOTAL_STRIDE)
        extra = self.text_tokens(text, grid) if self.use_text else None

        down: list[Tensor] = []
        previous = None
        for level, vit in enumerate(self.down_vits):
            previous = vit(features[level], previous, extra if level == 0 else None)
            down.append(previous)

        lower = None
        for level in range(NUM_LEVELS - 1, -1, -1):
            lower = self.up_vits[level](down[level], lower)
            # CNN-ViT interaction: ViT features join the CNN skip as a residual (§3.1).
            features[level] = features[level] + self.reconstructs[level](lower, grid)
        # Internal layout only: logits come back in the standard contiguous layout.
        return self.decoder(features).contiguous()


#: Transformer blocks per ViT module of the LViT sizes (paper §4.4, Table 3).
LVIT_DEPTHS: dict[str, int] = {"lvit-t": 1, "lvit-s": 4, "lvit-m": 6, "lvit-l": 12}


def _build(name: str, **options) -> LViT:
    return LViT(depth=LVIT_DEPTHS[name], **without(options, DOMAIN_OPTIONS))


register_network("lvit", tuple(LVIT_DEPTHS), ("num_heads", "mlp_ratio", "dropout", "plam_gate"), _build)
