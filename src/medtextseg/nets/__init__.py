"""Segmentation networks: plain ``nn.Module`` s mapping tensors to logits.

Every network follows one contract::

    logits = net(images, text)   # images [B, C, H, W] in [0, 1], H and W divisible by 16
                                 # (32 for the ConvNeXt-based TextMoE networks)
                                 # text [B, L, D] word embeddings, or None for image-only nets
                                 # logits [B, K, H, W]

Networks that use the modality also take ``domain=`` (a LongTensor ``[B]`` of
domain indices; TextMoE's gates read it as a one-hot indicator).

A network file registers its names and options at its end
(:func:`medtextseg.nets.registry.register_network`); build them by name with
:func:`build_network`::

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

from medtextseg.nets.lvit import LVIT_DEPTHS, PLAM, LViT
from medtextseg.nets.registry import COMMON_OPTIONS, family_of, network_names, normalise
from medtextseg.nets.resunet import ResUNet
from medtextseg.nets.textmoe import TEXTMOE_DECODERS, TextMoENet
from medtextseg.nets.unet import UNet
from medtextseg.registry import import_submodules

# Each network file registers its family at its end (medtextseg.nets.registry); the rest
# of the package too, so a new network is one file, listed nowhere else (the imports above
# are the public names).
import_submodules(__name__, __path__)

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

#: Names accepted by :func:`build_network` (every registered family's).
NETWORK_NAMES: tuple[str, ...] = network_names()


def check_network_options(name: str, options: Any) -> None:
    """Check a config's ``network.options`` for network ``name`` before anything is built:
    a mapping of the family's own options (its :func:`~medtextseg.nets.registry.register_network`
    call); the common options come from their config fields (``data.img_size``,
    ``network.base_width``, ...).

    Raises:
        ValueError: not a mapping, an unknown network, a common option, or an option the
            network does not take.
    """
    if not isinstance(options, dict):
        # ValueError, not TypeError: check_config's refusals are all ValueErrors.
        raise ValueError(  # noqa: TRY004
            f"network.options must be a mapping (e.g. {{drop_path: 0.1}}), got {options!r}")
    spec = family_of(name)
    common = sorted(set(options) & set(COMMON_OPTIONS))
    if common:
        raise ValueError(f"network.options: {', '.join(common)} come(s) from the config (data.img_size, "
                         "data.in_channels, data.num_classes, data.domains, network.base_width, network.use_text, "
                         "text.max_len); set those instead")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"network.options: unknown option(s) {', '.join(unknown)} for network {normalise(name)!r}; "
                         f"it takes {', '.join(spec.options)}")


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
            accept the text options so configs can switch networks freely, checks
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
    spec = family_of(name)
    valid = COMMON_OPTIONS + spec.options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for network {normalise(name)!r}; valid options: {', '.join(valid)}"
        )
    return spec.build(normalise(name), **options)
