"""U-Net baseline (Ronneberger et al., 2015) as used in LViT's Table 1."""

from __future__ import annotations

from torch import Tensor, nn

from medtextseg.nets.blocks import (
    CNNDecoder,
    CNNEncoder,
    Upsample,
    check_image_size,
    inference_layout,
)
from medtextseg.nets.registry import DOMAIN_OPTIONS, TEXT_OPTIONS, register_network, without

__all__ = ["UNet"]


class UNet(nn.Module):
    """U-Net: LViT's CNN branch alone, with plain concatenation skips (no PLAM, no ViT).

    Args:
        in_channels: image channels ``C``.
        num_classes: output channels ``K`` (logits).
        base_width: width ``b`` of the first level; the encoder uses
            ``(b, 2b, 4b, 8b, 8b)`` channels, the decoder mirrors it.
        upsample: ``"transpose"`` (default) upsamples with a 2x2 stride-2
            transposed conv, as the U-Net baseline of LViT's Table 1 does: with
            base 64 that gives its 14.8M parameters (we count 45.3 GFLOPs at
            224x224 where the paper lists 50.3; its FLOP tool is not known).
            ``"nearest"`` is exactly LViT's CNN branch (13.4M parameters).
        num_convs: Conv-BN-ReLU layers per down/up block.

    Forward:
        ``images [B, C, H, W]`` (H, W divisible by 16) -> logits ``[B, K, H, W]``.
        ``text`` is accepted for interface parity with text-guided networks and
        ignored: this network is image-only.

    Example:
        >>> import torch
        >>> from medtextseg.nets import UNet
        >>> net = UNet(in_channels=3, num_classes=1, base_width=16).eval()
        >>> tuple(net(torch.rand(2, 3, 64, 64)).shape)
        (2, 1, 64, 64)
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        base_width: int = 64,
        upsample: Upsample = "transpose",
        num_convs: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.use_text = False
        self.encoder = CNNEncoder(in_channels, base_width, num_convs)
        self.decoder = CNNDecoder(base_width, num_classes, num_convs, upsample=upsample)

    def forward(self, images: Tensor, text: Tensor | None = None, domain: Tensor | None = None) -> Tensor:
        """``images [B, C, H, W]`` -> logits ``[B, K, H, W]``; ``text`` and ``domain`` are ignored."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape [B, {self.in_channels}, H, W], got {list(images.shape)}"
            )
        check_image_size(tuple(images.shape[-2:]), what="image size")
        # Internal layout only: logits come back in the standard contiguous layout.
        return self.decoder(self.encoder(inference_layout(images))).contiguous()


def _build(name: str, **options) -> UNet:
    if "img_size" in options:
        check_image_size(options["img_size"])
    return UNet(**without(options, TEXT_OPTIONS + DOMAIN_OPTIONS))


register_network("unet", ("unet",), ("upsample", "num_convs"), _build)
