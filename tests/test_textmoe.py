"""TextMoE method (issue 12, "Method"): the frequency exchange (Eq. 6), its partners,
L_diff (Eq. 8), the training step (Eq. 5-9) and smoke runs of the presets."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _synth import no_network, tiny_cxr  # noqa: F401

from medtextseg.config import DataConfig, load_preset
from medtextseg.data.module import build_augmentation
from medtextseg.engine import train
from medtextseg.losses import DiceCE
from medtextseg.methods import METHODS, method_class
from medtextseg.methods.frequency import band_mask, exchange_partners, frequency_exchange
from medtextseg.methods.textmoe import TextMoE, differential_loss
from medtextseg.text.encoders import build_text_encoder

pytestmark = pytest.mark.usefixtures("no_network")


# -- the frequency exchange (Eq. 6) --------------------------------------------------------
def _exchange_loop(images: torch.Tensor, partners: torch.Tensor, band: float) -> torch.Tensor:
    """Reference: one image at a time, on the explicitly centred (fftshift-ed) spectrum."""
    out = []
    h, w = images.shape[-2:]
    cy, cx = h // 2, w // 2  # DC after fftshift
    ys = torch.arange(h)[:, None] - cy
    xs = torch.arange(w)[None, :] - cx
    square = (ys.abs() < band * h / 2) & (xs.abs() < band * w / 2)
    for i in range(len(images)):
        fi = torch.fft.fftshift(torch.fft.fft2(images[i]), dim=(-2, -1))
        fj = torch.fft.fftshift(torch.fft.fft2(images[int(partners[i])]), dim=(-2, -1))
        amp = torch.where(square, fj.abs(), fi.abs())
        spec = torch.fft.ifftshift(amp * torch.exp(1j * fi.angle()), dim=(-2, -1))
        out.append(torch.fft.ifft2(spec).real)
    return torch.stack(out)


@pytest.mark.parametrize("size", [(32, 32), (33, 40)])
def test_exchange_keeps_phase_and_takes_the_partners_low_band_amplitude(size):
    torch.manual_seed(0)
    x = torch.rand(4, 3, *size, dtype=torch.float64)
    partners = torch.tensor([2, 3, 0, 1])
    band = 0.25
    y = frequency_exchange(x, partners, band)
    fx, fy = torch.fft.fft2(x), torch.fft.fft2(y)
    low = band_mask(*size, band)
    assert 1 < int(low.sum()) < low.numel() // 4
    assert bool(low[0, 0])  # DC is in the band: the centred spectrum, not the Nyquist corner
    # amplitude: the partner's inside the band, the image's own outside
    torch.testing.assert_close(fy.abs()[..., low], fx.abs()[partners][..., low])
    torch.testing.assert_close(fy.abs()[..., ~low], fx.abs()[..., ~low])
    # phase of x_i everywhere (where the amplitude is not ~0)
    d = torch.remainder(fy.angle() - fx.angle() + math.pi, 2 * math.pi) - math.pi
    assert d[fy.abs() > 1e-6].abs().max() < 1e-6
    # the style moved: the mean intensity (DC amplitude) is the partner's
    torch.testing.assert_close(y.mean(dim=(2, 3)), x[partners].mean(dim=(2, 3)))


def test_exchange_with_band_zero_is_the_identity():
    x = torch.rand(3, 1, 32, 32)
    assert not band_mask(32, 32, 0.0).any()
    torch.testing.assert_close(frequency_exchange(x, torch.tensor([1, 2, 0]), 0.0), x, rtol=0, atol=0)


@pytest.mark.parametrize("band", [0.05, 0.1, 0.5, 1.0])
def test_exchange_matches_a_per_image_loop_on_the_centred_spectrum(band):
    torch.manual_seed(1)
    x = torch.rand(5, 3, 32, 48, dtype=torch.float64)
    partners = exchange_partners(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(frequency_exchange(x, partners, band), _exchange_loop(x, partners, band))


def test_exchange_rejects_a_band_outside_0_1():
    with pytest.raises(ValueError, match="band"):
        frequency_exchange(torch.rand(2, 1, 8, 8), torch.tensor([1, 0]), 1.5)


def test_partners_are_a_permutation_without_fixed_points_and_cross_domains():
    for b in range(2, 9):
        for seed in range(5):
            p = exchange_partners(b, generator=torch.Generator().manual_seed(seed))
            assert sorted(p.tolist()) == list(range(b)) and (p != torch.arange(b)).all()
    assert exchange_partners(1).tolist() == [0]
    d = torch.tensor([0, 0, 0, 1, 1])
    for seed in range(10):
        p = exchange_partners(5, d, generator=torch.Generator().manual_seed(seed))
        assert (d[p] != d).all()
    same = exchange_partners(4, torch.tensor([1, 1, 1, 1]), generator=torch.Generator().manual_seed(0))
    assert (same != torch.arange(4)).all()
    # seeded
    g = lambda: torch.Generator().manual_seed(7)
    assert exchange_partners(6, generator=g()).tolist() == exchange_partners(6, generator=g()).tolist()


# -- L_diff (Eq. 8) --------------------------------------------------------------------------
def test_differential_loss_is_one_for_identical_and_zero_for_orthogonal_experts():
    e = torch.randn(3, 4, 5, 5)
    assert differential_loss([(e, e), (2 * e, e)]).item() == pytest.approx(1.0, abs=1e-6)
    a = torch.zeros(2, 2, 3, 3)
    b = torch.zeros(2, 2, 3, 3)
    a[:, 0], b[:, 1] = 1.0, 1.0
    assert differential_loss([(a, b)]).item() == pytest.approx(0.0, abs=1e-7)
    assert differential_loss([(e, -e)]).item() == pytest.approx(1.0, abs=1e-6)  # |cos|: opposite = identical
    assert differential_loss([(e, e), (a, b)] if e.shape == a.shape else [(a, a), (a, b)]).item() == pytest.approx(0.5)


# -- the method ------------------------------------------------------------------------------
def test_registered_and_refuses_what_it_cannot_train():
    assert METHODS["textmoe"] is TextMoE and method_class("textmoe") is TextMoE
    cfg = load_preset("textmoe", "smoke")
    assert TextMoE.needs_text(cfg) and cfg.network.name == "textmoe"
    assert load_preset("textmoe-plain", "smoke").network.name == "textmoe-plain"
    TextMoE.check_config(cfg)
    for override, words in (("network.name=unet", "network.name"), ("data.num_classes=2", "num_classes"),
                            ("data.patches=true", "patches"), ("network.use_text=false", "use_text"),
                            ("textmoe.band=2", "textmoe.band"), ("data.img_size=48", "divisible by 32")):
        with pytest.raises(ValueError, match=words):
            TextMoE.check_config(load_preset("textmoe", "smoke", [override]))


def test_paper_tier_is_adamw_cosine_3e4_to_1e6_on_convnext_t():
    cfg = load_preset("textmoe", "paper")
    assert (cfg.network.base_width, cfg.data.img_size, cfg.semi.ema_decay) == (96, 224, 0.99)
    assert (cfg.text.encoder, cfg.text.max_len) == ("minilm", 24)
    assert (cfg.optim.optimizer, cfg.optim.scheduler, cfg.optim.lr, cfg.optim.eta_min) == ("adamw", "cosine", 3e-4, 1e-6)
    small = load_preset("textmoe", "smoke", ["optim.lr=3.0e-4", "train.max_epochs=10"])
    m = _build(small)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(11):  # no trainer: one step per epoch, 10 steps in the run
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3e-4) and lrs[10] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx((3e-4 + 1e-6) / 2)
    assert all(a > b for a, b in itertools.pairwise(lrs))


def _build(cfg) -> TextMoE:
    """The method with the smoke tier's learned text encoder fitted on a few texts."""
    enc = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim)
    enc.fit(["bilateral pulmonary infection, two infected areas, upper left lung and lower right lung"])
    return TextMoE(cfg.to_dict(), text_state=enc.state(), text_dim=cfg.text.dim)


def _batch(size: int, text_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 8, (2, text_len), generator=g)
    lab = {"image": torch.rand(2, 3, size, size, generator=g),
           "mask": (torch.rand(2, 1, size, size, generator=g) > 0.5).long(), "text": text}
    unl = {"image": torch.rand(2, 3, size, size, generator=g), "text": text.flip(0)}
    return lab, unl


def _method(*overrides):
    cfg = load_preset("textmoe", "smoke", ["semi.warmup_epochs=0", "semi.rampup_epochs=0", "semi.unsup_weight=0.6",
                                           "textmoe.cr_weight=0.5", "textmoe.diff_weight=0.3", *overrides])
    torch.manual_seed(0)
    m = _build(cfg)
    # A teacher unlike the student, so that the pseudo labels are visibly the teacher's.
    m.teacher.net.load_state_dict({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                                   for k, v in m.net.state_dict().items()})
    return cfg, m


def test_textmoe_step_is_eq_5_to_9():
    """L = DiceCE(s(x_l), y) + w · 0.5 · DiceCE(s(x_f), [σ(t(x_u)) > .5]) + 0.3 · L_diff."""
    cfg, m = _method()
    lab, unl = _batch(cfg.data.img_size, cfg.text.max_len)
    loss = m.training_step({"labeled": lab, "unlabeled": unl}, 0)

    x_f = _exchange_loop(unl["image"], torch.tensor([1, 0]), cfg.textmoe.band)  # B = 2: each the other's
    tokens = m.text_embedder(torch.cat([lab["text"], unl["text"]]))
    logits, aux = m.net(torch.cat([lab["image"], x_f]), tokens, return_aux=True)
    with torch.no_grad():
        t_logits = m.teacher.net(unl["image"], tokens[2:])
    hard = (torch.sigmoid(t_logits) > 0.5).long()
    dice_ce = DiceCE(1, 1.0, 1.0)  # Eq. 5: Dice + CE (the preset's loss.dice = loss.ce = 1)
    l_sup, l_cr = dice_ce(logits[:2], lab["mask"]), dice_ce(logits[2:], hard)
    cos = [F.cosine_similarity(e1.flatten(1), e2.flatten(1), dim=1).abs().mean() for e1, e2 in aux["experts"]]
    assert len(cos) == 6
    l_diff = torch.stack(cos).mean()
    torch.testing.assert_close(loss, l_sup + 0.6 * 0.5 * l_cr + 0.3 * l_diff, rtol=0, atol=2e-5)
    # the pseudo labels are the teacher's: the student's own labels would give another L_cr
    own = (torch.sigmoid(m.net(unl["image"], tokens[2:])) > 0.5).long()
    assert not torch.equal(own, hard)


def test_switches_off_give_mean_teachers_term_and_no_l_diff():
    cfg, m = _method("textmoe.cr=false", "textmoe.diff=false")
    lab, unl = _batch(cfg.data.img_size, cfg.text.max_len)
    torch.manual_seed(1)
    loss = m.training_step({"labeled": lab, "unlabeled": unl}, 0)
    torch.manual_seed(1)
    std = cfg.semi.noise_std
    noise = lambda x: x + (torch.randn_like(x) * std).clamp(-2 * std, 2 * std)
    tokens = m.text_embedder(torch.cat([lab["text"], unl["text"]]))
    logits = m.net(torch.cat([lab["image"], noise(unl["image"])]), tokens)
    with torch.no_grad():
        target = torch.sigmoid(m.teacher.net(noise(unl["image"]), tokens[2:]))
    expected = m.sup_loss(logits[:2], lab["mask"]) + 0.6 * F.mse_loss(torch.sigmoid(logits[2:]), target)
    torch.testing.assert_close(loss, expected, rtol=0, atol=2e-5)


def test_the_batchs_domain_reaches_student_and_teacher():
    cfg, m = _method()
    seen = []
    for net in (m.net, m.teacher.net):
        forward = net.forward

        def spy(images, text=None, domain=None, return_aux=False, _f=forward):
            seen.append(None if domain is None else domain.tolist())
            return _f(images, text, domain=domain, return_aux=return_aux)

        net.forward = spy
    lab, unl = _batch(cfg.data.img_size, cfg.text.max_len)
    lab["domain"], unl["domain"] = torch.tensor([0, 0]), torch.tensor([0, 0])
    m.training_step({"labeled": lab, "unlabeled": unl}, 0)
    assert seen == [[0, 0, 0, 0], [0, 0]]  # student (labeled + unlabeled), teacher (unlabeled)
    seen.clear()
    m.training_step({"labeled": {k: lab[k] for k in ("image", "mask", "text")},
                     "unlabeled": {k: unl[k] for k in ("image", "text")}}, 0)
    assert seen == [[0, 0, 0, 0], [0, 0]]  # no "domain" in the batch: domain 0
    seen.clear()
    m.validation_step({k: lab[k] for k in ("image", "mask", "text")}, 0)
    assert seen == [None]


def test_mean_teacher_passes_each_images_domain_to_student_and_teacher():
    """The family's step itself wires the modality: a Mean Teacher on a network that reads it."""
    from medtextseg.methods.mean_teacher import MeanTeacher

    cfg = load_preset("textmoe", "smoke", ["method=mean_teacher", "data.domains=[cxr, ct]"])
    enc = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim)
    enc.fit(["bilateral pulmonary infection, two infected areas, upper left lung and lower right lung"])
    m = MeanTeacher(cfg.to_dict(), text_state=enc.state(), text_dim=cfg.text.dim)
    seen = []
    for net in (m.net, m.teacher):
        forward = net.forward

        def spy(images, text=None, domain=None, _f=forward, **kw):
            seen.append(None if domain is None else domain.tolist())
            return _f(images, text, domain=domain, **kw)

        net.forward = spy
    lab, unl = _batch(cfg.data.img_size, cfg.text.max_len)
    lab["domain"], unl["domain"] = torch.tensor([0, 1]), torch.tensor([1, 0])
    m.training_step({"labeled": lab, "unlabeled": unl}, 0)
    assert seen == [[0, 1, 1, 0], [1, 0]]


def test_resize_crop_augmentation_keeps_masks_binary_and_the_size():
    cfg = DataConfig(img_size=64, augment="resize_crop", crop_min_scale=0.5)
    t = build_augmentation(cfg)
    t.set_random_state(seed=0)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    changed = 0
    for _ in range(5):
        out = t({"image": torch.rand(3, 64, 64), "mask": mask.clone()})
        assert out["image"].shape == (3, 64, 64) and out["mask"].shape == (1, 64, 64)
        assert set(torch.unique(out["mask"]).tolist()) <= {0.0, 1.0}
        changed += not torch.equal(torch.as_tensor(out["mask"]), mask)
    assert changed >= 3
    assert t({"image": torch.rand(3, 64, 64)})["image"].shape == (3, 64, 64)  # unlabeled: no mask
    with pytest.raises(ValueError, match="crop_min_scale"):
        build_augmentation(DataConfig(augment="resize_crop", crop_min_scale=0.0))


# -- runs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=5)


def _logged(run: Path) -> set[str]:
    keys: set[str] = set()
    for f in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(f) as h:
            for row in csv.DictReader(h):
                keys |= {k for k, v in row.items() if v not in ("", None)}
    return keys


@pytest.mark.parametrize("preset", ["textmoe", "textmoe-plain"])
def test_smoke_run_writes_metrics(preset, data, tmp_path):
    metrics = train(load_preset(preset, "smoke", ["data.labeled_ratio=0.25"]), data, tmp_path / preset,
                    progress=False)
    written = json.loads((tmp_path / preset / "metrics.json").read_text())
    for split in ("Val", "Test"):
        assert 0.0 <= written[split]["dice"] <= 1.0 and written[split]["dice"] == metrics[split]["dice"]
    # textmoe-plain is Table 2 row 2: the naive teacher-student loss, no L_cr / L_diff
    expected = {"train/sup", "train/cr", "train/diff"} if preset == "textmoe" else {"train/sup", "train/consistency"}
    assert expected | {"train/loss"} <= _logged(tmp_path / preset)
    if preset == "textmoe-plain":
        assert not _logged(tmp_path / preset) & {"train/cr", "train/diff"}


def test_a_size_the_network_refuses_leaves_an_existing_run_untouched(data, tmp_path):
    """The network's own checks run in check_config (a build on the meta device), before
    --overwrite clears anything."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run")
    with pytest.raises(ValueError, match="divisible by 32"):  # check_config's refusals are ValueErrors
        train(load_preset("textmoe", "smoke", ["data.labeled_ratio=0.25", "data.img_size=48"]), data, out,
              overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "an earlier run"


def test_switches_off_change_the_logged_terms(data, tmp_path):
    train(load_preset("textmoe", "smoke", ["data.labeled_ratio=0.25", "textmoe.cr=false", "textmoe.diff=false"]),
          data, tmp_path / "off", progress=False)
    keys = _logged(tmp_path / "off")
    assert "train/consistency" in keys and "train/sup" in keys
    assert not keys & {"train/cr", "train/diff"}


def test_labeled_only_row_is_the_supervised_method_on_this_preset():
    """Table 2 row 1 (L_sup only): ``--set method=supervised`` trains the same network."""
    cfg = load_preset("textmoe", "smoke", ["method=supervised", "textmoe.diff=false"])
    m = method_class(cfg.method)(cfg.to_dict(), text_state=_build(load_preset("textmoe", "smoke")).hparams["text_state"],
                                 text_dim=cfg.text.dim)
    assert m.unlabeled_keys is None and type(m.net).__name__ == "TextMoENet"
    lab, _ = _batch(cfg.data.img_size, cfg.text.max_len)
    torch.testing.assert_close(m.training_step(lab, 0), m.sup_loss(m(lab["image"], lab["text"]), lab["mask"]))
