"""Registries: a method, a pre-training module or a network joins the toolkit from its own
file, with no list elsewhere to edit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medtextseg.config import load_preset
from medtextseg.methods import METHODS, method_class
from medtextseg.methods.supervised import Supervised
from medtextseg.nets import build_network, check_network_options
from medtextseg.nets import registry as net_registry
from medtextseg.pretrain import PRETRAINERS
from medtextseg.registry import Registry, import_submodules

PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "src/medtextseg/presets").glob("*.yaml"))


def test_registry_refuses_a_second_owner_of_a_name_and_lists_the_names():
    reg: Registry[object] = Registry("widget")
    a, b = type("A", (), {}), type("B", (), {})
    reg.add("a", a)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", b)
    # The same class defined again (its module re-imported) is the same registration.
    reg.add("a", type("A", (), {"__module__": a.__module__}))
    with pytest.raises(ValueError, match=r"unknown widget 'z'; available: a"):
        reg.get_or_raise("z")
    assert list(reg) == ["a"] and len(reg) == 1


def test_import_submodules_imports_every_module_of_a_package(tmp_path, monkeypatch):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("FOUND = []\n")
    for name in ("alpha", "beta"):
        (pkg / f"{name}.py").write_text(f"from probe_pkg import FOUND\nFOUND.append({name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import probe_pkg

    import_submodules("probe_pkg", probe_pkg.__path__)
    assert probe_pkg.FOUND == ["alpha", "beta"]
    for name in [m for m in sys.modules if m.startswith("probe_pkg")]:
        monkeypatch.delitem(sys.modules, name)


def test_a_method_class_registers_itself_by_its_class_statement(monkeypatch):
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))

    class Probe(Supervised, method="probe-method"):
        pass

    assert method_class("probe-method") is Probe
    with pytest.raises(ValueError, match="registered twice"):
        type("Other", (Supervised,), {}, method="probe-method")
    # An intermediate class without a name stays out.
    n = len(METHODS)
    type("Base", (Supervised,), {})
    assert len(METHODS) == n


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_names_a_registered_method_or_pretraining_module(preset):
    cfg = load_preset(preset, "smoke")
    assert (cfg.pretrain in PRETRAINERS) if cfg.pretrain else (cfg.method in METHODS)


class _Probe(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 1, base_width: int = 4, scale: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.scale = scale

    def forward(self, images, text=None):
        return self.conv(images) * self.scale


def test_a_network_file_registers_its_family_and_build_network_finds_it(monkeypatch):
    monkeypatch.setattr(net_registry._FAMILIES, "_items", dict(net_registry._FAMILIES._items))

    def build(name, **options):
        return _Probe(**net_registry.without(options, net_registry.TEXT_OPTIONS + net_registry.DOMAIN_OPTIONS))

    net_registry.register_network("probe", ("probe-net",), ("scale",), build)
    net = build_network("Probe_Net", in_channels=1, num_classes=2, img_size=32, text_dim=8, scale=2.0)
    assert isinstance(net, _Probe) and net.scale == 2.0
    assert net(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 8, 8)
    check_network_options("probe-net", {"scale": 0.5})
    with pytest.raises(ValueError, match="unknown option.*depths"):
        build_network("probe-net", depths=(1,))
    with pytest.raises(ValueError, match="it takes scale"):
        check_network_options("probe-net", {"num_heads": 2})
    with pytest.raises(ValueError, match="registered twice"):
        net_registry.register_network("again", ("probe-net",), (), build)
    with pytest.raises(ValueError, match="common options"):
        net_registry.register_network("bad", ("bad-net",), ("img_size",), build)


def test_the_shipped_networks_are_all_registered():
    assert set(net_registry.network_names()) == {
        "unet", "resunet", "lvit-t", "lvit-s", "lvit-m", "lvit-l", "textmoe", "textmoe-plain"}

