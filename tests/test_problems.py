"""Problem / DataError: kinds, grouping of many similar problems, and that every problem stays available."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_readers import make_lvit, write_binary_mask, write_rgb, write_xlsx

from medtextseg.data import validation
from medtextseg.data.problems import GROUP_SHOWN, DataError, Problem
from medtextseg.data.validation import validate_dataset


def _error(root, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        validate_dataset(root, **kw)
    return info.value


def test_validation_reexports_the_problem_types():
    assert validation.Problem is Problem and validation.DataError is DataError


def test_kind_is_derived_when_not_given_and_is_not_part_of_equality():
    a = Problem(Path("x/a.png"), "mask is not binary: values 0, 7", "convert 'a.png'")
    b = Problem(Path("x/b.png"), "mask is not binary: values 0, 128, 255", "convert 'b.png'")
    assert a.kind and a.kind == b.kind
    assert Problem(Path("a"), "m", "f", kind="k") == Problem(Path("a"), "m", "f", kind="other")
    assert Problem(Path("a"), "one thing", "f").kind != Problem(Path("a"), "another thing", "f").kind
    again = pickle.loads(pickle.dumps(DataError([Problem(Path("a"), "m", "f", kind="k")], "/d")))
    assert again.problems[0].kind == "k" and str(again).startswith("1 problem(s) found in /d:")


def test_jpeg_masks_are_one_group_with_every_problem_kept(tmp_path):
    stems = [f"case{i:02d}" for i in range(24)]
    root = make_lvit(tmp_path / "ds", {"Train": stems, "Val": ["v"]})
    labelcol = root / "Train_Folder" / "labelcol"
    mask = np.zeros((8, 10), np.uint8)
    mask[2:6, 3:8] = 255
    for stem in stems:
        (labelcol / f"{stem}.png").unlink()
        Image.fromarray(mask).save(labelcol / f"{stem}.jpg", quality=75)
    err = _error(root)
    assert len(err.problems) == 24
    assert {p.kind for p in err.problems} == {"mask-not-binary:jpeg"}
    assert all("PNG" in p.fix and "JPEG" in p.fix for p in err.problems)
    lines = str(err).splitlines()
    assert lines[0] == f"24 problem(s) found in {root}:"
    assert [line.startswith("- Train_Folder/labelcol/case0") for line in lines[1:-1]] == [True] * GROUP_SHOWN
    assert lines[-1] == f"  ... and {24 - GROUP_SHOWN} more like it"


def test_size_mismatches_group_even_when_mask_and_image_names_differ(tmp_path):
    # QaTa names masks mask_<image>: a kind derived from the text alone would vary per file.
    root = tmp_path / "QaTa"
    stems = [f"covid_{i}" for i in range(6)]
    for stem in stems:
        write_rgb(root / "Train_Folder" / "img" / f"{stem}.png")
        write_binary_mask(root / "Train_Folder" / "labelcol" / f"mask_{stem}.png", size=(4, 4))
    write_xlsx(root / "Train_Folder" / "Train_text.xlsx", [(f"mask_{s}.png", "x") for s in stems])
    err = _error(root)
    assert len(err.problems) == 6 and {p.kind for p in err.problems} == {"mask-size"}
    assert str(err).splitlines()[-1] == f"  ... and {6 - GROUP_SHOWN} more like it"


def test_kinds_are_grouped_separately_and_a_small_group_is_shown_whole(tmp_path):
    stems = ["a", "b", "c", "d", "e", "f"]
    root = make_lvit(tmp_path / "ds", {"Train": stems, "Val": ["v"]})
    for stem in ("a", "b", "c", "d"):  # GROUP_SHOWN + 1: all shown, no "... and 1 more"
        (root / "Train_Folder" / "img" / f"{stem}.png").write_bytes(b"")
    for stem in ("e", "f"):
        (root / "Train_Folder" / "img" / f"{stem}.png").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    err = _error(root)
    text = str(err)
    assert "more like it" not in text
    assert text.count("the file is empty (0 bytes)") == 4 and text.count("Git LFS pointer") == 2
    kinds = [p.kind for p in err.problems]
    assert kinds == ["unreadable-image:empty"] * 4 + ["unreadable-image:not-an-image"] * 2


def test_problems_of_one_kind_are_listed_together(tmp_path):
    p = [Problem(Path(f"/d/{n}"), f"bad {n}", "fix", kind=k) for n, k in
         (("1", "x"), ("2", "y"), ("3", "x"), ("4", "y"), ("5", "x"), ("6", "x"), ("7", "x"))]
    lines = str(DataError(p, "/d")).splitlines()
    assert lines[1:] == ["- 1: bad 1 -> fix: fix", "- 3: bad 3 -> fix: fix", "- 5: bad 5 -> fix: fix",
                         "  ... and 2 more like it", "- 2: bad 2 -> fix: fix", "- 4: bad 4 -> fix: fix"]
