"""One batch of prompts from N different SuperNI tasks: orchmoe's routed generate against PEFT's mixed-adapter
batch of the exported bundle's LoRAs.

orchmoe decodes the batch in one ``generate`` with each row routed inside every layer (Poly/MHR by its task
id, OrchMoE by its prompt). The adapter is then exported as a multi-LoRA bundle (`orchmoe.adapters.bundle.write_bundle`:
Poly/MHR one LoRA per task, OrchMoE one per abstract task the prompts use), the LoRAs are loaded by name into
one `peft.PeftModel`, and the same batch is decoded with ``generate(..., adapter_names=[each row's LoRA])``,
which PEFT runs as one sub-batch per adapter in every adapted layer. Greedy, KV cache, exactly
``--new-tokens`` new tokens per row (``min_new_tokens``), left-padded real prompts built as in training.
Timed: whole ``generate()`` calls, the two sides alternating, median over ``--reps`` after a short warm-up
(both sides, two rows, 16 prompt tokens: a full-batch warm-up costs as much as a repetition on a CPU).
Also reported: how many rows' tokens agree (Poly/MHR and hard OrchMoE compute the same function: all, up to
floating-point ties; soft OrchMoE's bundle serves argmax pi's LoRA alone).

With ``--run RUN`` (repeatable) the trained adapters of those runs and one held-out prompt per seen task;
without, fresh adapters of ``--methods`` with ``--tasks`` tasks and random weights (B != 0, spread routing), on
one prompt each of ``--tasks`` tasks drawn from ``--data``: throughput does not depend on the weights' values.

    python benchmarks/serve_vs_peft.py --run runs/poly-16 --run runs/orchmoe-16          # CPU, trained runs
    python benchmarks/serve_vs_peft.py --device cuda --dtype bf16 --tasks 64 --data ../shared/superni --json s.json
"""

from __future__ import annotations

import argparse
import datetime
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
from orchmoe import MHRConfig, OrchMoEConfig, PolyConfig, get_model, load_adapter
from orchmoe.adapters.bundle import BundleManifest, RoutedPrompt, load_peft_loras, write_bundle
from orchmoe.data import encode_prompt, load_multitask, pad_batch
from serving import randomize
from speed import hardware, shared_copy, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "superni"
PROMPT = {"n_pos": 1, "max_source_len": 160, "chat_template": False}  # the recipe's defaults


def run_batch(run: Path, n: int, data: str | None, tok, metadata: dict) -> list[RoutedPrompt]:
    """One held-out prompt of each of the run's first `n` seen tasks (by task id), built as it trained."""
    from orchmoe.data import PromptFormat
    from orchmoe.recipe.export_run import run_prompts
    from orchmoe.recipe.run_folder import RunFolder

    fmt = PromptFormat.from_adapter_metadata(metadata, where=str(run / "adapter"))
    prompts = run_prompts(RunFolder(run), data, tok, fmt, None)
    first = {}
    for p in prompts:
        if p.split == "eval" and p.task_id not in first:
            first[p.task_id] = p
    if len(first) < n:
        raise SystemExit(f"{run} has held-out prompts of {len(first)} tasks, fewer than --tasks {n}")
    return [first[t] for t in sorted(first)[:n]]


def fresh_batch(data: str, n: int, tok, seed: int) -> list[RoutedPrompt]:
    """One prompt of each of `n` tasks drawn from the train split of `data`."""
    ds = load_multitask(data, n, n_train=0, n_eval=1, n_unseen_tasks=0, seed=seed, task_seed=seed)
    return [
        RoutedPrompt(tuple(encode_prompt(tok, ds.task_defs[ex.task], ex.input, **PROMPT)), ex.task, ex.task_id, "eval")
        for ex in ds.eval
    ]


def fresh_config(method: str, n: int, targets: list[str]):
    """The sizes of the recipe's defaults (4 skills x r2 on q/v), one routing slot per task."""
    if method == "poly":
        return PolyConfig(target_modules=targets, n_tasks=n, n_skills=4, rank=2)
    if method == "mhr":
        return MHRConfig(target_modules=targets, n_tasks=n, n_skills=4, rank=2, n_splits=8)
    if method == "orchmoe":
        return OrchMoEConfig(target_modules=targets, n_skills=4, rank=2, n_abstract_tasks=n)
    raise SystemExit(f"unknown method {method!r}: poly, mhr or orchmoe")


def timed(fn, wall: list[float], cpu: list[float], device) -> torch.Tensor:
    """Run fn, appending its wall-clock seconds and this process's CPU seconds (every thread's)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    return out


def export_and_load(label: str, routed, base, prompts, ids, mask, tmp: Path):
    """Write the bundle of `routed` for these prompts, pick each row's LoRA, load the used LoRAs into PEFT."""
    t0 = time.perf_counter()
    manifest = write_bundle(routed, tmp / "bundle", prompts=prompts, check=0)
    export_s = time.perf_counter() - t0
    bundle = BundleManifest(tmp / "bundle", manifest)
    if routed.adapter_config.routing == "prompt":
        with torch.no_grad():
            ks = routed.task_probabilities(ids, mask).argmax(-1).tolist()
        rows = [bundle.lora_for(abstract_task=k) for k in ks]
    else:
        rows = [bundle.lora_for(task=p.task_id) for p in prompts]
    used = {name: tmp / "bundle" / "loras" / name for name in dict.fromkeys(rows)}
    t1 = time.perf_counter()
    pm = load_peft_loras(shared_copy(base), used)
    print(f"  {label}: bundle written in {export_s:.1f} s, {len(used)} LoRAs loaded into PEFT in "
          f"{time.perf_counter() - t1:.1f} s", flush=True)  # fmt: skip
    return manifest, rows, pm, export_s


def compare(label: str, routed, base, prompts: list[RoutedPrompt], args, pad: int) -> dict:
    """Time orchmoe's routed batch and PEFT's mixed batch of the bundle's LoRAs on the same prompts."""
    batch = pad_batch([{"input_ids": list(p.ids)} for p in prompts], pad, "left", decoder_only=True)
    ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
    extra = {"task_ids": torch.tensor([p.task_id for p in prompts], device=args.device)}
    extra = extra if routed.adapter_config.needs_task_ids else {}
    with tempfile.TemporaryDirectory(prefix="serve-vs-peft-") as tmp:
        manifest, rows, pm, export_s = export_and_load(label, routed, base, prompts, ids, mask, Path(tmp))

    def gen(model, new, rows_=slice(None), cut=0, **kw):
        g = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=pad,
                 temperature=None, top_p=None, top_k=None)  # fmt: skip
        x, m = ids[rows_, cut:], mask[rows_, cut:]
        with torch.no_grad():
            return model.generate(input_ids=x, attention_mask=m, **kw, **g)[:, x.shape[1] :]

    t = {"ours_wall": [], "ours_cpu": [], "peft_wall": [], "peft_cpu": []}
    t1 = time.perf_counter()
    # warm-up: the whole code path (routing, PEFT's sub-batches of two adapters) on two rows' last 16 tokens
    few = {k: v[:2] for k, v in extra.items()}
    gen(routed, 2, slice(0, 2), -16, **few), gen(pm, 2, slice(0, 2), -16, adapter_names=rows[:2])
    print(f"  {label}: warm-up {time.perf_counter() - t1:.1f} s", flush=True)
    for rep in range(args.reps):
        a = timed(lambda: gen(routed, args.new_tokens, **extra), t["ours_wall"], t["ours_cpu"], args.device)
        b = timed(lambda: gen(pm, args.new_tokens, adapter_names=rows), t["peft_wall"], t["peft_cpu"], args.device)
        print(f"  {label}: rep {rep + 1}: ours {t['ours_wall'][-1]:.2f} s (cpu {t['ours_cpu'][-1]:.2f} s), "
              f"PEFT {t['peft_wall'][-1]:.2f} s (cpu {t['peft_cpu'][-1]:.2f} s)", flush=True)  # fmt: skip
    stat = {"median": statistics.median, "min": min}[args.stat]
    ours, theirs = stat(t[f"ours_{args.timer}"]), stat(t[f"peft_{args.timer}"])
    n = len(prompts)
    out = {
        "adapter": label,
        "method": routed.adapter_config.method,
        "tasks_in_batch": len({p.task for p in prompts}),
        "loras_in_peft_batch": len(set(rows)),
        "bundle_exact": manifest["exact"],
        "timer": f"{args.stat} {args.timer} seconds",
        "ours_s": ours,
        "peft_s": theirs,
        "ours_tok_s": n * args.new_tokens / ours,
        "peft_tok_s": n * args.new_tokens / theirs,
        "speedup": theirs / ours,
        "rows_equal": float((a.cpu() == b.cpu()).all(1).float().mean()),
        "export_s": round(export_s, 2),
        "times": t,
    }
    print(f"  {label}: ours {ours:.2f} s, PEFT {theirs:.2f} s ({out['timer']}), x{out['speedup']:.2f}, "
          f"rows equal {out['rows_equal']:.3f}", flush=True)  # fmt: skip
    return out


def markdown(rows: list[dict], n_tokens: int) -> str:
    out = [
        "| adapter | method | tasks in batch | LoRAs in PEFT's batch | orchmoe s | PEFT s | orchmoe tok/s | PEFT tok/s "
        "| speed-up | rows equal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['adapter']} | {r['method']} | {r['tasks_in_batch']} | {r['loras_in_peft_batch']} | {r['ours_s']:.2f} "
            f"| {r['peft_s']:.2f} | {r['ours_tok_s']:.1f} | {r['peft_tok_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['rows_equal']:.3f}{'' if r['bundle_exact'] else ' (soft pi: argmax LoRA)'} |"
        )
    timer = rows[0]["timer"] if rows else ""
    return (
        "\n".join(out) + f"\n\n(s: {timer} of one generate() of the batch; tok/s: its new tokens, {n_tokens} per row)"
    )


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], metavar="RUN", help="a trained run folder (repeatable)")
    ap.add_argument("--methods", default="poly,orchmoe", help="without --run: fresh adapters of these methods")
    ap.add_argument("--tasks", type=int, default=16, help="prompts in the batch, each of its own task")
    ap.add_argument("--data", default=None, help=f"SuperNI data (default: the run's, else {DEFAULT_DATA})")
    ap.add_argument("--model", default=None, help="base checkpoint (default: the run's, else SmolLM2-135M-Instruct)")
    ap.add_argument("--targets", default="q_proj,v_proj", help="without --run: the adapted layers")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--timer",
        default="wall",
        choices=["wall", "cpu"],
        help="wall clock, or this process's CPU time (robust to other jobs on a shared CPU; use 1 thread)",
    )
    ap.add_argument("--stat", default="median", choices=["median", "min"], help="over the repetitions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = args.model
    if model is None and args.run:
        from orchmoe.recipe.run_folder import RunFolder

        model = RunFolder(args.run[0]).read_config()[0].get("model")
    base, tok, name = bench_models.load_base(model, None, dtype, args.device)
    pad = bench_models.pad_id(tok, base)
    meta = {
        "command": "python benchmarks/serve_vs_peft.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": hardware(args.device),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "model": name,
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "orchmoe": orchmoe.__version__},
        "peft_loading": "PeftModel.from_pretrained / load_adapter with their defaults (one adapter name per LoRA)",
        "batch": f"{args.tasks} prompts of {args.tasks} tasks, {args.new_tokens} new tokens, greedy, {args.reps} reps",
    }
    print(  # flush: the header before the first (long) measurement
        f"# serve vs PEFT  {meta['date']}\n{name} | {meta['hardware']} | {args.device} {args.dtype} | {meta['batch']}\n",
        flush=True,
    )
    rows = []
    if args.run:
        for run in map(Path, args.run):
            routed = load_adapter(shared_copy(base), run / "adapter").to(device=args.device, dtype=dtype).eval()
            prompts = run_batch(run, args.tasks, args.data, tok, routed.adapter_metadata)
            print(f"  {run.name}: {len(prompts)} prompts of {min(map(len, (p.ids for p in prompts)))}-"
                  f"{max(map(len, (p.ids for p in prompts)))} tokens", flush=True)  # fmt: skip
            rows.append(compare(f"{run.name} (trained)", routed, base, prompts, args, pad))
    else:
        prompts = fresh_batch(args.data or str(DEFAULT_DATA), args.tasks, tok, args.seed)
        for method in [m for m in args.methods.split(",") if m]:
            cfg = fresh_config(method, args.tasks, args.targets.split(","))
            routed = get_model(shared_copy(base), cfg).to(device=args.device, dtype=dtype).eval()
            randomize(routed, seed=args.seed)
            rows.append(compare(f"{method} (random weights)", routed, base, prompts, args, pad))
    print("\n" + markdown(rows, args.new_tokens))
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {meta['total_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
