"""Adapter configurations: one dataclass per method.

A method is a config plus its router (paired in :mod:`orchmoe.core.registry`); every method shares the
same mixture-of-low-rank-experts layer (:class:`orchmoe.core.layer.RoutedLoraLayer`). A config answers
for its method: what routing it needs (``routing``), whether its experts share one down-projection,
how many trainable parameters it has on given layers, and how it adapts to a task count.

Scale convention, shared by every method: the update is ``(alpha / rank) * delta`` with
``alpha = rank`` unless set, so LoRA, the mixtures and PEFT's LoRA defaults all start from scale 1
(the Poly references use ``1/r``: ``alpha=1``; see docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft import PeftConfig

from orchmoe.core.registry import METHODS, config_class

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "MoLoRAConfig",
    "PolyConfig",
    "MHRConfig",
    "MoDEConfig",
    "OrchMoEConfig",
    "METHODS",
    "ROUTING_KINDS",
    "config_from_dict",
    "ConfigError",
]

#: what a method's router reads: nothing, the task id, the whole prompt, or each token
ROUTING_KINDS = ("none", "task_ids", "prompt", "tokens")


class ConfigError(ValueError):
    """An adapter configuration that cannot be built."""


def option(default: Any, help: str) -> Any:
    """A config field with its help text (the CLI's ``--adapter.NAME`` flags are generated from it).

    Args:
        default: the field's default (a list or dict is copied for every instance).
        help: the help text, kept in the field's ``metadata["help"]``.
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


#: fields that are PEFT's bookkeeping or the saved record, not the method's computation
_NOT_METHOD_FIELDS = frozenset(
    {
        "orchmoe",
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    }
)


def _peft_type(name: str) -> Any:
    """PEFT's enum member for ``name`` once `orchmoe.tuner.registration` added it, else the plain string (PEFT
    compares and looks up its types by their string value)."""
    from peft.utils import PeftType

    try:
        return PeftType(name)
    except ValueError:
        return name


def _plain_value(value: Any) -> Any:
    """A field's value as JSON (PEFT's enums as their strings)."""
    if isinstance(value, enum.Enum):
        return value.value
    return value


_TYPES = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _check_type(owner: str, name: str, annotation: str, value: Any) -> None:
    """Reject values of the wrong type (a JSON ``"3"`` for an int, ``null`` where none is allowed, NaN)."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" not in kinds:
            raise ConfigError(f"{owner}: {name} must not be null")
        return
    known = [_TYPES[k] for k in kinds if k in _TYPES]
    if not known or "list[str]" in kinds:
        return
    allowed = tuple(t for types, _ in known for t in types)
    wanted = " or ".join(words for _, words in known)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{owner}: {name} must be {wanted}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")


@dataclass
class AdapterConfig(PeftConfig):
    """Fields shared by every method; a `peft.PeftConfig`, so PEFT and the tools built on it take it.

    target_modules: leaf names matched as a suffix of the module path
    (``["q_proj", "v_proj"]``) or one regular expression matched against the
    whole path; ``None`` picks the usual attention projections of the model type.

    A config validates itself when built (`ConfigError`); ``method`` names it and ``routing`` (one of
    `ROUTING_KINDS`) says what its router reads. ``peft_type`` is the method's PEFT type
    (`peft_type_name`: ``ORCHMOE_<METHOD>``), set here; ``task_type`` is PEFT's (``CAUSAL_LM`` or
    ``SEQ_2_SEQ_LM``; `orchmoe.get_model` fills it from the model when unset). ``orchmoe`` is the
    record a saved adapter carries beside the method's fields (orchmoe version, adapted layers, base
    model provenance and fingerprint, weights checksum, prompt format); the model fills it.
    """

    method: ClassVar[str] = ""
    routing: ClassVar[str] = "none"
    #: fields of a small instance of the method (`small`): what the tests and examples build
    small_fields: ClassVar[dict[str, Any]] = {}

    target_modules: list[str] | str | None = option(None, "layers to adapt: leaf names or one regex over module paths")
    rank: int = option(8, "LoRA rank r of each expert")
    alpha: float | None = option(None, "update scale numerator: scale = alpha / rank (default: rank, i.e. scale 1)")
    dropout: float = option(0.0, "dropout on the adapter input")
    orchmoe: dict | None = field(
        default=None, metadata={"help": "the saved adapter's record (filled by the model; not an option)"}
    )

    # -- what the method is -------------------------------------------------
    @property
    def n_experts(self) -> int:
        """Experts (skills) per adapted layer, S."""
        return 1

    @property
    def n_splits(self) -> int:
        """Routing blocks per layer (MHR's h); 1 for every other method."""
        return 1

    @property
    def shares_down_projection(self) -> bool:
        """True when all experts share one down-projection A (MoDE, MoLoRA-SD)."""
        return False

    @property
    def needs_task_ids(self) -> bool:
        """True when every forward needs ``task_ids`` (Poly, MHR)."""
        return self.routing == "task_ids"

    @property
    def scale(self) -> float:
        """The update's factor ``alpha / rank`` (1 when ``alpha`` is unset)."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank

    # -- parameter accounting (what budget.py and the docs state) ---------------
    def layer_parameters(self, P: int, Q: int) -> int:
        """Trainable parameters this method adds to one (P -> Q) layer.

        Args:
            P: the layer's input width.
            Q: the layer's output width.
        """
        return self.rank * (P + Q)

    def model_parameters(self, d_model: int) -> int:
        """Trainable parameters added once per model (OrchMoE's Task Router)."""
        return 0

    def count_parameters(self, shapes: dict[str, tuple[int, int]], d_model: int) -> int:
        """Trainable parameters on layers of these (P, Q) shapes.

        Args:
            shapes: adapted layer path -> (P, Q) (`orchmoe.core.targets.find_target_layers`).
            d_model: the embedding width (OrchMoE's Task Router reads embeddings).
        """
        return sum(self.layer_parameters(P, Q) for P, Q in shapes.values()) + self.model_parameters(d_model)

    def for_tasks(self, n_tasks: int, explicit: set[str] | frozenset[str] = frozenset()) -> AdapterConfig:
        """This config fitted to a training run of ``n_tasks`` tasks (``explicit``: fields the user set).

        Args:
            n_tasks: the number of training tasks.
            explicit: names of the fields the user set, which are kept.
        Returns:
            A config (this one when nothing depends on the task count).
        """
        return self

    # -- validation and serialisation ------------------------------------------
    def validate(self) -> None:
        """Raise `ConfigError` for a field of the wrong type or out of range (run at construction)."""
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            if f.name not in _NOT_METHOD_FIELDS:  # PEFT checks its own
                _check_type(owner, f.name, f.type, getattr(self, f.name))
        if self.rank <= 0:
            raise ConfigError(f"{owner}: rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{owner}: dropout must be in [0, 1), got {self.dropout!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"{owner}: alpha must be > 0, got {self.alpha!r}")
        tm = self.target_modules
        if tm is not None and not (
            isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
        ):
            raise ConfigError(f"{owner}: target_modules must be a list of names or a regex string, got {tm!r}")
        if isinstance(tm, (str, list)) and not tm:
            raise ConfigError(f"{owner}: target_modules is empty")
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ConfigError(f"{owner}: target_modules {tm!r} is not a valid regular expression: {e}") from None

    def _positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{type(self).__name__}: {name} must be >= 1, got {getattr(self, name)!r}")

    def method_fields(self) -> dict[str, Any]:
        """``method`` and the method's own fields (no PEFT bookkeeping, no record), ``alpha`` resolved: what
        decides the computation, so two adapters with equal `method_fields` compute alike."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in _NOT_METHOD_FIELDS]
        d = {name: _plain_value(getattr(self, name)) for name in names}
        d["alpha"] = float(self.scale * self.rank)
        return {"method": self.method, **d}

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON values (PEFT writes this as ``adapter_config.json``), ``alpha`` resolved so a
        saved adapter never depends on a default."""
        d = {f.name: _plain_value(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["alpha"] = float(self.scale * self.rank)
        return d

    def to_json(self) -> str:
        """`method_fields` as indented JSON with sorted keys."""
        return json.dumps(self.method_fields(), indent=2, sort_keys=True)

    @classmethod
    def small(cls, n_tasks: int = 3, **changes: Any) -> AdapterConfig:
        """A small instance (`small_fields`) fitted to ``n_tasks`` tasks, then ``changes``: the config the test
        suite and the registry's checks build for every method, so a new method needs no test edits."""
        config = cls(**cls.small_fields).for_tasks(n_tasks)
        return config.replace(**changes) if changes else config

    @classmethod
    def upgrade_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Fields saved by an older orchmoe, renamed to this version's (a method with renamed fields overrides
        this); used by `config_from_dict` before unknown fields are refused."""
        return fields

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with ``changes`` applied, validated (`ConfigError`)."""
        return dataclasses.replace(self, **changes)  # __post_init__ validates

    @classmethod
    def peft_type_name(cls) -> str:
        """The method's PEFT type: ``ORCHMOE_<METHOD>`` (PEFT's own LORA and POLY keep their names)."""
        return f"ORCHMOE_{cls.method.upper()}"

    def __post_init__(self) -> None:
        self.peft_type = _peft_type(self.peft_type_name())
        super().__post_init__()  # PEFT's checks (task_type) and peft_version
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = (
                sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
            )
        if isinstance(self.alpha, int) and not isinstance(self.alpha, bool):
            self.alpha = float(self.alpha)
        self.validate()


@dataclass
class LoraConfig(AdapterConfig):
    """Plain LoRA: one (A, B) pair per layer, no router."""

    method: ClassVar[str] = "lora"
    small_fields: ClassVar[dict[str, Any]] = {"rank": 4}


@dataclass
class MoLoRAConfig(AdapterConfig):
    """Per-token softmax over S LoRA experts (output mixing), optional top-k and
    Switch load balancing; ``shared_down`` gives MoLoRA-SD / HydraLoRA."""

    method: ClassVar[str] = "molora"
    small_fields: ClassVar[dict[str, Any]] = {"n_skills": 4, "rank": 2, "top_k": 2, "aux_loss_coef": 0.01}
    routing: ClassVar[str] = "tokens"
    n_skills: int = option(4, "number of experts S")
    rank: int = option(2, "LoRA rank r of each expert")
    top_k: int | None = option(None, "keep the top-k experts per token (renormalised); None: dense softmax")
    aux_loss_coef: float = option(0.01, "weight of the Switch load-balancing loss")
    shared_down: bool = option(False, "one down-projection A shared by all experts (MoLoRA-SD / HydraLoRA)")

    @property
    def n_experts(self) -> int:
        """S = ``n_skills``."""
        return self.n_skills

    @property
    def shares_down_projection(self) -> bool:
        """``shared_down``."""
        return self.shared_down

    @property
    def n_blocks(self) -> int:
        """Rank blocks routed separately: 1 (one softmax over the experts per token)."""
        return 1

    def layer_parameters(self, P: int, Q: int) -> int:
        """S experts' B and A (one shared A with ``shared_down``) plus the P x S router."""
        S, r = self.n_skills, self.rank
        return (r * P if self.shared_down else S * r * P) + S * r * Q + P * S

    def validate(self) -> None:
        """The shared checks, plus ``n_skills >= 1``, ``top_k`` in [1, n_skills], ``aux_loss_coef >= 0``."""
        super().validate()
        self._positive("n_skills")
        if self.top_k is not None and not 1 <= self.top_k <= self.n_skills:
            raise ConfigError(f"MoLoRAConfig: top_k must be in [1, n_skills={self.n_skills}], got {self.top_k}")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"MoLoRAConfig: aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


@dataclass
class PolyConfig(AdapterConfig):
    """Poly: per-task Gumbel-sigmoid allocation over S skills, parameter mixing.
    ``n_splits > 1`` routes each of h input/output blocks separately (MHR)."""

    method: ClassVar[str] = "poly"
    small_fields: ClassVar[dict[str, Any]] = {"n_skills": 4, "rank": 2}
    routing: ClassVar[str] = "task_ids"
    n_tasks: int = option(1, "number of training tasks T (set by the recipe from the data)")
    n_skills: int = option(4, "number of skills S")
    rank: int = option(2, "LoRA rank r of each skill")
    n_splits: int = option(1, "routing blocks per layer h (MHR)")  # type: ignore[assignment]

    @property
    def n_experts(self) -> int:
        """S = ``n_skills``."""
        return self.n_skills

    def layer_parameters(self, P: int, Q: int) -> int:
        """S experts of rank r plus the layer's T x h x S allocation logits."""
        return self.n_skills * self.rank * (P + Q) + self.n_tasks * self.n_splits * self.n_skills

    def for_tasks(self, n_tasks: int, explicit: set[str] | frozenset[str] = frozenset()) -> AdapterConfig:
        """``n_tasks`` set to the run's task count; a different value the user set is a `ConfigError`."""
        if "n_tasks" in explicit and self.n_tasks != n_tasks:
            raise ConfigError(f"{self.method}: n_tasks is the number of training tasks ({n_tasks}); do not set it")
        return self.replace(n_tasks=n_tasks)

    def validate(self) -> None:
        """The shared checks, plus ``n_tasks``, ``n_skills`` and ``n_splits`` >= 1."""
        super().validate()
        self._positive("n_tasks", "n_skills", "n_splits")


@dataclass
class MHRConfig(PolyConfig):
    """Multi-Head Routing: Poly with h routing blocks per layer."""

    method: ClassVar[str] = "mhr"
    small_fields: ClassVar[dict[str, Any]] = {"n_skills": 4, "rank": 2, "n_splits": 4}
    n_splits: int = option(8, "routing blocks per layer h")  # type: ignore[assignment]


@dataclass
class MoDEConfig(AdapterConfig):
    """Mixture of Dyadic Experts, generalised m x r x p: one shared down-projection
    A (P x r); for each block of p rank columns a per-token softmax over m experts
    of rank p. p = r is MoLoRA-SD, m = 1 is LoRA."""

    method: ClassVar[str] = "mode"
    small_fields: ClassVar[dict[str, Any]] = {"n_skills": 3, "rank": 4, "expert_rank": 2}
    routing: ClassVar[str] = "tokens"
    n_skills: int = option(4, "experts per rank block m")
    rank: int = option(4, "rank r of the shared down-projection")
    expert_rank: int = option(1, "rank p of each expert (p divides r)")

    @property
    def n_experts(self) -> int:
        """m = ``n_skills`` experts per rank block."""
        return self.n_skills

    @property
    def shares_down_projection(self) -> bool:
        """Always True: one down-projection A (P x r)."""
        return True

    @property
    def n_blocks(self) -> int:
        """Rank blocks routed separately, r / p."""
        return self.rank // self.expert_rank

    def layer_parameters(self, P: int, Q: int) -> int:
        """The shared A (P x r), m up-projections (r x Q) and the P x (r/p * m) router."""
        m, r = self.n_skills, self.rank
        return r * P + m * r * Q + self.n_blocks * m * P

    def validate(self) -> None:
        """The shared checks, plus ``n_skills, expert_rank >= 1`` and ``expert_rank`` dividing ``rank``."""
        super().validate()
        self._positive("n_skills", "expert_rank")
        if self.rank % self.expert_rank:
            raise ConfigError(f"MoDEConfig: expert_rank (p={self.expert_rank}) must divide rank (r={self.rank})")


PROMPT_NORMS = ("standardize", "layernorm", "none")


@dataclass
class OrchMoEConfig(AdapterConfig):
    """OrchMoE: a prompt-level Task Router (pi over K abstract tasks) times a
    per-layer Skill Router (Gumbel-sigmoid W_skill, K x S); Poly-style
    parameter mixing; no task id."""

    method: ClassVar[str] = "orchmoe"
    small_fields: ClassVar[dict[str, Any]] = {"n_skills": 4, "rank": 2}
    routing: ClassVar[str] = "prompt"
    n_skills: int = option(4, "number of skills S")
    rank: int = option(2, "LoRA rank r of each skill")
    n_abstract_tasks: int = option(16, "abstract tasks K (the recipe defaults it to the number of training tasks)")
    task_temperature: float = option(1.0, "softmax temperature of the Task Router")
    task_router_hidden: int = option(0, "0: linear Task Router; > 0: one hidden layer of this width")
    hard_routing: bool = option(False, "straight-through Gumbel-softmax over abstract tasks")
    balance_coef: float = option(0.0, "weight of the balance term on the batch mean of pi")
    prompt_norm: str = option("standardize", "u(x) before the router: standardize (running stats), layernorm, none")

    @property
    def n_experts(self) -> int:
        """S = ``n_skills``."""
        return self.n_skills

    def layer_parameters(self, P: int, Q: int) -> int:
        """S experts of rank r plus the layer's K x S Skill Router logits."""
        return self.n_skills * self.rank * (P + Q) + self.n_abstract_tasks * self.n_skills

    def model_parameters(self, d_model: int) -> int:
        """The Task Router: a linear d x K with bias, or d -> hidden -> K with biases."""
        K, H = self.n_abstract_tasks, self.task_router_hidden
        return d_model * H + H + H * K + K if H > 0 else d_model * K + K

    @classmethod
    def upgrade_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """0.1 saved ``normalize_prompt`` (a bool) where 0.2 has ``prompt_norm``."""
        if "normalize_prompt" in fields:
            fields = dict(fields)
            fields["prompt_norm"] = "layernorm" if fields.pop("normalize_prompt") else "none"
        return fields

    def for_tasks(self, n_tasks: int, explicit: set[str] | frozenset[str] = frozenset()) -> AdapterConfig:
        """K = T unless set: the paper's setting (its Figure 3 uses K = 100 on NI-100)."""
        return self if "n_abstract_tasks" in explicit else self.replace(n_abstract_tasks=n_tasks)

    def validate(self) -> None:
        """The shared checks, plus ``n_skills``, ``n_abstract_tasks`` >= 1, ``task_temperature`` > 0,
        ``task_router_hidden``, ``balance_coef`` >= 0 and a known ``prompt_norm``."""
        super().validate()
        self._positive("n_skills", "n_abstract_tasks")
        if self.task_temperature <= 0:
            raise ConfigError(f"OrchMoEConfig: task_temperature must be > 0, got {self.task_temperature}")
        if self.task_router_hidden < 0:
            raise ConfigError(
                f"OrchMoEConfig: task_router_hidden must be >= 0 (0: linear router), got {self.task_router_hidden}"
            )
        if self.balance_coef < 0:
            raise ConfigError(f"OrchMoEConfig: balance_coef must be >= 0, got {self.balance_coef}")
        if self.prompt_norm not in PROMPT_NORMS:
            raise ConfigError(f"OrchMoEConfig: prompt_norm must be one of {PROMPT_NORMS}, got {self.prompt_norm!r}")


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build a config from ``{"method": ..., **fields}`` (the JSON an adapter is saved with).

    Raises:
        ConfigError: not a mapping, an unknown method or field, or invalid values.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"an adapter config must be a mapping, got {type(d).__name__}")
    d = dict(d)
    method = d.pop("method", None)
    try:
        cls = config_class(method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    d = cls.upgrade_fields(d)
    names = {f.name for f in dataclasses.fields(cls)}
    d.pop("peft_type", None)  # the method's own (set by the config)
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**d)
