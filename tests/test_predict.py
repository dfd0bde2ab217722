"""predict: output folder rules, name collisions, one error for all input problems before the
model loads, messages per input mode, device and batching, return value, atomic writes.

One tiny run is trained per module (smoke tier, 1 epoch); each test predicts a few 64 px images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medtextseg.predict as P
from medtextseg.config import load_preset
from medtextseg.data.synthetic import GENERATORS
from medtextseg.data.validation import DataError
from medtextseg.engine import train
from medtextseg.predict import OutputError, predict

TEXT = "Bilateral infection, two areas."  # short: the smoke encoder holds 12 tokens
ROW = "Left lung infection."  # a CSV cell without commas


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[Path]:
    """A few synthetic test images to copy into per-test input folders."""
    data = tmp_path_factory.mktemp("synth") / "cxr"
    GENERATORS["chest-xray"](data, n=12, seed=5, size=64)
    return sorted((data / "Test_Folder" / "img").iterdir())


@pytest.fixture(scope="module")
def run(pool, tmp_path_factory) -> Path:
    data = pool[0].parents[2]
    out = tmp_path_factory.mktemp("runs") / "lvit-t"
    train(load_preset("lvit-t", "smoke", ["data.augment=none", "train.max_epochs=1"]), data, out, progress=False)
    return out


def _images(tmp_path: Path, pool: list[Path], names: list[str], folder: str = "img") -> Path:
    """Copy pool images into ``tmp_path/folder`` under ``names`` (suffix decides the format)."""
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    for src, name in zip(pool * 3, names):
        Image.open(src).convert("RGB").save(d / name)
    return d


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _no_model(monkeypatch):
    """Make loading the model fail loudly: tests that expect an input error prove it came first."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(P, "load_run", boom)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 6. return value / happy path

def test_returns_the_mask_paths_written_one_per_input(run, pool, tmp_path):
    images = _images(tmp_path, pool, ["b.png", "a.jpg", "c.bmp"])
    written = predict(run, images, tmp_path / "out", text=TEXT)
    assert written == [tmp_path / "out" / "masks" / n for n in ("a.png", "b.png", "c.png")]
    for p in written:
        src = Image.open(images / next(f.name for f in images.iterdir() if f.stem == p.stem))
        assert Image.open(p).size == src.size
        assert set(np.unique(np.asarray(Image.open(p))).tolist()) <= {0, 255}
        assert (tmp_path / "out" / "overlays" / p.name).is_file()
    assert not list((tmp_path / "out").rglob("*.tmp")), "atomic writes left temp files"
    assert not (tmp_path / "out" / "legend.png").exists()  # binary: one colour, no legend


def test_csv_mode_returns_one_path_per_image_by_name_or_stem(run, pool, tmp_path):
    images = _images(tmp_path, pool, ["x1.png", "x2.png"])
    table = _csv(tmp_path / "t.csv", f"Image,Text\nx1.png,{ROW}\nx2,\"Left lung, lower lobe.\"\n")
    written = predict(run, images, tmp_path / "out", texts=table)
    assert [p.name for p in written] == ["x1.png", "x2.png"] and all(p.is_file() for p in written)


# ------------------------------------------------------------------ 1. output folder

def test_non_empty_out_is_refused_without_overwrite(run, pool, tmp_path):
    images = _images(tmp_path, pool, ["a.png", "b.png"])
    out = tmp_path / "out"
    predict(run, images, out, text=TEXT)
    before = _tree(out)
    with pytest.raises(OutputError, match="--overwrite") as e:
        predict(run, images, out, text=TEXT)
    assert str(out) in str(e.value)
    assert _tree(out) == before


def test_out_holding_any_other_file_is_refused_without_overwrite(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        predict(run, images, tmp_path / "out", text=TEXT)


def test_overwrite_replaces_old_outputs_instead_of_mixing(run, pool, tmp_path):
    out = tmp_path / "out"
    predict(run, _images(tmp_path, pool, ["old1.png", "old2.png", "same.png"], "first"), out, text=TEXT)
    written = predict(run, _images(tmp_path, pool, ["same.png", "new.png"], "second"), out, text=TEXT,
                      overwrite=True)
    assert len(written) == 2
    for sub in ("masks", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["new.png", "same.png"]


def test_overwrite_never_deletes_files_predict_did_not_write(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png"])
    # A folder named legend.png is not the legend predict writes (a file).
    for foreign in ("report.md", "masks/ground_truth.tif", "overlays/sub/x.png", "legend.png/x.png"):
        out = tmp_path / f"out_{foreign.replace('/', '_')}"
        (out / foreign).parent.mkdir(parents=True)
        (out / foreign).write_text("not a prediction")
        before = _tree(out)
        with pytest.raises(OutputError, match="did not write"):
            predict(run, images, out, text=TEXT, overwrite=True)
        assert _tree(out) == before


@pytest.mark.parametrize("where", ["same", "out inside images", "images inside out"])
def test_out_overlapping_the_images_is_refused_even_with_overwrite(run, pool, tmp_path, monkeypatch, where):
    _no_model(monkeypatch)
    if where == "images inside out":
        images = _images(tmp_path, pool, ["a.png"], "out/masks")  # looks like a predict output
        out = tmp_path / "out"
    else:
        images = _images(tmp_path, pool, ["a.png"])
        out = images if where == "same" else images / "pred"
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="overlap"):
        predict(run, images, out, text=TEXT, overwrite=True)
    assert _tree(tmp_path) == before


def test_rerun_with_overwrite_after_an_interrupted_run(run, pool, tmp_path, monkeypatch):
    images = _images(tmp_path, pool, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    out = tmp_path / "out"
    real = P.write_png_atomic
    calls = []

    def dies_midway(path, array):
        calls.append(path)
        if len(calls) == 4:
            # A killed write. Writers run in threads, so this folder may not exist yet.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).parent.joinpath(f".{Path(path).name}.dead.tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(path, array)

    monkeypatch.setattr(P, "write_png_atomic", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        predict(run, images, out, text=TEXT, batch_size=2)
    monkeypatch.setattr(P, "write_png_atomic", real)
    with pytest.raises(OutputError, match="--overwrite"):
        predict(run, images, out, text=TEXT)
    written = predict(run, images, out, text=TEXT, overwrite=True)
    assert len(written) == 5 and sorted(p.name for p in (out / "masks").iterdir()) == [p.name for p in written]
    assert not list(out.rglob("*.tmp"))


# ------------------------------------------------------------------ 2. output name collisions

@pytest.mark.parametrize("names", [["a.png", "a.jpg"], ["A.png", "a.png"], ["Scan.TIF", "scan.bmp", "b.png"]])
def test_colliding_output_names_are_refused_before_writing(run, pool, tmp_path, monkeypatch, names):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, names)
    if len(list(images.iterdir())) < len(names):
        pytest.skip("case-insensitive file system: the two names are one file here")
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", text=TEXT)
    colliding = [n for n in names if n.lower().startswith(names[0][0].lower())]
    assert len(e.value.problems) == 1
    assert all(n in str(e.value) for n in colliding) and "rename" in str(e.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 3. every problem at once, first

def test_all_input_problems_in_one_error_before_the_model_loads(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png", "a.jpg", "b.png", "c.png"])
    (images / "broken.png").write_bytes(Image.open(images / "b.png").tobytes()[:50])  # not a PNG
    table = _csv(tmp_path / "t.csv", f"image,text\na.png,{ROW}\na.jpg,{ROW}\nb.png,{ROW}\n"
                                     f"broken.png,{ROW}\nghost.png,{ROW}\n")
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", texts=table)
    msg = str(e.value)
    assert len(e.value.problems) == 4, msg
    assert "a.jpg, a.png" in msg          # collision
    assert "broken.png: unreadable" in msg
    assert "c.png: no text: t.csv has no row" in msg         # image without text
    assert "'ghost.png'" in msg           # row naming no image
    assert not (tmp_path / "out").exists()


def test_input_problems_leave_an_existing_out_untouched_even_with_overwrite(run, pool, tmp_path, monkeypatch):
    images = _images(tmp_path, pool, ["a.png", "b.png"])
    out = tmp_path / "out"
    predict(run, images, out, text=TEXT)
    before = _tree(out)
    _no_model(monkeypatch)
    with pytest.raises(DataError, match="--text is empty"):
        predict(run, images, out, text="  ", overwrite=True)
    assert _tree(out) == before


# ------------------------------------------------------------------ 4. messages per input mode

@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_text_says_the_text_is_empty(run, pool, tmp_path, monkeypatch, text):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png", "b.png"])
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", text=text)
    assert len(e.value.problems) == 1, "one problem for the one --text, not one per image"
    assert "the --text is empty" in str(e.value) and "None" not in str(e.value)


def test_missing_csv_row_names_the_csv(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png", "b.png"])
    table = _csv(tmp_path / "t.csv", f"image,text\na.png,{ROW}\nb.png,   \n")
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", texts=table)
    assert len(e.value.problems) == 1 and "t.csv" in str(e.value) and "empty text" in str(e.value)
    assert "None" not in str(e.value)


@pytest.mark.parametrize("content", ["file,description\na.png,x\n", "image\na.png\n", "", "text,img\nx,a.png\n"])
def test_csv_with_wrong_columns_names_the_file_and_the_columns(run, pool, tmp_path, monkeypatch, content):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png"])
    table = _csv(tmp_path / "texts.csv", content)
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", texts=table)
    assert len(e.value.problems) == 1, "the per-image 'no row' noise is left out"
    assert str(table) in str(e.value) and "image,text" in str(e.value)


def test_missing_csv_file_is_named(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png"])
    with pytest.raises(DataError, match="does not exist") as e:
        predict(run, images, tmp_path / "out", texts=tmp_path / "nope.csv")
    assert "nope.csv" in str(e.value)


@pytest.mark.parametrize("key", ["A.PNG", "A", "img/a.png"])
def test_csv_row_that_misses_by_case_or_folder_is_one_clear_message(run, pool, tmp_path, monkeypatch, key):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png", "b.png"])
    table = _csv(tmp_path / "t.csv", f"image,text\n{key},{ROW}\nb,{ROW}\n")
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", texts=table)
    assert len(e.value.problems) == 1, str(e.value)
    assert f"names {key!r}, but the image is 'a.png'" in str(e.value)


def test_csv_row_with_a_misspelled_name_is_one_problem_and_numbers_are_not_typos(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["case_96_1.png", "case_1_12.png"])
    table = _csv(tmp_path / "t.csv", f"image,text\ncse_96_1.png,{ROW}\ncase_1_13,{ROW}\n")
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", texts=table)
    msgs = sorted(p.message for p in e.value.problems)
    assert msgs == [
        "no text: t.csv has no row for this image",  # case_1_12: another number, another image
        "row 2 names 'cse_96_1.png', but the image is 'case_96_1.png': one name misspelled?",
        f"row 3 names 'case_1_13', which is not an image in {images}",
    ]


def test_csv_row_with_unquoted_commas_and_conflicting_rows(run, pool, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    images = _images(tmp_path, pool, ["a.png", "b.png"])
    table = _csv(tmp_path / "t.csv", "image,text\na.png,left lung, lower lobe\nb,one\nb.png,two\n")
    with pytest.raises(DataError) as e:
        predict(run, images, tmp_path / "out", texts=table)
    msg = str(e.value)
    assert len(e.value.problems) == 2, "a.png is not also reported as lacking a row"
    assert "row 2 has 3 fields" in msg and "quotes" in msg
    assert "rows 3, 4 all describe 'b.png'" in msg


def test_exactly_one_text_option(run, pool, tmp_path):
    images = _images(tmp_path, pool, ["a.png"])
    with pytest.raises(ValueError, match="not both"):
        predict(run, images, tmp_path / "out", text=TEXT, texts=tmp_path / "t.csv")
    with pytest.raises(ValueError, match="--text"):
        predict(run, images, tmp_path / "out")


# ------------------------------------------------------------------ 5. device and batching

def test_auto_device_goes_to_load_run(run, pool, tmp_path, monkeypatch):
    seen = []
    real = P.load_run
    monkeypatch.setattr(P, "resolve_device", lambda d: seen.append(d) or torch.device("cpu"))
    monkeypatch.setattr(P, "load_run", lambda r, device: seen.append(device) or real(r, device=device))
    predict(run, _images(tmp_path, pool, ["a.png"]), tmp_path / "out", text=TEXT)
    assert seen == ["auto", torch.device("cpu")]


@pytest.mark.parametrize("kw", [{"device": "cuda:99"}, {"device": "tpu"}, {"batch_size": 0}])
def test_bad_device_or_batch_size_fails_before_anything(run, pool, tmp_path, monkeypatch, kw):
    _no_model(monkeypatch)
    with pytest.raises(ValueError):
        predict(run, _images(tmp_path, pool, ["a.png"]), tmp_path / "out", text=TEXT, **kw)
    assert not (tmp_path / "out").exists()


def test_batch_size_does_not_change_the_masks(run, pool, tmp_path):
    images = _images(tmp_path, pool, [f"i{k}.png" for k in range(5)])
    a = predict(run, images, tmp_path / "a", text=TEXT, batch_size=1)
    b = predict(run, images, tmp_path / "b", text=TEXT, batch_size=3)
    for pa, pb in zip(a, b):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))

