"""Write a dataset in the LViT layout, atomically and byte-for-byte reproducibly.

The layout (DESIGN.md section 5)::

    <root>/<Split>_Folder/img/<id>.png        image
    <root>/<Split>_Folder/labelcol/<id>.png   mask, same file name
    <root>/<Split>_Folder/<Split>_text.xlsx   columns Image, Description; Image = mask file name

Every synthetic generator writes through :class:`LViTLayoutWriter` so the LViT reader
loads them all. The writer builds the whole tree in a temporary folder next to the
destination and renames it into place only when everything is written, so an interrupted
run leaves no half dataset behind.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from medtextseg.data.sample import SPLITS

IMAGE_DIR = "img"
MASK_DIR = "labelcol"
TEXT_COLUMNS = ("Image", "Description")
# Fixed document/zip timestamps: openpyxl stamps "now" into the xlsx, which would make
# two runs with the same seed differ in their bytes.
_FIXED_TIME = datetime(2000, 1, 1)
_ZIP_TIME = (2000, 1, 1, 0, 0, 0)
_FIXED_W3CDTF = b"2000-01-01T00:00:00Z"
_CORE_PROPS = "docProps/core.xml"
_MODIFIED_RE = re.compile(rb"(<dcterms:modified[^>]*>)[^<]*(</dcterms:modified>)")


def split_folder(split: str) -> str:
    """``"Train"`` -> ``"Train_Folder"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{split}_Folder"


def text_file_name(split: str) -> str:
    """``"Train"`` -> ``"Train_text.xlsx"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{split}_text.xlsx"


def assign_splits(n: int, fractions: Sequence[float], rng: np.random.Generator) -> list[str]:
    """Seeded assignment of ``n`` items to :data:`SPLITS`.

    Args:
        n: number of items.
        fractions: one non-negative fraction per split (Train, Val, Test), summing to 1.
        rng: the random source (one permutation).

    Returns:
        A list of ``n`` split names; split sizes are the rounded fractions, every split with
        a positive fraction getting at least one item when ``n`` allows.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (len(SPLITS),) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(
            f"split_fractions must be {len(SPLITS)} non-negative numbers summing to 1 "
            f"(for {SPLITS}), got {tuple(fractions)}"
        )
    counts = np.floor(f * n).astype(int)
    # largest remainders first, so the counts add up to n
    for i in np.argsort(-(f * n - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((counts == 0) & (f > 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    labels = np.repeat(np.arange(len(SPLITS)), counts)
    return [SPLITS[k] for k in labels[rng.permutation(n)]]


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a ``(H, W)`` uint8 array as an 8-bit grayscale PNG (no timestamps: PIL's
    PNG bytes depend only on the pixels)."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 array, got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def xlsx_bytes(rows: Sequence[tuple[str, str]]) -> bytes:
    """An ``Image, Description`` workbook as bytes that depend only on ``rows``."""
    from openpyxl import Workbook  # heavy import, only needed when writing

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(TEXT_COLUMNS))
    for image, text in rows:
        ws.append([image, text])
    wb.properties.created = _FIXED_TIME
    wb.properties.modified = _FIXED_TIME
    raw = io.BytesIO()
    wb.save(raw)
    # re-pack with fixed entry times (zip entries carry the wall-clock time otherwise)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=_ZIP_TIME)
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = info.external_attr
            data = src.read(info.filename)
            if info.filename == _CORE_PROPS:
                # openpyxl stamps the save time into dcterms:modified whatever we set
                data = _MODIFIED_RE.sub(rb"\g<1>" + _FIXED_W3CDTF + rb"\g<2>", data)
            dst.writestr(fixed, data)
    return out.getvalue()


class LViTLayoutWriter:
    """Builds an LViT-layout dataset in a temp folder; :meth:`commit` moves it into place.

    Use as a context manager; leaving the block with an exception removes the temp folder
    and leaves ``out`` untouched::

        with LViTLayoutWriter(out, overwrite=False) as w:
            w.add("Train", "synth_00000.png", image, mask, "Unilateral ...")
        # committed on normal exit

    Args:
        out: the dataset root to create.
        overwrite: replace an existing non-empty ``out``. Without it a non-empty ``out``
            raises :class:`FileExistsError` before anything is written.
    """

    def __init__(self, out: Path | str, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(
                f"{self.out} exists and is not a folder; choose another output path"
            )
        if self.out.is_dir() and any(self.out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{self.out} exists and is not empty; choose another output folder or pass "
                f"overwrite=True to replace it"
            )
        self._rows: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
        self._tmp: Path | None = None

    def __enter__(self) -> LViTLayoutWriter:  # noqa: PYI034 (Self needs Python 3.11)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        )
        self._tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should not be
        for split in SPLITS:
            for sub in (IMAGE_DIR, MASK_DIR):
                (self._tmp / split_folder(split) / sub).mkdir(parents=True)
        return self

    def add(self, split: str, name: str, image: np.ndarray, mask: np.ndarray, text: str) -> None:
        """Write one item.

        Args:
            split: one of :data:`SPLITS`.
            name: file name of both the image and the mask (e.g. ``"synth_00012.png"``).
            image: ``(H, W)`` uint8 grayscale image.
            mask: ``(H, W)`` uint8 mask: {0, 255} for a binary dataset, or class ids
                ``0..K-1`` for a multi-class one (written as they are, not rescaled).
            text: the description, keyed by ``name`` in the split's xlsx.
        """
        if self._tmp is None:
            raise RuntimeError("use LViTLayoutWriter as a context manager")
        if image.shape != mask.shape:
            raise ValueError(
                f"image {image.shape} and mask {mask.shape} differ in shape for {name}"
            )
        self.add_encoded(split, name, png_bytes(image), png_bytes(mask), text)

    def add_encoded(
        self, split: str, name: str, image_png: bytes, mask_png: bytes | None, text: str
    ) -> None:
        """Like :meth:`add` with already encoded PNG files (lets workers encode).
        ``mask_png=None`` writes no mask: an unlabeled image (Train only)."""
        if self._tmp is None:
            raise RuntimeError("use LViTLayoutWriter as a context manager")
        if not text or not text.strip():
            raise ValueError(f"empty description for {name}")
        if mask_png is None and split != "Train":
            raise ValueError(f"{name}: only Train images may come without a mask ({split} is evaluated)")
        folder = self._tmp / split_folder(split)
        (folder / IMAGE_DIR / name).write_bytes(image_png)
        if mask_png is not None:
            (folder / MASK_DIR / name).write_bytes(mask_png)
        self._rows[split].append((name, text))

    @property
    def staging(self) -> Path:
        """The temporary root being built: extra files written here are committed with it."""
        if self._tmp is None:
            raise RuntimeError("use LViTLayoutWriter as a context manager")
        return self._tmp

    def commit(self) -> Path:
        """Write the xlsx files and move the finished tree to ``out``."""
        if self._tmp is None:
            raise RuntimeError("nothing to commit")
        for split in SPLITS:
            rows = sorted(self._rows[split])
            path = self._tmp / split_folder(split) / text_file_name(split)
            path.write_bytes(xlsx_bytes(rows))
        if self.out.exists():
            if any(self.out.iterdir()) and not self.overwrite:  # appeared while we worked
                raise FileExistsError(f"{self.out} became non-empty while the dataset was built")
            # swap by renames: `out` is never a half-deleted or half-written tree
            old = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent)
            )
            os.replace(self.out, old / "d")
            os.replace(self._tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.out)
        self._tmp = None
        return self.out

    def abort(self) -> None:
        """Remove the temp folder (nothing reaches ``out``)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise
