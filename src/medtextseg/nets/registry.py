"""The registry of segmentation networks: a network file joins it by one
:func:`register_network` call at its end, and :func:`medtextseg.nets.build_network` finds it
(the package imports every module of ``medtextseg.nets`` once): no list elsewhere to edit.

A family is the set of names one builder serves (``lvit-t`` ... ``lvit-l`` are one family,
as are ``textmoe`` and ``textmoe-plain``); its own keyword options (``network.options`` in a
config) are declared with it and checked before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medtextseg.registry import Registry

#: Options every network takes (each family may ignore some: the U-Nets are image-only).
#: They come from config fields (``data.img_size``, ``network.base_width``, ...), never
#: from ``network.options``.
COMMON_OPTIONS: tuple[str, ...] = (
    "in_channels", "num_classes", "base_width", "img_size", "text_dim", "text_len", "use_text", "num_domains")
TEXT_OPTIONS: tuple[str, ...] = ("img_size", "text_dim", "text_len", "use_text")
# Only the TextMoE gates read the modality; the other families accept and ignore it.
DOMAIN_OPTIONS: tuple[str, ...] = ("num_domains",)


@dataclass(frozen=True)
class NetworkFamily:
    """One builder and the names it serves.

    Attributes:
        family: the family's name (``"lvit"``), for messages.
        names: the network names it builds, lower case with ``-`` (``("lvit-t", "lvit-s")``).
        options: its own keyword options beyond :data:`COMMON_OPTIONS`.
        build: ``build(name, **options) -> nn.Module``, called with a name of ``names`` and
            only options of :data:`COMMON_OPTIONS` + ``options`` (already checked).
    """

    family: str
    names: tuple[str, ...]
    options: tuple[str, ...]
    build: Callable[..., nn.Module]


_FAMILIES: Registry[NetworkFamily] = Registry("network")


def register_network(family: str, names: tuple[str, ...], options: tuple[str, ...],
                     build: Callable[..., nn.Module]) -> NetworkFamily:
    """Register a family (:class:`NetworkFamily`) under each of its ``names``.

    Raises:
        ValueError: a name is registered already (two files claim it), or an option shadows
            a common one.
    """
    spec = NetworkFamily(family, tuple(names), tuple(options), build)
    shadow = sorted(set(spec.options) & set(COMMON_OPTIONS))
    if shadow:
        raise ValueError(f"{family}: option(s) {', '.join(shadow)} are common options, not the family's own")
    for name in spec.names:
        _FAMILIES.add(name, spec)
    return spec


def network_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_FAMILIES)


def family_of(name: str) -> NetworkFamily:
    """The family of ``name`` (case-insensitive, ``_`` == ``-``).

    Raises:
        ValueError: not a registered name (the message lists them).
    """
    key = normalise(name)
    if key not in _FAMILIES:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(_FAMILIES)}")
    return _FAMILIES[key]


def normalise(name: Any) -> str:
    return str(name).strip().lower().replace("_", "-")


def without(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``options`` less the keys in ``names`` (the common options a family ignores)."""
    return {k: v for k, v in options.items() if k not in names}


__all__ = ["COMMON_OPTIONS", "DOMAIN_OPTIONS", "TEXT_OPTIONS", "NetworkFamily", "family_of", "network_names",
           "normalise", "register_network", "without"]
