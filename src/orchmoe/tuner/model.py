"""`RoutedModel`: orchmoe's PEFT tuner, the core's layers and routers injected into a transformers model.

Like PEFT's ``LoraModel`` it is the ``model_cls`` PEFT registers for a method (`orchmoe.tuner.registration`)
and the ``base_model`` of the ``peft.PeftModel`` that `get_model` (or ``peft.get_peft_model``) returns:

* ``peft_model.base_model`` is this tuner, ``peft_model.get_base_model()`` the transformers model with the
  routed layers in it, ``peft_model.save_pretrained`` / ``PeftModel.from_pretrained`` /
  ``AutoPeftModelForCausalLM`` read and write the adapter folder (PEFT's format; what it holds and how it is
  checked: `orchmoe.adapters.folder`, reached through PEFT's per-tuner hooks below);
* it routes every call of the transformers model from that call's inputs (`orchmoe.tuner.calls`: forward
  hooks on the transformers model, whatever calls it) and adds the auxiliary losses to the loss;
* `generate` computes the routing once from the prompt, with the routers in evaluation mode, and holds it
  for every decoding step;
* attribute access falls through to the transformers model (PEFT's convention), so
  ``peft_model.parameter_groups(...)``, ``peft_model.routed_layers`` and ``peft_model.task_probabilities(...)``
  reach the methods here.

A method is asked of its config and registered router, never of the config's class: a `ModelRouter`
routes every layer at once before the transformers model runs, a `LayerRouter` is built into each layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from orchmoe.adapters import export, folder, unit_save
from orchmoe.adapters.provenance import model_source
from orchmoe.core.config import AdapterConfig, ConfigError
from orchmoe.core.layer import RoutedLoraLayer
from orchmoe.core.registry import router_class
from orchmoe.core.routers import LayerRouter, RoutingInputs
from orchmoe.core.routing import RoutingError, RoutingState, checked_task_ids, prompt_token_mask
from orchmoe.core.targets import DEFAULT_TARGET_MODULES, find_target_layers
from orchmoe.tuner import calls

__all__ = ["RoutedModel", "DEFAULT_ROUTER_LR"]

#: learning rate of the allocation logits, as in every Poly/MHR reference config (adapters at 1e-3)
DEFAULT_ROUTER_LR = 0.1
_MAX_ROUTING_ROWS = 8192  # pi(x) rows kept per logging window


class RoutedModel(BaseTuner):
    """Routed low-rank experts in a transformers model, everything else frozen (PEFT's tuner for orchmoe).

    Built by PEFT (``PeftModel(model, config)``) or `get_model`; one adapter per model.

    Attributes:
        model: the transformers model (``get_base_model()`` of the PeftModel).
        adapter_config: the method's config (``peft_config["default"]``).
        routed_layers: layer path -> `RoutedLoraLayer`, in model order.
        router: the model-level router (LoRA, Poly/MHR, OrchMoE), or None (MoLoRA, MoDE route per token).
        routing_state: the routing of the current prompt batch, shared by every layer.
        base_model_name: the portable name recorded in saved adapters.
        adapter_metadata: free-form JSON saved with the adapter (the recipe's tasks and prompt format).
        aux_loss_in_loss: whether a forward adds the auxiliary losses to ``loss`` (default True).
    """

    uses_shared_state = True  # one router and one routing state for all layers
    tuner_layer_cls = RoutedLoraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # -- PEFT's construction hooks -------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Replace the target layers by routed layers, build the routers and hook the model (see the module docs).

        Raises:
            ConfigError: a second adapter on this model (one routed adapter per model), or an invalid config.
            ValueError: the model already carries routed layers.
        """
        if getattr(self, "adapter_config", None) is not None:
            raise ConfigError(
                f"this model already carries the routed adapter {self.active_adapter!r}; orchmoe keeps one adapter "
                f"per model (build another model for {adapter_name!r})"
            )
        config: AdapterConfig = self.peft_config[adapter_name]
        if not isinstance(config, AdapterConfig):
            raise ConfigError(f"{type(self).__name__} builds orchmoe configs, got {type(config).__name__}")
        config.validate()
        if any(isinstance(m, RoutedLoraLayer) for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} already carries routed adapters: build on a fresh base model "
                "(or the result of unload())"
            )
        self.adapter_config = config
        self.base_model_name = (config.orchmoe or {}).get("base_model", {}).get("name") or model_source(model)
        self.adapter_metadata = dict((config.orchmoe or {}).get("metadata") or {})
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.routing_state = RoutingState()
        self.aux_loss_in_loss = True
        self.aux_window: list[torch.Tensor] = []  # detached auxiliary losses since the last read (logging)
        self.routing_window: tuple[list, list] | None = None  # (pi rows, task labels) of training forwards, when on
        self.routing_frozen = False
        self.call_labels = self.call_items = None
        self._unloaded = False
        self.layer_shapes = find_target_layers(model, config.target_modules)
        self.targeted_module_names = list(self.layer_shapes)
        self._trainable_base = [n for n, p in model.named_parameters() if p.requires_grad]  # restored by unload()
        for p in model.parameters():
            p.requires_grad_(False)
        self._build_layers(model, config)
        self._hooks = [
            model.register_forward_pre_hook(functools.partial(calls.before_forward, self), with_kwargs=True),
            model.register_forward_hook(functools.partial(calls.after_forward, self), with_kwargs=True),
        ]
        if config.inference_mode:
            for p in self._adapter_parameters():
                p.requires_grad_(False)

    def _build_layers(self, model: nn.Module, config: AdapterConfig) -> None:
        router_cls = router_class(config)
        per_layer = issubclass(router_cls, LayerRouter)
        for index, (path, (P, _)) in enumerate(self.layer_shapes.items()):
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
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
            get_decoder = getattr(model, "get_decoder", None)
            decoder = get_decoder() if callable(get_decoder) else None
            if isinstance(decoder, nn.Module) and decoder is not model:
                for layer in decoder.modules():
                    if isinstance(layer, RoutedLoraLayer) and layer.router is not None:
                        layer.router.decoder_side = True
        self.router: nn.Module | None = None
        if not per_layer:
            emb = model.get_input_embeddings()
            self.router = router_cls.from_config(config, len(self.layer_shapes), emb.embedding_dim).to(
                emb.weight.device
            )

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        return peft_config  # target_modules=None is resolved by find_target_layers

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - inject_adapter builds
        raise NotImplementedError("RoutedModel.inject_adapter builds every layer at once")

    @staticmethod
    def _check_target_module_exists(peft_config: AdapterConfig, key: str) -> bool:
        from orchmoe.core.targets import matches

        return peft_config.target_modules is not None and matches(key, peft_config.target_modules)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in self._adapter_parameters():
            p.requires_grad_(True)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for layer in self.routed_layers.values():
            layer.disabled = not enabled

    def enable_adapter_layers(self) -> None:
        """The routed updates on again (after `disable_adapter_layers`)."""
        self._enable_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """The base model's outputs until `enable_adapter_layers` (``PeftModel.disable_adapter()`` calls both)."""
        self._enable_adapter_layers(False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapters are built in fp32 on the base layers' devices (`RoutedLoraLayer`); nothing to cast."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        if adapter_name not in (self.active_adapter, [self.active_adapter]):
            raise ConfigError(f"this model has one routed adapter, {self.active_adapter!r}; got {adapter_name!r}")

    def delete_adapter(self, adapter_name: str) -> None:
        raise ConfigError("orchmoe keeps one adapter per model: use unload() to get the base model back")

    # -- PEFT's persistence hooks (the folder's content and checks: orchmoe.adapters.folder) -----
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tuner = _tuner_of(model)
        calls.accept_task_ids(model)
        unit_save.adopt_saves(model)
        return folder.adapter_tensors_for_save(tuner, model, state_dict)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # orchmoe's keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = _tuner_of(model)
        calls.accept_task_ids(model)
        unit_save.adopt_saves(model)
        return folder.adapter_tensors_for_load(tuner, model, config, state_dict)

    # -- the adapter ---------------------------------------------------------------------------
    @property
    def routed_layers(self) -> dict[str, RoutedLoraLayer]:
        """The adapted layers by module path in the transformers model, in model order."""
        return {p: m for p, m in self.model.named_modules() if isinstance(m, RoutedLoraLayer)}

    @property
    def base_model_source(self) -> str | None:
        """The path or hub id the base model loads from (PEFT's ``base_model_name_or_path``; exports name it)."""
        return self.adapter_config.base_model_name_or_path

    @property
    def task_router(self) -> nn.Module | None:
        """OrchMoE's Task Router (None for the other methods)."""
        return getattr(self.router, "task_router", None)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters (what trains): experts and per-layer routers keyed by layer path, the model
        router under ``router.`` (the names of the saved file). The saved adapter also holds `adapter_buffers`."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.routed_layers.items():
            out[f"{path}.lora_A"] = layer.lora_A
            out[f"{path}.lora_B"] = layer.lora_B
            if layer.router is not None:
                for n, p in layer.router.named_parameters():
                    out[f"{path}.router.{n}"] = p
        if self.router is not None:
            for n, p in self.router.named_parameters():
                out[f"router.{n}"] = p
        return out

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """State that is not trained but reproduces outputs (the Task Router's prompt statistics): saved with it."""
        return {} if self.router is None else {f"router.{n}": b for n, b in self.router.named_buffers()}

    def _adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter_state_dict().values())

    def num_parameters_split(self) -> tuple[int, int]:
        """(trainable adapter parameters, all parameters)."""
        return sum(p.numel() for p in self._adapter_parameters()), sum(p.numel() for p in self.parameters())

    def parameter_groups(
        self, lr: float = 1e-3, router_lr: float | None = DEFAULT_ROUTER_LR, weight_decay: float = 0.0
    ) -> list[dict]:
        """Two-speed optimiser groups, as Poly's references train: the task-skill allocation logits (Poly/MHR Z,
        OrchMoE W_skill) at ``router_lr`` (0.1, 100x the adapters' 1e-3, as in every reference config; None:
        ``lr``); experts and the dense routers (OrchMoE's Task Router, MoLoRA/MoDE token routers) at ``lr``. A
        dense projection of a d-wide input at the fast rate would move every logit by ~d*router_lr per Adam step
        and collapse the routing. (`orchmoe.training.optim` builds optimizers from them.)

        Args:
            lr: learning rate of the experts and dense routers.
            router_lr: learning rate of the allocation logits.
            weight_decay: AdamW weight decay of the experts (routers get none).
        Returns:
            ``torch.optim`` parameter groups named ``experts``, ``allocation``, ``routers``.
        """
        fast = {id(p) for p in (self.router.allocation_parameters() if self.router is not None else [])}
        groups: dict[str, list] = {"experts": [], "allocation": [], "routers": []}
        for name, p in self.adapter_state_dict().items():
            if p.requires_grad:
                kind = (
                    "experts" if name.endswith((".lora_A", ".lora_B")) else "allocation" if id(p) in fast else "routers"
                )
                groups[kind].append(p)
        rates = {"experts": lr, "allocation": lr if router_lr is None else router_lr, "routers": lr}
        return [
            {"params": ps, "lr": rates[k], "weight_decay": weight_decay if k == "experts" else 0.0, "name": k}
            for k, ps in groups.items()
            if ps or k == "experts"
        ]

    # -- routing -------------------------------------------------------------------------------
    def prompt_summary(self, input_ids=None, attention_mask=None, inputs_embeds=None, prompt_mask=None) -> torch.Tensor:
        """u(x): masked mean of the frozen input embeddings over the prompt tokens, (b, d) fp32. From
        ``input_ids`` (b, n) or ``inputs_embeds`` (b, n, d), over ``prompt_mask`` (b, n), else ``attention_mask``."""
        with torch.no_grad():
            emb = inputs_embeds if inputs_embeds is not None else self.model.get_input_embeddings()(input_ids)
        mask = prompt_mask if prompt_mask is not None else attention_mask
        if mask is None:
            mask = torch.ones(emb.shape[:2], device=emb.device)
        m = mask.to(device=emb.device, dtype=torch.float32).unsqueeze(-1)  # (b,n,1)
        return (emb.detach().float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (b,n,d)*(b,n,1) -> (b,d), fp32

    def task_probabilities(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, prompt_mask=None
    ) -> torch.Tensor:
        """pi(x) over abstract tasks for a batch of prompts (OrchMoE only), (b, K); arguments as `prompt_summary`."""
        if self.task_router is None:
            raise ConfigError(f"{self.adapter_config.method} has no task router")
        return self.task_router(self.prompt_summary(input_ids, attention_mask, inputs_embeds, prompt_mask))

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
        """Fill the routing state for the next forward(s): once per prompt batch.

        Args:
            input_ids: (b, n) the prompt tokens; or inputs_embeds: (b, n, d).
            attention_mask: (b, n); labels: (b, n) with -100 on the prompt (OrchMoE routes from the prompt).
            task_ids: (b,) one task id per example (Poly/MHR; -1 for an unseen task).
            routing_mask: (b, n) the prompt tokens OrchMoE routes from (default: attended tokens without a label).
            decoder_attention_mask: (b, m) an encoder-decoder's real decoder tokens (default: ``labels != -100``).
        """
        self.check_usable()
        cfg = self.adapter_config
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise RoutingError("routing needs input_ids or inputs_embeds")
        if ref.dim() < 2 or ref.shape[1] == 0:  # shapes only (no host sync); a model cannot read an empty prompt
            raise RoutingError(f"the prompt is empty or not a batch: input shape {tuple(ref.shape)}, want (b, n>0)")
        batch = ref.shape[0]
        inputs = RoutingInputs(batch=batch, task_ids=checked_task_ids(cfg, task_ids, batch, ref.device))
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

    def record_routing_window(self, task_labels=None, task_ids=None) -> None:
        """Keep this training forward's pi(x) (detached, on the device: no host sync) and the examples' tasks for
        the routing diagnostics of the next log (`orchmoe.training.callbacks.RoutingCallback` turns it on)."""
        window = self.routing_window
        pi = self.routing_state.task_probs
        if window is None or pi is None or not torch.is_grad_enabled():
            return
        labels = task_labels if task_labels is not None else task_ids
        window[0].append(pi.detach())
        window[1].append(None if labels is None else torch.as_tensor(labels).detach().reshape(-1))
        while sum(p.shape[0] for p in window[0]) > _MAX_ROUTING_ROWS and len(window[0]) > 1:
            window[0].pop(0), window[1].pop(0)

    def check_usable(self) -> None:
        """Raise when this model was unloaded (its layers are gone from the transformers model)."""
        if self._unloaded:
            raise RuntimeError(
                "this routed model was unloaded (unload() / merge_and_unload()): use the base model it returned, "
                "or wrap a fresh one with orchmoe.get_model()"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The transformers model's forward; the hooks route it (`orchmoe.tuner.calls`)."""
        self.check_usable()
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Routing computed once from the prompt and held for every decoding step and beam.

        Arguments: the transformers model's ``generate``'s, plus ``task_ids`` (Poly/MHR) and ``routing_mask``.
        The routers run in evaluation mode whatever the model's mode: a training-mode router would draw a new
        Gumbel sample at every decoding step, so the tokens already in the KV cache would have been computed
        under another routing. Parameter-mixing layers build their mixed ``(A_t, B_t)`` at the prefill and the
        decoding steps only read them, so a compiled decoding step is compiled once, not per prompt batch.
        """
        self.check_usable()
        if args:
            if "input_ids" in kwargs:
                raise TypeError("generate got input_ids both by position and by name")
            kwargs["input_ids"], args = args[0], args[1:]
        task_ids = kwargs.pop("orchmoe_task_ids", None)
        task_ids = kwargs.pop("task_ids", None) if task_ids is None else task_ids
        routing_mask = kwargs.pop("routing_mask", None)
        routers = [r for r in self._routers()]
        modes = [r.training for r in routers]
        for r in routers:
            r.eval()
        try:
            self.set_routing(
                input_ids=kwargs.get("input_ids"),
                attention_mask=kwargs.get("attention_mask"),
                inputs_embeds=kwargs.get("inputs_embeds"),
                task_ids=task_ids,
                routing_mask=routing_mask,
            )
            with self.holding_routing():
                return self.model.generate(*args, **kwargs)
        finally:
            for r, mode in zip(routers, modes):
                r.train(mode)

    @contextlib.contextmanager
    def holding_routing(self):
        """Within the block every call of the transformers model keeps the current routing (set by `set_routing`,
        or directly on `routing_state`) instead of routing from its own inputs: ``generate`` holds the prompt's
        routing this way, and a caller can run the model under a routing of its choosing."""
        was, self.routing_frozen = self.routing_frozen, True
        try:
            yield
        finally:
            self.routing_frozen = was

    def _routers(self) -> list[nn.Module]:
        layer_routers = [layer.router for layer in self.routed_layers.values() if layer.router is not None]
        return layer_routers + ([self.router] if self.router is not None else [])

    @contextlib.contextmanager
    def aux_loss_excluded(self):
        """Within the block forwards leave the auxiliary losses out of ``loss`` (still in ``aux_loss``)."""
        was, self.aux_loss_in_loss = self.aux_loss_in_loss, False
        try:
            yield
        finally:
            self.aux_loss_in_loss = was

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Non-reentrant by default: recomputation re-reads the same routing state, so routers get gradients.

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

    # -- leaving orchmoe (orchmoe.adapters.export) ---------------------------------------------
    def fixed_weights(self, *, input_ids=None, attention_mask=None, **routing) -> dict[str, torch.Tensor | None]:
        """Evaluation-mode allocation (1, h, S) per layer for one fixed routing (`orchmoe.adapters.export`)."""
        return export.fixed_weights(self, input_ids=input_ids, attention_mask=attention_mask, **routing)

    def export_peft_lora(self, path: str | os.PathLike, *, overwrite: bool = False, protect=(), **routing) -> Any:
        """Write one fixed routing as a standard PEFT LoRA folder (`orchmoe.adapters.export.export_peft_lora`)."""
        return export.export_peft_lora(self, path, overwrite=overwrite, protect=protect, **routing)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, **routing) -> nn.Module:
        """Fold one fixed routing into the base weights and return the base model; this model cannot run after."""
        return export.merge_and_unload(self, **routing)

    def unload(self) -> nn.Module:
        """Put the original layers back and return the clean base model (its parameters trainable as they were
        before); this model cannot run afterwards. The adapter is dropped: save it first."""
        self.check_usable()
        base = self.model
        for path, layer in self.routed_layers.items():
            parent_path, _, leaf = path.rpartition(".")
            setattr(base.get_submodule(parent_path) if parent_path else base, leaf, layer.base_layer)
        trainable = set(self._trainable_base)
        for name, p in base.named_parameters():
            p.requires_grad_(name in trainable)
        for hook in self._hooks:
            hook.remove()
        base.__dict__.pop("peft_config", None)
        self.routing_state.clear()
        self._unloaded = True
        return base


def _tuner_of(model: nn.Module) -> RoutedModel:
    """The `RoutedModel` inside ``model`` (a PeftModel, the tuner itself, or anything holding one)."""
    if isinstance(model, RoutedModel):
        return model
    inner = getattr(model, "base_model", None)
    if isinstance(inner, RoutedModel):
        return inner
    for m in model.modules():
        if isinstance(m, RoutedModel):
            return m
    raise TypeError(f"{type(model).__name__} holds no orchmoe RoutedModel")
