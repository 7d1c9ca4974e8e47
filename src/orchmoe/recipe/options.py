"""Training options: one dataclass, set from the command line, a YAML/JSON file or Python.

Each option is a field of `TrainConfig` with a type annotation and metadata (help text, CLI group,
bounds, choices, aliases). Values from flags and files are coerced by the annotation (int, float,
bool, str, optional), checked against the bounds (finite, in range), and three domain parsers read
task selections. Names are the field names with dashes or underscores, plus the Hugging Face
`TrainingArguments` spellings (``learning_rate``, ``output_dir``, ``per_device_train_batch_size``, ...).

The adapter's own options are not copied here: they form the ``adapter`` section (YAML
``adapter: {rank: 4}``, flags ``--adapter.rank 4`` or ``--rank 4``), coerced and validated by the
chosen method's config dataclass (:mod:`orchmoe.recipe.adapter_options`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchmoe.core.registry import METHODS
from orchmoe.recipe.values import (
    TrainConfigError,
    as_bool,
    coerce_value,
    none_word,
    parse_count_or_all,
    parse_folder,
    parse_target_modules,
    parse_tasks,
    parse_unseen,
)

__all__ = [
    "TrainConfig",
    "TrainConfigError",
    "GROUPS",
    "SCHEDULES",
    "RESUME_FREE",
    "coerce_value",
    "option_names",
    "config_from_mapping",
    "load_config_file",
    "none_word",
    "adapter_fields",
    "adapter_field_names",
    "merge_adapter_section",
    "parse_target_modules",
    "yaml_error_line",
]

GROUPS = ("model and method", "data and prompts", "optimisation", "run folder, checkpoints, evaluation")
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "all")


def opt(
    default: Any,
    help: str,
    group: int,
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    parse: Callable[[str, Any], Any] | None = None,
) -> Any:
    """A `TrainConfig` field: its default, help text, CLI group (index into GROUPS), accepted aliases, and how
    its values are checked."""
    meta = {
        "help": help,
        "group": GROUPS[group],
        "aliases": aliases,
        "choices": choices,
        "ge": ge,
        "gt": gt,
        "lt": lt,
        "parse": parse,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of a training run. ``None`` means "the method's / library's default"."""

    # -- model and method --------------------------------------------------------------------------
    model: str | None = opt(
        None,
        "base model: a checkpoint dir, a .gguf file or a cached hub id (default SmolLM2-135M-Instruct)",
        0,
        aliases=("model_name_or_path",),
    )
    dtype: str | None = opt(
        "auto",
        "dtype of the frozen base weights (auto: bfloat16 on a GPU, float32 on CPU; none: float32)",
        0,
        choices=DTYPES,
        aliases=("torch_dtype",),
    )
    method: str = opt("orchmoe", "adapter method", 0, choices=lambda: tuple(sorted(METHODS)))
    adapter: dict = opt({}, "the method's own options (rank, n_skills, n_abstract_tasks, ...): --adapter.NAME VALUE", 0)
    budget_rank: int | None = opt(None, "size the method to the trainable parameters of a LoRA of this rank", 0, ge=1)
    budget_vary: str = opt(
        "rank", "which adapter field --budget-rank varies to meet the budget", 0, choices=("rank", "n_skills")
    )
    budget_tolerance: float = opt(0.1, "relative tolerance of the budget match", 0, gt=0, lt=1)
    # -- data and prompts ------------------------------------------------------------------------
    data: str = opt(
        "builtin",
        "tasks: a SuperNI checkout (tasks/ + splits/), 'builtin' (the embedded suite), or a "
        "file/folder/dataset id of instruction data",
        1,
        aliases=("data_dir", "dataset"),
    )
    tasks: Any = opt(
        "all",
        "seen tasks: a number N (drawn from the train split), 'all', comma-separated names, a "
        "file of names or a split name",
        1,
        parse=parse_tasks,
    )
    task_column: str | None = opt(
        None, "instruction data: the column naming each row's task (default: task_name, task, or one task per file)", 1
    )
    task_seed: int | None = opt(
        None,
        "seed of the task draw when --tasks is a number (default: --seed); fix it to keep the same tasks across seeds",
        1,
        ge=0,
    )
    split: str = opt("default", "split folder under splits/", 1)
    train_per_task: int | None = opt(
        40, "training instances per seen task ('all': every remaining instance)", 1, parse=parse_count_or_all
    )
    eval_per_task: int = opt(12, "held-out evaluation instances per seen task (disjoint from training)", 1, ge=0)
    unseen_tasks: Any = opt(
        "all", "unseen test-split tasks to score: 'all', a number, 0 for none, or names", 1, parse=parse_unseen
    )
    unseen_per_task: int = opt(12, "evaluation instances per unseen task (the first ones, as in SuperNI)", 1, ge=1)
    allow_fewer_train: bool = opt(False, "keep tasks with fewer than train+eval instances (train on what is left)", 1)
    n_pos: int = opt(
        1, "positive demonstrations in the prompt (Tk-Instruct: 2)", 1, ge=0, aliases=("num_pos_examples",)
    )
    max_source_len: int = opt(
        160,
        "prompt token budget (demonstrations dropped, then definition cut, when over)",
        1,
        ge=1,
        aliases=("max_source_length",),
    )
    max_target_len: int = opt(
        24, "answer token budget in training (eos included)", 1, ge=1, aliases=("max_target_length",)
    )
    max_new_tokens: int | None = opt(
        None, "generation length at evaluation (default: max_target_len)", 1, ge=1, aliases=("generation_max_length",)
    )
    chat_template: bool = opt(False, "wrap prompts in the tokenizer's chat template (decoder-only)", 1)
    # -- optimisation ------------------------------------------------------------------------------
    batch_size: int = opt(8, "examples per process per micro-batch", 2, ge=1, aliases=("per_device_train_batch_size",))
    length_window: int = opt(
        4,
        "batches per length-sorting window: 1 = no length grouping (tasks fully mixed in a "
        "batch); larger windows pad less but put fewer tasks in a batch",
        2,
        ge=1,
    )
    grad_accum: int = opt(1, "micro-batches per optimizer step", 2, ge=1, aliases=("gradient_accumulation_steps",))
    lr: float = opt(1e-3, "learning rate of the experts", 2, gt=0, aliases=("learning_rate",))
    router_lr: float | None = opt(
        0.1,
        "learning rate of the task-skill allocation logits (Poly/MHR/OrchMoE; two-speed "
        "as in the references: 0.1 with adapters at 1e-3; 0 freezes them; none: lr)",
        2,
        ge=0,
    )
    weight_decay: float = opt(0.0, "AdamW weight decay of the experts (routers get none)", 2, ge=0)
    warmup_ratio: float = opt(0.06, "warm-up as a fraction of the optimizer steps", 2, ge=0, lt=1)
    warmup_steps: int | None = opt(None, "warm-up steps (overrides warmup_ratio)", 2, ge=0)
    schedule: str = opt("linear", "learning-rate schedule", 2, choices=tuple(SCHEDULES), aliases=("lr_scheduler_type",))
    epochs: int = opt(
        1, "passes over the training data (ignored when max_steps is set)", 2, ge=0, aliases=("num_train_epochs",)
    )
    max_steps: int | None = opt(None, "optimizer steps to run (0: no training, an untrained baseline)", 2, ge=0)
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm (0 or none: no clipping)", 2, ge=0)
    mixed_precision: str = opt("auto", "auto (bf16/fp16 on GPU, no on CPU), no, bf16, fp16", 2, choices=MIXED_PRECISION)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)", 2)
    fsdp: bool = opt(
        False,
        "shard the base model and adapter across the processes (FSDP2, one unit per transformer "
        "block); needs several processes (torchrun / accelerate launch)",
        2,
    )
    seed: int = opt(0, "seed of task/instance sampling, adapter init, batch order and routing noise", 2, ge=0)
    # -- run folder, checkpoints, evaluation -------------------------------------------------------
    out: str = opt("runs/orchmoe", "run folder", 3, aliases=("output_dir",), parse=parse_folder)
    checkpoint_every: int = opt(200, "optimizer steps between checkpoints (0: none)", 3, ge=0, aliases=("save_steps",))
    keep_checkpoints: int = opt(2, "checkpoints kept (older ones deleted)", 3, ge=1, aliases=("save_total_limit",))
    log_every: int = opt(10, "optimizer steps between train_log.jsonl records", 3, ge=1, aliases=("logging_steps",))
    report_to: str = opt(
        "none", "experiment tracker (through accelerate): none, tensorboard, wandb, mlflow, all", 3, choices=TRACKERS
    )
    resume: bool = opt(True, "continue from the latest checkpoint in the run folder", 3)
    overwrite: bool = opt(False, "delete a previous run in the run folder first", 3, aliases=("overwrite_output_dir",))
    eval: bool = opt(True, "evaluate after training (--no-eval to skip)", 3)
    eval_batch_size: int = opt(16, "prompts per generation batch", 3, ge=1, aliases=("per_device_eval_batch_size",))
    progress: bool = opt(True, "show progress bars", 3)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce and check every field, then the combinations."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce_value(f, getattr(self, f.name)))
        if self.budget_rank is not None and self.budget_vary in self.adapter:
            raise TrainConfigError(
                f"--budget-rank sizes the adapter by varying {self.budget_vary}; do not also set "
                f"adapter.{self.budget_vary}"
            )

    @property
    def generation_tokens(self) -> int:
        return self.max_new_tokens or self.max_target_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that do not change the trained weights: they may differ when a run is resumed.
RESUME_FREE = {
    "out",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "resume",
    "overwrite",
    "eval",
    "eval_batch_size",
    "max_new_tokens",
    "progress",
    "unseen_tasks",
    "unseen_per_task",
    "report_to",
}
# Hugging Face TrainingArguments booleans that set one of our options to a value.
_FLAG_ALIASES = {
    "bf16": ("mixed_precision", "bf16"),
    "fp16": ("mixed_precision", "fp16"),
    "no_eval": ("eval", False),
    "disable_tqdm": ("progress", False),
}


# -- the adapter section ---------------------------------------------------------------------
# The adapter's options are the fields of the registered method configs: flags (``--adapter.rank``,
# ``--rank``), YAML keys (``adapter: {rank: 4}`` or a top-level ``rank: 4``) and help texts come from them.

# set by the recipe from the data, never by the user
RECIPE_SET = ("n_tasks",)


def adapter_fields() -> dict[str, dataclasses.Field]:
    """Every option of every registered method (the first method's field for a shared name)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in METHODS.values():
        for f in dataclasses.fields(cls):
            if f.name not in RECIPE_SET:
                out.setdefault(f.name, f)
    return out


def adapter_field_names() -> set[str]:
    return set(adapter_fields())


def merge_adapter_section(base: dict[str, Any], new: Any, origin: str) -> dict[str, Any]:
    """``base`` updated with the mapping ``new`` (dashes -> underscores); keys no method has are an error."""
    if new is None:
        return dict(base)
    if not isinstance(new, dict):
        raise TrainConfigError(
            f"{origin}: the adapter section must be a mapping of option names to values, got {new!r}"
        )
    known = adapter_field_names()
    out = dict(base)
    for key, value in new.items():
        k = str(key).replace("-", "_")
        if k in RECIPE_SET:
            raise TrainConfigError(
                f"{origin}: adapter.{k} is set from the data (the number of seen tasks); do not set it"
            )
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TrainConfigError(f"{origin}: unknown adapter option {key!r}{hint}; adapter options: {sorted(known)}")
        out[k] = value
    return out


# -- names, files ------------------------------------------------------------------------------


def option_names() -> dict[str, str]:
    """Every accepted name (field names and aliases, underscores) -> field name."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(TrainConfig):
        names[f.name] = f.name
        for a in f.metadata.get("aliases", ()):
            names[a] = f.name
    return names


def config_from_mapping(d: dict[str, Any], origin: str = "config") -> dict[str, Any]:
    """Validated options from a mapping (dashes allowed, aliases resolved); unknown keys are an error naming them
    with did-you-mean hints. Keys starting with ``_`` are informational (a run's config.yaml carries ``_resolved``).
    A key that is an adapter option (``rank``, ``n_skills``, ...) goes to the ``adapter`` section."""
    names = option_names()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    for key, value in d.items():
        k = str(key).replace("-", "_")
        if k.startswith("_"):
            continue
        if k in _FLAG_ALIASES:
            target, meaning = _FLAG_ALIASES[k]
            if as_bool(str(key), value):
                k, value = target, meaning
            else:
                continue
        if k not in names:
            if k == "adapter_args" or k in adapter_field_names():  # a flat adapter option, or the 0.1 spelling
                adapter = merge_adapter_section(adapter, value if k == "adapter_args" else {k: value}, origin)
                continue
            close = difflib.get_close_matches(k, list(names) + sorted(adapter_field_names()), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TrainConfigError(f"{origin}: unknown option {key!r}{hint}")
        target = names[k]
        try:
            out[target] = coerce_value(fields[target], value, name=str(key))
        except TrainConfigError as e:
            raise TrainConfigError(f"{origin}: {e}") from None
    if adapter or "adapter" in out:
        out["adapter"] = merge_adapter_section(adapter, out.get("adapter", {}), origin)
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML or JSON file (YAML is a superset of JSON); a key given twice is an error."""
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"config file {str(p)!r} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise TrainConfigError(f"config file {p}: not valid YAML/JSON: {yaml_error_line(e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"config file {p}: the top level must be a mapping of option names to values")
    return config_from_mapping(raw, origin=f"config file {p}")


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else " ".join(what.split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice (instead of silently keeping the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
