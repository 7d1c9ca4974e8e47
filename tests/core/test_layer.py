"""RoutedLoraLayer: the one mixture layer, checked against a per-expert reference loop."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from core_helpers import tiny_base  # noqa: F401  (sets the single-threaded test setup)
from orchmoe import RoutedLoraLayer
from orchmoe.core.routers import LayerRouter, TokenRouter
from orchmoe.core.routing import RoutingError, RoutingState

SETTINGS = settings(max_examples=25, deadline=None)


class FixedGates(LayerRouter):
    """A per-token router that returns given gates (b, n, k, S)."""

    def __init__(self, gates):
        super().__init__()
        self.gates = gates

    def forward(self, x, state):
        return self.gates


def _layer(base, routing, mixing, *, S, r, h=1, shared_down=False, scale=0.5, seed=0):
    """A layer routed by given allocation weights (b, h, S) (parameter mixing, through a RoutingState as the
    model fills it) or given token gates (output mixing)."""
    torch.manual_seed(seed)
    layer = RoutedLoraLayer(
        base,
        n_experts=S,
        rank=r,
        scale=scale,
        router=FixedGates(routing) if mixing == "tokens" else None,
        shared_down=shared_down,
        n_splits=h,
    )
    if mixing == "params" and routing is not None:
        layer.state = RoutingState()
        layer.state.set(weights=routing.unsqueeze(0))  # (L=1, b, h, S)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _reference_params(x, A, B, w, scale):
    """Explicit loop: per example, per split block, sum the experts' weights (Poly/MHR parameter mixing)."""
    b = x.shape[0]
    S, P, r = A.shape
    Q = B.shape[-1]
    h = w.shape[1]
    out = torch.zeros(b, x.shape[1], Q, dtype=torch.float64)
    for i in range(b):
        A_t, B_t = torch.zeros(P, r, dtype=torch.float64), torch.zeros(r, Q, dtype=torch.float64)
        for j in range(h):
            rows, cols = slice(j * P // h, (j + 1) * P // h), slice(j * Q // h, (j + 1) * Q // h)
            for s in range(S):
                A_t[rows] += w[i, j, s] * A[s, rows]
                B_t[:, cols] += w[i, j, s] * B[s, :, cols]
        out[i] = x[i] @ A_t @ B_t
    return scale * out


def _reference_tokens(x, A, B, g, scale):
    """Explicit loop: each expert s and rank block c adds g[..., c, s] * (x A_{s,c}) B_{s,c} (MoLoRA/MoDE)."""
    S, r, Q = B.shape
    k = g.shape[-2]
    p = r // k
    out = torch.zeros(*x.shape[:2], Q, dtype=torch.float64)
    for s in range(S):
        a = A[s if A.shape[0] > 1 else 0]
        for c in range(k):
            cols = slice(c * p, (c + 1) * p)
            out += g[..., c, s, None] * ((x @ a[:, cols]) @ B[s, cols])
    return scale * out


dims = st.fixed_dictionaries(
    {
        "b": st.integers(1, 3),
        "n": st.integers(1, 4),
        "h": st.sampled_from([1, 2, 4]),
        "P_per": st.integers(1, 4),
        "Q_per": st.integers(1, 4),
        "S": st.integers(1, 4),
        "p": st.integers(1, 3),
        "k": st.integers(1, 3),
        "seed": st.integers(0, 1000),
    }
)


@SETTINGS
@given(d=dims, conv=st.booleans())
def test_parameter_mixing_matches_reference(d, conv):
    b, n, h, S = d["b"], d["n"], d["h"], d["S"]
    P, Q, r = h * d["P_per"], h * d["Q_per"], d["p"] * d["k"]
    g = torch.Generator().manual_seed(d["seed"])
    base = Conv1D(Q, P) if conv else nn.Linear(P, Q)
    w = torch.rand(b, h, S, generator=g)
    layer = _layer(base, w, "params", S=S, r=r, h=h)
    x = torch.randn(b, n, P, generator=g)
    y = layer(x)
    assert y.shape == (b, n, Q)
    ref = _reference_params(x.double(), layer.lora_A.double(), layer.lora_B.double(), w.double(), layer.scale)
    torch.testing.assert_close((y - base(x)).double(), ref, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(d=dims, shared=st.booleans())
def test_output_mixing_matches_reference(d, shared):
    b, n, S, k = d["b"], d["n"], d["S"], d["k"]
    P, Q, r = d["P_per"] * 3, d["Q_per"] * 2, d["p"] * k
    g = torch.Generator().manual_seed(d["seed"])
    gates = torch.rand(b, n, k, S, generator=g)
    base = nn.Linear(P, Q)
    layer = _layer(base, gates, "tokens", S=S, r=r, shared_down=shared)
    assert layer.lora_A.shape == (1 if shared else S, P, r) and layer.lora_B.shape == (S, r, Q)
    x = torch.randn(b, n, P, generator=g)
    y = layer(x)
    assert y.shape == (b, n, Q)
    ref = _reference_tokens(x.double(), layer.lora_A.double(), layer.lora_B.double(), gates.double(), layer.scale)
    torch.testing.assert_close((y - base(x)).double(), ref, atol=1e-4, rtol=1e-4)


def test_lora_path_two_dim_input_and_zero_init():
    base = nn.Linear(8, 6)
    layer = RoutedLoraLayer(base, n_experts=1, rank=2, scale=2.0)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: the adapted layer starts equal to the base
    assert layer.lora_A.abs().max() <= 1 / 8**0.5  # kaiming-uniform(a=sqrt 5) bound 1/sqrt(P), as LoRA
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ layer.lora_A[0] @ layer.lora_B[0])
    layer.disabled = True
    assert torch.equal(layer(x), base(x))


def test_a_mixture_without_routing_is_a_clear_error():
    layer = RoutedLoraLayer(nn.Linear(4, 3), n_experts=2, rank=2, scale=1.0)
    with pytest.raises(RoutingError, match="no routing was set"):
        layer(torch.randn(1, 2, 4))


def test_weight_and_bias_delegate_to_the_base_layer():
    base = nn.Linear(4, 3)
    layer = RoutedLoraLayer(base, n_experts=2, rank=2, scale=1.0)
    assert layer.weight is base.weight and layer.bias is base.bias


def test_delta_weight_is_the_effective_update():
    for base in (nn.Linear(8, 12), Conv1D(12, 8)):
        w = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]])  # (1, h=2, S=2)
        layer = _layer(base, w, "params", S=2, r=3, h=2, scale=0.25)
        x = torch.randn(2, 5, 8)
        torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight(w), atol=1e-6, rtol=1e-5)
    tokens = _layer(nn.Linear(4, 4), torch.ones(1, 1, 1, 2), "tokens", S=2, r=2)
    with pytest.raises(ValueError, match="no single weight update"):
        tokens.delta_weight()


def test_splits_must_divide_widths():
    with pytest.raises(ValueError, match=r"n_splits=3 must divide both the input \(8\) and output \(6\)"):
        RoutedLoraLayer(nn.Linear(8, 6), n_experts=2, rank=2, scale=1.0, n_splits=3)


def test_bf16_base_with_fp32_adapter_computes_the_update_in_fp32():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    w = torch.tensor([[[0.3, 0.7]]])
    layer = _layer(base, w, "params", S=2, r=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    A_t, B_t = layer.mixed_weights(w)
    delta = layer.scale * (x.float() @ A_t) @ B_t  # fp32 update, cast once when added to the bf16 base output
    torch.testing.assert_close(y, base(x) + delta.to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and base.weight.grad is not None  # (base not frozen here)


class _Casts(TorchDispatchMode):
    """Records the number of elements of every tensor cast (aten._to_copy) under it."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["single", "params", "mhr", "tokens"])
def test_autocast_runs_the_update_without_casting_activations(path):
    """Under autocast the GEMMs run in bf16 whatever their operands: casting the (b, n, P) activations to
    the fp32 adapters and the update back would only add full passes. Only weight-sized tensors are cast
    then (the experts, for autocast's GEMMs); the result has the base's dtype and matches fp32 math.
    Without autocast (fp32 adapters on a bf16 base) the activations are cast: the update runs in fp32."""
    torch.manual_seed(0)
    b, n, P, Q, S = 4, 16, 16, 8, 3
    base = nn.Linear(P, Q).to(torch.bfloat16)
    if path == "tokens":
        layer = RoutedLoraLayer(base, n_experts=S, rank=4, scale=0.5, router=TokenRouter(P, S, n_blocks=2))
        with torch.no_grad():
            layer.lora_B.normal_()
    elif path == "single":
        layer = _layer(base, None, "params", S=1, r=4)
    else:
        h = 4 if path == "mhr" else 1
        layer = _layer(base, torch.softmax(torch.randn(b, h, S), -1), "params", S=S, r=4, h=h)
    x = torch.randn(b, n, P).to(torch.bfloat16)
    activation = b * n * min(P, Q)  # elements of the smallest activation-sized tensor
    with _Casts() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert casts.sizes and max(casts.sizes) < activation, casts.sizes
    with _Casts() as casts:
        y32 = layer(x)
    assert y32.dtype == torch.bfloat16 and max(casts.sizes) >= activation  # the fp32 update (the check can fail)
    exact = copy.deepcopy(layer).float()(x.float())
    torch.testing.assert_close(y.float(), exact, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y32.float(), exact, atol=2e-2, rtol=2e-2)
