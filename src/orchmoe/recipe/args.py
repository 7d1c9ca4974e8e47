"""The options of a training run: dataclasses that `transformers.HfArgumentParser` reads (flags and YAML).

Four groups, each checked where it is defined (its ``__post_init__``): the base model and method
(`ModelArguments`), the data and prompts (`DataArguments`), the evaluation by generation
(`EvalArguments`), and `OrchmoeTrainingArguments`, which *is* ``transformers.TrainingArguments`` (every
spelling the Hugging Face stack knows works as it is: ``--learning_rate``, ``--per_device_train_batch_size``,
``--bf16``, ``--report_to tensorboard wandb``, ...) with the recipe's defaults and its short names
(``--lr``, ``--batch-size``, ``--epochs``, ``--out``) as aliases, as TRL's ``SFTConfig`` does. The method's own
options (``--rank``, ``--n-skills``, also ``--adapter.rank``) are a dataclass generated from the chosen
method's config (`method_arguments`), so ``--help`` shows the chosen method's options only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from orchmoe.core.config import AdapterConfig, ConfigError
from orchmoe.core.registry import METHODS, config_class

__all__ = [
    "ArgumentsError",
    "DataArguments",
    "EvalArguments",
    "ModelArguments",
    "OrchmoeTrainingArguments",
    "RECIPE_SET",
    "RESUME_FREE",
    "method_arguments",
]

#: adapter fields the recipe sets from the data, never the user
RECIPE_SET = ("n_tasks",)
#: options that do not change the trained weights: they may differ when a run is resumed
RESUME_FREE = {
    "output_dir",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "resume",
    "overwrite",
    "eval",
    "per_device_eval_batch_size",
    "max_new_tokens",
    "disable_tqdm",
    "unseen_tasks",
    "unseen_per_task",
    "report_to",
}
#: trackers and the module each needs (checked before anything is trained)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class ArgumentsError(ValueError):
    """An option that cannot be used as given (one line naming it; the CLI exits with code 2)."""


def opt(default: Any, help: str, *aliases: str, choices: tuple | None = None) -> Any:
    """A field with its help text and extra flag spellings (HfArgumentParser reads ``aliases`` and ``choices``)."""
    meta: dict[str, Any] = {"help": help}
    if aliases:
        meta["aliases"] = list(aliases)
    if choices:
        meta["choices"] = list(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _at_least(owner: str, name: str, value: Any, low: float, strict: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ArgumentsError(f"{owner}: {name} must be a finite number, got {value!r}")
    if value is not None and (value <= low if strict else value < low):
        raise ArgumentsError(f"{owner}: {name} must be {'>' if strict else '>='} {low:g}, got {value!r}")


@dataclass
class ModelArguments:
    """The base model and the method."""

    _argument_group_name = "model and method"

    model: str | None = opt(
        None,
        "base model: a checkpoint folder, a .gguf file or a cached hub id (default SmolLM2-135M-Instruct)",
        "--model_name_or_path",
        "--model-name-or-path",
    )
    dtype: str = opt(
        "auto",
        "dtype of the frozen base weights (auto: bfloat16 on a GPU, float32 on CPU)",
        "--torch_dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    method: str = opt("orchmoe", "adapter method", choices=tuple(sorted(METHODS)))
    budget_rank: int | None = opt(None, "size the method to the trainable parameters of a LoRA of this rank")
    budget_vary: str = opt("rank", "which adapter field --budget-rank varies", choices=("rank", "n_skills"))
    budget_tolerance: float = opt(0.1, "relative tolerance of the budget match")
    init_lora: str | None = opt(None, "a PEFT LoRA folder every skill starts equal to")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ArgumentsError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        _at_least("--budget-rank", "budget_rank", self.budget_rank, 1)
        _at_least("--budget-tolerance", "budget_tolerance", self.budget_tolerance, 0, strict=True)
        if not self.budget_tolerance < 1:
            raise ArgumentsError(f"--budget-tolerance: budget_tolerance must be < 1, got {self.budget_tolerance!r}")


@dataclass
class DataArguments:
    """The tasks, their instances, and how prompts are built."""

    _argument_group_name = "data and prompts"

    data: str = opt(
        "builtin",
        "tasks: a SuperNI checkout (tasks/ + splits/), 'builtin' (the embedded suite), or a "
        "file/folder/dataset id of instruction data",
        "--data_dir",
        "--dataset",
    )
    tasks: str = opt(
        "all",
        "seen tasks: a number N (drawn from the train split), 'all', comma-separated names, a "
        "file of names or a split name",
    )
    task_column: str | None = opt(None, "instruction data: the column naming each row's task")
    task_seed: int | None = opt(None, "seed of the task draw when --tasks is a number (default: --seed)")
    split: str = opt("default", "split folder under splits/")
    train_per_task: str = opt("40", "training instances per seen task ('all': every remaining instance)")
    eval_per_task: int = opt(12, "held-out evaluation instances per seen task (disjoint from training)")
    unseen_tasks: str = opt("all", "unseen test-split tasks to score: 'all', a number, 0 for none, or names")
    unseen_per_task: int = opt(12, "evaluation instances per unseen task (the first ones, as in SuperNI)")
    allow_fewer_train: bool = opt(False, "keep tasks with fewer than train+eval instances (train on what is left)")
    n_pos: int = opt(1, "positive demonstrations in the prompt (Tk-Instruct: 2)", "--num_pos_examples")
    max_source_len: int = opt(
        160, "prompt token budget (demonstrations dropped, then definition cut)", "--max_source_length"
    )
    max_target_len: int = opt(24, "answer token budget in training (eos included)", "--max_target_length")
    chat_template: bool = opt(False, "wrap prompts in the tokenizer's chat template (decoder-only)")

    def __post_init__(self) -> None:
        for name, low in (
            ("eval_per_task", 0),
            ("unseen_per_task", 1),
            ("n_pos", 0),
            ("max_source_len", 1),
            ("max_target_len", 1),
            ("task_seed", 0),
        ):
            _at_least(f"--{name.replace('_', '-')}", name, getattr(self, name), low)
        self.train_per_task = _count_or_all("--train-per-task", self.train_per_task)
        text = str(self.tasks).strip()
        if not text:
            raise ArgumentsError("--tasks is empty: a number, 'all', names, a file of names or a split")
        if text.isdigit() and int(text) < 1:
            raise ArgumentsError(f"--tasks: a number of tasks must be >= 1, got {text}")


def _count_or_all(name: str, value: Any) -> int | None:
    """'all' -> None (every instance), else a non-negative integer."""
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ArgumentsError(f"{name} must be a whole number or 'all', got {value!r}") from None
    _at_least(name, name.lstrip("-"), n, 0)
    return n


@dataclass
class EvalArguments:
    """The evaluation by generation after training (and of `orchmoe eval`)."""

    _argument_group_name = "evaluation"

    eval: bool = opt(True, "evaluate after training (--no-eval to skip)")
    max_new_tokens: int | None = opt(
        None, "generation length at evaluation (default: max_target_len)", "--generation_max_length"
    )
    resume: bool = opt(True, "continue from the latest checkpoint in the run folder (--no-resume to refuse)")
    overwrite: bool = opt(
        False, "delete a previous run in the run folder first (only the files orchmoe wrote)", "--overwrite_output_dir"
    )

    def __post_init__(self) -> None:
        _at_least("--max-new-tokens", "max_new_tokens", self.max_new_tokens, 1)


@dataclass
class OrchmoeTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with the recipe's defaults, short aliases and ``router_lr``.

    ``max_steps 0`` is the untrained baseline (the Trainer itself reads 0 as "unset"); ``save_steps 0`` writes
    no checkpoint; ``mixed_precision`` is the 0.2 spelling of ``--bf16`` / ``--fp16``.
    """

    _argument_group_name = "training (transformers.TrainingArguments)"

    output_dir: str = opt("runs/orchmoe", "the run folder", "--out")
    learning_rate: float = opt(1e-3, "learning rate of the experts", "--lr")
    router_lr: float | None = opt(
        0.1,
        "learning rate of the task-skill allocation logits (Poly/MHR/OrchMoE; 0.1 with adapters at 1e-3, as "
        "the references; 0 freezes them)",
    )
    per_device_train_batch_size: int = opt(8, "examples per process per micro-batch", "--batch-size")
    per_device_eval_batch_size: int = opt(16, "prompts per generation batch", "--eval-batch-size")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", "--grad-accum")
    num_train_epochs: float = opt(1.0, "passes over the training data (unless max_steps is set)", "--epochs")
    max_steps: int = opt(-1, "optimizer steps to run (0: no training, the untrained baseline; -1: epochs)")
    warmup_steps: float = opt(
        0.06, "warm-up steps, or a fraction of the steps when below 1", "--warmup-ratio", "--warmup_ratio"
    )
    lr_scheduler_type: str = opt("linear", "learning-rate schedule", "--schedule")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: none)")
    seed: int = opt(0, "seed of task/instance sampling, adapter init, batch order and routing noise")
    save_steps: float = opt(200, "optimizer steps between checkpoints (0: none)", "--checkpoint-every")
    save_total_limit: int | None = opt(2, "checkpoints kept (older ones deleted)", "--keep-checkpoints")
    logging_steps: float = opt(10, "optimizer steps between train_log.jsonl records", "--log-every")
    report_to: list[str] = opt(["none"], "trackers: none, all, or names (tensorboard wandb mlflow ...)")
    mixed_precision: str = opt(
        "auto",
        "auto (bf16 on a GPU that has it, else fp16; none on CPU), no, bf16, fp16 (also --bf16 / --fp16)",
        choices=("auto", "no", "bf16", "fp16"),
    )
    disable_tqdm: bool = opt(False, "no progress bars", "--no-progress", "--no_progress")

    def __post_init__(self) -> None:
        if self.mixed_precision == "auto" and not (self.bf16 or self.fp16):
            self.mixed_precision = _auto_precision()
        if self.mixed_precision in ("bf16", "fp16"):
            self.bf16, self.fp16 = self.mixed_precision == "bf16", self.mixed_precision == "fp16"
        self.no_training = self.max_steps == 0
        if self.save_steps == 0:
            self.save_strategy, self.save_steps = "no", 500
        if self.router_lr is not None:
            _at_least("--router-lr", "router_lr", self.router_lr, 0)
        _at_least("--lr", "learning_rate", self.learning_rate, 0, strict=True)
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "num_train_epochs", "adam_epsilon", "save_steps"):
            _at_least(f"--{name.replace('_', '-')}", name, float(getattr(self, name)), 0)
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "save_total_limit",
        ):
            _at_least(f"--{name.replace('_', '-')}", name, getattr(self, name), 1)
        _at_least("--seed", "seed", self.seed, 0)
        if self.seed >= 2**32:  # numpy's generators (seeded by the Trainer) take 32 bits
            raise ArgumentsError(f"--seed: seed must be < 2**32 (4294967296), got {self.seed}")
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ArgumentsError(
                "--warmup-steps: warmup_steps must be a ratio in [0, 1) or a whole number of steps, got "
                f"{self.warmup_steps}"
            )
        _at_least("--logging-steps", "logging_steps", float(self.logging_steps), 0, strict=True)
        if not self.output_dir or not str(self.output_dir).strip():
            raise ArgumentsError("--out (output_dir) is empty: name the run folder")
        if self.max_steps < -1:
            raise ArgumentsError(f"--max-steps must be >= 0 (or -1: by epochs), got {self.max_steps}")
        if str(getattr(self.optim, "value", self.optim)) not in ("adamw_torch", "adamw_torch_fused") or self.optim_args:
            raise ArgumentsError(
                f"--optim {getattr(self.optim, 'value', self.optim)}{' --optim_args' if self.optim_args else ''}: "
                "orchmoe's recipe trains with AdamW in the references' two-speed groups (orchmoe.RoutedAdamW: "
                "--learning_rate, --router_lr, --weight_decay, --adam_beta1/2, --adam_epsilon); for another optimiser "
                "use a transformers Trainer with orchmoe.create_routed_optimizer(model, optimizer_cls, ...)"
            )
        if self.deepspeed:
            raise ArgumentsError(
                "--deepspeed: not supported by orchmoe's recipe (ZeRO partitions and saves the model it wraps whole; "
                "the adapter-only checkpoints and the routers' state are not wired to it); use DDP or --fsdp on GPUs"
            )
        self.remove_unused_columns = False  # task_ids travel with the batches
        if str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no":
            raise ArgumentsError(
                "--eval_strategy: orchmoe's recipe evaluates by generation with the official scores after training "
                "(--eval / --no_eval; `orchmoe eval RUN` for a checkpoint); the Trainer's loss evaluation is not run"
            )
        if not _has_accelerator():
            self.use_cpu = True  # explicit, so bf16/fp16 checks and device placement agree with the machine
            if self.fsdp:
                raise ArgumentsError(
                    "--fsdp: the Trainer's FSDP (accelerate's) needs GPUs; on this machine it would silently run DDP. "
                    "Use several processes without --fsdp (torchrun --nproc_per_node N -m orchmoe train ...)"
                )
        super().__post_init__()
        self.disable_tqdm = bool(self.disable_tqdm)
        check_trackers(self.report_to)


def _auto_precision() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def check_trackers(report_to: Any) -> None:
    """Every tracker named must be one transformers knows and importable: an error before training starts, not a
    silent untracked run."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK and n not in ("none", "all")]
    if unknown:
        raise ArgumentsError(
            f"--report-to: unknown tracker {unknown[0]!r}; choose none, all, or from {sorted(INTEGRATION_TO_CALLBACK)}"
        )
    missing = [n for n in names if n in TRACKER_MODULES and importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing:
        raise ArgumentsError(
            f"--report-to {' '.join(names)}: {', '.join(missing)} is not installed (pip install {' '.join(missing)})"
        )


@functools.cache
def method_arguments(method: str) -> type:
    """A dataclass of ``method``'s own options (its config's fields, less the ones the recipe sets), for the parser;
    flags ``--NAME`` and ``--adapter.NAME``. Defaults are None: unset means the method's default."""
    cls = config_class(method)
    skip = {
        f.name
        for f in dataclasses.fields(AdapterConfig)
        if f.name not in ("target_modules", "rank", "alpha", "dropout")
    }
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in RECIPE_SET:
            continue
        typ = _flag_type(f)
        dash = f.name.replace("_", "-")
        aliases = sorted({f"--adapter.{f.name}", f"--adapter.{dash}"})
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})"
        fields.append((f.name, typ | None, field(default=None, metadata={"help": help_text, "aliases": aliases})))
    dc = dataclasses.make_dataclass(f"{cls.__name__}Options", fields)
    dc._argument_group_name = f"{method} options ({cls.__name__})"
    return dc


def _flag_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if name in text.split("|")[0]:
            return typ
    return str


def _default_text(f: dataclasses.Field) -> str:
    if f.name == "target_modules":
        return "the model type's attention projections"
    if f.default is None or f.default is dataclasses.MISSING:
        return "unset"
    return repr(f.default)


def adapter_config(method: str, options: Any, n_tasks: int) -> AdapterConfig:
    """The method's config from its parsed options (None: the method's default), fitted to ``n_tasks`` tasks."""
    cls = config_class(method)
    given = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
    if isinstance(given.get("target_modules"), str) and "," in given["target_modules"]:
        given["target_modules"] = [t.strip() for t in given["target_modules"].split(",") if t.strip()]
    try:
        return cls(**given).for_tasks(n_tasks, explicit=set(given))
    except (ConfigError, TypeError) as e:
        raise ArgumentsError(str(e)) from None
