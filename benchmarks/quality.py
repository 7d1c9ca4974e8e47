"""Quality benchmark: every method at the same trainable budget, same tasks, same model.

Runs `orchmoe train` (which evaluates at the end) for each method and seed, then
writes one table with mean and spread over seeds (ROUGE-L, ROUGE-1, exact match on
held-out instances of seen tasks and on unseen test-split tasks, trainable
parameters, train time) and a per-category table.

    python benchmarks/quality.py --size cpu            # ~1.5 h on 2 CPU cores (see SIZES)
    python benchmarks/quality.py --size cpu-long       # 5 distinct tasks, 400 steps: routing gets a chance
    python benchmarks/quality.py --size ni100-quick    # ~10 min of one H100 (bf16, K = 100)
    python benchmarks/quality.py --size ni100          # the papers' NI-100 protocol, for a GPU

Besides the six methods at one budget, the capacity controls: ``lora-r2`` (a LoRA of one skill's
rank) and ``poly-a1`` / ``orchmoe-a1`` (the mixtures at the Poly references' scale 1/r instead of
the shared alpha = rank convention).

Finished runs (a metrics.json in their folder) are skipped, and an interrupted run
resumes from its last checkpoint, so the command can simply be started again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "superni"

# Equal budgets on SmolLM2-135M (q_proj 576->576, v_proj 576->192, 30 layers): LoRA r=8 has
# 460,800 trainable parameters; each mixture is sized to land within a few percent of it
# (MoLoRA's per-token router costs P*S per layer, MoDE's r/p*m*P, so they take fewer experts).
METHOD_ARGS: dict[str, list[str]] = {
    "lora": ["--method", "lora", "--rank", "8"],
    "molora": ["--method", "molora", "--n-skills", "3", "--rank", "2"],
    "poly": ["--method", "poly", "--n-skills", "4", "--rank", "2"],
    "mhr": ["--method", "mhr", "--n-skills", "4", "--rank", "2", "--n-splits", "8"],
    "mode": ["--method", "mode", "--n-skills", "2", "--rank", "3", "--expert-rank", "1"],
    "orchmoe": ["--method", "orchmoe", "--n-skills", "4", "--rank", "2"],  # K = number of seen tasks (the paper)
}
# Capacity controls: a LoRA of one skill's rank, and the mixtures at the references' 1/r scale.
CONTROL_ARGS: dict[str, list[str]] = {
    "lora-r2": ["--method", "lora", "--rank", "2"],
    "poly-a1": [*METHOD_ARGS["poly"], "--alpha", "1"],
    "orchmoe-a1": [*METHOD_ARGS["orchmoe"], "--alpha", "1"],
}
ALL_ARGS = {**METHOD_ARGS, **CONTROL_ARGS}

# Short-prompt SuperNI tasks with short answers, spread over categories, for the CPU size.
CPU_TASKS = [
    "task1508_wordnet_antonyms",  # Word Semantics
    "task1146_country_capital",  # Misc.
    "task1314_country_abbreviation",  # Misc.
    "task591_sciq_answer_generation",  # Question Answering
    "task1412_web_questions_question_answering",  # Question Answering
    "task568_circa_question_generation",  # Question Generation
    "task565_circa_answer_generation",  # Dialogue Generation
    "task899_freebase_qa_topic_generation",  # Question Understanding
    "task454_swag_incorrect_answer_generation",  # Wrong Candidate Generation
    "task455_swag_context_generation",  # Text Completion
]
CPU_UNSEEN = [
    "task1195_disflqa_disfluent_to_fluent_conversion",  # Question Rewriting
    "task645_summarization",  # Keyword Tagging
    "task393_plausible_result_generation",  # Cause Effect Classification
    "task957_e2e_nlg_text_generation_generate",  # Data to Text
]

# Five tasks of five categories with short prompts and answers, for the longer CPU protocol.
LONG_TASKS = [
    "task1508_wordnet_antonyms",  # Word Semantics
    "task094_conala_calculate_mean",  # Program Execution
    "task1412_web_questions_question_answering",  # Question Answering
    "task568_circa_question_generation",  # Question Generation
    "task132_dais_text_modification",  # Paraphrasing
]

SIZES: dict[str, dict] = {
    # 10 seen tasks x 32 train / 10 eval instances, 4 unseen tasks x 10, one demonstration,
    # prompts <= 160 tokens, answers <= 24 tokens: one epoch of 40 optimizer steps of 8 examples,
    # ~4-5 minutes per run (train + eval) on 2 CPU cores, so 6 methods x 3 seeds fit in ~1.5 hours.
    "cpu": {
        "data": str(SHARED),
        "args": [
            "--tasks",
            ",".join(CPU_TASKS),
            "--unseen-tasks",
            ",".join(CPU_UNSEEN),
            "--train-per-task",
            "32",
            "--eval-per-task",
            "10",
            "--unseen-per-task",
            "10",
            "--n-pos",
            "1",
            "--max-source-len",
            "160",
            "--max-target-len",
            "24",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--lr",
            "3e-3",
            "--warmup-ratio",
            "0.1",
            "--checkpoint-every",
            "20",
            "--eval-batch-size",
            "16",
        ],
        "seeds": [0, 1, 2],
    },
    # Fewer, more different tasks and ten times the steps: 5 tasks of 5 categories x 320 training
    # instances, two epochs (400 steps of 8) at the references' learning rates (adapters 1e-3,
    # allocation logits 0.1, the defaults); 30-48 minutes per run on one shared CPU core.
    "cpu-long": {
        "data": str(SHARED),
        "args": [
            "--tasks",
            ",".join(LONG_TASKS),
            "--unseen-tasks",
            ",".join(CPU_UNSEEN),
            "--train-per-task",
            "320",
            "--eval-per-task",
            "20",
            "--unseen-per-task",
            "10",
            "--n-pos",
            "1",
            "--max-source-len",
            "160",
            "--max-target-len",
            "24",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "50",
            "--log-every",
            "10",
            "--eval-batch-size",
            "16",
        ],
        "seeds": [0, 1, 2],
    },
    # A GPU-sized protocol for about 10 minutes of one H100 for the methods the claim is about: the
    # same 100 tasks for every seed (--task-seed 0), 100 train / 20 eval instances each, the unseen
    # test-split tasks on 20 instances, bf16, K = 100 abstract tasks (= T, as the OrchMoE paper).
    "ni100-quick": {
        "data": str(SHARED),
        "args": [
            "--tasks",
            "100",
            "--task-seed",
            "0",
            "--allow-fewer-train",
            "--train-per-task",
            "100",
            "--eval-per-task",
            "20",
            "--unseen-tasks",
            "all",
            "--unseen-per-task",
            "20",
            "--n-pos",
            "2",
            "--max-source-len",
            "512",
            "--max-target-len",
            "64",
            "--max-new-tokens",
            "64",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--mixed-precision",
            "bf16",
            "--checkpoint-every",
            "500",
            "--eval-batch-size",
            "128",
        ],
        "seeds": [0, 1, 2],
    },
    # The papers' NI-100 protocol: 100 tasks, 1000 train + 100 eval instances each, all unseen test
    # tasks on their first 100 instances. The shared subset holds 78 tasks with 1100 instances;
    # --allow-fewer-train keeps the rest, training on what they have after the 100 held out.
    "ni100": {
        "data": str(SHARED),
        "args": [
            "--tasks",
            "100",
            "--allow-fewer-train",
            "--train-per-task",
            "1000",
            "--eval-per-task",
            "100",
            "--unseen-tasks",
            "all",
            "--unseen-per-task",
            "100",
            "--n-pos",
            "2",
            "--max-source-len",
            "1024",
            "--max-target-len",
            "128",
            "--max-new-tokens",
            "128",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--mixed-precision",
            "bf16",
            "--checkpoint-every",
            "1000",
            "--eval-batch-size",
            "64",
        ],
        "seeds": [0],
    },
}


def run_one(
    method: str, seed: int, size: dict, out: Path, extra: list[str], method_args: list[str] | None = None
) -> float:
    """One `orchmoe train` (+ its evaluation) in a fresh process; an interrupted one resumes."""
    cmd = [
        sys.executable,
        "-m",
        "orchmoe",
        "train",
        *(method_args or ALL_ARGS[method]),
        "--data",
        size["data"],
        *size["args"],
        "--seed",
        str(seed),
        "--out",
        str(out),
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def mean_sd(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _finished_runs(root: Path, method: str, seeds: list[int]) -> dict[int, dict]:
    """metrics.json of each finished run of `method`, by seed, with the last train_log record under "_log"."""
    out = {}
    for seed in seeds:
        run = root / f"{method}-s{seed}"
        if (run / "metrics.json").exists():
            out[seed] = json.loads((run / "metrics.json").read_text())
            log = run / "train_log.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            out[seed]["_log"] = json.loads(lines[-1]) if lines else {}
    return out


def _seen_rougeL(run: dict) -> float:
    return run["seen"]["overall"]["rougeL"]


def summarise(root: Path, methods: list[str], seeds: list[int]) -> str:
    """The seed changes which instances are trained on and held out, and that moves every method
    together; the paired column (method minus LoRA on the same seed) removes that shared part."""
    rows, cats = [], {}
    finished = {m: _finished_runs(root, m, seeds) for m in {*methods, "lora"}}
    for method in methods:
        runs = list(finished[method].values())
        if not runs:
            continue
        lora = finished["lora"]
        paired = [_seen_rougeL(r) - _seen_rougeL(lora[s]) for s, r in finished[method].items() if s in lora]

        def vals(part: str, key: str, runs: list[dict] = runs) -> list[float]:
            return [r[part]["overall"][key] for r in runs if part in r and r[part].get("overall")]

        def logged(key: str, runs: list[dict] = runs) -> list[float]:
            return [r["_log"][key] for r in runs if r.get("_log", {}).get(key) is not None]

        params = runs[0].get("trainable_parameters", "-")
        train_s = [r.get("train_seconds") for r in runs if r.get("train_seconds") is not None]
        rows.append(
            [
                method,
                f"{params:,}" if isinstance(params, int) else params,
                str(len(runs)),
                mean_sd(vals("seen", "rougeL")),
                "-" if method == "lora" or not paired else mean_sd(paired),
                mean_sd(vals("seen", "rougeLsum")),
                mean_sd(vals("seen", "exact_match")),
                mean_sd(vals("unseen", "rougeL")),
                mean_sd(vals("unseen", "exact_match")),
                mean_sd(logged("allocation_spread"), 3),
                mean_sd(logged("nmi_pi_task"), 2),
                f"{statistics.mean(train_s) / 60:.1f} min" if train_s else "-",
            ]
        )
        for r in runs:
            for cat, s in r.get("seen", {}).get("per_category", {}).items():
                cats.setdefault(cat, {}).setdefault(method, []).append(s["rougeL"])
    head = [
        "method",
        "trainable params",
        "seeds",
        "seen ROUGE-L",
        "seen ROUGE-L − LoRA (paired)",
        "seen ROUGE-Lsum",
        "seen EM",
        "unseen ROUGE-L",
        "unseen EM",
        "allocation spread (end)",
        "NMI π–task (end)",
        "train time",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    done = [r[0] for r in rows]
    lines += [
        "",
        "Seen-task ROUGE-L per category (mean over seeds):",
        "",
        "| category | " + " | ".join(done) + " |",
        "|---|" + "---|" * len(done),
    ]
    for cat in sorted(cats):
        lines.append(f"| {cat} | " + " | ".join(mean_sd(cats[cat].get(m, [])) for m in done) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument(
        "--methods",
        default=",".join(METHOD_ARGS),
        help="comma-separated subset of " + ",".join(ALL_ARGS) + " (default: the six methods)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the size's)")
    p.add_argument("--out", default=None, help="root folder of the runs (default: runs/quality-<size>)")
    p.add_argument("--model", default=None, help="base model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the tables from finished runs")
    args, extra = p.parse_known_args(argv)
    size = SIZES[args.size]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_ARGS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(ALL_ARGS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else size["seeds"]
    root = Path(args.out or REPO / "runs" / f"quality-{args.size}")
    root.mkdir(parents=True, exist_ok=True)
    if args.model:
        extra = ["--model", args.model, *extra]
    if not args.summary_only:
        for seed in seeds:  # seed-major: after the first pass every method has one result
            for method in methods:
                out = root / f"{method}-s{seed}"
                if (out / "metrics.json").exists():
                    print(f"= {out} done, skipped", flush=True)
                    continue
                run_one(method, seed, size, out, ["--no-progress", *extra])
    table = summarise(root, methods, seeds)
    (root / "quality.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
