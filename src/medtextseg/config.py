"""Typed run configuration, YAML presets with tiers, and ``--set key=value`` overrides.

A preset is ``presets/<name>.yaml``::

    base: lvit-t            # optional: start from another preset
    method: supervised
    network: {name: lvit-t, base_width: 64}
    tiers:                  # each tier overrides keys of the base document
      smoke: {train: {max_epochs: 1}}
      cpu:   {...}
      paper: {...}

A pre-training preset (a vision-language model, no masks needed) names its
module in the pre-training registry instead of a segmentation method::

    pretrain: dusss         # medtextseg.pretrain.PRETRAINERS; trained by `medtextseg pretrain`
    method: none
    vlm: {...}

Resolution order: dataclass defaults < base preset < preset < tier < ``--set``.
The resolved config is written to ``<run>/config.yaml`` and is the only thing a
resumed run, ``evaluate`` or ``predict`` reads back.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TIERS = ("smoke", "cpu", "paper")


class _YAMLLoader(yaml.SafeLoader):
    """``yaml.safe_load`` reading ``3e-4`` as a number, as YAML 1.2 and every user do:
    PyYAML follows YAML 1.1, whose floats need a dot, and gives the string "3e-4" (so
    ``--set optim.lr=3e-4`` would be refused as not a float)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


class ConfigError(ValueError):
    """A preset, tier or override that does not exist or does not fit."""


@dataclass
class NetworkConfig:
    """Options passed to :func:`medtextseg.nets.build_network`."""

    name: str = "lvit-t"
    base_width: int = 64
    use_text: bool = True
    # Further keyword options of the network's family (build_network documents them), e.g.
    # TextMoE's {depths: [3, 3, 9, 3], encoder: "hf:<dir>", indicator: false, drop_path: 0.1}.
    # The modality indicator's length is not one of them: it is len(data.domains).
    options: dict = field(default_factory=dict)


@dataclass
class TextConfig:
    """Which text encoder turns descriptions into token embeddings (DESIGN.md §4).

    ``encoder`` is ``learned``, ``minilm`` or ``hf:<dir>``; ``dim`` is used by
    ``learned`` only (frozen encoders have their model's width).
    """

    encoder: str = "learned"
    max_len: int = 24
    dim: int = 256


@dataclass
class DataConfig:
    """Input pipeline. ``augment`` is ``none``, ``rotate`` (±``rotate_degrees``),
    ``lvit`` (the official LViT recipe: p=0.5 rot90+flip, else p=0.5 rotation),
    ``rotate_elastic`` (PromptSSL: rotation, elastic, contrast) or ``resize_crop`` (TextMoE's random resize-and-crop: a crop of a random
    ``crop_min_scale``-1 of each side at a random position, resized back).

    ``rotate`` is the default because flips and quarter turns swap the left/right
    and upper/lower words that the clinical texts depend on.

    Two resolution protocols: by default every image is resized to ``img_size``²
    (the papers'); with ``patches`` the images keep ``scale`` × their own size and the
    network sees ``img_size``² crops in training and a sliding window at inference.
    """

    # The network's input size: an int S (S x S) or [H, W] (e.g. [512, 256] for sagittal
    # spine slices); read it through ``size`` / ``area`` instead of assuming a square.
    img_size: Any = 224
    in_channels: int = 3
    # 1 = binary (one sigmoid channel); K >= 2 = K classes with 0 = background (softmax).
    num_classes: int = 1
    # Names of the class ids 0..K-1 (background first); empty = the dataset's classes.txt
    # (medtextseg.classes), which `train` writes here, else "class 1" ... "class K-1".
    classes: list = field(default_factory=list)
    batch_size: int = 2
    eval_batch_size: int = 8
    num_workers: int = 0
    augment: str = "rotate"
    rotate_degrees: float = 20.0
    crop_min_scale: float = 0.8
    threshold: float = 0.5
    # Patch protocol (data/module.py, inference.py): train on img_size² random crops of
    # images kept at ``scale`` × their original size (1.0 = native resolution),
    # ``patches_per_image`` crops per image per epoch, and predict whole images with a
    # sliding img_size² window (``window_overlap``, ``window_blend``). Off: the papers'
    # protocol, every image resized to img_size².
    patches: bool = False
    scale: float = 1.0
    patches_per_image: int = 4
    window_overlap: float = 0.25
    window_blend: str = "gaussian"
    # Semi-supervised splits (data/splits.py): keep the masks of this fraction of the
    # labeled Train images, or of the ids listed in ``labeled_ids`` (a file).
    labeled_ratio: float = 1.0
    labeled_ids: str = ""
    # Composite data (data/sources.py, one domain per --data root): the domain names in
    # the order of the modality indicator (TextMoE's one-hot); empty = the sorted domains
    # of the training data, which `train` writes to config.yaml.
    domains: list = field(default_factory=list)
    # Domain balance of a training epoch (data/module.py): "balance" repeats each domain's
    # images round(n_largest / n_domain) times (TextMoE oversampled MosMedData+ x3 beside
    # QaTa: round(7145 / 2729) = 3), "none" takes every image once, "ct=3,cxr=1" sets the
    # factors. The labeled and the unlabeled sets are balanced separately.
    oversample: str = "balance"

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of ``img_size`` (an int S means ``(S, S)``); ``ValueError`` if malformed."""
        return image_size(self.img_size)

    @property
    def size_label(self) -> str:
        """``224²`` for a square size, ``512×256`` (H×W) otherwise."""
        h, w = self.size
        return f"{h}²" if h == w else f"{h}×{w}"


def image_size(value: Any, what: str = "data.img_size") -> tuple[int, int]:
    """``(H, W)`` from an int S or a pair ``[H, W]`` of positive ints; else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int or [H, W], got {value!r}")  # noqa: TRY004
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{what} must be a positive int S (S x S) or [H, W] of positive ints, "
                         f"got {value!r} (e.g. --set {what}=224 or --set {what}=[512,256])")
    return int(value[0]), int(value[1])


@dataclass
class OptimConfig:
    """Adam with cosine warm restarts stepped per epoch (LViT official setting).

    Stabilisers, all off by default (the papers' recipe): ``lr_warmup_epochs`` ramps
    the learning rate linearly from lr/steps to the schedule over that many epochs
    (fractions allowed; counted in optimizer steps); ``grad_clip`` clips the global
    gradient norm (Lightning's ``gradient_clip_val``; 0 = off).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    # "adam" (torch.optim.Adam, L2 penalty weight_decay) or "adamw" (decoupled weight decay).
    optimizer: str = "adam"
    # "cosine_restarts" (per epoch, period t0), "cosine" (one cosine from lr to eta_min
    # over the whole run, per optimizer step), "multistep" (lr x gamma at each epoch of
    # ``milestones``; PromptSSL: /5 at 100 and 200) or "none".
    scheduler: str = "cosine_restarts"
    t0: int = 10
    eta_min: float = 1e-4
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    lr_warmup_epochs: float = 0.0
    grad_clip: float = 0.0


@dataclass
class LossConfig:
    """L_sup = dice·L_Dice + ce·L_CE; LViT Eq. 16 is dice = ce = 0.5."""

    dice: float = 0.5
    ce: float = 0.5


@dataclass
class SemiConfig:
    """Semi-supervised training (methods ``lvit_semi`` and ``mean_teacher``).

    L = L_sup + w(epoch) · L_unsup, where w is 0 for ``warmup_epochs`` epochs of
    supervised training, then rises along the sigmoid ramp exp(-5 (1 - t)^2)
    (Laine & Aila 2017) over ``rampup_epochs`` to ``unsup_weight``.

    LViT (Eq. 9, 17): ``epi`` refreshes every unlabeled image's pseudo label once per
    generation (= epoch) as P_t = beta · P_{t-1} + (1 - beta) · p_t; ``epi: false``
    uses the latest prediction alone (beta = 0, plain self-training), the ablation
    of Table 2. ``lv_loss`` adds alpha · L_LV with the contrastive labels
    ``lv_contrastive``: ``mean_per_text`` (mean labeled mask of each distinct text),
    ``labeled`` (every labeled mask) or ``templates`` (masks + LV_loss.xlsx in
    ``lv_templates``). Mean Teacher: EMA teacher ``ema_decay``, Gaussian input
    noise ``noise_std`` clipped to ±2σ.
    """

    warmup_epochs: int = 5
    rampup_epochs: int = 5
    unsup_weight: float = 1.0
    epi: bool = True
    beta: float = 0.99
    hard_labels: bool = True
    bank_dtype: str = "float32"
    # Banks larger than this live in a memory-mapped file in the run directory.
    bank_memmap_mb: int = 1024
    lv_loss: bool = True
    lv_alpha: float = 0.1
    lv_contrastive: str = "mean_per_text"
    lv_templates: str = ""
    ema_decay: float = 0.99
    noise_std: float = 0.1


# DuSSS's uncertainty constants (Eq. 2-4; the official values, reference-implementations.md)
# and the initial contrastive temperature (CLIP's 0.07): the one definition that the
# config, the SSS functions and the VLM network default to.
SSS_A = 1 / 200
SSS_B = 4.0
SSS_LAMBDA = 1 / 5
TEMPERATURE_INIT = 0.07


@dataclass
class VLMConfig:
    """The DuSSS vision-language model and its pre-training (``pretrain: dusss``).

    Network (:class:`medtextseg.nets.vlm.DualEncoderVLM`): image encoder ``vit``
    (random init, shaped by ``patch_size``/``hidden_size``/``depth``/``heads``/
    ``mlp_ratio``) or ``hf:<dir>``; its input size is ``data.img_size`` and its
    channels ``data.in_channels``. Text encoder ``minilm`` (the packaged
    all-MiniLM-L6-v2, fine-tuned), ``hf:<dir>`` or ``learned`` (sized by the
    ``text_*`` keys); texts are cut to ``max_len`` tokens. ``embed_dim`` is the
    joint space (512 in the paper), ``decoder_channels`` the two widths of the
    grounding decoder, ``temperature`` the initial learnable tau (0.07).

    Losses (see :mod:`medtextseg.pretrain.dusss`): L = L_cmc (Eq. 6-8)
    + ``imc_weight`` L_imc (Eq. 9, when ``imc``) + ``tg_weight`` L_tg (Eq. 11, when
    ``tg_loss``) + ``mask_weight`` L_mask (Dice+CE of the text mask on the labeled
    Train masks, when ``mask_supervision``). ``sss`` puts the SSS weights (Eq. 1-5,
    constants ``sss_a``, ``sss_b``, ``sss_lam``) on every contrastive term from epoch
    ``sss_warmup_epochs`` on (plain InfoNCE before: SSS from a random start collapses).

    Second view (IMC): ``text_variants`` fact-preserving rewrites per distinct text,
    made once at setup (clause reorder, then a clause dropped with probability
    ``text_p_drop``); the image view is a random resized crop of at least
    ``aug_crop_min`` of each side, a rotation within ±``aug_rotate_degrees``, and
    intensity jitter (never a flip: the texts state left and right).

    Selection: ``monitor`` is ``r1`` (Val mean R@1) or ``text_dice`` (Val text-mask Dice).
    """

    image_encoder: str = "vit"
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    text_encoder: str = "minilm"
    text_hidden: int = 256
    text_depth: int = 2
    text_heads: int = 4
    max_len: int = 24
    embed_dim: int = 512
    decoder_channels: list = field(default_factory=lambda: [256, 128])
    temperature: float = TEMPERATURE_INIT
    sss: bool = True
    sss_a: float = SSS_A
    sss_b: float = SSS_B
    sss_lam: float = SSS_LAMBDA
    sss_warmup_epochs: int = 0
    imc: bool = True
    tg_loss: bool = True
    mask_supervision: bool = True
    imc_weight: float = 1.0
    tg_weight: float = 1.0
    mask_weight: float = 1.0
    text_variants: int = 4
    text_p_drop: float = 0.5
    aug_crop_min: float = 0.8
    aug_rotate_degrees: float = 10.0
    # The labeled Train images are repeated (whole times) so that they make at least this
    # share of a pre-training epoch's items: at 5 % labels a batch of 16 holds about one
    # mask, and the mask term (L_mask) would see a few hundred masks in a whole run.
    # 0 = every Train image once (the papers).
    mask_share: float = 0.0
    # What best.ckpt and early stopping select on: "r1" (Val mean R@1, the paper's
    # retrieval) or "text_dice" (the text mask's Val Dice: what DuSSS stage 2 consumes;
    # needs masks on every Val image).
    monitor: str = "r1"
    # GLsc (pretrain: glsc, medtextseg.pretrain.glsc): the local semantic constraint L_LS
    # (Eq. 1-2) and its weight; ``sss`` above is the global one's uncertainty cosine (Eq. 3-7).
    # ``prompts``: how a class becomes a text prompt (medtextseg.text.prompts).
    local_constraint: bool = True
    local_weight: float = 1.0
    prompts: str = "spine"


@dataclass
class PromptSSLConfig:
    """PromptSSL stage 2 (``method: promptssl``, :mod:`medtextseg.methods.promptssl`).

    ``prompt_mask``: merge the GLsc prompt-guided mask into the teacher's pseudo label
    (Eq. 8, 13-15); ``false`` is Mean Teacher's step (no VLM needed). ``region`` /
    ``feat``: L_region (Eq. 9) and L_feat (Eq. 10) on the VLM decoder, weights
    ``region_weight`` (lambda_i) and ``feat_weight`` (lambda_f); the paper gives no values.
    ``absent_from_text``: a class the slice's text calls ``none`` gets score s_c = 0 in
    the stack of Eq. 8. ``mask_supervision``: the decoder also learns the labeled masks
    (Dice + CE of the prompt mask). ``eps``: probabilities -> logits as log(clamp(p, eps)).
    """

    prompt_mask: bool = True
    region: bool = True
    region_weight: float = 0.1
    feat: bool = True
    feat_weight: float = 0.1
    absent_from_text: bool = True
    mask_supervision: bool = True
    eps: float = 1e-4


@dataclass
class DuSSSConfig:
    """DuSSS stage 2 (``method: dusss``, :mod:`medtextseg.methods.dusss`).

    ``text_mask``: merge the frozen VLM's text-guided mask into the teacher's pseudo
    label (Eq. 15-17); ``false`` trains the plain Mean Teacher step (no VLM needed),
    the first row of the paper's Table 2. ``eps``: the text mask is stored as a
    probability and turned back into a logit as logit(clamp(p, eps, 1 - eps)).
    """

    text_mask: bool = True
    eps: float = 1e-4


@dataclass
class TextMoEConfig:
    """TextMoE (``method: textmoe``, :mod:`medtextseg.methods.textmoe`).

    ``cr``: the content regularisation L_cr (Eq. 6-7: the student sees the frequency-
    exchanged unlabeled image, the teacher the original, Dice + CE against the teacher's
    hard pseudo labels), weight ``cr_weight`` times the family's ramp; ``false`` trains
    Mean Teacher's naive teacher-student term instead (Table 2 rows 2-3). ``band``: side
    of the exchanged centred low-frequency square, as a fraction of the spectrum side.
    ``diff``: the differential loss L_diff (Eq. 8) on the student's two visual experts of
    every TMoE layer, weight ``diff_weight`` (not ramped).
    """

    cr: bool = True
    cr_weight: float = 1.0
    band: float = 0.1
    diff: bool = True
    diff_weight: float = 0.1


@dataclass
class TrainConfig:
    """Loop, devices and stopping; all handed to Lightning."""

    max_epochs: int = 100
    patience: int = 50
    seed: int = 666
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    limit_train_batches: Any = 1.0
    log_every_n_steps: int = 10
    channels_last: bool = False
    # An exponential moving average of the weights (Lightning's EMAWeightAveraging), per
    # optimizer step, used for validation, model selection and the saved checkpoints; 0 = off.
    ema_decay: float = 0.0
    # torch.use_deterministic_algorithms sends CPU convolutions down a path ~15x
    # slower; seeding alone already gives same-seed, same-metrics runs on one CPU
    # (tests/test_end_to_end.py checks it). Turn on for bit-exact GPU runs.
    deterministic: bool = False


@dataclass
class Config:
    preset: str = "lvit-t"
    tier: str = "cpu"
    method: str = "supervised"
    # A pre-training module (medtextseg.pretrain.PRETRAINERS) or "" for a segmentation run.
    pretrain: str = ""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    dusss: DuSSSConfig = field(default_factory=DuSSSConfig)
    textmoe: TextMoEConfig = field(default_factory=TextMoEConfig)
    promptssl: PromptSSLConfig = field(default_factory=PromptSSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls()
        _merge_into(cfg, d, "")
        return cfg._checked()

    def _checked(self) -> Config:
        """Fields typed ``Any`` whose shape is known (``data.img_size``), checked on load."""
        try:
            self.data.size  # noqa: B018
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def with_overrides(self, overrides: list[str]) -> Config:
        """Return a copy with ``key.sub=value`` overrides applied (values parsed as YAML)."""
        cfg = Config.from_dict(self.to_dict())
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set train.max_epochs=5)")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            # A text field takes what was typed: YAML would read 0123 or 1e2 as a number
            # (a quoted value is still unquoted by YAML).
            text = raw.strip()
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
            value = text if isinstance(_current(cfg, parts), str) and not quoted else _yaml(raw) if text else ""
            nested: Any = value
            for part in reversed(parts):
                nested = {part: nested}
            _merge_into(cfg, nested, "")
        return cfg._checked()


def _current(cfg: Config, parts: list[str]) -> Any:
    """The value at a dotted key path, None where the path names no field."""
    obj: Any = cfg
    for part in parts:
        if not (dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}):
            return None
        obj = getattr(obj, part)
    return obj


def _merge_into(obj: Any, d: dict, prefix: str) -> None:
    """Merge a nested dict into a dataclass tree, rejecting unknown keys by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {d!r}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, path + ".")
        elif names[key].type in ("Any", Any):
            # Fields typed Any take several kinds on purpose (devices: 1, "auto" or
            # [0, 1]); their values are checked where they are used.
            setattr(obj, key, value)
        else:
            setattr(obj, key, _coerce(current, value, path))


def _coerce(current: Any, value: Any, path: str) -> Any:
    """Keep the declared type of a field: ``--set optim.lr=1`` stays a float."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path} expects true/false, got {value!r}")
        return value
    if isinstance(current, dict) and isinstance(value, dict):
        # --set network.options.drop_path=0.1 adds one option; it does not drop the others.
        return {**current, **value}
    if isinstance(current, dict):
        raise ConfigError(f"{path} expects a mapping, got {value!r} (e.g. --set {path}={{key: value}})")
    if isinstance(current, list) and not isinstance(value, list):
        raise ConfigError(f"{path} expects a list, got {value!r} (e.g. --set {path}=[a,b])")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, (int, float, str)) and type(current) is not type(value):
        if isinstance(current, str):
            return str(value)
        raise ConfigError(f"{path} expects a {type(current).__name__}, got {value!r}")
    return value


def _preset_dir():
    return resources.files("medtextseg") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def _load_preset_doc(name: str, seen: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Return (base document, tiers) of a preset with its ``base:`` chain applied."""
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    if name in seen:
        raise ConfigError(f"preset inheritance loop: {' -> '.join(seen + (name,))}")
    doc = _yaml(path.read_text()) or {}
    tiers = doc.pop("tiers", {}) or {}
    base_name = doc.pop("base", None)
    if base_name:
        base_doc, base_tiers = _load_preset_doc(base_name, seen + (name,))
        doc = _deep_merge(base_doc, doc)
        tiers = {t: _deep_merge(base_tiers.get(t, {}), tiers.get(t, {})) for t in set(base_tiers) | set(tiers)}
    return doc, tiers


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_preset(name: str, tier: str = "cpu", overrides: list[str] | None = None) -> Config:
    """Resolve a preset at a tier, then apply ``--set`` overrides."""
    if tier not in TIERS:
        raise ConfigError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    doc, tiers = _load_preset_doc(name)
    doc = _deep_merge(doc, tiers.get(tier, {}))
    cfg = Config.from_dict({**doc, "preset": name, "tier": tier})
    return cfg.with_overrides(overrides or [])


def save_config(cfg: Config, path: Path) -> None:
    from medtextseg.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_config(path: Path) -> Config:
    return Config.from_dict(_yaml(Path(path).read_text()))
