"""What a server or a prediction run serves: a trained routed adapter, or several plain PEFT LoRAs by name.

`load_served` takes a run folder (``adapter/`` + ``config.yaml``) or an adapter folder; the base model
comes from ``--model``, else the run's ``model`` option, else the source recorded in the adapter. The
prompt format comes from the adapter (`orchmoe.data.PromptFormat`). `load_lora_set` puts PEFT LoRA
folders on one base model (``peft.PeftModel`` with one adapter per name), as multi-LoRA engines do.

Model ids: a routed adapter answers as its name (the run folder's name unless ``--name``); Poly and MHR
also as ``NAME/TASK`` for each seen task and ``NAME/unseen``. A LoRA set answers as each LoRA's name and
as the base model's name (no LoRA).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchmoe.adapters.folder import load_adapter
from orchmoe.data import PromptFormat
from orchmoe.loading.pretrained import load_model_and_tokenizer
from orchmoe.recipe.trained import locate_adapter
from orchmoe.serving.errors import RequestError
from orchmoe.serving.runner import PeftRunner, RoutedRunner

__all__ = ["Served", "load_served", "load_lora_set", "UNSEEN"]

#: the task name (besides the id -1) that routes Poly/MHR as an unseen task
UNSEEN = "unseen"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass
class Served:
    """A model ready to serve, and how model ids and ``task`` fields route its rows.

    Attributes:
        name: the default model id.
        runner: the engine's model runner.
        tokenizer: the base model's tokenizer.
        prompt_format: how the training prompts were built.
        method: the adapter's method, or ``"lora-set"``.
        tasks: Poly/MHR seen task name -> id (empty when the rows route by their prompt).
        loras: the names of a LoRA set.
        base_name: the base model's name.
        model: the model (a `RoutedModel` or ``peft.PeftModel``).
        routing: what the adapter's router reads (its config's ``routing``: ``"prompt"``, ``"task_ids"``,
            ``"tokens"``, ``"none"``; ``"none"`` for a LoRA set).
    """

    name: str
    runner: Any
    tokenizer: Any
    prompt_format: PromptFormat
    method: str
    tasks: dict[str, int] = field(default_factory=dict)
    loras: list[str] = field(default_factory=list)
    base_name: str = ""
    model: Any = None
    routing: str = "none"

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def max_positions(self) -> int:
        return self.runner.max_positions

    @property
    def routes_by_task(self) -> bool:
        return self.routing == "task_ids"

    def model_ids(self) -> list[str]:
        if self.method == "lora-set":
            return [*self.loras, self.base_name]
        extra = [f"{self.name}/{t}" for t in self.tasks] + [f"{self.name}/{UNSEEN}"] if self.routes_by_task else []
        return [self.name, *extra]

    def route(self, model_id: str, task: str | int | None) -> Any:
        """The engine route of a request (a LoRA name, a task id, or None), or a `RequestError`."""
        if self.method == "lora-set":
            if task is not None:
                raise RequestError("task: this server selects a LoRA by the model name only", param="task")
            if model_id in self.loras:
                return model_id
            if model_id == self.base_name:
                return "__base__"
            raise self._unknown(model_id)
        head, _, suffix = model_id.partition("/")
        if head != self.name or (suffix and not self.routes_by_task):
            raise self._unknown(model_id)
        if not self.routes_by_task:
            return None  # routed by the prompt alone; a task field is not needed (and not used)
        if suffix and task is not None and str(task) != suffix:
            raise RequestError(f"the model id names task {suffix!r} and the task field {task!r}", param="task")
        chosen = suffix or task
        if chosen is None:
            raise RequestError(
                f"{self.method} routes by task: give a task field (a task name, its id, or -1 for an unseen "
                f"task) or use a model id {self.name}/TASK",
                param="task",
            )
        return self._task_id(chosen)

    def _task_id(self, task: str | int) -> int:
        if isinstance(task, int) or (isinstance(task, str) and re.fullmatch(r"-?\d+", task)):
            t = int(task)
            if -1 <= t < len(self.tasks):
                return t
            raise RequestError(
                f"task id {t} out of range: this adapter has tasks 0..{len(self.tasks) - 1} (-1: unseen)", param="task"
            )
        if task == UNSEEN:
            return -1
        if task in self.tasks:
            return self.tasks[task]
        raise RequestError(
            f"unknown task {task!r}: this adapter was trained on {len(self.tasks)} tasks (GET /v1/models lists "
            f"them); use -1 or {UNSEEN!r} for an unseen task",
            param="task",
        )

    def _unknown(self, model_id: str) -> RequestError:
        known = self.model_ids()
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        return RequestError(f"model {model_id!r} does not exist here; served: {shown}", 404, param="model",
                            code="model_not_found")  # fmt: skip


def load_served(
    path: str | os.PathLike, *, model: str | None = None, dtype: str | None = None, name: str | None = None
) -> Served:
    """Base model + routed adapter of a run or adapter folder, with its prompt format.

    Args:
        path: a run folder or an adapter folder.
        model: the base model (default: the run's ``model`` option, else the adapter's recorded source).
        dtype: of the base weights (default: the run's, else ``auto``: float32 on CPU).
        name: the model id (default: the run folder's name, or the adapter folder's).
    """
    trained = locate_adapter(path)
    adapter_dir, options = trained.adapter_dir, trained.options
    base, tokenizer, info = load_model_and_tokenizer(
        trained.base_model(model), dtype=dtype or options.get("dtype") or "auto"
    )
    routed = load_adapter(base, adapter_dir, base_model_name=info["name"])
    fmt = PromptFormat.from_adapter_metadata(routed.adapter_metadata, where=str(adapter_dir))
    fmt = dataclasses.replace(fmt, decoder_only=not info["is_encoder_decoder"])  # the model knows (old adapters)
    method = routed.adapter_config.method
    tasks = dict(routed.adapter_metadata.get("task_to_id") or {}) if routed.adapter_config.needs_task_ids else {}
    if routed.adapter_config.needs_task_ids and not tasks:
        n = int(getattr(routed.adapter_config, "n_tasks", 0) or 0)
        tasks = {str(i): i for i in range(n)}  # an adapter saved outside the recipe: tasks known by id only
    default = trained.name
    served_name = _checked_name(name or default or "orchmoe")
    return Served(served_name, RoutedRunner(routed, tokenizer), tokenizer, fmt, method, tasks, [], info["name"], routed,
                  routed.adapter_config.routing)  # fmt: skip


def _checked_name(name: str) -> str:
    if not _NAME.match(name) or name == "__base__":
        raise ValueError(f"model name {name!r}: use letters, digits and _ . : - (up to 128 characters)")
    return name


def load_lora_set(loras: dict[str, str], *, model: str | None = None, dtype: str | None = None) -> Served:
    """PEFT LoRA folders by name on one base model (from ``model``, else their ``base_model_name_or_path``)."""
    from peft import PeftModel

    if not loras:
        raise ValueError("no LoRA given (--lora NAME=PATH)")
    bases = set()
    for n, p in loras.items():
        _checked_name(n)
        cfg_file = Path(p).expanduser() / "adapter_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--lora {n}={p}: no adapter_config.json there (not a PEFT adapter folder)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if cfg.get("peft_type") != "LORA":
            raise ValueError(f"--lora {n}={p}: a {cfg.get('peft_type')!r} adapter, not a PEFT LoRA")
        bases.add(cfg.get("base_model_name_or_path"))
    if model is None and len(bases) != 1:
        raise ValueError(f"the LoRAs name different base models {sorted(map(str, bases))}: choose one with --model")
    base, tokenizer, info = load_model_and_tokenizer(model or bases.pop(), dtype=dtype or "auto")
    names = list(loras)
    peft_model = PeftModel.from_pretrained(base, loras[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(loras[n], adapter_name=n)
    peft_model.eval()
    fmt = _bundle_format(Path(loras[names[0]]).expanduser(), not info["is_encoder_decoder"])
    return Served(names[0], PeftRunner(peft_model, tokenizer), tokenizer, fmt, "lora-set", {}, names, info["name"],
                  peft_model)  # fmt: skip


def _bundle_format(folder: Path, decoder_only: bool) -> PromptFormat:
    """The prompt format an orchmoe export recorded beside a LoRA (``orchmoe_export.json``), else the defaults."""
    for candidate in (folder / "orchmoe_export.json", folder.parent / "router" / "router_config.json"):
        if candidate.is_file():
            saved = json.loads(candidate.read_text(encoding="utf-8"))
            if isinstance(saved.get("prompt_format"), dict):
                return PromptFormat.from_dict(saved["prompt_format"])
    return PromptFormat(decoder_only=decoder_only)
