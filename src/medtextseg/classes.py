"""Class names and the fixed colour palette of label maps (DESIGN.md §5-6).

One convention everywhere: ``data.num_classes`` = 1 is binary (one sigmoid channel,
classes "background" and "foreground"); K >= 2 is K classes with 0 = background
(softmax over K channels). Names come from ``data.classes`` (a preset or ``--set``),
else from the dataset's :data:`CLASSES_FILE` (one name per line, line i = class id i;
``medtextseg synth spine-mr`` writes one), else ``class 1`` ... ``class K-1``.

The palette is fixed (not drawn per run) so that a class has the same colour in
every overlay, report grid and legend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

CLASSES_FILE = "classes.txt"
BACKGROUND = "background"
# Foreground colours of class ids 1, 2, ... (matplotlib's tab20 then tab20b, as uint8):
# 40 distinguishable colours; beyond that they repeat.
_TAB = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229), (57, 59, 121), (82, 84, 163), (107, 110, 207), (156, 158, 222),
    (99, 121, 57), (140, 162, 82), (181, 207, 107), (206, 219, 156), (140, 109, 49), (189, 158, 57),
    (231, 186, 82), (231, 203, 148), (132, 60, 57), (173, 73, 74), (214, 97, 107), (231, 150, 156),
    (123, 65, 115), (165, 81, 148), (206, 109, 189), (222, 158, 214),
)  # fmt: skip
BINARY_COLOR = (255, 40, 40)
OVERLAY_ALPHA = 0.45


def palette(num_classes: int) -> np.ndarray:
    """``[max(2, K), 3]`` uint8 RGB of class ids 0..K-1; row 0 (background) is black.

    Binary (K = 1) gives two rows, the foreground red as in the binary overlays.
    """
    if num_classes <= 1:
        return np.array([(0, 0, 0), BINARY_COLOR], np.uint8)
    rows = [(0, 0, 0)] + [_TAB[(i - 1) % len(_TAB)] for i in range(1, num_classes)]
    return np.array(rows, np.uint8)


def default_names(num_classes: int) -> list[str]:
    """``["background", "foreground"]`` (binary) or ``["background", "class 1", ...]``."""
    if num_classes <= 1:
        return [BACKGROUND, "foreground"]
    return [BACKGROUND] + [f"class {i}" for i in range(1, num_classes)]


def check_class_names(names: Sequence[str], num_classes: int, where: str = "data.classes") -> list[str]:
    """``names`` as a list if they fit ``num_classes`` (K names, background first, distinct;
    binary: 2 names or none), else ``ValueError`` saying what to write."""
    names = [str(n) for n in names]
    want = 2 if num_classes <= 1 else num_classes
    if len(names) != want:
        raise ValueError(f"{where} has {len(names)} names but data.num_classes={num_classes} needs {want} "
                         f"(class ids 0..{want - 1}, background first): fix the list or data.num_classes")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where} names {twice[0]!r} twice; class names must be distinct")
    if any(not n.strip() for n in names):
        raise ValueError(f"{where} holds an empty name; give every class id a name")
    return names


def class_names(num_classes: int, names: Sequence[str] = ()) -> list[str]:
    """The names of class ids 0..K-1: ``names`` (checked) when given, else :func:`default_names`."""
    return check_class_names(names, num_classes) if names else default_names(num_classes)


def read_classes_file(root: Path | str) -> list[str] | None:
    """The names in ``root/classes.txt`` (one per line, blank lines ignored), or None if absent."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def roots_class_names(roots: Iterable[Path | str], num_classes: int) -> list[str] | None:
    """The class names that the dataset roots' :data:`CLASSES_FILE` give (a manifest's root
    is its folder), checked against ``num_classes``; None when no root has one.

    Raises:
        ValueError: two roots name their classes differently, or the names do not fit
            ``num_classes`` (the message names the file).
    """
    found: dict[str, list[str]] = {}
    for root in roots:
        root = Path(root)
        names = read_classes_file(root if root.is_dir() else root.parent)
        if names is not None:
            found[str(root if root.is_dir() else root.parent)] = names
    if not found:
        return None
    if len({tuple(n) for n in found.values()}) > 1:
        raise ValueError(f"the dataset roots name their classes differently ({', '.join(found)}); "
                         "make their classes.txt agree or set data.classes")
    where, names = next(iter(found.items()))
    return check_class_names(names, num_classes, where=f"{where}/{CLASSES_FILE}")


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[H, W]`` class ids (binary: {0, 1} or {0, 255}) -> ``[H, W, 3]`` uint8 palette colours."""
    pal = palette(num_classes)
    ids = (labels > 0).astype(np.intp) if num_classes <= 1 else np.clip(labels, 0, len(pal) - 1).astype(np.intp)
    return pal[ids]


def overlay_labels(image: np.ndarray, labels: np.ndarray, num_classes: int,
                   alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``[H, W, 3]`` uint8 image + ``[H, W]`` labels -> ``[H, W, 3]`` uint8, every foreground
    pixel blended with its class colour (background left as is)."""
    out = image.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colorize(labels, num_classes)[fg].astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def legend_png(names: Sequence[str], num_classes: int) -> bytes:
    """PNG bytes of a legend: one palette swatch, id and name per class id 1..K-1 (background
    is never tinted, so it has no swatch). ``names``: the K names of class ids 0..K-1.

    Drawn with matplotlib's object API on an Agg canvas, so no process-wide backend is set.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    pal = palette(num_classes)
    if len(names) < len(pal):
        raise ValueError(f"legend_png needs {len(pal)} names (class ids 0..{len(pal) - 1}), got {len(names)}")
    handles = [Patch(facecolor=pal[i] / 255.0, edgecolor="black", label=f"{i} {names[i]}")
               for i in range(1, len(pal))]
    fig = Figure(figsize=(2.4, 0.22 * len(handles) + 0.3), dpi=150)
    FigureCanvasAgg(fig)
    fig.legend(handles=handles, loc="center", frameon=False)
    buf = io.BytesIO()
    # A tight box: the figure's own size only bounds the legend; white, not transparent,
    # so the legend reads the same in any viewer.
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.05, facecolor="white")
    return buf.getvalue()


def in_class_order(seen: Iterable[str], names: Sequence[str] = ()) -> list[str]:
    """The distinct names of ``seen`` in class-id order: by their position in ``names`` (the
    names of class ids 0..K-1, when known), then any others in the order first seen.

    Per-split (or per-run) metrics list only the classes present there, each in id order;
    merging them without the names would put a class first seen in a later split last.
    """
    rank = {n: i for i, n in enumerate(names)}
    distinct = list(dict.fromkeys(seen))
    first = {n: len(rank) + i for i, n in enumerate(distinct)}
    return sorted(distinct, key=lambda n: rank.get(n, first[n]))
