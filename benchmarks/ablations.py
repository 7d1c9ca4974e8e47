"""The papers' two analyses that need many runs, on the quality benchmark's data and settings, over seeds.

    python benchmarks/ablations.py all        --size cpu --seeds 0,1,2   # both, sharing their common runs
    python benchmarks/ablations.py sweep      --size cpu   # score vs trainable parameters (OrchMoE Figure 2)
    python benchmarks/ablations.py redundancy --size cpu   # OrchMoE with K in {1, 2, 5, T} (OrchMoE Table 4)
    python benchmarks/ablations.py all --size cpu --dry-run          # list the runs still to train

`sweep` trains LoRA, Poly and OrchMoE (``--methods``; MoLoRA, MHR and MoDE have sizes too) at three budgets:
half, once and twice a rank-8 LoRA (LoRA r4 / r8 / r16; the mixtures keep 4 skills of rank 1 / 2 / 4), and
plots seen-task ROUGE-L (held-out instances) against trainable parameters, mean and sd over seeds.
`redundancy` shrinks OrchMoE's number of abstract tasks K at the budget (4 skills x r2): K = T (the number
of seen tasks, the recipe's default; this run is the sweep's OrchMoE 4x2) and the smaller K of ``--k``.
Each comparison is paired on seed and instance with `paired_stats.py` (a bootstrap CI over seeds and
instances): every mixture against the LoRA of the same budget, every K against K = T.

Every training is an `orchmoe train` subprocess with the quality benchmark's arguments (so the frozen code
of a benchmark checkout runs it when its ``src`` is on PYTHONPATH); runs are named
``<method>-<size>[-K<k>]-s<seed>`` under ``--out`` (default ``runs/ablations-<size>``). Finished runs are
skipped and an interrupted one resumes, so the command can be started again; a point with exactly the
quality benchmark's arguments reuses that benchmark's finished run of the same seed (``--quality-root``).
Tables and the figure go to ``--results`` (default ``benchmarks/results``: ``sweep-<size>.md``,
``redundancy-<size>.md``, ``score_vs_params-<size>.png``; the 0.1 figures stay in ``results/v0.1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import compare, scores_from_runs  # noqa: E402
from quality import METHOD_ARGS, REPO, SIZES, mean_sd, run_one  # noqa: E402

# (label, changed CLI args) per method, at about half, once and twice the LoRA-r8 budget; the middle one is
# METHOD_ARGS (the quality benchmark's setting).
SWEEP: dict[str, list[tuple[str, list[str]]]] = {
    "lora": [("r4", ["--rank", "4"]), ("r8", ["--rank", "8"]), ("r16", ["--rank", "16"])],
    "poly": [("4x1", ["--rank", "1"]), ("4x2", ["--rank", "2"]), ("4x4", ["--rank", "4"])],
    "orchmoe": [("4x1", ["--rank", "1"]), ("4x2", ["--rank", "2"]), ("4x4", ["--rank", "4"])],
    "molora": [("3x1", ["--rank", "1"]), ("3x2", ["--rank", "2"]), ("3x4", ["--rank", "4"])],
    "mhr": [("4x1", ["--rank", "1"]), ("4x2", ["--rank", "2"]), ("4x4", ["--rank", "4"])],
    "mode": [("2x1", ["--rank", "1"]), ("2x2", ["--rank", "2"]), ("2x3", ["--rank", "3"])],
}
BUDGETS = ("½× LoRA-r8", "1× LoRA-r8", "2× LoRA-r8")
DEFAULT_METHODS = "lora,poly,orchmoe"
DEFAULT_K = "1,2,5,T"


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


def n_seen_tasks(size: dict) -> int:
    """T: the number of seen tasks of a size (its --tasks list, or the number it draws)."""
    spec = size["args"][size["args"].index("--tasks") + 1]
    return int(spec) if spec.isdigit() else len(spec.split(","))


def parse_k(spec: str, T: int) -> list[int]:
    """``"1,2,5,T"`` -> [T, 5, 2, 1] (largest first, values above T dropped, duplicates merged)."""
    ks = set()
    for part in spec.split(","):
        part = part.strip()
        if part:
            k = T if part.upper() == "T" else int(part)
            if k < 1:
                raise ValueError(f"K must be >= 1, got {k}")
            if k <= T:
                ks.add(k)
    return sorted(ks | {T}, reverse=True)


def plan(experiment: str, size_name: str, methods: list[str], ks: list[int], seeds: list[int]) -> list[dict]:
    """Every run the experiment needs: {group, method, label, K, seed, name, args}; runs shared by the two
    experiments (OrchMoE 4x2 = K = T) appear once."""
    T = n_seen_tasks(SIZES[size_name])
    points: list[dict] = []
    if experiment in ("sweep", "all"):
        for method in methods:
            for budget, (label, change) in zip(BUDGETS, SWEEP[method]):
                args = with_override(METHOD_ARGS[method], change)
                points.append(dict(group="sweep", method=method, label=label, budget=budget, K=None, args=args))
    if experiment in ("redundancy", "all"):
        for k in ks:
            args = with_override(METHOD_ARGS["orchmoe"], ["--rank", "2"])
            if k != T:
                args = with_override(args, ["--n-abstract-tasks", str(k)])
            points.append(dict(group="redundancy", method="orchmoe", label="4x2", budget=BUDGETS[1], K=k, args=args))
    runs = []
    for seed in seeds:  # seed-major: after the first pass every point has one result
        for pt in points:
            k_part = f"-K{pt['K']}" if pt["K"] not in (None, T) else ""
            runs.append({**pt, "seed": seed, "name": f"{pt['method']}-{pt['label']}{k_part}-s{seed}"})
    return runs


def folder(run: dict, root: Path, quality_root: Path | None) -> Path:
    """Where a run's results are: its own folder, or the quality benchmark's run with the same arguments."""
    own = root / run["name"]
    if metrics(own) is None and quality_root is not None and same_args(run["args"], METHOD_ARGS[run["method"]]):
        q = quality_root / f"{run['method']}-s{run['seed']}"
        if metrics(q) is not None:
            return q
    return own


def train_missing(
    runs: list[dict],
    root: Path,
    quality_root: Path | None,
    extra: list[str],
    dry: bool,
    shard: tuple[int, int] = (0, 1),
) -> int:
    """Train the runs that have not finished (each name once; with ``shard`` (i, n) the i-th of every n, so n
    processes can share the list); returns how many were (or would be) trained."""
    size = SIZES[runs[0]["size"]] if runs else None
    names = list(dict.fromkeys(r["name"] for r in runs))
    mine = set(names[shard[0] :: shard[1]])
    done, todo = set(), 0
    for r in runs:
        if r["name"] in done or r["name"] not in mine:
            continue
        done.add(r["name"])
        out = folder(r, root, quality_root)
        if metrics(out) is not None:
            continue
        todo += 1
        if dry:
            print(f"would train {r['name']}: {' '.join(r['args'])} --seed {r['seed']}", flush=True)
        else:
            run_one(r["method"], r["seed"], size, out, ["--no-progress", *extra], r["args"])
    return todo


# ----------------------------------------------------------------------------------------------
# Tables and figure


def _collect(runs: list[dict], root: Path, quality_root: Path | None) -> dict[str, dict]:
    """Per point ("group:method-label[-K]") the finished runs' metrics and folders, by seed."""
    points: dict[str, dict] = {}
    for r in runs:
        out = folder(r, root, quality_root)
        m = metrics(out)
        key = f"{r['group']}:{r['name'].rsplit('-s', 1)[0]}"
        pt = points.setdefault(key, {**{k: r[k] for k in ("method", "label", "budget", "K", "group")}, "runs": {}})
        if m is not None:
            pt["runs"][r["seed"]] = {"metrics": m, "folder": out}
    return points


def _vals(pt: dict, part: str) -> list[float]:
    return [r["metrics"][part]["overall"]["rougeL"] for r in pt["runs"].values() if part in r["metrics"]]


def _paired(points: dict, key: str, ref: str) -> str:
    """Seen ROUGE-L of `key` minus `ref`, paired on seed and instance: mean [95% CI] (k/S seeds above)."""
    if key == ref or not points.get(ref, {}).get("runs") or not points[key]["runs"]:
        return "-"
    folders = {lab: {s: r["folder"] for s, r in points[lab]["runs"].items()} for lab in (key, ref)}
    scores = scores_from_runs(folders, "rougeL", "seen")
    if not set(scores[key]) & set(scores[ref]):
        return "-"
    row = compare(scores, key, ref, n_boot=2000)[-1]
    mark = "" if not row["resolved"] else " *"
    return f"{row['mean']:+.2f} [{row['lo']:+.2f}, {row['hi']:+.2f}] ({row['above']}/{row['n_seeds']}){mark}"


def sweep_table(points: dict) -> str:
    lines = [
        "| method | size | budget | trainable params | seeds | seen ROUGE-L | − LoRA same budget (paired, 95% CI) "
        "| unseen ROUGE-L (size's unseen tasks) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    lora_at = {pt["budget"]: key for key, pt in points.items() if pt["method"] == "lora" and pt["group"] == "sweep"}
    for key, pt in points.items():
        if pt["group"] != "sweep":
            continue
        params = next((r["metrics"]["trainable_parameters"] for r in pt["runs"].values()), None)
        lines.append(
            f"| {pt['method']} | {pt['label']} | {pt['budget']} | {'-' if params is None else f'{params:,}'} | "
            f"{len(pt['runs'])} | {mean_sd(_vals(pt, 'seen'))} | {_paired(points, key, lora_at.get(pt['budget'], ''))} "
            f"| {mean_sd(_vals(pt, 'unseen'))} |"
        )
    return "\n".join(lines)


def redundancy_table(points: dict) -> str:
    red = sorted((p for p in points.items() if p[1]["group"] == "redundancy"), key=lambda kv: -kv[1]["K"])
    if not red:
        return ""
    ref = red[0][0]
    lines = [
        "| K | trainable params | seeds | seen ROUGE-L | − K = T (paired, 95% CI) | unseen ROUGE-L (size's unseen tasks) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for key, pt in red:
        params = next((r["metrics"]["trainable_parameters"] for r in pt["runs"].values()), None)
        lines.append(
            f"| {pt['K']}{' (T)' if key == ref else ''} | {'-' if params is None else f'{params:,}'} | "
            f"{len(pt['runs'])} | {mean_sd(_vals(pt, 'seen'))} | {_paired(points, key, ref)} | "
            f"{mean_sd(_vals(pt, 'unseen'))} |"
        )
    return "\n".join(lines)


def plot(points: dict, path: Path, title: str) -> Path | None:
    """Figure 2's shape: seen and unseen ROUGE-L against trainable parameters (log x), mean ± sd over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    drawn = False
    for ax, part, ylabel in zip(
        axes, ("seen", "unseen"), ("seen-task ROUGE-L", "unseen-task ROUGE-L (the size's unseen tasks)")
    ):
        for i, method in enumerate(dict.fromkeys(p["method"] for p in points.values() if p["group"] == "sweep")):
            pts = []
            for pt in points.values():
                vals = _vals(pt, part)
                if pt["group"] == "sweep" and pt["method"] == method and vals:
                    params = next(iter(pt["runs"].values()))["metrics"]["trainable_parameters"]
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    pts.append((params, statistics.fmean(vals), sd, pt["label"]))
            if not pts:
                continue
            drawn = True
            pts.sort()
            xs, ys, sds, labels = zip(*pts)
            ax.errorbar(xs, ys, yerr=sds, marker="osD^vP"[i % 6], capsize=3, label=method)
            for x, y, lab in zip(xs, ys, labels):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    if not drawn:
        return None
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def summarise(runs: list[dict], root: Path, quality_root: Path | None, results: Path, size_name: str) -> str:
    from orchmoe.utils.fileio import atomic_write_text

    points = _collect(runs, root, quality_root)
    results.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in runs})
    note = (
        f"\n\nSize `{size_name}`, seeds {seeds}; mean ± sd over seeds; paired = on seed and held-out instance, "
        "bootstrap over seeds and instances (`paired_stats.py`), (k/S) = seeds above, * = resolved (the bootstrap CI and the t-interval over the seed means exclude 0)."
    )
    parts = []
    if any(p["group"] == "sweep" for p in points.values()):
        table = sweep_table(points) + note
        atomic_write_text(results / f"sweep-{size_name}.md", table + "\n")
        png = plot(
            points, results / f"score_vs_params-{size_name}.png", f"ROUGE-L vs trainable parameters ({size_name})"
        )
        parts += ["## Score vs trainable parameters", "", table, "", f"plot: {png}" if png else "plot: no runs yet"]
    red = redundancy_table(points)
    if red:
        atomic_write_text(results / f"redundancy-{size_name}.md", red + note + "\n")
        parts += ["", "## Redundancy of abstract tasks (OrchMoE, 4 skills × r2)", "", red + note]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["sweep", "redundancy", "all"])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"sweep methods among {','.join(SWEEP)}")
    p.add_argument("--k", default=DEFAULT_K, help="abstract task counts for redundancy (T = seen tasks)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the size's)")
    p.add_argument("--out", default=None, help="root of the runs (default runs/ablations-<size>)")
    p.add_argument("--quality-root", default=None, help="finished quality runs to reuse (default runs/quality-<size>)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where tables and figure go")
    p.add_argument("--model", default=None, help="base model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the tables and figure")
    p.add_argument("--dry-run", action="store_true", help="list the runs still to train, train nothing")
    p.add_argument("--shard", default="0/1", help="I/N: train only every N-th run from the I-th (N processes)")
    args, extra = p.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SWEEP]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(SWEEP)}")
    try:
        ks = parse_k(args.k, n_seen_tasks(SIZES[args.size]))
    except ValueError as e:
        p.error(f"--k: {e}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else SIZES[args.size]["seeds"]
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    root = Path(args.out or REPO / "runs" / f"ablations-{args.size}")
    quality_root = Path(args.quality_root or REPO / "runs" / f"quality-{args.size}")
    runs = [{**r, "size": args.size} for r in plan(args.experiment, args.size, methods, ks, seeds)]
    if args.model:
        extra = ["--model", args.model, *extra]
    if not args.summary_only:
        todo = train_missing(runs, root, quality_root, extra, args.dry_run, shard)
        print(f"{len({r['name'] for r in runs})} runs in all, {todo} to train in shard {args.shard}", flush=True)
        if args.dry_run:
            return 0
    print(summarise(runs, root, quality_root, Path(args.results), args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
