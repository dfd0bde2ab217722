"""DuSSS dual-encoder vision-language model: ViT + BERT-like encoders, Gaussian heads, grounding decoder.

Stage 1 of DuSSS (``../shared/papers/dusss.txt``) pre-trains this model with the
SSS-weighted dual contrastive losses of :mod:`medtextseg.pretrain.similarity`;
stage 2 reads its text-guided mask (Eq. 10) as an extra pseudo label. This file
holds only the network; losses and training live elsewhere.

Design (facts from ``../shared/notes/reference-implementations.md``, choices stated):

- **Encoders** are Hugging Face models, never written here: a
  ``transformers.ViTModel`` (random init from a ``ViTConfig``, or local weights)
  and a BERT-like text model (the packaged all-MiniLM-L6-v2, any local
  checkpoint, or a tiny random-init ``BertModel``). Nothing downloads:
  checkpoints load with ``local_files_only=True``.
- **Embeddings**: the [CLS] token of each modality, a linear projection to
  ``embed_dim`` (512 officially), L2-normalised.
- **Gaussian heads** (one per modality; the official design is "an attention
  block + two linear heads"): the [CLS] token, as the only query, attends over
  all tokens of its own sequence (pre-LayerNorm multi-head attention, padding
  masked, residual), then two linear layers give the mean ``mu`` and
  ``log sigma`` of a diagonal Gaussian in ``embed_dim`` dimensions, so that the
  image and text distributions of Eq. 1 live in one space. The attention lets
  the spread depend on the whole image/text rather than on the [CLS] alone.
- **Grounding decoder** ``f_g`` (Eq. 10): the ViT patch tokens as a grid
  ``[B, hidden, h, w]`` (14x14 for 224/16) -> two residual conv blocks, each a
  x2 bilinear upsampling then conv3x3-GN-ReLU-conv3x3-GN plus a (1x1) skip,
  ReLU -> a 1x1 conv to ``embed_dim`` -> dense features ``v`` ``[B, E, 4h, 4w]``.
- **Text-guided mask** (Eq. 10): logit ``t^T v`` per pixel with ``t`` the
  image's *own* L2-normalised text embedding (row ``i`` of the text batch
  guides image ``i``; the official code averaged the texts of the batch),
  upsampled bilinearly to the image size. ``v`` is deliberately not normalised:
  its norm is the decoder's confidence, so the probability ``sigmoid(logit)``
  (one sigmoid, not the official two) can reach 0 and 1; a cosine in
  ``[-1, 1]`` would confine it to ``[0.27, 0.73]``.
- **Temperature** of the contrastive losses: a learnable ``log tau`` here,
  initialised to ``tau = 0.07`` and clamped to ``tau >= 0.01`` (CLIP's bound).
- **Images** come in ``[0, 1]`` (the network contract of :mod:`medtextseg.nets`)
  and are mapped to ``[-1, 1]``, the default ViT image-processor normalisation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtextseg.config import TEMPERATURE_INIT

__all__ = ["DualEncoderVLM", "GaussianHead", "GroundingDecoder", "VLMOutput"]

_VIT_DEFAULTS = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "depth": 12, "heads": 12}
_LEARNED_TEXT_DEFAULTS = {"text_hidden": 256, "text_depth": 2, "text_heads": 4}


@dataclass
class VLMOutput:
    """What :meth:`DualEncoderVLM.forward` returns (``B`` pairs, ``E = embed_dim``).

    Attributes:
        img_emb: ``[B, E]`` L2-normalised projected image [CLS].
        txt_emb: ``[B, E]`` L2-normalised projected text [CLS].
        img_mu, img_logsigma: ``[B, E]`` Gaussian of the image [CLS] (Eq. 1 inputs;
            ``sigma = exp(logsigma)`` is the standard deviation).
        txt_mu, txt_logsigma: ``[B, E]`` Gaussian of the text [CLS].
        patch_features: ``[B, hidden, h, w]`` ViT patch tokens as a grid (``v_f^patch``
            of Eq. 10), the grounding decoder's input.
    """

    img_emb: Tensor
    txt_emb: Tensor
    img_mu: Tensor
    img_logsigma: Tensor
    txt_mu: Tensor
    txt_logsigma: Tensor
    patch_features: Tensor


def _groups(channels: int, most: int = 8) -> int:
    """The largest group count <= ``most`` dividing ``channels`` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


class GaussianHead(nn.Module):
    """[CLS]-query attention block + two linear heads -> diagonal Gaussian of the [CLS].

    Args:
        dim: token width of the encoder.
        out_dim: Gaussian dimension (the embedding width ``E``).
        num_heads: attention heads (must divide ``dim``).

    Forward:
        ``tokens [B, L, dim]`` ([CLS] first), optional ``mask [B, L]`` (True / 1 at
        real tokens) -> ``(mu [B, out_dim], logsigma [B, out_dim])``.
    """

    def __init__(self, dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.norm_query = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mu = nn.Linear(dim, out_dim)
        self.logsigma = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cls = tokens[:, :1]
        kv = self.norm_tokens(tokens)
        padding = None if mask is None else ~mask.bool()
        attended, _ = self.attn(
            self.norm_query(cls), kv, kv, key_padding_mask=padding, need_weights=False
        )
        h = (cls + attended).squeeze(1)
        return self.mu(h), self.logsigma(h)


class _UpResBlock(nn.Module):
    """x2 bilinear upsampling, then a residual pair of 3x3 convs with group norm."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class GroundingDecoder(nn.Module):
    """DuSSS grounding decoder ``f_g`` (Eq. 10): patch grid -> dense features in the text space.

    Args:
        in_dim: ViT hidden width.
        embed_dim: output width ``E`` (that of the projected text).
        channels: widths of the two residual upsampling blocks.

    Forward:
        ``[B, in_dim, h, w]`` -> ``[B, E, 4h, 4w]`` (not normalised; see the module docstring).
    """

    def __init__(self, in_dim: int, embed_dim: int, channels: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"expected two positive decoder widths, got {tuple(channels)}")
        c1, c2 = (int(c) for c in channels)
        self.blocks = nn.Sequential(_UpResBlock(in_dim, c1), _UpResBlock(c1, c2))
        self.head = nn.Conv2d(c2, embed_dim, 1)

    def forward(self, patches: Tensor) -> Tensor:
        return self.head(self.blocks(patches))


def _local_dir(spec: str, what: str) -> Path:
    path = Path(spec[3:].strip()).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{what} {spec!r}: {path} is not a Hugging Face checkpoint directory "
            "(expected config.json and a weights file)"
        )
    return path


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class DualEncoderVLM(nn.Module):
    """DuSSS vision-language model: ViT and BERT-like encoders, Gaussian heads, grounding decoder.

    Args:
        image_encoder: ``"vit"`` (``ViTModel`` with random weights from the options
            below) or ``"hf:<dir>"`` (a local ViT checkpoint, e.g. DeiT as in the
            official code; the shape options then come from its config and may not be given).
        image_size: input size (int or ``(H, W)``), default 224. With ``hf:`` it may
            differ from the checkpoint's; position embeddings are then interpolated.
        patch_size, hidden_size, depth, heads: ViT patch size (16), width (768),
            blocks (12) and attention heads (12); ``"vit"`` only.
        mlp_ratio: ViT MLP width / hidden width (4); ``"vit"`` only.
        in_channels: image channels ``C`` (3). A 3-channel ``hf:`` checkpoint also
            takes ``in_channels=1``: grey images are repeated to 3 channels.
        text_encoder: ``"minilm"`` (the packaged all-MiniLM-L6-v2, fine-tuned),
            ``"hf:<dir>"`` (any local BERT-like checkpoint with its tokenizer) or
            ``"learned"`` (a random-init ``BertModel`` sized by the ``text_*``
            options, with the MiniLM WordPiece vocabulary).
        text_hidden, text_depth, text_heads: width (256), layers (2) and heads (4)
            of the ``"learned"`` text model; ``"learned"`` only.
        embed_dim: ``E``, width of the joint space, the Gaussians and the dense
            features (512).
        decoder_channels: widths of the decoder's two residual blocks ((256, 128)).
        temperature: initial contrastive temperature ``tau`` (0.07).

    Forward:
        ``images [B, C, H, W]`` in ``[0, 1]`` (H, W divisible by the patch size),
        ``text_ids`` and ``text_mask`` ``[B, L]`` from :meth:`tokenize` (row ``i`` is
        image ``i``'s own text) -> :class:`VLMOutput`. :meth:`mask_logits` gives
        the text-guided mask logits ``[B, 1, H, W]`` (Eq. 10).

    Example:
        >>> import torch
        >>> from medtextseg.nets.vlm import DualEncoderVLM
        >>> vlm = DualEncoderVLM(image_size=32, patch_size=8, hidden_size=32, depth=1, heads=2,
        ...     text_encoder="learned", text_hidden=32, text_depth=1, text_heads=2,
        ...     embed_dim=16, decoder_channels=(16, 16)).eval()
        >>> ids, mask = vlm.tokenize(["Left lung, one small area.", "Right lung."], max_len=12)
        >>> tuple(vlm.mask_logits(torch.rand(2, 3, 32, 32), ids, mask).shape)
        (2, 1, 32, 32)
    """

    def __init__(
        self,
        *,
        image_encoder: str = "vit",
        image_size: int | Sequence[int] | None = None,
        patch_size: int | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: int | None = None,
        in_channels: int = 3,
        text_encoder: str = "minilm",
        text_hidden: int | None = None,
        text_depth: int | None = None,
        text_heads: int | None = None,
        embed_dim: int = 512,
        decoder_channels: Sequence[int] = (256, 128),
        temperature: float = TEMPERATURE_INIT,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.image_spec = str(image_encoder).strip()
        self.text_spec = str(text_encoder).strip()
        self.embed_dim = int(embed_dim)
        self.in_channels = int(in_channels)

        self.vit = self._build_vit(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
        )
        vcfg = self.vit.config
        self.image_size = _pair(image_size if image_size is not None else vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        for side in self.image_size:
            if side % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}"
                )
        self.grid = (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)
        if not (
            self.in_channels == vcfg.num_channels
            or (self.in_channels == 1 and vcfg.num_channels == 3)
        ):
            raise ValueError(
                f"in_channels={self.in_channels} does not fit the ViT's {vcfg.num_channels} "
                "input channels (only 1 -> 3 is bridged, by repeating grey images)"
            )

        self.text, self._tokenizer_dir = self._build_text(text_hidden, text_depth, text_heads)
        tcfg = self.text.config
        self.max_positions = int(tcfg.max_position_embeddings)
        self._tokenizer = None  # loaded on first tokenize(); not part of the state dict

        hv, ht = int(vcfg.hidden_size), int(tcfg.hidden_size)
        self.img_proj = nn.Linear(hv, embed_dim)
        self.txt_proj = nn.Linear(ht, embed_dim)
        self.img_gauss = GaussianHead(hv, embed_dim, int(vcfg.num_attention_heads))
        self.txt_gauss = GaussianHead(ht, embed_dim, int(tcfg.num_attention_heads))
        self.decoder = GroundingDecoder(hv, embed_dim, decoder_channels)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        # from_pretrained hands back its model in eval mode, and Lightning keeps each
        # module's mode: without this the fine-tuned text encoder would train without
        # its dropout.
        self.train()

    # -- construction ----------------------------------------------------------------------------

    def _build_vit(self, **shape):
        from transformers import ViTConfig, ViTModel

        if self.image_spec == "vit":
            opts = {k: (v if v is not None else _VIT_DEFAULTS.get(k)) for k, v in shape.items()}
            mlp_ratio = opts.pop("mlp_ratio") or 4
            if opts["hidden_size"] % opts["heads"]:
                raise ValueError(
                    f"heads={opts['heads']} must divide hidden_size={opts['hidden_size']}"
                )
            config = ViTConfig(
                image_size=opts["image_size"],
                patch_size=opts["patch_size"],
                num_channels=self.in_channels,
                hidden_size=opts["hidden_size"],
                num_hidden_layers=opts["depth"],
                num_attention_heads=opts["heads"],
                intermediate_size=mlp_ratio * opts["hidden_size"],
            )
            # No pooler: its weights would never get a gradient (DDP rejects unused parameters).
            return ViTModel(config, add_pooling_layer=False)
        if self.image_spec.startswith("hf:") and self.image_spec[3:].strip():
            given = sorted(k for k, v in shape.items() if v is not None and k != "image_size")
            if given:
                raise ValueError(
                    f"image encoder {self.image_spec!r} takes its shape from the checkpoint; "
                    f"do not pass {', '.join(given)}"
                )
            path = _local_dir(self.image_spec, "image encoder")
            return ViTModel.from_pretrained(
                str(path), local_files_only=True, add_pooling_layer=False
            )
        raise ValueError(f"unknown image encoder {self.image_spec!r}; valid: 'vit', 'hf:<dir>'")

    def _build_text(self, hidden, depth, heads) -> tuple[nn.Module, Path]:
        from transformers import AutoModel, BertConfig, BertModel

        from medtextseg.text.encoders import check_model_dir, minilm_model_dir

        spec = self.text_spec
        if spec != "learned" and any(v is not None for v in (hidden, depth, heads)):
            raise ValueError(
                f"text_hidden/text_depth/text_heads size the 'learned' text encoder only, "
                f"not {spec!r}"
            )
        if spec == "learned":
            vocab_dir = minilm_model_dir()
            vocab_size = json.loads((vocab_dir / "config.json").read_text())["vocab_size"]
            hidden = hidden or _LEARNED_TEXT_DEFAULTS["text_hidden"]
            depth = depth or _LEARNED_TEXT_DEFAULTS["text_depth"]
            heads = heads or _LEARNED_TEXT_DEFAULTS["text_heads"]
            if hidden % heads:
                raise ValueError(f"text_heads={heads} must divide text_hidden={hidden}")
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                num_hidden_layers=depth,
                num_attention_heads=heads,
                intermediate_size=4 * hidden,
            )
            return BertModel(config, add_pooling_layer=False), vocab_dir
        if spec == "minilm":
            model_dir = minilm_model_dir()
        elif spec.startswith("hf:") and spec[3:].strip():
            model_dir = Path(spec[3:].strip()).expanduser()
            check_model_dir(model_dir)
        else:
            raise ValueError(
                f"unknown text encoder {spec!r}; valid: 'minilm', 'hf:<dir>', 'learned'"
            )
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        if getattr(model, "pooler", None) is not None:
            # Only [CLS] of the last hidden state is read; an unused pooler would never train.
            model.pooler = None
        return model.float(), model_dir

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_len: int = 24) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask of ``texts`` for this model's text encoder.

        Each distinct text is tokenised once (call this outside the training step,
        e.g. once per dataset, and index the rows). Texts are padded/truncated to
        ``max_len`` tokens, [CLS] and [SEP] included; a
        :class:`~medtextseg.text.checks.TextWarning` says how many were cut.

        Returns:
            ``(ids, mask)``: LongTensors ``[N, max_len]``; mask is 1 at real tokens.
            Equal rows of ``ids`` are equal texts as the model sees them (see
            :func:`medtextseg.pretrain.similarity.same_text_positives`).
        """
        import warnings

        from medtextseg.text.checks import TextReport, TextWarning, truncation_message

        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not a single str")
        if not 2 <= max_len <= self.max_positions:
            raise ValueError(
                f"max_len must be in [2, {self.max_positions}] (the text model's positions), "
                f"got {max_len}"
            )
        index: dict[str, int] = {}
        inverse = [index.setdefault(t, len(index)) for t in texts]
        uniq = list(index)
        if not uniq:
            empty = torch.zeros((0, max_len), dtype=torch.long)
            return empty, empty.clone()
        tok = self._ensure_tokenizer()
        lengths = [len(i) for i in tok(uniq, truncation=False, verbose=False)["input_ids"]]
        msg = truncation_message(
            self.text_spec,
            [TextReport(n) for n in lengths],
            max_len,
            counted="[CLS] and [SEP] count as tokens",
            max_positions=self.max_positions,
        )
        if msg:
            warnings.warn(msg, TextWarning, stacklevel=2)
        batch = tok(
            uniq, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        rows = torch.tensor(inverse, dtype=torch.long)
        return batch["input_ids"][rows].long(), batch["attention_mask"][rows].long()

    def _ensure_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                str(self._tokenizer_dir), local_files_only=True
            )
            if self._tokenizer.pad_token_id is None:
                raise ValueError(f"the tokenizer in {self._tokenizer_dir} has no padding token")
        return self._tokenizer

    def _text_tokens(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        if text_ids.ndim != 2 or text_ids.shape != text_mask.shape:
            raise ValueError(
                "expected text_ids and text_mask of one shape [B, L], got "
                f"{list(text_ids.shape)} and {list(text_mask.shape)}"
            )
        return self.text(input_ids=text_ids, attention_mask=text_mask).last_hidden_state

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, L]`` ids and mask -> ``(txt_emb, txt_mu, txt_logsigma)``, each ``[B, E]``."""
        tokens = self._text_tokens(text_ids, text_mask)
        mu, logsigma = self.txt_gauss(tokens, text_mask)
        return self._embed(self.txt_proj, tokens), mu, logsigma

    def embed_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """``[B, L]`` ids and mask -> ``txt_emb [B, E]`` (no Gaussian head)."""
        return self._embed(self.txt_proj, self._text_tokens(text_ids, text_mask))

    # -- images --------------------------------------------------------------------------------

    def _image_tokens(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape [B, {self.in_channels}, H, W], got {list(images.shape)}"
            )
        size = tuple(images.shape[-2:])
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"image size {size} must be divisible by patch_size {self.patch_size}")
        x = images * 2.0 - 1.0
        if x.shape[1] != self.vit.config.num_channels:
            x = x.expand(-1, self.vit.config.num_channels, -1, -1)
        interpolate = size != _pair(self.vit.config.image_size)
        return self.vit(pixel_values=x, interpolate_pos_encoding=interpolate).last_hidden_state

    def _patch_grid(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = size[0] // self.patch_size, size[1] // self.patch_size
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[B, C, H, W]`` -> ``(img_emb, img_mu, img_logsigma)`` ``[B, E]`` and
        ``patch_features [B, hidden, H/p, W/p]``."""
        tokens = self._image_tokens(images)
        mu, logsigma = self.img_gauss(tokens)
        grid = self._patch_grid(tokens, tuple(images.shape[-2:]))
        return self._embed(self.img_proj, tokens), mu, logsigma, grid

    @staticmethod
    def _embed(proj: nn.Linear, tokens: Tensor) -> Tensor:
        return F.normalize(proj(tokens[:, 0]), dim=-1)

    # -- the model -----------------------------------------------------------------------------

    @property
    def temperature(self) -> Tensor:
        """The learnable contrastive temperature ``tau`` (scalar tensor, ``>= 0.01``)."""
        return self.log_temperature.exp().clamp_min(0.01)

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> VLMOutput:
        """Embeddings and Gaussians of ``B`` image-text pairs; see :class:`VLMOutput`."""
        if images.shape[0] != text_ids.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images but {text_ids.shape[0]} texts; one text per image"
            )
        img_emb, img_mu, img_logsigma, patches = self.encode_image(images)
        txt_emb, txt_mu, txt_logsigma = self.encode_text(text_ids, text_mask)
        return VLMOutput(
            img_emb=img_emb,
            txt_emb=txt_emb,
            img_mu=img_mu,
            img_logsigma=img_logsigma,
            txt_mu=txt_mu,
            txt_logsigma=txt_logsigma,
            patch_features=patches,
        )

    def pixel_features(self, patch_features: Tensor) -> Tensor:
        """Grounding decoder ``v_f = f_g(v_f^patch)`` (Eq. 10): ``[B, hidden, h, w]`` ->
        ``[B, E, 4h, 4w]``."""
        return self.decoder(patch_features)

    def grounding_logits(
        self, patch_features: Tensor, txt_emb: Tensor, size: Sequence[int]
    ) -> Tensor:
        """Text-guided mask logits ``t^T v`` (Eq. 10) from already computed features.

        Args:
            patch_features: ``[B, hidden, h, w]`` (:attr:`VLMOutput.patch_features`).
            txt_emb: ``[B, E]``; row ``i`` guides image ``i`` only.
            size: ``(H, W)`` to upsample to (bilinear).

        Returns:
            ``[B, 1, H, W]`` logits; the mask probability is ``sigmoid`` of them, once.
        """
        if txt_emb.ndim != 2 or txt_emb.shape[0] != patch_features.shape[0]:
            raise ValueError(
                f"expected txt_emb [B, E] with B={patch_features.shape[0]}, got {list(txt_emb.shape)}"
            )
        return self.dense_logits(self.pixel_features(patch_features), txt_emb, size)

    @staticmethod
    def dense_logits(dense: Tensor, txt_emb: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Eq. 10 from decoded features: ``t^T v`` per pixel, ``[B, E, h, w]`` x ``[B, E]``
        -> ``[B, 1, h, w]``, or upsampled bilinearly to ``size`` when given (so a caller
        that needs ``v_f`` for another loss decodes once)."""
        if txt_emb.ndim != 2 or txt_emb.shape[:2] != dense.shape[:2]:
            raise ValueError(
                f"expected txt_emb [B, E] = {list(dense.shape[:2])}, got {list(txt_emb.shape)}"
            )
        logits = torch.einsum("be,behw->bhw", txt_emb, dense).unsqueeze(1)
        if size is None:
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def mask_logits(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Text-guided mask logits (Eq. 10) of each image under its own text: ``[B, 1, H, W]``."""
        if images.shape[0] != text_ids.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images but {text_ids.shape[0]} texts; one text per image"
            )
        tokens = self._image_tokens(images)
        size = tuple(images.shape[-2:])
        txt_emb = self.embed_text(text_ids, text_mask)
        return self.grounding_logits(self._patch_grid(tokens, size), txt_emb, size)

    def mask_probs(self, images: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """``sigmoid(mask_logits(...))``: the text-guided mask ``y^text`` in ``(0, 1)``, ``[B, 1, H, W]``."""
        return torch.sigmoid(self.mask_logits(images, text_ids, text_mask))
