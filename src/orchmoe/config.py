"""Adapter configurations: one dataclass per method.

A method is a config plus its router; every method shares the same
mixture-of-low-rank-experts layer (`orchmoe.layer.RoutedLoraLayer`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "MoLoRAConfig",
    "PolyConfig",
    "MHRConfig",
    "MoDEConfig",
    "OrchMoEConfig",
    "METHODS",
    "config_from_dict",
    "ConfigError",
]


class ConfigError(ValueError):
    """An adapter configuration that cannot be built."""


@dataclass
class AdapterConfig:
    """Fields shared by every method.

    target_modules: leaf names matched as a suffix of the module path
    (``["q_proj", "v_proj"]``) or one regular expression matched against the
    whole path; ``None`` picks the usual attention projections of the model type.
    """

    method: ClassVar[str] = ""
    needs_task_ids: ClassVar[bool] = False

    target_modules: list[str] | str | None = None
    rank: int = 8
    alpha: float | None = None  # update scale is alpha / rank; None -> method default
    dropout: float = 0.0

    # -- shared helpers ---------------------------------------------------
    @property
    def n_experts(self) -> int:
        return 1

    @property
    def scale(self) -> float:
        alpha = self.default_alpha() if self.alpha is None else self.alpha
        return float(alpha) / self.rank

    def default_alpha(self) -> float:
        return float(self.rank)

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"{type(self).__name__}: rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{type(self).__name__}: dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple)):
            raise ConfigError(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d.get("target_modules"), tuple):
            d["target_modules"] = list(d["target_modules"])
        return {"method": self.method, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "AdapterConfig":
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()


@dataclass
class LoraConfig(AdapterConfig):
    """Plain LoRA: one (A, B) pair per layer, no router."""

    method: ClassVar[str] = "lora"
    rank: int = 8


@dataclass
class MoLoRAConfig(AdapterConfig):
    """Per-token softmax over S LoRA experts (output mixing), optional top-k and
    Switch load balancing; ``shared_down`` gives MoLoRA-SD / HydraLoRA."""

    method: ClassVar[str] = "molora"
    n_skills: int = 4
    rank: int = 2
    top_k: int | None = None
    aux_loss_coef: float = 0.01
    shared_down: bool = False

    @property
    def n_experts(self) -> int:
        return self.n_skills

    def validate(self) -> None:
        super().validate()
        if self.n_skills < 1:
            raise ConfigError(f"MoLoRAConfig: n_skills must be >= 1, got {self.n_skills}")
        if self.top_k is not None and not 1 <= self.top_k <= self.n_skills:
            raise ConfigError(f"MoLoRAConfig: top_k must be in [1, n_skills={self.n_skills}], got {self.top_k}")
        if self.aux_loss_coef < 0:
            raise ConfigError("MoLoRAConfig: aux_loss_coef must be >= 0")


@dataclass
class PolyConfig(AdapterConfig):
    """Poly: per-task Gumbel-sigmoid allocation over S skills, parameter mixing.
    ``n_splits > 1`` routes each of h input/output blocks separately (MHR)."""

    method: ClassVar[str] = "poly"
    needs_task_ids: ClassVar[bool] = True
    n_tasks: int = 1
    n_skills: int = 4
    rank: int = 2
    n_splits: int = 1

    @property
    def n_experts(self) -> int:
        return self.n_skills

    def default_alpha(self) -> float:
        return 1.0  # y = x W0 + (1/r) x A_t B_t, as in the reference code and PEFT

    def validate(self) -> None:
        super().validate()
        if self.n_tasks < 1:
            raise ConfigError(f"{type(self).__name__}: n_tasks must be >= 1 (the number of training tasks), got {self.n_tasks}")
        if self.n_skills < 1:
            raise ConfigError(f"{type(self).__name__}: n_skills must be >= 1, got {self.n_skills}")
        if self.n_splits < 1:
            raise ConfigError(f"{type(self).__name__}: n_splits must be >= 1, got {self.n_splits}")


@dataclass
class MHRConfig(PolyConfig):
    """Multi-Head Routing: Poly with h routing blocks per layer."""

    method: ClassVar[str] = "mhr"
    n_splits: int = 8


@dataclass
class MoDEConfig(AdapterConfig):
    """Mixture of Dyadic Experts, generalised m x r x p: one shared down-projection
    A (P x r); for each block of p rank columns a per-token softmax over m experts
    of rank p. p = r is MoLoRA-SD, m = 1 is LoRA."""

    method: ClassVar[str] = "mode"
    n_skills: int = 4  # m
    rank: int = 4  # r
    expert_rank: int = 1  # p

    @property
    def n_experts(self) -> int:
        return self.n_skills

    @property
    def n_blocks(self) -> int:
        return self.rank // self.expert_rank

    def validate(self) -> None:
        super().validate()
        if self.n_skills < 1:
            raise ConfigError(f"MoDEConfig: n_skills (m) must be >= 1, got {self.n_skills}")
        if self.expert_rank < 1 or self.rank % self.expert_rank:
            raise ConfigError(
                f"MoDEConfig: expert_rank (p={self.expert_rank}) must divide rank (r={self.rank})"
            )


@dataclass
class OrchMoEConfig(AdapterConfig):
    """OrchMoE: a prompt-level Task Router (pi over K abstract tasks) times a
    per-layer Skill Router (Gumbel-sigmoid W_skill, K x S); Poly-style
    parameter mixing; no task id."""

    method: ClassVar[str] = "orchmoe"
    n_skills: int = 4
    rank: int = 2
    n_abstract_tasks: int = 16
    task_temperature: float = 1.0
    task_router_hidden: int = 0  # 0: linear router; >0: one hidden layer MLP
    hard_routing: bool = False  # straight-through Gumbel-softmax over abstract tasks
    balance_coef: float = 0.0  # balance term on the batch mean of pi
    prompt_norm: str = "standardize"  # u(x) before the router: "standardize" (running stats + layer norm), "layernorm", "none"

    @property
    def n_experts(self) -> int:
        return self.n_skills

    def default_alpha(self) -> float:
        return 1.0

    def validate(self) -> None:
        super().validate()
        if self.n_skills < 1:
            raise ConfigError(f"OrchMoEConfig: n_skills must be >= 1, got {self.n_skills}")
        if self.n_abstract_tasks < 1:
            raise ConfigError(f"OrchMoEConfig: n_abstract_tasks must be >= 1, got {self.n_abstract_tasks}")
        if self.task_temperature <= 0:
            raise ConfigError("OrchMoEConfig: task_temperature must be > 0")
        if self.task_router_hidden < 0:
            raise ConfigError(f"OrchMoEConfig: task_router_hidden must be >= 0 (0: linear router), got {self.task_router_hidden}")
        if self.balance_coef < 0:
            raise ConfigError("OrchMoEConfig: balance_coef must be >= 0")
        if self.prompt_norm not in ("standardize", "layernorm", "none"):
            raise ConfigError(f"OrchMoEConfig: prompt_norm must be 'standardize', 'layernorm' or 'none', got {self.prompt_norm!r}")


METHODS: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (LoraConfig, MoLoRAConfig, PolyConfig, MHRConfig, MoDEConfig, OrchMoEConfig)
}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build a config from ``{"method": ..., **fields}`` (the JSON an adapter is saved with)."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[method]
    if cls is OrchMoEConfig and "normalize_prompt" in d:  # adapters saved before prompt_norm existed
        d["prompt_norm"] = "layernorm" if d.pop("normalize_prompt") else "none"
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**d)
