"""Model size and cost: parameter counts and GFLOPs in the papers' convention.

**FLOPs convention.** The papers' "Flops (G)" column is what
``torch.utils.flop_counter.FlopCounterMode`` counts - two FLOPs per
multiply-accumulate (MAC) of convolutions and linear layers - so
:func:`count_gflops` returns its total / 1e9 unchanged (:func:`count_gmacs` is
half of it, what thop/ptflops-style tools print). The check: LViT in the form the
paper measured (CNN-ViT interaction convolving *after* upsampling, attention
matmuls not counted) gives 53.9 / 53.9 / 63.7 / 70.3 / 89.9 G for
LViT-T / TW / SW / MW / LW, against the paper's 54.1 / 54.0 / 63.8 / 70.4 / 90.1 G
(Tables 1 and 3). Our LViT-T counts 52.7 G: it convolves the interaction on the
token grid (-1.6 G, same outputs, see :class:`medtextseg.nets.vit.Reconstruct`)
and counts attention (+0.3 G). The paper's U-Net (14.8M parameters, 50.3 G) is not
reproduced by our 14.8M U-Net, which counts 45.3 G.

What is counted: convolutions (incl. transposed and 1-D), linear layers /
matmuls and attention (``F.scaled_dot_product_attention``; its CPU kernel is
missing from FlopCounterMode's table in torch 2.13 and is added here).
What is not: normalisation, activations, pooling, upsampling, element-wise adds
and softmax - memory-bound ops worth < 1% of LViT's count (the paper's figures
are matched to 0.3% without them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["DEFAULT_IMG_SIZE", "count_flops", "count_gflops", "count_gmacs", "count_parameters"]

#: The papers' input resolution, used when neither the caller nor the model says otherwise.
DEFAULT_IMG_SIZE = (224, 224)
#: Fallback text shape (the official LViT code's 10 BERT-base words) for text models
#: that do not expose ``text_len`` / ``text_dim`` attributes.
DEFAULT_TEXT_LEN, DEFAULT_TEXT_DIM = 10, 768


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable and frozen, position embeddings included).

    Buffers (BatchNorm running statistics) are not parameters and are not
    counted, as in the papers' tables.
    """
    return sum(p.numel() for p in model.parameters())


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    return mapping


def _example_inputs(model, img_size, in_channels, text_len, text_dim, batch_size):
    param = next(model.parameters())
    size = tuple(img_size) if not isinstance(img_size, int) else (img_size, img_size)
    images = torch.rand(batch_size, in_channels, *size, device=param.device, dtype=param.dtype)
    if not getattr(model, "use_text", False):
        return (images,)
    text = torch.randn(batch_size, text_len, text_dim, device=param.device, dtype=param.dtype)
    return (images, text)


def count_flops(
    model: nn.Module,
    img_size: int | Sequence[int] | None = None,
    in_channels: int | None = None,
    text_len: int | None = None,
    text_dim: int | None = None,
    batch_size: int = 1,
) -> int:
    """FLOPs (2 per MAC) of one forward pass in eval mode, from ``FlopCounterMode``.

    Unset arguments are read from the model (``img_size``, ``in_channels``,
    ``text_len``, ``text_dim`` attributes), else :data:`DEFAULT_IMG_SIZE`, 3,
    :data:`DEFAULT_TEXT_LEN` and :data:`DEFAULT_TEXT_DIM`. Text is passed only to models whose ``use_text`` is true.
    The model's train/eval mode is restored afterwards.
    """
    img_size = img_size or getattr(model, "img_size", None) or DEFAULT_IMG_SIZE
    in_channels = in_channels or getattr(model, "in_channels", None) or 3
    text_len = text_len or getattr(model, "text_len", None) or DEFAULT_TEXT_LEN
    text_dim = text_dim or getattr(model, "text_dim", None) or DEFAULT_TEXT_DIM
    inputs = _example_inputs(model, img_size, in_channels, text_len, text_dim, batch_size)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_gflops(
    model: nn.Module,
    img_size: int | Sequence[int] | None = DEFAULT_IMG_SIZE,
    in_channels: int | None = None,
    text_len: int | None = None,
    text_dim: int | None = None,
) -> float:
    """GFLOPs of one forward pass for a batch of 1, in the papers' convention.

    The papers' "Flops (G)" are 2 x MACs / 1e9 (see the module docstring), which
    is what ``FlopCounterMode`` counts, so this is its total / 1e9 (LViT-T at
    224x224: 52.7 G; paper 54.1 G, see the module docstring for the 1.4 G).
    Use :func:`count_gmacs` for MACs.
    """
    return count_flops(model, img_size, in_channels, text_len, text_dim) / 1e9


def count_gmacs(
    model: nn.Module,
    img_size: int | Sequence[int] | None = DEFAULT_IMG_SIZE,
    in_channels: int | None = None,
    text_len: int | None = None,
    text_dim: int | None = None,
) -> float:
    """Multiply-accumulates / 1e9 of one forward pass for a batch of 1 (= GFLOPs / 2)."""
    return count_gflops(model, img_size, in_channels, text_len, text_dim) / 2
