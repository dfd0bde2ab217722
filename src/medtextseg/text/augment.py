"""Fact-preserving augmentation of structured clinical text (the second text view of DuSSS IMC).

Clinical descriptions such as ``"Bilateral pulmonary infection, two infected
areas, upper left lung and lower right lung."`` are lists of facts, one per
clause. Editing a word ("left" -> "right", "two" -> "three") would change the
diagnosis the text describes, so nothing here touches a word: the only edits
are to the clause *order* and, optionally, the *removal of one whole clause*.

- :func:`clauses` splits a text on ``,`` ``;`` ``.``; a delimiter between two
  digits is not a split point, so ``"2.5 cm"`` and ``"1,000"`` stay whole.
- :func:`facts` is the set of normalised clauses (lower case, single spaces):
  what a text states, independent of order and punctuation.
- :func:`reorder` permutes the clauses: ``facts(reorder(t)) == facts(t)``, always.
- :func:`drop_one` removes one fact (every copy of that clause) when at least
  two distinct facts remain: ``facts(drop_one(t)) < facts(t)`` (strict subset,
  never empty) for a text of three or more distinct facts, and the text
  unchanged otherwise. Dropping *does* remove a fact, which is acceptable for
  the contrastive view (a partial description of the same image is still a
  positive, as the reference notes suggest) but never for a segmentation target.
- :func:`augment` = reorder, then drop one clause with probability ``p_drop``.

The clauses are rejoined with ``", "`` and the text's own final punctuation
(``"."`` when it had one). Every function takes a :class:`random.Random` or an
integer seed and is deterministic for it; none reads the global ``random`` state.
"""

from __future__ import annotations

import random
import re

__all__ = ["augment", "clauses", "drop_one", "facts", "reorder"]

# A delimiter splits unless it sits between two digits ("2.5", "1,000").
_SPLIT = re.compile(r"(?<!\d)[,;.]|[,;.](?!\d)")
_FINAL = re.compile(r"[,;.]\s*$")
_SPACES = re.compile(r"\s+")


def _rng(rng: random.Random | int) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    # bool is an int, but a seed of True is a bug far more often than intended.
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"expected a random.Random or an int seed, got {type(rng).__name__}")


def clauses(text: str) -> list[str]:
    """The clauses of ``text`` in order, stripped, empty ones dropped (words untouched)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return [c.strip() for c in _SPLIT.split(text) if c.strip()]


def _normalise(clause: str) -> str:
    return _SPACES.sub(" ", clause.strip()).lower()


def facts(text: str) -> frozenset[str]:
    """The set of normalised clauses of ``text`` (lower case, whitespace collapsed)."""
    return frozenset(_normalise(c) for c in clauses(text))


def _join(parts: list[str], original: str) -> str:
    # Keep the text's own ending: a description without a full stop gets none added.
    end = "." if _FINAL.search(original) else ""
    return ", ".join(parts) + end


def reorder(text: str, rng: random.Random | int) -> str:
    """``text`` with its clauses in a uniformly random order (possibly the same one).

    ``facts(reorder(text, rng)) == facts(text)`` for every text. A text of fewer
    than two clauses is returned unchanged.
    """
    parts = clauses(text)
    if len(parts) < 2:
        return text
    _rng(rng).shuffle(parts)
    return _join(parts, text)


def drop_one(text: str, rng: random.Random | int) -> str:
    """``text`` without one of its facts, chosen uniformly, when two or more facts remain.

    Every clause stating the dropped fact goes (a repeated clause would
    otherwise keep it), the rest keep their order. So
    ``facts(drop_one(text, rng))`` is a strict, non-empty subset of
    ``facts(text)`` when the text states at least three distinct facts; with
    fewer the text is returned unchanged.
    """
    parts = clauses(text)
    # Sorted: the choice must not depend on string hashing, which varies per process.
    distinct = sorted({_normalise(c) for c in parts})
    if len(distinct) < 3:
        return text
    gone = _rng(rng).choice(distinct)
    return _join([c for c in parts if _normalise(c) != gone], text)


def augment(text: str, rng: random.Random | int, p_drop: float = 0.5) -> str:
    """The second text view: :func:`reorder`, then with probability ``p_drop`` :func:`drop_one`.

    ``facts(augment(text, rng))`` is ``facts(text)`` or, after a drop, a strict
    non-empty subset of it.
    """
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be in [0, 1], got {p_drop}")
    r = _rng(rng)
    out = reorder(text, r)
    if r.random() < p_drop:
        out = drop_one(out, r)
    return out
