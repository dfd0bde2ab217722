"""What a text loses on its way into an encoder, and the one warning per encode call that says so.

Every encoder describes each distinct text it encodes with a :class:`TextReport`
(its untruncated token count, and the words or characters it cannot represent);
:func:`warn_text_problems` turns the reports of one call into at most one
:class:`TextWarning` about truncation and one about unrepresentable text, with
counts over the distinct texts and a few examples, instead of one line per text.

Nothing here touches process-wide state: the warnings go through
:func:`warnings.warn`, and whoever runs the program (the CLI, a notebook, a
test) decides with the warning filters whether to show them.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# How many offending words/characters a warning quotes, and how long each may be.
_MAX_EXAMPLES = 5
_MAX_EXAMPLE_CHARS = 24

# Characters whose loss carries no meaning, so losing them is never reported:
# control characters (Cc: NUL, escape codes from spreadsheets), invisible
# formatting (Cf: zero-width space/joiner, soft hyphen, byte-order mark) and
# combining marks (Mn: the accents an uncased BERT strips, "é" -> "e").
# Whitespace is never a token either.
HARMLESS_CATEGORIES = frozenset({"Cc", "Cf", "Mn"})


class TextWarning(UserWarning):
    """A text lost information on its way into a text encoder.

    Emitted (with :func:`warnings.warn`) at most once per kind and encode call when
    texts are longer than ``text.max_len`` and were truncated, or hold words or
    characters the encoder cannot represent. A program that silences library
    warnings can keep these with
    ``warnings.filterwarnings("default", category=TextWarning)``.
    """


@dataclass(frozen=True)
class TextReport:
    """What encoding one text loses.

    Attributes:
        n_tokens: the text's token count before truncation, counted the way the
            encoder counts against ``max_len`` (frozen encoders include [CLS]/[SEP]).
        unrepresentable: the words or characters the encoder cannot represent,
            distinct, in order of appearance (empty when nothing is lost).
    """

    n_tokens: int
    unrepresentable: tuple[str, ...] = ()


def distinct(items: Iterable[str]) -> tuple[str, ...]:
    """``items`` without repeats, in first-seen order."""
    return tuple(dict.fromkeys(items))


def is_harmless(char: str) -> bool:
    """Whether losing ``char`` loses nothing a reader sees (space, control, format, accent)."""
    return char.isspace() or unicodedata.category(char) in HARMLESS_CATEGORIES


def script(char: str) -> str:
    """The writing system of a letter or digit, from its Unicode name: ``"LATIN"`` for
    "a" and "é", ``"CJK"`` for "肺", ``"CYRILLIC"``, ``"DIGIT"`` for "3", ...; the
    category (``"Lo"``) for a character without a name."""
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else unicodedata.category(char)


def _quote(example: str) -> str:
    if len(example) > _MAX_EXAMPLE_CHARS:
        example = example[: _MAX_EXAMPLE_CHARS - 1] + "…"
    return repr(example)  # repr shows invisible or private-use characters as escapes


def truncation_message(
    spec: str,
    reports: Sequence[TextReport],
    max_len: int,
    *,
    counted: str,
    max_positions: int | None = None,
) -> str | None:
    """The truncation warning for the reports of one call, or ``None`` when nothing was cut."""
    lengths = [r.n_tokens for r in reports]
    n_cut = sum(n > max_len for n in lengths)
    if not n_cut:
        return None
    need = max(lengths)
    msg = (
        f"text encoder {spec!r}: {n_cut} of {len(lengths)} texts are longer than "
        f"text.max_len={max_len} tokens and were truncated; text.max_len={need} would hold "
        f"them all ({counted})"
    )
    if max_positions is not None and need > max_positions:
        msg += (
            f", but the model has only {max_positions} positions: shorten the texts, "
            f"or raise text.max_len to at most {max_positions}"
        )
    return msg


def unrepresentable_message(spec: str, reports: Sequence[TextReport], *, what: str) -> str | None:
    """The unrepresentable-text warning for the reports of one call, or ``None``."""
    hit = [r for r in reports if r.unrepresentable]
    if not hit:
        return None
    examples = distinct(e for r in hit for e in r.unrepresentable)
    shown = ", ".join(_quote(e) for e in examples[:_MAX_EXAMPLES])
    more = f" and {len(examples) - _MAX_EXAMPLES} more" if len(examples) > _MAX_EXAMPLES else ""
    return (
        f"text encoder {spec!r}: {len(hit)} of {len(reports)} texts contain {what}: {shown}{more}"
    )


def warn_text_problems(
    spec: str,
    reports: Sequence[TextReport],
    max_len: int,
    *,
    counted: str,
    unrepresentable: str,
    truncates: bool = True,
    max_positions: int | None = None,
    stacklevel: int = 2,
) -> None:
    """Warn (:class:`TextWarning`) about the texts of one encode call: at most one
    warning for truncation (when ``truncates``) and one for unrepresentable text.

    Args:
        spec: the encoder's spec, named in the message.
        reports: one report per distinct text of the call.
        max_len: the encoder's L.
        counted: how tokens are counted, e.g. ``"[CLS] and [SEP] count as tokens"``.
        unrepresentable: what the second warning says the texts contain.
        truncates: whether this call truncates at all (tf-idf vectors do not).
        max_positions: the model's position limit, if any.
        stacklevel: passed on to :func:`warnings.warn` (plus one for this function).
    """
    messages = [unrepresentable_message(spec, reports, what=unrepresentable)]
    if truncates:
        messages.insert(
            0,
            truncation_message(
                spec, reports, max_len, counted=counted, max_positions=max_positions
            ),
        )
    for msg in messages:
        if msg is not None:
            warnings.warn(msg, TextWarning, stacklevel=stacklevel + 1)
