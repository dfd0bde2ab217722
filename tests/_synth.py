"""Shared by the end-to-end, CLI and stability tests: a tiny synthetic dataset, the smoke
options, and the command line run in-process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtextseg.cli import app
from medtextseg.data.synthetic import GENERATORS

SMOKE = ["--tier", "smoke", "--set", "data.augment=none"]
runner = CliRunner()


def tiny_cxr(tmp_path_factory, name: str = "cxr", seed: int = 0) -> Path:
    """30 synthetic chest X-rays at 64², in the LViT layout."""
    out = tmp_path_factory.mktemp("synth") / name
    GENERATORS["chest-xray"](out, n=30, seed=seed, size=64)
    return out


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def no_network():
    """Any socket connection fails and the Hugging Face libraries are told to stay offline."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
