"""Synthetic spine MR generator: determinism, whole-case splits, 20-class masks, text/mask
agreement, field-of-view variation, the real text grammar and the CLI option."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from _synth import cli
from openpyxl import load_workbook
from PIL import Image
from test_synthetic import _tree

from medtextseg.data.sample import SPLITS
from medtextseg.data.synthetic import GENERATORS
from medtextseg.data.synthetic.common import connected_components
from medtextseg.data.synthetic.layout import IMAGE_DIR, MASK_DIR, split_folder, text_file_name
from medtextseg.data.synthetic.spine_mr import (
    DISC_STATES,
    N_CLASSES,
    TOKENS,
    VERTEBRA_STATES,
    SpineMRConfig,
    case_slice_count,
    parse_spine_text,
    render_spine_slice,
    token_class,
)

# small slices keep the file fast; 64 wide is the smallest size the renderer is tuned for
TINY = {"n_cases": 4, "size": 64}
# the real files' tokens, in order (train_val_text.xlsx)
REAL_TOKENS = [
    "T9", "T910", "T10", "T1011", "T11", "T1112", "T12", "T121", "L1", "L12",
    "L2", "L23", "L3", "L34", "L4", "L45", "L5", "L56", "S",
]  # fmt: skip
NAME = re.compile(r"case_(\d{3})_s(\d{2})\.png")


def _rows(root: Path) -> dict[str, tuple[str, str]]:
    """file name -> (split, description) over the three splits."""
    out = {}
    for split in SPLITS:
        ws = load_workbook(root / split_folder(split) / text_file_name(split)).active
        for name, text in list(ws.iter_rows(values_only=True))[1:]:
            out[name] = (split, text)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spine") / "a"
    GENERATORS["spine-mr"](out, seed=3, **TINY)
    return out


def test_deterministic_per_seed(tiny, tmp_path):
    GENERATORS["spine-mr"](tmp_path / "b", seed=3, **TINY)
    assert _tree(tiny) == _tree(tmp_path / "b")
    GENERATORS["spine-mr"](tmp_path / "c", seed=4, **TINY)
    assert _tree(tiny) != _tree(tmp_path / "c")


def test_splits_hold_whole_cases_and_names_carry_case_and_slice(tiny):
    rows = _rows(tiny)
    split_of_case: dict[int, set[str]] = {}
    for name, (split, _) in rows.items():
        m = NAME.fullmatch(name)
        assert m, name
        split_of_case.setdefault(int(m.group(1)), set()).add(split)
    assert all(len(s) == 1 for s in split_of_case.values())
    assert sorted(split_of_case) == list(range(TINY["n_cases"]))
    cfg = SpineMRConfig(size=TINY["size"])
    assert len(rows) == sum(case_slice_count(3, c, cfg) for c in range(TINY["n_cases"]))


def test_masks_are_class_ids_and_agree_with_texts(tiny):
    seen_states = set()
    for name, (split, text) in _rows(tiny).items():
        folder = tiny / split_folder(split)
        image = np.asarray(Image.open(folder / IMAGE_DIR / name))
        mask = np.asarray(Image.open(folder / MASK_DIR / name))
        assert image.ndim == 2 and image.shape == mask.shape == (128, 64)  # H x W, not square
        assert mask.dtype == np.uint8 and mask.max() < N_CLASSES
        present = set(np.unique(mask).tolist())
        states = parse_spine_text(text)
        for t, state in enumerate(states):
            cls = token_class(t)
            assert state in (VERTEBRA_STATES if t % 2 == 0 else DISC_STATES), text
            assert (state == "none") == (cls not in present), (name, TOKENS[t], state)
            if state == "link":
                assert connected_components(mask == cls)[0] == 1, (name, TOKENS[t])
            elif state == "split":
                assert connected_components(mask == cls)[0] >= 2, (name, TOKENS[t])
            seen_states.add(state)
        assert present - {0} <= {token_class(t) for t in range(len(TOKENS))}
    assert {"spinous", "link", "split", "exist", "none"} <= seen_states


def test_vertebra_states_follow_the_parts_map():
    """The documented definitions, checked with the body/posterior parts of each class."""
    cfg = SpineMRConfig(size=64)
    for case in range(3):
        for s in range(case_slice_count(0, case, cfg)):
            item = render_spine_slice(0, case, s, s, cfg)
            for t in range(0, len(TOKENS), 2):
                cls = token_class(t)
                where = item.mask == cls
                body = bool((where & (item.parts == 1)).any())
                post = bool((where & (item.parts == 2)).any())
                state = item.states[t]
                expected = {
                    (False, False): "none",
                    (True, False): "vertebral",
                    (False, True): "spinous",
                }.get((body, post))
                if expected is None:
                    n, _ = connected_components(where)
                    expected = "link" if n == 1 else "split"
                assert state == expected, (case, s, TOKENS[t])
            assert ((item.parts > 0) <= (item.mask > 0)).all()


def test_field_of_view_top_level_varies():
    cfg = SpineMRConfig(size=64)
    tops = {render_spine_slice(0, c, 0, 0, cfg).top_level for c in range(24)}
    assert len(tops) >= 2 and tops <= {"T9", "T10", "T11", "T12"}


def test_text_uses_the_real_tokens_in_order():
    assert tuple(REAL_TOKENS) == TOKENS
    item = render_spine_slice(0, 0, 5, 5, SpineMRConfig(size=64))
    assert [p.split(" ")[0] for p in item.text.split(", ")] == REAL_TOKENS
    assert item.image.shape[0] == 2 * item.image.shape[1]


def test_text_noise_misspells_one_state(tmp_path):
    GENERATORS["spine-mr"](tmp_path / "n", seed=3, n_cases=1, size=64, text_noise=1.0)
    for _, text in _rows(tmp_path / "n").values():
        words = [p.split(" ")[1] for p in text.split(", ")]
        assert sum(w not in VERTEBRA_STATES + DISC_STATES for w in words) == 1


def test_cli_n_cases(tmp_path):
    r = cli("synth", "spine-mr", "--n-cases", 2, "--size", 64, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s").rglob("labelcol/case_*.png"))) >= 24
    r = cli("synth", "lung-ct", "--n-cases", 2, "--size", 32, "--out", tmp_path / "x")
    assert r.exit_code != 0 and "--n-cases" in r.output


REAL_SPINE_TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spine_text" / "train_val_text.xlsx"


def _slips(word: str) -> set[str]:
    """The generator's (and the real file's) kinds of slip: swap two letters, drop or double the last."""
    out = {word[:-1], word + word[-1]}
    out |= {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(1, len(word) - 1)}
    return out - {word}


def test_misspelt_states_fold_into_their_word_and_a_wrong_one_is_named():
    text = render_spine_slice(0, 0, 6, 0).text
    pairs = [p.split(" ") for p in text.split(", ")]
    for t in (pairs.index(next(p for p in pairs if p[0] == "L3")), pairs.index(next(p for p in pairs if p[0] == "L34"))):
        for slip in _slips(pairs[t][1]):
            bent = ", ".join(" ".join([p[0], slip] if i == t else p) for i, p in enumerate(pairs))
            assert parse_spine_text(bent) == parse_spine_text(text), slip
    # a word near no state, and a vertebra state on a disc, are refused with the token named
    for tok, word in (("L3", "broken"), ("L34", "link")):
        bad = ", ".join(f"{p[0]} {word}" if p[0] == tok else " ".join(p) for p in pairs)
        with pytest.raises(ValueError, match=f"{tok} '{word}'.*one of"):
            parse_spine_text(bad)


@pytest.mark.skipif(not REAL_SPINE_TEXTS.is_file(), reason="../shared/data/spine_text not present")
def test_every_real_spine_text_parses():
    texts = [c for row in load_workbook(REAL_SPINE_TEXTS, read_only=True).active.iter_rows(values_only=True)
             for c in row if isinstance(c, str) and c.count(",") == len(TOKENS) - 1]
    assert len(texts) == 2712
    states = [parse_spine_text(t) for t in texts]
    assert all(s in (VERTEBRA_STATES if i % 2 == 0 else DISC_STATES) for row in states for i, s in enumerate(row))
