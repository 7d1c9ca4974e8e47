"""The papers' two analyses that need many runs, on the quality benchmark's data and settings.

    python benchmarks/ablations.py sweep       --size cpu   # score vs trainable parameters (Figure 2)
    python benchmarks/ablations.py redundancy  --size cpu   # OrchMoE with K = T, T/2, T/4, T/8 (Table 4)

`sweep` trains every method at three sizes (LoRA r=2/4/8; mixtures keep their expert
count and take half, the same and twice the rank of the quality benchmark's setting), then
plots ROUGE-L on held-out instances of seen tasks against trainable parameters. A sweep
point with exactly the quality benchmark's arguments reuses that run (same seed) when it
has finished, instead of training it again. `redundancy` shrinks OrchMoE's
number of abstract tasks. Runs that finished are skipped, so either can be restarted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CPU_TASKS, METHOD_ARGS, REPO, SIZES, run_one  # noqa: E402

# (label, CLI args) per method and size; the largest matches METHOD_ARGS (the LoRA-r8 budget).
SWEEP: dict[str, list[tuple[str, list[str]]]] = {
    "lora": [("r2", ["--rank", "2"]), ("r4", ["--rank", "4"]), ("r8", ["--rank", "8"])],
    "molora": [("3x1", ["--rank", "1"]), ("3x2", ["--rank", "2"]), ("3x4", ["--rank", "4"])],
    "poly": [("4x1", ["--rank", "1"]), ("4x2", ["--rank", "2"]), ("4x4", ["--rank", "4"])],
    "mhr": [("4x1", ["--rank", "1"]), ("4x2", ["--rank", "2"]), ("4x4", ["--rank", "4"])],
    "mode": [("2x1", ["--rank", "1"]), ("2x2", ["--rank", "2"]), ("2x3", ["--rank", "3"])],
    "orchmoe": [("4x1", ["--rank", "1"]), ("4x2", ["--rank", "2"]), ("4x4", ["--rank", "4"])],
}


def with_override(args: list[str], extra: list[str]) -> list[str]:
    """METHOD_ARGS with the flags in `extra` replaced (argparse takes the last, but keep it readable)."""
    out, skip = [], set(extra[0::2])
    i = 0
    while i < len(args):
        if args[i] in skip:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out + extra


def same_args(a: list[str], b: list[str]) -> bool:
    """The same flags with the same values, whatever their order."""
    return dict(zip(a[0::2], a[1::2])) == dict(zip(b[0::2], b[1::2]))


def metrics(run: Path) -> dict | None:
    f = run / "metrics.json"
    return json.loads(f.read_text()) if f.exists() else None


def sweep(
    root: Path, size: dict, methods: list[str], seed: int, extra: list[str], quality_root: Path | None = None
) -> None:
    from orchmoe.recipe.analysis import plot_score_vs_params

    rows = []
    for method in methods:
        for label, change in SWEEP[method]:
            method_args = with_override(METHOD_ARGS[method], change)
            out = root / f"{method}-{label}-s{seed}"
            if (
                metrics(out) is None
                and not extra
                and quality_root is not None
                and same_args(method_args, METHOD_ARGS[method])
            ):
                if metrics(quality_root / f"{method}-s{seed}") is not None:
                    out = quality_root / f"{method}-s{seed}"
            if metrics(out) is None:
                run_one(method, seed, size, out, ["--no-progress", *extra], method_args)
            m = metrics(out)
            rows.append(
                {
                    "method": method,
                    "label": label,
                    "trainable_parameters": m["trainable_parameters"],
                    "score": m["seen"]["overall"]["rougeL"],
                    "unseen": m.get("unseen", {}).get("overall", {}).get("rougeL"),
                }
            )
    plot_score_vs_params(
        rows,
        root / "score_vs_params.png",
        ylabel="seen-task ROUGE-L",
        title="ROUGE-L vs trainable parameters (SmolLM2-135M)",
    )
    lines = ["| method | size | trainable params | seen ROUGE-L | unseen ROUGE-L |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['label']} | {r['trainable_parameters']:,} | {r['score']:.2f} | "
        f"{'-' if r['unseen'] is None else format(r['unseen'], '.2f')} |"
        for r in rows
    ]
    (root / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"plot: {root / 'score_vs_params.png'}")


def redundancy(root: Path, size: dict, n_tasks: int, seed: int, extra: list[str]) -> None:
    from orchmoe.recipe.analysis import redundancy_table

    rows = []
    K = n_tasks
    while K >= 1:
        out = root / f"orchmoe-K{K}-s{seed}"
        if metrics(out) is None:
            run_one(
                "orchmoe",
                seed,
                size,
                out,
                ["--no-progress", *extra],
                with_override(METHOD_ARGS["orchmoe"], ["--n-abstract-tasks", str(K)]),
            )
        m = metrics(out)
        rows.append(
            {
                "K": K,
                "trainable_parameters": m["trainable_parameters"],
                "seen_rougeL": m["seen"]["overall"]["rougeL"],
                "unseen_rougeL": m.get("unseen", {}).get("overall", {}).get("rougeL"),
            }
        )
        K //= 2
        if K < max(1, n_tasks // 8):
            break
    table = redundancy_table(rows)
    (root / "redundancy.md").write_text(table + "\n")
    print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["sweep", "redundancy"])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--methods", default=",".join(METHOD_ARGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args(argv)
    size = SIZES[args.size]
    root = Path(args.out or REPO / "runs" / f"{args.experiment}-{args.size}")
    root.mkdir(parents=True, exist_ok=True)
    if args.experiment == "sweep":
        sweep(
            root,
            size,
            [m for m in args.methods.split(",") if m],
            args.seed,
            extra,
            quality_root=REPO / "runs" / f"quality-{args.size}",
        )
    else:
        n_tasks = len(CPU_TASKS) if args.size == "cpu" else 100
        redundancy(root, size, n_tasks, args.seed, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
