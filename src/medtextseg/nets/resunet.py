"""2D residual U-Net with group norm: PromptSSL's teacher-student network (its §Implementation:
"2D ResUNet", 32 base feature maps, group norm with 8 groups), built from MONAI."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet as MonaiUNet
from torch import Tensor, nn

from medtextseg.nets.registry import DOMAIN_OPTIONS, TEXT_OPTIONS, register_network, without

__all__ = ["ResUNet"]


class ResUNet(nn.Module):
    """MONAI's residual ``UNet`` (``num_res_units`` residual units per level) ending at
    ``base_width`` channels, then a 1x1 head to the K classes.

    Why the head: MONAI normalises the *output* of its last up layer, so ending the
    UNet at K channels needs K divisible by the group count (20 classes with 8 groups
    fails); ending at ``base_width`` and projecting is the usual residual U-Net head.

    Args:
        in_channels: image channels ``C``.
        num_classes: output channels ``K`` (logits; 1 for binary).
        base_width: channels of the first level; the levels use ``b·2^i`` for
            ``i < levels`` (32 -> 32, 64, 128, 256, 512 with 5 levels).
        levels: resolution levels (``levels - 1`` stride-2 down-samplings), so H and W
            must be divisible by ``2^(levels - 1)``.
        num_res_units: residual units per level (MONAI's ``num_res_units``).
        groups: group-norm groups (8 in PromptSSL); ``base_width`` must be divisible by it.
        dropout: dropout of MONAI's units.

    Forward:
        ``images [B, C, H, W]`` -> logits ``[B, K, H, W]``; ``text`` / ``domain`` are
        accepted for interface parity and ignored (image-only network).

    Example:
        >>> import torch
        >>> net = ResUNet(in_channels=1, num_classes=20, base_width=16).eval()
        >>> tuple(net(torch.rand(1, 1, 64, 32)).shape)
        (1, 20, 64, 32)
    """

    def __init__(self, *, in_channels: int = 3, num_classes: int = 1, base_width: int = 32, levels: int = 5,
                 num_res_units: int = 2, groups: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("levels", levels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        if base_width % groups:
            raise ValueError(f"base_width {base_width} must be divisible by the {groups} group-norm groups")
        channels: Sequence[int] = tuple(base_width * 2**i for i in range(levels))
        self.in_channels, self.num_classes, self.use_text = in_channels, num_classes, False
        self.divisor = 2 ** (levels - 1)
        self.body = MonaiUNet(spatial_dims=2, in_channels=in_channels, out_channels=base_width, channels=channels,
                              strides=(2,) * (levels - 1), num_res_units=num_res_units,
                              norm=("group", {"num_groups": groups}), dropout=dropout)
        self.head = nn.Conv2d(base_width, num_classes, kernel_size=1)

    def forward(self, images: Tensor, text: Tensor | None = None, domain: Tensor | None = None) -> Tensor:
        """``images [B, C, H, W]`` -> logits ``[B, K, H, W]``."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape [B, {self.in_channels}, H, W], got {list(images.shape)}")
        if images.shape[2] % self.divisor or images.shape[3] % self.divisor:
            raise ValueError(f"image size {tuple(images.shape[2:])} must be divisible by {self.divisor} "
                             f"(the residual U-Net's {self.divisor}x down-sampling); set data.img_size accordingly")
        return self.head(self.body(images))


def _build(name: str, **options) -> ResUNet:
    # Image-only: the text options are accepted so that configs can switch networks freely.
    return ResUNet(**without(options, TEXT_OPTIONS + DOMAIN_OPTIONS))


register_network("resunet", ("resunet",), ("levels", "num_res_units", "groups", "dropout"), _build)
