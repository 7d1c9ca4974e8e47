"""What the recipe tests share besides fixtures: the tasks they train on and tiny model folders."""

from __future__ import annotations

from pathlib import Path

from helpers_tokenizer import make_tiny_tokenizer
from orchmoe.recipe.parse import RunOptions, parse_train_args
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
SEEN = ["task1426_country_independence_year", "task1318_country_national_dish", "task1582_bless_hypernym_generation"]
UNSEEN = "task645_summarization"

# The tiny run the recipe tests share (3 seen tasks x 12 instances, batches of 4, no checkpoints); each test
# passes only what it changes.
TINY_RUN = dict(
    tasks=",".join(SEEN),
    train_per_task=12,
    eval_per_task=3,
    unseen_tasks=UNSEEN,
    unseen_per_task=3,
    max_source_len=96,
    max_target_len=12,
    batch_size=4,
    lr=1e-2,
    checkpoint_every=0,
    progress=False,
)
# Fewer and shorter examples (the CLI tests' runs): 8 training and 2 evaluation instances a task.
SMALL_DATA = dict(train_per_task=8, eval_per_task=2, unseen_per_task=2, max_source_len=80, max_target_len=6)


def tiny_train_config(model: Path, data: Path, out: Path | str, *extra: str, **overrides) -> RunOptions:
    """`TINY_RUN` with `overrides` (option names) on top, parsed as `orchmoe train` parses them."""
    return parse_train_args(tiny_train_argv(model, data, out, *extra, **overrides)[1:])


def tiny_train_argv(model: Path, data: Path, out: Path | str, *extra: str, **overrides) -> list[str]:
    """The same run as `orchmoe train` arguments: an option is a flag (`--no-NAME` when False; left out when
    None, for the CLI's default), then `--out OUT` and `extra` as they are."""
    args = ["train", "--model", str(model), "--data", str(data)]
    for name, value in {**TINY_RUN, **overrides}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            args += [flag, str(value)]
    return [*args, "--out", str(out), *extra]


def save_tiny(path: Path, arch: str) -> Path:
    """A tiny random checkpoint folder (model + tokenizer) that `--model DIR` loads."""
    tok = make_tiny_tokenizer(add_eos=arch == "t5")
    tiny_model(arch, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path
