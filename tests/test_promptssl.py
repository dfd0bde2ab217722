"""PromptSSL (GLsc pre-training and prompt-guided pseudo labels): L_LS against plain
InfoNCE, the prompt mask (a distribution over classes; absent classes get none), the
class prompts of a spine text, the merged pseudo label (Eq. 13), and smoke runs of
glsc-vlm, promptssl and the multi-class mean-teacher preset on non-square spine slices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _synth import no_network  # noqa: F401

from medtextseg.config import load_preset
from medtextseg.data.synthetic.spine_mr import CLASS_NAMES, TOKENS, generate_spine_mr
from medtextseg.engine import RunError, pretrain, train
from medtextseg.methods.promptssl import merged_prompt_label, soft_ce
from medtextseg.pretrain.glsc import local_semantic_loss, prompt_mask, prompt_scores
from medtextseg.pretrain.similarity import info_nce
from medtextseg.text.prompts import ClassPrompts

pytestmark = pytest.mark.usefixtures("no_network")


def _plain_patch_nce(patches, txt, tau):
    """-log softmax_j(cos(patch_ik, t_j) / tau) at j = i, averaged over i and k."""
    sim = torch.einsum("bke,je->bkj", F.normalize(patches, dim=-1), F.normalize(txt, dim=-1)) / tau
    b, k = patches.shape[:2]
    target = torch.arange(b).repeat_interleave(k)
    return F.cross_entropy(sim.reshape(b * k, b), target)


def test_local_loss_with_equal_variances_is_plain_patch_text_infonce():
    torch.manual_seed(0)
    # Two images: each patch has one mismatched text, so every variance is 0 (equal).
    patches, txt = torch.randn(2, 5, 8), torch.randn(2, 8)
    torch.testing.assert_close(local_semantic_loss(patches, txt, 0.1), _plain_patch_nce(patches, txt, 0.1))


def _local_loss_by_hand(patches, txt, tau, max_weight):
    """Eq. 1-2 with our documented choices, one patch at a time: sigma^2 = the population
    variance of its cosines to the mismatched texts, w = mean(sigma^2) / sigma^2 clipped."""
    b, k = patches.shape[:2]
    cos = [[[F.cosine_similarity(patches[i, q], txt[j], dim=0).item() for j in range(b)] for q in range(k)]
           for i in range(b)]
    var = [[float(np.var([cos[i][q][j] for j in range(b) if j != i])) for q in range(k)] for i in range(b)]
    mean_var = float(np.mean(var))
    total = 0.0
    for i in range(b):
        for q in range(k):
            w = min(max(mean_var / var[i][q], 1 / max_weight), max_weight)
            logits = np.array(cos[i][q]) * w / tau
            top = logits.max()  # a stable log-sum-exp: w * cos / tau reaches 1000 here
            total += -(logits[i] - top - np.log(np.exp(logits - top).sum()))
    return total / (b * k)


@pytest.mark.parametrize("max_weight", [100.0, 2.0])
def test_local_loss_matches_eq_1_2_computed_by_hand(max_weight):
    torch.manual_seed(4)
    patches, txt = torch.randn(3, 2, 6), torch.randn(3, 6)
    expected = _local_loss_by_hand(patches, txt, 0.1, max_weight)
    got = local_semantic_loss(patches, txt, 0.1, max_weight=max_weight)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_local_loss_sharpens_the_patches_whose_mismatched_similarities_vary_less():
    torch.manual_seed(1)
    patches, txt = torch.randn(4, 6, 8), torch.randn(4, 8)
    plain = _plain_patch_nce(patches, txt, 0.1)
    # Clipping the relative weight to 1 is plain InfoNCE; without the clip it differs.
    torch.testing.assert_close(local_semantic_loss(patches, txt, 0.1, max_weight=1.0), plain)
    assert not torch.allclose(local_semantic_loss(patches, txt, 0.1), plain)


def _global_loss_by_hand(out, groups, tau, a, b, lam):
    """Eq. 3-7 one pair at a time: D_u = a W2 + b of the [CLS] Gaussians, D_s the distance of
    the embeddings, D^_u = exp(-lam D_u / D_s), sim^ = 1 - (1 - cos) D^_u; the InfoNCE of
    both directions (same-text pairs positive) averaged."""
    img, txt = out.img_emb.double(), out.txt_emb.double()
    mu_i, mu_t = out.img_mu.double(), out.txt_mu.double()
    sd_i, sd_t = out.img_logsigma.double().exp(), out.txt_logsigma.double().exp()
    n = len(groups)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            w2 = float(((mu_i[i] - mu_t[j]) ** 2).sum() + ((sd_i[i] - sd_t[j]) ** 2).sum())
            d_s = float((img[i] - txt[j]).norm())
            cos = float(F.cosine_similarity(img[i], txt[j], dim=0))
            sim[i, j] = 1 - (1 - cos) * math.exp(-lam * (a * w2 + b) / d_s)
    total = 0.0
    for logits in (sim / tau, sim.T / tau):
        for i in range(n):
            pos = [j for j in range(n) if groups[j] == groups[i]]
            total += -(np.log(np.exp(logits[i, pos]).sum()) - np.log(np.exp(logits[i]).sum()))
    return total / (2 * n)


def test_glsc_global_constraint_is_eq_3_7_on_the_model_outputs(monkeypatch):
    """GLscPretrain.losses' L_GS against Eq. 3-7 by hand (DuSSS's SSS, shared), and plain
    InfoNCE when vlm.sss is off (the ablation without L_GS). The VLM's outputs are fixed,
    spread so that every D^_u sits well inside (0, 1): an untrained VLM gives near-equal
    embeddings, on which any weighting gives nearly the same loss."""
    from medtextseg.nets.vlm import VLMOutput
    from medtextseg.pretrain.glsc import GLscPretrain

    a, b, lam = 0.5, 0.2, 0.5
    base = ["vlm.sss_warmup_epochs=0", "vlm.local_constraint=false", "vlm.mask_supervision=false",
            f"vlm.sss_a={a}", f"vlm.sss_b={b}", f"vlm.sss_lam={lam}", f"data.classes=[{','.join(CLASS_NAMES)}]"]
    g = torch.Generator().manual_seed(5)
    e = 16
    def rand(scale=1.0):
        return scale * torch.randn(4, e, generator=g)

    out = VLMOutput(F.normalize(rand(), dim=-1), F.normalize(rand(), dim=-1), rand(0.25), rand(0.3),
                    rand(0.25), rand(0.3), torch.zeros(4, 32, 8, 4))
    groups = torch.tensor([0, 1, 1, 2])  # images 1 and 2 share a text: positives of each other
    batch = {"image": torch.zeros(4, 1, 64, 32), "ids": None, "attn": None, "group": groups, "has_mask": torch.zeros(4)}

    def gs_of(overrides):
        module = GLscPretrain(load_preset("glsc-vlm", "smoke", overrides).to_dict())
        monkeypatch.setattr(module.vlm, "forward", lambda *args: out)
        with torch.no_grad():
            return module.losses(batch)["gs"], float(module.vlm.temperature)

    gs, tau = gs_of(base)
    assert gs.item() == pytest.approx(_global_loss_by_hand(out, groups.tolist(), tau, a, b, lam), rel=1e-5)
    # The weights matter here: another lambda is another loss, and SSS off is plain InfoNCE.
    assert abs(gs.item() - _global_loss_by_hand(out, groups.tolist(), tau, a, b, lam / 2)) > 1e-2
    plain = info_nce(out.img_emb, out.txt_emb, None, tau, positives=groups[:, None] == groups[None])
    assert abs(gs.item() - plain.item()) > 1e-2
    torch.testing.assert_close(gs_of([*base, "vlm.sss=false"])[0], plain)


def test_prompt_masks_sum_to_one_over_classes_and_absent_classes_get_nothing():
    torch.manual_seed(3)
    dense, emb = torch.randn(2, 8, 4, 2), torch.randn(2, 5, 8)
    absent = torch.zeros(2, 5, dtype=torch.bool)
    absent[0, 3] = True
    scores = prompt_scores(torch.randn(2, 8), emb, absent)
    assert scores.min() >= 0 and scores.max() <= 1 and scores[0, 3] == 0
    probs = prompt_mask(dense, emb, scores, size=(8, 4))
    assert tuple(probs.shape) == (2, 5, 8, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 8, 4))
    assert probs[0, 3].max() == 0 and probs[1, 3].min() > 0
    # Without scores (all equal) it is the per-pixel softmax of the prompt logits.
    flat = prompt_mask(dense, emb, torch.ones(2, 5))
    torch.testing.assert_close(flat, torch.softmax(torch.einsum("bce,behw->bchw", emb, dense), 1))


def test_merged_prompt_label_multiplies_the_teacher_and_prompt_probabilities():
    teacher = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # softmax: 1/4, 3/4
    prompt = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1)
    merged = merged_prompt_label(teacher, prompt, eps=1e-4).flatten()
    # 1/4 * 3/4 : 3/4 * 1/4 = 1 : 1
    torch.testing.assert_close(merged, torch.tensor([0.5, 0.5]))
    # Asymmetric, three classes, where a sum or an average of the two would give another answer.
    t3 = torch.tensor([0.2, 0.3, 0.5]).log().view(1, 3, 1, 1)
    p3 = torch.tensor([0.5, 0.4, 0.1]).view(1, 3, 1, 1)
    got = merged_prompt_label(t3, p3, eps=1e-4).flatten()
    torch.testing.assert_close(got, torch.tensor([0.10, 0.12, 0.05]) / 0.27)
    assert not torch.allclose(got, (t3.softmax(1) + p3).flatten() / 2, atol=1e-2)
    assert not torch.allclose(got, (t3.softmax(1) + p3).softmax(1).flatten(), atol=1e-2)
    # A class the prompt mask rules out (p = 0) is capped at eps, not -inf: it keeps a trace.
    zero = merged_prompt_label(t3, torch.tensor([0.6, 0.4, 0.0]).view(1, 3, 1, 1), eps=1e-4).flatten()
    assert zero.isfinite().all() and 0 < zero[2] < 1e-3
    torch.testing.assert_close(zero.sum(), torch.tensor(1.0))
    target = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1)
    expected = -(target * torch.log_softmax(teacher, 1)).sum()
    torch.testing.assert_close(soft_ce(teacher, target), expected)


def _spine_text(states: dict[str, str]) -> str:
    return ", ".join(f"{t} {states.get(t, 'none')}" for t in TOKENS)


def test_class_prompts_carry_each_class_state_from_the_text():
    p = ClassPrompts(CLASS_NAMES, "spine")
    text = _spine_text({"L3": "link", "L34": "exist", "S": "split"})
    rows = p.rows([text])[0]
    assert p.texts[rows[0]] == "background"
    assert p.texts[rows[CLASS_NAMES.index("L3")]] == "L3 link"
    assert p.texts[rows[CLASS_NAMES.index("L3/L4")]] == "L3/L4 exist"
    assert p.texts[rows[CLASS_NAMES.index("T9")]] == "T9 none"
    absent = p.absent([text])[0]
    assert not absent[CLASS_NAMES.index("L3")] and absent[CLASS_NAMES.index("T9")] and not absent[0]
    with pytest.raises(ValueError, match="grammar"):
        p.rows(["Bilateral pulmonary infection."])
    with pytest.raises(ValueError, match="names"):
        ClassPrompts(["background", "lesion"], "spine")


@pytest.mark.parametrize("tier", ["smoke", "cpu", "paper"])
def test_glsc_vlm_and_promptssl_presets_chain_at_their_defaults(tier):
    """The VLM learns the masks of its own split; `train --vlm` refuses a VLM that read masks
    the segmentation run treats as unlabeled, so both presets must draw the same split."""
    vlm, seg = load_preset("glsc-vlm", tier), load_preset("promptssl", tier)
    assert vlm.vlm.mask_supervision
    assert (vlm.data.labeled_ratio, vlm.train.seed) == (seg.data.labeled_ratio, seg.train.seed)


def test_promptssl_paper_tier_supervises_with_cross_entropy_alone():
    """PromptSSL Eq. 12: L_sup is the pixel cross-entropy; only the short tiers add Dice."""
    paper, cpu = load_preset("promptssl", "paper"), load_preset("promptssl", "cpu")
    assert (paper.loss.dice, paper.loss.ce) == (0.0, 1.0)
    assert (cpu.loss.dice, cpu.loss.ce) == (0.5, 0.5)


# -- smoke runs on non-square spine slices -------------------------------------------------------
@pytest.fixture(scope="module")
def spine(tmp_path_factory):
    out = tmp_path_factory.mktemp("spine") / "data"
    generate_spine_mr(out, n_cases=6, seed=0, size=32)
    assert (out / "classes.txt").read_text().split() == list(CLASS_NAMES)  # train reads the names there
    return out


def test_mask_share_repeats_the_labeled_images_of_a_pretraining_epoch(spine):
    from medtextseg.data.readers import read_dataset
    from medtextseg.data.splits import apply_split, split_by_ratio
    from medtextseg.pretrain.dusss import PairDataModule, mask_repeats

    assert mask_repeats(27, 537, 0.25) == 7  # 189 of 699 items: 27 % >= 25 %, 6 repeats give 24 %
    assert mask_repeats(27, 537, 0.0) == mask_repeats(0, 537, 0.5) == mask_repeats(269, 537, 0.25) == 1
    samples = read_dataset(spine)
    samples = apply_split(samples, split_by_ratio(samples, 0.25, 0))
    train = [s for s in samples if s.split == "Train"]
    n_lab = sum(s.labeled for s in train)
    assert 0 < n_lab < len(train)
    sizes = {}
    for share in (0.0, 0.6):
        cfg = load_preset("glsc-vlm", "smoke", [f"vlm.mask_share={share}"])
        dm = PairDataModule(samples, cfg, lambda texts, n: (torch.zeros(len(texts), n, dtype=torch.long),) * 2)
        dm.setup()
        ds = dm.datasets["Train"]
        sizes[share] = (len(ds), int(ds.has_mask.sum()))
    r = mask_repeats(n_lab, len(train), 0.6)
    assert r > 1
    assert sizes[0.0] == (len(train), n_lab)
    assert sizes[0.6] == (len(train) + (r - 1) * n_lab, r * n_lab)
    assert sizes[0.6][1] / sizes[0.6][0] >= 0.6
    with pytest.raises(ValueError, match="mask_share"):
        from medtextseg.pretrain.glsc import GLscPretrain

        GLscPretrain.check_config(load_preset("glsc-vlm", "smoke", ["vlm.mask_share=1.0"]))


@pytest.mark.parametrize("override, match", [
    ("vlm.text_variants=0", "text_variants"), ("vlm.aug_crop_min=0", "aug_crop_min"),
    ("data.num_classes=1", "num_classes to K >= 2"), ("data.patches=true", "GLsc pre-training resizes"),
    ("vlm.mask_weight=-1", "mask_weight")])
def test_glsc_refuses_what_its_views_and_prompts_cannot_use(override, match):
    """GLsc inherits DuSSS's two-view data, so it gets DuSSS's checks of it (and its own)."""
    from medtextseg.pretrain.glsc import GLscPretrain

    GLscPretrain.check_config(load_preset("glsc-vlm", "smoke"))
    with pytest.raises(ValueError, match=match):
        GLscPretrain.check_config(load_preset("glsc-vlm", "smoke", [override]))


def test_glsc_then_promptssl_smoke_runs_and_the_student_predicts_alone(spine, tmp_path):
    sets = ["data.labeled_ratio=0.5"]
    vlm_run = tmp_path / "glsc"
    pre = pretrain(load_preset("glsc-vlm", "smoke", sets), spine, vlm_run, progress=False)
    assert {"r1", "text_dice"} <= set(pre["Test"])
    cfg = json.loads((vlm_run / "run.json").read_text())
    assert cfg["classes"] == list(CLASS_NAMES)

    out = tmp_path / "pssl"
    metrics = train(load_preset("promptssl", "smoke", sets + ["train.max_epochs=2"]), spine, out, vlm=vlm_run,
                    progress=False)
    # The prompt mask is scored against the withheld masks before the first epoch and the last.
    import csv

    logged = [r for f in sorted(out.glob("logs/csv/*/metrics.csv")) for r in csv.DictReader(f.open())
              if r.get("promptssl/prompt_mask_dice")]
    assert [int(r["epoch"]) for r in logged] == [0, 1]
    assert all(0.0 <= float(r["promptssl/prompt_mask_dice"]) <= 1.0 for r in logged)
    test = metrics["Test"]
    assert set(test["classes"]) <= set(CLASS_NAMES[1:]) and test["classes"]
    assert test["dice"] == pytest.approx(sum(c["dice"] for c in test["classes"].values()) / len(test["classes"]))
    assert (out / "vlm").is_dir()
    # Of the frozen VLM the checkpoints keep only the decoder stage 2 trains (the rest is in vlm/) ...
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    kept = [k for k in state if k.startswith("glsc.")]
    assert kept and all(k.startswith("glsc.vlm.decoder.") for k in kept)
    # ... and a resumed fit gets the rest back from vlm/ (strict loading), then trains on.
    metrics = train(load_preset("promptssl", "smoke", sets + ["train.max_epochs=3"]), None, out, resume=True,
                    progress=False)
    assert json.loads((out / "run.json").read_text())["finished"]["epochs"] == 3
    # The student alone predicts: the VLM's weights are not needed to load the run.
    from medtextseg.engine import load_run

    method, _, _, _ = load_run(out)
    assert method.glsc is None


def test_promptssl_refuses_a_vlm_of_another_size(spine, tmp_path):
    vlm_run = tmp_path / "glsc"
    pretrain(load_preset("glsc-vlm", "smoke", ["data.labeled_ratio=0.5", "train.max_epochs=1"]), spine, vlm_run,
             progress=False)
    cfg = load_preset("promptssl", "smoke", ["data.labeled_ratio=0.5", "data.img_size=[32,16]"])
    with pytest.raises(RunError, match="img_size"):
        train(cfg, spine, tmp_path / "bad", vlm=vlm_run, progress=False)
    assert not (tmp_path / "bad").exists()

    # A state word the prompts cannot read (not a slip of one state) is refused, naming the
    # image and the word, by both stages, before their run directory exists.
    import shutil

    from openpyxl import load_workbook

    bad = tmp_path / "bad-text"
    shutil.copytree(spine, bad)
    book = bad / "Train_Folder" / "Train_text.xlsx"
    wb = load_workbook(book)
    row = next(r for r in wb.active.iter_rows(min_row=2) if r[1].value)
    name, text = row[0].value, row[1].value
    row[1].value = ", ".join("L3 broken" if p.startswith("L3 ") else p for p in text.split(", "))
    wb.save(book)
    sets = ["data.labeled_ratio=0.5", "train.max_epochs=1"]
    stem = name.rsplit(".", 1)[0]
    with pytest.raises(RunError, match=rf"{stem}.*L3 'broken'"):
        train(load_preset("promptssl", "smoke", sets), bad, tmp_path / "p", vlm=vlm_run, progress=False)
    with pytest.raises(RunError, match=rf"{stem}.*L3 'broken'"):
        pretrain(load_preset("glsc-vlm", "smoke", sets), bad, tmp_path / "g", progress=False)
    assert not (tmp_path / "p").exists() and not (tmp_path / "g").exists()


def test_multiclass_mean_teacher_smoke_run_on_non_square_slices(spine, tmp_path):
    # The command: the mean-teacher preset itself, told the number of classes.
    cfg = load_preset("mean-teacher", "smoke", ["data.num_classes=20", "data.img_size=[64,32]",
                                                "data.labeled_ratio=0.5", "train.max_epochs=1"])
    metrics = train(cfg, spine, tmp_path / "mt", progress=False)
    test = metrics["Test"]
    assert test["classes"] and 0 <= test["dice"] <= 1
    logged = (tmp_path / "mt" / "logs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/consistency" in logged  # the unlabeled half of the step ran
    rows = (tmp_path / "mt" / "per_image.csv").read_text().splitlines()
    assert "dice:L5" in rows[0]

    # predict: class-id label maps at the image's size, palette overlays and a legend.
    import numpy as np
    from PIL import Image

    from medtextseg.classes import palette
    from medtextseg.predict import predict
    from medtextseg.report import report

    images = spine / "Test_Folder" / "img"
    first = min(images.iterdir())
    written = predict(tmp_path / "mt", images, tmp_path / "pred", text=_spine_text({}))
    labels = np.asarray(Image.open(written[0]))
    assert labels.shape == np.asarray(Image.open(first)).shape[:2] and labels.max() < 20
    assert (tmp_path / "pred" / "legend.png").is_file()
    over = np.asarray(Image.open(tmp_path / "pred" / "overlays" / written[0].name).convert("RGB")).astype(int)
    gray = np.asarray(Image.open(first).convert("RGB")).astype(int)
    assert (over[labels == 0] == gray[labels == 0]).all()  # background untouched
    for c in np.unique(labels[labels > 0])[:2]:
        expected = np.clip(0.55 * gray[labels == c] + 0.45 * palette(20)[c], 0, 255).astype(int)
        assert np.abs(over[labels == c] - expected).max() <= 1
    # --overwrite replaces predict's own outputs, legend included
    predict(tmp_path / "mt", images, tmp_path / "pred", text=_spine_text({}), overwrite=True)
    # report: the per-class table under the main one
    md = report([tmp_path / "mt"], tmp_path / "report").read_text()
    assert "Per class (Test)" in md and "| L5 |" in md


def test_check_data_lists_classes_per_split_and_refuses_an_id_beyond_k(spine, tmp_path):
    import shutil

    import numpy as np
    from _synth import cli
    from PIL import Image

    result = cli("check-data", spine, "--num-classes", 20)
    assert result.exit_code == 0, result.output
    assert "classes present" in result.output and "L4/L5" in result.output
    bad = tmp_path / "bad"
    shutil.copytree(spine, bad)
    mask = min((bad / "Train_Folder" / "labelcol").iterdir())
    m = np.asarray(Image.open(mask)).copy()
    m[0, 0] = 23
    Image.fromarray(m).save(mask)
    result = cli("check-data", bad, "--num-classes", 20)
    assert result.exit_code == 2 and mask.name in result.output and "23" in result.output
