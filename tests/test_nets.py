"""Tests of medtextseg.nets: shapes, sizes, FLOPs, errors, gradients, determinism.

Small widths and images keep this fast; full-size LViT-T / U-Net are built on
the meta device (no memory, no compute) for parameter and FLOP counts.
"""

from __future__ import annotations

import pytest
import torch

from medtextseg.nets import NETWORK_NAMES, LViT, UNet, build_network
from medtextseg.nets.profile import count_flops, count_gflops, count_parameters
from medtextseg.nets.vit import Attention

TEXT_MODULES = ("text_encoder", "text_ctbn")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors gain nothing from threads, and on a busy 2-core machine every
    # OpenMP barrier can wait a whole scheduler slice (100x slower tests).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_lvit(**kw) -> LViT:
    opts = {"base_width": 8, "img_size": 32, "text_dim": 12, "text_len": 10}
    opts.update(kw)
    return build_network("lvit-t", **opts)


def rand_inputs(b=2, c=3, h=32, w=32, length=10, dim=12):
    return torch.rand(b, c, h, w), torch.randn(b, length, dim)


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_every_name_builds_and_runs(name):
    torch.manual_seed(0)
    net = build_network(name, base_width=8, img_size=32, text_dim=12, text_len=3).eval()
    images, text = rand_inputs(length=3)
    with torch.no_grad():
        assert net(images, text).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(
    "size,text_len",
    [((32, 32), 1), ((64, 48), 7), ((96, 96), 10), ((48, 64), 24)],
)
def test_lvit_output_shapes(size, text_len):
    torch.manual_seed(0)
    # Built for 32x32: other sizes exercise position-embedding and text-token resampling.
    net = small_lvit(text_len=text_len, num_classes=2, in_channels=1).eval()
    images, text = rand_inputs(c=1, h=size[0], w=size[1], length=text_len)
    with torch.no_grad():
        out = net(images, text)
    assert out.shape == (2, 2, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (96, 96)])
def test_unet_output_shapes(size):
    net = build_network("unet", base_width=8, num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, *size)).shape == (1, 3, *size)


def test_non_square_build_size():
    net = small_lvit(img_size=(48, 32)).eval()
    images, text = rand_inputs(h=48, w=32)
    with torch.no_grad():
        assert net(images, text).shape == (2, 1, 48, 32)


def test_unet_accepts_and_ignores_text_options():
    net = build_network(
        "unet",
        in_channels=3,
        num_classes=1,
        base_width=8,
        use_text=True,
        text_dim=5,
        text_len=2,
        img_size=64,
    ).eval()
    images, text = rand_inputs()
    with torch.no_grad():
        assert torch.equal(net(images), net(images, text))
    assert build_network("unet", in_channels=3, num_classes=1, base_width=64) is not None


def test_lvit_tw_has_no_text_modules():
    with_text, without = small_lvit(), small_lvit(use_text=False)
    names = [n for n, _ in without.named_parameters()] + [n for n, _ in without.named_modules()]
    assert not any(t in n for n in names for t in TEXT_MODULES)
    assert any(t in n for n, _ in with_text.named_parameters() for t in TEXT_MODULES)
    assert count_parameters(without) < count_parameters(with_text)
    images, text = rand_inputs()
    without.eval()
    with torch.no_grad():
        assert torch.equal(without(images), without(images, text))  # text is ignored


def _meta(name, **kw):
    with torch.device("meta"):
        return build_network(name, **kw)


def test_full_size_parameter_counts():
    lvit = _meta("lvit-t", base_width=64, img_size=224, text_dim=768, text_len=10)
    lvit_tw = _meta("lvit-t", use_text=False)
    unet = _meta("unet", base_width=64)
    position = sum(p.numel() for n, p in lvit.named_parameters() if n.endswith("position"))
    assert count_parameters(lvit) == pytest.approx(29.7e6, rel=0.02)
    assert count_parameters(lvit) - position == pytest.approx(
        29.7e6, rel=0.002
    )  # the paper's figure
    assert count_parameters(lvit_tw) == pytest.approx(28.0e6, rel=0.02)
    assert count_parameters(unet) == pytest.approx(14.8e6, rel=0.02)


def test_full_size_gflops():
    # Meta tensors: FlopCounterMode reads shapes only, so this takes ~1 s instead of a real forward.
    lvit = _meta("lvit-t")
    assert count_gflops(
        lvit, img_size=(224, 224), in_channels=3, text_len=10, text_dim=768
    ) == pytest.approx(54.0, rel=0.05)


def test_flop_count_includes_attention():
    dim, n, heads = 16, 10, 4
    attn = Attention(dim, heads).eval()
    x = torch.randn(1, n, dim)
    from torch.utils.flop_counter import FlopCounterMode

    from medtextseg.nets.profile import _custom_mapping

    with (
        FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter,
        torch.no_grad(),
    ):
        attn(x)
    linear = 2 * n * dim * 3 * dim + 2 * n * dim * dim
    attention = 2 * 2 * n * n * dim  # QK^T and AV over all heads
    assert counter.get_total_flops() == linear + attention
    assert count_flops(small_lvit()) > 0


def test_missing_text_raises():
    net = small_lvit()
    images, _ = rand_inputs()
    with pytest.raises(ValueError, match="use_text=False"):
        net(images)


@pytest.mark.parametrize("shape", [(2, 10, 13), (2, 9, 12), (1, 10, 12), (2, 10)])
def test_wrong_text_shape_raises(shape):
    net = small_lvit()
    images, _ = rand_inputs()
    with pytest.raises(ValueError, match=r"expected text of shape.*got"):
        net(images, torch.randn(*shape))


def test_size_not_divisible_by_16_raises():
    net = small_lvit()
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(2, 3, 40, 32), torch.randn(2, 10, 12))
    with pytest.raises(ValueError, match="divisible by 16"):
        small_lvit(img_size=100)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_network("unet", base_width=8)(torch.rand(1, 3, 24, 24))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\]"):
        net(torch.rand(2, 1, 32, 32), torch.randn(2, 10, 12))


def test_unknown_name_and_option_raise():
    with pytest.raises(ValueError, match="lvit-t"):
        build_network("lvit-xl")
    with pytest.raises(ValueError, match="valid options"):
        build_network("lvit-t", depth=3)
    with pytest.raises(ValueError, match="valid options"):
        build_network("unet", dropout=0.2)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = small_lvit().train()
    images, text = rand_inputs()
    net(images, text).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters never used: {missing}"
    text_grads = {
        n: p.grad.abs().sum().item()
        for n, p in net.named_parameters()
        if n.startswith(TEXT_MODULES)
    }
    assert text_grads and all(g > 0 for g in text_grads.values()), text_grads


def test_deterministic_in_eval_mode():
    images, text = rand_inputs()
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = small_lvit().eval()
        with torch.no_grad():
            outs.append(net(images, text))
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert torch.equal(net(images, text), outs[1])


@pytest.mark.parametrize("name", ["lvit-t", "unet"])
def test_memory_layouts_agree(name):
    # Without autograd the CPU forward runs channels_last internally, with autograd in the
    # caller's layout; a channels_last model must give the same logits too.
    torch.manual_seed(0)
    net = build_network(name, base_width=8, img_size=32, text_dim=12).eval()
    images, text = rand_inputs()
    ref = net(images, text).detach()  # autograd on: NCHW path
    with torch.no_grad():
        out = net(images, text)
        net = net.to(memory_format=torch.channels_last)
        out_cl = net(images.contiguous(memory_format=torch.channels_last), text)
    for o in (out, out_cl):
        assert o.is_contiguous()
        torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)
    net.train()
    net(images.contiguous(memory_format=torch.channels_last), text).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_lvit_sizes_differ_only_in_depth():
    sizes = {
        n: count_parameters(_meta(n, base_width=8, img_size=32, text_dim=12)) for n in NETWORK_NAMES
    }
    assert sizes["lvit-t"] < sizes["lvit-s"] < sizes["lvit-m"] < sizes["lvit-l"]
    assert isinstance(_meta("unet"), UNet)


def test_plam_gate_off_is_eq8_bare_product_and_loads_the_gated_weights():
    from medtextseg.nets import PLAM

    torch.manual_seed(0)
    gated, bare = PLAM(4), PLAM(4, gate=False)
    bare.load_state_dict(gated.state_dict())  # no parameter added or removed
    x = torch.randn(2, 4, 5, 6)
    b = torch.relu(gated.branches(x))
    cat = torch.cat([b[:, :4].mean(1, keepdim=True), b[:, 4:].amax(1, keepdim=True)], 1)
    cat = torch.cat([cat, cat[:, :1] + cat[:, 1:]], 1)
    m = gated.mlp[2](torch.relu(gated.mlp[0](cat)))  # the MLP's raw output, [2, 1, 5, 6]
    torch.testing.assert_close(bare(x), x * m)  # Eq. 8: Y = MLP(x_cat) (x) x
    torch.testing.assert_close(gated(x), x * torch.sigmoid(m))
    net = build_network("lvit-t", base_width=8, img_size=32, text_dim=12, text_len=3, plam_gate=False)
    ref = build_network("lvit-t", base_width=8, img_size=32, text_dim=12, text_len=3)
    net.load_state_dict(ref.state_dict())
    net.eval(), ref.eval()
    img, txt = torch.rand(1, 3, 32, 32), torch.randn(1, 3, 12)
    assert not torch.allclose(net(img, txt), ref(img, txt))  # the option reaches every skip
