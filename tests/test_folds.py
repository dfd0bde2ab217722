"""K-fold cross-validation splits (data/folds.py): seeded, disjoint, covering, balanced."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtextseg.data.folds import FOLDS_FILE, FoldError, fold_file, kfold, write_fold_manifests
from medtextseg.data.readers import read_dataset
from medtextseg.data.sample import Sample
from medtextseg.data.synthetic import GENERATORS


def make_samples(n_train=24, n_val=6, n_test=4, n_unlabeled=0, domains=("a",)) -> list[Sample]:
    out = []
    for d in domains:
        for split, n in (("Train", n_train), ("Val", n_val), ("Test", n_test)):
            for j in range(n):
                out.append(Sample(f"{split.lower()}{j}", Path(f"/x/{d}/{split}/{j}.png"),
                                  Path(f"/x/{d}/{split}/m{j}.png"), "t", split, d))
        for j in range(n_unlabeled):
            out.append(Sample(f"u{j}", Path(f"/x/{d}/u{j}.png"), None, "t", "Train", d))
    return out


def keys(samples):
    return [(s.domain, s.split, s.id) for s in samples]


def val_sets(folds):
    return [frozenset(keys(val)) for _, val in folds]


def test_seeded():
    samples = make_samples()
    assert kfold(samples, 5, seed=0) == kfold(samples, 5, seed=0)
    assert val_sets(kfold(samples, 5, seed=0)) != val_sets(kfold(samples, 5, seed=1))


def test_order_independent():
    samples = make_samples(n_unlabeled=3, domains=("a", "b"))
    shuffled = samples[:]
    random.Random(7).shuffle(shuffled)
    assert kfold(shuffled, 5, seed=3) == kfold(samples, 5, seed=3)


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_disjoint_covering_balanced(k):
    samples = make_samples(n_train=24, n_val=6)
    pool = {k_ for k_ in keys(samples) if k_[1] != "Test"}
    folds = kfold(samples, k, seed=0)
    assert len(folds) == k
    vals = val_sets(folds)
    assert sum(len(v) for v in vals) == len(pool)  # disjoint ...
    assert frozenset().union(*vals) == pool  # ... and covering
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for (train, val), v in zip(folds, vals, strict=True):
        assert set(keys(train)).isdisjoint(v)
        assert set(keys(train)) | v == pool  # train is the rest of the pool
        assert not any(s.split == "Test" for s in train + val)


def test_monuseg_sizes():
    folds = kfold(make_samples(n_train=24, n_val=6, n_test=14), 5, seed=0)
    assert [(len(t), len(v)) for t, v in folds] == [(24, 6)] * 5


def test_unlabeled_only_in_train():
    samples = make_samples(n_train=10, n_val=3, n_unlabeled=5)
    unlabeled = {k_ for k_, s in zip(keys(samples), samples, strict=True) if not s.labeled}
    for train, val in kfold(samples, 4, seed=0):
        assert all(s.labeled for s in val)
        assert unlabeled <= set(keys(train))
    vals = val_sets(kfold(samples, 4, seed=0))
    assert sum(map(len, vals)) == 13  # only the labeled images are dealt


def test_stratified_by_domain():
    samples = make_samples(n_train=7, n_val=2, domains=("ct", "mr", "xray")) + \
        make_samples(n_train=3, n_val=0, domains=("us",))
    folds = kfold(samples, 4, seed=5)
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 1
    for d, n in (("ct", 9), ("mr", 9), ("xray", 9), ("us", 3)):
        per = [Counter(s.domain for s in v)[d] for _, v in folds]
        assert sum(per) == n and max(per) - min(per) <= 1, (d, per)


def test_bad_k_and_duplicate_ids():
    samples = make_samples(n_train=3, n_val=1)
    with pytest.raises(FoldError, match="k must be"):
        kfold(samples, 1, seed=0)
    with pytest.raises(FoldError, match="at least 5 labeled"):
        kfold(samples, 5, seed=0)
    dup = samples + [Sample("train0", Path("/x/a/Val/dup.png"), Path("/x/a/Val/mdup.png"), "t", "Val", "a")]
    with pytest.raises(FoldError, match="both a Train image"):
        kfold(dup, 2, seed=0)


# --------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def cxr(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folds") / "cxr"
    GENERATORS["chest-xray"](out, n=20, seed=0, size=32)
    return out


def test_manifests_round_trip(cxr, tmp_path):
    original = read_dataset(cxr)
    paths = write_fold_manifests(cxr, 3, 0, tmp_path / "folds")
    assert paths == [fold_file(tmp_path / "folds", i) for i in range(3)]
    folds = kfold(original, 3, 0)
    tests = {(s.id, s.image_path, s.mask_path, s.text, s.domain) for s in original if s.split == "Test"}
    assert tests
    for path, (train, val) in zip(paths, folds, strict=True):
        got = read_dataset(path)
        by = {split: {(s.id, s.image_path, s.mask_path, s.text, s.domain) for s in got if s.split == split}
              for split in ("Train", "Val", "Test")}
        assert by["Train"] == {(s.id, s.image_path, s.mask_path, s.text, s.domain) for s in train}
        assert by["Val"] == {(s.id, s.image_path, s.mask_path, s.text, s.domain) for s in val}
        assert by["Test"] == tests
    record = json.loads((tmp_path / "folds" / FOLDS_FILE).read_text())
    assert record["k"] == 3 and record["seed"] == 0 and record["data"] == str(cxr.absolute())
    assert [len(f["val"]) for f in record["folds"]] == [len(v) for _, v in folds]


def test_manifests_without_test(cxr, tmp_path):
    for path in write_fold_manifests(cxr, 2, 0, tmp_path, test="none"):
        assert {s.split for s in read_dataset(path)} == {"Train", "Val"}
    with pytest.raises(ValueError, match="test must be"):
        write_fold_manifests(cxr, 2, 0, tmp_path / "x", test="val")


def test_manifests_never_overwrite_other_folds(cxr, tmp_path):
    first = write_fold_manifests(cxr, 2, 0, tmp_path)
    before = [p.read_text() for p in first]
    mtime = first[0].stat().st_mtime_ns
    assert write_fold_manifests(cxr, 2, 0, tmp_path) == first  # same folds: kept
    assert first[0].stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="fold_0.csv"):
        write_fold_manifests(cxr, 2, 1, tmp_path)
    assert [p.read_text() for p in first] == before  # nothing was touched


def test_another_spelling_of_the_same_dataset_keeps_its_folds(cxr, tmp_path):
    first = write_fold_manifests(cxr, 2, 0, tmp_path / "folds")
    before = [p.read_text() for p in first]
    detour = cxr.parent / ".." / cxr.parent.name / cxr.name  # same folder, other bytes in every path
    assert str(detour) != str(cxr) and detour.resolve() == cxr.resolve()
    assert write_fold_manifests(detour, 2, 0, tmp_path / "folds") == first
    assert [p.read_text() for p in first] == before  # kept as first written
    with pytest.raises(FileExistsError, match="fold_0.csv"):
        write_fold_manifests(detour, 2, 1, tmp_path / "folds")  # other folds are still refused
    first[0].write_text("not,a\nmanifest\n")  # a file we did not write is refused, not parsed into a crash
    (tmp_path / "folds" / FOLDS_FILE).write_text("{")
    with pytest.raises(FileExistsError, match="fold_0.csv"):
        write_fold_manifests(cxr, 2, 0, tmp_path / "folds")


def test_manifest_keeps_unlabeled_in_train(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rows = []
    for j in range(8):
        Image.fromarray(np.full((8, 8), 40 * (j % 5), np.uint8)).save(data / f"i{j}.png")
        mask = ""
        if j < 6:
            m = np.zeros((8, 8), np.uint8)
            m[:4] = 255
            Image.fromarray(m).save(data / f"m{j}.png")
            mask = f"m{j}.png"
        rows.append([f"i{j}.png", mask, f"text {j}", "train" if j < 4 or j >= 6 else "val",
                     "left" if j % 2 else "right"])
    with open(data / "all.csv", "w", newline="") as h:
        csv.writer(h).writerows([["image", "mask", "text", "split", "domain"], *rows])
    for path in write_fold_manifests(data / "all.csv", 3, 0, tmp_path / "folds"):
        got = read_dataset(path)
        assert all(s.labeled for s in got if s.split == "Val")
        assert {s.id for s in got if not s.labeled} == {"right/i6", "left/i7"}  # several domains: qualified ids
        assert all(s.split == "Train" for s in got if not s.labeled)
        assert {s.domain for s in got} == {"left", "right"}
        assert len(got) == 8
