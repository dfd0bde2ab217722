"""Segmentation networks: plain ``nn.Module`` s mapping tensors to logits.

Every network follows one contract::

    logits = net(images, text)   # images [B, C, H, W] in [0, 1], H and W divisible by 16
                                 # (32 for the ConvNeXt-based TextMoE networks)
                                 # text [B, L, D] word embeddings, or None for image-only nets
                                 # logits [B, K, H, W]

Networks that use the modality also take ``domain=`` (a LongTensor ``[B]`` of
domain indices; TextMoE's gates read it as a one-hot indicator).

Build them by name with :func:`build_network`::

    >>> from medtextseg.nets import build_network
    >>> net = build_network("lvit-t", in_channels=3, num_classes=1, text_dim=768, text_len=10)

CPU performance notes (2-core AVX2 machine, measured with ``benchmarks/throughput.py``):

- without autograd (``torch.no_grad`` / ``inference_mode``) the networks run their
  CPU forward pass channels_last internally, ~25% faster than NCHW; logits are
  returned contiguous (see :func:`medtextseg.nets.blocks.inference_layout`);
- training is fastest in the default (NCHW) layout: oneDNN's channels_last
  weight-gradient kernels are several times slower on AVX2 (LViT-T trains ~30%
  slower channels_last);
- glibc unmaps large freed activations after every step and the next step pays
  the page faults again (10-15% of a 2-core LViT-T training step is kernel time;
  one quiet run went from 0.48 to 0.62 img/s without it);
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776`` in the environment
  of the training process avoids it (``benchmarks/throughput.py --malloc-tuning``);
- on a machine shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: with the
  default spinning barriers a 2-thread step can take several times longer when
  another process holds a core.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medtextseg.nets.blocks import check_image_size
from medtextseg.nets.lvit import PLAM, LViT
from medtextseg.nets.resunet import ResUNet
from medtextseg.nets.textmoe import TextMoENet, check_textmoe_size, convnext_widths
from medtextseg.nets.unet import UNet

__all__ = [
    "LVIT_DEPTHS",
    "NETWORK_NAMES",
    "PLAM",
    "TEXTMOE_DECODERS",
    "LViT",
    "ResUNet",
    "TextMoENet",
    "UNet",
    "build_network",
    "check_network_options",
]

#: Transformer blocks per ViT module of the LViT sizes (paper §4.4, Table 3).
LVIT_DEPTHS: dict[str, int] = {"lvit-t": 1, "lvit-s": 4, "lvit-m": 6, "lvit-l": 12}

#: TextMoE networks (ConvNeXt encoder) and their decoders: TMoE (paper §2.2) and
#: the Plain-MoE of the paper's Table 2 ablation.
TEXTMOE_DECODERS: dict[str, str] = {"textmoe": "tmoe", "textmoe-plain": "plain"}

#: Names accepted by :func:`build_network`.
NETWORK_NAMES: tuple[str, ...] = ("unet", "resunet", *LVIT_DEPTHS, *TEXTMOE_DECODERS)

_COMMON_OPTIONS = (
    "in_channels",
    "num_classes",
    "base_width",
    "img_size",
    "text_dim",
    "text_len",
    "use_text",
    "num_domains",
)
_TEXT_OPTIONS = ("img_size", "text_dim", "text_len", "use_text")
# Only the TextMoE gates read the modality; the other families accept and ignore it.
_DOMAIN_OPTIONS = ("num_domains",)
_EXTRA_OPTIONS = {
    "unet": ("upsample", "num_convs"),
    "resunet": ("levels", "num_res_units", "groups", "dropout"),
    "lvit": ("num_heads", "mlp_ratio", "dropout"),
    "textmoe": ("depths", "encoder", "indicator", "drop_path"),
}


def check_network_options(name: str, options: Any) -> None:
    """Check a config's ``network.options`` for network ``name`` before anything is built:
    a mapping of the family's own options (:data:`_EXTRA_OPTIONS`); the common options
    come from their config fields (``data.img_size``, ``network.base_width``, ...).

    Raises:
        ValueError: not a mapping, a common option, or an option the network does not take.
    """
    if not isinstance(options, dict):
        # ValueError, not TypeError: check_config's refusals are all ValueErrors.
        raise ValueError(  # noqa: TRY004
            f"network.options must be a mapping (e.g. {{drop_path: 0.1}}), got {options!r}")
    key = str(name).strip().lower().replace("_", "-")
    if key not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(NETWORK_NAMES)}")
    common = sorted(set(options) & set(_COMMON_OPTIONS))
    if common:
        raise ValueError(f"network.options: {', '.join(common)} come(s) from the config (data.img_size, "
                         "data.in_channels, data.num_classes, data.domains, network.base_width, network.use_text, "
                         "text.max_len); set those instead")
    extra = _EXTRA_OPTIONS[_family(key)]
    unknown = sorted(set(options) - set(extra))
    if unknown:
        raise ValueError(f"network.options: unknown option(s) {', '.join(unknown)} for network {key!r}; "
                         f"it takes {', '.join(extra)}")


def _family(key: str) -> str:
    return key if key in ("unet", "resunet") else "textmoe" if key in TEXTMOE_DECODERS else "lvit"


def build_network(name: str, **options: Any) -> nn.Module:
    """Build a segmentation network by name.

    Args:
        name: one of :data:`NETWORK_NAMES` (case-insensitive, ``_`` == ``-``):
            ``unet``, ``resunet``, ``lvit-t``, ``lvit-s``, ``lvit-m``, ``lvit-l`` (LViT with
            1/4/6/12 Transformer blocks per ViT module), ``textmoe`` (ConvNeXt +
            TMoE decoder) and ``textmoe-plain`` (ConvNeXt + Plain-MoE decoder).
        **options: keyword options, all optional:
            ``in_channels=3``, ``num_classes=1``, ``base_width=64``,
            ``img_size=224`` (int or (H, W), divisible by 16), ``text_dim=768``,
            ``text_len=10``, ``use_text=True`` (``False``: LViT-TW, no text
            modules), ``num_domains=1`` (length of the modality indicator; only the
            TextMoE networks use it, the others ignore it). LViT also takes ``num_heads``, ``mlp_ratio``, ``dropout``;
            U-Net takes ``upsample`` and ``num_convs``; ``resunet`` (MONAI's residual
            U-Net with group norm, PromptSSL's network,
            :class:`~medtextseg.nets.resunet.ResUNet`) takes ``levels``,
            ``num_res_units``, ``groups`` and ``dropout``. The U-Nets are image-only: they
            accepts the text options so configs can switch networks freely, checks
            ``img_size`` and otherwise ignores them. The TextMoE networks
            (:class:`~medtextseg.nets.textmoe.TextMoENet`) map ``base_width=b`` to
            the ConvNeXt stage widths ``(b, 2b, 4b, 8b)`` (96: ConvNeXt-Tiny's
            96/192/384/768; unset: ConvNeXt-Tiny's, or a checkpoint's), need
            ``img_size`` divisible by 32 and take
            ``depths=(3, 3, 9, 3)``, ``encoder=None`` (random init) or
            ``"hf:<dir>"`` (local ConvNeXt weights), ``indicator`` and ``drop_path``.

    Returns:
        The network (an ``nn.Module`` whose ``forward(images, text=None, domain=None)``
        returns logits ``[B, K, H, W]``).

    Raises:
        ValueError: unknown name or option, or an invalid value.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(NETWORK_NAMES)}")
    family = _family(key)
    valid = _COMMON_OPTIONS + _EXTRA_OPTIONS[family]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for network {key!r}; valid options: {', '.join(valid)}"
        )
    if family in ("unet", "resunet"):
        if family == "unet" and "img_size" in options:
            check_image_size(options["img_size"])
        image_options = {k: v for k, v in options.items() if k not in _TEXT_OPTIONS + _DOMAIN_OPTIONS}
        return (UNet if family == "unet" else ResUNet)(**image_options)
    if family == "textmoe":
        options = dict(options)
        base_width = options.pop("base_width", None)
        if base_width is not None:
            options["widths"] = convnext_widths(base_width)
        if "img_size" in options:
            check_textmoe_size(options["img_size"])
        return TextMoENet(decoder=TEXTMOE_DECODERS[key], **options)
    return LViT(depth=LVIT_DEPTHS[key], **{k: v for k, v in options.items() if k not in _DOMAIN_OPTIONS})
