"""TextMoE network: ConvNeXt encoder + text-assisted Mixture-of-Experts decoder.

TextMoE (Zeng et al.; ``papers/textmoe.txt``, §2.2) segments images of several
modalities (CT slices and chest X-rays) with one model: a universal vision
encoder (ConvNeXt-Tiny), a frozen text encoder whose token embeddings arrive as
``text [B, L, D]`` (built outside the network, see :mod:`medtextseg.text`) and a
TMoE decoder whose gates see a one-hot modality indicator.

Layout (paper widths, 224x224 input)::

    ConvNeXt-T stages   x1 96@56   x2 192@28   x3 384@14   x4 768@7
    up block 1          up(x4) ++ x3 -> TMoE 1152->384 -> TMoE 384->384   @14
    up block 2          up(.)  ++ x2 -> TMoE  576->192 -> TMoE 192->192   @28
    up block 3          up(.)  ++ x1 -> TMoE  288->96  -> TMoE  96->96    @56
    head                3x3 conv 96 -> 16K, pixel shuffle x4 -> logits K@224

Every convolution of the decoder is a :class:`TMoELayer` (six in all); the text
expert's output of one layer is the text input of the next, so the text
features are refined alongside the visual ones. ``decoder="plain"`` swaps every
layer for a :class:`PlainMoELayer`, the Plain-MoE row of the paper's Table 2.

Where the paper is vague, the choices made here (each documented at its class):

- visual expert = 3x3 Conv-BN-ReLU (Eq. 1), then its own multi-head
  cross-attention (Eq. 2; query = pre-normalised visual tokens, key = value =
  the text expert's tokens, 32-d heads) added back as a residual with a
  learnable scale initialised to :data:`ATTN_SCALE_INIT`;
- text expert = Linear(previous text width -> C) -> GELU -> LayerNorm;
- gate (Eq. 3) = softmax(Linear(GAP(layer input) ++ one-hot indicator)), one
  pair of weights per image (dense soft routing, no top-k);
- the two experts' convolutions run as one ``C_in -> 2C`` convolution (same
  function: BatchNorm and ReLU act per channel) so the CPU runs one kernel;
- x2 upsampling is bilinear; the head's x4 upsampling is learned (sub-pixel
  convolution) rather than a fixed interpolation of 1/4-resolution logits;
- the encoder's input is normalised with ImageNet statistics, which the local
  ConvNeXt checkpoints expect and which is harmless for random init;
- L_diff (Eq. 8) names ``feat^exp_v1``, ``feat^exp_v2``, the experts' outputs of
  Eq. 1 (before the text attention): ``aux["experts"]`` holds those, and
  ``aux["enhanced"]`` the Eq. 2 features for a method that prefers them; the
  norm of the dot product in Eq. 8 is taken literally (absolute cosine).

The two visual experts' outputs (Eq. 1) and the gate weights of every layer are
returned by ``forward(..., return_aux=True)`` for the differential loss
(:func:`expert_difference`, Eq. 8) and for benchmarks of the gates per domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtextseg.nets.blocks import ConvBNReLU
from medtextseg.nets.registry import register_network

__all__ = [
    "ATTN_SCALE_INIT",
    "ENCODER_STRIDE",
    "PAPER_DEPTHS",
    "PAPER_WIDTHS",
    "TEXTMOE_DECODERS",
    "ConvNeXtEncoder",
    "MoEDecoder",
    "PlainMoELayer",
    "TMoELayer",
    "TextMoENet",
    "TextToVisualAttention",
    "check_textmoe_size",
    "convnext_widths",
    "expert_difference",
]

#: ConvNeXt-Tiny stage widths (stages at 1/4, 1/8, 1/16, 1/32 of the input).
PAPER_WIDTHS: tuple[int, int, int, int] = (96, 192, 384, 768)
#: ConvNeXt-Tiny blocks per stage.
PAPER_DEPTHS: tuple[int, int, int, int] = (3, 3, 9, 3)
#: Total down-sampling of ConvNeXt (4x4 stem, then three 2x down-samplings);
#: image sides must be divisible by it.
ENCODER_STRIDE = 32
#: Initial value of the learnable residual scale of the text-to-visual
#: attention: the value the reference implementation starts from
#: (``notes/reference-implementations.md``). Non-zero, so the text shapes the
#: output - and its attention weights receive gradients - from the first step.
ATTN_SCALE_INIT = 1.42
#: Width of one attention head; layers narrower than this use a single head.
HEAD_DIM = 32
#: ImageNet statistics (the local ConvNeXt checkpoints were trained on them);
#: inputs with a channel count other than 3 use their channel means.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Decoder = Literal["tmoe", "plain"]


def convnext_widths(base_width: int) -> tuple[int, int, int, int]:
    """Stage widths ``(b, 2b, 4b, 8b)``; ``base_width=96`` gives ConvNeXt-Tiny's."""
    if int(base_width) < 1:
        raise ValueError(f"base_width must be a positive integer, got {base_width}")
    b = int(base_width)
    return (b, 2 * b, 4 * b, 8 * b)


def check_textmoe_size(
    size: int | Sequence[int], what: str = "img_size"
) -> tuple[int, int]:
    """Normalise ``size`` to ``(H, W)`` and check both sides are multiples of 32."""
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(f"{what} must be an int or (H, W), got {size!r}")
    if any(s <= 0 or s % ENCODER_STRIDE for s in hw):
        raise ValueError(
            f"{what} must be positive and divisible by {ENCODER_STRIDE} (ConvNeXt down-samples "
            f"by 4 and then halves three times), got {hw[0]}x{hw[1]}"
        )
    return hw  # type: ignore[return-value]


def expert_difference(e1: Tensor, e2: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-sample similarity of two visual experts' outputs, the summand of L_diff (Eq. 8).

    ``|<e1, e2>| / (||e1|| ||e2||)`` over each sample's *whole* flattened feature
    (channels and positions together), i.e. the absolute cosine similarity: the
    norm of the dot product in Eq. 8's numerator is its absolute value. It is 1
    for identical (or opposite) outputs and 0 for orthogonal ones; L_diff is its
    mean over the labeled and unlabeled images of a batch. Each norm is clamped
    to ``eps``, so an all-zero output gives 0 instead of NaN.

    Args:
        e1, e2: expert outputs of the same shape ``[B, ...]`` (e.g. ``[B, C, H, W]``).

    Returns:
        ``[B]`` values in ``[0, 1]``.
    """
    if e1.shape != e2.shape:
        raise ValueError(f"expert outputs differ in shape: {list(e1.shape)} vs {list(e2.shape)}")
    return F.cosine_similarity(e1.flatten(1), e2.flatten(1), dim=1, eps=eps).abs()


def _num_heads(channels: int, head_dim: int = HEAD_DIM) -> int:
    return channels // head_dim if channels >= head_dim and channels % head_dim == 0 else 1


class ConvNeXtEncoder(nn.Module):
    """ConvNeXt from ``transformers`` (random init, or local weights), returning its four stages.

    Args:
        in_channels: image channels ``C``.
        widths: stage widths; ``None`` = ConvNeXt-Tiny's (random init) or the
            checkpoint's. With a checkpoint, given widths must match it.
        depths: blocks per stage; ``None`` = ConvNeXt-Tiny's or the checkpoint's.
        checkpoint: a local folder written by ``save_pretrained`` (a ``ConvNextModel``
            or ``ConvNextForImageClassification``; loaded with
            ``local_files_only=True``), or ``None`` for random init. A 3-channel
            checkpoint accepts 1-channel images by repeating them to RGB.
        drop_path: stochastic depth rate of the last block (linear ramp, as in ConvNeXt).

    Only the stem and the stages are kept (the classification model's final
    LayerNorm would be a parameter without a gradient). The stages are run one
    by one rather than through ``output_hidden_states``: same tensors (tested),
    without the output-recording hooks.

    Shapes: ``[B, C, H, W]`` in [0, 1] -> ``[x1, x2, x3, x4]`` with
    ``x_i [B, widths[i], H / 2**(i+2), W / 2**(i+2)]``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        checkpoint: str | Path | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        from transformers import ConvNextConfig, ConvNextModel

        if checkpoint is None:
            widths = tuple(PAPER_WIDTHS if widths is None else widths)
            depths = tuple(PAPER_DEPTHS if depths is None else depths)
            if len(widths) != 4 or len(depths) != 4:
                raise ValueError(f"ConvNeXt needs 4 widths and 4 depths, got {widths}, {depths}")
            config = ConvNextConfig(
                num_channels=in_channels,
                hidden_sizes=list(widths),
                depths=list(depths),
                drop_path_rate=drop_path,
            )
            model = ConvNextModel(config)
        else:
            model = self._load(Path(checkpoint), in_channels, widths, depths, drop_path)
            config = model.config
        stem_channels = int(config.num_channels)
        self.repeat_input = stem_channels != in_channels  # only 1 -> 3 passes _load
        self.channels: tuple[int, ...] = tuple(int(w) for w in config.hidden_sizes)
        self.depths: tuple[int, ...] = tuple(int(d) for d in config.depths)
        self.embeddings = model.embeddings
        self.stages = model.encoder.stages
        mean = IMAGENET_MEAN if stem_channels == 3 else (sum(IMAGENET_MEAN) / 3,) * stem_channels
        std = IMAGENET_STD if stem_channels == 3 else (sum(IMAGENET_STD) / 3,) * stem_channels
        # Constants, not state: checkpoints of this network stay independent of them.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def _load(path: Path, in_channels, widths, depths, drop_path):
        from transformers import ConvNextConfig, ConvNextModel

        if not (path / "config.json").is_file():
            raise ValueError(
                f"ConvNeXt checkpoint {path} has no config.json; give a folder written by "
                "save_pretrained (e.g. a local copy of facebook/convnext-tiny-224)"
            )
        config = ConvNextConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "convnext":
            raise ValueError(f"{path} holds a {config.model_type!r} model, not a ConvNeXt")
        for what, given, found in (("widths", widths, config.hidden_sizes),
                                   ("depths", depths, config.depths)):
            if given is not None and tuple(given) != tuple(found):
                hint = f" (base_width={found[0]})" if what == "widths" else ""
                raise ValueError(
                    f"ConvNeXt checkpoint {path} has stage {what} {tuple(found)}, but {tuple(given)} "
                    f"were requested; build the network with the checkpoint's {what}{hint}"
                )
        if config.num_channels != in_channels and not (config.num_channels == 3 and in_channels == 1):
            raise ValueError(
                f"ConvNeXt checkpoint {path} takes {config.num_channels}-channel images, "
                f"the network {in_channels}-channel ones"
            )
        config.drop_path_rate = drop_path
        return ConvNextModel.from_pretrained(path, config=config, local_files_only=True)

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.repeat_input:
            images = images.expand(-1, 3, -1, -1)
        x = self.embeddings((images - self.mean) / self.std)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class TextToVisualAttention(nn.Module):
    """Attn^T2V of Eq. 2 with a residual: ``v + s * Attn(Q = v, K = V = t)``.

    Multi-head cross-attention: the visual tokens (the ``H*W`` positions of
    ``v``, LayerNorm-ed) query the text expert's tokens ``t``; ``s`` is a
    learnable scalar (init :data:`ATTN_SCALE_INIT`). Eq. 2 writes the bare
    attention; the residual keeps the expert's convolution output (Eq. 1) as the
    base that the text enhances, so Eq. 4 mixes text-*enhanced* visual features.

    Shapes: ``v [B, C, H, W]``, ``t [B, L, C]``, ``keep [B, L]`` bool (the real, not
    padding, tokens; None: all) -> ``[B, C, H, W]``. Padding tokens take no attention, as
    in standard cross-attention: the text expert maps every pad to the same non-zero token.
    """

    def __init__(self, channels: int, head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        self.num_heads = _num_heads(channels, head_dim)
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        self.scale = nn.Parameter(torch.tensor(ATTN_SCALE_INIT))

    def forward(self, v: Tensor, t: Tensor, keep: Tensor | None = None) -> Tensor:
        b, c, h, w = v.shape
        heads, length = self.num_heads, t.shape[1]
        tokens = v.flatten(2).transpose(1, 2)  # [B, HW, C]
        q = self.q(self.norm(tokens)).view(b, h * w, heads, c // heads).transpose(1, 2)
        k, val = self.kv(t).view(b, length, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]  # [B, 1, 1, L], True = attend
        out = F.scaled_dot_product_attention(q, k, val, attn_mask=mask)  # [B, heads, HW, C / heads]
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return v + self.scale * out.transpose(1, 2).reshape(b, c, h, w)


def _text_expert(in_dim: int, out_dim: int) -> nn.Sequential:
    """The text expert f(feat_t; theta_exp_t): Linear -> GELU -> LayerNorm, ``[B, L, in] -> [B, L, out]``."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.LayerNorm(out_dim))


class _MoELayerBase(nn.Module):
    """Shared parts: two visual experts' convolutions, the text expert, the indicator check."""

    def __init__(
        self, in_channels: int, out_channels: int, text_dim: int | None, num_domains: int,
        indicator: bool, num_gates: int = 2,
    ) -> None:
        super().__init__()
        self.num_gates = num_gates
        self.out_channels = out_channels
        self.num_domains = num_domains
        self.use_indicator = indicator
        # Eq. 1's two experts as one C_in -> 2C Conv-BN-ReLU: channels [0, C) are expert 1,
        # [C, 2C) expert 2. BN and ReLU act per channel, so this *is* two independent
        # experts, computed by one convolution kernel.
        self.experts = ConvBNReLU(in_channels, 2 * out_channels)
        self.text_expert = _text_expert(text_dim, out_channels) if text_dim else None
        gate_in = in_channels + (num_domains if indicator else 0)
        self.gate = nn.Linear(gate_in, self.num_gates)

    def gate_weights(self, x: Tensor, indicator: Tensor | None) -> Tensor:
        """Eq. 3: ``softmax(Linear(GAP(x) ++ indicator))``: ``x [B, C_in, H, W]`` -> ``[B, G]``."""
        pooled = x.mean(dim=(2, 3))
        if self.use_indicator:
            pooled = torch.cat([pooled, indicator.to(pooled.dtype)], dim=1)
        return self.gate(pooled).softmax(dim=1)


class TMoELayer(_MoELayerBase):
    """One TMoE layer (Eq. 1-4): two text-enhanced visual experts mixed by an indicator-aware gate.

    - Eq. 1: ``e_k = ConvBNReLU_k(x)`` (3x3), ``k = 1, 2``.
    - text expert: ``t' = LayerNorm(GELU(Linear(t)))``, returned for the next layer.
    - Eq. 2: ``e_k,t = e_k + s_k * Attn_k(e_k, t', t')`` (:class:`TextToVisualAttention`;
      each expert has its own attention, as it is part of the expert).
    - Eq. 3: ``(w_1, w_2) = softmax(Linear(GAP(x) ++ onehot(domain)))``.
    - Eq. 4: ``y = w_1 e_1,t + w_2 e_2,t``.

    With ``text_dim=None`` (a network built without text) there is no text
    expert and no attention: ``e_k,t = e_k``.

    Args:
        in_channels, out_channels: ``C_in``, ``C``.
        text_dim: width of the incoming text tokens (the text encoder's ``D`` for
            the first layer, the previous layer's ``C`` after it), or ``None``.
        num_domains: ``N``, length of the one-hot modality indicator.
        indicator: whether the gate reads the indicator (``False``: GAP only).

    Shapes: ``x [B, C_in, H, W]``, ``t [B, L, text_dim]``, ``indicator [B, N]`` ->
    ``(y [B, C, H, W], t' [B, L, C] | None, {"experts": (e_1, e_2), "enhanced":
    (e_1,t, e_2,t), "gates": [B, 2]})``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, text_dim: int | None, num_domains: int = 1,
        indicator: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, text_dim, num_domains, indicator)
        self.attention = (
            nn.ModuleList(TextToVisualAttention(out_channels) for _ in range(2))
            if text_dim else None
        )

    def forward(self, x: Tensor, text: Tensor | None, indicator: Tensor | None, keep: Tensor | None = None):
        e1, e2 = self.experts(x).chunk(2, dim=1)
        gates = self.gate_weights(x, indicator)
        if self.text_expert is not None:
            text = self.text_expert(text)
            enhanced = (self.attention[0](e1, text, keep), self.attention[1](e2, text, keep))
        else:
            enhanced = (e1, e2)
        w = gates[:, :, None, None, None]
        y = w[:, 0] * enhanced[0] + w[:, 1] * enhanced[1]
        return y, text, {"experts": (e1, e2), "enhanced": enhanced, "gates": gates}


class PlainMoELayer(_MoELayerBase):
    """Plain-MoE layer (Table 2, row 2): visual and text experts fused element-wise.

    The paper contrasts TMoE with "typical MoE models, which integrate both
    visual and textual features uniformly" (LIMoE, its ref. 11) and says Plain-MoE
    "fuses visual and textual features element-wise". Here that is an MoE whose
    gate mixes three experts - the two visual experts (3x3 Conv-BN-ReLU, Eq. 1,
    no attention) and the text expert, whose token features are averaged over
    the ``L`` tokens and broadcast over the positions::

        y = w_1 e_1 + w_2 e_2 + w_3 mean_L(t')      (w = softmax over 3 experts)

    The gate reads ``GAP(x)`` and, only if ``indicator=True``, the one-hot
    indicator: the modality-indicator gate is part of the paper's TMoE
    contribution, so :class:`TextMoENet` builds Plain-MoE without it by default.
    Without text (``text_dim=None``) it is two visual experts, ``w`` over 2.

    Shapes: as :class:`TMoELayer`, with ``gates [B, 3]`` (``[B, 2]`` without
    text) and ``enhanced`` = ``experts``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, text_dim: int | None, num_domains: int = 1,
        indicator: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, text_dim, num_domains, indicator,
                         num_gates=3 if text_dim else 2)

    def forward(self, x: Tensor, text: Tensor | None, indicator: Tensor | None, keep: Tensor | None = None):
        e1, e2 = self.experts(x).chunk(2, dim=1)
        gates = self.gate_weights(x, indicator)
        w = gates[:, :, None, None]
        y = w[:, 0:1] * e1 + w[:, 1:2] * e2
        if self.text_expert is not None:
            text = self.text_expert(text)
            # mean over the real tokens (keep [B, L]); padding would pull every text to one vector
            k = torch.ones(text.shape[:2], dtype=text.dtype, device=text.device) if keep is None else keep.to(text.dtype)
            pooled = (text * k[..., None]).sum(1) / k.sum(1, keepdim=True).clamp_min(1)
            y = y + w[:, 2:3] * pooled[:, :, None, None]
        return y, text, {"experts": (e1, e2), "enhanced": (e1, e2), "gates": gates}


class _UpBlock(nn.Module):
    """x2 bilinear upsampling, concatenate ``[skip, up]``, two MoE layers ``(C_in + C_skip) -> C -> C``."""

    def __init__(self, layer_cls, below: int, skip: int, out: int, text_dim, num_domains,
                 indicator) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            layer_cls(below + skip, out, text_dim, num_domains, indicator),
            layer_cls(out, out, out if text_dim else None, num_domains, indicator),
        ])

    def forward(self, x, skip, text, indicator, aux: list | None, keep: Tensor | None = None):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([skip, x], dim=1)
        for layer in self.layers:
            x, text, layer_aux = layer(x, text, indicator, keep)
            if aux is not None:
                aux.append(layer_aux)
        return x, text


class MoEDecoder(nn.Module):
    """Three MoE up blocks (8b -> 4b -> 2b -> b) and a x4 sub-pixel head.

    Args:
        widths: encoder stage widths ``(b, 2b, 4b, 8b)``.
        num_classes: ``K``.
        text_dim: the text encoder's token width ``D`` (``None``: no text).
        num_domains: length of the indicator.
        kind: ``"tmoe"`` (:class:`TMoELayer`) or ``"plain"`` (:class:`PlainMoELayer`).
        indicator: whether the gates read the modality indicator.

    Head: ``Conv3x3(b -> 16K)`` then ``PixelShuffle(4)``: every 1/4-resolution
    position predicts its 4x4 block of full-resolution logits (a learned x4
    upsampling; the 3x3 kernel sees the neighbours, which avoids block edges).

    Shapes: ``[x1, x2, x3, x4]`` (see :class:`ConvNeXtEncoder`), ``text [B, L, D]``,
    ``indicator [B, N]`` -> logits ``[B, K, 4 h1, 4 w1]`` (``h1, w1`` of ``x1``).
    """

    def __init__(self, widths: Sequence[int], num_classes: int, text_dim: int | None,
                 num_domains: int, kind: Decoder = "tmoe", indicator: bool = True) -> None:
        super().__init__()
        layer_cls = {"tmoe": TMoELayer, "plain": PlainMoELayer}[kind]
        blocks = []
        below, t_dim = widths[3], text_dim
        for level in (2, 1, 0):
            blocks.append(_UpBlock(layer_cls, below, widths[level], widths[level], t_dim,
                                   num_domains, indicator))
            below, t_dim = widths[level], (widths[level] if text_dim else None)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.Conv2d(widths[0], 16 * num_classes, kernel_size=3, padding=1), nn.PixelShuffle(4)
        )

    def forward(self, features: list[Tensor], text: Tensor | None, indicator: Tensor | None,
                aux: list | None = None, keep: Tensor | None = None) -> Tensor:
        """``keep [B, L]`` bool: the text's real tokens (see :func:`real_tokens`)."""
        x = features[3]
        for block, skip in zip(self.blocks, (features[2], features[1], features[0])):
            x, text = block(x, skip, text, indicator, aux, keep)
        return self.head(x)


class TextMoENet(nn.Module):
    """TextMoE segmentation network (TextMoE paper §2.2, Fig. 2; Table 2's Plain-MoE).

    Args:
        in_channels: image channels ``C`` (1-channel images work with random
            init and with 3-channel checkpoints, see :class:`ConvNeXtEncoder`).
        num_classes: output channels ``K`` (logits; 1 for binary segmentation).
        widths: ConvNeXt stage widths ``(b, 2b, 4b, 8b)``; ``None`` = ConvNeXt-Tiny's
            ``(96, 192, 384, 768)`` or the checkpoint's.
        depths: ConvNeXt blocks per stage; ``None`` = ``(3, 3, 9, 3)`` or the checkpoint's.
        encoder: ``None`` / ``"random"`` (random init) or ``"hf:<dir>"``, a local
            ``save_pretrained`` folder of a ConvNeXt (e.g. ConvNeXt-Tiny ImageNet weights).
        decoder: ``"tmoe"`` (:class:`TMoELayer`) or ``"plain"`` (:class:`PlainMoELayer`).
        img_size: ``int`` or ``(H, W)``, divisible by 32: the profiling size (the
            network is fully convolutional plus attention over the text, so any
            size divisible by 32 runs).
        text_dim: token width ``D`` (384 for MiniLM, 768 for CXR-BERT).
        text_len: tokens per text ``L`` (24 in the paper); used for profiling -
            the attention accepts any ``L``.
        use_text: ``False`` builds the decoder without text experts and attention.
        num_domains: ``N >= 1``, length of the one-hot modality indicator.
        indicator: whether the gates read the indicator; ``None`` = ``True`` for
            TMoE and ``False`` for Plain-MoE (see :class:`PlainMoELayer`).
        drop_path: ConvNeXt stochastic depth rate.

    Forward:
        ``forward(images, text=None, domain=None, return_aux=False)``

        - ``images [B, C, H, W]`` in [0, 1], H and W divisible by 32;
        - ``text [B, L, D]`` token embeddings (required when ``use_text``);
        - ``domain``: LongTensor ``[B]`` of domain indices in ``[0, N)``
          (``None``: domain 0 for every image), or a float indicator ``[B, N]``
          used as is (e.g. zeros, to test the network with the indicator removed);
        - returns logits ``[B, K, H, W]``; with ``return_aux=True``
          ``(logits, aux)`` where, for the six MoE layers in decoder order
          (block 1 layer 1, block 1 layer 2, ..., block 3 layer 2), at widths
          ``C_j = 4b, 4b, 2b, 2b, b, b`` and resolutions 1/16, 1/16, 1/8, 1/8, 1/4, 1/4:

          - ``aux["experts"][j] = (e_1, e_2)``, each ``[B, C_j, h_j, w_j]``: the
            two visual experts' outputs (Eq. 1), the inputs of L_diff (Eq. 8,
            :func:`expert_difference`);
          - ``aux["enhanced"][j]``: the same after the text attention (Eq. 2;
            equal to ``experts`` for Plain-MoE or without text);
          - ``aux["gates"][j]``: ``[B, 2]`` gate weights (Eq. 3; ``[B, 3]`` for
            Plain-MoE with text: visual 1, visual 2, text), rows sum to 1.

    Size (paper widths, 224x224, 2 domains, 24 tokens of 384-d MiniLM text; GFLOPs
    as in :mod:`medtextseg.nets.profile`, 2 per MAC): ConvNeXt-T + TMoE 45.3M
    parameters and 23.2 GFLOPs, ConvNeXt-T + Plain-MoE 42.2M and 21.5 GFLOPs; the
    encoder alone is 27.8M and 8.9 GFLOPs. 768-d CXR-BERT tokens add 0.15M.

    Example:
        >>> import torch
        >>> from medtextseg.nets.textmoe import TextMoENet
        >>> net = TextMoENet(widths=(8, 16, 32, 64), depths=(1, 1, 1, 1), text_dim=12,
        ...                  num_domains=2, img_size=64).eval()
        >>> logits = net(torch.rand(2, 3, 64, 64), torch.randn(2, 5, 12), domain=torch.tensor([0, 1]))
        >>> tuple(logits.shape)
        (2, 1, 64, 64)
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        encoder: str | None = None,
        decoder: Decoder = "tmoe",
        img_size: int | Sequence[int] = 224,
        text_dim: int = 384,
        text_len: int = 24,
        use_text: bool = True,
        num_domains: int = 1,
        indicator: bool | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("text_dim", text_dim), ("text_len", text_len),
                            ("num_domains", num_domains)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if decoder not in ("tmoe", "plain"):
            raise ValueError(f"decoder must be 'tmoe' or 'plain', got {decoder!r}")
        if widths is not None and (len(widths) != 4 or any(int(w) < 1 for w in widths)):
            raise ValueError(f"widths must be 4 positive integers, got {widths!r}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.img_size = check_textmoe_size(img_size)
        self.text_dim = int(text_dim)
        self.text_len = int(text_len)
        self.use_text = bool(use_text)
        self.num_domains = int(num_domains)
        self.decoder_kind = decoder
        self.use_indicator = (decoder == "tmoe") if indicator is None else bool(indicator)

        checkpoint = _checkpoint_path(encoder)
        self.encoder = ConvNeXtEncoder(in_channels, widths, depths, checkpoint, drop_path)
        self.widths = self.encoder.channels
        self.decoder = MoEDecoder(self.widths, num_classes, self.text_dim if self.use_text else None,
                                  self.num_domains, decoder, self.use_indicator)

    def _check_inputs(self, images: Tensor, text: Tensor | None) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape [B, {self.in_channels}, H, W], got {list(images.shape)}"
            )
        check_textmoe_size(tuple(images.shape[-2:]), what="image size")
        if not self.use_text:
            return
        if text is None:
            raise ValueError(
                f"this TextMoE network was built with use_text=True and needs text embeddings "
                f"[B, L, {self.text_dim}]; pass text=..., or build it with use_text=False"
            )
        if text.ndim != 3 or text.shape[0] != images.shape[0] or text.shape[2] != self.text_dim:
            raise ValueError(
                f"expected text of shape [B, L, D] = [{images.shape[0]}, L, {self.text_dim}], "
                f"got {list(text.shape)}"
            )

    def domain_indicator(self, domain, batch: int, like: Tensor) -> Tensor:
        """The one-hot modality indicator ``[B, N]`` (dtype and device of ``like``).

        ``domain``: ``None`` (domain 0), an int, or a LongTensor ``[B]`` of indices;
        a floating tensor ``[B, N]`` is taken as the indicator itself.
        """
        n = self.num_domains
        if domain is None:
            indicator = torch.zeros(batch, n, dtype=like.dtype, device=like.device)
            indicator[:, 0] = 1
            return indicator
        domain = torch.as_tensor(domain, device=like.device)
        if domain.is_floating_point():
            if tuple(domain.shape) != (batch, n):
                raise ValueError(f"a float domain indicator must be [B, N] = [{batch}, {n}], "
                                 f"got {list(domain.shape)}")
            return domain.to(like.dtype)
        if domain.ndim == 0:
            domain = domain.expand(batch)
        if tuple(domain.shape) != (batch,):
            raise ValueError(f"domain must be [B] = [{batch}] indices, got {list(domain.shape)}")
        # Checked on the CPU only: elsewhere reading the indices back would stall the
        # device every step (one_hot still rejects them there, less legibly).
        if domain.device.type == "cpu" and domain.numel() and (
            int(domain.min()) < 0 or int(domain.max()) >= n
        ):
            raise ValueError(f"domain indices must be in [0, {n}) (num_domains={n}), "
                             f"got {domain.tolist()}")
        return F.one_hot(domain.long(), n).to(like.dtype)

    def forward(self, images: Tensor, text: Tensor | None = None, domain=None,
                return_aux: bool = False):
        """See the class docstring: logits ``[B, K, H, W]``, or ``(logits, aux)``."""
        self._check_inputs(images, text)
        features = self.encoder(images)
        indicator = (self.domain_indicator(domain, images.shape[0], features[0])
                     if self.use_indicator else None)
        layers: list | None = [] if return_aux else None
        text = text if self.use_text else None
        logits = self.decoder(features, text, indicator, layers, None if text is None else real_tokens(text))
        logits = logits.contiguous()
        if not return_aux:
            return logits
        aux = {key: [layer[key] for layer in layers] for key in ("experts", "enhanced", "gates")}
        return logits, aux


def real_tokens(text: Tensor) -> Tensor:
    """``[B, L]`` bool: the tokens of ``text [B, L, D]`` that are not padding. The text
    encoders pad with zero vectors; a text of padding only keeps every token (attending
    to nothing is undefined)."""
    keep = text.ne(0).any(-1)
    return keep | ~keep.any(1, keepdim=True)


def _checkpoint_path(encoder: str | None) -> Path | None:
    if encoder is None or str(encoder).strip().lower() in ("", "random", "none"):
        return None
    spec = str(encoder).strip()
    if not spec.startswith("hf:") or not spec[3:]:
        raise ValueError(
            f"encoder must be 'random' or 'hf:<dir>' (a local ConvNeXt save_pretrained folder), "
            f"got {encoder!r}"
        )
    path = Path(spec[3:]).expanduser()
    if not path.is_dir():
        raise ValueError(f"ConvNeXt checkpoint folder {path} does not exist")
    return path


#: TextMoE networks (ConvNeXt encoder) and their decoders: TMoE (paper §2.2) and the
#: Plain-MoE of the paper's Table 2 ablation.
TEXTMOE_DECODERS: dict[str, str] = {"textmoe": "tmoe", "textmoe-plain": "plain"}


def _build(name: str, **options) -> TextMoENet:
    base_width = options.pop("base_width", None)
    if base_width is not None:
        options["widths"] = convnext_widths(base_width)
    if "img_size" in options:
        check_textmoe_size(options["img_size"])
    return TextMoENet(decoder=TEXTMOE_DECODERS[name], **options)


register_network("textmoe", tuple(TEXTMOE_DECODERS), ("depths", "encoder", "indicator", "drop_path"), _build)
