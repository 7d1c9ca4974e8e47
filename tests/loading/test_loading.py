"""Base-model loading (`orchmoe.loading`) and the GGUF cache (`orchmoe.loading.gguf`): checkpoints, the
atomic cache, SmolLM2's GGUF."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import tiny_models
from orchmoe.loading import gguf as gguf_cache
from orchmoe.loading.gguf import DEFAULT_MODEL, atomic_materialize
from orchmoe.loading.pretrained import is_encoder_decoder, load_model_and_tokenizer, resolve_dtype
from recipe_helpers import save_tiny
from tiny_models import tiny_model

ARCHS = ["llama", "gpt2", "t5"]
EXPECTED_MODULES = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "t5": {"q", "k", "v", "o", "wi", "wo"},
}


def _wordlevel_tokenizer_without_pad():
    """A tokenizer with eos but no pad token: the loader must fall back to eos."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "</s>", "<s>", "hello", "world", "the", "capital", "of", "france"]
    vocab += [f"w{i}" for i in range(128 - len(vocab))]
    backend = Tokenizer(tk_models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def _forward(model, input_ids, attention_mask):
    kw = {"decoder_input_ids": input_ids[:, :3]} if is_encoder_decoder(model) else {}
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


def test_is_encoder_decoder_accepts_configs_and_wrappers():
    t5 = tiny_model("t5")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.base_model = inner

    assert is_encoder_decoder(t5.config)
    assert is_encoder_decoder(Wrapper(t5))
    assert not is_encoder_decoder(Wrapper(tiny_model("gpt2")))
    assert not is_encoder_decoder(object())


def test_dtype_auto_is_float32_on_cpu_and_names_resolve():
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype(None) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


# ------------------------------------------------------------- local checkpoints


@pytest.mark.parametrize("arch", ARCHS)
def test_load_saved_tiny_checkpoint(tmp_path, arch):
    model = tiny_model(arch)
    model.config.pad_token_id = None  # the loader must fill it from the tokenizer
    tok = _wordlevel_tokenizer_without_pad()
    ckpt = tmp_path / f"tiny-{arch}"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)

    loaded, ltok, info = load_model_and_tokenizer(ckpt)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert info["name"] == f"tiny-{arch}"
    assert info["is_encoder_decoder"] == (arch == "t5")
    assert info["model_type"] == model.config.model_type
    assert Path(info["source"]) == ckpt.resolve()
    assert ltok.pad_token == "</s>" and ltok.pad_token_id == ltok.eos_token_id
    assert loaded.config.pad_token_id == ltok.pad_token_id
    assert loaded.dtype == torch.float32
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k

    enc = ltok(["hello world", "the capital of france"], padding=True, return_tensors="pt")
    assert _forward(loaded, enc["input_ids"], enc["attention_mask"]).shape[-1] == 128


def test_load_with_dtype_and_device(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", "llama")
    model, tok, info = load_model_and_tokenizer(str(ckpt), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert tok.pad_token_id == tiny_models.TINY_PAD_ID
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_and_tokenizer(ckpt, dtype="int3")


@pytest.mark.parametrize("spec", ["/nonexistent/orchmoe/model-dir", "./missing.gguf", "no-such-org/no-such-model"])
def test_nonexistent_model_error(spec):
    with pytest.raises(FileNotFoundError) as exc:
        load_model_and_tokenizer(spec)
    msg = str(exc.value)
    assert spec in msg
    assert "offline" in msg


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_and_tokenizer(tmp_path)


# ----------------------------------------------------------------- atomic cache


def _dead_pid() -> int:
    pid = 2**22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def _tiny_writer(tmp: Path) -> None:
    save_tiny(tmp, "llama")


def test_atomic_cache_ignores_and_cleans_leftover_tmp(tmp_path):
    final = tmp_path / "models" / "tiny"
    final.parent.mkdir(parents=True)
    # What a conversion killed mid-write leaves behind: a temp dir with a half file.
    leftover = final.parent / f".tmp-tiny-{socket.gethostname()}-{_dead_pid()}-deadbeef"
    leftover.mkdir()
    (leftover / "config.json").write_text("{ truncated")
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)

    out = atomic_materialize(final, _tiny_writer, {"name": "tiny"})
    assert out == final
    assert json.loads((final / gguf_cache.CACHE_MARKER).read_text())["name"] == "tiny"
    assert not leftover.exists(), "stale temp dir of a dead writer should be removed"
    assert [p.name for p in final.parent.iterdir()] == ["tiny"]
    model, _, info = load_model_and_tokenizer(final)
    assert info["name"] == "tiny" and model.config.model_type == "llama"


def test_atomic_cache_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "tiny"

    def crashing_writer(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        atomic_materialize(final, crashing_writer)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_atomic_cache_replaces_unmarked_dir(tmp_path):
    final = tmp_path / "models" / "tiny"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{ half written by an old version")
    atomic_materialize(final, _tiny_writer)
    assert (final / gguf_cache.CACHE_MARKER).is_file()
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"


def test_atomic_cache_reuses_valid_and_rebuilds_stale(tmp_path):
    final = tmp_path / "models" / "tiny"
    atomic_materialize(final, _tiny_writer, {"version": 1})

    def must_not_run(tmp: Path) -> None:
        raise AssertionError("valid cache should be reused")

    atomic_materialize(final, must_not_run, {"version": 2})  # default validity: has a marker

    def is_v2(path: Path) -> bool:
        marker = gguf_cache.read_marker(path)
        return marker is not None and marker.get("version") == 2

    atomic_materialize(final, _tiny_writer, {"version": 2}, is_valid=is_v2)
    assert json.loads((final / gguf_cache.CACHE_MARKER).read_text())["version"] == 2
    assert [p.name for p in final.parent.iterdir()] == ["tiny"]


# ------------------------------------------------------------------- SmolLM2 GGUF


def test_special_tokens_are_set_from_the_gguf_metadata():
    """What transformers 5.17 does to SmolLM2 (end and pad token = the start token), undone from the ids the
    GGUF file names; the config and generation config follow; an id outside the vocabulary is refused."""
    from helpers_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    tok.eos_token = tok.pad_token = "<s>"  # as the wrong conversion has it (the start token, id 2)
    changed = gguf_cache.align_special_tokens(tok, model, {"bos": 2, "eos": 1, "pad": 0})
    assert changed == {"eos": ("<s>", "</s>"), "pad": ("<s>", "<pad>")}
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (1, 0, 2)
    assert (model.config.eos_token_id, model.config.pad_token_id, model.generation_config.eos_token_id) == (1, 0, 1)
    assert gguf_cache.align_special_tokens(tok, model, {"bos": 2, "eos": 1, "pad": 0}) == {}  # already right
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gguf_cache.align_special_tokens(tok, model, {"eos": len(tok) + 5})


def test_the_conversion_cache_is_keyed_by_transformers_version_and_format(tmp_path, monkeypatch):
    """A conversion made by one transformers version (or an older conversion format) is never read by another."""
    import transformers

    gguf = tmp_path / "m-1B.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    here = gguf_cache.converted_dir(gguf, tmp_path)
    assert here.name == f"m-1B-gguf.tf{transformers.__version__}.v{gguf_cache.CONVERSION_FORMAT}"
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    other_version = gguf_cache.converted_dir(gguf, tmp_path)
    monkeypatch.setattr(gguf_cache, "CONVERSION_FORMAT", 99)
    other_format = gguf_cache.converted_dir(gguf, tmp_path)
    assert len({here, other_version, other_format}) == 3
    assert other_format.name == "m-1B-gguf.tf5.17.0.v99"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """Session-wide cache dir, removed afterwards (the fp32 copy is ~540 MB)."""
    path = tmp_path_factory.mktemp("orchmoe-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_smollm2_gguf_end_to_end(smollm2_cache):
    """Real default model: first load converts the GGUF (~20-40 s), then cache hits.

    Not skipped when the package is missing: smollm2_gguf_path() raises with the
    install hint, which is the failure we want CI to show.
    """
    gguf = gguf_cache.smollm2_gguf_path()
    assert gguf.is_file() and gguf.suffix == ".gguf"

    cached_dir = gguf_cache.converted_dir(gguf, smollm2_cache)  # keyed by the transformers version
    models_dir = cached_dir.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    leftover = models_dir / f".tmp-{cached_dir.name}-{socket.gethostname()}-{_dead_pid()}-0000"
    leftover.mkdir()
    (leftover / "config.json").write_text("{ truncated")

    t0 = time.perf_counter()
    model, tok, info = load_model_and_tokenizer(cache_dir=smollm2_cache)
    first = time.perf_counter() - t0
    assert info["source"] == str(cached_dir)
    assert not leftover.exists()
    assert (cached_dir / "model.safetensors").is_file() and (cached_dir / gguf_cache.CACHE_MARKER).is_file()
    assert "quantization_config" not in json.loads((cached_dir / "config.json").read_text())

    t0 = time.perf_counter()
    model, tok, info = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=smollm2_cache)
    cached = time.perf_counter() - t0
    print(f"\nSmolLM2: first load {first:.1f} s, cached load {cached:.2f} s")
    assert cached < 10, cached  # ~0.3-0.7 s warm; generous for loaded CI boxes

    assert info == {**info, "name": DEFAULT_MODEL, "is_encoder_decoder": False, "model_type": "llama"}
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    # the GGUF metadata's special tokens, whatever this transformers version's GGUF integration made of them
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.eos_token_id, model.config.eos_token_id, model.generation_config.eos_token_id) == (2, 2, 2)
    assert tok.chat_template

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print("SmolLM2 says:", repr(text))
    assert "Paris" in text
