"""Text encoders (learned, packaged MiniLM, local Hugging Face checkpoint, none) and their cache.

Use :func:`build_text_encoder`; see :mod:`medtextseg.text.encoders` for the feature layout.
Truncated or unrepresentable texts give a :class:`TextWarning` (one per kind and encode call).
"""

from medtextseg.text.cache import EmbeddingCache, text_hash
from medtextseg.text.checks import TextReport, TextWarning
from medtextseg.text.encoders import (
    VALID_SPECS,
    FrozenTextEncoder,
    LearnedTextEncoder,
    NoTextEncoder,
    TextEncoder,
    build_text_encoder,
    check_model_dir,
    minilm_model_dir,
    model_fingerprint,
)
from medtextseg.text.tokenize import PAD_ID, UNK_ID, Vocab, tokenize_words

__all__ = [
    "PAD_ID",
    "UNK_ID",
    "VALID_SPECS",
    "EmbeddingCache",
    "FrozenTextEncoder",
    "LearnedTextEncoder",
    "NoTextEncoder",
    "TextEncoder",
    "TextReport",
    "TextWarning",
    "Vocab",
    "build_text_encoder",
    "check_model_dir",
    "minilm_model_dir",
    "model_fingerprint",
    "text_hash",
    "tokenize_words",
]
