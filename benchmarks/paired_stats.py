"""Paired comparisons of methods over seeds and instances, with a stated uncertainty.

Two runs of different methods on the same seed score the same instances (the unseen-task instances of
`unseen_eval.py` are fixed by task; the held-out seen-task instances are drawn by the seed, the same for
every method), so a comparison is made per (seed, instance) pair. For each comparison, per task and
over all tasks:

* the mean difference (instance-weighted over tasks, as the official overall score);
* a 95% confidence interval from a hierarchical bootstrap: resample the seeds, then the instances within
  each task. When every seed scores the same instances (unseen tasks) the instances are crossed with the
  seeds, and one draw of instances is shared by all the drawn seeds (an instance that is hard for a method
  is hard on every seed); otherwise (held-out seen instances, drawn per seed) they are drawn per seed;
* a sign test over seeds (two-sided, exact binomial; ties dropped): with S seeds it cannot go below
  2 / 2^S (0.0625 with 5 seeds);
* a 95% t-interval of the per-seed mean differences (S - 1 degrees of freedom);
* one sentence: **resolved** when the bootstrap interval excludes 0 and, with two seeds or more, so does the
  t-interval. The two-level bootstrap alone is too narrow with few seeds when the seeds differ: in
  simulations of this design (14 tasks x 20 instances, `simulate_coverage`, ``--simulate``) its 95% interval
  covered the true difference 87-89 % of the time with 3 seeds and 93-94 % with 5 when the seed effect is
  comparable to the noise, and 99 % when it is small (it then counts the instance noise twice); the
  t-interval held 91-95 %. Requiring both keeps the verdict on the safe side of either.

    python benchmarks/paired_stats.py runs/quality-cpu-long runs/quality-cpu-long-frozen
    python benchmarks/paired_stats.py runs/quality-cpu-long --part seen       # the runs' own evaluation

Inputs: folders searched for ``<name>/results.json`` of `unseen_eval.py` (``--part unseen14``, the
default) or for run folders' ``predictions.jsonl`` (``--part seen`` / ``--part unseen``: the training's
own evaluation). A method's label is its run folder name without ``-s<seed>`` (``-frozen`` added for
``--router-lr 0``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# scores[label][seed][task] = {instance id: score}
Scores = dict[str, dict[int, dict[str, dict[str, float]]]]
DEFAULT_PAIRS = ("orchmoe:lora", "poly:lora", "mhr:lora", "mode:lora", "orchmoe:poly", "orchmoe:orchmoe-frozen")
OVERALL = "all tasks"


class StatsError(ValueError):
    """Inputs that cannot be compared; the message says which."""


# ----------------------------------------------------------------------------------------------
# Loading


def run_label(run: Path, method: str, router_lr) -> str:
    """A run's method label: ``lora-s3`` -> ``lora``; a run with frozen allocation logits (``router_lr`` 0)
    gets ``-frozen`` appended."""
    label = re.sub(r"-s\d+$", "", run.name)
    if router_lr is not None and float(router_lr) == 0.0 and "frozen" not in label:
        label += "-frozen"
    return label or method


def _results_files(paths: list[Path], name: str) -> list[Path]:
    return sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob(f"{name}/results.json"))})


def load_unseen_results(paths: list[Path], metric: str = "rougeL", name: str = "unseen14") -> Scores:
    """Per-instance scores from `unseen_eval.py`'s ``<name>/results.json`` files under ``paths``."""
    scores: Scores = {}
    for f in _results_files(paths, name):
        res = json.loads(f.read_text(encoding="utf-8"))
        seed = -1 if res.get("seed") is None else int(res["seed"])  # the base model: one deterministic "seed"
        per_task = scores.setdefault(res["label"], {}).setdefault(seed, {})
        if per_task:
            raise StatsError(f"two results for {res['label']} seed {seed} (the second: {f})")
        for task, r in res["tasks"].items():
            per_task[task] = {i["id"]: float(i["scores"][metric]) for i in r["instances"]}
    return scores


def empty_predictions(paths: list[Path], name: str = "unseen14") -> dict[str, dict[str, list[int]]]:
    """``{label: {task: [empty, total]}}`` over seeds: predictions that ended at once (the model "abstained"),
    which explain a method's collapse on a task better than its mean does."""
    out: dict[str, dict[str, list[int]]] = {}
    for f in _results_files(paths, name):
        res = json.loads(f.read_text(encoding="utf-8"))
        if res.get("label") == "copy-input":
            continue
        for task, r in res["tasks"].items():
            cell = out.setdefault(res["label"], {}).setdefault(task, [0, 0])
            cell[0] += sum(not i["prediction"] for i in r["instances"])
            cell[1] += len(r["instances"])
    return out


def empty_table(empty: dict[str, dict[str, list[int]]]) -> str:
    """Markdown: share of empty predictions per task and label (only tasks where some label has one)."""
    labels = list(empty)
    tasks = sorted({t for lab in labels for t, (e, _) in empty[lab].items() if e})
    if not tasks:
        return "No empty predictions."
    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for t in tasks:
        cells = [f"{empty[lab][t][0]}/{empty[lab][t][1]}" if t in empty[lab] else "-" for lab in labels]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_from_runs(runs: dict[str, dict[int, Path]], metric: str = "rougeL", part: str = "seen") -> Scores:
    """Per-instance scores of training runs' own evaluation (``predictions.jsonl``): ``runs[label][seed]`` is a
    run folder; ``part`` "seen" (held-out instances of the training tasks) or "unseen"."""
    scores: Scores = {}
    for label, by_seed in runs.items():
        for seed, run in by_seed.items():
            per_task = scores.setdefault(label, {}).setdefault(seed, {})
            for line in (Path(run) / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if bool(rec["seen"]) == (part == "seen"):
                    per_task.setdefault(rec["task"], {})[str(rec["id"])] = float(rec["scores"][metric])
    return scores


def load_run_predictions(paths: list[Path], metric: str = "rougeL", part: str = "seen") -> Scores:
    """`scores_from_runs` of every run folder with a ``predictions.jsonl`` under ``paths``, labelled by `run_label`."""
    import yaml

    runs: dict[str, dict[int, Path]] = {}
    for f in sorted({f for p in paths for f in p.rglob("predictions.jsonl")}):
        cfg = yaml.safe_load((f.parent / "config.yaml").read_text(encoding="utf-8"))
        label, seed = run_label(f.parent, cfg["method"], cfg.get("router_lr")), int(cfg["seed"])
        if seed in runs.get(label, {}):
            raise StatsError(f"two runs for {label} seed {seed}: {runs[label][seed]} and {f.parent}")
        runs.setdefault(label, {})[seed] = f.parent
    return scores_from_runs(runs, metric, part)


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Paired:
    """Differences a - b, by task: an array (seeds, instances) and whether instances are shared by seeds."""

    a: str
    b: str
    seeds: list[int]
    diffs: dict[str, np.ndarray]
    crossed: dict[str, bool]


def pair(scores: Scores, a: str, b: str) -> Paired:
    """Align ``a`` and ``b`` on their common seeds, tasks and instance ids."""
    for label in (a, b):
        if label not in scores:
            raise StatsError(f"no results for {label!r} (have: {sorted(scores)})")
    seeds = sorted(set(scores[a]) & set(scores[b]))
    if not seeds:
        raise StatsError(f"{a} and {b} share no seed ({sorted(scores[a])} vs {sorted(scores[b])})")
    tasks = sorted(set.intersection(*(set(scores[x][s]) for x in (a, b) for s in seeds)))
    if not tasks:
        raise StatsError(f"{a} and {b} share no task on seeds {seeds}")
    diffs, crossed = {}, {}
    for t in tasks:
        ids = [sorted(set(scores[a][s][t]) & set(scores[b][s][t])) for s in seeds]
        if len({len(i) for i in ids}) != 1 or not ids[0]:
            raise StatsError(f"task {t}: {a} and {b} do not share the same number of instances on every seed")
        diffs[t] = np.array([[scores[a][s][t][i] - scores[b][s][t][i] for i in ii] for s, ii in zip(seeds, ids)])
        crossed[t] = all(i == ids[0] for i in ids)
    return Paired(a, b, seeds, diffs, crossed)


def _draw_means(d: np.ndarray, crossed: bool, seed_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B,) bootstrap means of one task's (S, n) differences for the (B, S) drawn seeds."""
    B, S = seed_idx.shape
    n = d.shape[1]
    if crossed:
        inst = rng.integers(0, n, size=(B, 1, n))  # one draw of instances for all the drawn seeds
    else:
        inst = rng.integers(0, n, size=(B, S, n))  # each drawn seed its own instances
    return d[seed_idx[:, :, None], inst].mean(axis=(1, 2))  # (B, S, n) -> (B,)


def bootstrap(p: Paired, n_boot: int = 4000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of the mean difference, per task and over all tasks (``OVERALL``).

    Every task uses the same drawn seeds in a replicate, so the overall interval keeps the seeds' shared part.
    """
    rng = np.random.default_rng(seed)
    S = len(p.seeds)
    seed_idx = rng.integers(0, S, size=(n_boot, S))
    means = {t: _draw_means(d, p.crossed[t], seed_idx, rng) for t, d in p.diffs.items()}
    weights = np.array([d.shape[1] for d in p.diffs.values()], dtype=float)
    means[OVERALL] = np.stack(list(means.values()), axis=1) @ (weights / weights.sum())  # (B, T) @ (T,)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in means.items()}


def sign_test(values: list[float]) -> tuple[int, int, float]:
    """(above, below, two-sided exact binomial p) over non-zero values."""
    pos, neg = sum(v > 0 for v in values), sum(v < 0 for v in values)
    n = pos + neg
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(pos, neg) + 1)) / 2**n
    return pos, neg, min(1.0, 2 * tail)


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a table to 10, then a series; error < 3e-3)."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
    if df <= 10:
        return table[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean of the per-seed differences (None with one seed): a check on the bootstrap,
    which with few seeds is too narrow (it cannot draw a seed mean outside the observed ones)."""
    if len(values) < 2:
        return None
    m, half = statistics.fmean(values), t_quantile(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m - half, m + half


def per_seed_means(p: Paired) -> dict[str, list[float]]:
    """Mean difference of each seed, per task and over all tasks (instance-weighted)."""
    out = {t: d.mean(axis=1).tolist() for t, d in p.diffs.items()}
    total = sum(d.sum(axis=1) for d in p.diffs.values())
    out[OVERALL] = (total / sum(d.shape[1] for d in p.diffs.values())).tolist()
    return out


def compare(scores: Scores, a: str, b: str, n_boot: int = 4000) -> list[dict]:
    """One row per task and one over all tasks: mean, CI, sign test, resolved."""
    p = pair(scores, a, b)
    ci, seeds = bootstrap(p, n_boot), per_seed_means(p)
    rows = []
    for key in [*p.diffs, OVERALL]:
        d = p.diffs.get(key)
        mean = statistics.fmean(seeds[key])  # every seed has the same instances: the mean over all pairs
        above, below, pval = sign_test(seeds[key])
        n = d.shape[1] if d is not None else sum(x.shape[1] for x in p.diffs.values())
        lo, hi = ci[key]
        rows.append(dict(a=a, b=b, task=key, mean=mean, lo=lo, hi=hi, above=above, below=below, p=pval,
                         n_seeds=len(p.seeds), n_instances=n, t=t_interval(seeds[key])))  # fmt: skip
        t = rows[-1]["t"]
        rows[-1]["boot_resolved"] = lo > 0 or hi < 0
        rows[-1]["resolved"] = rows[-1]["boot_resolved"] and t is not None and (t[0] > 0 or t[1] < 0)  # >= 2 seeds
    return rows


def sentence(row: dict, metric: str = "ROUGE-L", where: str = "unseen tasks") -> str:
    """One sentence on a comparison's overall row: the estimate, its interval, and whether it is resolved."""
    a, b, S = row["a"], row["b"], row["n_seeds"]
    head = (
        f"{a} − {b}, {metric} on {where}: {row['mean']:+.2f} (95% CI {row['lo']:+.2f} to {row['hi']:+.2f}; "
        f"{S} seed{'s' if S != 1 else ''} × {row['n_instances']} instances)"
    )
    t = row.get("t")
    if row["resolved"]:
        side = "above" if row["mean"] > 0 else "below"
        verdict = (f"resolved: the interval and the t-interval over the seed means ({t[0]:+.2f} to {t[1]:+.2f}) "
                   f"exclude 0, {a} is {side} {b}")  # fmt: skip
    elif row["boot_resolved"] and t is None:
        verdict = (
            "not resolved: one seed; the interval excludes 0 for this seed's instances, which says nothing of others"
        )
    elif row["boot_resolved"]:
        verdict = (f"not resolved: the bootstrap interval excludes 0 but the t-interval over the seed means "
                   f"({t[0]:+.2f} to {t[1]:+.2f}) does not")  # fmt: skip
    else:
        verdict = "not resolved: the interval includes 0"
    signs = f"{a} above on {row['above']} of {S} seeds, below on {row['below']}"
    if S > 1:
        signs += f" (sign test p = {row['p']:.3f}" + (
            f"; {S} seeds cannot give less than {2 / 2**S:.3f})" if S <= 5 else ")"
        )
    return f"{head}: {verdict}; {signs}."


def simulate_coverage(
    n_seeds: int, seed_sd: float, instance_sd: float, noise_sd: float, reps: int = 200, tasks: int = 14, n: int = 20
) -> tuple[float, float]:
    """How often the bootstrap interval and the t-interval cover a true difference of 0, for differences
    ``seed effect + instance effect (shared by the seeds) + noise`` on the unseen-task design."""
    rng = np.random.default_rng(0)
    covered = np.zeros(2)
    for r in range(reps):
        seed_eff, inst = rng.normal(0, seed_sd, n_seeds), rng.normal(0, instance_sd, (tasks, n))
        diffs = {
            f"t{t}": seed_eff[:, None] + inst[t][None, :] + rng.normal(0, noise_sd, (n_seeds, n)) for t in range(tasks)
        }
        p = Paired("a", "b", list(range(n_seeds)), diffs, dict.fromkeys(diffs, True))
        lo, hi = bootstrap(p, 1000, seed=r)[OVERALL]
        t_lo, t_hi = t_interval(per_seed_means(p)[OVERALL])
        covered += [lo <= 0 <= hi, t_lo <= 0 <= t_hi]
    return float(covered[0] / reps), float(covered[1] / reps)


def coverage_table(reps: int = 200) -> str:
    """Markdown: simulated coverage of both intervals at 3 and 5 seeds, for a few variance mixes."""
    lines = [
        "| seeds | seed sd | instance sd | noise sd | bootstrap covers | t-interval covers |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for S in (3, 5):
        for sds in ((0, 5, 20), (1, 5, 20), (3, 5, 20), (2, 15, 10)):
            b, t = simulate_coverage(S, *sds, reps=reps)
            lines.append(f"| {S} | {sds[0]} | {sds[1]} | {sds[2]} | {b:.3f} | {t:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Tables


def _fmt(v: float) -> str:
    return f"{v:+.2f}"


def _verdict(row: dict) -> str:
    if row["resolved"]:
        return "yes"
    return "no (1 seed)" if row["t"] is None and row["boot_resolved"] else "no"


def comparison_table(rows: list[dict]) -> str:
    """Markdown: one line per (comparison, task)."""
    lines = [
        "| comparison | task | mean diff | 95% CI (bootstrap) | 95% t-interval (seed means) | seeds above / below "
        "| sign test p | resolved |",
        "|---|---|---:|---|---|---|---:|---|",
    ]
    for r in rows:
        task = f"**{r['task']}**" if r["task"] == OVERALL else r["task"]
        t = "-" if r.get("t") is None else f"[{_fmt(r['t'][0])}, {_fmt(r['t'][1])}]"
        lines.append(
            f"| {r['a']} − {r['b']} | {task} | {_fmt(r['mean'])} | [{_fmt(r['lo'])}, {_fmt(r['hi'])}] | {t} | "
            f"{r['above']} / {r['below']} | {r['p']:.3f} | {_verdict(r)} |"
        )
    return "\n".join(lines)


def means_table(scores: Scores, labels: list[str]) -> str:
    """Markdown: each label's mean score per task and over all tasks (mean ± sd over seeds)."""
    tasks = sorted({t for lab in labels for s in scores[lab].values() for t in s})
    head = "| task | " + " | ".join(f"{lab} ({len(scores[lab])})" for lab in labels) + " |"
    lines = [head, "|---|" + "---:|" * len(labels)]

    def cell(lab: str, task: str | None) -> str:
        vals = []
        for per_task in scores[lab].values():
            inst = [v for t, d in per_task.items() if task in (None, t) for v in d.values()]
            if inst:
                vals.append(statistics.fmean(inst))
        if not vals:
            return "-"
        return f"{vals[0]:.2f}" if len(vals) == 1 else f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(cell(lab, t) for lab in labels) + " |")
    lines.append(f"| **{OVERALL}** | " + " | ".join(cell(lab, None) for lab in labels) + " |")
    return "\n".join(lines)


def report(scores: Scores, pairs: list[tuple[str, str]], metric: str, where: str, n_boot: int = 4000) -> str:
    """The means table, then each available comparison's table and sentence (Markdown)."""
    order = ["copy-input", "base", "lora", "poly", "mhr", "mode", "molora", "orchmoe", "orchmoe-frozen"]
    labels = sorted(scores, key=lambda lab: (order.index(lab) if lab in order else len(order), lab))
    parts = [f"### {metric} on {where} (mean ± sd over seeds; seeds in brackets)", "", means_table(scores, labels)]
    legend = ("Paired on seed and instance; 95% CI: bootstrap over seeds, then instances within tasks; resolved: "
              "that CI and the t-interval over the seed means both exclude 0.")  # fmt: skip
    if any(a in scores and b in scores for a, b in pairs):
        parts += ["", legend]
    for a, b in pairs:
        if a not in scores or b not in scores or not set(scores[a]) & set(scores[b]):
            continue
        rows = compare(scores, a, b, n_boot)
        parts += ["", f"#### {a} − {b}", "", comparison_table(rows), "", sentence(rows[-1], metric, where)]
    return "\n".join(parts) + "\n"


METRICS = {"rougeL": "ROUGE-L", "exact_match": "EM", "rougeLsum": "ROUGE-Lsum", "rouge1": "ROUGE-1"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="folders (searched recursively) or results.json files")
    ap.add_argument("--part", default="unseen14", help="unseen_eval's folder name, or seen / unseen (runs' own)")
    ap.add_argument("--metric", default="rougeL", choices=sorted(METRICS))
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help="a:b comparisons (those with results run)")
    ap.add_argument("--tasks", default=None, help="only these tasks (comma-separated)")
    ap.add_argument("--n-boot", type=int, default=4000)
    ap.add_argument("--out", default=None, help="also write the report to this Markdown file")
    ap.add_argument("--simulate", type=int, default=0, metavar="REPS", help="print the intervals' simulated coverage")
    args = ap.parse_args(argv)
    if args.simulate:
        print(coverage_table(args.simulate))
        return 0
    if not args.paths:
        ap.error("name folders or results.json files (or --simulate REPS)")
    paths = [Path(x) for x in args.paths]
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        ap.error(f"no such file or folder: {', '.join(missing)}")
    pairs = [tuple(x.split(":", 1)) for x in args.pairs.split(",") if ":" in x]
    if args.part in ("seen", "unseen"):
        scores, where = load_run_predictions(paths, args.metric, args.part), f"{args.part} tasks (runs' own eval)"
    else:
        scores, where = load_unseen_results(paths, args.metric, args.part), f"test-split tasks ({args.part})"
    if args.tasks:
        keep = {t.strip() for t in args.tasks.split(",") if t.strip()}
        scores = {
            lab: {s: {t: d for t, d in per.items() if t in keep} for s, per in by.items()} for lab, by in scores.items()
        }
        where += f", {len(keep)} named tasks"
    if not scores:
        print(f"error: no results found under {', '.join(map(str, paths))}", file=sys.stderr)
        return 2
    try:
        text = report(scores, pairs, METRICS[args.metric], where, args.n_boot)
        if args.part not in ("seen", "unseen"):
            text += "\n#### Empty predictions (generation ended at once), over seeds\n\n"
            text += empty_table(empty_predictions(paths, args.part)) + "\n"
    except StatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        from orchmoe.utils.fileio import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
