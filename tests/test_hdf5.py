"""The PromptSSL release's HDF5 folds become an LViT-layout dataset that every command reads:
labeled, unlabeled and Val slices with their texts and class ids, every problem listed
before anything is written."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from _synth import runner

from medtextseg.classes import read_classes_file
from medtextseg.cli import USER_ERROR_EXIT, app
from medtextseg.data.hdf5 import import_hdf5_fold, to_uint8
from medtextseg.data.io import read_image, read_mask
from medtextseg.data.problems import DataError
from medtextseg.data.readers import read_dataset
from medtextseg.data.validation import validate_dataset

H, W, K = 32, 16, 20
GROUP_NAMES = {"train_sup": ["case_1_1", "case_1_2", "case_2_1"], "train_weak": ["case_3_1", "case_3_2"],
               "val": ["case_4_1", "case_4_2"]}


def _fold(path, *, one_hot=False, bad_id=None, drop_group=None, names=GROUP_NAMES):
    rng = np.random.default_rng(0)
    arrays = {}
    with h5py.File(path, "w") as f:
        for group, slice_names in names.items():
            if group == drop_group:
                continue
            n = len(slice_names)
            mr = rng.normal(300.0, 80.0, size=(n, H, W)).astype(np.float32)
            ids = rng.integers(0, K, size=(n, H, W))
            if bad_id is not None and group == "val":
                ids[0, 0, 0] = bad_id
            g = f.create_group(group)
            g["mr"] = mr
            g["mask"] = np.eye(K, dtype=np.uint8)[ids].transpose(0, 3, 1, 2) if one_hot else ids.astype(np.uint8)
            g["weight"] = np.ones(n, dtype=np.float32)
            g["filename"] = np.array([s.encode() for s in slice_names])
            arrays[group] = (mr, ids)
    return arrays


def _texts(path, skip=(), misspell=()):
    rows = ["Image,Description"]
    for slice_names in GROUP_NAMES.values():
        for name in slice_names:
            if name in skip:
                continue
            key = name.replace("case", "cse") if name in misspell else name
            rows.append(f"{key},T9 none. L{name[-1]} split. text of {name}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_fold_becomes_a_dataset_with_labeled_unlabeled_and_val_slices(tmp_path):
    arrays = _fold(tmp_path / "fold0.h5")
    texts = _texts(tmp_path / "train_val_text.csv", misspell=("case_2_1",))  # as the real table's cse_96_*
    summary = import_hdf5_fold(tmp_path / "fold0.h5", texts, tmp_path / "spine")
    assert summary["splits"] == {"Train": 5, "Val": 2}
    assert summary["labeled"] == {"Train": 3, "Val": 2}
    assert summary["texts by a near name"] == "case_2_1 <- cse_2_1"  # said, not silent

    samples = validate_dataset(tmp_path / "spine", num_classes=K, need_splits=["Train", "Val"])
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == sorted(n for names in GROUP_NAMES.values() for n in names)
    assert [by_id[n].labeled for n in GROUP_NAMES["train_weak"]] == [False, False]  # the release's unlabeled part
    assert by_id["case_2_1"].text == "T9 none. L1 split. text of case_2_1"  # paired despite the misspelled key
    mr, ids = arrays["val"]
    np.testing.assert_array_equal(read_mask(by_id["case_4_2"].mask_path), ids[1])
    img = read_image(by_id["case_4_2"].image_path)
    np.testing.assert_array_equal(img if img.ndim == 2 else img[..., 0], to_uint8(mr[1]))
    names = read_classes_file(tmp_path / "spine")
    assert len(names) == K and names[:3] == ["background", "S", "L5"]  # the official class order


def test_weak_masks_can_be_kept_and_one_hot_masks_are_read_by_argmax(tmp_path):
    arrays = _fold(tmp_path / "f.h5", one_hot=True)
    import_hdf5_fold(tmp_path / "f.h5", _texts(tmp_path / "t.csv"), tmp_path / "d", keep_weak_masks=True)
    samples = read_dataset(tmp_path / "d")
    assert sum(s.labeled for s in samples if s.split == "Train") == 5
    weak = {s.id: s for s in samples}["case_3_2"]
    np.testing.assert_array_equal(read_mask(weak.mask_path), arrays["train_weak"][1][1])


def test_every_problem_is_listed_and_nothing_is_written(tmp_path):
    _fold(tmp_path / "f.h5", bad_id=25, drop_group="train_weak")
    texts = _texts(tmp_path / "t.csv", skip=("case_1_2",))
    with pytest.raises(DataError) as err:
        import_hdf5_fold(tmp_path / "f.h5", texts, tmp_path / "d")
    message = str(err.value)
    assert "25" in message and "--num-classes" in message  # the class id and the fix
    assert "case_1_2" in message and "t.csv" in message  # the slice without a text, in the table
    assert not (tmp_path / "d").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    _fold(tmp_path / "g.h5", drop_group="val")
    with pytest.raises(DataError, match="needs val"):
        import_hdf5_fold(tmp_path / "g.h5", _texts(tmp_path / "t2.csv"), tmp_path / "d")


def test_an_existing_dataset_is_not_replaced_without_overwrite(tmp_path):
    _fold(tmp_path / "f.h5")
    texts = _texts(tmp_path / "t.csv")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        import_hdf5_fold(tmp_path / "f.h5", texts, tmp_path / "d")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]
    import_hdf5_fold(tmp_path / "f.h5", texts, tmp_path / "d", overwrite=True)
    assert not (tmp_path / "d" / "keep.txt").exists() and (tmp_path / "d" / "classes.txt").is_file()


def test_the_command_imports_and_refuses_a_file_that_is_not_hdf5(tmp_path):
    _fold(tmp_path / "f.h5")
    texts = _texts(tmp_path / "t.csv")
    ok = runner.invoke(app, ["import-h5", str(tmp_path / "f.h5"), "--texts", str(texts), "--out", str(tmp_path / "d")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "d" / "Train_Folder" / "img" / "case_3_1.png").is_file()
    (tmp_path / "bad.h5").write_text("not hdf5")
    bad = runner.invoke(app, ["import-h5", str(tmp_path / "bad.h5"), "--texts", str(texts), "--out",
                                str(tmp_path / "e")])
    assert bad.exit_code == USER_ERROR_EXIT
    assert "bad.h5" in bad.output and "HDF5" in bad.output and not (tmp_path / "e").exists()
