"""Whole-model speed: training step and greedy generation for every method at equal budget.

The base model (default SmolLM2-135M-Instruct through ``orchmoe.loading``) is loaded
once; each method gets a copy of it that *shares* the frozen weights (only the
adapters are new), so all methods live in one process and their repetitions are
interleaved (the order rotates every repetition; the median is reported).

* training step: forward + backward + AdamW step on ``batch x seq`` tokens (the
  first half of each row is prompt, label -100; the second half is answer), in
  train mode (Gumbel sampling, balance losses), ``use_cache=False``;
* peak memory of a training step: on CPU in a fresh subprocess per method
  (peak RSS of the step over the RSS just before it, from /proc/self/status after
  resetting the high-water mark; ``ru_maxrss`` where that is not possible); on
  CUDA ``torch.cuda.max_memory_allocated`` over the allocation before the step;
* generation (run first, while every adapter is as initialised): greedy, KV cache,
  ``gen-batch`` prompts of ``prompt-len`` tokens, exactly ``new-tokens`` new tokens
  each (``min_new_tokens``); tokens/s counts new tokens. Every adapter starts with
  B = 0, so every method must produce the base model's tokens: the table says whether
  it did;
* decoding steps, paired: single KV-cache steps (one token per row) with the methods
  taking turns step by step, so neighbouring measurements see the same machine load;
  the median of per-step ratios to LoRA is the generation target's estimator (whole
  ``generate()`` calls on a shared CPU scatter by +-15 %).

"(paired)" ratios are medians of per-repetition ratios to LoRA (the methods run next
to each other in every repetition). ``--timer cpu --threads 1`` measures process CPU
time, which other processes' load barely moves.

Methods: our LoRA r=8 (the budget), MoLoRA / Poly / MHR / OrchMoE 4 skills x r=2,
MoDE m=4 with a shared down-projection (rank matched to the budget), PEFT's LoRA
r=8 and PEFT's Poly 4 x r=2 on the same target modules (q_proj, v_proj).

    python benchmarks/speed.py                                  # defaults: < 10 min on 2 CPU cores
    python benchmarks/speed.py --threads 1 --timer cpu --steps 5 --gen-reps 3 --decode-reps 2   # a shared CPU
    python benchmarks/speed.py --device cuda --dtype bf16 --batch 16 --seq 512 --steps 10
    python benchmarks/speed.py --device cuda --dtype bf16 --autocast --shape 1.3b --check molora,poly,mhr,mode,orchmoe \
        --train-limit 1.15 --mem-limit 1.10 --vs-peft --json speed.json   # random weights of a shape (bench_models.SHAPES)

``--check`` names the methods the targets apply to (default orchmoe): training step <= ``--train-limit``
x LoRA's, decoding step <= ``--limit`` x LoRA's, peak memory <= ``--mem-limit`` x LoRA's, and with
``--vs-peft`` training tokens/s >= PEFT LoRA's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models
from orchmoe import (
    LoraConfig,
    MHRConfig,
    MoDEConfig,
    MoLoRAConfig,
    OrchMoEConfig,
    PolyConfig,
    get_model,
    lora_budget,
    match_budget,
)
from speed_memory import measure_peak, probe_peaks  # noqa: E402
from speed_report import (  # noqa: E402
    describe_run,
    hardware,  # noqa: F401  (serving.py imports it from here)
    print_results,
    result_rows,
    write_json,
)

ALL_METHODS = ["lora", "molora", "poly", "mhr", "mode", "orchmoe", "peft-lora", "peft-poly"]
N_TASKS = 8
TEXT = (
    "Definition: In this task you are given a sentence and a question about it. Answer the question with a "
    "short phrase taken from the sentence. Positive Example 1 - Input: The capital of France is Paris, a city on "
    "the Seine. Question: What is the capital of France? Output: Paris. Now complete the following example - "
    "Input: Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of "
    "plant cells. Question: Where does photosynthesis happen? Output: in the chloroplasts. "
)


# ----------------------------------------------------------------------------- model and methods


def load_base(args):
    """(model, tokenizer or None, name): the checkpoint through orchmoe.loading, or --shape's random weights."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return bench_models.load_base(args.model, args.shape, dtype, args.device)


def shared_copy(model):
    """A deep copy that shares the frozen parameters (an adapter is injected in place)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def configs(base, targets) -> dict:
    budget = lora_budget(base, 8, targets)
    mode = match_budget(
        MoDEConfig(target_modules=targets, n_skills=4, rank=2, expert_rank=1), base, budget, vary="rank", tolerance=0.25
    )  # m=4, p=1: the closest rank (r=2) is ~15% over a q/v LoRA-8 budget on SmolLM2
    return {
        "lora": LoraConfig(target_modules=targets, rank=8),
        "molora": MoLoRAConfig(target_modules=targets, n_skills=4, rank=2),
        "poly": PolyConfig(target_modules=targets, n_tasks=N_TASKS, n_skills=4, rank=2),
        "mhr": MHRConfig(target_modules=targets, n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=8),
        "mode": mode,
        "orchmoe": OrchMoEConfig(target_modules=targets, n_skills=4, rank=2, n_abstract_tasks=16),
    }


def label_of(method: str, cfgs: dict) -> str:
    c = cfgs.get(method)
    if isinstance(c, LoraConfig):
        return f"lora r={c.rank}"
    if isinstance(c, MoDEConfig):
        return f"mode {c.n_skills}x{c.rank}x{c.expert_rank}"
    if isinstance(c, MHRConfig):
        return f"mhr {c.n_skills}x{c.rank} h={c.n_splits}"
    if isinstance(c, (MoLoRAConfig, PolyConfig, OrchMoEConfig)):
        return f"{c.method} {c.n_skills}x{c.rank}"
    return {"peft-lora": "peft lora r=8", "peft-poly": "peft poly 4x2", "base": "base (no adapter)"}[method]


class Method:
    def __init__(self, name: str, label: str, model, trainable: list, needs_tasks: bool) -> None:
        self.name, self.label, self.model, self.needs_tasks = name, label, model, needs_tasks
        self.params = sum(p.numel() for p in trainable)
        self.opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        self.train_s: list[float] = []
        self.gen_s: list[float] = []
        self.decode_s: list[float] = []
        self.same_as_base: bool | None = None
        self.peak_mb: float | None = None


def build(method: str, base, cfgs: dict, targets) -> Method:
    if method == "base":
        return Method("base", label_of("base", cfgs), base, [], False)
    m = shared_copy(base)
    if method.startswith("peft-"):
        import peft

        if method == "peft-lora":
            cfg = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
        else:
            cfg = peft.PolyConfig(
                r=2, n_skills=4, n_splits=1, n_tasks=N_TASKS, target_modules=targets, task_type="CAUSAL_LM"
            )
        pm = peft.get_peft_model(m, cfg)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        return Method(method, label_of(method, cfgs), pm, trainable, method == "peft-poly")
    rm = get_model(m, cfgs[method])
    groups = rm.parameter_groups(lr=1e-4, router_lr=1e-2)
    meth = Method(
        method, label_of(method, cfgs), rm, [p for g in groups for p in g["params"]], cfgs[method].needs_task_ids
    )
    meth.opt = torch.optim.AdamW(groups)
    return meth


# ----------------------------------------------------------------------------- inputs and steps


def token_rows(tok, n_rows: int, length: int, device, seed: int = 0, vocab: int = 0) -> torch.Tensor:
    if tok is None:  # random weights: random ids
        return bench_models.random_rows(vocab, n_rows, length, device, seed)
    ids = tok(TEXT * (1 + (n_rows + length) * 2 // 60), add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (n_rows,), generator=g).tolist()
    return torch.tensor([ids[s : s + length] for s in starts], dtype=torch.long, device=device)


def task_kw(meth: Method, batch: int, device) -> dict:
    return {"task_ids": torch.arange(batch, device=device) % N_TASKS} if meth.needs_tasks else {}


AUTOCAST: dict = {
    "dtype": None
}  # --autocast: bf16 autocast around every forward (what `--mixed-precision bf16` trains with)


def amp(device):
    """torch.autocast to AUTOCAST["dtype"] on ``device``, or a no-op."""
    dtype = AUTOCAST["dtype"]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock(timer: str) -> float:
    return time.process_time() if timer == "cpu" else time.perf_counter()


def train_step(meth: Method, batch: dict, device) -> float:
    meth.model.train()
    with amp(device):
        out = meth.model(**batch, **task_kw(meth, batch["input_ids"].shape[0], device), use_cache=False)
    out.loss.backward()
    meth.opt.step()
    meth.opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def generate(meth: Method, prompts: torch.Tensor, new_tokens: int, pad_id: int, device) -> torch.Tensor:
    meth.model.eval()
    with torch.no_grad(), amp(device):
        return meth.model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **task_kw(meth, prompts.shape[0], device),
        )


def decode_paired(ms: list[Method], prompts: torch.Tensor, steps: int, reps: int, timer: str, device) -> None:
    """Time single decoding steps (KV cache, one new token per row), the methods taking turns step by step.

    What generate() repeats per token, measured so that every method's step runs right next to the others'
    (the order rotates every step): on a shared machine the load changes from second to second, and
    adjacent steps see the same load, so the per-step ratios are far steadier than whole generate() calls.
    """
    b, n = prompts.shape
    for m in ms:
        m.decode_s = []
        m.model.eval()
    with torch.no_grad(), amp(device):
        for _ in range(reps):
            live = {}
            for m in ms:  # prefill (sets the routing from the prompt, as generate() does)
                out = m.model(
                    input_ids=prompts, attention_mask=torch.ones_like(prompts), use_cache=True, **task_kw(m, b, device)
                )
                live[m.name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            for t in range(steps):
                mask = torch.ones(b, n + t + 1, dtype=torch.long, device=device)
                k = t % len(ms)
                for m in ms[k:] + ms[:k]:
                    cache, nxt = live[m.name]
                    sync(device)
                    t0 = clock(timer)
                    out = m.model(
                        input_ids=nxt,
                        attention_mask=mask,
                        past_key_values=cache,
                        use_cache=True,
                        **task_kw(m, b, device),
                    )
                    sync(device)
                    m.decode_s.append(clock(timer) - t0)
                    live[m.name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))


def train_batch(tok, args) -> dict:
    ids = token_rows(tok, args.batch, args.seq, args.device, seed=1, vocab=args.vocab)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # prompt half: no loss (and OrchMoE's routing reads it)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ----------------------------------------------------------------------------- memory (the rest in speed_memory.py)


def probe_main(args) -> int:
    """Subprocess entry (``--probe METHOD``): one method, one (first) training step, print its peak memory as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok, _ = load_base(args)
    args.vocab, args.pad_id = base.config.vocab_size, bench_models.pad_id(tok, base)
    cfgs = configs(base, args.targets)
    meth = build(args.probe, base, cfgs, args.targets)
    batch = train_batch(tok, args)
    with torch.no_grad():  # fault in every weight page (safetensors loads lazily through mmap): not step memory
        for p in meth.model.parameters():
            p.sum()
    peak, how = measure_peak(functools.partial(train_step, meth, batch, args.device), args.device)
    print("PROBE " + json.dumps({"method": args.probe, "peak_mb": peak, "how": how}))
    return 0


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The options: model, methods, workload sizes and timer (skips, targets and output in _add_target_options)."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default=None,
        help="model for orchmoe.loading.load_model_and_tokenizer (default SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--shape",
        default=None,
        choices=sorted(bench_models.SHAPES),
        help="instead of --model: a Llama of this shape with random weights (speed does not depend on them)",
    )
    ap.add_argument(
        "--autocast", action="store_true", help="bf16 autocast around every forward (CUDA; as --mixed-precision bf16)"
    )
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {ALL_METHODS}")
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target modules")
    ap.add_argument("--batch", type=int, default=4, help="training batch (rows)")
    ap.add_argument("--seq", type=int, default=128, help="training sequence length")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per method (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps (1 x 32 tokens) per method first")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gen-reps", type=int, default=2, help="timed generate() calls per method (interleaved)")
    ap.add_argument(
        "--decode-reps",
        type=int,
        default=1,
        help="rounds of new-tokens single decoding steps, the methods taking turns step by step (0: skip)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--timer",
        default="wall",
        choices=["wall", "cpu"],
        help="wall clock, or process CPU time (robust on a shared CPU; use with --threads 1)",
    )
    _add_target_options(ap)
    return ap


def _add_target_options(ap: argparse.ArgumentParser) -> None:
    """The options after --timer (kept in this order: --help lists them as before)."""
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument(
        "--limit", type=float, default=1.10, help="target: decoding (and, unless --train-limit, training) time / LoRA's"
    )
    ap.add_argument(
        "--train-limit", type=float, default=None, help="target: training step time / LoRA's (default --limit)"
    )
    ap.add_argument(
        "--mem-limit", type=float, default=None, help="target: peak training memory / LoRA's (default: not checked)"
    )
    ap.add_argument("--vs-peft", action="store_true", help="target: training tokens/s >= PEFT LoRA's")
    ap.add_argument("--check", default="orchmoe", help="comma-separated methods the targets apply to")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The options, normalised and checked, and the raw argv (the memory probes rerun it)."""
    ap = build_parser()
    raw = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(raw)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.targets = [t for t in args.targets.split(",") if t]
    if args.timer == "cpu" and torch.device(args.device).type == "cuda":
        ap.error("--timer cpu measures host CPU time: use wall on a GPU")
    if args.autocast:
        AUTOCAST["dtype"] = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    if not args.probe:  # a probe reruns its parent's command line, checked there
        bad = sorted({m for m in args.methods.split(",") if m} - set(ALL_METHODS))
        if bad:
            ap.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    return args, raw


def available_methods(args) -> tuple[list[str], str | None]:
    """--methods and PEFT's version; PEFT's methods are dropped when peft is not installed."""
    methods = [m for m in args.methods.split(",") if m]
    try:
        import peft

        return methods, peft.__version__
    except ImportError:
        return [m for m in methods if not m.startswith("peft-")], None


# ----------------------------------------------------------------------------- the run


def build_methods(methods: list[str], base, cfgs: dict, args, peaks: dict) -> list[Method]:
    """Every method on the shared base (the bare base first when generating: the reference tokens), with its peak."""
    ms = [build(name, base, cfgs, args.targets) for name in methods]
    if not args.no_generate:
        ms = [build("base", base, cfgs, args.targets)] + ms
    for m in ms:
        m.peak_mb = peaks.get(m.name)
    return ms


def measure_generation(ms: list[Method], tok, args, t_start: float) -> torch.Tensor | None:
    """Time generate() while every adapter is as initialised (B = 0, so each must give the base tokens); the prompts."""
    if args.no_generate:
        return None
    base_tokens = None
    prompts = token_rows(tok, args.gen_batch, args.prompt_len, args.device, seed=2, vocab=args.vocab)
    for m in ms:
        generate(m, prompts, 2, args.pad_id, args.device)  # warm-up
    for rep in range(args.gen_reps):
        k = rep % len(ms)
        for m in ms[k:] + ms[:k]:
            sync(args.device)
            t0 = clock(args.timer)
            out = generate(m, prompts, args.new_tokens, args.pad_id, args.device)
            sync(args.device)
            m.gen_s.append(clock(args.timer) - t0)
            assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
            if m.name == "base":
                base_tokens = out
            m.__dict__.setdefault("_out", out)
        print(f"  generate rep {rep + 1}/{args.gen_reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    for m in ms:
        m.same_as_base = bool(torch.equal(m.__dict__.pop("_out"), base_tokens)) if m.name != "base" else None
    return prompts


def measure_decoding(ms: list[Method], prompts: torch.Tensor | None, args, t_start: float) -> None:
    """Time paired single decoding steps (the generation target's estimator), unless skipped."""
    if prompts is not None and args.decode_reps > 0:
        decode_paired(ms, prompts, args.new_tokens, args.decode_reps, args.timer, args.device)
        print(f"  paired decoding steps done ({time.perf_counter() - t_start:.0f} s)", flush=True)


def measure_training(ms: list[Method], batch: dict, args, t_start: float, mem_how: str | None) -> str | None:
    """Warm up, then time interleaved training steps (on CUDA also each step's peak memory); returns mem_how."""
    trainable = [m for m in ms if m.opt is not None] if not args.no_train else []
    mid = args.seq // 2  # warm-up on a small batch (16 prompt + 16 answer tokens): optimizer state, lazy init
    small = {k: v[:1, max(0, mid - 16) : mid + 16] for k, v in batch.items()}
    for m in trainable:
        for _ in range(args.warmup):
            train_step(m, small, args.device)
        if not args.no_memory and torch.device(args.device).type == "cuda":
            m.peak_mb, mem_how = measure_peak(functools.partial(train_step, m, batch, args.device), args.device)
    for rep in range(args.steps if trainable else 0):
        k = rep % len(trainable)
        for m in trainable[k:] + trainable[:k]:
            sync(args.device)
            t0 = clock(args.timer)
            train_step(m, batch, args.device)
            sync(args.device)
            m.train_s.append(clock(args.timer) - t0)
        print(f"  train rep {rep + 1}/{args.steps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return mem_how


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark end to end; the exit code is 1 when a target fails, so scripts can gate on it."""
    args, raw = parse_args(argv)
    if args.probe:
        return probe_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, peft_version = available_methods(args)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    base, tok, model_name = load_base(args)
    args.vocab, args.pad_id = base.config.vocab_size, bench_models.pad_id(tok, base)
    cfgs = configs(base, args.targets)
    meta = describe_run(args, raw, model_name, peft_version, lora_budget(base, 8, args.targets))
    peaks, mem_how = probe_peaks(Path(__file__).resolve(), methods, raw, args)
    ms = build_methods(methods, base, cfgs, args, peaks)
    batch = train_batch(tok, args)
    prompts = measure_generation(ms, tok, args, t_start)
    measure_decoding(ms, prompts, args, t_start)
    mem_how = measure_training(ms, batch, args, t_start, mem_how)
    rows = result_rows(ms, args)
    checks = print_results(rows, ms, mem_how, args)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\ntotal {meta['total_s']} s")
    if args.json:
        write_json(args.json, meta, rows, mem_how, checks)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
