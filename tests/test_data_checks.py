"""Data checks that tell the truth: splits a command needs, orphans always reported,
unlabeled images explained, and messages that say what is actually wrong, grouped by kind."""

from __future__ import annotations

import openpyxl
import pytest
from PIL import Image
from test_readers import make_lvit, write_binary_mask, write_rgb, write_xlsx
from typer.testing import CliRunner

from medtextseg.cli import USER_ERROR_EXIT, app
from medtextseg.data.problems import GROUP_SHOWN, DataError, Problem
from medtextseg.data.readers import read_dataset_with_problems
from medtextseg.data.validation import check_split_names, dataset_notes, validate_dataset

runner = CliRunner()


def _problems(root, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        validate_dataset(root, **kw)
    return info.value


def test_an_empty_train_split_is_a_problem_and_its_orphans_are_reported(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"], "Val": ["v"]})
    for image in (root / "Train_Folder" / "img").iterdir():
        image.unlink()
    err = _problems(root, need_splits=("Train", "Val"))
    text = str(err)
    assert "Train split is missing or has no images" in text
    assert sum("mask has no image" in p.message for p in err.problems) == 2
    assert sum("matches no image" in p.message for p in err.problems) == 2
    res = runner.invoke(app, ["check-data", str(root)])
    assert res.exit_code == USER_ERROR_EXIT and "Train split" in res.output


def test_a_missing_val_split_is_a_problem_for_training_and_test_a_note(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"]})
    err = _problems(root, need_splits=("Train", "Val"))
    assert "Val split is missing" in str(err)
    samples = validate_dataset(root, need_splits=("Train",))
    assert any("no Test split" in n for n in dataset_notes(samples))


def test_unlabeled_train_images_are_explained(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b", "c"], "Val": ["v"], "Test": ["t"]})
    (root / "Train_Folder" / "labelcol" / "b.png").unlink()
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx", [("a.png", "x"), ("b.png", "y"), ("c.png", "z")])
    res = runner.invoke(app, ["check-data", str(root)])
    assert res.exit_code == 0, res.output
    assert "1 Train images have no mask: supervised presets skip them; semi-supervised presets use them " \
           "as unlabeled" in " ".join(res.output.split())


def test_zero_byte_files_say_they_are_empty(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"], "Val": ["v"]})
    (root / "Train_Folder" / "img" / "a.png").write_bytes(b"")
    (root / "Train_Folder" / "labelcol" / "b.png").write_bytes(b"")
    err = _problems(root)
    lines = [p.message for p in err.problems]
    assert sum("empty (0 bytes)" in m for m in lines) == 2
    assert not any("cannot identify" in m for m in lines)


def _workbook(path, first: str, second: str, rows) -> None:
    """An .xlsx whose first sheet ``first`` is empty and whose second sheet holds ``rows``."""
    book = openpyxl.Workbook()
    book.active.title = first
    sheet = book.create_sheet(second)
    for row in rows:
        sheet.append(row)
    book.save(path)


def test_text_table_on_a_later_sheet_is_found(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    _workbook(root / "Train_Folder" / "Train_text.xlsx", "Notes", "Texts",
              [("Image", "Description"), ("a.png", "left lung")])
    samples = validate_dataset(root)
    assert [s.text for s in samples if s.split == "Train"] == ["left lung"]


def test_text_table_without_the_columns_names_its_sheets(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    _workbook(root / "Train_Folder" / "Train_text.xlsx", "Empty", "Other", [("file", "note")])
    (problem,) = [p for p in _problems(root).problems if "Train_text" in str(p.file)]
    assert "sheet 'Empty' is empty" in problem.message and "sheet 'Other'" in problem.message


def test_only_the_missing_column_is_named(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx", [("a.png", "x")], header=("Image", "Text"))
    _, problems = read_dataset_with_problems(root)
    (problem,) = [p for p in problems if "column" in p.message]
    assert "no Description column" in problem.message and "Image" not in problem.message.split("(")[0]


def test_a_name_that_differs_in_case_is_one_problem(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx", [("A.PNG", "x")])
    _, problems = read_dataset_with_problems(root)
    assert len(problems) == 1
    assert "differ only in letter case" in problems[0].message and "'a.png'" in problems[0].message


def test_a_manifest_path_that_differs_in_case_says_so(tmp_path):
    write_rgb(tmp_path / "img" / "a.png")
    write_binary_mask(tmp_path / "mask" / "a.png")
    (tmp_path / "m.csv").write_text("image,mask,text,split\nimg/A.png,mask/a.png,x,train\n")
    _, problems = read_dataset_with_problems(tmp_path / "m.csv")
    assert len(problems) == 1 and "only in letter case" in problems[0].message


def test_unknown_split_names_no_internal_parameter():
    assert check_split_names(["test", "VAL"]) == ["Test", "Val"]
    with pytest.raises(ValueError) as info:
        check_split_names(["Nosuch"])
    assert "Nosuch" in str(info.value) and "require_masks_in" not in str(info.value)


def test_problems_of_one_kind_are_grouped(tmp_path):
    stems = [f"m{i:02d}" for i in range(24)]
    root = make_lvit(tmp_path / "ds", {"Train": stems, "Val": ["v"]})
    for stem in stems:
        Image.new("L", (10, 8), 7).save(root / "Train_Folder" / "labelcol" / f"{stem}.png")
    err = _problems(root)
    assert len(err.problems) == 24  # every problem stays available to code
    lines = str(err).splitlines()
    assert len(lines) == 1 + GROUP_SHOWN + 1
    assert lines[-1].strip() == f"... and {24 - GROUP_SHOWN} more like it"
    # Different kinds are not merged.
    mixed = DataError([Problem(root, "a", "fix a"), Problem(root, "b", "fix b")])
    assert len(str(mixed).splitlines()) == 3


def test_one_class_count_convention(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})  # {0, 255} masks
    validate_dataset(root, num_classes=1)  # binary
    err = _problems(root, num_classes=2)  # two class ids: 255 is not one of them
    assert "outside the class ids 0..1" in str(err)
    res = runner.invoke(app, ["check-data", "--help"], env={"COLUMNS": "200"})
    assert "1 for binary" in res.output
