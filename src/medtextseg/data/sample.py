"""The one record every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("Train", "Val", "Test")


@dataclass(frozen=True)
class Sample:
    """One image with its optional mask and its clinical text.

    Attributes:
        id: unique within a split; the image file stem (e.g. ``"covid_1"``).
        image_path: the image file (PNG, JPEG or TIFF; gray or RGB).
        mask_path: the mask file, or ``None`` for an unlabeled image.
            Binary masks hold {0, 255} or {0, 1}; multi-class masks hold class ids.
        text: the clinical description of the image (never empty after validation).
        split: one of :data:`SPLITS`.
        domain: dataset / modality name (used by multi-dataset methods such as TextMoE).
    """

    id: str
    image_path: Path
    mask_path: Path | None
    text: str
    split: str
    domain: str = "default"

    @property
    def labeled(self) -> bool:
        return self.mask_path is not None
