"""Prototype of three speed-ups for ``orchmoe.layer.RoutedLoraLayer``, for measurement only.

Nothing here is used by the library: ``layer_speed.py --proto`` and ``speed.py --proto``
swap the class of already-built layers (``layer.__class__ = ProtoRoutedLoraLayer``;
same parameters, same outputs) to measure what each change would buy.

1. Fused scale-and-add: ``result + (scale * delta).to(dtype)`` costs two extra full
   (b, n, Q) elementwise passes forward (and their backward); ``torch.addmm`` /
   ``torch.baddbmm(result, z, B, alpha=scale)`` folds both into the up-projection GEMM.
2. MoLoRA/MoDE: the token router reads the same x as the down-projection, so one GEMM
   ``x @ [A_cat | W_g]`` (P x (D*r + k*S)) replaces two; backward then also makes one
   weight-gradient GEMM and one input-gradient GEMM instead of two each (under
   ``no_grad`` in eval mode the concatenated weight is built once and reused).
3. Parameter mixing (Poly/MHR/OrchMoE) under ``no_grad`` in eval mode (generation):
   the routing is fixed for the whole ``generate()``, so the mixed ``(A_t, B_t)`` are
   cached per layer and reused at every decoding step (the router and both einsums run
   once per prompt batch instead of once per token). The cache key is the routing
   inputs' identity, the batch size and the ``_version`` counters of the layer's
   parameters, so an optimizer step or a new ``set_routing`` invalidates it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from orchmoe.layer import RoutedLoraLayer


def token_gates(router, logits: torch.Tensor, x: torch.Tensor, state) -> torch.Tensor:
    """TokenRouter.forward after its matrix product (same softmax, top-k, balance loss)."""
    logits = logits.unflatten(-1, (router.n_blocks, router.n_experts))  # (b,n,k,S)
    probs = F.softmax(logits.float(), dim=-1)
    gates = probs
    if router.top_k is not None and router.top_k < router.n_experts:
        top, idx = probs.topk(router.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top)
        gates = gates / gates.sum(-1, keepdim=True)
    if router.training and router.aux_loss_coef > 0 and torch.is_grad_enabled() and state is not None:
        state.add_aux_loss(router.aux_loss_coef * router.balance_loss(probs, state.token_mask_for(x.shape[:2])))
    return gates.to(x.dtype)


class ProtoRoutedLoraLayer(RoutedLoraLayer):
    _cache = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        squeeze = x.dim() == 2
        h = self.dropout(x.unsqueeze(0) if squeeze else x).to(self.lora_A.dtype)  # (b,n,P)
        res = result.unsqueeze(0) if squeeze else result
        if res.dtype != h.dtype:  # base in bf16, adapters in fp32: no fused add across dtypes
            return super().forward(x, *args, **kwargs)
        if self.router.mixing == "tokens":
            out = self._tokens(h, res)
        else:
            out = self._params(h, res)
        return out.squeeze(0) if squeeze else out

    # -- output mixing: one GEMM for the down-projection and the router ------------
    def _fused_down(self, dtype: torch.dtype) -> torch.Tensor:
        A, Wg = self.lora_A, self.router.weight
        D, P, r = A.shape
        if self.training or torch.is_grad_enabled():
            return torch.cat([A.permute(1, 0, 2).reshape(P, D * r), Wg.to(dtype)], 1)
        key = (A._version, Wg._version, A.data_ptr(), Wg.data_ptr(), dtype)  # generation: build it once
        c = self._cache
        if c is None or c[0] != key:
            c = self._cache = (key, torch.cat([A.permute(1, 0, 2).reshape(P, D * r), Wg.to(dtype)], 1))
        return c[1]

    def _tokens(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        A, B, router = self.lora_A, self.lora_B, self.router
        D, P, r = A.shape
        S, Q = B.shape[0], self.out_features
        k = router.n_blocks
        b, n = x.shape[:2]
        W = self._fused_down(x.dtype)  # (P, D*r + k*S)
        z, logits = (x @ W).split([D * r, k * S], -1)  # (b,n,D*r), (b,n,k*S)
        gates = token_gates(router, logits, x, self.state)  # (b,n,k,S)
        z = z.reshape(b, n, D, k, r // k) * gates.transpose(-1, -2).unsqueeze(-1)  # (b,n,S,k,p)
        out = torch.addmm(res.reshape(b * n, Q), z.reshape(b * n, S * r), B.reshape(S * r, Q), alpha=self.scale)
        return out.view(b, n, Q)

    # -- parameter mixing: fused scale-and-add, cached mixed weights in generation --
    def _mixed_cached(self, x: torch.Tensor):
        if self.training or torch.is_grad_enabled():
            return self.mixed_weights(self.router(x, self.state))
        st = self.state
        params = [self.lora_A, self.lora_B, *self.router.parameters()]
        key = (x.shape[0], tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        c = self._cache
        if c is not None and c[0] is st.task_ids and c[1] is st.task_probs and c[2] == key:
            return c[3]
        mixed = self.mixed_weights(self.router(x, st))
        self._cache = (st.task_ids, st.task_probs, key, mixed)
        return mixed

    def _params(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        A_t, B_t = self._mixed_cached(x)
        b, n = x.shape[:2]
        Q = self.out_features
        if A_t.shape[0] == 1:  # LoRA: one pair for the whole batch
            z = x.reshape(b * n, -1) @ A_t[0]  # (b*n, r)
            return torch.addmm(res.reshape(b * n, Q), z, B_t[0], alpha=self.scale).view(b, n, Q)
        return torch.baddbmm(res, x @ A_t, B_t, alpha=self.scale)  # (b,n,Q) + scale * (b,n,r)@(b,r,Q)


def patch_model(model) -> int:
    """Swap every RoutedLoraLayer in `model` to the prototype (in place); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is RoutedLoraLayer:
            m.__class__ = ProtoRoutedLoraLayer
            n += 1
    return n
