"""What the Task Router learns versus what it inherits from the prompt summary.

For each run folder, pi(x) over the training prompts of every seen task (its held-out instances,
then training ones, up to --per-task), and the agreement of argmax pi with the true task:

* ``step 0``: a fresh adapter built exactly as the run built it (same options, same seed), its
  Task Router's prompt statistics gathered over the run's training prompts but no weight updated:
  what a random router makes of the standardised prompt summary;
* ``trained``: the run's final adapter;

and a run trained with the allocation logits frozen (``--router-lr 0``) as a third row: its Task
Router gets no gradient through uniform allocations, so what it shows is inherited, not learned.

    python benchmarks/routing_control.py runs/main runs/main-frozen
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from orchmoe import config_from_dict, get_model, load_adapter  # noqa: E402
from orchmoe.core.diagnostics import allocation_spread, nmi_chance, normalized_mutual_info  # noqa: E402
from orchmoe.data import encode_prompt  # noqa: E402
from orchmoe.loading.pretrained import (
    is_encoder_decoder,  # noqa: E402
    load_model_and_tokenizer,
)
from orchmoe.recipe.args import DataArguments  # noqa: E402
from orchmoe.recipe.run_data import build_data, data_arguments  # noqa: E402
from orchmoe.recipe.run_folder import RunFolder  # noqa: E402
from orchmoe.utils.markdown import markdown_table  # noqa: E402


def prompts_of(
    prompt: DataArguments, data, tokenizer, decoder_only: bool, per_task: int
) -> tuple[list[list[int]], list[int]]:
    """Up to ``per_task`` prompts of every seen task (held-out instances first) and their task ids."""
    picked: dict[str, list] = {t: [] for t in data.seen_tasks}
    for ex in list(data.eval) + list(data.train):
        if len(picked[ex.task]) < per_task:
            picked[ex.task].append(ex)
    ids, tasks = [], []
    for t, examples in picked.items():
        for ex in examples:
            ids.append(
                encode_prompt(
                    tokenizer,
                    data.task_defs[t],
                    ex.input,
                    decoder_only=decoder_only,
                    n_pos=prompt.n_pos,
                    max_source_len=prompt.max_source_len,
                    chat_template=prompt.chat_template,
                )
            )
            tasks.append(data.task_to_id[t])
    return ids, tasks


@torch.no_grad()
def task_probs(model, prompts: list[list[int]], batch: int = 32, gather_statistics: bool = False) -> torch.Tensor:
    """pi(x) of every prompt (N, K); with ``gather_statistics`` the Task Router first folds the prompts into
    its running statistics (as training forwards would), without changing any weight."""
    router = model.task_router
    out = []
    for stats_pass in [True, False] if gather_statistics else [False]:
        router.train(stats_pass)
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            n = max(len(p) for p in chunk)
            ids = torch.tensor([p + [0] * (n - len(p)) for p in chunk])
            mask = torch.tensor([[1] * len(p) + [0] * (n - len(p)) for p in chunk])
            pi = model.task_probabilities(ids, mask)
            if not stats_pass:
                out.append(pi.float())
    router.eval()
    return torch.cat(out)


def describe(label: str, pi: torch.Tensor, tasks: list[int], model) -> list:
    top = pi.argmax(-1).tolist()
    entropy = float(-(pi * pi.clamp_min(1e-12).log()).sum(-1).mean())
    return [
        label,
        round(normalized_mutual_info(top, tasks), 3),
        round(nmi_chance(top, tasks, 100), 3),
        f"{len(set(top))} of {pi.shape[1]}",
        round(entropy, 3),
        round(allocation_spread(model), 4),
    ]


def rows_for(run: Path, per_task: int, with_step0: bool) -> list[list]:
    folder = RunFolder(run)
    cfg, resolved = folder.read_config()
    data_args = data_arguments(cfg)
    prompt = data_args  # n_pos, max_source_len, chat_template: how the run built its prompts
    data = build_data(data_args, int(cfg.get("seed", 0)))
    rows = []
    if with_step0:
        from accelerate.utils import set_seed

        base, tok, info = load_model_and_tokenizer(cfg.get("model"), dtype=cfg.get("dtype", "auto"))
        set_seed(int(cfg.get("seed", 0)))  # the adapter initialisation of the run
        fresh = get_model(base, config_from_dict(resolved["adapter"]), info["name"]).eval()
        prompts, tasks = prompts_of(prompt, data, tok, not is_encoder_decoder(base), per_task)
        rows.append(
            describe(
                f"{run.name}: step 0 (statistics only)",
                task_probs(fresh, prompts, gather_statistics=True),
                tasks,
                fresh,
            )
        )
    base, tok, info = load_model_and_tokenizer(cfg.get("model"), dtype=cfg.get("dtype", "auto"))
    trained = load_adapter(base, folder.adapter_dir).eval()
    prompts, tasks = prompts_of(prompt, data, tok, not is_encoder_decoder(base), per_task)
    frozen = cfg.get("router_lr") == 0
    rows.append(
        describe(
            f"{run.name}: trained" + (" (allocation logits frozen)" if frozen else ""),
            task_probs(trained, prompts),
            tasks,
            trained,
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="OrchMoE run folders (the first also gets the step-0 row)")
    ap.add_argument("--per-task", type=int, default=32, help="prompts per task")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for i, run in enumerate(args.runs):
        rows += rows_for(Path(run), args.per_task, with_step0=i == 0)
    print(
        markdown_table(
            [
                "run / state",
                "NMI(argmax π, task)",
                "NMI by chance",
                "abstract tasks used",
                "mean entropy of π",
                "allocation spread",
            ],
            rows,
            ["l", "r", "r", "l", "r", "r"],
            digits=3,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
