"""Results of ``speed.py``: the header and metadata, the per-method rows, the markdown table, the targets, the JSON."""

from __future__ import annotations

import datetime
import json
import os
import statistics
from pathlib import Path

import torch

import orchmoe


def hardware(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    name = "cpu"
    try:
        name = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def describe_run(args, raw: list[str], model_name: str, peft_version: str | None, budget: int) -> dict:
    """Print the header and return the run's metadata (what was measured, on what), which the JSON keeps."""
    meta = {
        "command": "python benchmarks/speed.py " + " ".join(raw),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": hardware(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "timer": args.timer,
        "autocast": args.autocast,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": peft_version,
        "orchmoe": orchmoe.__version__,
        "model": model_name,
        "targets": args.targets,
        "train": f"{args.batch} x {args.seq} tokens, {args.steps} steps (+{args.warmup} warm-up)",
        "generate": f"{args.gen_batch} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {args.gen_reps} reps",
        "budget": budget,
    }
    print(
        f"# speed  {meta['date']}\n{meta['model']} | {meta['hardware']} | {args.device} {args.dtype} | torch {meta['torch']} | "
        f"timer {args.timer}\ntrain {meta['train']} | generate {meta['generate']} | budget (LoRA r=8) {meta['budget']:,}\n",
        flush=True,
    )
    return meta


def _paired(m, ref) -> dict:
    """Medians over repetitions of (this method / LoRA) within the same repetition: drift cancels."""

    def one(attr: str) -> float | None:
        theirs = getattr(ref, attr) if ref is not None else []
        mine = getattr(m, attr)
        if not theirs or len(theirs) != len(mine):
            return None
        return statistics.median(a / b for a, b in zip(mine, theirs))

    return {attr: one(attr) for attr in ("train_s", "gen_s", "decode_s")}


def result_rows(ms: list, args) -> list[dict]:
    """One row per method (``speed.Method``): medians, tokens/s and ratios to LoRA and to PEFT's LoRA."""
    med = {
        m.name: (statistics.median(m.train_s) if m.train_s else None, statistics.median(m.gen_s) if m.gen_s else None)
        for m in ms
    }
    lora_t, lora_g = med.get("lora", (None, None))
    peft_t, peft_g = med.get("peft-lora", (None, None))
    ntok_train, ntok_gen = args.batch * args.seq, args.gen_batch * args.new_tokens
    lora = {m.name: m for m in ms}.get("lora")  # the last of that name, as a dict by name keeps
    rows = []
    for m in ms:
        t, g = med[m.name]
        paired = _paired(m, lora)
        rows.append(
            {
                "method": m.name,
                "label": m.label,
                "params": m.params,
                "train_s": t,
                "train_tok_s": ntok_train / t if t else None,
                "train_vs_lora": t / lora_t if t and lora_t else None,
                "train_vs_peft_lora": t / peft_t if t and peft_t else None,
                "train_all_s": m.train_s,
                "peak_mb": m.peak_mb,
                "gen_s": g,
                "gen_tok_s": ntok_gen / g if g else None,
                "gen_vs_lora": g / lora_g if g and lora_g else None,
                "gen_vs_peft_lora": g / peft_g if g and peft_g else None,
                "gen_all_s": m.gen_s,
                "same_as_base": m.same_as_base,
                "train_vs_lora_paired": paired["train_s"],
                "gen_vs_lora_paired": paired["gen_s"],
                "decode_ms": statistics.median(m.decode_s) * 1e3 if m.decode_s else None,
                "decode_vs_lora_paired": paired["decode_s"],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| method | trainable params | train step s (median) | train tok/s | train vs LoRA (paired) | train vs PEFT LoRA "
        "| peak mem MiB | generate s (median) | gen new tok/s | gen vs LoRA (paired) | gen vs PEFT LoRA | = base tokens "
        "| decode step ms (median) | decode step vs LoRA (paired) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        out.append(
            f"| {r['label']} | {r['params']:,} | {f(r['train_s'], '.2f')} | {f(r['train_tok_s'], ',.0f')} | "
            f"{f(r['train_vs_lora'], '.3f')}x ({f(r['train_vs_lora_paired'], '.3f')}x) | {f(r['train_vs_peft_lora'], '.3f')}x | "
            f"{f(r['peak_mb'], ',.0f')} | {f(r['gen_s'], '.2f')} | {f(r['gen_tok_s'], ',.1f')} | "
            f"{f(r['gen_vs_lora'], '.3f')}x ({f(r['gen_vs_lora_paired'], '.3f')}x) | "
            f"{f(r['gen_vs_peft_lora'], '.3f')}x | {'-' if r['same_as_base'] is None else ('yes' if r['same_as_base'] else 'NO')} | "
            f"{f(r['decode_ms'], '.1f')} | {f(r['decode_vs_lora_paired'], '.3f')}x |"
        )
    return "\n".join(out).replace("-x", "-").replace("(-)", "")


def target_checks(by: dict, by_name: dict, args) -> list[tuple[str, bool, float]]:
    """(target, passed, value) for each method of --check against LoRA (and PEFT's LoRA with --vs-peft).

    Training: the paired ratio with >= 3 repetitions, else the ratio of medians; generation: the paired
    ratio of single decoding steps when measured (new-tokens x decode-reps pairs), else that of generate().
    """
    checks: list[tuple[str, bool, float]] = []
    if "lora" not in by:
        return checks
    lora, train_limit = by["lora"], args.train_limit or args.limit
    for name in [m for m in args.check.split(",") if m in by and m != "lora"]:
        o, label = by[name], by[name]["label"]
        v = o["train_vs_lora_paired"] if len(by_name["lora"].train_s) >= 3 else o["train_vs_lora"]
        if v is not None:
            checks.append((f"{label}: training step <= {train_limit}x LoRA", v <= train_limit, v))
        if args.vs_peft and o["train_vs_peft_lora"] is not None:
            v = o["train_vs_peft_lora"]  # time ratio: <= 1 is tokens/s >= PEFT's
            checks.append((f"{label}: training tokens/s >= PEFT LoRA (time ratio <= 1)", v <= 1.0, v))
        if args.mem_limit and o["peak_mb"] and lora["peak_mb"]:
            v = o["peak_mb"] / lora["peak_mb"]
            checks.append((f"{label}: peak training memory <= {args.mem_limit}x LoRA", v <= args.mem_limit, v))
        v, what = o["decode_vs_lora_paired"], "decoding step, paired"
        if v is None:
            v, what = (o["gen_vs_lora_paired"] if len(by_name["lora"].gen_s) >= 3 else o["gen_vs_lora"]), "generate()"
        if v is not None:
            checks.append((f"{label}: generation <= {args.limit}x LoRA ({what})", v <= args.limit, v))
    return checks


def print_results(rows: list[dict], ms: list, mem_how: str | None, args) -> list[tuple[str, bool, float]]:
    """Print the table, how memory was measured and the targets; return the targets' checks."""
    print()
    print(markdown(rows))
    if mem_how:
        print(
            f"\npeak memory: one training step (the first, optimizer state included) over the memory before it, {mem_how}"
        )
    checks = target_checks({r["method"]: r for r in rows}, {m.name: m for m in ms}, args)
    if checks:
        print("\n## targets\n")
        for name, ok, v in checks:
            print(f"- {'PASS' if ok else 'FAIL'}: {name} ({v:.3f}x)")
    return checks


def write_json(path: str, meta: dict, rows: list[dict], mem_how: str | None, checks: list) -> None:
    """Write the run (meta, rows, memory method, targets) where --json says."""
    Path(path).write_text(
        json.dumps(
            {
                "meta": meta,
                "results": rows,
                "memory": mem_how,
                "targets": [{"target": n, "pass": ok, "value": v} for n, ok, v in checks],
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
