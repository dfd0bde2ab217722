"""Names that look like one name misspelled, so that a reader reports one mistake once
("row 1203 names 'cse_96_1', the file is 'case_96_1.png'") instead of twice ("no row for
case_96_1.png" and "row 1203 matches no image").

The real MRSpineSeg text table has a dozen such keys (``cse_96_*`` for ``case_96_*``).
Numbered names are the trap: ``case_1_12`` and ``case_1_13`` are one edit apart and are two
files, so two names are a near pair only when they hold the same numbers in the same order
and the rest is within one edit.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_NUMBER = re.compile(r"\d+")
# Past this many comparisons in one group of names (a table keyed in another scheme
# altogether) the search stops: every name is then simply unmatched.
_MAX_COMPARISONS = 2_000_000


def misspelled(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` look like one name misspelled: different, the same numbers in
    the same order, and the rest (letter case ignored) within one insertion, deletion,
    substitution or swap of two neighbours."""
    a, b = a.lower(), b.lower()
    if a == b or _NUMBER.findall(a) != _NUMBER.findall(b):
        return False
    return _one_edit(_NUMBER.sub("#", a), _NUMBER.sub("#", b))


def _one_edit(x: str, y: str) -> bool:
    if len(x) > len(y):
        x, y = y, x
    if len(y) - len(x) > 1:
        return False
    if len(x) == len(y):
        diff = [i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                   and x[diff[0]] == y[diff[1]] and x[diff[1]] == y[diff[0]])
    i = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
    return x[i:] == y[i + 1:]


def near_pairs(names: Sequence[str], candidates: Sequence[str]) -> dict[str, str]:
    """``{name: candidate}`` for each name whose only near miss (:func:`misspelled`) among
    ``candidates`` has no other name near it: an unambiguous pair, nothing guessed."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for c in candidates:
        groups.setdefault(tuple(_NUMBER.findall(c.lower())), []).append(c)
    wanted = Counter(tuple(_NUMBER.findall(n.lower())) for n in names)
    found: dict[str, list[str]] = {}
    for n in names:
        key = tuple(_NUMBER.findall(n.lower()))
        group = groups.get(key, ())
        if len(group) * wanted[key] > _MAX_COMPARISONS:
            continue
        found[n] = [c for c in group if misspelled(n, c)]
    claimed = Counter(c for cs in found.values() for c in cs)
    return {n: cs[0] for n, cs in found.items() if len(cs) == 1 and claimed[cs[0]] == 1}


__all__ = ["misspelled", "near_pairs"]
