"""Tests of the TextMoE networks (medtextseg.nets.textmoe): ConvNeXt encoder, TMoE and
Plain-MoE decoders, gates and the modality indicator, L_diff's similarity, local weights.

Tiny widths (8/16/32/64) and one block per stage keep every test well under a second;
full-size counts run on the meta device (shapes only).
"""

from __future__ import annotations

import pytest
import torch

from medtextseg.nets import NETWORK_NAMES, TextMoENet, build_network
from medtextseg.nets.profile import count_gflops, count_parameters
from medtextseg.nets.textmoe import PAPER_WIDTHS, expert_difference

TINY = {"base_width": 8, "depths": (1, 1, 1, 1), "text_dim": 12, "img_size": 64}
TEXT_DIM = 12


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors gain nothing from threads, and a busy 2-core machine makes barriers slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name="textmoe", seed=0, **kw) -> TextMoENet:
    torch.manual_seed(seed)
    opts = {**TINY, "num_domains": 2, **kw}
    return build_network(name, **opts).eval()


def inputs(b=2, c=3, h=64, w=64, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g), torch.randn(b, length, TEXT_DIM, generator=g)


def test_names_are_registered():
    assert {"textmoe", "textmoe-plain"} <= set(NETWORK_NAMES)
    assert tiny().decoder_kind == "tmoe"
    assert tiny("textmoe_plain").decoder_kind == "plain"


@pytest.mark.parametrize("name", ["textmoe", "textmoe-plain"])
@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 64)])
def test_output_and_aux_shapes(name, size):
    net = tiny(name, num_classes=2)
    images, text = inputs(h=size[0], w=size[1])
    with torch.no_grad():
        logits, aux = net(images, text, domain=torch.tensor([0, 1]), return_aux=True)
        plain = net(images, text, domain=torch.tensor([0, 1]))
    assert logits.shape == (2, 2, *size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(plain, logits)
    # Six MoE layers: two per up block at 1/16, 1/8, 1/4 with widths 4b, 2b, b.
    h, w = size
    expected = [(32, h // 16, w // 16)] * 2 + [(16, h // 8, w // 8)] * 2 + [(8, h // 4, w // 4)] * 2
    assert [tuple(e1.shape[1:]) for e1, _ in aux["experts"]] == expected
    assert all(e1.shape == e2.shape for e1, e2 in aux["experts"])
    assert all(e1.shape == e2.shape for e1, e2 in aux["enhanced"])
    gates = 2 if name == "textmoe" else 3
    assert [tuple(g.shape) for g in aux["gates"]] == [(2, gates)] * 6


def test_paper_widths_and_cost_at_224():
    with torch.device("meta"):
        tmoe = build_network("textmoe", in_channels=3, num_classes=1, base_width=96, img_size=224,
                             text_dim=384, text_len=24, use_text=True, num_domains=2)
        plain = build_network("textmoe-plain", base_width=96, img_size=224, text_dim=384,
                              text_len=24, num_domains=2)
        default = build_network("textmoe", text_dim=384)
    assert tmoe.widths == PAPER_WIDTHS == default.widths
    assert tmoe.encoder.depths == (3, 3, 9, 3)
    # transformers' ConvNeXt-Tiny without its classifier's final LayerNorm: 27.82M.
    assert count_parameters(tmoe.encoder) == pytest.approx(27.82e6, rel=1e-3)
    assert count_parameters(tmoe) == pytest.approx(45.33e6, rel=1e-3)
    assert count_parameters(plain) == pytest.approx(42.22e6, rel=1e-3)
    assert count_gflops(tmoe) == pytest.approx(23.17, rel=1e-3)
    assert count_gflops(plain) == pytest.approx(21.50, rel=1e-3)


def test_gates_sum_to_one_and_follow_the_indicator():
    net = tiny()
    images, text = inputs()
    images, text = images[:1].expand(2, -1, -1, -1), text[:1].expand(2, -1, -1)  # one image twice
    with torch.no_grad():
        _, aux01 = net(images, text, domain=torch.tensor([0, 1]), return_aux=True)
        logits00, aux00 = net(images, text, domain=torch.tensor([0, 0]), return_aux=True)
        logits_none, aux_none = net(images, text, return_aux=True)
        _, aux_zero = net(images, text, domain=torch.zeros(2, 2), return_aux=True)
    for g in aux01["gates"]:
        torch.testing.assert_close(g.sum(dim=1), torch.ones(2))
        assert (g > 0).all()
        # Same image and text, different domain: different weights, in every layer.
        assert (g[0] - g[1]).abs().max() > 1e-4
    for g in aux00["gates"]:
        torch.testing.assert_close(g[0], g[1])
    # None means domain 0 for every image.
    torch.testing.assert_close(logits_none, logits00)
    for a, b, z in zip(aux00["gates"], aux_none["gates"], aux_zero["gates"]):
        torch.testing.assert_close(a, b)
        assert (a - z).abs().max() > 1e-4  # a zeroed indicator is a third input
    # The logits follow the gates.
    with torch.no_grad():
        logits11 = net(images, text, domain=torch.tensor([1, 1]))
    assert not torch.allclose(logits00, logits11)


def test_indicator_switch():
    images, text = inputs()
    plain = tiny("textmoe-plain")  # Plain-MoE: no indicator by default
    off = tiny(indicator=False)
    on = tiny("textmoe-plain", indicator=True)
    for net in (plain, off):
        assert net.decoder.blocks[0].layers[0].gate.in_features == 32 + 64
        with torch.no_grad():
            torch.testing.assert_close(net(images, text, domain=torch.tensor([0, 0])),
                                       net(images, text, domain=torch.tensor([1, 1])))
    assert on.decoder.blocks[0].layers[0].gate.in_features == 32 + 64 + 2
    with torch.no_grad():
        assert not torch.allclose(on(images, text, domain=torch.tensor([0, 0])),
                                  on(images, text, domain=torch.tensor([1, 1])))


@pytest.mark.parametrize("name", ["textmoe", "textmoe-plain"])
def test_text_changes_the_output(name):
    net = tiny(name)
    images, text = inputs()
    _, other = inputs(seed=7)
    with torch.no_grad():
        a, b = net(images, text), net(images, other)
        again = net(images, text)
        shorter = net(images, text[:, :3])  # any number of tokens
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, again)  # deterministic in eval mode
    assert shorter.shape == a.shape and not torch.allclose(a, shorter)


def test_text_expert_feeds_the_attention():
    # TMoE: the experts' *enhanced* features differ from their convolution outputs by
    # the text attention; Plain-MoE has no attention.
    images, text = inputs()
    with torch.no_grad():
        _, aux = tiny()(images, text, return_aux=True)
        _, plain_aux = tiny("textmoe-plain")(images, text, return_aux=True)
    for (e1, e2), (t1, t2) in zip(aux["experts"], aux["enhanced"]):
        assert (e1 - t1).abs().max() > 1e-3 and (e2 - t2).abs().max() > 1e-3
    for (e1, e2), (t1, t2) in zip(plain_aux["experts"], plain_aux["enhanced"]):
        assert e1 is t1 and e2 is t2
    plain = tiny("textmoe-plain")
    assert not any("attention" in n for n, _ in plain.named_parameters())


def test_expert_difference_is_eq8():
    e = torch.randn(3, 4, 3, 3)
    torch.testing.assert_close(expert_difference(e, e), torch.ones(3))
    torch.testing.assert_close(expert_difference(e, 2.5 * e), torch.ones(3))  # scale-free
    torch.testing.assert_close(expert_difference(e, -e), torch.ones(3))  # |<e1, e2>|, Eq. 8
    # Orthogonal over the whole flattened feature: disjoint channel halves.
    a, b = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    a[:, :2], b[:, 2:] = torch.rand(2, 2, 3, 3) + 0.1, torch.rand(2, 2, 3, 3) + 0.1
    torch.testing.assert_close(expert_difference(a, b), torch.zeros(2))
    # Every row along the width is parallel (cosine 1 along that axis), the whole vectors
    # are orthogonal: Eq. 8 is taken over the whole feature (not the width axis only).
    x = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    y = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])
    torch.testing.assert_close(expert_difference(x, y), torch.zeros(1))
    # Per sample: a batch mixing identical and orthogonal pairs.
    mixed = expert_difference(torch.stack([e[0], a[0]]), torch.stack([e[0], b[0]]))
    torch.testing.assert_close(mixed, torch.tensor([1.0, 0.0]))
    # An all-zero output gives 0, not NaN, and the value is differentiable.
    assert expert_difference(torch.zeros(1, 3), torch.ones(1, 3)).item() == 0.0
    p = torch.randn(2, 6, requires_grad=True)
    expert_difference(p, torch.randn(2, 6)).mean().backward()
    assert p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        expert_difference(torch.zeros(2, 3), torch.zeros(2, 4))


def test_expert_difference_on_network_outputs():
    images, text = inputs()
    _, aux = tiny()(images, text, return_aux=True)
    for e1, e2 in aux["experts"]:
        d = expert_difference(e1, e2)
        assert d.shape == (2,) and ((d >= 0) & (d <= 1 + 1e-6)).all()
        assert d.requires_grad


def test_one_channel_input():
    net = tiny(in_channels=1)
    assert net.encoder.embeddings.patch_embeddings.in_channels == 1
    images, text = inputs(c=1)
    with torch.no_grad():
        assert net(images, text).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, H, W\]"):
        net(torch.rand(2, 3, 64, 64), text)


def test_encoder_gives_convnext_stage_outputs():
    # Our encoder runs the stem and stages itself: the same tensors as transformers'
    # output_hidden_states (after the stem) on the ImageNet-normalised image.
    from transformers import ConvNextConfig, ConvNextModel

    net = tiny()
    reference = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
    state = {("encoder." if k.startswith("stages.") else "") + k: v
             for k, v in net.encoder.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"layernorm.weight", "layernorm.bias"}
    images, _ = inputs()
    with torch.no_grad():
        ours = net.encoder(images)
        theirs = reference.eval()(_normalised(images), output_hidden_states=True).hidden_states
    assert [tuple(f.shape[1:]) for f in ours] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    for a, b in zip(ours, theirs[1:], strict=True):
        torch.testing.assert_close(a, b)


def _save_tiny_convnext(path, classifier=False, num_channels=3, seed=3):
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextModel

    torch.manual_seed(seed)
    config = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            num_channels=num_channels)
    model = (ConvNextForImageClassification if classifier else ConvNextModel)(config).eval()
    model.save_pretrained(path)
    return model.convnext if classifier else model


def _normalised(images):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.mark.parametrize("classifier", [False, True])
def test_hf_checkpoint_loads_local_weights(tmp_path, classifier):
    saved = _save_tiny_convnext(tmp_path, classifier=classifier)
    torch.manual_seed(99)  # the encoder must come from the folder, not from this seed
    net = build_network("textmoe", encoder=f"hf:{tmp_path}", text_dim=TEXT_DIM, img_size=64).eval()
    assert net.widths == (8, 16, 32, 64) and net.encoder.depths == (1, 1, 1, 1)
    torch.testing.assert_close(net.encoder.embeddings.patch_embeddings.weight,
                               saved.embeddings.patch_embeddings.weight)
    images, text = inputs()
    with torch.no_grad():
        ours = net.encoder(images)
        theirs = saved(_normalised(images), output_hidden_states=True).hidden_states[1:]
        assert net(images, text).shape == (2, 1, 64, 64)
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_hf_checkpoint_with_gray_images_and_errors(tmp_path):
    saved = _save_tiny_convnext(tmp_path)
    gray = build_network("textmoe", encoder=f"hf:{tmp_path}", in_channels=1, base_width=8,
                         text_dim=TEXT_DIM, img_size=64).eval()
    images, text = inputs(c=1)
    with torch.no_grad():
        ours = gray.encoder(images)
        theirs = saved(_normalised(images.repeat(1, 3, 1, 1)), output_hidden_states=True)
        assert gray(images, text).shape == (2, 1, 64, 64)
    torch.testing.assert_close(ours[-1], theirs.hidden_states[-1])
    with pytest.raises(ValueError, match=r"base_width=8"):
        build_network("textmoe", encoder=f"hf:{tmp_path}", base_width=96, text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="depths"):
        build_network("textmoe", encoder=f"hf:{tmp_path}", depths=(3, 3, 9, 3), text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="3-channel"):
        build_network("textmoe", encoder=f"hf:{tmp_path}", in_channels=2, text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="does not exist"):
        build_network("textmoe", encoder=f"hf:{tmp_path / 'missing'}", text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        build_network("textmoe", encoder=f"hf:{tmp_path / 'empty'}", text_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="hf:<dir>"):
        build_network("textmoe", encoder="convnext-tiny", text_dim=TEXT_DIM)


def test_gradients_reach_encoder_experts_text_expert_and_gate():
    net = tiny().train()
    images, text = inputs()
    logits, aux = net(images, text, domain=torch.tensor([0, 1]), return_aux=True)
    diff = torch.stack([expert_difference(e1, e2).mean() for e1, e2 in aux["experts"]]).mean()
    (logits.square().mean() + diff).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters never used: {missing}"

    def grad(prefix):
        return sum(p.grad.abs().sum().item() for n, p in net.named_parameters()
                   if n.startswith(prefix))

    layer = "decoder.blocks.0.layers.0."
    for prefix in ("encoder.embeddings.", "encoder.stages.0.", "encoder.stages.3.",
                   layer + "experts.", layer + "gate.", layer + "text_expert.",
                   layer + "attention.0.", layer + "attention.1.", "decoder.head."):
        assert grad(prefix) > 0, prefix
    # The gate's indicator columns learn too (both domains are in the batch).
    gate = net.decoder.blocks[0].layers[0].gate
    assert gate.weight.grad[:, -2:].abs().min() > 0


def test_without_text():
    net = tiny(use_text=False)
    assert not any("text_expert" in n or "attention" in n for n, _ in net.named_parameters())
    images, text = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(images), net(images, text))  # text ignored


def test_input_errors():
    net = tiny()
    images, text = inputs()
    with pytest.raises(ValueError, match="use_text=False"):
        net(images)
    with pytest.raises(ValueError, match=r"expected text of shape"):
        net(images, torch.randn(2, 5, TEXT_DIM + 1))
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.rand(2, 3, 48, 48), text)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_network("textmoe", img_size=80, base_width=8)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        net(images, text, domain=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        net(images, text, domain=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        net(images, text, domain=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="valid options"):
        build_network("textmoe", upsample="nearest")
    with pytest.raises(ValueError, match="num_domains"):
        build_network("textmoe", num_domains=0, base_width=8)


def test_channels_last_gives_the_same_logits():
    # train.channels_last converts the network; the attention reshapes must not care.
    net = tiny()
    images, text = inputs()
    with torch.no_grad():
        ref = net(images, text)
        net = net.to(memory_format=torch.channels_last)
        out = net(images.contiguous(memory_format=torch.channels_last), text)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("name", ["textmoe", "textmoe-plain"])
def test_padding_tokens_change_nothing(name):
    """The text encoders pad with zero vectors; the text expert would turn each pad into the
    same non-zero token, so pads are kept out of the attention (TMoE) and the mean (Plain-MoE)."""
    net = tiny(name)
    images, text = inputs(length=5)
    padded = torch.cat([text, torch.zeros(2, 7, TEXT_DIM)], dim=1)
    padded[1, 3:] = 0.0  # the second text has only 3 real tokens
    short = text.clone()
    short[1, 3:] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(net(images, padded), net(images, short), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(net(images, padded), net(images, text), atol=1e-4)  # the text still counts
