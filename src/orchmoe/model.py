"""`RoutedModel`: a frozen transformers model with routed LoRA experts injected.

It feels like a PEFT model: `get_model(base, config)`, `print_trainable_parameters()`,
`forward(...)`/`generate(...)` with the base model's arguments (plus `task_ids` for
Poly/MHR), `save_adapter()` / `load_adapter()` as safetensors + JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import AdapterConfig, ConfigError, LoraConfig, MoDEConfig, MoLoRAConfig, OrchMoEConfig, PolyConfig, config_from_dict
from .layer import RoutedLoraLayer
from .routers import ConstantRouter, PolyRouter, SkillRouter, TaskRouter, TokenRouter
from .routing import RoutingError, RoutingState
from .targets import find_target_layers

__all__ = ["RoutedModel", "get_model", "load_adapter", "AdapterMismatchError", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "d_model", "n_embd", "num_hidden_layers",
                     "num_layers", "n_layer", "num_decoder_layers", "intermediate_size", "d_ff")


class AdapterMismatchError(ValueError):
    """An adapter file that does not fit the model it is loaded onto."""


def _router_for(config: AdapterConfig, in_features: int) -> nn.Module:
    if isinstance(config, LoraConfig):
        return ConstantRouter()
    if isinstance(config, PolyConfig):  # Poly and MHR
        return PolyRouter(config.n_tasks, config.n_skills, config.n_splits)
    if isinstance(config, OrchMoEConfig):
        return SkillRouter(config.n_abstract_tasks, config.n_skills)
    if isinstance(config, MoLoRAConfig):
        return TokenRouter(in_features, config.n_skills, 1, config.top_k, config.aux_loss_coef)
    if isinstance(config, MoDEConfig):
        return TokenRouter(in_features, config.n_skills, config.n_blocks)
    raise ConfigError(f"no router for {type(config).__name__}")


def _layer_for(config: AdapterConfig, base_layer: nn.Module, in_features: int) -> RoutedLoraLayer:
    return RoutedLoraLayer(
        base_layer,
        n_experts=config.n_experts,
        rank=config.rank,
        scale=config.scale,
        router=_router_for(config, in_features),
        shared_down=isinstance(config, MoDEConfig) or (isinstance(config, MoLoRAConfig) and config.shared_down),
        n_splits=getattr(config, "n_splits", 1),
        dropout=config.dropout,
    )


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    return {k: d[k] for k in _FINGERPRINT_KEYS if k in d}


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or ""
    return str(name) or type(model).__name__


class RoutedModel(nn.Module):
    """A base model whose target layers carry routed low-rank experts; everything else frozen."""

    def __init__(self, base_model: nn.Module, config: AdapterConfig, base_model_name: str | None = None) -> None:
        super().__init__()
        config.validate()
        self.base_model = base_model
        self.adapter_config = config
        self.base_model_name = base_model_name or _model_name(base_model)
        self.is_encoder_decoder = bool(getattr(getattr(base_model, "config", None), "is_encoder_decoder", False))
        self.routing_state = RoutingState()
        if any(isinstance(m, RoutedLoraLayer) for m in base_model.modules()):
            raise ValueError(f"{type(base_model).__name__} already carries routed adapters: build a RoutedModel on a fresh base model")
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.layer_shapes = find_target_layers(base_model, config.target_modules)
        for path, (P, _) in self.layer_shapes.items():
            parent_path, _, leaf = path.rpartition(".")
            parent = base_model.get_submodule(parent_path) if parent_path else base_model
            layer = _layer_for(config, getattr(parent, leaf), P)
            layer.state = self.routing_state
            setattr(parent, leaf, layer)
        if self.is_encoder_decoder:  # decoder tokens are not the input's: their routers read the decoder mask
            get_decoder = getattr(base_model, "get_decoder", None)
            decoder = get_decoder() if callable(get_decoder) else None
            if isinstance(decoder, nn.Module) and decoder is not base_model:
                for layer in decoder.modules():
                    if isinstance(layer, RoutedLoraLayer):
                        layer.router.decoder_side = True
        self.task_router: TaskRouter | None = None
        if isinstance(config, OrchMoEConfig):
            emb = base_model.get_input_embeddings()
            self.task_router = TaskRouter(emb.embedding_dim, config.n_abstract_tasks, config.task_temperature,
                                          config.task_router_hidden, config.hard_routing, config.prompt_norm)
            self.task_router.to(emb.weight.device)

    # -- PEFT-like conveniences --------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def routed_layers(self) -> dict[str, RoutedLoraLayer]:
        return {p: m for p, m in self.base_model.named_modules() if isinstance(m, RoutedLoraLayer)}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters (what trains): experts, routers and the task router, keyed by
        base-model path. The saved adapter also holds `adapter_buffers()`."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.routed_layers.items():
            out[f"{path}.lora_A"] = layer.lora_A
            out[f"{path}.lora_B"] = layer.lora_B
            for n, p in layer.router.named_parameters():
                out[f"{path}.router.{n}"] = p
        if self.task_router is not None:
            for n, p in self.task_router.named_parameters():
                out[f"task_router.{n}"] = p
        return out

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Adapter state that is not trained but is needed to reproduce outputs: the Task Router's
        prompt-summary statistics. Saved, loaded and checkpointed with the weights."""
        if self.task_router is None:
            return {}
        return {f"task_router.{n}": b for n, b in self.task_router.named_buffers()}

    def num_parameters_split(self) -> tuple[int, int]:
        """(trainable adapter parameters, all parameters)."""
        adapter = sum(p.numel() for p in self.adapter_state_dict().values())
        total = sum(p.numel() for p in self.parameters())
        return adapter, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_parameters_split()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
              f" || method: {self.adapter_config.method}")

    def parameter_groups(self, lr: float, router_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Two-speed optimiser groups, as Poly trains: the task-skill allocation logits (Poly/MHR Z,
        OrchMoE W_skill) learn at `router_lr`; experts and the dense routers (OrchMoE's Task Router,
        MoLoRA/MoDE token routers) at `lr`. A dense projection of a d-wide input at the fast rate moves
        every logit by ~d*router_lr per Adam step and collapses routing onto one choice (seen with
        OrchMoE: every task on one abstract task after 75 steps at 1e-2)."""
        groups: dict[str, list] = {"experts": [], "allocation": [], "routers": []}
        for name, p in self.adapter_state_dict().items():
            if p.requires_grad:
                kind = ("experts" if name.endswith((".lora_A", ".lora_B"))
                        else "allocation" if name.endswith(".router.logits") else "routers")
                groups[kind].append(p)
        rates = {"experts": lr, "allocation": lr if router_lr is None else router_lr, "routers": lr}
        return [{"params": ps, "lr": rates[k], "weight_decay": weight_decay if k == "experts" else 0.0, "name": k}
                for k, ps in groups.items() if ps or k == "experts"]

    def set_adapters_enabled(self, enabled: bool) -> None:
        for layer in self.routed_layers.values():
            layer.disabled = not enabled

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Non-reentrant by default: recomputation re-reads the same routing context, so routers get gradients.

        Also reachable as `activation_checkpointing_enable` (the transformers >= 5 name, used when the base has it).
        """
        ckpt = {"use_reentrant": False, **(gradient_checkpointing_kwargs or kwargs.pop("activation_checkpointing_kwargs", None) or {})}
        cfg = self.adapter_config
        if ckpt["use_reentrant"] and (isinstance(cfg, OrchMoEConfig) or (isinstance(cfg, MoLoRAConfig) and cfg.aux_loss_coef > 0)):
            # A reentrant checkpoint runs its forward without autograd and backpropagates only to its explicit
            # inputs: the prompt-level pi (computed once, outside the layers) cannot get its gradient back, and a
            # balance loss computed inside the checkpoint would be silently dropped.
            raise ConfigError(f"{cfg.method} needs non-reentrant checkpointing (use_reentrant=False, the default): "
                              "reentrant checkpointing loses the task-router gradient / the load-balancing loss")
        if hasattr(self.base_model, "activation_checkpointing_enable"):
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:  # transformers 4
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
        if ckpt["use_reentrant"]:
            self.base_model.enable_input_require_grads()

    activation_checkpointing_enable = gradient_checkpointing_enable

    # -- routing -----------------------------------------------------------
    def prompt_summary(self, input_ids=None, attention_mask=None, inputs_embeds=None, prompt_mask=None) -> torch.Tensor:
        """u(x): masked mean of the frozen input embeddings over the prompt tokens, (b, d)."""
        with torch.no_grad():
            emb = inputs_embeds if inputs_embeds is not None else self.base_model.get_input_embeddings()(input_ids)  # (b,n,d)
        mask = prompt_mask if prompt_mask is not None else attention_mask
        if mask is None:
            mask = torch.ones(emb.shape[:2], device=emb.device)
        m = mask.to(device=emb.device, dtype=torch.float32).unsqueeze(-1)  # (b,n,1)
        return (emb.detach().float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (b,d), fp32 whatever the base dtype

    def _prompt_mask(self, attention_mask, labels, routing_mask, shape) -> torch.Tensor:
        if routing_mask is not None:
            return routing_mask
        mask = attention_mask if attention_mask is not None else torch.ones(shape, dtype=torch.long, device=self.device)
        if labels is not None and not self.is_encoder_decoder and labels.shape == mask.shape:
            prompt = mask.bool() & (labels == -100)  # the answer tokens carry labels; the prompt does not
            empty = ~prompt.any(dim=1, keepdim=True)  # plain LM rows: every token is "prompt"
            mask = torch.where(empty, mask.bool(), prompt)
        return mask

    def task_probabilities(self, input_ids=None, attention_mask=None, inputs_embeds=None, prompt_mask=None) -> torch.Tensor:
        """pi(x) over abstract tasks for a batch of prompts (OrchMoE only), (b, K)."""
        if self.task_router is None:
            raise ConfigError(f"{self.adapter_config.method} has no task router")
        return self.task_router(self.prompt_summary(input_ids, attention_mask, inputs_embeds, prompt_mask))

    def set_routing(self, *, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    task_ids=None, routing_mask=None, decoder_attention_mask=None) -> None:
        """Fill the routing context for the next forward(s): once per prompt batch."""
        cfg = self.adapter_config
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise RoutingError("routing needs input_ids or inputs_embeds")
        shape = ref.shape[:2]
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids, dtype=torch.long, device=ref.device).reshape(-1)
            if task_ids.numel() != shape[0]:
                raise RoutingError(f"got {task_ids.numel()} task_ids for a batch of {shape[0]}")
        probs = None
        if isinstance(cfg, PolyConfig):
            if task_ids is None:
                raise RoutingError(f"{cfg.method} routes by task id: pass task_ids=... (one per example) to forward()/generate()")
            bad = task_ids[(task_ids < -1) | (task_ids >= cfg.n_tasks)]
            if bad.numel():
                raise RoutingError(f"task id {int(bad[0])} out of range: this {cfg.method} adapter has n_tasks={cfg.n_tasks} "
                                   f"(ids 0..{cfg.n_tasks - 1}, or -1 for an unseen task)")
        elif isinstance(cfg, OrchMoEConfig):
            prompt_mask = self._prompt_mask(attention_mask, labels, routing_mask, shape)
            probs = self.task_probabilities(input_ids, attention_mask, inputs_embeds, prompt_mask)
        decoder_mask = None
        if self.is_encoder_decoder:
            decoder_mask = decoder_attention_mask if decoder_attention_mask is not None else (
                labels != -100 if labels is not None else None)
        self.routing_state.set(task_ids=task_ids, task_probs=probs, token_mask=attention_mask, decoder_token_mask=decoder_mask)
        if probs is not None and cfg.balance_coef > 0 and self.training and torch.is_grad_enabled():
            self.routing_state.add_aux_loss(cfg.balance_coef * TaskRouter.balance_loss(probs))

    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, routing_mask=None, **kwargs):
        reuse = self.routing_state.ready and (
            _continues_decode(kwargs)  # a continued decode keeps its prompt's routing
            or (input_ids is None and kwargs.get("inputs_embeds") is None and kwargs.get("encoder_outputs") is not None
                and task_ids is None))  # a decoder step over an already encoded prompt
        if not reuse:
            self.set_routing(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=kwargs.get("inputs_embeds"),
                             labels=labels, task_ids=task_ids, routing_mask=routing_mask,
                             decoder_attention_mask=kwargs.get("decoder_attention_mask"))
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux = self.routing_state.aux_losses
        if aux:
            device = out["loss"].device if out.get("loss") is not None else aux[0].device  # layers may sit on several devices
            total = torch.stack([a.float().to(device) for a in aux]).sum()
            if out.get("loss") is not None:
                out["loss"] = out["loss"] + total.to(out["loss"].dtype)
            out["aux_loss"] = total
        return out

    def _routers(self) -> list[nn.Module]:
        routers = [layer.router for layer in self.routed_layers.values()]
        return routers + ([self.task_router] if self.task_router is not None else [])

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, routing_mask=None, **kwargs):
        """Routing computed once from the prompt and held for every decoding step and beam.

        The routers run in evaluation mode whatever the model's mode: a training-mode
        router would draw a new Gumbel sample at every decoding step, so the tokens
        already in the KV cache would have been computed under another routing.
        """
        routers = self._routers()
        modes = [r.training for r in routers]
        for r in routers:
            r.eval()
        try:
            self.set_routing(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=kwargs.get("inputs_embeds"),
                             task_ids=task_ids, routing_mask=routing_mask)
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            return self.base_model.generate(attention_mask=attention_mask, **kwargs)
        finally:
            for r, mode in zip(routers, modes):
                r.train(mode)

    # -- persistence -------------------------------------------------------
    def save_adapter(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """safetensors weights + JSON (method, sizes, base model, layer shapes), written atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = self.adapter_state_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**params, **self.adapter_buffers()}.items()}
        meta = {
            "format": "orchmoe-adapter",
            "orchmoe_version": __version__,
            "method": self.adapter_config.method,
            "config": self.adapter_config.to_dict(),
            "base_model": {"name": self.base_model_name, **model_fingerprint(self.base_model)},
            "layers": {k: list(v) for k, v in self.layer_shapes.items()},
            "trainable_parameters": sum(p.numel() for p in params.values()),
            "metadata": metadata or {},
        }
        _atomic_write(path / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        _atomic_write(path / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
        return path

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        weights_file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
        if not weights_file.exists():
            raise FileNotFoundError(f"no adapter weights at {weights_file}")
        loaded = load_file(str(weights_file))
        own = {**self.adapter_state_dict(), **self.adapter_buffers()}
        missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        if missing or unexpected:
            raise AdapterMismatchError(f"{weights_file}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        with torch.no_grad():
            for k, p in own.items():
                if tuple(loaded[k].shape) != tuple(p.shape):
                    raise AdapterMismatchError(f"{weights_file}: {k} has shape {tuple(loaded[k].shape)}, model expects {tuple(p.shape)}")
                p.copy_(loaded[k].to(p.dtype))

    # -- export ------------------------------------------------------------
    def export_peft_lora(self, path, **routing) -> Path:
        from .export import export_peft_lora

        return export_peft_lora(self, path, **routing)

    def merge_and_unload(self, **routing) -> nn.Module:
        from .export import merge_and_unload

        return merge_and_unload(self, **routing)


def _continues_decode(kwargs: dict) -> bool:
    cache = kwargs.get("past_key_values")
    if cache is not None:
        length = getattr(cache, "get_seq_length", None)
        return length() > 0 if callable(length) else True
    return False


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def get_model(base_model: nn.Module, config: AdapterConfig, base_model_name: str | None = None) -> RoutedModel:
    """Inject `config`'s routed experts into `base_model` (in place) and freeze the rest."""
    return RoutedModel(base_model, config, base_model_name)


def read_adapter_config(path: str | os.PathLike) -> dict:
    file = Path(path) / ADAPTER_CONFIG
    if not file.exists():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}: not an orchmoe adapter folder")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterMismatchError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != "orchmoe-adapter":
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterMismatchError(f"{file} is not an orchmoe adapter config (format={fmt!r})")
    missing = [k for k in ("config", "layers") if not isinstance(meta.get(k), dict)]
    if missing:
        raise AdapterMismatchError(f"{file} is incomplete: no {' or '.join(repr(k) for k in missing)} section")
    return meta


def load_adapter(base_model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False,
                 base_model_name: str | None = None) -> RoutedModel:
    """Rebuild a saved adapter onto `base_model`; a model of another shape is a clear error."""
    meta = read_adapter_config(path)
    saved = meta.get("base_model", {})
    ours = model_fingerprint(base_model)
    diff = {k: (saved[k], ours[k]) for k in ours if k in saved and saved[k] != ours[k]}
    if diff:
        details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise AdapterMismatchError(f"adapter in {path} was saved for another model ({saved.get('name')!r}): {details}")
    config = config_from_dict(meta["config"])
    shapes = find_target_layers(base_model, config.target_modules)
    want = {k: tuple(v) for k, v in meta["layers"].items()}
    if shapes != want:
        off = sorted(set(shapes.items()) ^ set(want.items()))[:3]
        raise AdapterMismatchError(f"adapter in {path} was saved for other layers than this model has (first differences: {off})")
    model = get_model(base_model, config, base_model_name or saved.get("name"))
    model.load_adapter_weights(path)
    model.adapter_metadata = meta.get("metadata", {})
    model.train(is_trainable)
    if not is_trainable:
        for p in model.adapter_state_dict().values():
            p.requires_grad_(False)
    return model
