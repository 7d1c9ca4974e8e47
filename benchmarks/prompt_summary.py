"""How much of OrchMoE's prompt summary u(x) tells tasks apart, and what the Task Router sees of it.

For each data set: the norm of the mean summary against the mean norm of a prompt's deviation from
it, the share of that deviation's variance lying between tasks, and, for randomly initialised linear
routers (K abstract tasks), how much pi varies across prompts under each `prompt_norm`. No training.

    python benchmarks/prompt_summary.py                  # CPU-size SuperNI tasks and the builtin suite
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchmoe.core.diagnostics import normalized_mutual_info  # noqa: E402
from orchmoe.core.routers import TaskRouter  # noqa: E402
from orchmoe.data.builtin import builtin_data_dir, builtin_task_names  # noqa: E402
from orchmoe.data.prompts import encode_prompt  # noqa: E402
from orchmoe.data.superni import load_task  # noqa: E402
from orchmoe.loading.pretrained import load_model_and_tokenizer  # noqa: E402
from quality import CPU_TASKS, SHARED  # noqa: E402


def summaries(emb: torch.Tensor, tok, data, names: list[str], n_pos: int, per_task: int, max_len: int):
    """u(x) of the first `per_task` prompts of each task, (N, d), and their task labels."""
    rows, labels = [], []
    for t, name in enumerate(names):
        task = load_task(data, name)
        for inst in task.instances[:per_task]:
            ids = encode_prompt(tok, task, inst["input"], n_pos=n_pos, max_source_len=max_len)
            rows.append(emb[ids].mean(0))  # (d,)
            labels.append(t)
    return torch.stack(rows), labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-task", type=int, default=30)
    p.add_argument("--abstract-tasks", type=int, default=8)
    p.add_argument("--routers", type=int, default=5, help="random router initialisations per setting")
    args = p.parse_args(argv)
    model, tok, _ = load_model_and_tokenizer()
    emb = model.get_input_embeddings().weight.detach().float()  # (V, d)
    sets = [
        ("SuperNI, quality CPU size", SHARED, CPU_TASKS, 1),
        ("builtin suite", builtin_data_dir(), builtin_task_names("train"), 1),
    ]
    print(
        "| data | tasks | prompts | norm of mean u | mean norm of u - mean | between-task share of deviation variance |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    for label, data, names, n_pos in sets:
        u, y = summaries(emb, tok, data, names, n_pos, args.per_task, 160)
        mean, labels = u.mean(0), torch.tensor(y)
        within = sum(((u[labels == k] - u[labels == k].mean(0)) ** 2).sum() for k in set(y))
        total = ((u - mean) ** 2).sum()
        print(
            f"| {label} | {len(names)} | {len(y)} | {mean.norm():.3f} | {(u - mean).norm(dim=1).mean():.3f} | {1 - within / total:.3f} |"
        )
        results.append((label, u, y))
    print()
    print(
        f"Random linear Task Routers (K={args.abstract_tasks}, {args.routers} initialisations), statistics from the same prompts:"
    )
    print()
    print("| data | prompt_norm | std of pi across prompts | abstract tasks on top | NMI(top abstract task, task) |")
    print("|---|---|---|---|---|")
    for label, u, y in results:
        for norm in ("layernorm", "standardize"):
            stds, used, nmis = [], [], []
            for seed in range(args.routers):
                torch.manual_seed(seed)
                router = TaskRouter(u.shape[1], args.abstract_tasks, prompt_norm=norm)
                if norm == "standardize":
                    router.train().update_statistics(u)
                with torch.no_grad():
                    pi = router.eval()(u)  # (N, K)
                top = pi.argmax(-1).tolist()
                stds.append(pi.std(0).mean().item())
                used.append(len(set(top)))
                nmis.append(normalized_mutual_info(top, y))
            print(
                f"| {label} | {norm} | {min(stds):.3f}–{max(stds):.3f} | {min(used)}–{max(used)} | {min(nmis):.2f}–{max(nmis):.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
