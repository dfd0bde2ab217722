"""Convolutional building blocks shared by the U-Net and LViT's CNN branch.

LViT's U-shaped CNN branch (LViT paper, §3.1, Eq. 1-2) *is* a U-Net: a stem,
four down blocks (MaxPool + Conv-BN-ReLU x2) and four up blocks (x2 upsample,
concatenate the skip, Conv-BN-ReLU x2). Both networks build it from
:class:`CNNEncoder` and :class:`CNNDecoder` so the two cannot drift apart; LViT
only adds the ViT branch on the skips and a pixel-level attention (PLAM) in
front of every skip concatenation.

Geometry is derived from one number, :data:`NUM_LEVELS`: the encoder halves the
resolution ``NUM_LEVELS`` times, so inputs must be divisible by
:data:`TOTAL_STRIDE` (= 2 ** NUM_LEVELS = 16), and the bottleneck grid
``(H / 16, W / 16)`` is also the token grid of every ViT level in LViT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "NUM_LEVELS",
    "TOTAL_STRIDE",
    "CNNDecoder",
    "CNNEncoder",
    "ConvBNReLU",
    "ConvStack",
    "DownBlock",
    "UpBlock",
    "check_image_size",
    "encoder_channels",
    "inference_layout",
]

#: Number of down-sampling stages of the U (LViT and U-Net both use 4).
NUM_LEVELS = 4
#: Total down-sampling factor of the encoder; image sides must be divisible by it.
TOTAL_STRIDE = 2**NUM_LEVELS

Upsample = Literal["nearest", "transpose"]


def encoder_channels(base_width: int) -> tuple[int, ...]:
    """Channel widths of the encoder outputs ``x1 .. x5`` for a base width ``b``.

    ``(b, 2b, 4b, 8b, 8b)``: the last stage keeps ``8b`` like the original
    U-Net-with-bilinear-decoder recipe that LViT/UCTransNet follow, so the
    bottleneck can be concatenated with the level-4 skip (``8b + 8b``).
    """
    if base_width < 1:
        raise ValueError(f"base_width must be a positive integer, got {base_width}")
    widths = [base_width * 2**i for i in range(NUM_LEVELS)]
    return tuple(widths + [widths[-1]])


def check_image_size(
    size: int | tuple[int, int] | list[int], what: str = "img_size"
) -> tuple[int, int]:
    """Normalise ``size`` to ``(H, W)`` and check both sides are multiples of 16."""
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"{what} must be an int or (H, W), got {size!r}")
    if any(s <= 0 or s % TOTAL_STRIDE for s in hw):
        raise ValueError(
            f"{what} must be positive and divisible by {TOTAL_STRIDE} "
            f"(the network halves the resolution {NUM_LEVELS} times), got {hw[0]}x{hw[1]}"
        )
    return hw  # type: ignore[return-value]


def inference_layout(images: Tensor) -> Tensor:
    """Return ``images`` channels_last when running on CPU without autograd, else unchanged.

    Every layer propagates the memory layout of its input, so this picks the
    layout of the whole forward pass. On CPU, oneDNN's channels_last forward
    convolutions are the fastest (LViT-T inference ~25% faster than NCHW on a
    2-core AVX2 machine). With autograd on, the caller's layout is kept, because
    oneDNN's channels_last *weight-gradient* kernels are several times slower
    than the NCHW ones on AVX2; pass channels_last inputs to train in it anyway.
    """
    if images.device.type == "cpu" and not torch.is_grad_enabled():
        return images.contiguous(memory_format=torch.channels_last)
    return images


class ConvBNReLU(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU, the unit CNN module of LViT (Eq. 1).

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H, W]`` ("same" padding).
    The convolution has no bias because the BatchNorm right after it has one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ConvStack(nn.Sequential):
    """``num_convs`` x :class:`ConvBNReLU`; the first maps ``in -> out``, the rest ``out -> out``."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2) -> None:
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        super().__init__(
            *(
                ConvBNReLU(in_channels if i == 0 else out_channels, out_channels)
                for i in range(num_convs)
            )
        )


class DownBlock(nn.Sequential):
    """MaxPool(2) then :class:`ConvStack` (LViT Eq. 2 / DownCNN).

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H/2, W/2]``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2) -> None:
        super().__init__(nn.MaxPool2d(2), ConvStack(in_channels, out_channels, num_convs))


class UpBlock(nn.Module):
    """x2 upsample, concatenate ``[skip, up]``, then :class:`ConvStack` (UpCNN).

    Args:
        in_channels: channels of the lower-resolution input ``x`` ``[B, in, h, w]``.
        skip_channels: channels of the skip ``[B, skip, 2h, 2w]``.
        out_channels: output channels ``[B, out, 2h, 2w]``.
        num_convs: convolutions after the concatenation.
        upsample: ``"nearest"`` (LViT's CNN branch, parameter-free) or
            ``"transpose"`` (2x2 stride-2 transposed conv ``in -> in``, the U-Net
            baseline of LViT's Table 1, whose 14.8M parameters include these).
        skip_attention: optional module applied to the skip before the
            concatenation (LViT's PLAM, Eq. 8); ``None`` is a plain U-Net skip.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        num_convs: int = 2,
        upsample: Upsample = "nearest",
        skip_attention: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        elif upsample == "nearest":
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
        else:
            raise ValueError(f"upsample must be 'nearest' or 'transpose', got {upsample!r}")
        self.skip_attention = skip_attention
        self.convs = ConvStack(in_channels + skip_channels, out_channels, num_convs)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``x [B, in, h, w]``, ``skip [B, skip, 2h, 2w]`` -> ``[B, out, 2h, 2w]``."""
        if self.skip_attention is not None:
            skip = self.skip_attention(skip)
        return self.convs(torch.cat([skip, self.up(x)], dim=1))


class CNNEncoder(nn.Module):
    """Stem (one 3x3 Conv-BN-ReLU) + :data:`NUM_LEVELS` :class:`DownBlock`.

    Shapes: ``[B, in_channels, H, W]`` -> list of ``NUM_LEVELS + 1`` features
    ``x_i [B, channels[i], H / 2**i, W / 2**i]`` for ``i = 0 .. NUM_LEVELS``
    with ``channels = encoder_channels(base_width)``.
    """

    def __init__(self, in_channels: int = 3, base_width: int = 64, num_convs: int = 2) -> None:
        super().__init__()
        self.channels = encoder_channels(base_width)
        self.stem = ConvBNReLU(in_channels, self.channels[0])
        self.downs = nn.ModuleList(
            DownBlock(c_in, c_out, num_convs)
            for c_in, c_out in zip(self.channels[:-1], self.channels[1:])
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        features = [self.stem(images)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features


class CNNDecoder(nn.Module):
    """:data:`NUM_LEVELS` :class:`UpBlock` + 1x1 head, the mirror of :class:`CNNEncoder`.

    Level ``i`` (4 -> 1) concatenates skip ``x_i`` (``c_i`` channels) with the
    upsampled lower output and maps to ``c_{i-1}`` (``c_1`` for level 1), e.g.
    for base 64: (512+512)->256, (256+256)->128, (128+128)->64, (64+64)->64.

    Args:
        base_width: base width ``b`` of the matching encoder.
        num_classes: output channels ``K`` of the 1x1 head.
        upsample: see :class:`UpBlock`.
        skip_attention: optional factory ``channels -> nn.Module`` building one
            attention module per skip (LViT's PLAM); ``None`` for a plain U-Net.

    Shapes: encoder features ``[x1, ..., x5]`` -> logits ``[B, K, H, W]``.
    """

    def __init__(
        self,
        base_width: int = 64,
        num_classes: int = 1,
        num_convs: int = 2,
        upsample: Upsample = "nearest",
        skip_attention: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        ch = encoder_channels(base_width)
        ups = []
        below = ch[NUM_LEVELS]
        # Built from the deepest level up; stored shallow-first so ups[i] pairs with skip x_{i+1}.
        for level in range(NUM_LEVELS, 0, -1):
            skip = ch[level - 1]
            out = ch[max(level - 2, 0)]
            attention = skip_attention(skip) if skip_attention is not None else None
            ups.append(UpBlock(below, skip, out, num_convs, upsample, attention))
            below = out
        self.ups = nn.ModuleList(reversed(ups))
        self.head = nn.Conv2d(ch[0], num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for level in range(NUM_LEVELS - 1, -1, -1):
            x = self.ups[level](x, features[level])
        return self.head(x)
