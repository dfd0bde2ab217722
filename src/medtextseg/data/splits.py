"""Labeled / unlabeled splits of the training set (LViT appendix E: "the train set
is divided into labeled and unlabeled train sets in a specific ratio").

A split depends only on the sorted ids of the labeled Train images, the ratio
and the seed, never on the method or preset. Every method run with the same
seed and ratio therefore trains on the same labeled images (a U-Net at 25 % and
LViT-T + EPI at 25 % see the same masks), and the split is written to
``<run>/split.json`` so a resumed run and a reader of the results can check it.
Unlabeled images keep their text: the semi-supervised methods use it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medtextseg.data.sample import Sample
from medtextseg.utils import atomic_write_json

SPLIT_FILE = "split.json"


class SplitError(ValueError):
    """A labeled ratio or id list that cannot be applied to the dataset."""


@dataclass(frozen=True)
class LabeledSplit:
    """Which Train ids keep their mask. ``ratio`` is ``None`` for an explicit id list."""

    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]
    seed: int
    ratio: float | None

    def to_dict(self) -> dict:
        return {"seed": self.seed, "ratio": self.ratio, "n_labeled": len(self.labeled),
                "n_unlabeled": len(self.unlabeled), "labeled": list(self.labeled), "unlabeled": list(self.unlabeled)}

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> LabeledSplit:
        d = json.loads(Path(path).read_text())
        return cls(tuple(d["labeled"]), tuple(d["unlabeled"]), int(d["seed"]), d["ratio"])


def labeled_train_ids(samples: Sequence[Sample]) -> list[str]:
    return sorted(s.id for s in samples if s.split == "Train" and s.labeled)


def split_by_ratio(samples: Sequence[Sample], ratio: float, seed: int) -> LabeledSplit:
    """Keep the masks of ``round(ratio · N)`` (at least one) of the N labeled Train images,
    per domain: a composite dataset keeps ``round(ratio · N_d)`` of each domain's N_d.

    The choice is the first k of a seeded shuffle of the sorted ids, so it is
    independent of file order, of the reader and of the method, and nested across
    ratios (the 25 % labeled images are among the 50 % ones). Each domain is shuffled
    on its own, so a domain keeps the same labeled images whether it is trained alone or
    in a composite dataset (a per-dataset baseline and a joint model see the same masks),
    and one domain gives the split that existed before composite data.
    """
    check_ratio(ratio)
    ids = labeled_train_ids(samples)
    by_domain: dict[str, list[str]] = {}
    for s in samples:
        if s.split == "Train" and s.labeled:
            by_domain.setdefault(s.domain, []).append(s.id)
    labeled: set[str] = set()
    for domain, members in sorted(by_domain.items()):
        order = sorted(members)
        # One shuffle per seed, whatever the ratio: the labeled images of a smaller ratio
        # are a subset of those of a larger one, so ratios differ only in how many
        # labels they have, not in which images happened to be drawn.
        # The same stream for every domain: a domain's sorted ids (qualified or not, their
        # order is the same) get the shuffle they get when that domain is trained alone.
        random.Random(f"labeled-split/{seed}").shuffle(order)
        labeled.update(order[:max(1, round(ratio * len(order)))])
    return LabeledSplit(tuple(i for i in ids if i in labeled), tuple(i for i in ids if i not in labeled), seed, ratio)


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise SplitError(f"labeled ratio must be in (0, 1], got {ratio} (e.g. --labeled-ratio 0.25)")


def split_from_ids(samples: Sequence[Sample], labeled_ids: Sequence[str], seed: int, source: str = "") -> LabeledSplit:
    """Keep the masks of exactly ``labeled_ids``; every other labeled Train image becomes unlabeled."""
    ids = labeled_train_ids(samples)
    unknown = sorted(set(labeled_ids) - set(ids))
    if unknown:
        raise SplitError(f"{source or 'labeled ids'}: {len(unknown)} id(s) are not labeled Train images of the "
                         f"dataset, e.g. {', '.join(unknown[:5])}; list image ids (file stems) of Train_Folder, "
                         "as <domain>/<stem> when the data has several domains (e.g. cxr/covid_1)")
    if not labeled_ids:
        raise SplitError(f"{source or 'labeled ids'} lists no image; at least one labeled image is needed")
    keep = set(labeled_ids)
    return LabeledSplit(tuple(i for i in ids if i in keep), tuple(i for i in ids if i not in keep), seed, None)


def read_id_list(path: Path) -> list[str]:
    """Ids from a ``split.json`` of another run (its ``labeled`` list) or a text file, one id per line."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"labeled-ids file {path} does not exist; give a split.json of a run or a text file "
                         "with one image id per line")
    if path.suffix == ".json":
        try:
            return list(json.loads(path.read_text())["labeled"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SplitError(f"{path} is not a split.json with a 'labeled' list ({e})") from None
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def make_split(samples: Sequence[Sample], ratio: float, labeled_ids: str, seed: int) -> LabeledSplit | None:
    """The split a run asks for: an id file wins over a ratio; ``None`` means "all labeled"."""
    if labeled_ids:
        return split_from_ids(samples, read_id_list(Path(labeled_ids)), seed, source=str(labeled_ids))
    check_ratio(ratio)
    if ratio == 1.0:
        return None
    return split_by_ratio(samples, ratio, seed)


def apply_split(samples: Sequence[Sample], split: LabeledSplit | None) -> list[Sample]:
    """Drop the masks of the unlabeled Train images (text, image and id are kept)."""
    if split is None:
        return list(samples)
    hide = set(split.unlabeled)
    have, named = set(labeled_train_ids(samples)), set(split.labeled) | hide
    if have != named:
        diff = sorted(have ^ named)
        raise SplitError(f"the split ({SPLIT_FILE}) and the dataset's labeled Train images differ in {len(diff)} "
                         f"id(s), e.g. {', '.join(diff[:5])}; was the dataset changed since the run started? "
                         "Resume on the same data, or start a new run")
    return [dataclasses.replace(s, mask_path=None) if s.split == "Train" and s.id in hide else s for s in samples]
