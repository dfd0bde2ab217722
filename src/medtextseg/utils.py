"""Small shared helpers: the one atomic file write (every output goes through it)."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``,
    so a reader never sees a half-written file even if the process is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # On disk before the rename, so a crash never leaves a renamed empty file.
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation buffers back to the OS after every step.

    By default large tensors are mmap-ed and unmapped on free, so every CPU training
    step page-faults its activations in again: 10-15% of an LViT-T step on 2 cores
    (benchmarks/throughput.py --malloc-tuning: 0.48 -> 0.62 train img/s). Keeping the
    memory costs nothing but a higher resident high-water mark. No-op off glibc.
    Process-wide: only entry points (the CLI, a benchmark child) call it (DESIGN §8).
    Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def numpy_rng_state(rng) -> dict:
    """The state of a NumPy ``RandomState`` (``rng``, or the global one for the module
    ``numpy.random``) as plain tensors and numbers, which a checkpoint loaded with
    ``torch.load(weights_only=True)`` (Lightning's default) may hold."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, gauss = rng.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_numpy_rng_state(rng, state: dict) -> None:
    """Inverse of :func:`numpy_rng_state`."""
    import numpy as np

    rng.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                   state["gauss"]))
