"""Near names: one name misspelled, not two numbered files."""

from __future__ import annotations

import pytest

from medtextseg.data.names import misspelled, near_pairs


@pytest.mark.parametrize(("a", "b", "near"), [
    ("case_96_1", "cse_96_1", True),      # deletion
    ("case_96_1", "casee_96_1", True),    # insertion
    ("case_96_1", "cace_96_1", True),     # substitution
    ("case_96_1", "csae_96_1", True),     # two neighbours swapped
    ("Case_96_1", "cse_96_1", True),      # letter case is ignored
    ("case_1_12", "case_1_13", False),    # another number: another file
    ("case_96_1", "case_961", False),     # the numbers differ too (96, 1 vs 961)
    ("case_96_1", "cs_96_1", False),      # two edits
    ("case_96_1", "case_96_1", False),    # equal: an exact match, not a near one
    ("abcd", "acbe", False),
])
def test_misspelled(a, b, near):
    assert misspelled(a, b) is near and misspelled(b, a) is near


def test_near_pairs_are_unambiguous_both_ways():
    assert near_pairs(["case_1", "case_2"], ["cse_1", "cse_2", "other"]) == {"case_1": "cse_1", "case_2": "cse_2"}
    assert near_pairs(["case_1"], ["cse_1", "cas_1"]) == {}      # two candidates for one name
    assert near_pairs(["case_1", "cose_1"], ["cse_1"]) == {}     # two names for one candidate
    assert near_pairs([], ["cse_1"]) == near_pairs(["x"], []) == {}
