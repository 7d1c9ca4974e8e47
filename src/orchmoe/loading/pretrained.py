"""Loading a base model and its tokenizer, offline: the default SmolLM2, a local checkpoint, a .gguf file
or a hub id already in the local Hugging Face cache.

``dtype="auto"`` (the recipe's default, ``--dtype auto``) loads the frozen base weights in bfloat16 on a
GPU and float32 on CPU; called without ``dtype`` the function loads float32, as ``from_pretrained`` does.
The adapters are always created in float32.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from orchmoe.loading.gguf import DEFAULT_MODEL, convert_gguf, read_marker, smollm2_gguf_path

__all__ = ["DEFAULT_MODEL", "load_model_and_tokenizer", "is_encoder_decoder", "resolve_dtype"]


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: Any, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name; ``None`` is float32 and ``"auto"`` bfloat16 when the model goes to (or,
    with no device given, a machine has) a GPU that supports it, else float32.

    Args:
        dtype: None, ``"auto"``, a ``torch.dtype`` or a name (``"bf16"``, ``"torch.float16"``, ...).
        device: where the model will run (decides ``"auto"``).
    Returns:
        The ``torch.dtype``.
    Raises:
        ValueError: an unknown name.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return (
            torch.bfloat16 if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def _stable_name(path: Path) -> str:
    """Base-model name to record in adapter files: the cache marker's name, else the dir name."""
    marker = read_marker(path)
    if marker and marker.get("name"):
        return str(marker["name"])
    return path.name


def _finish_tokenizer(tok: Any, model: Any) -> None:
    """Pad token (eos fallback) on both tokenizer and config; sane ``model_max_length``."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ValueError("tokenizer has neither a pad, eos nor unk token to pad with")
    cfg = model.config
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = cfg.pad_token_id
    # GGUF/other tokenizers often report a 1e30 sentinel: truncation would never kick in.
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > 10**9):
        tok.model_max_length = int(max_pos)


def _load_dir(path: str, dtype: Any) -> tuple[Any, Any]:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path for context
        raise OSError(f"could not load a tokenizer from {path}: {e}") from e
    model = cls.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    return model, tok


def load_model_and_tokenizer(
    model: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any, dict]:
    """Load ``(model, tokenizer, info)`` offline, in eval mode, the tokenizer given a pad token.

    Args:
        model: ``None``/``DEFAULT_MODEL`` (SmolLM2 via the cached GGUF conversion), a local transformers
            checkpoint dir (causal LM, or seq2seq when ``config.is_encoder_decoder``), a ``.gguf`` file
            (converted and cached like SmolLM2), or a hub id already present in the local HF cache.
        dtype: of the base weights (`resolve_dtype`): float32 by default; ``"auto"`` is bfloat16 on a GPU,
            float32 on CPU.
        cache_dir: where GGUF conversions are cached (overrides ``$ORCHMOE_CACHE``).
        device: where to move the model (default: where transformers loads it).
    Returns:
        ``(model, tokenizer, info)``; ``info`` = {name, source, is_encoder_decoder, model_type,
        load_seconds}; ``name`` is stable across machines and meant for adapter files.
    Raises:
        FileNotFoundError: no such checkpoint, file or cached hub id.
        ValueError: a path that is neither a checkpoint directory nor a .gguf file.
    """
    t0 = time.perf_counter()
    torch_dtype = resolve_dtype(dtype, device)
    spec = DEFAULT_MODEL if model is None else os.fspath(model)

    if spec.lower() == DEFAULT_MODEL.lower() and not Path(spec).exists():
        src = convert_gguf(smollm2_gguf_path(), cache_dir)
        m, tok = _load_dir(str(src), torch_dtype)
        name = DEFAULT_MODEL
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            src = convert_gguf(path, cache_dir)
            m, tok = _load_dir(str(src), torch_dtype)
            name = _stable_name(src)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is a directory but has no config.json: not a transformers checkpoint")
            src = path.resolve()
            m, tok = _load_dir(str(src), torch_dtype)
            name = _stable_name(src)
        elif path.exists():
            raise ValueError(f"{path} is neither a checkpoint directory nor a .gguf file")
        else:
            # Hub ids are "name" or "org/name"; anything else is a (missing) path.
            looks_like_path = (
                spec.startswith((".", "/", "~"))
                or spec.count("/") > 1
                or (os.sep != "/" and os.sep in spec)
                or spec.lower().endswith(".gguf")
            )
            err = FileNotFoundError(
                f"model {spec!r} not found: no such file or directory, and it is not in the "
                f"local Hugging Face cache (hub downloads are not available offline). Use "
                f"{DEFAULT_MODEL!r}, a local checkpoint directory or a .gguf file."
            )
            if looks_like_path:
                raise err
            try:  # a hub id that happens to be in the HF cache already
                m, tok = _load_dir(spec, torch_dtype)
            except Exception as e:  # noqa: BLE001
                raise err from e
            src, name = spec, spec

    _finish_tokenizer(tok, m)
    if device is not None:
        m = m.to(device)
    m.eval()
    info = {
        "name": name,
        "source": str(src),
        "is_encoder_decoder": is_encoder_decoder(m),
        "model_type": getattr(m.config, "model_type", None),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return m, tok, info


def is_encoder_decoder(model: Any) -> bool:
    """True for seq2seq models (T5...).  Accepts a model, a wrapper with ``.config`` /
    ``.base_model`` / ``.model``, or a config; decides decoder-only vs seq2seq batching."""
    obj = model
    for _ in range(4):
        if obj is None:
            break
        if hasattr(obj, "is_encoder_decoder") and not callable(obj.is_encoder_decoder):
            val = obj.is_encoder_decoder
            if isinstance(val, bool):
                return val
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "is_encoder_decoder"):
            return bool(cfg.is_encoder_decoder)
        obj = getattr(obj, "base_model", None) or getattr(obj, "model", None)
    return False
