"""Word-level tokenizer and vocabulary for the ``learned`` text encoder.

Clinical annotations are short and noisy (typos, missing spaces after
punctuation, odd unicode from spreadsheets), so the tokenizer is deliberately
simple: NFKC-normalise, lowercase, then split into runs of word characters and
single punctuation marks. ``"lung.Two  areas"`` -> ``["lung", ".", "two", "areas"]``.

Only whitespace is ever dropped: every other character, whatever its script,
ends up in a token (a letter or digit run of any script is a word, and any
other single character, an emoji, a control character or a lone combining mark
included, is a punctuation token). Chinese and Japanese have no spaces, so a
clause of them is one word. Whether the vocabulary knows a token is
:meth:`Vocab.encode`'s business.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1

# The special tokens contain "<" and ">", which the regex below always splits
# off as punctuation, so no real text can ever produce a special token.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize_words(text: str) -> list[str]:
    """Split ``text`` into lowercase word and punctuation tokens (no truncation)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


class Vocab:
    """A fixed token <-> id table; id 0 is padding, id 1 is the unknown token.

    Built with :meth:`from_texts`, every real token gets an id in sorted order,
    so the same training texts always give the same table, whatever their order.
    Document frequencies (how many fitted texts contain each token) are kept for
    tf-idf sentence vectors.
    """

    def __init__(self, tokens: Sequence[str], doc_freq: Sequence[int], n_docs: int):
        tokens = list(tokens)
        if tokens[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"a vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        if len(doc_freq) != len(tokens):
            raise ValueError(f"doc_freq has {len(doc_freq)} entries for {len(tokens)} tokens")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not repeat tokens")
        self.tokens: list[str] = tokens
        self.doc_freq: list[int] = [int(d) for d in doc_freq]
        self.n_docs = int(n_docs)
        self._index = {t: i for i, t in enumerate(tokens)}
        self._chars: frozenset[str] | None = None

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocab:
        df: Counter[str] = Counter()
        n_docs = 0
        for text in texts:
            df.update(set(tokenize_words(text)))
            n_docs += 1
        words = sorted(df)
        return cls([PAD_TOKEN, UNK_TOKEN, *words], [0, 0, *(df[w] for w in words)], n_docs)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (unknown words -> :data:`UNK_ID`), not padded or truncated."""
        return self.encode_tokens(tokenize_words(text))

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Ids of already tokenised words (unknown words -> :data:`UNK_ID`)."""
        return [self._index.get(t, UNK_ID) for t in tokens]

    @property
    def chars(self) -> frozenset[str]:
        """Every character of the real tokens: what the fitted texts taught the vocabulary."""
        if self._chars is None:
            self._chars = frozenset("".join(self.tokens[2:]))
        return self._chars

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "doc_freq": list(self.doc_freq), "n_docs": self.n_docs}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(d["tokens"], d["doc_freq"], d["n_docs"])
