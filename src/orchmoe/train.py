"""The training recipe: multi-task SuperNI fine-tuning of a routed adapter on `accelerate`.

A thin layer over the library: `TrainConfig` holds every option (settable from a YAML/JSON
file, CLI flags override the file), `train(cfg)` builds the data, the adapter, two-speed
optimiser groups and the schedule, runs the loop and evaluates.

Why the loop is written by hand rather than with a prepared DataLoader: exact resumption.
The batch order of an epoch is a pure function of ``(seed, epoch)`` (length-grouped global
batches of ``batch_size * num_processes`` examples, each process taking every W-th example of
a global batch), and checkpoints are taken on optimizer-step boundaries, so a run killed at
any point resumes from its latest checkpoint to bit-identical final weights.

Run folder (``--out``)::

    config.yaml            the resolved configuration (re-usable with --config)
    train_log.jsonl        one JSON record per `log_every` optimizer steps
    checkpoints/step-N/    adapter/, optimizer.pt, scheduler.pt, rng_state_<rank>.pth, trainer_state.json
    adapter/               the final adapter (safetensors + adapter_config.json with task metadata)
    train_summary.json     steps, examples, tokens, wall time, parameter counts
    predictions.jsonl, metrics.json, metrics.md   (see orchmoe.evaluate)
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

__all__ = [
    "TrainConfig", "TrainConfigError", "train", "load_config_file", "config_from_mapping", "build_data",
    "build_adapter_config", "epoch_batches", "rank_slice", "latest_checkpoint", "CHECKPOINT_DIR",
]

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class TrainConfigError(ValueError):
    """A training option that cannot be used (unknown key, wrong type, impossible combination)."""


def _f(default: Any, help: str, kind: str, **extra: Any) -> Any:
    """A dataclass field that also describes its CLI flag and how to parse/validate it."""
    meta = {"help": help, "kind": kind, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Adapter fields with their own flags; any other method field goes through adapter_args.
ADAPTER_FIELDS = ("rank", "n_skills", "n_abstract_tasks", "n_splits", "top_k", "expert_rank", "alpha")


@dataclass
class TrainConfig:
    """Every option of a training run. ``None`` means "the method's / library's default"."""

    # -- model and method --------------------------------------------------------------
    model: str | None = _f(None, "base model: a checkpoint dir, a .gguf file or a cached hub id (default SmolLM2-135M-Instruct)", "opt_str")
    dtype: str | None = _f(None, "dtype of the frozen base weights (float32, bfloat16, float16; default float32)", "opt_str")
    method: str = _f("orchmoe", "adapter method", "method")
    rank: int | None = _f(None, "LoRA rank of each expert (method default if unset)", "opt_int")
    n_skills: int | None = _f(None, "number of experts / skills S (MoDE: m)", "opt_int")
    n_abstract_tasks: int | None = _f(None, "OrchMoE: number of abstract tasks K (default: the number of seen tasks, as the paper)", "opt_int")
    n_splits: int | None = _f(None, "Poly/MHR: routing blocks per layer h", "opt_int")
    top_k: int | None = _f(None, "MoLoRA: keep the top-k experts per token", "opt_int")
    expert_rank: int | None = _f(None, "MoDE: rank p of each dyadic expert", "opt_int")
    alpha: float | None = _f(None, "update scale numerator (scale = alpha / rank)", "opt_float")
    adapter_args: dict = _f({}, "any other field of the method's config, KEY=VALUE (e.g. balance_coef=0.01)", "dict")
    target_modules: Any = _f(None, "layers to adapt: comma-separated leaf names or one regex over module paths", "targets")
    budget_rank: int | None = _f(None, "size the method to the trainable parameters of a LoRA of this rank", "opt_int")
    budget_vary: str = _f("rank", "which field match_budget varies to meet --budget-rank (rank or n_skills)", "str")
    budget_tolerance: float = _f(0.1, "relative tolerance of the budget match", "float")
    # -- data ---------------------------------------------------------------------------
    data: str = _f("builtin", "SuperNI checkout (tasks/ + splits/) or 'builtin' for the embedded suite", "str")
    tasks: Any = _f(100, "seen tasks: a number N (drawn from the train split), 'all', comma-separated names, a file of names or a split name", "tasks")
    task_seed: int | None = _f(None, "seed of the task draw when --tasks is a number (default: --seed); fix it to keep the "
                                     "same tasks across seeds", "opt_int")
    split: str = _f("default", "split folder under splits/", "str")
    train_per_task: int | None = _f(1000, "training instances per seen task ('all': every remaining instance)", "opt_int_all")
    eval_per_task: int = _f(100, "held-out evaluation instances per seen task (disjoint from training)", "int")
    unseen_tasks: Any = _f("all", "unseen test-split tasks to score: 'all', a number, 0 for none, or names", "unseen")
    unseen_per_task: int = _f(100, "evaluation instances per unseen task (the first ones, as in SuperNI)", "int")
    allow_fewer_train: bool = _f(False, "keep tasks with fewer than train+eval instances (train on what is left)", "bool")
    n_pos: int = _f(2, "positive demonstrations in the prompt (Tk-Instruct: 2)", "int")
    max_source_len: int = _f(512, "prompt token budget (demonstrations dropped, then definition cut, when over)", "int")
    max_target_len: int = _f(64, "answer token budget in training (eos included)", "int")
    max_new_tokens: int | None = _f(None, "generation length at evaluation (default: max_target_len)", "opt_int")
    chat_template: bool = _f(False, "wrap prompts in the tokenizer's chat template (decoder-only)", "bool")
    # -- optimisation -----------------------------------------------------------------------
    batch_size: int = _f(8, "examples per process per micro-batch", "int")
    length_window: int = _f(4, "batches per length-sorting window: 1 = no length grouping (tasks fully mixed in a batch); "
                               "larger windows pad less but put fewer tasks in a batch", "int")
    grad_accum: int = _f(1, "micro-batches per optimizer step", "int")
    lr: float = _f(1e-3, "learning rate of the experts", "float")
    router_lr: float | None = _f(0.1, "learning rate of the task-skill allocation logits (Poly/MHR/OrchMoE; two-speed as in "
                                 "the references: 0.1 with adapters at 1e-3; none: same as lr)", "opt_float")
    weight_decay: float = _f(0.0, "AdamW weight decay of the experts (routers get none)", "float")
    warmup_ratio: float = _f(0.06, "warm-up as a fraction of the optimizer steps", "float")
    warmup_steps: int | None = _f(None, "warm-up steps (overrides warmup_ratio)", "opt_int")
    schedule: str = _f("linear", "learning-rate schedule", "choice", choices=tuple(SCHEDULES))
    epochs: int = _f(1, "passes over the training data (ignored when max_steps is set)", "int")
    max_steps: int | None = _f(None, "optimizer steps to run (0: no training, an untrained baseline)", "opt_int")
    max_grad_norm: float | None = _f(1.0, "gradient clipping norm (0 or unset: no clipping)", "opt_float")
    mixed_precision: str = _f("auto", "auto (bf16/fp16 on GPU, no on CPU), no, bf16, fp16", "choice", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory)", "bool")
    seed: int = _f(0, "seed of task/instance sampling, adapter init, batch order and routing noise", "int")
    # -- bookkeeping --------------------------------------------------------------------
    out: str = _f("runs/orchmoe", "run folder", "str")
    checkpoint_every: int = _f(200, "optimizer steps between checkpoints (0: none)", "int")
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones deleted)", "int")
    log_every: int = _f(10, "optimizer steps between train_log.jsonl records", "int")
    resume: bool = _f(True, "continue from the latest checkpoint in the run folder", "bool")
    overwrite: bool = _f(False, "delete a previous run in the run folder first", "bool")
    eval: bool = _f(True, "evaluate after training (--no-eval to skip)", "bool")
    eval_batch_size: int = _f(16, "prompts per generation batch", "int")
    progress: bool = _f(True, "show progress bars", "bool")

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        positive = ("batch_size", "length_window", "grad_accum", "max_source_len", "max_target_len", "eval_batch_size", "log_every",
                    "keep_checkpoints", "unseen_per_task")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_per_task", "n_pos", "checkpoint_every", "epochs"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise TrainConfigError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise TrainConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if self.router_lr is not None and not self.router_lr >= 0:
            raise TrainConfigError(f"router_lr must be >= 0 (0 freezes the allocation logits), got {self.router_lr}")
        if self.budget_rank is not None and self.budget_rank < 1:
            raise TrainConfigError(f"budget_rank must be >= 1, got {self.budget_rank}")
        if self.budget_rank is not None and getattr(self, self.budget_vary, None) is not None:
            raise TrainConfigError(f"--budget-rank sizes the adapter by varying {self.budget_vary}; do not also set {self.budget_vary}")

    @property
    def generation_tokens(self) -> int:
        return self.max_new_tokens or self.max_target_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that do not change the trained weights: they may differ when a run is resumed.
RESUME_FREE = {"out", "checkpoint_every", "keep_checkpoints", "log_every", "resume", "overwrite", "eval",
               "eval_batch_size", "max_new_tokens", "progress", "unseen_tasks", "unseen_per_task"}


# -- parsing and validating option values ----------------------------------------------------

def _none_word(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null"))


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise TrainConfigError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise TrainConfigError(f"{name} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise TrainConfigError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{name} must be a number, got {v!r}") from None


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return v.strip().lower() in ("true", "yes", "1", "on")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise TrainConfigError(f"{name} must be true or false, got {v!r}")


def _number_or_names(v: Any) -> int | list[str] | str:
    """A task selection: a count, a list of names, or a string (names, a file, a split) left to the loader."""
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    s = str(v).strip()
    return int(s) if s.isdigit() else s


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    name, kind = f.name, f.metadata.get("kind", "str")
    if kind == "int":
        return _as_int(name, v)
    if kind == "float":
        return _as_float(name, v)
    if kind == "bool":
        return _as_bool(name, v)
    if kind == "str":
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise TrainConfigError(f"{name} must be a string, got {v!r}")
        return str(v)
    if kind == "opt_str":
        return None if _none_word(v) else str(v)
    if kind == "opt_int":
        return None if _none_word(v) else _as_int(name, v)
    if kind == "opt_int_all":
        return None if _none_word(v) or (isinstance(v, str) and v.strip().lower() == "all") else _as_int(name, v)
    if kind == "opt_float":
        return None if _none_word(v) else _as_float(name, v)
    if kind == "choice":
        v = str(v).lower()
        if v not in f.metadata["choices"]:
            raise TrainConfigError(f"{name} must be one of {list(f.metadata['choices'])}, got {v!r}")
        return v
    if kind == "method":
        from .config import METHODS

        v = str(v).lower()
        if v not in METHODS:
            raise TrainConfigError(f"unknown method {v!r}; valid methods: {', '.join(sorted(METHODS))}")
        return v
    if kind == "dict":
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise TrainConfigError(f"{name} must be a mapping of field names to values, got {v!r}")
        return dict(v)
    if kind == "targets":
        if _none_word(v):
            return None
        if isinstance(v, (list, tuple)):
            return [str(x) for x in v]
        s = str(v).strip()
        if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", s):  # plain names: a list; anything else is a regex
            return [x.strip() for x in s.split(",")]
        return s
    if kind == "tasks":
        if isinstance(v, bool) or v is None:
            raise TrainConfigError(f"{name} must be a number, 'all', names or a file, got {v!r}")
        return _number_or_names(v)
    if kind == "unseen":
        if _none_word(v) or (isinstance(v, str) and v.strip().lower() == "all"):
            return "all"
        if isinstance(v, bool):
            raise TrainConfigError(f"{name} must be 'all', a number or task names, got {v!r}")
        return _number_or_names(v)
    raise AssertionError(f"unknown option kind {kind}")  # pragma: no cover


def config_from_mapping(d: dict[str, Any], origin: str = "config") -> dict[str, Any]:
    """Validate the keys of a mapping of options (dashes allowed); unknown keys are an error naming them.

    Keys starting with ``_`` are informational (a run's config.yaml carries ``_resolved``) and skipped.
    """
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in d.items():
        k = str(key).replace("-", "_")
        if k.startswith("_"):
            continue
        if k == "no_eval":  # the CLI spelling, accepted in files too
            k, value = "eval", not _as_bool(str(key), value)
        if k not in names:
            close = difflib.get_close_matches(k, list(names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TrainConfigError(f"{origin}: unknown option {key!r}{hint}")
        try:
            out[k] = _coerce(names[k], value)
        except TrainConfigError as e:
            raise TrainConfigError(f"{origin}: option {key!r}: {e}") from None
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML or JSON file (YAML is a superset of JSON)."""
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"config file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TrainConfigError(f"config file {p}: not valid YAML/JSON: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"config file {p}: the top level must be a mapping of option names to values")
    return config_from_mapping(raw, origin=f"config file {p}")


def dump_config(cfg: TrainConfig, path: Path, resolved: dict | None = None) -> None:
    d = cfg.to_dict()
    d["overwrite"] = False  # an action of that invocation, not a setting to replay from the file
    if resolved:
        d["_resolved"] = resolved
    _atomic_text(path, yaml.safe_dump(d, sort_keys=False, allow_unicode=True))


def read_run_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, dict]:
    """(TrainConfig, resolved info) of a run folder's config.yaml."""
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not an orchmoe run folder")
    raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    return TrainConfig(**config_from_mapping(raw, origin=str(p))), raw.get("_resolved", {})


# -- data ---------------------------------------------------------------------------------------

def build_data(cfg: TrainConfig):
    """Seen tasks (disjoint train / eval instances) and unseen test-split tasks, all seeded by cfg.seed."""
    from .data import load_multitask

    tasks = cfg.split if cfg.tasks == "all" else cfg.tasks
    unseen = None if cfg.unseen_tasks == "all" else cfg.unseen_tasks
    return load_multitask(cfg.data, tasks, split=cfg.split, n_train=cfg.train_per_task, n_eval=cfg.eval_per_task,
                          n_unseen_tasks=unseen, seed=cfg.seed, n_unseen_eval=cfg.unseen_per_task,
                          allow_fewer_train=cfg.allow_fewer_train, task_seed=cfg.task_seed)


def quiet_length_warning(tokenizer) -> None:
    """Silence transformers' "sequence longer than the maximum" warning: prompts are tokenised whole
    and then cut to max_source_len by the prompt builder, so the warning is a false alarm."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True


def encode_train_features(cfg: TrainConfig, data, tokenizer, decoder_only: bool, progress: bool = False) -> list[dict]:
    from tqdm.auto import tqdm

    from .data import encode_example

    quiet_length_warning(tokenizer)
    feats = []
    for ex in tqdm(data.train, desc="tokenize", unit="ex", dynamic_ncols=True, disable=not progress, leave=False):
        f = encode_example(tokenizer, data.task_defs[ex.task], ex.input, ex.target, n_pos=cfg.n_pos,
                           max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len,
                           decoder_only=decoder_only, chat_template=cfg.chat_template)
        f["task_id"] = ex.task_id
        feats.append(f)
    return feats


def answer_window(batch: dict) -> dict:
    """Decoder-only batch -> the same loss with the LM head run only from the first answer token on.

    The vocabulary projection and softmax over prompt positions are most of the cost of a short
    answer on a small model, and those positions carry no loss. The prompt mask for OrchMoE's
    routing is passed explicitly (the trimmed labels no longer mark the prompt), by the same
    rule the model uses: attended tokens whose label is -100.
    """
    from .data import IGNORE_INDEX

    labels, mask = batch["labels"], batch["attention_mask"]
    answer = labels != IGNORE_INDEX
    prompt = mask.bool() & ~answer
    empty = ~prompt.any(dim=1, keepdim=True)
    first = int(torch.where(answer.any(1), answer.float().argmax(1), torch.full_like(labels[:, 0], labels.shape[1])).min())
    start = max(min(first, labels.shape[1]) - 1, 0)  # logits at t predict token t+1
    out = dict(batch)
    out["routing_mask"] = torch.where(empty, mask.bool(), prompt)
    out["labels"] = labels[:, start:]
    out["logits_to_keep"] = labels.shape[1] - start
    return out


def epoch_batches(lengths: list[int], batch_size: int, num_processes: int, seed: int, epoch: int,
                  tasks: list[int] | None = None, length_window: int = 4) -> list[list[int]]:
    """The global batches of one epoch, ``batch_size * num_processes`` examples each: every task spread
    evenly over the epoch, then lengths grouped within windows of ``length_window`` batches.

    A pure function of its arguments: resuming re-creates the exact order.
    """
    from .data import length_grouped_batches

    return length_grouped_batches(lengths, batch_size * num_processes, seed=seed * 1_000_003 + epoch, shuffle=True,
                                  mega_batch_mult=length_window, groups=tasks)


def rank_slice(global_batch: list[int], rank: int, num_processes: int) -> list[int]:
    """This process's share of a global batch: every W-th example (similar lengths on every rank).

    A short last batch is filled by cycling its own examples so no process gets an empty batch
    (DDP needs every rank to run the backward pass).
    """
    if num_processes == 1:
        return list(global_batch)
    g = list(global_batch)
    while len(g) < num_processes:
        g = g + g[: num_processes - len(g)]
    return g[rank::num_processes]


# -- adapter ------------------------------------------------------------------------------------

def build_adapter_config(cfg: TrainConfig, base_model, n_tasks: int):
    """The method's config from the options; with budget_rank, sized to a LoRA-r budget via match_budget.

    ``base_model=None`` only checks the options (done before anything slow is loaded).
    """
    from .budget import lora_budget, match_budget
    from .config import METHODS, ConfigError

    cls = METHODS[cfg.method]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k in ADAPTER_FIELDS:
        v = getattr(cfg, k)
        if v is not None:
            kwargs[k] = v
    for k, v in cfg.adapter_args.items():
        k = k.replace("-", "_")
        if k in kwargs:
            raise TrainConfigError(f"adapter_args sets {k!r}, which is also set by its own option")
        kwargs[k] = v
    if cfg.target_modules is not None:
        kwargs["target_modules"] = cfg.target_modules
    if "n_tasks" in kwargs and "n_tasks" in names:
        raise TrainConfigError(f"{cfg.method}: n_tasks is the number of seen tasks ({n_tasks}); do not set it")
    unknown = sorted(set(kwargs) - names)
    if unknown:
        valid = sorted(names - {"target_modules", "n_tasks"})
        raise TrainConfigError(f"method {cfg.method!r} has no option(s) {unknown}; its options: {valid}")
    try:
        adapter_cfg = cls(**kwargs).for_tasks(n_tasks, explicit=set(kwargs))
        if cfg.budget_rank is not None and base_model is not None:
            budget = lora_budget(base_model, cfg.budget_rank, adapter_cfg.target_modules)
            adapter_cfg = match_budget(adapter_cfg, base_model, budget, vary=cfg.budget_vary,
                                       tolerance=cfg.budget_tolerance)
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None
    return adapter_cfg


# -- checkpoints --------------------------------------------------------------------------------

def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    """Flush a freshly written folder to disk before it is renamed into place."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some systems
        pass


def list_checkpoints(out: Path) -> list[Path]:
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (temp folders of an interrupted save are ignored)."""
    found = list_checkpoints(Path(out))
    return found[-1] if found else None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the run ------------------------------------------------------------------------------------

def _mixed_precision(mode: str) -> str:
    if mode == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if mode == "fp16" and not torch.cuda.is_available():
        raise TrainConfigError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    return mode


def _prepare_out(cfg: TrainConfig, out: Path) -> tuple[Path | None, list[Path]]:
    """Decide between a fresh start and a resume, refusing to clobber a previous run silently.

    Returns (checkpoint to resume from, leftovers of a previous run to delete). Every process
    decides the same way; only the main process deletes, after all have decided.
    """
    if (out / "train_summary.json").is_file() and not cfg.overwrite:
        raise TrainConfigError(f"{out} holds a finished run; pass --overwrite to train it again, use another --out, "
                               f"or `orchmoe eval {out}` to re-score it")
    ckpt = latest_checkpoint(out) if cfg.resume and not cfg.overwrite else None
    if ckpt is not None:
        saved, _ = read_run_config(ckpt)
        diff = {k: (getattr(saved, k), getattr(cfg, k)) for k in saved.to_dict()
                if k not in RESUME_FREE and getattr(saved, k) != getattr(cfg, k)}
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TrainConfigError(f"{out} holds a checkpoint of a different configuration ({shown}); "
                                   "pass the same options to resume, or --overwrite / another --out to start afresh")
        return ckpt, []
    names = ("adapter", CHECKPOINT_DIR, "train_log.jsonl", "train_summary.json", "predictions.jsonl", "metrics.json",
             "metrics.md", "config.yaml")
    found = [out / n for n in names if (out / n).exists()]
    if found and {p.name for p in found} <= {"config.yaml", "train_log.jsonl"}:
        return None, found  # a run interrupted before its first checkpoint: nothing to keep, start again
    if found and not cfg.overwrite:
        raise TrainConfigError(f"{out} already holds a run ({', '.join(p.name for p in found)}); pass --overwrite to "
                               f"replace it, use another --out, or `orchmoe eval {out}` to re-score it")
    return None, found


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop records a killed run wrote after its last checkpoint, so the log reads as one run."""
    if not log_path.is_file():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    _atomic_text(log_path, "".join(k + "\n" for k in keep))


class _Checkpointer:
    """Atomic checkpoints: every process writes its RNG state into a temp folder, the main
    process adds adapter / optimizer / scheduler / trainer state and renames it into place."""

    def __init__(self, out: Path, accelerator, keep: int) -> None:
        self.root = out / CHECKPOINT_DIR
        self.acc = accelerator
        self.keep = keep

    def save(self, step: int, routed, optimizer, scheduler, state: dict, cfg: TrainConfig, resolved: dict,
             metadata: dict) -> Path:
        acc = self.acc
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pth")
        acc.wait_for_everyone()
        if acc.is_main_process:
            routed.save_adapter(tmp / "adapter", metadata=metadata)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            dump_config(cfg, tmp / "config.yaml", resolved)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # last: marks it complete
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.root.parent)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run into ``cfg.out``, save the adapter and evaluate; returns a summary dict."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    try:
        return _train(cfg)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from . import __version__
    from .data import batch_mix, pad_batch
    from .diagnostics import routing_record
    from .model import get_model
    from .models import load_model_and_tokenizer
    from .models import is_encoder_decoder as _is_enc_dec

    cfg.validate()
    build_adapter_config(cfg, None, 1)  # option errors surface before any data or model is loaded
    if cfg.generation_tokens < cfg.max_target_len:
        warnings.warn(f"max_new_tokens={cfg.generation_tokens} is below max_target_len={cfg.max_target_len}: answers the "
                      "model was trained to give in full are cut at evaluation", stacklevel=2)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=_mixed_precision(cfg.mixed_precision))
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out)
    resume_from, leftovers = _prepare_out(cfg, out)
    accelerator.wait_for_everyone()
    if is_main:
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # Data: seeded and identical on every process (each process slices its share of a batch).
    t_setup = time.perf_counter()
    data = build_data(cfg)
    if not data.train and (cfg.max_steps or 0) > 0:
        raise TrainConfigError("no training examples: raise train_per_task")
    base, tokenizer, info = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype)
    decoder_only = not _is_enc_dec(base)
    if cfg.chat_template and not decoder_only:
        raise TrainConfigError("--chat-template is for decoder-only models; this model is encoder-decoder")
    set_seed(cfg.seed)  # adapter initialisation: identical on every process
    adapter_cfg = build_adapter_config(cfg, base, data.num_tasks)
    routed = get_model(base, adapter_cfg, base_model_name=info["name"])
    if cfg.gradient_checkpointing:
        routed.gradient_checkpointing_enable()
        base.config.use_cache = False
    n_trainable, n_total = routed.num_parameters_split()
    if is_main:
        routed.print_trainable_parameters()

    feats = encode_train_features(cfg, data, tokenizer, decoder_only, progress=is_main and cfg.progress)
    lengths = [len(f["input_ids"]) + (0 if decoder_only else len(f["labels"])) for f in feats]
    task_of = [f["task_id"] for f in feats]
    n_global = math.ceil(len(feats) / (cfg.batch_size * world)) if feats else 0
    steps_per_epoch = math.ceil(n_global / cfg.grad_accum) if n_global else 0
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if total_steps > 0 and steps_per_epoch == 0:
        raise TrainConfigError("no training examples for the requested steps")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)

    optimizer = torch.optim.AdamW(routed.parameter_groups(cfg.lr, cfg.router_lr, cfg.weight_decay))
    # Not passed through accelerator.prepare: it would step the schedule once per process.
    scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(routed, optimizer)
    routed = accelerator.unwrap_model(model)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    metadata = {
        "tasks": data.seen_tasks,
        "task_to_id": data.task_to_id,
        "unseen_tasks": data.unseen_tasks,
        "categories": data.categories(),
        "data": cfg.data,
        "data_dir": str(data.data_dir),
        "base_model": info["name"],
        "prompt": {"n_pos": cfg.n_pos, "max_source_len": cfg.max_source_len, "max_target_len": cfg.max_target_len,
                   "chat_template": cfg.chat_template},
        "seed": cfg.seed,
    }
    resolved = {
        "orchmoe_version": __version__,
        "adapter": adapter_cfg.to_dict(),
        "base_model": info["name"],
        "base_model_source": info["source"],
        "data_dir": str(data.data_dir),
        "seen_tasks": data.seen_tasks,
        "unseen_tasks": data.unseen_tasks,
        "num_processes": world,
        "effective_batch_size": cfg.batch_size * world * cfg.grad_accum,
        "train_examples": len(feats),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "mixed_precision": accelerator.mixed_precision,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "batch_mix": {k: round(v, 4) for k, v in batch_mix(epoch_batches(
            lengths, cfg.batch_size, world, cfg.seed, 0, task_of, cfg.length_window), task_of, lengths).items()},
    }

    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "examples_seen": 0, "tokens_seen": 0,
             "train_seconds": 0.0, "num_processes": world}
    log_path = out / "train_log.jsonl"
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        if saved.get("num_processes", 1) != world:
            raise TrainConfigError(f"{resume_from} was written by {saved.get('num_processes')} processes; resume it with the "
                                   f"same number (now {world}): the batch order depends on it")
        routed.load_adapter_weights(resume_from / "adapter")
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        if accelerator.scaler is not None and (resume_from / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(resume_from / "scaler.pt", weights_only=True))
        state.update(saved)
        _set_rng_state(torch.load(resume_from / f"rng_state_{rank}.pth", weights_only=False))
        if is_main:
            _truncate_log(log_path, state["global_step"])
            print(f"resuming from {resume_from} (step {state['global_step']}/{total_steps})")
    else:
        set_seed(cfg.seed, device_specific=True)  # routing noise / dropout: distinct per process
    if is_main:
        dump_config(cfg, out / "config.yaml", resolved)
    accelerator.wait_for_everyone()

    checkpointer = _Checkpointer(out, accelerator, cfg.keep_checkpoints)
    start = state["global_step"]
    if is_main and start < total_steps:
        print(f"training {cfg.method} on {len(data.seen_tasks)} tasks, {len(feats)} examples, {total_steps} steps "
              f"(effective batch {resolved['effective_batch_size']}, {world} process(es), setup "
              f"{time.perf_counter() - t_setup:.0f} s)")
    bar = tqdm(total=total_steps, initial=start, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True,
               disable=not (is_main and cfg.progress) or total_steps == 0)
    log_file = open(log_path, "a", encoding="utf-8") if is_main else None
    device = accelerator.device
    needs_task_ids = adapter_cfg.needs_task_ids
    trim_logits = decoder_only and "logits_to_keep" in inspect.signature(base.forward).parameters
    # The running sums of the current logging window travel in the checkpoint, so a resumed run
    # writes the same log records as an unbroken one.
    window = state.setdefault("log_window", {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0, "grad_norm": 0.0})
    window_t0 = time.perf_counter()
    last_loss = float("nan")
    routed_pi: list[torch.Tensor] = []  # this logging window's pi(x) and task ids (OrchMoE), for the diagnostics
    routed_tasks: list[torch.Tensor] = []
    model.train()
    cur_epoch, order = -1, []
    try:
        for step in range(start, total_steps):
            t_step = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            if epoch != cur_epoch:
                order, cur_epoch = epoch_batches(lengths, cfg.batch_size, world, cfg.seed, epoch, task_of,
                                                 cfg.length_window), epoch
            micro = order[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
            step_loss = torch.zeros((), device=device)
            step_aux = torch.zeros((), device=device)
            step_tokens = 0
            for j, gbatch in enumerate(micro):
                idx = rank_slice(gbatch, rank, world)
                batch = pad_batch([feats[i] for i in idx], tokenizer.pad_token_id, "right", decoder_only=decoder_only)
                task_ids = batch.pop("task_ids")
                batch = {k2: v.to(device) for k2, v in batch.items() if k2 in ("input_ids", "attention_mask", "labels")}
                if needs_task_ids:
                    batch["task_ids"] = task_ids.to(device)
                if trim_logits:
                    batch = answer_window(batch)
                sync = j == len(micro) - 1
                with (nullcontext() if sync else accelerator.no_sync(model)):
                    outputs = model(**batch)
                    # accelerator.backward divides by grad_accum; a short last step has fewer micro-batches.
                    accelerator.backward(outputs["loss"] * (cfg.grad_accum / len(micro)))
                if routed.routing_state.task_probs is not None:
                    routed_pi.append(routed.routing_state.task_probs.detach())
                    routed_tasks.append(task_ids)
                aux = outputs.get("aux_loss")
                aux = aux.detach().float() if aux is not None else torch.zeros((), device=device)
                step_loss += (outputs["loss"].detach().float() - aux) / len(micro)  # the LM loss alone
                step_aux += aux / len(micro)
                step_tokens += int(batch["attention_mask"].sum()) + (0 if decoder_only else int((batch["labels"] != -100).sum()))
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state["global_step"] = step + 1
            state["epoch"], state["step_in_epoch"] = divmod(step + 1, steps_per_epoch)
            state["examples_seen"] += sum(len(g) for g in micro)
            state["tokens_seen"] += step_tokens * world
            state["train_seconds"] += time.perf_counter() - t_step
            window["loss"] += float(step_loss)
            window["aux"] += float(step_aux)
            window["n"] += 1
            window["tokens"] += step_tokens * world
            if grad_norm is not None:
                window["grad_norm"] = float(grad_norm)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                stats = accelerator.reduce(torch.tensor([window["loss"], window["aux"]], device=device), "mean")
                elapsed = time.perf_counter() - window_t0
                lrs = scheduler.get_last_lr()
                rec = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                       "loss": float(stats[0]) / window["n"], "aux_loss": float(stats[1]) / window["n"],
                       "lr": lrs[0], "router_lr": next((lr for g, lr in zip(optimizer.param_groups, lrs)
                                                        if g.get("name") == "allocation"), None),
                       "grad_norm": window["grad_norm"] if cfg.max_grad_norm else None,
                       "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                       "train_seconds": round(state["train_seconds"], 3),
                       **routing_record(routed, torch.cat(routed_pi) if routed_pi else None,
                                        torch.cat(routed_tasks) if routed_tasks else None)}
                routed_pi.clear(), routed_tasks.clear()
                last_loss = rec["loss"]
                if log_file is not None:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", aux=f"{rec['aux_loss']:.3g}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"spread": f"{rec['allocation_spread']:.3f}"} if "allocation_spread" in rec else {}),
                                **({"nmi": f"{rec['nmi_pi_task']:.2f}"} if "nmi_pi_task" in rec else {}))
                window = state["log_window"] = {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0, "grad_norm": 0.0}
                window_t0 = time.perf_counter()
            bar.update(1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
                checkpointer.save(step + 1, routed, optimizer, scheduler, json.loads(json.dumps(state)), cfg, resolved, metadata)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()

    # Final artefacts (main process only), then the evaluation.
    if cfg.gradient_checkpointing:
        base.config.use_cache = True
    summary = {
        "method": cfg.method,
        "base_model": info["name"],
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "steps": state["global_step"],
        "epochs": round(state["global_step"] / steps_per_epoch, 4) if steps_per_epoch else 0.0,
        "examples_seen": state["examples_seen"],
        "tokens_seen": state["tokens_seen"],
        "train_seconds": round(state["train_seconds"], 3),
        "final_loss": last_loss,
        "num_processes": world,
        "effective_batch_size": resolved["effective_batch_size"],
        "seen_tasks": len(data.seen_tasks),
        "train_examples": len(feats),
    }
    if is_main:
        routed.save_adapter(out / "adapter", metadata=metadata)
        dump_config(cfg, out / "config.yaml", resolved)
        _atomic_text(out / "train_summary.json", json.dumps(summary, indent=2))
        print(f"saved adapter to {out / 'adapter'} ({state['global_step']} steps, {summary['train_seconds']:.0f} s of training)")
    accelerator.wait_for_everyone()
    if cfg.eval:
        from .evaluate import evaluate_model

        summary["metrics"] = evaluate_model(routed, tokenizer, data, cfg, out, accelerator=accelerator,
                                            decoder_only=decoder_only)
    return summary
