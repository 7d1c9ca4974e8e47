"""Serving many tasks in one batch: a routed adapter against PEFT's mixed-adapter batch.

n prompts of n different tasks are decoded as one batch. Our Poly / MHR route each row by its task
id and OrchMoE by its prompt, with the experts mixed per row inside every layer. PEFT serves the same
n adapters (each row's routing written as a standard LoRA by ``RoutedModel.export_peft_lora``) as a
mixed-adapter batch, ``generate(..., adapter_names=[...])``, which splits every adapted layer into one
sub-batch per adapter. Both compute the same function, so their tokens must agree (fp32: exactly;
bf16: nearly, where two logits round apart); the table reports the agreement next to the speed.

Every adapter is randomised (B != 0, spread routing logits) so the n routings really differ. Greedy,
KV cache, exactly ``new-tokens`` new tokens per row (``min_new_tokens``), no padding (all prompts of
``prompt-len`` tokens). Timed: whole ``generate()`` calls, median over ``reps`` (one untimed warm-up).
Also timed: our LoRA with one adapter for the whole batch, the reference for what a batch costs.

Target (issue 9): a batch of 64 prompts of 64 tasks >= 5x faster than PEFT's mixed batch of 64 LoRAs.

    python benchmarks/serving.py --device cpu --shape tiny --n-tasks 4 --new-tokens 8     # smoke test, seconds
    python benchmarks/serving.py --device cuda --dtype bf16 --autocast --shape smollm2-135m --n-tasks 64 --json s.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models
import orchmoe
from orchmoe import LoraConfig, MHRConfig, OrchMoEConfig, PolyConfig, get_model
from speed import hardware, shared_copy, sync, token_rows

ROUTED = ("poly", "mhr", "orchmoe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def routed_config(method: str, n_tasks: int, targets: list[str]):
    """The speed benchmark's sizes (LoRA-r8 budget on q/v); every routing has one slot per task."""
    if method == "lora":
        return LoraConfig(target_modules=targets, rank=8)
    if method == "poly":
        return PolyConfig(target_modules=targets, n_tasks=n_tasks, n_skills=4, rank=2)
    if method == "mhr":
        return MHRConfig(target_modules=targets, n_tasks=n_tasks, n_skills=4, rank=2, n_splits=8)
    if method == "orchmoe":
        return OrchMoEConfig(target_modules=targets, n_skills=4, rank=2, n_abstract_tasks=n_tasks)
    raise ValueError(f"unknown method {method!r}; choose from lora, {', '.join(ROUTED)}")


def randomize(model, seed: int) -> None:
    """Non-zero B and spread routing logits, so every row's routing changes its output differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            std = 0.2 if name.endswith("lora_B") else (None if name.endswith("lora_A") else 2.0)
            if std is not None:  # lora_A keeps its (Kaiming) init
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p))


class Server:
    """One way of serving the batch: a callable generate and its timings."""

    def __init__(self, name: str, label: str, run, logits=None) -> None:
        self.name, self.label, self.run, self.logits = name, label, run, logits
        self.seconds: list[float] = []
        self.tokens: torch.Tensor | None = None


def amp(args):
    dtype = DTYPES[args.dtype] if args.dtype != "fp32" else torch.bfloat16
    return torch.autocast(torch.device(args.device).type, dtype=dtype) if args.autocast else contextlib.nullcontext()


def time_server(server: Server, args) -> None:
    server.run(2)  # warm-up (lazy init, cuBLAS handles, PEFT's first mixed batch)
    for _ in range(args.reps):
        sync(args.device)
        t0 = time.perf_counter()
        out = server.run(args.new_tokens)
        sync(args.device)
        server.seconds.append(time.perf_counter() - t0)
        assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
        server.tokens = out[:, args.prompt_len :].cpu()


def gen_kwargs(args, pad: int, new: int) -> dict:
    return {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": pad}


def ours(method: str, base, prompts: torch.Tensor, args, pad: int) -> tuple[Server, object]:
    """Our routed model over a copy of the base that shares its frozen weights."""
    n = prompts.shape[0]
    model = get_model(shared_copy(base), routed_config(method, n, args.targets)).eval()
    randomize(model, seed=args.seed)
    extra = {"task_ids": torch.arange(n, device=args.device)} if method in ("poly", "mhr") else {}
    mask = torch.ones_like(prompts)

    def run(new: int) -> torch.Tensor:
        with torch.no_grad(), amp(args):
            return model.generate(input_ids=prompts, attention_mask=mask, **extra, **gen_kwargs(args, pad, new))

    def logits() -> torch.Tensor:
        with torch.no_grad(), amp(args):
            return model(input_ids=prompts, attention_mask=mask, **extra).logits[:, -1].float()

    label = {"lora": "ours: LoRA r=8, one adapter for the batch"}.get(
        method, f"ours: {method}, {n} routings in one batch"
    )
    return Server(method, label, run, logits), model


def peft_mixed(model, method: str, base, prompts: torch.Tensor, args, pad: int, folder: Path) -> Server:
    """PEFT with each row's routing exported as its own LoRA, served as one mixed-adapter batch."""
    from peft import PeftModel

    n = prompts.shape[0]
    for i in range(n):  # Poly/MHR: task i; OrchMoE: the routing of prompt i
        routing = {"task_id": i} if method in ("poly", "mhr") else {"input_ids": prompts[i : i + 1]}
        model.export_peft_lora(folder / f"t{i}", **routing)
    pm = PeftModel.from_pretrained(shared_copy(base), str(folder / "t0"), adapter_name="t0")
    for i in range(1, n):
        pm.load_adapter(str(folder / f"t{i}"), adapter_name=f"t{i}")
    pm.eval()
    names = [f"t{i}" for i in range(n)]
    mask = torch.ones_like(prompts)

    def run(new: int) -> torch.Tensor:
        with torch.no_grad(), amp(args):
            return pm.generate(
                input_ids=prompts, attention_mask=mask, adapter_names=names, **gen_kwargs(args, pad, new)
            )

    def logits() -> torch.Tensor:
        with torch.no_grad(), amp(args):
            return pm(input_ids=prompts, attention_mask=mask, adapter_names=names).logits[:, -1].float()

    return Server(f"peft-{method}", f"PEFT mixed batch: {n} LoRAs exported from {method}", run, logits)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How alike two (rows, new tokens) outputs are: whole rows, first tokens, all tokens."""
    same = a == b
    return {
        "rows_equal": float(same.all(1).float().mean()),
        "first_token_equal": float(same[:, 0].float().mean()),
        "tokens_equal": float(same.float().mean()),
    }


def base_logits(base, prompts: torch.Tensor, args) -> torch.Tensor:
    """The base model's next-token logits after each prompt, (n, vocab)."""
    with torch.no_grad(), amp(args):
        return base(input_ids=prompts, attention_mask=torch.ones_like(prompts)).logits[:, -1].float()


def logit_gap(ours_: Server, peft: Server, plain: torch.Tensor) -> dict:
    """Same function two ways: |ours - PEFT| must be far below |ours - base| (what the adapters change).

    Tokens alone cannot show it: a model with random weights repeats its input whatever the adapter.
    """
    mine, theirs = ours_.logits(), peft.logits()
    effect, gap = float((mine - plain).abs().mean()), float((mine - theirs).abs().mean())
    return {"adapter_effect": effect, "gap_to_peft": gap, "gap_over_effect": gap / effect if effect else None}


def measure(args, base, tok) -> list[dict]:
    pad = bench_models.pad_id(tok, base)
    prompts = token_rows(tok, args.n_tasks, args.prompt_len, args.device, seed=3, vocab=base.config.vocab_size)
    rows, plain = [], base_logits(base, prompts, args)
    lora, _ = ours("lora", base, prompts, args, pad)
    time_server(lora, args)
    rows.append(summary(lora, args, None, None))
    for method in args.methods:
        mine, model = ours(method, base, prompts, args, pad)
        time_server(mine, args)
        with tempfile.TemporaryDirectory(prefix="serving-") as tmp:
            t0 = time.perf_counter()
            peft = peft_mixed(model, method, base, prompts, args, pad, Path(tmp))
            setup_s = time.perf_counter() - t0
            time_server(peft, args)
            same = {**agreement(mine.tokens, peft.tokens), **logit_gap(mine, peft, plain)}
        rows.append(summary(mine, args, statistics.median(peft.seconds) / statistics.median(mine.seconds), same))
        rows.append({**summary(peft, args, None, same), "export_and_load_s": round(setup_s, 2)})
        print(
            f"  {method}: ours {rows[-2]['s']:.3f} s, PEFT {rows[-1]['s']:.3f} s, x{rows[-2]['speedup_vs_peft']:.2f}, "
            f"rows equal {same['rows_equal']:.3f}, logits |ours - PEFT| / |ours - base| {same['gap_over_effect']:.2e}",
            flush=True,
        )
        del model, peft, mine
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def summary(server: Server, args, speedup: float | None, same: dict | None) -> dict:
    s = statistics.median(server.seconds)
    return {
        "server": server.name,
        "label": server.label,
        "s": s,
        "all_s": server.seconds,
        "new_tok_s": args.n_tasks * args.new_tokens / s,
        "speedup_vs_peft": speedup,
        "agreement": same,
    }


def markdown(rows: list[dict]) -> str:
    out = [
        (
            "| server | batch s (median) | new tok/s | speed-up vs PEFT mixed | rows = PEFT's (first token) "
            "| logits: mean abs ours-PEFT / ours-base |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        up = "-" if r["speedup_vs_peft"] is None else f"{r['speedup_vs_peft']:.2f}x"
        a = r["agreement"]
        same = "-" if a is None else f"{a['rows_equal']:.3f} ({a['first_token_equal']:.3f})"
        gap = (
            "-"
            if a is None or a.get("gap_over_effect") is None
            else (f"{a['gap_to_peft']:.2e} / {a['adapter_effect']:.2e}")
        )
        out.append(f"| {r['label']} | {r['s']:.3f} | {r['new_tok_s']:,.0f} | {up} | {same} | {gap} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="checkpoint for orchmoe.loading (default SmolLM2-135M-Instruct)")
    ap.add_argument(
        "--shape", default=None, choices=sorted(bench_models.SHAPES), help="random weights of this shape instead"
    )
    ap.add_argument("--methods", default="poly,orchmoe", help=f"comma-separated subset of {','.join(ROUTED)}")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--n-tasks", type=int, default=64, help="prompts in the batch, each of its own task")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="timed generate() calls per server")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast around generate (as --mixed-precision bf16)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=5.0, help="target: PEFT mixed-batch time / ours")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.targets = [t for t in args.targets.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    if bad := sorted(set(args.methods) - set(ROUTED)):
        ap.error(f"unknown methods {bad}; choose from {list(ROUTED)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    t0 = time.perf_counter()
    base, tok, name = bench_models.load_base(args.model, args.shape, DTYPES[args.dtype], args.device)
    meta = {
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": hardware(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "autocast": args.autocast,
        "model": name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": peft.__version__,
        "orchmoe": orchmoe.__version__,
        "batch": f"{args.n_tasks} prompts x {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy, {args.reps} reps",
    }
    print(
        f"# serving  {meta['date']}\n{name} | {meta['hardware']} | {args.device} {args.dtype} | {meta['batch']}\n",
        flush=True,
    )
    rows = measure(args, base, tok)
    checks = [
        (
            f"{r['server']}: {args.n_tasks} prompts of {args.n_tasks} tasks >= {args.target}x faster than PEFT's mixed batch",
            r["speedup_vs_peft"] >= args.target,
            r["speedup_vs_peft"],
        )
        for r in rows
        if r["speedup_vs_peft"] is not None
    ]
    print("\n" + markdown(rows) + "\n\n## targets\n")
    for target, ok, v in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {target} ({v:.2f}x)")
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {meta['total_s']} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "meta": meta,
                    "results": rows,
                    "targets": [{"target": t, "pass": ok, "value": v} for t, ok, v in checks],
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
