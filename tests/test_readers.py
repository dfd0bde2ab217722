"""Image I/O and dataset readers (LViT layout, QaTa / MoNuSeg variants, CSV manifests)."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import tifffile
from PIL import Image

from medtextseg.data.io import (
    ImageReadError,
    image_size,
    read_image,
    read_mask,
    write_png_atomic,
)
from medtextseg.data.readers import (
    DatasetError,
    check_split_names,
    explain_missing_split,
    normalise_split,
    read_dataset,
    read_dataset_with_problems,
)
from medtextseg.data.sample import Sample

# --------------------------------------------------------------------------- builders


def write_xlsx(path: Path, rows, header=("Image", "Description")) -> Path:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(list(header))
    for row in rows:
        sheet.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook.save(path)
    return path


def write_rgb(path: Path, size=(8, 10), value=100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((*size, 3), value, np.uint8)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def write_binary_mask(path: Path, size=(8, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[: size[0] // 2] = 255
    Image.fromarray(mask).save(path)
    return path


def make_lvit(root: Path, splits: dict[str, list[str]], *, text_at_root=False) -> Path:
    """LViT layout with one <Split>_text.xlsx per split; images/masks named <stem>.png."""
    for split, stems in splits.items():
        folder = root / f"{split}_Folder"
        for stem in stems:
            write_rgb(folder / "img" / f"{stem}.png")
            write_binary_mask(folder / "labelcol" / f"{stem}.png")
        table_dir = root if text_at_root else folder
        write_xlsx(table_dir / f"{split}_text.xlsx",
                   [(f"{stem}.png", f"text of {stem}") for stem in stems])
    return root


def messages(problems) -> list[str]:
    return [p.message for p in problems]


# --------------------------------------------------------------------------- io


def test_read_image_gray_rgba_and_16bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[...] = (1, 2, 3, 4)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [1, 2, 3]

    g16 = np.array([[0, 65535], [257 * 100, 257]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png")[..., 0].tolist() == [[0, 255], [100, 1]]


def test_read_tiff_rgb_and_planar(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    assert np.array_equal(read_image(tmp_path / "a.tif"), rgb)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(rgb, -1, 0), planarconfig="separate",
                     photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "p.tif"), rgb)
    assert image_size(tmp_path / "p.tif") == (5, 6)


def test_read_mask_keeps_raw_values(tmp_path):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.uint8 and np.array_equal(out, mask)

    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8)).convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == [[0, 1], [2, 1]]  # indices, not colours

    # A gray mask saved as RGB is fine; a colour mask is not.
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), mask)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (0, 9, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour"):
        read_mask(tmp_path / "colour.png")

    tifffile.imwrite(tmp_path / "m16.tif", np.array([[0, 65535]], np.uint16))
    assert read_mask(tmp_path / "m16.tif").tolist() == [[0, 255]]


def test_image_size_and_errors(tmp_path):
    write_rgb(tmp_path / "a.png", size=(7, 9))
    assert image_size(tmp_path / "a.png") == (7, 9)
    assert image_size(tmp_path / "a.png", verify=True) == (7, 9)

    with pytest.raises(ImageReadError, match="does not exist") as info:
        read_image(tmp_path / "missing.png")
    assert info.value.path == tmp_path / "missing.png"

    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for reader in (read_image, read_mask, image_size):
        with pytest.raises(ImageReadError):
            reader(tmp_path / "junk.png")

    # Intact header, truncated body: only a verifying or decoding read notices.
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "cut.png") == (64, 64)
    with pytest.raises(ImageReadError):
        image_size(tmp_path / "cut.png", verify=True)

    error = ImageReadError(tmp_path / "x.png", "broken")
    again = pickle.loads(pickle.dumps(error))
    assert again.path == error.path and again.reason == "broken"


def test_write_png_atomic(tmp_path):
    target = tmp_path / "out" / "m.png"
    write_png_atomic(target, np.array([[True, False]]))
    assert read_mask(target).tolist() == [[255, 0]]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 1] = 7
    write_png_atomic(target, rgb)  # replaces the existing file
    assert np.array_equal(read_image(target), rgb)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.png"]  # no temp left over
    with pytest.raises(ValueError):
        write_png_atomic(target, np.zeros((2, 2), np.float32))
    assert np.array_equal(read_image(target), rgb)  # a failed write leaves the old file


# --------------------------------------------------------------------------- LViT layout


def test_lvit_per_split_xlsx(tmp_path):
    root = make_lvit(tmp_path / "Nuclei", {"Train": ["b", "a"], "Val": ["c"], "Test": ["d"]})
    samples, problems = read_dataset_with_problems(root)
    assert problems == []
    assert [(s.split, s.id) for s in samples] == [("Train", "a"), ("Train", "b"), ("Val", "c"),
                                                   ("Test", "d")]
    first = samples[0]
    assert first == Sample(id="a", image_path=root / "Train_Folder" / "img" / "a.png",
                           mask_path=root / "Train_Folder" / "labelcol" / "a.png",
                           text="text of a", split="Train", domain="Nuclei")
    assert [s.domain for s in read_dataset(root, domain="H&E")] == ["H&E"] * 4
    assert read_dataset(str(root)) == samples


def test_lvit_text_table_at_root_and_missing_split(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"]}, text_at_root=True)
    samples, problems = read_dataset_with_problems(root)
    assert problems == []
    assert [s.text for s in samples] == ["text of a", "text of b"]


def test_qata_style_mask_prefix_and_shared_table(tmp_path):
    root = tmp_path / "QaTa"
    for split, stems in {"Train": ["covid_1", "covid_2"], "Val": ["covid_3"],
                         "Test": ["covid_9"]}.items():
        for stem in stems:
            write_rgb(root / f"{split}_Folder" / "img" / f"{stem}.png")
            write_binary_mask(root / f"{split}_Folder" / "labelcol" / f"mask_{stem}.png")
    write_xlsx(root / "Train_Val_text.xlsx",
               [(f"mask_covid_{i}.png", f"Bilateral {i}") for i in (1, 2, 3)])
    write_xlsx(root / "Test_Folder" / "Test_text.xlsx", [("mask_covid_9.png", "Unilateral")])
    samples, problems = read_dataset_with_problems(root)
    assert problems == []
    assert [(s.split, s.id, s.text) for s in samples] == [
        ("Train", "covid_1", "Bilateral 1"), ("Train", "covid_2", "Bilateral 2"),
        ("Val", "covid_3", "Bilateral 3"), ("Test", "covid_9", "Unilateral")]
    assert samples[2].mask_path.name == "mask_covid_3.png"


def test_monuseg_style_tif_test_images(tmp_path):
    root = make_lvit(tmp_path / "MoNuSeg", {"Train": ["t1"]})
    test = root / "Test_Folder"
    for stem in ("x1", "x2"):
        write_rgb(test / "img" / f"{stem}.tif")
        write_binary_mask(test / "labelcol" / f"{stem}.png")
    write_xlsx(test / "Test_text.xlsx", [("x1.png", "dense"), ("x2.png", "sparse")])
    samples, problems = read_dataset_with_problems(root)
    assert problems == []
    tests = [s for s in samples if s.split == "Test"]
    assert [(s.image_path.name, s.mask_path.name, s.text) for s in tests] == [
        ("x1.tif", "x1.png", "dense"), ("x2.tif", "x2.png", "sparse")]


def test_unlabeled_train_images_are_fine_but_val_needs_masks(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"], "Val": ["c", "d"]})
    (root / "Train_Folder" / "labelcol" / "b.png").unlink()
    (root / "Val_Folder" / "labelcol" / "d.png").unlink()
    samples, problems = read_dataset_with_problems(root)
    by_id = {s.id: s for s in samples}
    assert by_id["b"].mask_path is None and not by_id["b"].labeled
    assert by_id["b"].text == "text of b"  # text rows are keyed by the expected mask name
    assert len(problems) == 1
    assert problems[0].file == root / "Val_Folder" / "img" / "d.png"
    assert "no mask" in problems[0].message and "Val images need masks" in problems[0].message
    assert "Val_Folder/labelcol/d.png" in problems[0].fix
    # read_dataset itself never complains about unlabeled images.
    assert len(read_dataset(root)) == 4


def test_split_without_labelcol(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Test": ["t"]})
    for folder in ("Train_Folder", "Test_Folder"):
        for mask in (root / folder / "labelcol").iterdir():
            mask.unlink()
        (root / folder / "labelcol").rmdir()
    samples, problems = read_dataset_with_problems(root)
    assert all(s.mask_path is None for s in samples)
    assert [(p.file, "no labelcol/" in p.message) for p in problems] == [
        (root / "Test_Folder" / "labelcol", True)]


def test_reader_reports_text_and_pairing_problems(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b", "c"]})
    table = root / "Train_Folder" / "Train_text.xlsx"
    write_xlsx(table, [("a.png", "text of a"), ("b.png", "   "), ("ghost.png", "nobody")])
    write_binary_mask(root / "Train_Folder" / "labelcol" / "orphan.png")
    samples, problems = read_dataset_with_problems(root)
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert [s.text for s in samples] == ["text of a", "", ""]
    found = {(p.file.name, p.message) for p in problems}
    assert found == {
        ("Train_text.xlsx", "row 3 ('b.png') has an empty Description"),
        ("c.png", "no row for 'c.png' in Train_text.xlsx"),
        ("Train_text.xlsx", "row 4 ('ghost.png') matches no image in Train_Folder/img/"),
        ("orphan.png", "mask has no image in Train_Folder/img/"),
    }
    fixes = {p.file.name + p.message[:6]: p.fix for p in problems}
    assert fixes["c.pngno row"] == "add a row 'c.png' with its description to " \
                                   "Train_Folder/Train_text.xlsx"


def test_missing_or_broken_text_table(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    (root / "Train_Folder" / "Train_text.xlsx").unlink()
    (root / "Val_Folder" / "Val_text.xlsx").write_bytes(b"garbage")
    samples, problems = read_dataset_with_problems(root)
    assert len(samples) == 2 and all(s.text == "" for s in samples)
    assert len(problems) == 2  # one per split, not one per image
    assert problems[0].file == root / "Train_Folder" / "Train_text.xlsx"
    assert "no text table for the Train split" in problems[0].message
    assert "cannot read the text table" in problems[1].message

    write_xlsx(root / "Val_Folder" / "Val_text.xlsx", [("v.png", "x")], header=("Name", "Text"))
    _, problems = read_dataset_with_problems(root)
    assert "no Image and Description columns" in problems[1].message


def test_duplicate_text_rows(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]})
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx",
               [("a.png", "one"), ("a.png", "one"), ("a.png", "two")])
    samples, problems = read_dataset_with_problems(root)
    assert samples[0].text == "one"
    assert messages(problems) == ["rows 2, 3, 4 all describe 'a.png', differently"]


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no split folders") as info:
        read_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "Train_Folder" in str(info.value)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="not a dataset"):
        read_dataset(tmp_path / "notes.txt")
    (tmp_path / "bad.csv").write_text("image,text\na.png,x\n")
    with pytest.raises(DatasetError, match=r"lacks column.*mask, split"):
        read_dataset(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown split"):
        read_dataset_with_problems(tmp_path, require_masks_in=("Training!",))


# --------------------------------------------------------------------------- CSV manifest


def write_manifest(path: Path, rows, header=("image", "mask", "text", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_manifest(tmp_path):
    base = tmp_path / "mydata"
    write_rgb(base / "images" / "a.png")
    write_rgb(base / "images" / "b.jpg")
    write_rgb(base / "images" / "c.png")
    write_binary_mask(base / "masks" / "a.png")
    write_binary_mask(base / "masks" / "c.png")
    manifest = write_manifest(base / "list.csv", [
        ("images/c.png", "masks/c.png", "third", "TEST", "ct"),
        ("images/a.png", "masks/a.png", "first", "train", ""),
        ("images/b.jpg", "", "unlabeled one", "Train", "xray"),
    ], header=("Image", "mask", "text", "split", "domain"))
    samples, problems = read_dataset_with_problems(manifest)
    assert problems == []
    # Three domains: the ids are qualified by domain.
    assert samples == [
        Sample("mydata/a", base / "images" / "a.png", base / "masks" / "a.png", "first", "Train",
               "mydata"),
        Sample("xray/b", base / "images" / "b.jpg", None, "unlabeled one", "Train", "xray"),
        Sample("ct/c", base / "images" / "c.png", base / "masks" / "c.png", "third", "Test", "ct"),
    ]
    assert [s.domain for s in read_dataset(manifest, domain="d")] == ["d", "xray", "ct"]


def test_csv_manifest_problems(tmp_path):
    write_rgb(tmp_path / "a.png")
    write_rgb(tmp_path / "b.png")
    write_rgb(tmp_path / "c.png")
    manifest = write_manifest(tmp_path / "m.csv", [
        ("a.png", "gone.png", "x", "train"),   # mask path that does not exist
        ("b.png", "", "x", "val"),             # Val without a mask
        ("c.png", "", "  ", "train"),          # empty text
        ("missing.png", "", "x", "train"),     # image that does not exist
        ("a.png", "", "x", "holdout"),         # unknown split
        ("", "", "x", "train"),                # no image
    ])
    samples, problems = read_dataset_with_problems(manifest)
    assert [s.id for s in samples] == ["a", "c", "b"]
    assert samples[0].mask_path is None
    got = [(p.file.name, p.message) for p in problems]
    assert got == [
        ("gone.png", "mask of row 2 of m.csv does not exist"),
        ("b.png", "row 3 of m.csv: Val image without a mask; Val images need masks"),
        ("m.csv", "row 4 (c.png) has empty text"),
        ("missing.png", "image of row 5 of m.csv does not exist"),
        ("m.csv", "row 6 (a.png): split 'holdout' is not train, val or test"),
        ("m.csv", "row 7 has no image path"),
    ]
    assert all(p.fix for p in problems)


def test_normalise_split():
    assert [normalise_split(s) for s in ("train", " VAL ", "Validation", "test", "x")] == [
        "Train", "Val", "Val", "Test", None]


# --------------------------------------------------------------------------- messages that tell the truth


def test_image_read_errors_name_the_cause(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name in ("a.png", "a.jpg", "a.bmp", "a.tif"):
        full = write_rgb(tmp_path / name, size=(32, 32)) if name.endswith(".tif") else tmp_path / name
        if not name.endswith(".tif"):
            Image.fromarray(arr).save(full)
        data = full.read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        for reader in (read_image, read_mask, lambda p: image_size(p, verify=True)):
            with pytest.raises(ImageReadError) as info:
                reader(cut)
            assert info.value.kind == "truncated" and "truncated" in info.value.reason, (name, info.value)
            assert "copy it again" in info.value.fix
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        image_size(tmp_path / "empty.png")
    assert (info.value.kind, info.value.reason) == ("empty", "the file is empty (0 bytes)")
    (tmp_path / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "lfs.png")
    assert info.value.kind == "not-an-image" and "git lfs pull" in info.value.fix
    (tmp_path / "notes.png").write_text("just some words")
    with pytest.raises(ImageReadError) as info:
        read_mask(tmp_path / "notes.png")
    assert info.value.reason.startswith("not an image file") and str(tmp_path) not in info.value.reason
    error = ImageReadError(tmp_path / "x.png", "broken", "fix it", kind="corrupt")
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.reason, again.fix, again.kind) == (error.path, "broken", "fix it", "corrupt")


def test_a_folder_named_truncated_does_not_make_files_truncated(tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    (folder / "x.png").write_text("<html>not found</html>")
    with pytest.raises(ImageReadError) as info:
        image_size(folder / "x.png")
    assert info.value.kind == "not-an-image"


def _problem(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, [str(p) for p in problems]
    return found[0]


def test_text_table_header_below_a_title_and_missing_columns_named(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]})
    table = root / "Train_Folder" / "Train_text.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    for row in (("Texts of the Train split",), (), ("Image", "Description"), ("a.png", "left lung")):
        sheet.append(row)
    book.save(table)
    samples, problems = read_dataset_with_problems(root)
    assert problems == [] and samples[0].text == "left lung"

    sheet.delete_rows(1, 4)
    for row in (("Texts of the Train split",), (), ("Image", "Text"), ("a.png", "left lung")):
        sheet.append(row)
    book.save(table)
    _, problems = read_dataset_with_problems(root)
    problem = _problem(problems, "text-table-columns")
    # Only the missing column, the row the header really is in, and the cells as written.
    assert problem.message == "no Description column in row 3 (found 'Image', 'Text')"
    assert problem.fix == "rename column 'Text' in row 3 to Description"


def test_text_table_on_no_sheet_names_every_sheet(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]})
    book = openpyxl.Workbook()
    book.active.title = "Cover"
    book.create_sheet("Texts").append(("File", "Caption"))
    book.create_sheet("Notes").append(("image", "notes"))
    book.save(root / "Train_Folder" / "Train_text.xlsx")
    _, problems = read_dataset_with_problems(root)
    problem = _problem(problems, "text-table-columns")
    assert problem.message == (
        "no sheet has both an Image and a Description column: sheet 'Cover' is empty; no Image and "
        "Description columns in row 1 of sheet 'Texts' (found 'File', 'Caption'); no Description column in "
        "row 1 of sheet 'Notes' (found 'image', 'notes')")
    book = openpyxl.Workbook()
    book.create_sheet("Second")
    book.save(root / "Train_Folder" / "Train_text.xlsx")
    _, problems = read_dataset_with_problems(root)
    assert _problem(problems, "text-table-columns").message == \
        "the text table is empty (sheets 'Sheet', 'Second' are all empty)"


def test_unreadable_text_tables_say_what_they_are(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    (root / "Train_Folder" / "Train_text.xlsx").write_bytes(b"")
    (root / "Val_Folder" / "Val_text.xlsx").write_text("Image,Description\nv.png,x\n")
    _, problems = read_dataset_with_problems(root)
    train, val = [p for p in problems if p.kind == "text-table-unreadable"]
    assert train.message == "cannot read the text table: the file is empty (0 bytes)"
    assert "CSV renamed to .xlsx" in val.message and "rename it to Val_text.csv" in val.fix

    (root / "Train_Folder" / "Train_text.xlsx").rename(root / "Train_Folder" / "Train_text.xls")
    _, problems = read_dataset_with_problems(root)
    problem = _problem(problems, "no-text-table")
    assert "found Train_Folder/Train_text.xls" in problem.message
    assert problem.fix.startswith("save Train_Folder/Train_text.xls as Train_Folder/Train_text.xlsx")


def test_a_row_that_differs_in_case_is_one_problem_and_still_pairs(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"]})
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx", [("A.PNG", "upper"), ("b.png", "fine")])
    samples, problems = read_dataset_with_problems(root)
    (problem,) = problems
    assert problem.kind == "case-mismatch"
    assert problem.message == "row 2 names 'A.PNG', but the file is 'a.png': they differ only in letter case " \
                              "(names are case-sensitive)"
    assert "write 'a.png' in column Image of row 2" in problem.fix and "rename the file" in problem.fix
    assert [s.text for s in samples] == ["upper", "fine"]


def test_a_mask_that_differs_in_case_is_one_problem_and_still_pairs(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a", "b"]})
    labelcol = root / "Train_Folder" / "labelcol"
    (labelcol / "a.png").rename(labelcol / "A.png")
    samples, problems = read_dataset_with_problems(root, require_masks_in=("Train",))
    (problem,) = problems
    assert problem.kind == "case-mismatch" and problem.file == labelcol / "A.png"
    assert "'A.png'" in problem.message and "'a.png'" in problem.message
    assert samples[0].mask_path == labelcol / "A.png"


def test_misspelled_row_keys_are_one_problem_each_and_numbered_names_are_not_typos(tmp_path):
    # MRSpineSeg's real table keys a dozen rows cse_96_* for the images case_96_*.
    names = ["case_96_1", "case_96_2", "case_1_12", "case_1_2"]
    root = make_lvit(tmp_path / "ds", {"Train": names})
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx",
               [("cse_96_1.png", "t1"), ("case_96_2.png", "t2"), ("case_1_13.png", "t3"), ("case_1_2.png", "t4")])
    samples, problems = read_dataset_with_problems(root)
    by_kind = sorted((p.kind, p.message) for p in problems)
    assert by_kind == [
        ("misspelled-name", "row 2 names 'cse_96_1.png', but the file is 'case_96_1.png': one name misspelled?"),
        # case_1_12 / case_1_13 differ in a number: two files, reported as they are.
        ("no-row", "no row for 'case_1_12.png' in Train_text.xlsx"),
        ("row-without-image", "row 4 ('case_1_13.png') matches no image in Train_Folder/img/"),
    ]
    fix = next(p.fix for p in problems if p.kind == "misspelled-name")
    assert fix == "write 'case_96_1.png' in column Image of row 2, or rename the file to 'cse_96_1.png'"
    assert {s.id: s.text for s in samples}["case_96_1"] == "t1"  # paired, as a letter-case pair is


def test_an_ambiguous_near_name_is_not_guessed(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["case_7"]})
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx", [("cse_7.png", "a"), ("cas_7.png", "b")])
    _, problems = read_dataset_with_problems(root)
    assert sorted(p.kind for p in problems) == ["no-row", "row-without-image", "row-without-image"]


def test_a_misspelled_mask_is_one_problem_and_still_pairs(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["case_3", "b"]})
    labelcol = root / "Train_Folder" / "labelcol"
    (labelcol / "case_3.png").rename(labelcol / "cse_3.png")
    samples, problems = read_dataset_with_problems(root, require_masks_in=("Train",))
    (problem,) = problems
    assert problem.kind == "misspelled-name" and problem.file == labelcol / "cse_3.png"
    assert problem.fix == "rename the mask to 'case_3.png' (or the image to match the mask)"
    assert {s.id: s.mask_path for s in samples}["case_3"] == labelcol / "cse_3.png"


def test_an_exact_match_is_never_taken_by_a_case_match(tmp_path):
    # a.png and A.png are two images on a case-sensitive file system; only a.png has a mask and a row.
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]})
    write_rgb(root / "Train_Folder" / "img" / "A.png")
    samples, problems = read_dataset_with_problems(root)
    by_name = {s.image_path.name: s for s in samples}
    assert by_name["a.png"].mask_path.name == "a.png" and by_name["a.png"].text == "text of a"
    assert by_name["A.png"].mask_path is None
    assert [p.kind for p in problems] == ["no-row"]


def test_manifest_paths_that_differ_in_case(tmp_path):
    write_rgb(tmp_path / "Images" / "a.png")
    write_binary_mask(tmp_path / "masks" / "A.png")
    manifest = write_manifest(tmp_path / "m.csv", [("images/a.png", "masks/a.png", "x", "train")])
    samples, problems = read_dataset_with_problems(manifest)
    assert [p.kind for p in problems] == ["case-mismatch", "case-mismatch"]
    assert "'images/a.png'" in problems[0].message and "'Images/a.png'" in problems[0].message
    assert "'masks/a.png'" in problems[1].message and "'masks/A.png'" in problems[1].message
    assert samples[0].image_path == tmp_path / "Images" / "a.png"
    assert samples[0].mask_path == tmp_path / "masks" / "A.png"


def test_unknown_split_names_no_internal_parameter(tmp_path):
    with pytest.raises(ValueError) as info:
        read_dataset_with_problems(tmp_path, require_masks_in=("Nosuch",))
    assert str(info.value) == "unknown split 'Nosuch'; use Train, Val or Test"
    assert check_split_names(["test", "VAL", "validation", "Val"]) == ["Test", "Val"]


def test_misnamed_folders_get_a_rename_fix(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]})
    train = root / "Train_Folder"
    (train / "img").rename(train / "Images")
    (train / "labelcol").rename(train / "masks")
    _, problems = read_dataset_with_problems(root)
    assert _problem(problems, "no-img-folder").fix == "rename Train_Folder/Images/ to Train_Folder/img/"
    assert _problem(problems, "labelcol-misnamed").fix == "rename Train_Folder/masks/ to Train_Folder/labelcol/"
    (tmp_path / "flat" / "Training").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"rename Training/ -> Train_Folder/"):
        read_dataset(tmp_path / "flat")


def test_explain_missing_split(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]})
    assert explain_missing_split(root, "test") == (
        root / "Test_Folder", "Test_Folder/ not found",
        ("create Test_Folder/ holding img/ (the Test images), labelcol/ (their masks) and Test_text.xlsx "
        "(their texts)"))
    (root / "Val_Folder" / "img" / "case1").mkdir(parents=True)
    place, reason, fix = explain_missing_split(root, "Val")
    assert place == root / "Val_Folder" / "img"
    assert reason == "Val_Folder/img/ holds no image files (it holds 1 folder (case1/))"
    assert fix == "move the Val images out of the subfolders, directly into Val_Folder/img/"


def test_a_text_table_without_its_split_folder_is_one_problem(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"]}, text_at_root=True)
    write_xlsx(root / "Test_text.xlsx", [("t1.png", "x"), ("t2.png", "y")])
    _, problems = read_dataset_with_problems(root)
    (problem,) = problems
    assert problem.file == root / "Test_text.xlsx" and problem.kind == "table-without-split"
    assert problem.message == "Test_text.xlsx holds the texts of the Test split, but there is no Test_Folder/"


def test_a_split_folder_without_img_keeps_its_masks_in_view(tmp_path):
    root = make_lvit(tmp_path / "ds", {"Train": ["a"], "Val": ["v"]})
    shutil.rmtree(root / "Val_Folder" / "img")
    _, problems = read_dataset_with_problems(root)
    no_img = _problem(problems, "no-img-folder")
    assert no_img.message == "Val_Folder has no img/ folder (it holds labelcol/)"
    assert no_img.fix == "put the Val images in Val_Folder/img/"  # not "delete the empty Val_Folder"
    assert _problem(problems, "mask-without-image").file == root / "Val_Folder" / "labelcol" / "v.png"
    assert _problem(problems, "row-without-image").message == "row 2 ('v.png') matches no image in Val_Folder/img/"
