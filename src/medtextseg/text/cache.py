"""Token-embedding cache for frozen text encoders: in memory, optionally on disk.

Layout on disk::

    <cache_dir>/<encoder_key>/encoder.json        what the key stands for (for humans)
    <cache_dir>/<encoder_key>/<sha1(text)>.npy    float32 [n_tokens, D], real tokens only

``encoder_key`` already folds in the model files' fingerprint and ``max_len``,
so a changed checkpoint or length never reads stale entries. One small file
per text keeps concurrent writers (several processes / DDP ranks) from ever
touching the same file except to write identical bytes; every write goes to a
temporary file first and is moved into place with :func:`os.replace`
(:func:`medtextseg.utils.atomic_write_bytes`; files get the mode the umask
gives), so a reader sees either nothing or a complete file. ``.npy`` loads
about three times faster than ``torch.load`` for many small arrays (~0.2 s per
1,000 texts).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from medtextseg.utils import atomic_write_bytes

log = logging.getLogger(__name__)


def text_hash(text: str) -> str:
    """Hex sha1 of the exact UTF-8 text: the cache key of one description."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Per-text token embeddings of one encoder identity.

    Values are float32 tensors ``[n_tokens, D]`` holding only the real
    (non-padding) tokens; the encoder pads them to ``[L, D]`` on the way out.

    Args:
        encoder_key: identity of the encoder (spec kind + model fingerprint + max_len).
        cache_dir: root of the on-disk cache, or ``None`` for memory only.
        describe: JSON-serialisable description written once as ``encoder.json``.
    """

    def __init__(
        self, encoder_key: str, cache_dir: Path | None = None, describe: dict | None = None
    ):
        self.encoder_key = encoder_key
        self._memory: dict[str, torch.Tensor] = {}
        self.dir: Path | None = None
        if cache_dir is not None:
            self.dir = Path(cache_dir).expanduser() / encoder_key
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "encoder.json"
            if describe is not None and not meta.exists():
                atomic_write_bytes(meta, json.dumps(describe, indent=2, sort_keys=True).encode())

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached ``[n_tokens, D]`` float32 tensor for a text hash, or ``None``."""
        hit = self._memory.get(key)
        if hit is not None or self.dir is None:
            return hit
        path = self._path(key)
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            # Only a foreign or damaged file can get here (writes are atomic);
            # recomputing is cheap and the write will replace it.
            log.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None
        if arr.ndim != 2 or arr.dtype != np.float32:
            log.warning("ignoring cache file %s with shape %s dtype %s", path, arr.shape, arr.dtype)
            return None
        value = torch.from_numpy(arr)
        self._memory[key] = value
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store a ``[n_tokens, D]`` tensor (copied, float32) in memory and, if enabled, on disk."""
        value = value.detach().to("cpu", torch.float32).contiguous().clone()
        self._memory[key] = value
        if self.dir is not None:
            buf = io.BytesIO()
            np.save(buf, value.numpy(), allow_pickle=False)
            atomic_write_bytes(self._path(key), buf.getvalue())
