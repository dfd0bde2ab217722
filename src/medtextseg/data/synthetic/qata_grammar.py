"""The QaTa-COV19 text grammar (LViT annotations): zones, layouts, sentences, noise.

A QaTa description names where a chest X-ray's lesions are::

    "<Bilateral|Unilateral> pulmonary infection, <one|two|three|four> infected area(s),
     <side phrase>[ and <side phrase>]."

A *side phrase* is position words from ``all, upper, middle, lower`` (in that order,
combined: ``"middle lower"``, ``"upper middle lower"``) followed by ``"left lung"`` or
``"right lung"``. Left and right are from the VIEWER's perspective: the "left lung" is
the one on the image's left half (the patient's right lung).

The lung-CT generator (:mod:`medtextseg.data.synthetic.lung_ct`) writes its descriptions
with this grammar too, as MosMedData+ does; on an axial slice the levels are thirds of
each lung along the image's vertical axis (anterior = "upper").

What the 2,113 real test-set descriptions show (``qata_test_descriptions.csv`` in the
project's shared data folder; analysed once, the tables below are the result, and nothing
here reads that file at runtime):

* The count word is the number of *contiguous runs* of zones over both lungs, not the
  number of lungs: ``"upper lower left lung"`` skips the middle zone and so is two areas
  ("three infected areas, upper lower left lung and lower right lung"), while ``"middle
  lower left lung"`` is one area. 1,833 of the 1,895 grammatical rows follow this rule
  exactly; the rest are noise (see :data:`QATA_NOISE_KIND_COUNTS`).
* ``"all"`` stands alone (never combined with other position words) and means the
  opacity covers the whole lung field: one area. ``"upper middle lower"`` names the same
  three zones but is much rarer (33 rows against 653+ for "all"); we render it as one
  contiguous lesion spanning the three zones without filling the lung.
* "Bilateral" iff both lungs are named.

A :class:`Layout` is the clean content of a description; :func:`describe` and
:func:`parse_description` convert between the two exactly (round trip for every layout).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, combinations

import numpy as np

# Viewer's perspective: "left" is the image's left half.
LUNGS: tuple[str, ...] = ("left", "right")
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")
ALL_WORD = "all"
POSITION_WORDS: tuple[str, ...] = (ALL_WORD, *LEVELS)
ZONES: tuple[tuple[str, str], ...] = tuple((lung, level) for lung in LUNGS for level in LEVELS)
"""The six zones as ``(lung, level)``; their index in this tuple + 1 is the zone id that
:func:`medtextseg.data.synthetic.chest_xray.render_chest_xray` and
:func:`medtextseg.data.synthetic.lung_ct.render_lung_ct` write in their zone maps."""

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_AREAS = len(COUNT_WORDS)

# Clean layouts of the 2,113 real QaTa test descriptions, as (left-lung position words,
# right-lung position words, rows); "" = that lung is not named. Derived from
# ../shared/data/qata_text/qata_test_descriptions.csv after undoing the noise kinds of
# QATA_NOISE_KIND_COUNTS (typos fixed, position words put in order, the layout taken from
# the side phrases when the laterality or count word contradicts them). 2,095 rows; the
# other 18 name a lung without position words ("all left lung and right lung") or use a
# side word as a position word ("right left lung") and cannot be recovered.
QATA_LAYOUT_COUNTS: tuple[tuple[str, str, int], ...] = (
    ("all", "all", 653),
    ("lower", "lower", 270),
    ("", "lower", 135),
    ("lower", "", 82),
    ("middle lower", "middle lower", 71),
    ("middle", "", 67),
    ("all", "lower", 60),
    ("middle lower", "lower", 47),
    ("middle", "middle", 43),
    ("lower", "middle lower", 38),
    ("middle", "lower", 37),
    ("all", "middle lower", 34),
    ("upper middle", "upper middle", 32),
    ("upper", "", 27),
    ("middle lower", "", 25),
    ("middle", "middle lower", 25),
    ("", "middle", 25),
    ("all", "upper middle", 23),
    ("upper middle", "all", 23),
    ("all", "", 21),
    ("upper lower", "lower", 20),
    ("", "middle lower", 18),
    ("lower", "all", 17),
    ("lower", "middle", 17),
    ("upper", "lower", 15),
    ("upper middle", "lower", 14),
    ("all", "upper lower", 14),
    ("middle lower", "all", 12),
    ("middle", "all", 12),
    ("all", "upper", 12),
    ("all", "upper middle lower", 12),
    ("upper lower", "all", 11),
    ("upper middle", "", 9),
    ("middle lower", "upper middle lower", 9),
    ("", "upper", 9),
    ("middle lower", "middle", 9),
    ("upper", "upper", 8),
    ("upper", "upper middle", 8),
    ("upper lower", "upper lower", 8),
    ("upper middle", "middle lower", 7),
    ("upper middle", "middle", 7),
    ("upper middle lower", "lower", 7),
    ("upper", "all", 6),
    ("", "all", 6),
    ("", "upper lower", 6),
    ("upper middle lower", "all", 6),
    ("upper middle lower", "upper middle lower", 5),
    ("upper middle lower", "middle lower", 5),
    ("middle", "upper lower", 5),
    ("middle", "upper middle", 5),
    ("upper middle", "upper", 5),
    ("lower", "upper lower", 5),
    ("lower", "upper middle lower", 5),
    ("upper", "upper middle lower", 4),
    ("all", "middle", 4),
    ("upper lower", "", 4),
    ("upper lower", "upper middle", 3),
    ("lower", "upper middle", 3),
    ("middle lower", "upper middle", 3),
    ("upper", "middle lower", 3),
    ("middle lower", "upper lower", 3),
    ("upper", "middle", 3),
    ("lower", "upper", 2),
    ("upper lower", "middle lower", 2),
    ("middle lower", "upper", 2),
    ("upper middle", "upper middle lower", 1),
    ("upper middle lower", "upper lower", 1),
    ("upper lower", "upper middle lower", 1),
    ("middle", "upper", 1),
    ("upper lower", "upper", 1),
    ("", "upper middle lower", 1),
    ("upper middle lower", "middle", 1),
)

# Annotation-noise kinds in the same 2,113 real rows (occurrences; 218 rows = 10.3% have at
# least one, 23 of them two). With a looser definition that ignores count-word and
# word-order slips it is ~7%, the figure quoted in the data README. Examples:
#   count         wrong count word: "three infected areas, middle lower left lung and
#                 middle lower right lung"
#   plural        "one infected areas"
#   typo          "mmiddle", "leff", "midle", "uppper", "rught", "eft", "right left lung"
#   spacing       "infected areas,lower", "infection ,one", "areas,  middle", "lowerright"
#   order         "lower middle left lung", "middle upper left lung"
#   laterality    "Unilateral ..., all left lung and all right lung" (and the reverse)
#   drop_position "all left lung and right lung", "upper lower lung"
#   drop_side     "Bilateral pulmonary infection, two infected areas, lower left lung."
#   period        final period missing, or trailing junk after it
QATA_NOISE_KIND_COUNTS: dict[str, int] = {
    "count": 64,
    "plural": 57,
    "typo": 32,
    "spacing": 23,
    "order": 23,
    "laterality": 16,
    "drop_position": 14,
    "drop_side": 9,
    "period": 3,
}
QATA_NOISY_ROW_FRACTION = 218 / 2113
QATA_ROWS = 2113

_SENTENCE_RE = re.compile(
    r"(Bilateral|Unilateral) pulmonary infection, (one|two|three|four) infected (areas?), "
    r"(.+)\."
)


@dataclass(frozen=True)
class LungFinding:
    """Where one lung is affected.

    Attributes:
        levels: affected levels, a non-empty subset of :data:`LEVELS` in that order.
        diffuse: ``True`` for ``"all"`` (opacity over the whole lung field, one area);
            then ``levels`` is all three levels.
    """

    levels: tuple[str, ...]
    diffuse: bool = False

    def __post_init__(self) -> None:
        if not self.levels or any(lv not in LEVELS for lv in self.levels):
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {self.levels!r}")
        if tuple(sorted(set(self.levels), key=LEVELS.index)) != self.levels:
            raise ValueError(f"levels must be unique and ordered as {LEVELS}, got {self.levels!r}")
        if self.diffuse and self.levels != LEVELS:
            raise ValueError("a diffuse ('all') finding covers all three levels")

    @classmethod
    def from_words(cls, words: str | Sequence[str]) -> LungFinding:
        """``"middle lower"`` / ``["all"]`` -> finding (words must already be canonical)."""
        ws = tuple(words.split()) if isinstance(words, str) else tuple(words)
        if ws == (ALL_WORD,):
            return cls(LEVELS, diffuse=True)
        return cls(ws)

    @property
    def words(self) -> str:
        """The position words of the side phrase (``"all"``, ``"upper lower"``...)."""
        return ALL_WORD if self.diffuse else " ".join(self.levels)

    def runs(self) -> list[tuple[str, ...]]:
        """Contiguous runs of levels; each run is one infected area.

        ``upper lower`` -> ``[("upper",), ("lower",)]``; ``all`` -> one run of three.
        """
        out: list[list[str]] = []
        prev = -2
        for lv in self.levels:
            i = LEVELS.index(lv)
            if i == prev + 1 and out:
                out[-1].append(lv)
            else:
                out.append([lv])
            prev = i
        return [tuple(r) for r in out]


@dataclass(frozen=True)
class Layout:
    """The clean content of one QaTa description: which zones of which lung are infected.

    Attributes:
        left: finding in the viewer's left lung (image left half), or ``None``.
        right: finding in the viewer's right lung (image right half), or ``None``.
    """

    left: LungFinding | None = None
    right: LungFinding | None = None

    def __post_init__(self) -> None:
        if self.left is None and self.right is None:
            raise ValueError("a layout names at least one lung")

    def findings(self) -> dict[str, LungFinding]:
        """``{lung: finding}`` for the named lungs, left first."""
        return {k: v for k, v in (("left", self.left), ("right", self.right)) if v is not None}

    @property
    def bilateral(self) -> bool:
        return self.left is not None and self.right is not None

    @property
    def n_areas(self) -> int:
        """Number of infected areas = contiguous runs over both lungs (1..4)."""
        return sum(len(f.runs()) for f in self.findings().values())

    def zones(self) -> frozenset[tuple[str, str]]:
        """The named zones as ``(lung, level)`` pairs."""
        return frozenset((lung, lv) for lung, f in self.findings().items() for lv in f.levels)

    def clean_zones(self) -> list[tuple[str, str]]:
        """The zones the text calls clean (where a renderer may put distractors), in
        :data:`ZONES` order, so a seeded choice among them is the same in every renderer."""
        named = self.zones()
        return [z for z in ZONES if z not in named]


def level_band(bounds: Sequence[tuple[float, float]], levels: Sequence[str], margin: float) -> tuple[float, float]:
    """``(lo, hi)`` of the band that covers ``levels`` (a contiguous run of :data:`LEVELS`),
    given each level's ``(top, bottom)`` in ``bounds``, widened by ``margin`` (narrowed
    where negative) and open (±inf) where it reaches the lung's first or last level, so a
    lesion named there may fill the lung's edge. The renderers' shared rule for where a
    named finding may lie (``margin > 0``) and a distractor may not (``margin < 0``)."""
    lo = -np.inf if levels[0] == LEVELS[0] else bounds[LEVELS.index(levels[0])][0] - margin
    hi = np.inf if levels[-1] == LEVELS[-1] else bounds[LEVELS.index(levels[-1])][1] + margin
    return lo, hi


def side_phrase(lung: str, finding: LungFinding) -> str:
    """``("left", middle+lower)`` -> ``"middle lower left lung"``."""
    if lung not in LUNGS:
        raise ValueError(f"lung must be one of {LUNGS}, got {lung!r}")
    return f"{finding.words} {lung} lung"


def describe(layout: Layout) -> str:
    """The clean QaTa sentence of a layout.

    >>> describe(Layout(LungFinding(("upper", "lower")), LungFinding(("lower",))))
    'Bilateral pulmonary infection, three infected areas, upper lower left lung and lower right lung.'
    """
    n = layout.n_areas
    lat = "Bilateral" if layout.bilateral else "Unilateral"
    area = "area" if n == 1 else "areas"
    sides = " and ".join(side_phrase(lung, f) for lung, f in layout.findings().items())
    return f"{lat} pulmonary infection, {COUNT_WORDS[n - 1]} infected {area}, {sides}."


def parse_description(text: str) -> Layout:
    """Strict inverse of :func:`describe`: clean QaTa sentence -> layout.

    Raises:
        ValueError: the sentence is not in the clean grammar or contradicts itself
            (laterality or count word against the side phrases). Noisy real rows fail
            here on purpose; robust reading is the text encoders' job.
    """
    m = _SENTENCE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a QaTa description: {text!r}")
    lat, count, area, sides = m.groups()
    found: dict[str, LungFinding] = {}
    for phrase in sides.split(" and "):
        words = phrase.split(" ")  # not split(): doubled spaces are noise
        if len(words) < 3 or words[-1] != "lung" or words[-2] not in LUNGS:
            raise ValueError(f"bad side phrase {phrase!r} in {text!r}")
        lung, pos = words[-2], words[:-2]
        if lung in found or (found and lung == "left"):
            raise ValueError(f"lungs must be named once, left first: {text!r}")
        try:
            finding = LungFinding.from_words(pos)
        except ValueError as e:
            raise ValueError(f"bad position words {' '.join(pos)!r} in {text!r}: {e}") from None
        found[lung] = finding
    layout = Layout(found.get("left"), found.get("right"))
    if (lat == "Bilateral") != layout.bilateral:
        raise ValueError(f"laterality word contradicts the side phrases: {text!r}")
    n = COUNT_WORDS.index(count) + 1
    if n != layout.n_areas or (area == "area") != (n == 1):
        raise ValueError(f"count {count!r} {area!r} but {layout.n_areas} area(s) named: {text!r}")
    return layout


def all_layouts() -> list[Layout]:
    """Every layout the grammar can express (each lung: absent, ``all``, or one of the 7
    level subsets; at least one lung) -- 80 layouts, each at most four areas."""
    options: list[LungFinding | None] = [None, LungFinding(LEVELS, diffuse=True)]
    for k in range(1, len(LEVELS) + 1):
        options += [LungFinding(c) for c in combinations(LEVELS, k)]
    return [Layout(a, b) for a in options for b in options if a is not None or b is not None]


@lru_cache(maxsize=1)
def _layout_table() -> tuple[tuple[Layout, ...], tuple[float, ...]]:
    # immutable, so caching it is not shared mutable state; sampling stays cheap
    layouts = tuple(
        Layout(
            LungFinding.from_words(a) if a else None,
            LungFinding.from_words(b) if b else None,
        )
        for a, b, _ in QATA_LAYOUT_COUNTS
    )
    counts = [c for _, _, c in QATA_LAYOUT_COUNTS]
    return layouts, tuple(c / sum(counts) for c in counts)


def qata_layout_table() -> tuple[list[Layout], np.ndarray]:
    """The real layouts and their probabilities (from :data:`QATA_LAYOUT_COUNTS`).

    Returns:
        ``(layouts, p)`` with ``p`` float64 of shape ``(len(layouts),)``, summing to 1.
    """
    layouts, p = _layout_table()
    return list(layouts), np.array(p, dtype=np.float64)


def sample_layout(rng: np.random.Generator, unseen_weight: float = 0.0) -> Layout:
    """Draw one layout with the real QaTa frequencies (Bilateral ~79%, "all left lung and
    all right lung" ~31%, one/two/three/four areas ~20/76/3/0.4%).

    Args:
        rng: the random source (exactly one ``rng.random()`` draw, so streams stay stable).
        unseen_weight: total probability moved to the layouts of :func:`all_layouts` that
            the real data never shows (8 of 80, uniformly); 0 keeps the real table.
    """
    layouts, p = _layout_table()
    if unseen_weight > 0:
        seen = set(layouts)
        extra = [lay for lay in all_layouts() if lay not in seen]
        layouts = (*layouts, *extra)
        p = tuple(x * (1 - unseen_weight) for x in p) + (unseen_weight / len(extra),) * len(extra)
    i = bisect.bisect_right(list(accumulate(p)), rng.random() * sum(p))
    return layouts[min(i, len(layouts) - 1)]


# ---------------------------------------------------------------------------------------
# Annotation noise
# ---------------------------------------------------------------------------------------

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _typo_word(word: str, rng: np.random.Generator) -> str:
    """One character slip, as seen in the real rows: doubled ("mmiddle"), dropped
    ("midle"), substituted ("leff") or inserted ("middlel") letter."""
    op = int(rng.integers(4))
    i = int(rng.integers(len(word)))
    if op == 0:
        return word[: i + 1] + word[i] + word[i + 1 :]
    if op == 1 and len(word) > 2:
        return word[:i] + word[i + 1 :]
    if op == 2:
        c = _ALPHABET[int(rng.integers(len(_ALPHABET)))]
        if c == word[i]:
            c = _ALPHABET[(_ALPHABET.index(c) + 1) % len(_ALPHABET)]
        return word[:i] + c + word[i + 1 :]
    c = _ALPHABET[int(rng.integers(len(_ALPHABET)))]
    return word[: i + 1] + c + word[i + 1 :]


def _join(lat: str, count: str, area: str, sides: Sequence[str], end: str = ".") -> str:
    return f"{lat} pulmonary infection, {count} infected {area}, {' and '.join(sides)}{end}"


def _noise_candidates(layout: Layout) -> list[str]:
    kinds = ["count", "typo", "spacing", "laterality", "drop_position", "period"]
    if layout.n_areas == 1:
        kinds.append("plural")
    if any(len(f.levels) > 1 and not f.diffuse for f in layout.findings().values()):
        kinds.append("order")
    if layout.bilateral:
        kinds.append("drop_side")
    return kinds


def add_annotation_noise(text: str, rng: np.random.Generator, kind: str | None = None) -> str:
    """Corrupt a clean description the way the real annotators did (always changes it).

    The kind is drawn with the real frequencies (:data:`QATA_NOISE_KIND_COUNTS`) among the
    kinds that apply to this sentence ("one infected areas" needs one area, word order
    needs two position words...). The mask of the image is unchanged: like the real data,
    the text is what is wrong.

    Args:
        text: a clean sentence from :func:`describe`. A sentence that does not parse gets
            a typo (the one kind that needs no structure).
        rng: the random source.
        kind: force one kind of :data:`QATA_NOISE_KIND_COUNTS` (for tests).
    """
    try:
        layout = parse_description(text)
    except ValueError:
        words = text.split(" ")
        j = int(rng.integers(len(words)))
        words[j] = _typo_word(words[j], rng) if words[j] else "x"
        return " ".join(words)
    candidates = _noise_candidates(layout)
    if kind is None:
        w = np.array([QATA_NOISE_KIND_COUNTS[k] for k in candidates], dtype=np.float64)
        kind = candidates[int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))]
    elif kind not in QATA_NOISE_KIND_COUNTS:
        raise ValueError(
            f"unknown noise kind {kind!r}; expected one of {list(QATA_NOISE_KIND_COUNTS)}"
        )
    elif kind not in candidates:
        raise ValueError(f"noise kind {kind!r} does not apply to {text!r}")

    n = layout.n_areas
    lat = "Bilateral" if layout.bilateral else "Unilateral"
    count = COUNT_WORDS[n - 1]
    area = "area" if n == 1 else "areas"
    found = layout.findings()
    sides = [side_phrase(lung, f) for lung, f in found.items()]
    j = int(rng.integers(len(sides)))

    if kind == "count":
        # the real slips are off by one ("three" for two areas)
        choices = [c for c in (n - 1, n + 1) if 1 <= c <= MAX_AREAS]
        m = choices[int(rng.integers(len(choices)))]
        return _join(lat, COUNT_WORDS[m - 1], "area" if m == 1 else "areas", sides)
    if kind == "plural":
        return _join(lat, count, "areas", sides)
    if kind == "typo":
        lung, f = list(found.items())[j]
        words = [*f.words.split(), lung]
        k = int(rng.integers(len(words)))
        words[k] = _typo_word(words[k], rng)
        sides[j] = " ".join(words) + " lung"
        return _join(lat, count, area, sides)
    if kind == "spacing":
        s = _join(lat, count, area, sides)
        op = int(rng.integers(4))
        if op == 0:  # "areas,lower"
            return s.replace("areas, ", "areas,").replace("area, ", "area,")
        if op == 1:  # "infection ,one"
            return s.replace("infection, ", "infection ,")
        if op == 2:  # "areas,  middle"
            return s.replace("area, ", "area,  ").replace("areas, ", "areas,  ")
        spaces = [i for i, c in enumerate(s) if c == " " and s[i - 1] != ","]
        i = spaces[int(rng.integers(len(spaces)))]  # "lowerright", "oneinfected"
        return s[:i] + s[i + 1 :]
    if kind == "order":
        multi = [i for i, f in enumerate(found.values()) if len(f.levels) > 1 and not f.diffuse]
        j = multi[int(rng.integers(len(multi)))]
        lung, f = list(found.items())[j]
        words = list(f.levels)
        a = int(rng.integers(len(words) - 1))
        words[a], words[a + 1] = words[a + 1], words[a]
        sides[j] = " ".join(words) + f" {lung} lung"
        return _join(lat, count, area, sides)
    if kind == "laterality":
        return _join("Unilateral" if layout.bilateral else "Bilateral", count, area, sides)
    if kind == "drop_position":
        lung = list(found)[j]
        sides[j] = f"{lung} lung"
        return _join(lat, count, area, sides)
    if kind == "drop_side":
        return _join(lat, count, area, [sides[j]])
    # period: missing final period
    return _join(lat, count, area, sides, end="")
