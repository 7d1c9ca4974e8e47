"""Deprecated location: base-model loading now lives in `orchmoe.loading`, the GGUF cache in
`orchmoe.gguf_cache`. Kept importable for code written against orchmoe 0.1; importing it warns."""

import warnings

from .gguf_cache import DEFAULT_MODEL, cache_root, convert_gguf, smollm2_gguf_path  # noqa: F401
from .loading import is_encoder_decoder, load_model_and_tokenizer  # noqa: F401

warnings.warn(
    "orchmoe.models is deprecated: import load_model_and_tokenizer from orchmoe.loading and the GGUF "
    "cache helpers from orchmoe.gguf_cache",
    DeprecationWarning,
    stacklevel=2,
)
