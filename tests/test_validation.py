"""Dataset validation: every problem is found, named with its file and fix, in one error."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import tifffile
from PIL import Image

from medtextseg.data.readers import DatasetError
from medtextseg.data.sample import Sample
from medtextseg.data.validation import (
    DataError,
    Problem,
    check_samples,
    check_split_names,
    dataset_notes,
    validate_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MONUSEG = REPO_ROOT.parent / "shared" / "data" / "MoNuSeg"

SIZE = (8, 10)


def write_xlsx(path: Path, rows) -> None:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["Image", "Description"])
    for row in rows:
        sheet.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook.save(path)


def write_image(path: Path, size=SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((*size, 3), 90, np.uint8)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def write_mask(path: Path, size=SIZE, values=(0, 255)) -> Path:
    """A mask cycling through ``values`` row by row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.resize(np.asarray(values, np.uint8), size[0])
    Image.fromarray(np.repeat(rows[:, None], size[1], axis=1)).save(path)
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A clean LViT dataset: Train a, b, c; Val v; Test t."""
    root = tmp_path / "ds"
    for split, stems in {"Train": "abc", "Val": "v", "Test": "t"}.items():
        folder = root / f"{split}_Folder"
        for stem in stems:
            write_image(folder / "img" / f"{stem}.png")
            write_mask(folder / "labelcol" / f"{stem}.png")
        write_xlsx(folder / f"{split}_text.xlsx", [(f"{s}.png", f"about {s}") for s in stems])
    return root


def only_problem(root: Path, **options) -> Problem:
    with pytest.raises(DataError) as info:
        validate_dataset(root, **options)
    assert len(info.value.problems) == 1, str(info.value)
    return info.value.problems[0]


def test_clean_dataset_passes(dataset):
    samples = validate_dataset(dataset)
    assert [(s.split, s.id) for s in samples] == [("Train", "a"), ("Train", "b"),
                                                  ("Train", "c"), ("Val", "v"), ("Test", "t")]


def test_not_a_dataset_is_not_a_data_error(tmp_path):
    with pytest.raises(DatasetError):
        validate_dataset(tmp_path / "missing")


def test_corrupt_image(dataset):
    bad = dataset / "Train_Folder" / "img" / "a.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    problem = only_problem(dataset)
    assert problem.file == bad
    assert problem.message.startswith("unreadable image")
    assert "re-export" in problem.fix


def test_truncated_image_body(dataset):
    image = dataset / "Train_Folder" / "img" / "a.png"
    noisy = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(image)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) - 30])  # header intact, IDAT cut short
    assert only_problem(dataset).file == image


def test_corrupt_mask(dataset):
    bad = dataset / "Val_Folder" / "labelcol" / "v.png"
    bad.write_bytes(b"nope")
    problem = only_problem(dataset)
    assert problem.file == bad and problem.message.startswith("unreadable mask")


def test_size_mismatch_reports_both_sizes(dataset):
    mask = write_mask(dataset / "Train_Folder" / "labelcol" / "b.png", size=(6, 7))
    problem = only_problem(dataset)
    assert problem.file == mask
    assert problem.message == "mask is 6x7 (HxW) but its image b.png is 8x10"
    assert "resize the mask to 8x10" in problem.fix


def test_non_binary_mask_lists_values(dataset):
    mask = write_mask(dataset / "Train_Folder" / "labelcol" / "c.png",
                      values=(0, 3, 1, 255, 7, 9, 8))
    problem = only_problem(dataset)
    assert problem.file == mask
    assert problem.message == ("mask is not binary: values 0, 1, 3, 7, 8 and 2 more "
                               "(expected {0, 255} or {0, 1})")
    assert "convert the mask to {0, 255}" in problem.fix


def test_binary_conventions_and_multiclass(dataset):
    mask = dataset / "Train_Folder" / "labelcol" / "a.png"
    write_mask(mask, values=(0, 1))
    validate_dataset(dataset)  # {0, 1} is binary too
    write_mask(mask, values=(0, 1, 2))
    with pytest.raises(DataError):
        validate_dataset(dataset)
    write_mask(dataset / "Train_Folder" / "labelcol" / "b.png", values=(0, 1))
    for name in ("c", "v", "t"):
        folder = {"c": "Train", "v": "Val", "t": "Test"}[name]
        write_mask(dataset / f"{folder}_Folder" / "labelcol" / f"{name}.png", values=(0, 2))
    validate_dataset(dataset, num_classes=3)
    write_mask(mask, values=(0, 3, 4))
    problem = only_problem(dataset, num_classes=3)
    assert problem.message == "mask holds values 3, 4 outside the class ids 0..2"


def test_missing_mask_where_required(dataset):
    (dataset / "Test_Folder" / "labelcol" / "t.png").unlink()
    problem = only_problem(dataset)
    assert problem.file == dataset / "Test_Folder" / "img" / "t.png"
    assert "no mask" in problem.message
    validate_dataset(dataset, require_masks_in=("Val",))  # unlabeled test images allowed


def test_text_problems(dataset):
    write_xlsx(dataset / "Train_Folder" / "Train_text.xlsx",
               [("a.png", "about a"), ("b.png", " \t "), ("zzz.png", "stray")])
    with pytest.raises(DataError) as info:
        validate_dataset(dataset)
    table = dataset / "Train_Folder" / "Train_text.xlsx"
    got = sorted((p.file, p.message) for p in info.value.problems)
    assert got == sorted([
        (table, "row 3 ('b.png') has an empty Description"),
        (dataset / "Train_Folder" / "img" / "c.png", "no row for 'c.png' in Train_text.xlsx"),
        (table, "row 4 ('zzz.png') matches no image in Train_Folder/img/"),
    ])


def test_duplicate_ids(dataset):
    twin = write_image(dataset / "Train_Folder" / "img" / "a.tif")
    problem = only_problem(dataset)
    assert problem.file == twin
    assert problem.message == "id 'a' is used twice in the Train split: a.png and a.tif"
    assert problem.fix == "rename or remove one of a.png and a.tif"


def test_all_problems_in_one_error(dataset):
    train = dataset / "Train_Folder"
    (train / "img" / "a.png").write_bytes(b"broken")                         # unreadable image
    write_mask(train / "labelcol" / "b.png", size=(4, 4))                     # size mismatch
    write_mask(train / "labelcol" / "c.png", values=(0, 128, 255))            # not binary
    write_image(train / "img" / "d.png")                                      # no text row
    (dataset / "Val_Folder" / "labelcol" / "v.png").unlink()                  # missing mask
    write_image(train / "img" / "c.tif")                                      # duplicate id
    with pytest.raises(DataError) as info:
        validate_dataset(dataset)
    error = info.value
    assert len(error.problems) == 6
    text = str(error)
    lines = text.splitlines()
    assert lines[0] == f"6 problem(s) found in {dataset}:"
    assert len(lines) == 7 and all(line.startswith("- ") and " -> fix: " in line
                                   for line in lines[1:])
    for shown in ("Train_Folder/img/a.png: unreadable image",
                  "Train_Folder/labelcol/b.png: mask is 4x4 (HxW) but its image b.png is 8x10",
                  "Train_Folder/labelcol/c.png: mask is not binary: values 0, 128, 255",
                  "Train_Folder/img/d.png: no row for 'd.png' in Train_text.xlsx",
                  "Val_Folder/img/v.png: no mask",
                  "Train_Folder/img/c.tif: id 'c' is used twice"):
        assert f"- {shown}" in text, shown


def test_csv_manifest_validation(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png")
    write_mask(tmp_path / "mask" / "a.png")
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "mask", "text", "split"),
                                      ("img/a.png", "mask/a.png", "fine", "val"),
                                      ("img/b.png", "", "unlabeled", "train")])
    samples = validate_dataset(manifest)
    assert [(s.split, s.labeled) for s in samples] == [("Train", False), ("Val", True)]
    with open(manifest, "a", newline="") as handle:
        csv.writer(handle).writerow(("img/b.png", "mask/missing.png", "x", "test"))
    problem = only_problem(manifest)
    assert problem.file == tmp_path / "mask" / "missing.png"
    assert problem.message == "mask of row 4 of data.csv does not exist"
    assert "- mask/missing.png: mask of row 4" in str(DataError([problem], manifest))


def test_check_samples_on_hand_built_samples(tmp_path):
    image = write_image(tmp_path / "a.png")
    mask = write_mask(tmp_path / "m.png")
    good = Sample("a", image, mask, "text", "Train")
    assert check_samples([good]) == []
    blank = Sample("a", image, None, "  ", "Train")
    problems = check_samples([good, blank], workers=1)
    assert [p.message for p in problems] == ["empty text for 'a' (Train)",
                                             "listed twice in the Train split"]
    assert check_samples([blank], check_text=False) == []
    missing = Sample("b", tmp_path / "nope.png", None, "x", "Val")
    assert check_samples([missing])[0].message == "unreadable image: file does not exist"


def test_problem_and_error_format(tmp_path):
    problem = Problem(Path("/x/y.png"), "broken", "replace it")
    assert str(problem) == "/x/y.png: broken -> fix: replace it"
    error = DataError([problem], "/data/set")
    assert str(error) == "1 problem(s) found in /data/set:\n- /x/y.png: broken -> fix: replace it"


@pytest.mark.skipif(not MONUSEG.is_dir(), reason=f"real data not present at {MONUSEG}")
def test_real_monuseg_validates():
    samples = validate_dataset(MONUSEG)
    assert len(samples) == 30
    assert sum(s.split == "Train" for s in samples) == 24
    assert sum(s.split == "Val" for s in samples) == 6
    assert all(s.labeled and s.text.strip() for s in samples)
    assert {s.domain for s in samples} == {"MoNuSeg"}


# --------------------------------------------------------------------------- splits a command needs


def test_needed_split_with_an_empty_img_folder_names_it(dataset):
    img = dataset / "Train_Folder" / "img"
    for image in img.iterdir():
        image.unlink()
    with pytest.raises(DataError) as info:
        validate_dataset(dataset, need_splits=("Train", "Val"))
    (problem,) = [p for p in info.value.problems if p.kind == "split-needed"]
    assert problem.file == img
    assert problem.message == ("the Train split is missing or has no images: Train_Folder/img/ is empty; "
                               "this command needs it")
    assert problem.fix == "put the Train images (PNG, JPEG, BMP or TIFF) in Train_Folder/img/"


def test_orphans_are_reported_when_img_is_empty_or_missing(dataset):
    img = dataset / "Train_Folder" / "img"
    for image in img.iterdir():
        image.unlink()
    with pytest.raises(DataError) as info:
        validate_dataset(dataset)
    kinds = [p.kind for p in info.value.problems]
    assert kinds.count("mask-without-image") == 3 and kinds.count("row-without-image") == 3
    img.rmdir()
    with pytest.raises(DataError) as info:
        validate_dataset(dataset)
    kinds = [p.kind for p in info.value.problems]
    assert kinds.count("no-img-folder") == 1
    assert kinds.count("mask-without-image") == 3 and kinds.count("row-without-image") == 3


def needed_problem(root, need) -> Problem:
    with pytest.raises(DataError) as info:
        validate_dataset(root, need_splits=need)
    found = [p for p in info.value.problems if p.kind == "split-needed"]
    assert len(found) == 1, str(info.value)
    return found[0]


def test_needed_split_problems_name_the_folder_and_the_fix(dataset):
    shutil.rmtree(dataset / "Test_Folder")
    validate_dataset(dataset, need_splits=("Train", "Val"))  # Test is not needed
    problem = needed_problem(dataset, ("train", "test"))
    assert problem.file == dataset / "Test_Folder"
    assert problem.message == ("the Test split is missing or has no images: Test_Folder/ not found; "
                               "this command needs it")
    assert "create Test_Folder/" in problem.fix

    (dataset / "Val_Folder").rename(dataset / "Validation")
    problem = needed_problem(dataset, ("Train", "Val"))
    assert problem.file == dataset / "Validation" and problem.fix == "rename Validation/ to Val_Folder/"


def test_needed_split_whose_img_folder_holds_no_images(dataset):
    img = dataset / "Val_Folder" / "img"
    (img / "v.png").unlink()
    for name in ("v.dcm", "w.dcm"):
        (img / name).write_bytes(b"\0" * 128 + b"DICM")
    problem = needed_problem(dataset, ("Train", "Val"))
    assert problem.file == img
    assert "Val_Folder/img/ holds no image files (it holds 2 .dcm files)" in problem.message
    assert "convert the .dcm files to PNG" in problem.fix
    for name in ("v.dcm", "w.dcm"):
        (img / name).unlink()
    problem = needed_problem(dataset, ("Train", "Val"))
    assert "Val_Folder/img/ is empty" in problem.message


def test_needed_split_without_img_folder_is_said_once(dataset):
    shutil.rmtree(dataset / "Val_Folder" / "img")
    with pytest.raises(DataError) as info:
        validate_dataset(dataset, need_splits=("Train", "Val"))
    assert [p.kind for p in info.value.problems].count("no-img-folder") == 1
    assert not any(p.kind == "split-needed" for p in info.value.problems)


def test_needed_split_of_a_manifest(tmp_path):
    write_image(tmp_path / "a.png")
    write_mask(tmp_path / "m.png")
    manifest = tmp_path / "data.csv"
    manifest.write_text("image,mask,text,split\na.png,m.png,x,train\ngone.png,,y,val\n")
    with pytest.raises(DataError) as info:
        validate_dataset(manifest, need_splits=("Train", "Val", "Test"))
    needed = {p.message for p in info.value.problems if p.kind == "split-needed"}
    assert needed == {
        ("the Val split is missing or has no images: its one row with split val names no existing image; "
        "this command needs it"),
        "the Test split is missing or has no images: no row of data.csv has split test; this command needs it",
    }


def test_unknown_split_names_say_what_to_use(dataset):
    for options in ({"need_splits": ("Nosuch",)}, {"require_masks_in": ("Nosuch",)}):
        with pytest.raises(ValueError) as info:
            validate_dataset(dataset, **options)
        assert str(info.value) == "unknown split 'Nosuch'; use Train, Val or Test"
    with pytest.raises(ValueError, match="unknown split 'x'"):
        check_split_names(["train", "x"])
    assert check_split_names("validation") == ["Val"]


# --------------------------------------------------------------------------- notes


def test_notes_say_where_a_split_was_looked_for(dataset):
    shutil.rmtree(dataset / "Test_Folder")
    samples = validate_dataset(dataset, need_splits=("Train", "Val"))
    assert dataset_notes(samples, data=dataset) == [
        "no Test split (Test_Folder/ not found): training will select on Val and report no Test figures"]
    assert dataset_notes(samples) == ["no Test split: training will select on Val and report no Test figures"]
    assert dataset_notes(samples, need_splits=("Train", "Val", "Test")) == []  # a problem then, not a note
    (dataset / "Test_Folder" / "img").mkdir(parents=True)
    assert dataset_notes(samples, data=dataset)[0].startswith("no Test split (Test_Folder/img/ is empty): ")


def test_notes_explain_unlabeled_train_images(dataset):
    (dataset / "Train_Folder" / "labelcol" / "b.png").unlink()
    (dataset / "Train_Folder" / "labelcol" / "c.png").unlink()
    samples = validate_dataset(dataset)
    assert dataset_notes(samples, data=dataset) == [
        "2 Train images have no mask: supervised presets skip them; semi-supervised presets use them as unlabeled"]
    (dataset / "Train_Folder" / "labelcol" / "a.png").unlink()
    (note,) = dataset_notes(validate_dataset(dataset))
    assert note.startswith("none of the 3 Train images has a mask")


# --------------------------------------------------------------------------- class counts and messages


def test_num_classes_one_is_binary_and_two_means_ids_0_and_1(dataset):
    validate_dataset(dataset)  # default 1: {0, 255} masks are binary
    validate_dataset(dataset, num_classes=1)
    with pytest.raises(DataError) as info:
        validate_dataset(dataset, num_classes=2)  # mask_to_labels would keep 255 as a class id
    problem = info.value.problems[0]
    assert problem.message.startswith("mask holds values 255 outside the class ids 0..1")
    assert "set data.num_classes to 1" in problem.fix
    for mask in dataset.glob("*_Folder/labelcol/*.png"):
        write_mask(mask, values=(0, 1))
    validate_dataset(dataset, num_classes=2)
    validate_dataset(dataset, num_classes=1)  # {0, 1} is binary as well
    for bad in (0, -1, True, 2.0, 257):
        with pytest.raises(ValueError, match="num_classes"):
            validate_dataset(dataset, num_classes=bad)
    with pytest.raises(ValueError, match="num_classes"):
        check_samples([], num_classes=0)


def test_non_binary_mask_fix_fits_the_cause(dataset):
    labelcol = dataset / "Train_Folder" / "labelcol"
    write_mask(labelcol / "a.png", values=(0, 1, 2))  # a label map read as binary
    problem = only_problem(dataset)
    assert problem.kind == "mask-not-binary:ids" and "set data.num_classes to 3" in problem.fix
    for mask in dataset.glob("*_Folder/labelcol/*.png"):
        write_mask(mask, values=(0, 1))
    write_mask(labelcol / "b.png", values=(0, 1, 2, 255))
    problem = only_problem(dataset, num_classes=3)
    assert problem.message == "mask holds values 255 outside the class ids 0..2"
    assert "map the 255 pixels" in problem.fix and "num_classes to 256" not in problem.fix


def test_empty_truncated_and_non_image_files_say_so(dataset):
    img, labelcol = dataset / "Train_Folder" / "img", dataset / "Train_Folder" / "labelcol"
    (img / "a.png").write_bytes(b"")
    (labelcol / "b.png").write_bytes(b"")
    noisy = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(img / "c.png")
    data = (img / "c.png").read_bytes()
    (img / "c.png").write_bytes(data[: len(data) - 30])
    (dataset / "Val_Folder" / "img" / "v.png").write_text("<!DOCTYPE html><html><body>404</body></html>")
    with pytest.raises(DataError) as info:
        validate_dataset(dataset)
    got = {(p.file.name, p.kind): (p.message, p.fix) for p in info.value.problems}
    assert got[("a.png", "unreadable-image:empty")] == (
        "unreadable image: the file is empty (0 bytes)",
        "copy it again from its source or re-export it; an interrupted copy or export leaves empty files")
    assert got[("b.png", "unreadable-mask:empty")][0] == "unreadable mask: the file is empty (0 bytes)"
    message, fix = got[("c.png", "unreadable-image:truncated")]
    assert message.startswith("unreadable image: the file is truncated: the PNG ends before its end marker")
    assert "copy it again" in fix
    message, fix = got[("v.png", "unreadable-image:not-an-image")]
    assert "HTML" in message and fix == "download the file again"
    assert "cannot identify" not in str(info.value)
