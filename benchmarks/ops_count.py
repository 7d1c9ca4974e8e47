"""Operators and host syncs per training step and per eval forward, every method: a GPU proxy on a CPU.

A 135M model on an H100 is launch-bound, so the number of aten operators a step dispatches (not
its FLOPs) predicts its time there, and every host sync stalls the launch queue. Both are counted
with a dispatch hook (:class:`orchmoe.opcount.OpCounter`) on a SmolLM2-135M-shaped model (a
``LlamaConfig`` with SmolLM2-135M's sizes and random weights: the counts do not depend on the
weights), adapters on q_proj and v_proj at the LoRA-r8 budget:

    LoRA r8 | MoLoRA 3x2 | Poly 4x2 | MHR 4x2, h=8 | MoDE m2 r3 p1 | OrchMoE 4x2, K=16 | PEFT LoRA r8

* training step: forward + backward + AdamW step (``foreach=True``, what AdamW picks on a GPU), in
  train mode, the second step counted (the first initialises the optimizer state);
* eval forward: ``no_grad``, eval mode, input_ids + attention_mask (the prefill of generate).

Columns: ``ops`` every aten operator (each costs host time in eager mode, views included),
``kernels`` those that are not views (an upper bound on the kernels launched on an accelerator),
``x LoRA`` / ``x PEFT`` ratios to our LoRA's and PEFT's LoRA's. Host syncs (``.item()``,
``bool(t)``, mask indexing, nonzero...) of the forward and backward, split into ours (orchmoe
code) / the base model's (transformers' SDPA mask check reads ``padding_mask.all()``) and, in
parentheses, the documented host check of CPU task ids (``RoutedModel._task_ids``: on a GPU
machine the ids arrive on the CPU, so it reads no device memory). The AdamW step's ``.item()``
on its CPU step counters is no device sync either and is left out of the sync columns (it is in
``ops``).

    python benchmarks/ops_count.py                      # SmolLM2-135M shape, batch 4 x 128 (minutes on one core)
    python benchmarks/ops_count.py --width 64 --vocab 512   # same counts in seconds (counts do not depend on widths)
    python benchmarks/ops_count.py --json ops.json --top 15 --methods poly,orchmoe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from opcount import OpCounter
from orchmoe import LoraConfig, MHRConfig, MoDEConfig, MoLoRAConfig, OrchMoEConfig, PolyConfig, get_model

N_TASKS = 8
TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(rank=8, target_modules=TARGETS),
    "molora": lambda: MoLoRAConfig(n_skills=3, rank=2, target_modules=TARGETS),
    "poly": lambda: PolyConfig(n_tasks=N_TASKS, n_skills=4, rank=2, target_modules=TARGETS),
    "mhr": lambda: MHRConfig(n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=8, target_modules=TARGETS),
    "mode": lambda: MoDEConfig(n_skills=2, rank=3, expert_rank=1, target_modules=TARGETS),
    "orchmoe": lambda: OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=16, target_modules=TARGETS),
}
METHODS = [*CONFIGS, "peft-lora"]
PARAMETER_MIXING = ("poly", "mhr", "orchmoe")
HOST_CHECKS = ("checked_task_ids",)  # CPU task ids validated on the host: no device sync on an accelerator


def smollm2_shape(width: int = 576, vocab: int = 49152, layers: int = 30, seed: int = 0):
    """SmolLM2-135M's architecture with random weights (width/vocab shrinkable: the op count stays)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = 9 if width % 9 == 0 else 4
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=width * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=3 if heads == 9 else 2,
        head_dim=width // heads,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def build(method: str, base):
    if method == "peft-lora":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    return get_model(base, CONFIGS[method]())


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random tokens; the first 3/4 of each row is prompt (label -100), the rest the answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq * 3 // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _row(counter: OpCounter, top: int) -> dict:
    ours = counter.syncs_from("/orchmoe/")
    return {
        "ops": counter.total,
        "kernels": counter.kernels,
        "syncs": counter.host_syncs,
        "syncs_ours": ours,
        "syncs_base": counter.host_syncs - ours,
        "host_checks": sum(counter.excluded.values()),
        "top": counter.by_name(top),
    }


def count(method: str, base, batch: dict, top: int) -> dict:
    """One counted training step (after one warm-up step) and one counted eval forward."""
    model = build(method, base)
    kw = {"task_ids": torch.arange(batch["input_ids"].shape[0]) % N_TASKS} if method in ("poly", "mhr") else {}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()
    for _ in range(2):
        counter = OpCounter(exclude=HOST_CHECKS)
        with counter:
            model(**batch, **kw).loss.backward()
        opt_counter = OpCounter(stacks=False)
        with opt_counter:
            opt.step()
            opt.zero_grad(set_to_none=True)
    train = _row(counter, top)
    train["ops"] += opt_counter.total
    train["kernels"] += opt_counter.kernels
    train["optimizer_ops"] = opt_counter.total
    model.eval()
    eval_in = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with OpCounter(exclude=HOST_CHECKS) as counter, torch.no_grad():
        model(**eval_in, **kw)
    return {"train": train, "eval": _row(counter, top)}


def _ratio(value: int, ref: dict | None, phase: str, key: str) -> str:
    return f"{value / ref[phase][key]:.2f}" if ref else "-"


def table(results: dict) -> str:
    lora, peft = results.get("lora"), results.get("peft-lora")
    header = (
        "| method | train ops | x LoRA | x PEFT | train kernels | x LoRA | x PEFT | train syncs ours / base (host checks) "
        "| eval ops | x LoRA | eval kernels | x LoRA | eval syncs ours / base (host checks) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        t, e = r["train"], r["eval"]
        lines.append(
            f"| {m} | {t['ops']:,} | {_ratio(t['ops'], lora, 'train', 'ops')} | {_ratio(t['ops'], peft, 'train', 'ops')} "
            f"| {t['kernels']:,} | {_ratio(t['kernels'], lora, 'train', 'kernels')} | {_ratio(t['kernels'], peft, 'train', 'kernels')} "
            f"| {t['syncs_ours']} / {t['syncs_base']} ({t['host_checks']}) "
            f"| {e['ops']:,} | {_ratio(e['ops'], lora, 'eval', 'ops')} | {e['kernels']:,} | {_ratio(e['kernels'], lora, 'eval', 'kernels')} "
            f"| {e['syncs_ours']} / {e['syncs_base']} ({e['host_checks']}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=0, help="also list each method's N most frequent training operators")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.seq, args.vocab)
    results = {}
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}: choose from {METHODS}")
        base = smollm2_shape(args.width, args.vocab, args.layers)
        results[method] = count(method, base, batch, args.top)
        print(f"counted {method}", file=sys.stderr, flush=True)
    print(
        f"Ops per training step (forward + backward + AdamW) and per eval forward; SmolLM2-135M shape "
        f"(width {args.width}, vocab {args.vocab}, {args.layers} layers), batch {args.batch} x {args.seq}, "
        f"q_proj+v_proj, torch {torch.__version__}\n"
    )
    print(table(results))
    lora = results.get("lora")
    mixing = [m for m in PARAMETER_MIXING if m in results]
    if lora and mixing:
        for key in ("ops", "kernels"):
            worst = max((results[m]["train"][key] / lora["train"][key], m) for m in mixing)
            print(
                f"\nparameter mixing, worst: {worst[1]} at {worst[0]:.2f}x LoRA's training-step {key} (target <= 1.25x)"
            )
    if args.top:
        for m, r in results.items():
            print(f"\n{m}: " + ", ".join(f"{n} {c}" for n, c in r["train"]["top"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
