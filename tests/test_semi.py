"""Semi-supervised training: labeled splits, the EPI bank, the LV loss and its
contrastive labels, Mean Teacher's EMA, augmentation of pseudo labels, resume of
the bank, and a smoke run of every semi-supervised preset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from _kill import Kill, Killed
from PIL import Image

from medtextseg.config import DataConfig, load_preset
from medtextseg.data.module import SegDataset, build_augmentation
from medtextseg.data.readers import read_contrastive_templates
from medtextseg.data.sample import Sample
from medtextseg.data.splits import (
    SplitError,
    apply_split,
    make_split,
    split_by_ratio,
    split_from_ids,
)
from medtextseg.data.synthetic import GENERATORS
from medtextseg.engine import train
from medtextseg.losses import lv_loss, lv_valid
from medtextseg.methods.base import sigmoid_rampup
from medtextseg.methods.lvit_semi import (
    PseudoLabelBank,
    UnlabeledTargets,
    contrastive_labels,
    match_by_text,
)
from medtextseg.methods.mean_teacher import MeanTeacher, ema_decay, ema_update
from medtextseg.text import build_text_encoder

SHARED_TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "data" / "qata_lv_templates"


def _samples(n: int, split: str = "Train") -> list[Sample]:
    return [Sample(f"img{i:03d}", Path(f"{i}.png"), Path(f"m{i}.png"), f"text {i % 3}", split) for i in range(n)]


# -- splits ---------------------------------------------------------------------------
def test_split_is_seeded_and_independent_of_order():
    samples = _samples(40) + _samples(5, "Val")
    a = split_by_ratio(samples, 0.25, seed=1)
    assert len(a.labeled) == 10 and len(a.unlabeled) == 30
    assert set(a.labeled).isdisjoint(a.unlabeled)
    assert split_by_ratio(list(reversed(samples)), 0.25, seed=1) == a
    assert split_by_ratio(samples, 0.25, seed=2).labeled != a.labeled
    half = split_by_ratio(samples, 0.5, seed=1)
    assert set(a.labeled) < set(half.labeled)  # nested across ratios


def test_apply_split_hides_only_unlabeled_train_masks_and_keeps_text():
    samples = _samples(8) + _samples(3, "Val")
    split = split_by_ratio(samples, 0.5, seed=0)
    out = apply_split(samples, split)
    hidden = [s for s in out if s.split == "Train" and not s.labeled]
    assert sorted(s.id for s in hidden) == sorted(split.unlabeled)
    assert all(s.text for s in hidden)
    assert all(s.labeled for s in out if s.split == "Val")
    assert apply_split(samples, make_split(samples, 1.0, "", 0)) == samples


def test_split_from_ids_file_and_errors(tmp_path):
    samples = _samples(6)
    ids = tmp_path / "ids.txt"
    ids.write_text("# labeled\nimg001\nimg004\n")
    split = make_split(samples, 0.25, str(ids), seed=0)  # an id file wins over the ratio
    assert split.labeled == ("img001", "img004") and len(split.unlabeled) == 4
    js = tmp_path / "split.json"
    split.save(js)
    assert make_split(samples, 1.0, str(js), seed=3).labeled == split.labeled
    with pytest.raises(SplitError, match="nope"):
        split_from_ids(samples, ["nope"], 0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SplitError, match="labeled ratio"):
            make_split(samples, bad, "", 0)


# -- EPI bank ---------------------------------------------------------------------------
@pytest.mark.parametrize("memmap", [False, True])
def test_bank_follows_eq9(tmp_path, memmap):
    bank = PseudoLabelBank(3, 4, beta=0.9, dtype="float32", path=tmp_path / "b.bin" if memmap else None)
    p1 = torch.rand(3, 1, 4, 4)
    bank.update(torch.arange(3), p1)
    bank.end_generation()
    assert torch.equal(bank.data, p1)  # P_0 = p_1: no bias towards an arbitrary start
    p2 = torch.rand(2, 1, 4, 4)
    bank.update(torch.tensor([2, 0]), p2)
    torch.testing.assert_close(bank.read(2), 0.9 * p1[2] + 0.1 * p2[0])
    torch.testing.assert_close(bank.read(0), 0.9 * p1[0] + 0.1 * p2[1])
    torch.testing.assert_close(bank.read(1), p1[1])
    if memmap:
        assert (tmp_path / "b.bin").stat().st_size == 3 * 16 * 4
    other = PseudoLabelBank(3, 4, beta=0.9, dtype="float32")
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.data, bank.data) and other.generation == 1
    with pytest.raises(ValueError, match="shape"):
        PseudoLabelBank(2, 4, beta=0.9).load_state_dict(bank.state_dict())


def test_bank_keeps_slow_moves_near_the_threshold():
    # A pixel the model keeps predicting at 0.52 must cross 0.5; float16 cannot
    # represent the steps of 0.0002 at beta = 0.99 (why float32 is the default).
    ones = torch.ones(1, 1, 2, 2)
    for dtype, crosses in (("float32", True), ("float16", False)):
        bank = PseudoLabelBank(1, 2, beta=0.99, dtype=dtype)
        bank.update(torch.tensor([0]), 0.5 * ones)
        bank.end_generation()
        for _ in range(200):
            bank.update(torch.tensor([0]), 0.52 * ones)
        value = bank.read(0).mean().item()
        assert (value > 0.5) is crosses
        if crosses:
            assert value == pytest.approx(0.5 + 0.02 * (1 - 0.99**200), abs=1e-5)


def test_bank_is_shared_with_loader_workers(tmp_path):
    import pickle

    for bank in (PseudoLabelBank(4, 2, beta=0.5, shared=True), PseudoLabelBank(4, 2, beta=0.5, path=tmp_path / "b")):
        ds = _BankDataset(bank)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
        assert next(iter(loader)).sum().item() == 0
        bank.update(torch.arange(4), torch.ones(4, 1, 2, 2))  # main process, after the workers started
        assert next(iter(loader)).sum().item() == 16
    copy = pickle.loads(pickle.dumps(bank))  # what spawn/forkserver workers receive: the file, not a copy
    bank.update(torch.tensor([1]), torch.zeros(1, 1, 2, 2))
    assert copy.read(1).sum().item() == 0


class _BankDataset(torch.utils.data.Dataset):
    def __init__(self, bank):
        self.bank = bank

    def __len__(self):
        return len(self.bank)

    def __getitem__(self, i):
        return self.bank.read(i)


# -- augmentation carries the pseudo and contrastive labels ----------------------------
@pytest.mark.parametrize("augment", ["rotate", "lvit"])
def test_maps_are_warped_with_the_image(augment):
    size = 32
    rng = np.random.default_rng(0)
    pattern = np.zeros((size, size), np.float32)
    pattern[4:12, 6:25] = 1.0  # asymmetric, so every flip/turn/rotation changes it
    pattern[20:28, 3:9] = 1.0
    images = np.repeat((pattern * 255).astype(np.uint8)[None, None], 6, axis=0).repeat(3, axis=1)
    cfg = DataConfig(img_size=size, augment=augment, rotate_degrees=45.0)
    ds = SegDataset(_samples(6), images, None, torch.zeros(1, 4, dtype=torch.long), np.zeros(6, int),
                    build_augmentation(cfg, ("pseudo", "contrast")))
    ds.transform.set_random_state(seed=int(rng.integers(1000)))
    ref = torch.from_numpy(pattern)[None]
    ds.targets = lambda i: {"pseudo": ref.clone(), "contrast": ref.clone()}
    changed = 0
    for _ in range(4):
        for i in range(len(ds)):
            item = ds[i]
            torch.testing.assert_close(item["pseudo"], item["image"][:1], atol=1e-5, rtol=0)
            torch.testing.assert_close(item["contrast"], item["image"][:1], atol=1e-5, rtol=0)
            changed += not torch.allclose(item["pseudo"], ref)
    assert changed > 3  # the transform did act


def test_unlabeled_targets_pick_the_matched_contrastive_label():
    bank = PseudoLabelBank(2, 2, beta=0.5, dtype="float32")
    bank.update(torch.arange(2), torch.tensor([0.2, 0.8]).view(2, 1, 1, 1).expand(2, 1, 2, 2))
    contrast = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    t = UnlabeledTargets(bank, contrast, torch.tensor([1, 0]))
    assert t(0)["contrast"].sum() == 4 and t(1)["contrast"].sum() == 0
    assert t(1)["pseudo"].mean().item() == pytest.approx(0.8)


# -- LV loss and contrastive labels -----------------------------------------------------
def test_lv_loss_values():
    a = torch.zeros(1, 1, 8, 8)
    a[..., :4, :] = 1
    b = 1 - a
    soft = a * 0.3  # cosine ignores scale
    empty = torch.zeros_like(a)
    assert lv_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert lv_loss(soft, a).item() == pytest.approx(0.0, abs=1e-6)
    assert lv_loss(a, b).item() == pytest.approx(1.0)
    half = a.clone()
    half[..., :2, :] = 0  # 16 of a's 32 pixels: cos = 16 / sqrt(16 * 32)
    assert lv_loss(half, a).item() == pytest.approx(1 - 16 / (16 * 32) ** 0.5, abs=1e-6)
    assert lv_loss(a, empty).item() == 0.0 and not lv_valid(empty).item()
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        lv_loss(a, a[0])


def test_contrastive_selection_picks_the_most_similar_text():
    texts = ["Unilateral pulmonary infection, one infected area, lower left lung.",
             "Unilateral pulmonary infection, one infected area, lower right lung.",
             "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."]
    enc = build_text_encoder("learned", max_len=16, dim=8)
    enc.fit(texts)
    queries = [texts[1], "Unilateral pulmonary infection, one infected area, lower right lung .",
               "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.", texts[0]]
    idx, sim = match_by_text(enc.similarity_vectors(queries), enc.similarity_vectors(texts))
    assert idx.tolist() == [1, 1, 2, 0]
    assert sim[0].item() == pytest.approx(1.0)
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert match_by_text(torch.tensor([[0.5, 0.9], [1.0, 0.1]]), keys)[0].tolist() == [1, 0]
    assert match_by_text(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]]))[0].item() == 0


def test_contrastive_labels_mean_per_text_and_labeled():
    masks = np.zeros((3, 1, 2, 2), np.uint8)
    masks[0, 0, 0, 0] = masks[1, 0, 0, 0] = masks[1, 0, 1, 1] = masks[2, 0, 1, 0] = 1
    texts, labels = contrastive_labels("mean_per_text", ["b", "b", "a"], masks, 2)
    assert texts == ["a", "b"]
    assert labels[1, 0].tolist() == [[1.0, 0.0], [0.0, 0.5]]
    texts, labels = contrastive_labels("labeled", ["b", "b", "a"], masks, 2)
    assert texts == ["b", "b", "a"] and torch.equal(labels, torch.from_numpy(masks).float())
    with pytest.raises(ValueError, match="lv_contrastive"):
        contrastive_labels("nearest", ["a"], masks[:1], 2)


def test_template_reader(tmp_path):
    import openpyxl

    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 2:8] = 1
    img = Image.fromarray(mask, mode="P")
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)  # palette index 1 = white
    img.save(tmp_path / "fig1.png")
    wb = openpyxl.Workbook()
    wb.active.append(["Image", "Description"])
    wb.active.append(["fig1.png", "Unilateral pulmonary infection, one infected area, all left lung."])
    wb.save(tmp_path / "LV_loss.xlsx")
    (text, m), = read_contrastive_templates(tmp_path)
    assert text.startswith("Unilateral") and m.dtype == bool and np.array_equal(m, mask.astype(bool))


@pytest.mark.skipif(not SHARED_TEMPLATES.is_dir(), reason="../shared/data/qata_lv_templates not present")
def test_real_qata_templates_load():
    pairs = read_contrastive_templates(SHARED_TEMPLATES)
    assert len(pairs) == 14
    assert all(0.02 < m.mean() < 0.6 for _, m in pairs)


# -- Mean Teacher -------------------------------------------------------------------------
def test_ema_update_arithmetic():
    torch.manual_seed(0)
    student, teacher = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for p in student.parameters():
            p.normal_()
        student.running_mean.fill_(2.0)
        student.num_batches_tracked.fill_(7)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, alpha=0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 0.2))
    assert teacher.num_batches_tracked.item() == 7
    assert ema_decay(0, 0.99) == 0.0 and ema_decay(1, 0.99) == 0.5 and ema_decay(10_000, 0.99) == 0.99


def test_sigmoid_rampup():
    assert sigmoid_rampup(0.0) == pytest.approx(np.exp(-5))
    assert sigmoid_rampup(1.0) == 1.0 and sigmoid_rampup(3.0) == 1.0 and sigmoid_rampup(-1.0) == pytest.approx(np.exp(-5))


# -- runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("semi") / "cxr"
    GENERATORS["chest-xray"](out, n=30, seed=5, size=64)
    return out


def _csv_rows(run: Path) -> list[dict]:
    rows = []
    for f in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(f) as h:
            rows += list(csv.DictReader(h))
    return rows


SMOKE = ["data.augment=rotate", "train.patience=10"]


@pytest.mark.parametrize("preset", ["lvit-t-semi", "lvit-tw-semi", "mean-teacher"])
def test_semi_presets_smoke(data, tmp_path, preset):
    cfg = load_preset(preset, "smoke", [*SMOKE, "train.max_epochs=3"])
    metrics = train(cfg, data, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {"Val", "Test"} <= set(metrics) and metrics["model"]["labeled_ratio"] == 0.25
    split = json.loads((run / "split.json").read_text())
    assert split["n_labeled"] + split["n_unlabeled"] == len(list((data / "Train_Folder" / "img").iterdir()))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    rows = _csv_rows(run)
    assert any(float(r["train/w"]) > 0 for r in rows if r.get("train/w"))  # the unlabeled term was used
    if preset == "mean-teacher":
        assert any(r.get("train/consistency") for r in rows)
    else:
        assert ckpt["epi_bank"]["generation"] == 2  # made after epochs 0 and 1, used by epochs 1 and 2
        pseudo = [(float(r["epi/pseudo_dice"]), float(r["epi/prediction_dice"])) for r in rows
                  if r.get("epi/pseudo_dice")]
        assert len(pseudo) == 2
        assert pseudo[0][0] == pytest.approx(pseudo[0][1])  # generation 1: P_0 = p_1
        if preset == "lvit-t-semi":
            assert any(r.get("train/lv") for r in rows)


class _WatchTeacher(L.Callback):
    """Snapshots teacher and student at the start of the first three batches."""

    def __init__(self):
        self.snaps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if len(self.snaps) < 3:
            self.snaps.append((trainer.global_step, {k: v.clone() for k, v in module.teacher.state_dict().items()},
                               {k: v.clone() for k, v in module.net.state_dict().items()}))


def test_mean_teacher_teacher_is_the_ema_of_the_student(data, tmp_path):
    cfg = load_preset("mean-teacher", "smoke", [*SMOKE, "train.max_epochs=1", "semi.ema_decay=0.6"])
    watch = _WatchTeacher()
    train(cfg, data, tmp_path / "run", progress=False, extra_callbacks=[watch])
    _, (_, t0, _), (step, t1, s1) = watch.snaps
    alpha = ema_decay(step, 0.6)
    assert step == 2 and alpha == 0.6  # min(1 - 1/3, 0.6): the decay cap applies from the second step
    for k, v in t1.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, alpha * t0[k] + (1 - alpha) * s1[k])
    assert any(not torch.equal(t0[k], t1[k]) for k in t0 if t0[k].is_floating_point())


def test_mean_teacher_step_through_hooks_is_the_papers_loss():
    """The hook-based step (views, pseudo target, unsupervised loss) computes exactly
    L_sup + w · MSE(σ(student(noisy x)), σ(teacher(noisy' x))), with the noise drawn in
    the original order (student first), so Mean Teacher's runs are unchanged."""
    cfg = load_preset("mean-teacher", "smoke", ["semi.warmup_epochs=0", "semi.rampup_epochs=0", "semi.unsup_weight=0.7"])
    torch.manual_seed(0)
    mt = MeanTeacher(cfg.to_dict())
    mt.teacher.load_state_dict({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                                for k, v in mt.net.state_dict().items()})
    size = cfg.data.img_size
    text = torch.zeros(2, cfg.text.max_len, dtype=torch.long)
    lab = {"image": torch.rand(2, 3, size, size), "mask": (torch.rand(2, 1, size, size) > 0.5).long(), "text": text}
    unl = {"image": torch.rand(2, 3, size, size), "text": text}
    torch.manual_seed(1)
    loss = mt.training_step({"labeled": lab, "unlabeled": unl}, 0)

    torch.manual_seed(1)
    std = cfg.semi.noise_std
    noise = lambda x: x + (torch.randn_like(x) * std).clamp(-2 * std, 2 * std)
    logits = mt(torch.cat([lab["image"], noise(unl["image"])]), torch.cat([text, text]))
    with torch.no_grad():
        target = torch.sigmoid(mt.teacher(noise(unl["image"]), None))
    expected = mt.sup_loss(logits[:2], lab["mask"]) + 0.7 * torch.nn.functional.mse_loss(torch.sigmoid(logits[2:]), target)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_same_split_for_every_method(data, tmp_path):
    a = load_preset("unet", "smoke", ["data.labeled_ratio=0.5", "train.seed=4"])
    b = load_preset("lvit-t-semi", "smoke", ["data.labeled_ratio=0.5", "train.seed=4", "train.max_epochs=1"])
    train(a, data, tmp_path / "a", progress=False)
    train(b, data, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "split.json").read_text() == (tmp_path / "b" / "split.json").read_text()


class _CaptureBank(L.Callback):
    def on_train_start(self, trainer, module):
        self.state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in module.bank.state_dict().items()}


class _KillKeepBank(Kill):
    """Kill at the start of an epoch, keeping the live bank the killed process had."""

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            self.live = module.bank.state_dict()
        super().on_train_epoch_start(trainer, module)


@pytest.mark.parametrize("workers", [0, 2])
def test_bank_survives_kill_and_resume_bit_exactly(data, tmp_path, workers):
    cfg = load_preset("lvit-t-semi", "smoke", [*SMOKE, "train.max_epochs=4", f"data.num_workers={workers}"])
    run = tmp_path / "run"
    kill = _KillKeepBank(3)
    with pytest.raises(Killed):
        train(cfg, data, run, progress=False, extra_callbacks=[kill])
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 2 and saved["epi_bank"]["generation"] == 3
    # The checkpoint was written after the epoch-end refresh: it is the bank epoch 3 would have used.
    assert torch.equal(saved["epi_bank"]["data"], kill.live["data"])
    split_before = (run / "split.json").read_text()
    capture = _CaptureBank()
    train(cfg, data, run, resume=True, progress=False, extra_callbacks=[capture])
    assert capture.state["generation"] == 3
    assert capture.state["data"].dtype == kill.live["data"].dtype
    assert torch.equal(capture.state["data"], kill.live["data"])  # bit-exact
    assert (run / "split.json").read_text() == split_before
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["epoch"] == 3 and final["epi_bank"]["generation"] == 3  # no refresh after the last epoch


def test_memmapped_bank_is_used_for_large_sets(data, tmp_path):
    cfg = load_preset("lvit-t-semi", "smoke", [*SMOKE, "train.max_epochs=2", "semi.bank_memmap_mb=0"])
    train(cfg, data, tmp_path / "run", progress=False)
    bank_file = tmp_path / "run" / "pseudo_labels.bin"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    on_disk = np.memmap(bank_file, dtype=np.float32, mode="r", shape=tuple(ckpt["epi_bank"]["data"].shape))
    assert np.array_equal(on_disk, ckpt["epi_bank"]["data"].numpy())


def test_semi_rejects_multiclass_before_writing(data, tmp_path):
    cfg = load_preset("lvit-t-semi", "smoke", ["data.num_classes=3"])
    with pytest.raises(ValueError, match="binary"):
        train(cfg, data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_labeled_ratio_and_default_run_dir(data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medtextseg.cli import USER_ERROR_EXIT, app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--preset", "unet", "--tier", "smoke", "--data", str(data),
                              "--labeled-ratio", "0.5", "--seed", "3"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "unet-smoke-r0.5-s3"
    split = json.loads((run / "split.json").read_text())
    assert split["ratio"] == 0.5 and split["seed"] == 3
    res = runner.invoke(app, ["train", "--preset", "unet", "--tier", "smoke", "--data", str(data),
                              "--labeled-ids", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])
    assert res.exit_code == USER_ERROR_EXIT and "missing.txt" in res.output
    assert not (tmp_path / "x").exists()
