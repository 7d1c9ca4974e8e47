"""On a CUDA device: every method in bf16 against fp32 on the CPU, the recipe end to end, and resume.

Skipped where ``torch.cuda.is_available()`` is False (CI, the CPU machines); ``scripts/gpu_check.sh quick``
runs it on a GPU machine. Its dry run (``GPU_CHECK_DRY=1``) runs the tests that need no CUDA API on the CPU
instead (the bf16 comparisons with the CPU's bf16 kernels, training steps, the recipe), so their plumbing is
proven before a GPU is spent on them; the host-sync test needs CUDA and stays skipped there.
Self-contained on purpose (tiny models and tokenizer built here, the recipe run through ``orchmoe train``
on the builtin tasks, its options in scripts/gpu_check.yaml), so it does not depend on the CPU suite's helpers.

Tolerances: bf16 keeps 8 significant bits (a relative rounding of up to 2^-8), so a two-layer model's loss,
logits and adapter gradients land within a few percent of fp32. The bounds below are about 3x the
largest errors that the same comparisons gave with the CPU's own bf16 kernels (``amp_errors`` and
``greedy_shortfall`` with ``device="cpu"``, both precisions, every method; torch 2.13): loss 0.05 %,
logits 1.3 %, expert gradients 3.9 %, router gradients 4.1 % (each group's error taken together: one
small tensor alone, MoLoRA's layer-1 q_proj gate, rounds to 29 %), smallest gradient cosine 0.990,
greedy shortfall 0.042 (MoDE). In fp32 the teacher-forced greedy check is exact (shortfall 0 for every method).
Each comparison is one forward and backward, so the run-to-run scatter of CUDA's non-deterministic kernels
(fp32 accumulation order, ~1e-6 relative) is far below these bounds. The resume test runs both of its
trainings with deterministic kernels (``DETERMINISTIC``) and so can ask for agreement to 1e-3.

Every test has a time limit (``ORCHMOE_TEST_TIMEOUT`` seconds, default 120): a hung kernel fails its test
instead of eating the GPU check's budget.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import orchmoe
from orchmoe import get_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_train  # noqa: E402  (scripts/: the one place the GPU check's `orchmoe train` runs are built)

CUDA = torch.cuda.is_available()
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
DEVICE = "cuda" if CUDA else ("cpu" if DRY else None)  # where the device-agnostic tests run
needs_cuda = pytest.mark.skipif(
    not CUDA,
    reason="needs a CUDA device (torch.cuda.is_available() is False): "
    "run it on a GPU machine, e.g. through scripts/gpu_check.sh quick",
)
needs_device = pytest.mark.skipif(
    DEVICE is None,
    reason="needs a CUDA device (torch.cuda.is_available() is False; GPU_CHECK_DRY=1 runs it on the CPU): "
    "run it on a GPU machine, e.g. through scripts/gpu_check.sh quick",
)
TIMEOUT = float(os.environ.get("ORCHMOE_TEST_TIMEOUT", "120"))
DEADLINE = float(os.environ.get("ORCHMOE_TEST_DEADLINE", "inf"))  # wall clock: the GPU check's time for the tests

METHODS = tuple(orchmoe.METHODS)  # every registered method
PRECISIONS = ("autocast", "bf16")  # fp32 weights under bf16 autocast (the recipe's --mixed-precision bf16); all bf16
N_TASKS, VOCAB = 3, 96
# relative (Frobenius) errors; see the module docstring. Router gradients: MoLoRA/MoDE gates, the Task Router, the
# allocation logits; expert gradients: lora_A, lora_B.
TOL = {"loss": 0.005, "logits": 0.05, "expert_grad": 0.12, "router_grad": 0.12}
MIN_GRAD_COS = 0.95
GREEDY_TOL = 0.15  # a bf16 greedy token may lose to another whose fp32 logit is higher by at most this
RESUME_TOL = 1e-3  # resumed vs unbroken run, relative, both with deterministic kernels


class TimeLimitExceeded(Exception):
    """A test ran past ORCHMOE_TEST_TIMEOUT."""


def time_left() -> float:
    return DEADLINE - time.time()


@pytest.fixture(autouse=True)
def time_limit():
    """Fail a test that runs past ``TIMEOUT`` s (an alarm raises in it); if it is stuck in a kernel that never
    returns to Python, faulthandler prints every thread's stack 30 s later and ends the process. Past the
    GPU check's ``ORCHMOE_TEST_DEADLINE`` the remaining tests are skipped, so pytest ends and reports."""
    limit = min(TIMEOUT, time_left())
    if limit < 5:
        pytest.skip("not run: the GPU check's time for the tests ran out (ORCHMOE_TEST_DEADLINE)")

    def expire(signum, frame):
        raise TimeLimitExceeded(f"the test ran past {limit:.0f} s (ORCHMOE_TEST_TIMEOUT / ORCHMOE_TEST_DEADLINE)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + 30, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


# -- tiny models -------------------------------------------------------------------------------------------


def tiny_base(seed: int = 0):
    """A 2-layer Llama (GQA, width 64) with weights large enough that adapters and routing move the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    return model.eval()


def method_config(method: str):
    """The registry's small config of the method (`AdapterConfig.small`) for `N_TASKS` tasks."""
    return orchmoe.METHODS[method].small(N_TASKS)


def routed_model(method: str, seed: int = 1):
    """fp32 CPU model with non-zero B and spread routing logits, so every part of the adapter shows."""
    model = get_model(tiny_base(), method_config(method))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            p.copy_((torch.randn(p.shape, generator=g) * (0.3 if "lora" in name else 1.0)).to(p))
    return model.eval()


def inputs(method: str, device) -> dict:
    """3 rows of 10 tokens, the last row left-padded by 3; the first half of each row is prompt (label -100)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    ids[2, :3] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if orchmoe.METHODS[method].routing == "task_ids":
        batch["task_ids"] = torch.arange(3) % N_TASKS
    return {k: v.to(device) for k, v in batch.items()}


def to_precision(model, precision: str, device):
    """A copy of ``model`` on ``device``: fp32 (run under autocast) or cast to bf16 as a whole."""
    other = copy.deepcopy(model).to(device)
    return other.to(torch.bfloat16) if precision == "bf16" else other


def autocast(precision: str, device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "autocast")


def forward_backward(model, method: str, precision: str, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss, logits, adapter gradients), all fp32 on the CPU."""
    model.zero_grad(set_to_none=True)
    with autocast(precision, device):
        out = model(**inputs(method, device))
    out.loss.backward()
    grads = {k: p.grad.float().cpu() for k, p in model.adapter_state_dict().items() if p.grad is not None}
    return out.loss.detach().float().cpu(), out.logits.detach().float().cpu(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def amp_errors(method: str, precision: str, device) -> dict:
    """Largest relative errors of ``precision`` on ``device`` against fp32 on the CPU (same weights, eval mode)."""
    ref = routed_model(method)
    other = to_precision(ref, precision, device)  # before any forward: the routing state then holds graph tensors
    loss0, logits0, grads0 = forward_backward(ref, method, "fp32", "cpu")
    loss1, logits1, grads1 = forward_backward(other, method, precision, device)
    mask = inputs(method, "cpu")["attention_mask"].bool()
    assert set(grads1) == set(grads0), (
        f"gradients on CPU only: {set(grads0) - set(grads1)}; on {device} only: {set(grads1) - set(grads0)}"
    )
    experts = [k for k in grads0 if k.endswith(("lora_A", "lora_B"))]
    routers = [k for k in grads0 if k not in experts]
    cos = [
        float(torch.nn.functional.cosine_similarity(grads1[k].flatten(), grads0[k].flatten(), dim=0)) for k in grads0
    ]
    return {
        "loss": rel(loss1, loss0),
        "logits": rel(logits1[mask], logits0[mask]),
        "n_grads": len(grads0),
        "expert_grad": rel_all(grads1, grads0, experts),
        "router_grad": rel_all(grads1, grads0, routers),
        "min_grad_cos": min(cos),
    }


def rel_all(a: dict, b: dict, keys: list[str]) -> float:
    """Relative error of a group of gradients taken together: one small tensor's rounding does not dominate."""
    if not keys:
        return 0.0
    return float(
        torch.cat([a[k].flatten() for k in keys]).sub(torch.cat([b[k].flatten() for k in keys])).norm()
        / torch.cat([b[k].flatten() for k in keys]).norm().clamp_min(1e-12)
    )


# -- every method in bf16 on CUDA against fp32 on the CPU --------------------------------------------------


@needs_device
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_match_fp32_cpu(method, precision):
    err = amp_errors(method, precision, DEVICE)
    assert err["n_grads"] > 0
    for key, bound in TOL.items():
        assert err[key] <= bound, f"{method} {precision}: relative {key} error {err[key]:.4f} > {bound} ({err})"
    assert err["min_grad_cos"] >= MIN_GRAD_COS, f"{method} {precision}: a gradient points elsewhere ({err})"


@needs_device
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_generate_is_greedy_under_fp32_logits(method, precision):
    """Every token that generate() picks on CUDA is (within bf16 rounding) the fp32 CPU model's argmax.

    Checked by one teacher-forced fp32 forward over the CUDA sequence, routed as generate() routes: by task
    id (Poly/MHR), by the prompt alone (OrchMoE: routing_mask = the prompt), per token (MoLoRA/MoDE).
    """
    shortfall = greedy_shortfall(method, precision, DEVICE)
    assert shortfall <= GREEDY_TOL, f"{method} {precision}: a generated token trails the fp32 argmax by {shortfall:.3f}"


def greedy_shortfall(method: str, precision: str, device) -> float:
    """Largest gap between the fp32 CPU model's best logit and the logit of the token generate() picked."""
    ref = routed_model(method)
    other = to_precision(ref, precision, device)
    prompt = {
        k: v[:2] for k, v in inputs(method, device).items() if k != "labels"
    }  # the unpadded rows: positions agree
    with torch.no_grad(), autocast(precision, device):
        seq = other.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False).cpu()
    n = prompt["input_ids"].shape[1]
    assert seq.shape == (2, n + 6)
    extra = {"task_ids": prompt["task_ids"].cpu()} if "task_ids" in prompt else {}
    routing_mask = torch.zeros_like(seq)
    routing_mask[:, :n] = 1
    with torch.no_grad():
        logits = ref(input_ids=seq, attention_mask=torch.ones_like(seq), routing_mask=routing_mask, **extra).logits
    step = logits[:, n - 1 : -1]  # (2, 6, V): the logits that chose each new token
    chosen = step.gather(-1, seq[:, n:, None]).squeeze(-1)  # (2, 6)
    return float((step.max(-1).values - chosen).max())


@needs_device
@pytest.mark.parametrize("method", METHODS)
def test_training_steps_on_cuda(method):
    """Train mode (Gumbel noise, balance losses drawn on the GPU) under bf16 autocast: finite, and it learns."""
    losses = train_losses(method, DEVICE)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def train_losses(method: str, device, steps: int = 8) -> list[float]:
    """Losses of ``steps`` AdamW steps on one batch in train mode under bf16 autocast; every gradient finite."""
    model = routed_model(method).to(device).train()
    opt = torch.optim.AdamW(model.parameter_groups(lr=1e-2))
    batch = inputs(method, device)
    losses = []
    for _ in range(steps):
        with autocast("autocast", device):
            loss = model(**batch).loss
        loss.backward()
        bad = [
            k for k, p in model.adapter_state_dict().items() if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        assert not bad, f"{method}: non-finite gradients in {bad}"
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def count_syncs(fn) -> int:
    """Host syncs (device-to-host reads: .item(), bool(), nonzero, mask indexing) that ``fn`` makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def training_forward(model, batch: dict):
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**batch).loss.backward()

    return run


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_no_host_sync_in_a_training_forward(method):
    """No forward of any method waits for the GPU (issue 9): at most the syncs of the base model's own forward."""
    batch = inputs(method, "cuda")
    base = training_forward(tiny_base().cuda().train(), {k: v for k, v in batch.items() if k != "task_ids"})
    routed = training_forward(routed_model(method).cuda().train(), batch)
    base()  # warm-up: one-off initialisations are not per-step syncs
    routed()
    base_syncs, ours = count_syncs(base), count_syncs(routed)
    assert ours <= base_syncs, (
        f"{method}: {ours} host syncs in a training forward + backward; the base model alone makes {base_syncs}"
    )


# -- the recipe on CUDA --------------------------------------------------------------------------------------


def tiny_tokenizer():
    """A byte-level BPE (every string encodes) with <pad>=0, </s>=1, <s>=2, trained on a few prompt-like strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "Definition: answer the question about the sentence.",
        "Positive Example 1 - Input: 12 + 30 Output: 42",
        "Now complete the following example - Input: the quick brown fox Output: fox",
    ]
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def save_tiny_llama(path: Path) -> Path:
    """A checkpoint folder (tiny Llama + tokenizer) that ``--model DIR`` loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# The two trainings of the recipe tests run with deterministic kernels (cuBLAS's fixed workspace, the math
# attention instead of the flash / memory-efficient kernels, whose backward accumulates in a varying order),
# so the resumed run can be asked to end where the unbroken one ends.
DETERMINISTIC = """
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
if torch.cuda.is_available():
    for kernel in ("flash", "mem_efficient", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{kernel}_sdp", lambda on: None)(False)
"""
RECIPE = gpu_train.cuda_test_options(gpu_train.load_config(), dry=DRY and not CUDA)


def train_cli(model: Path, out: Path) -> subprocess.CompletedProcess:
    """``orchmoe train`` (scripts/gpu_check.yaml's ``cuda_tests`` run) in a fresh process, deterministic kernels."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    options = {"model": str(model), **RECIPE, "seed": 0, "out": str(out)}
    cmd = gpu_train.train_command(sys.executable, options, prelude=DETERMINISTIC)
    seconds = min(300.0, time_left() - 10)
    if seconds < 20:
        pytest.skip("not run: the GPU check's time for the tests ran out (ORCHMOE_TEST_DEADLINE)")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds, check=False)
    assert res.returncode == 0, f"{' '.join(cmd[3:])}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def first_checkpoint(run: Path) -> Path:
    found = sorted((int(p.name.split("-")[1]), p) for p in run.glob("checkpoint-*"))
    assert found, f"no checkpoint-N in {run}: the run folder layout changed"
    return found[0][1]


@pytest.fixture(scope="module")
def recipe_runs(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The unbroken run, and what a kill after its first checkpoint leaves (that checkpoint, config.yaml, the
    log) resumed to the end: two processes for both recipe tests."""
    if DEVICE is None:
        pytest.skip("needs a CUDA device (GPU_CHECK_DRY=1 runs it on the CPU)")
    root = tmp_path_factory.mktemp("recipe")
    full, killed = root / "full", root / "killed"
    train_cli(tiny_dir, full)
    ckpt = first_checkpoint(full)
    killed.mkdir(parents=True)
    shutil.copytree(ckpt, killed / ckpt.name)
    for name in (".orchmoe-run", "config.yaml", "train_log.jsonl"):
        shutil.copy(full / name, killed / name)
    train_cli(tiny_dir, killed)
    return full, killed


@needs_device
def test_recipe_end_to_end_on_cuda(recipe_runs):
    import yaml

    run = recipe_runs[0]
    resolved = yaml.safe_load((run / "config.yaml").read_text()).get("_resolved", {})
    if CUDA:
        assert resolved.get("mixed_precision", "bf16") in ("bf16", "fp16"), (
            f"--mixed-precision auto did not see the GPU: {resolved}"
        )
    log = log_records(run)
    assert log and all(math.isfinite(r["loss"]) for r in log)
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(run).items() if k.endswith("lora_B"))
    metrics = json.loads((run / "metrics.json").read_text())
    n_seen, n_unseen = RECIPE["tasks"] * RECIPE["eval-per-task"], RECIPE["unseen-tasks"] * RECIPE["unseen-per-task"]
    assert metrics["seen"]["overall"]["n"] == n_seen and metrics["unseen"]["overall"]["n"] == n_unseen
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n_seen + n_unseen and all(isinstance(p["prediction"], str) for p in preds)


@needs_device
def test_resume_matches_unbroken_run_on_cuda(recipe_runs):
    """The resumed run ends where the unbroken run ends (adapter and every logged loss), to ``RESUME_TOL``:
    both ran with deterministic kernels, so what is left is rounding, while a resume that lost the optimizer
    state, the data order or the (CUDA) random state lands percents away."""
    full, killed = recipe_runs
    a, b = adapter_tensors(full), adapter_tensors(killed)
    assert set(a) == set(b)
    worst = max(a, key=lambda k: rel(b[k].float(), a[k].float()) if a[k].float().norm() > 0 else 0.0)
    assert rel(b[worst].float(), a[worst].float()) <= RESUME_TOL, (
        f"{worst}: resumed adapter differs by {rel(b[worst].float(), a[worst].float()):.2e}"
    )
    la, lb = log_records(full), log_records(killed)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=RESUME_TOL, abs=1e-4), (ra, rb)
