"""Composite data (issue 12): several roots, one domain each, through reader, splits,
batches, oversampling, the network's indicator, metrics and the command line."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import yaml
from _synth import SMOKE, cli, tiny_cxr

from medtextseg.config import DataConfig
from medtextseg.data.fingerprint import dataset_fingerprint
from medtextseg.data.module import collate, domain_index, make_dataset, oversample_factors
from medtextseg.data.sample import Sample
from medtextseg.data.sources import DataSources
from medtextseg.data.splits import split_by_ratio
from medtextseg.data.synthetic import GENERATORS
from medtextseg.data.validation import dataset_notes, validate_dataset
from medtextseg.engine import split_figures
from medtextseg.text import build_text_encoder


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two chest X-ray roots whose files have the same names (case ids clash), and a lung CT root."""
    a = tiny_cxr(tmp_path_factory, "cxr", seed=0)
    b = tiny_cxr(tmp_path_factory, "cxr_b", seed=1)
    ct = tmp_path_factory.mktemp("synth") / "ct"
    GENERATORS["lung-ct"](ct, n=30, seed=0, size=64)
    return a, b, ct


def test_two_roots_with_clashing_ids_are_qualified_by_domain(roots):
    a, b, _ = roots
    one = validate_dataset(a, need_splits=("Train", "Val"))
    both = validate_dataset([a, b], need_splits=("Train", "Val"))  # no duplicate-id problem
    stems = {s.id for s in one}
    assert {s.id.split("/", 1)[1] for s in both if s.domain == "cxr_b"} == stems  # the same file names
    assert {s.id for s in both} == {f"cxr/{i}" for i in stems} | {f"cxr_b/{i}" for i in stems}
    assert {s.domain for s in both} == {"cxr", "cxr_b"}
    # One root keeps plain ids and its fingerprint; the composite has its own.
    assert all("/" not in s.id for s in one)
    assert dataset_fingerprint(both, [a, b]) != dataset_fingerprint(one, a)


def test_a_composite_fingerprint_survives_moving_one_root(roots, tmp_path):
    """Paths count relative to each sample's own root, not to the roots' common folder."""
    import shutil

    a, _, ct = roots
    fp = dataset_fingerprint(validate_dataset([a, ct]), [a, ct])
    moved = tmp_path / "elsewhere" / "deeper" / "ct"
    shutil.copytree(ct, moved)
    assert dataset_fingerprint(validate_dataset([a, moved]), [a, moved]) == fp
    mask = min((moved / "Test_Folder" / "labelcol").iterdir())
    mask.write_bytes(mask.read_bytes() + b"\0")  # the same names, another file
    assert dataset_fingerprint(validate_dataset([a, moved]), [a, moved]) != fp


def test_sources_are_named_by_folder_or_name_and_round_trip(roots, tmp_path):
    a, b, _ = roots
    src = DataSources.parse([f"xray={a}", str(b)])
    assert [src.default_name(i) for i in range(2)] == ["xray", "cxr_b"]
    assert src.label == "xray+cxr_b" and DataSources.parse(src.record()) == src
    assert DataSources.parse(tmp_path / "mnt" / "qata" / "manifest.csv").label == "qata"  # its folder, as before
    assert DataSources.parse(str(a)).record() == str(a)  # one root: the plain path, as before
    assert {s.domain for s in validate_dataset(src)} == {"xray", "cxr_b"}
    with pytest.raises(ValueError, match="both named 'cxr'"):
        DataSources.parse([a, tmp_path / "x" / "cxr"])
    with pytest.raises(ValueError, match="given twice"):
        DataSources.parse([a, a])
    with pytest.raises(ValueError, match="not a domain name"):
        DataSources.parse(["bad name=/x"])


def test_a_domain_named_twice_is_one_problem(roots):
    a, b, _ = roots
    from medtextseg.data.readers import read_dataset_with_problems

    _, problems = read_dataset_with_problems([f"same={a}", f"same2={b}"])
    assert problems == []
    # A manifest whose rows claim another root's domain.
    manifest = b.parent / "claims.csv"
    img = next((a / "Train_Folder" / "img").iterdir())
    with open(manifest, "w", newline="") as h:
        csv.writer(h).writerows([["image", "mask", "text", "split", "domain"],
                                 [str(img), "", "a text", "train", "cxr"]])
    _, problems = read_dataset_with_problems([a, manifest])
    assert [p.kind for p in problems] == ["domain-twice"]


def _samples(counts: dict[str, int]) -> list[Sample]:
    from pathlib import Path

    return [Sample(f"{d}/{i}", Path(f"{d}{i}.png"), Path(f"m{d}{i}.png"), "t", "Train", d)
            for d, n in counts.items() for i in range(n)]


def test_labeled_ratio_is_stratified_per_domain_and_nested():
    samples = _samples({"ct": 8, "cxr": 40})
    quarter, half = split_by_ratio(samples, 0.25, seed=3), split_by_ratio(samples, 0.5, seed=3)
    by = {d: sum(i.startswith(d + "/") for i in quarter.labeled) for d in ("ct", "cxr")}
    assert by == {"ct": 2, "cxr": 10}
    assert set(quarter.labeled) <= set(half.labeled)
    # A domain trained alone (plain ids) keeps the labeled images it has in the composite.
    alone = [dataclasses.replace(s, id=s.id.split("/", 1)[1]) for s in samples if s.domain == "cxr"]
    assert [f"cxr/{i}" for i in split_by_ratio(alone, 0.25, seed=3).labeled] == [
        i for i in quarter.labeled if i.startswith("cxr/")]


def test_oversampling_balances_the_domains_of_an_epoch():
    samples = _samples({"ct": 2, "cxr": 6})
    f = oversample_factors(samples, "balance")
    assert f.tolist() == [3, 3] + [1] * 6
    assert oversample_factors(samples, "none").tolist() == [1] * 8
    assert oversample_factors(samples, "ct=2").tolist() == [2, 2] + [1] * 6
    assert oversample_factors(_samples({"cxr": 5}), "balance").tolist() == [1] * 5
    with pytest.raises(ValueError, match="NAME=INT"):
        oversample_factors(samples, "ct:2")
    # Keywords in any case; names as the domains are spelled, and only the data's domains.
    assert oversample_factors(samples, " Balance ").tolist() == f.tolist()
    assert oversample_factors(_samples({"CT": 2, "cxr": 6}), "CT=2").tolist() == [2, 2] + [1] * 6
    with pytest.raises(ValueError, match="'ct' is not a domain"):
        oversample_factors(_samples({"CT": 2, "cxr": 6}), "ct=2")


def test_oversampled_composite_data_trains_epi_and_bad_settings_are_refused_before_writing(roots, tmp_path):
    """An oversampled epoch has more items than images: the EPI bank is sized by images.
    A malformed oversampling rule or a repeated domain is refused before anything is written."""
    a, _, ct = roots
    out = tmp_path / "epi"
    r = cli("train", "--preset", "lvit-t-semi", *SMOKE, "data.oversample=ct=2", "--data", a, "--data", ct,
            "--labeled-ratio", "0.5", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["Test"]["domains"].keys() == {"ct", "cxr"}
    for bad, msg in (("data.oversample=mr=2", "'mr' is not a domain"),
                     ("data.domains=[ct, cxr, ct]", "more than once")):
        r = cli("train", "--preset", "unet", *SMOKE, bad, "--data", a, "--data", ct, "--out", tmp_path / "bad")
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not (tmp_path / "bad").exists()


def test_domain_reaches_the_batch_and_oversampled_images_repeat(roots):
    a, _, ct = roots
    samples = [s for s in validate_dataset([a, ct]) if s.split == "Train"]
    cfg = DataConfig(img_size=32, augment="none", domains=["ct", "cxr"])
    enc = build_text_encoder("learned", max_len=8, dim=8)
    enc.fit([s.text for s in samples])
    ds = make_dataset(samples, enc, cfg, train=True)
    n_ct, n_cxr = (sum(s.domain == d for s in samples) for d in ("ct", "cxr"))
    factor = max(1, round(max(n_ct, n_cxr) / min(n_ct, n_cxr)))
    assert len(ds) == max(n_ct, n_cxr) + factor * min(n_ct, n_cxr)
    batch = collate([ds[i] for i in range(len(ds))])
    expect = [cfg.domains.index(samples[i].domain) for i in batch["index"].tolist()]
    assert batch["domain"].tolist() == expect and set(expect) == {0, 1}
    assert domain_index(samples, ["only"]).tolist() == [0] * len(samples)  # one domain: all 0
    with pytest.raises(ValueError, match="not among the run's domains"):
        domain_index(samples, ["cxr", "mr"])


def test_per_domain_figures_and_the_mean_of_domain_means():
    rows = [{"domain": d, "dice": v, "iou": v, "dice_orig": v, "iou_orig": v}
            for d, v in (("a", 1.0), ("a", 0.0), ("a", 0.5), ("b", 1.0))]
    f = split_figures(rows)
    assert f["dice"] == pytest.approx(2.5 / 4) and f["n"] == 4
    assert f["domains"]["a"]["dice"] == pytest.approx(0.5) and f["domains"]["a"]["n"] == 3
    assert f["domain_mean"]["dice"] == pytest.approx(0.75)
    assert "domains" not in split_figures(rows[:3])


def test_a_domain_without_a_split_is_a_note(roots, tmp_path):
    a, _, ct = roots
    samples = [s for s in validate_dataset([a, ct]) if not (s.domain == "ct" and s.split == "Test")]
    notes = dataset_notes(samples, need_splits=("Train", "Val"))
    assert any("domain 'ct' has no Test images" in n for n in notes)


def test_cli_composite_train_evaluate_report(roots, tmp_path):
    """`--data` twice: one TextMoE model, domains in config.yaml, per-domain figures and rows."""
    a, _, ct = roots
    out = tmp_path / "run"
    r = cli("train", "--preset", "textmoe", *SMOKE, "--data", a, "--data", ct, "--labeled-ratio", "0.5",
            "--out", out)
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["domains"] == ["ct", "cxr"]
    split = json.loads((out / "split.json").read_text())
    assert {i.split("/")[0] for i in split["labeled"]} == {"ct", "cxr"}
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["Test"]
    assert set(test["domains"]) == {"ct", "cxr"}
    assert test["n"] == sum(d["n"] for d in test["domains"].values())
    assert test["domain_mean"]["dice"] == pytest.approx(np.mean([d["dice"] for d in test["domains"].values()]))
    with open(out / "per_image.csv") as h:
        rows = list(csv.DictReader(h))
    assert {r["domain"] for r in rows if r["split"] == "Test"} == {"ct", "cxr"}
    # Evaluate on the same roots in another order: the run's own data (same fingerprint).
    r = cli("evaluate", out, "--data", ct, "--data", a, "--split", "Test")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert all(any(f" {n} │" in x for x in lines) for n in ("all", "ct", "cxr", "mean")), r.output
    # A root whose domain the run never saw is refused before anything is written.
    r = cli("evaluate", out, "--data", f"mr={ct}", "--data", a, "--split", "Test")
    assert r.exit_code == 2 and "not among the run's domains" in r.output
    assert not (out / "evaluations").exists()
    r = cli("report", out, "--out", tmp_path / "report", "--n-images", "2")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "textmoe · ct" in md and "textmoe · mean of domains" in md
    # predict: a folder of images is one domain, and a composite run must be told which.
    images = ct / "Test_Folder" / "img"
    r = cli("predict", out, "--images", images, "--out", tmp_path / "p", "--text", "Lesion in the left lung.")
    assert r.exit_code == 2 and "--domain ct" in r.output and not (tmp_path / "p").exists()
    r = cli("predict", out, "--images", images, "--out", tmp_path / "p", "--text", "Lesion in the left lung.",
            "--domain", "ct")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "p" / "masks").iterdir())) == len(list(images.iterdir()))
    r = cli("check-data", a, ct)
    assert r.exit_code == 0 and "domain ct" in r.output and "domain cxr" in r.output


def test_one_manifest_with_a_domain_column_trains_like_two_roots(roots, tmp_path):
    """`train --data manifest.csv`: the domain column gives the same domains, ids and splits
    as `--data cxr --data ct`."""
    a, _, ct = roots
    samples = validate_dataset([a, ct])
    manifest = tmp_path / "all.csv"
    with open(manifest, "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["image", "mask", "text", "split", "domain"])
        for s in samples:
            w.writerow([s.image_path, s.mask_path or "", s.text, s.split, s.domain])
    assert {s.id for s in validate_dataset(manifest)} == {s.id for s in samples}
    out = tmp_path / "run"
    r = cli("train", "--preset", "textmoe", *SMOKE, "--data", manifest, "--labeled-ratio", "0.5", "--out", out)
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["domains"] == ["ct", "cxr"]
    roots_split = split_by_ratio(samples, 0.5, seed=cfg["train"]["seed"]).labeled
    assert json.loads((out / "split.json").read_text())["labeled"] == list(roots_split)
    assert set(json.loads((out / "metrics.json").read_text())["Test"]["domains"]) == {"ct", "cxr"}


def test_the_runs_domains_size_the_indicator_and_reach_inference():
    import torch

    from medtextseg.config import load_preset
    from medtextseg.methods import method_class

    cfg = load_preset("textmoe", "smoke", ["data.domains=[ct, cxr]", "network.options={drop_path: 0.0}"])
    enc = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim)
    enc.fit(["two infected areas, upper left lung"])
    torch.manual_seed(0)
    m = method_class(cfg.method)(cfg.to_dict(), text_state=enc.state(), text_dim=cfg.text.dim).eval()
    assert m.net.num_domains == 2
    images, text = torch.rand(2, 3, 64, 64), torch.randint(1, 8, (2, cfg.text.max_len))
    with torch.no_grad():
        as_ct = m.infer(images, text, torch.tensor([0, 0]))
        as_cxr = m.infer(images, text, torch.tensor([1, 1]))
    assert not torch.allclose(as_ct, as_cxr)  # the indicator changes the gates
    with pytest.raises(ValueError, match="unknown option"):
        from medtextseg.methods.base import network_from_config

        network_from_config(load_preset("textmoe", "smoke", ["network.options={nosuch: 1}"]), 32)
