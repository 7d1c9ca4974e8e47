"""`RoutedModel`: a frozen transformers model with routed LoRA experts injected.

It behaves like a PEFT model: `get_model(base, config)`, `print_trainable_parameters()`, `forward(...)`/`generate(...)`
with the base model's arguments (plus `task_ids` for Poly/MHR), `save_pretrained()` / `RoutedModel.from_pretrained()` /
`push_to_hub()` for the adapter only, `get_base_model()`, `unload()`, `merge_and_unload()`.

What a method needs is asked of its config and its registered router, never of the config's
class: a `ModelRouter` routes every layer at once before the base model runs (one batched
operation per forward), a `LayerRouter` is built into each adapted layer.

How it fits the Hugging Face tools (a design PEFT's tuner shares):

* the wrapped transformers model is ``self.model`` (`get_base_model()`); ``self.base_model`` is,
  as on any `PreTrainedModel`, its *backbone* (``LlamaModel`` of a ``LlamaForCausalLM``), which
  TRL's fused LM head calls directly before projecting through ``get_output_embeddings()``;
* `forward` routes from its inputs (``labels`` too, so OrchMoE routes from the prompt tokens only), runs the
  transformers model and puts the auxiliary losses (MoLoRA's balance loss) in the output's ``aux_loss`` field
  (`orchmoe.tuner.outputs`), adding them to ``loss``. When a library replaces the instance's ``forward`` (TRL's
  ``add_fused_lm_head``), module hooks do the same around the replacement (`orchmoe.tuner.calls`): every call routes
  first, whatever forward runs. ``task_ids`` and ``routing_mask`` never reach the transformers model;
* a trainer that computes its own loss from other fields (TRL's SFTTrainer uses the fused ``log_probs``) collects
  the auxiliary losses instead (`aux_loss_collector`, as `orchmoe.integrations.RoutedTrainer` does);
* ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` are the adapter's, never forwarded to the base model;
  nor are transformers' own PEFT-adapter methods (``load_adapter``, ``add_adapter``, ...), which would inject a
  second kind of adapter. Other attributes (``config``, ``generation_config``, ``device``, ...) are the base model's.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from orchmoe.adapters.export import ExportMixin
from orchmoe.adapters.folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    adapter_config_from_meta,
    model_fingerprint,
    read_adapter_config,
)
from orchmoe.adapters.hub import AdapterHubMixin, model_source
from orchmoe.adapters.state import DEFAULT_ROUTER_LR, AdapterStateMixin
from orchmoe.core.config import AdapterConfig, ConfigError
from orchmoe.core.layer import RoutedLoraLayer
from orchmoe.core.registry import router_class
from orchmoe.core.routers import LayerRouter, RoutingInputs
from orchmoe.core.routing import RoutingError, RoutingState, prompt_token_mask
from orchmoe.core.targets import find_target_layers
from orchmoe.tuner.calls import attach_aux, finish_call, route_before_call, route_call
from orchmoe.tuner.sharding import generation_context

__all__ = [
    "RoutedModel",
    "get_model",
    "load_adapter",
    "AdapterMismatchError",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_ROUTER_LR",
    "read_adapter_config",
]

#: attributes of a transformers model never reached through a RoutedModel (its persistence methods are the
#: adapter's own, defined on RoutedModel): transformers' PEFT integration would add a second adapter
_NOT_FORWARDED = {
    "load_adapter": "use orchmoe.load_adapter(base_model, path) or RoutedModel.from_pretrained(base_model, path)",
    "add_adapter": "a RoutedModel already carries its adapter",
    "set_adapter": "a RoutedModel has one adapter",
    "delete_adapter": "a RoutedModel has one adapter; unload() restores the base model",
    "enable_adapters": "use set_adapters_enabled(True)",
    "disable_adapters": "use set_adapters_enabled(False) or the disable_adapter() context",
    "active_adapters": "a RoutedModel has one adapter",
    "active_adapter": "a RoutedModel has one adapter",
    "get_adapter_state_dict": "use adapter_state_dict()",
}


def _model_name(model: nn.Module) -> str:
    return model_source(model) or type(model).__name__


class RoutedModel(AdapterStateMixin, AdapterHubMixin, ExportMixin, nn.Module):
    """A base model whose target layers carry routed low-rank experts; everything else frozen (see `get_model`).

    Attributes:
        model: the wrapped transformers model (also `get_base_model()`).
        base_model_name: the portable name recorded in saved adapters.
        base_model_source: the path or hub id the base model loads from (exports name it).
        aux_loss_in_loss: whether a forward adds the auxiliary losses to ``loss`` (default True).
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: AdapterConfig,
        base_model_name: str | None = None,
        base_model_source: str | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        if any(isinstance(m, RoutedLoraLayer) for m in base_model.modules()):
            raise ValueError(
                f"{type(base_model).__name__} already carries routed adapters: build a RoutedModel on a fresh "
                "base model (or call unload() on the RoutedModel first)"
            )
        self.model = base_model
        self.adapter_config = config
        self.base_model_name = base_model_name or _model_name(base_model)
        self.base_model_source = base_model_source or model_source(base_model)
        self.is_encoder_decoder = bool(getattr(getattr(base_model, "config", None), "is_encoder_decoder", False))
        self.routing_state = RoutingState()
        self.aux_loss_in_loss = True
        self._aux_sink: list | None = None  # set by aux_loss_collector
        self._routed_call = False  # the pre-hook routed this call
        self._unloaded = False
        self.layer_shapes = find_target_layers(base_model, config.target_modules)
        self._trainable_base = [n for n, p in base_model.named_parameters() if p.requires_grad]  # restored by unload()
        for p in base_model.parameters():
            p.requires_grad_(False)
        router_cls = router_class(config)
        per_layer = issubclass(router_cls, LayerRouter)
        for index, (path, (P, _)) in enumerate(self.layer_shapes.items()):
            parent_path, _, leaf = path.rpartition(".")
            parent = base_model.get_submodule(parent_path) if parent_path else base_model
            layer = RoutedLoraLayer(
                getattr(parent, leaf),
                n_experts=config.n_experts,
                rank=config.rank,
                scale=config.scale,
                shared_down=config.shares_down_projection,
                n_splits=config.n_splits,
                dropout=config.dropout,
                index=index,
                router=router_cls.from_config(config, P) if per_layer else None,
            )
            layer.state = self.routing_state
            setattr(parent, leaf, layer)
        if self.is_encoder_decoder:  # decoder tokens are not the input's: their routers read the decoder mask
            get_decoder = getattr(base_model, "get_decoder", None)
            decoder = get_decoder() if callable(get_decoder) else None
            if isinstance(decoder, nn.Module) and decoder is not base_model:
                for layer in decoder.modules():
                    if isinstance(layer, RoutedLoraLayer) and layer.router is not None:
                        layer.router.decoder_side = True
        self.router: nn.Module | None = None
        if not per_layer:
            emb = base_model.get_input_embeddings()
            self.router = router_cls.from_config(config, len(self.layer_shapes), emb.embedding_dim).to(
                emb.weight.device
            )
        self.register_forward_pre_hook(route_before_call, with_kwargs=True)
        self.register_forward_hook(finish_call, with_kwargs=True)

    @property
    def task_router(self) -> nn.Module | None:
        """OrchMoE's Task Router (None for the other methods)."""
        return getattr(self.router, "task_router", None)

    @property
    def base_model(self) -> nn.Module:
        """The transformers *backbone*, as ``PreTrainedModel.base_model`` (``LlamaModel`` of a ``LlamaForCausalLM``;
        the model itself when it has none, as T5). The whole wrapped model is `get_base_model()`."""
        return getattr(self.model, "base_model", self.model)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the routed layers in it), as ``PeftModel.get_base_model()``."""
        return self.model

    # -- PEFT-like conveniences --------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name in _NOT_FORWARDED:
                why = _NOT_FORWARDED.get(name)
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name!r}" + (f": {why}" if why else "")
                ) from None
            return getattr(self.model, name)

    @property
    def routed_layers(self) -> dict[str, RoutedLoraLayer]:
        """The adapted layers by module path in the base model, in model order."""
        return {p: m for p, m in self.model.named_modules() if isinstance(m, RoutedLoraLayer)}

    def _routers(self) -> list[nn.Module]:
        layer_routers = [layer.router for layer in self.routed_layers.values() if layer.router is not None]
        return layer_routers + ([self.router] if self.router is not None else [])

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Turn every routed layer on or off (off: the base model's outputs); see also `disable_adapter`."""
        for layer in self.routed_layers.values():
            layer.disabled = not enabled

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes as its base model (as ``PeftModel.disable_adapter()``)."""
        layers = list(self.routed_layers.values())
        was = [layer.disabled for layer in layers]
        self.set_adapters_enabled(False)
        try:
            yield
        finally:
            for layer, disabled in zip(layers, was):
                layer.disabled = disabled

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Non-reentrant by default: recomputation re-reads the same routing context, so routers get gradients.

        Also reachable as `activation_checkpointing_enable` (the transformers >= 5 name, used when the base has it).
        """
        ckpt = {
            "use_reentrant": False,
            **(gradient_checkpointing_kwargs or kwargs.pop("activation_checkpointing_kwargs", None) or {}),
        }
        cfg = self.adapter_config
        trainable_router = self.router is not None and any(p.requires_grad for p in self.router.parameters())
        if ckpt["use_reentrant"] and (trainable_router or getattr(cfg, "aux_loss_coef", 0) > 0):
            # A reentrant checkpoint runs its forward without autograd and backpropagates only to its explicit
            # inputs: the routing computed once per forward outside the layers cannot get its gradient back, and
            # a balance loss computed inside the checkpoint would be silently dropped.
            raise ConfigError(
                f"{cfg.method} needs non-reentrant checkpointing (use_reentrant=False, the default): "
                "reentrant checkpointing loses the routers' gradients / the load-balancing loss"
            )
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:  # transformers 4
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
        if ckpt["use_reentrant"]:
            self.model.enable_input_require_grads()

    activation_checkpointing_enable = gradient_checkpointing_enable

    # -- routing -----------------------------------------------------------
    def prompt_summary(self, input_ids=None, attention_mask=None, inputs_embeds=None, prompt_mask=None) -> torch.Tensor:
        """u(x): masked mean of the frozen input embeddings over the prompt tokens, (b, d) fp32. From
        ``input_ids`` (b, n) or ``inputs_embeds`` (b, n, d), over ``prompt_mask`` (b, n), else ``attention_mask``."""
        with torch.no_grad():
            emb = (
                inputs_embeds if inputs_embeds is not None else self.model.get_input_embeddings()(input_ids)
            )  # (b,n,d)
        mask = prompt_mask if prompt_mask is not None else attention_mask
        if mask is None:
            mask = torch.ones(emb.shape[:2], device=emb.device)
        m = mask.to(device=emb.device, dtype=torch.float32).unsqueeze(-1)  # (b,n,1)
        return (emb.detach().float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (b,d), fp32 whatever the base dtype

    def task_probabilities(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, prompt_mask=None
    ) -> torch.Tensor:
        """pi(x) over abstract tasks for a batch of prompts (OrchMoE only), (b, K); arguments as `prompt_summary`."""
        if self.task_router is None:
            raise ConfigError(f"{self.adapter_config.method} has no task router")
        return self.task_router(self.prompt_summary(input_ids, attention_mask, inputs_embeds, prompt_mask))

    def _task_ids(self, task_ids, batch: int, device) -> torch.Tensor | None:
        if task_ids is None:
            return None
        ids = torch.as_tensor(task_ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise RoutingError(f"task_ids must be integers, got {ids.dtype}")
        ids = ids.to(torch.long).reshape(-1)
        if ids.numel() != batch:
            raise RoutingError(f"got {ids.numel()} task_ids for a batch of {batch}")
        n_tasks = getattr(self.adapter_config, "n_tasks", None)
        if n_tasks is not None:
            if ids.device.type == "cpu" and not torch.compiler.is_compiling():  # on the host for free; else no sync
                bad = ids[(ids < -1) | (ids >= n_tasks)]
                if bad.numel():
                    raise RoutingError(
                        f"task id {int(bad[0])} out of range: this {self.adapter_config.method} adapter has "
                        f"n_tasks={n_tasks} (ids 0..{n_tasks - 1}, or -1 for an unseen task)"
                    )
            else:
                torch._assert_async(((ids >= -1) & (ids < n_tasks)).all(), "task id out of range")
        return ids.to(device, non_blocking=True)

    def set_routing(
        self,
        *,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        task_ids=None,
        routing_mask=None,
        decoder_attention_mask=None,
    ) -> None:
        """Fill the routing context for the next forward(s): once per prompt batch.

        Args:
            input_ids, attention_mask, labels, task_ids, routing_mask: as `forward`; inputs_embeds: (b, n, d).
            decoder_attention_mask: (b, m) an encoder-decoder's real decoder tokens (default: ``labels != -100``).
        """
        cfg = self.adapter_config
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise RoutingError("routing needs input_ids or inputs_embeds")
        batch = ref.shape[0]
        inputs = RoutingInputs(batch=batch, task_ids=self._task_ids(task_ids, batch, ref.device))
        if cfg.needs_task_ids and inputs.task_ids is None:
            raise RoutingError(
                f"{cfg.method} routes by task id: pass task_ids=... (one per example) to forward()/generate()"
            )
        if cfg.routing == "prompt":
            mask = (
                routing_mask
                if routing_mask is not None
                else prompt_token_mask(
                    attention_mask, None if self.is_encoder_decoder else labels, ref.shape[:2], ref.device
                )
            )
            inputs.prompt_summary = self.prompt_summary(input_ids, attention_mask, inputs_embeds, mask)
        route = self.router(inputs) if self.router is not None else None
        decoder_mask = None
        if self.is_encoder_decoder:
            decoder_mask = (
                decoder_attention_mask
                if decoder_attention_mask is not None
                else (labels != -100 if labels is not None else None)
            )
        self.routing_state.set(
            task_ids=inputs.task_ids,
            task_probs=route.task_probs if route else None,
            weights=route.weights if route else None,
            token_mask=attention_mask,
            decoder_token_mask=decoder_mask,
        )
        if route is not None and route.aux_loss is not None:
            self.routing_state.add_aux_loss(route.aux_loss)

    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, routing_mask=None, **kwargs):
        """The base model's forward under the routing of these inputs (see `orchmoe.tuner.calls.route_call`).

        Args:
            input_ids, attention_mask, labels, **kwargs: the base model's arguments (``input_ids`` (b, n)).
            task_ids: (b,) one task id per example (Poly/MHR; -1 for an unseen task).
            routing_mask: (b, n) the prompt tokens OrchMoE routes from (default: attended tokens without a label).
        Returns:
            The base model's output with an ``aux_loss`` field (`orchmoe.tuner.outputs`): the auxiliary losses
            (None without any), also added to ``loss`` (unless `aux_loss_collector` collects them).
        """
        direct, self._routed_call = not self._routed_call, False
        if direct:  # not a replacement forward calling ours after the pre-hook routed (orchmoe.tuner.calls)
            call = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                task_ids=task_ids,
                routing_mask=routing_mask,
                **kwargs,
            )
            route_call(self, call)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        return attach_aux(self, out, labels) if direct else out  # else the forward hook attaches them

    @contextlib.contextmanager
    def aux_loss_collector(self):
        """Within the block forwards leave the auxiliary losses out of ``loss`` and append each call's total
        (a tensor with its graph) to the yielded list: for a trainer that adds them itself, scaled to its own
        loss normalisation (gradient accumulation, token-averaged losses, TRL's per-token log-probs).

        Yields:
            The list the auxiliary losses of the block's forwards are appended to.
        """
        previous, sink = self._aux_sink, []
        self._aux_sink = sink
        try:
            yield sink
        finally:
            self._aux_sink = previous

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, routing_mask=None, **kwargs):
        """Routing computed once from the prompt and held for every decoding step and beam.

        Arguments as `forward` plus the base model's ``generate`` options; returns its ``generate`` output. The
        routers run in evaluation mode whatever the model's mode: a training-mode router would draw a new Gumbel
        sample at every decoding step, so the tokens already in the KV cache would have been computed under
        another routing.

        Parameter-mixing layers build their mixed ``(A_t, B_t)`` at the prefill and the decoding steps only read
        them (tensors held by the routing state), so a compiled decoding step (``cache_implementation="static"``,
        transformers' ``compile_config``) is compiled once, not once per prompt batch.
        """
        routers = self._routers()
        modes = [r.training for r in routers]
        for r in routers:
            r.eval()
        try:
            with generation_context(self) as sharded:  # FSDP: the root unit whole, synced decoding steps
                self.set_routing(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    inputs_embeds=kwargs.get("inputs_embeds"),
                    task_ids=task_ids,
                    routing_mask=routing_mask,
                )
                if input_ids is not None:
                    kwargs["input_ids"] = input_ids
                return self.model.generate(attention_mask=attention_mask, **{**sharded, **kwargs})
        finally:
            for r, mode in zip(routers, modes):
                r.train(mode)

    # -- persistence -------------------------------------------------------
    @classmethod
    def load_folder(cls, base_model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> RoutedModel:
        """`load_adapter(base_model, path, **kwargs)`: what `from_pretrained` calls once the folder is local."""
        return load_adapter(base_model, path, **kwargs)


def get_model(
    base_model: nn.Module,
    config: Any,
    base_model_name: str | None = None,
    *,
    base_model_source: str | None = None,
    init_lora: str | os.PathLike | None = None,
) -> RoutedModel:
    """Inject `config`'s routed experts into `base_model` (in place) and freeze the rest.

    Args:
        base_model: a transformers model (decoder-only or encoder-decoder).
        config: the method's config (``LoraConfig``, ``PolyConfig``, ``OrchMoEConfig``, ...); a
            ``peft.LoraConfig`` is converted to orchmoe's `LoraConfig` (`orchmoe.adapters.peft_lora.from_peft_config`).
        base_model_name: recorded in saved adapters (default: the model's ``name_or_path``).
        base_model_source: the path or hub id the base model loads from, recorded in saved adapters and
            named by PEFT exports (default: the ``name_or_path`` that ``from_pretrained`` recorded).
        init_lora: a PEFT LoRA adapter folder every skill starts equal to (`RoutedModel.init_from_peft_lora`).
    Returns:
        The `RoutedModel` wrapping ``base_model``.
    """
    from orchmoe.adapters.peft_lora import from_peft_config

    config = from_peft_config(config, base_model)  # an orchmoe config as it is; a PEFT config converted
    model = RoutedModel(base_model, config, base_model_name, base_model_source)
    if init_lora is not None:
        model.init_from_peft_lora(init_lora)
    return model


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
    base_model_name: str | None = None,
    base_model_source: str | None = None,
) -> RoutedModel:
    """Rebuild a saved adapter onto `base_model`; a model of another shape is a clear error.

    Args:
        base_model: a fresh base model of the shape the adapter was saved for.
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        is_trainable: keep the adapter trainable (default: frozen, eval mode).
        base_model_name: overrides the base model name recorded in the adapter.
        base_model_source: where this base model loads from (default: its ``name_or_path``, else the
            source recorded in the adapter).
    Returns:
        The `RoutedModel` with the saved weights.
    """
    if isinstance(base_model, RoutedModel) or any(isinstance(m, RoutedLoraLayer) for m in base_model.modules()):
        raise ValueError(
            f"{type(base_model).__name__} already carries routed adapters: load onto a fresh base model "
            "(or the result of RoutedModel.unload())"
        )
    meta = read_adapter_config(path)
    saved = meta.get("base_model") or {}
    ours = model_fingerprint(base_model)
    diff = {k: (saved[k], ours[k]) for k in ours if k in saved and saved[k] != ours[k]}
    if diff:
        details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise AdapterMismatchError(f"adapter in {path} was saved for another model ({saved.get('name')!r}): {details}")
    config = adapter_config_from_meta(meta, path)
    shapes = find_target_layers(base_model, config.target_modules)
    want = {k: tuple(v) for k, v in meta["layers"].items()}
    if shapes != want:
        off = sorted(set(shapes.items()) ^ set(want.items()))[:3]
        raise AdapterMismatchError(
            f"adapter in {path} was saved for other layers than this model has (first differences: {off})"
        )
    source = base_model_source or model_source(base_model) or saved.get("source")
    model = get_model(base_model, config, base_model_name or saved.get("name"), base_model_source=source)
    legacy = str(meta.get("orchmoe_version", "0")).startswith("0.1")
    model.load_adapter_weights(path, legacy=legacy)
    model.adapter_metadata = meta.get("metadata") or {}
    model.train(is_trainable)
    if not is_trainable:
        for p in model.adapter_state_dict().values():
            p.requires_grad_(False)
    return model
