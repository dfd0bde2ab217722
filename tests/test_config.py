"""Presets, tiers and --set overrides."""

import pytest

from medtextseg.config import (
    TIERS,
    ConfigError,
    load_preset,
    preset_names,
    read_config,
    save_config,
)

EXPECTED_PRESETS = {"unet", "lvit-t", "lvit-tw", "lvit-s", "lvit-m", "lvit-l"}


def test_every_preset_resolves_at_every_tier():
    assert EXPECTED_PRESETS <= set(preset_names())
    for name in preset_names():
        for tier in TIERS:
            cfg = load_preset(name, tier)
            assert cfg.preset == name and cfg.tier == tier


@pytest.mark.parametrize("tier", TIERS)
def test_every_segmentation_preset_passes_its_checks_and_builds_at_every_tier(tier):
    """A tier whose input size its network refuses (TextMoE's ConvNeXt needs a multiple of
    32) fails here, not minutes into a benchmark. Built on the meta device: no memory."""
    import torch

    from medtextseg.methods import method_class
    from medtextseg.methods.base import network_from_config

    for name in preset_names():
        cfg = load_preset(name, tier)
        if cfg.pretrain:
            continue
        method_class(cfg.method).check_config(cfg)
        with torch.device("meta"):
            net = network_from_config(cfg, text_dim=32)
        assert sum(p.numel() for p in net.parameters()) > 0, name


def test_inheritance_and_tiers():
    tw = load_preset("lvit-tw", "cpu")
    t = load_preset("lvit-t", "cpu")
    assert tw.network.use_text is False and t.network.use_text is True
    assert tw.data.img_size == t.data.img_size  # tier of the base preset applies
    assert load_preset("lvit-l", "paper").network.name == "lvit-l"
    assert load_preset("unet", "paper").network.name == "unet"
    paper = load_preset("lvit-t", "paper")
    assert (paper.data.img_size, paper.network.base_width, paper.optim.lr) == (224, 64, 1e-3)


def test_overrides_are_typed():
    cfg = load_preset("lvit-t", "smoke", ["optim.lr=1", "train.max_epochs=3", "network.use_text=false"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_epochs == 3
    assert cfg.network.use_text is False


@pytest.mark.parametrize("raw, value", [("3e-4", 3e-4), ("1E-3", 1e-3), ("+2.5e-5", 2.5e-5), ("1e2", 100.0)])
def test_exponent_without_a_dot_is_a_number(raw, value, tmp_path):
    """The README's own ``--set optim.lr=3e-4`` (YAML 1.1 reads it as a string)."""
    cfg = load_preset("lvit-t", "smoke", [f"optim.lr={raw}"])
    assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float)
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    assert read_config(saved).optim.lr == value
    # a text field keeps what was typed, never YAML's reading of it as a number
    assert load_preset("lvit-t", "smoke", ["text.encoder=1e2"]).text.encoder == "1e2"
    assert load_preset("lvit-t", "smoke", ["text.encoder=0123"]).text.encoder == "0123"
    assert load_preset("lvit-t", "smoke", ["text.encoder='hf:/m y'"]).text.encoder == "hf:/m y"


@pytest.mark.parametrize("bad, match", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train.max_epochs=abc"], "expects a int"),
    (["network.use_text=3"], "true/false"),
    (["novalue"], "key=value"),
    (["network.options=null"], "expects a mapping"),
    (["data.domains=cxr"], "expects a list"),
])
def test_bad_overrides(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_preset("lvit-t", "smoke", bad)


@pytest.mark.parametrize("preset, options, match", [
    ("textmoe", "{img_size: 64}", "come.s. from the config"),
    ("textmoe", "{num_domains: 3}", "come.s. from the config"),
    ("unet", "{drop_path: 0.1}", "unknown option.s. drop_path for network 'unet'; it takes upsample, num_convs"),
    ("textmoe", "{indicator: false}", None),
])
def test_network_options_are_checked_with_the_config(preset, options, match):
    """A wrong network option is refused by check_config (before a run writes anything),
    not by the network build minutes later."""
    from medtextseg.methods import method_class

    cfg = load_preset(preset, "smoke", [f"network.options={options}"])
    if match is None:
        method_class(cfg.method).check_config(cfg)
        return
    with pytest.raises(ValueError, match=match):
        method_class(cfg.method).check_config(cfg)


def test_unknown_preset_and_tier():
    with pytest.raises(ConfigError, match="available"):
        load_preset("nope")
    with pytest.raises(ConfigError, match="tier"):
        load_preset("lvit-t", "huge")


def test_atomic_write_keeps_umask_mode_and_leaves_no_temp(tmp_path):
    import os

    from medtextseg.utils import atomic_write_text

    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "a")
    atomic_write_text(target, "b")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "b"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]
