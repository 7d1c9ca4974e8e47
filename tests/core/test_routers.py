"""Routers and the routing context: allocation / gate invariants (Hypothesis), losses, batch expansion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from core_helpers import tiny_base  # noqa: F401  (sets the single-threaded test setup)
from orchmoe import OrchMoEConfig
from orchmoe.core.routers import (
    ConstantRouter,
    OrchMoERouter,
    PolyRouter,
    RoutingInputs,
    SkillRouter,
    TaskRouter,
    TokenRouter,
    relaxed_allocation,
)
from orchmoe.core.routing import RoutingError, RoutingState

SETTINGS = settings(max_examples=30, deadline=None)


def _state(**kw):
    s = RoutingState()
    s.set(**kw)
    return s


# ----------------------------------------------------------------------------- allocations (Poly, MHR, OrchMoE)
@SETTINGS
@given(
    rows=st.integers(1, 5),
    S=st.integers(1, 6),
    scale=st.floats(0.0, 8.0),
    training=st.booleans(),
    seed=st.integers(0, 999),
)
def test_allocation_rows_are_distributions(rows, S, scale, training, seed):
    # Logits within +-8: the 1e-12 stabiliser of Poly/PEFT (w = z / (sum z + 1e-12)) only shows when every
    # sigmoid of a row is below ~1e-7, i.e. all logits below about -16.
    torch.manual_seed(seed)
    w = relaxed_allocation((torch.rand(rows, S) * 2 - 1) * scale, training)
    assert w.shape == (rows, S) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(rows), atol=1e-5, rtol=0)


def _inputs(b, **kw):
    return RoutingInputs(batch=b, **kw)


@SETTINGS
@given(
    L=st.integers(1, 3),
    T=st.integers(1, 4),
    S=st.integers(1, 5),
    h=st.integers(1, 4),
    b=st.integers(1, 5),
    training=st.booleans(),
    seed=st.integers(0, 999),
)
def test_poly_router_allocations(L, T, S, h, b, training, seed):
    torch.manual_seed(seed)
    router = PolyRouter(L, T, S, h).train(training)
    with torch.no_grad():
        router.logits.normal_()
    tasks = torch.randint(-1, T, (b,))
    w = router(_inputs(b, task_ids=tasks)).weights
    assert w.shape == (L, b, h, S) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(L, b, h), atol=1e-5, rtol=0)
    for i, t in enumerate(tasks.tolist()):
        if t < 0 or not training:  # an unseen task gets the mean evaluation-mode allocation, also in training
            expected = router.allocation(t) if t >= 0 else torch.stack([router.allocation(j) for j in range(T)]).mean(0)
            torch.testing.assert_close(w[:, i], expected)


def test_poly_router_eval_is_normalised_sigmoid_and_training_samples_per_example():
    router = PolyRouter(1, 2, 3, 1)
    with torch.no_grad():
        router.logits.copy_(torch.tensor([[[0.0, 1.0, -1.0], [2.0, 2.0, 2.0]]]))
    inputs = _inputs(3, task_ids=torch.tensor([0, 1, 1]))
    sig = torch.sigmoid(router.logits[0])
    torch.testing.assert_close(router.eval()(inputs).weights[0, :, 0], (sig / sig.sum(-1, keepdim=True))[[0, 1, 1]])
    torch.manual_seed(0)
    a = router.train()(inputs).weights
    b = router(inputs).weights
    assert not torch.allclose(a, b)  # a Gumbel-sigmoid sample each call in training
    assert not torch.allclose(a[0, 1], a[0, 2])  # ... and for each example, even of the same task
    a.sum().backward()  # rsample: gradients reach the logits
    assert router.logits.grad is not None


def test_relaxed_allocation_draws_what_torch_relaxed_bernoulli_draws():
    from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

    logits = torch.randn(4, 5)
    torch.manual_seed(7)
    ours = relaxed_allocation(logits, True)
    torch.manual_seed(7)
    z = RelaxedBernoulli(torch.tensor(1.0), logits=logits).rsample()
    torch.testing.assert_close(ours, z / (z.sum(-1, keepdim=True) + 1e-12))


@SETTINGS
@given(
    L=st.integers(1, 3),
    K=st.integers(1, 5),
    S=st.integers(1, 5),
    b=st.integers(1, 4),
    training=st.booleans(),
    seed=st.integers(0, 999),
)
def test_skill_router_is_a_convex_mix_of_rows(L, K, S, b, training, seed):
    torch.manual_seed(seed)
    router = SkillRouter(L, K, S).train(training)
    with torch.no_grad():
        router.logits.normal_()
    pi = torch.softmax(torch.randn(b, K), -1)
    w = router(pi)
    assert w.shape == (L, b, 1, S) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(L, b, 1), atol=1e-5, rtol=0)
    if not training:
        torch.testing.assert_close(w[:, :, 0], torch.einsum("bk,lks->lbs", pi, router.allocation()))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_skill_router_with_onehot_pi_equals_poly_router_with_the_same_noise(training, monkeypatch):
    """OrchMoE with pi = the one-hot true task is Poly, in training too: both draw one noise sample per
    example, and given the same noise they give the same allocations."""
    import orchmoe.core.routers.allocation as allocation

    L, T, S = 2, 4, 3
    poly, skill = PolyRouter(L, T, S).train(training), SkillRouter(L, T, S).train(training)
    with torch.no_grad():
        poly.logits.normal_()
        skill.logits.copy_(poly.logits)
    tasks = torch.tensor([3, 0, 2, 2, 1])
    b = len(tasks)
    noise = torch.randn(L, b, T, S)  # OrchMoE's noise: every abstract-task row of every example
    monkeypatch.setattr(
        allocation,
        "logistic_noise",
        lambda shape, like: noise if tuple(shape) == (L, b, T, S) else noise[:, torch.arange(b), tasks].unsqueeze(2),
    )
    w_poly = poly(_inputs(b, task_ids=tasks)).weights
    w_orch = skill(F.one_hot(tasks, T).float())
    torch.testing.assert_close(w_orch, w_poly)


def test_routers_need_their_context():
    with pytest.raises(RoutingError, match="route by task id"):
        PolyRouter(1, 2, 2)(_inputs(1))
    with pytest.raises(RoutingError, match="routes from the prompt"):
        OrchMoERouter(OrchMoEConfig(n_abstract_tasks=2), 1, 8)(_inputs(1))
    assert ConstantRouter()(_inputs(1)).weights is None


# ----------------------------------------------------------------------------- token gates (MoLoRA, MoDE)
@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 5),
    P=st.integers(1, 8),
    S=st.integers(1, 6),
    blocks=st.integers(1, 3),
    top_k=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 999),
)
def test_token_gates_sum_to_one_and_keep_exactly_top_k(b, n, P, S, blocks, top_k, seed):
    top_k = None if top_k is None else min(top_k, S)
    torch.manual_seed(seed)
    router = TokenRouter(P, S, blocks, top_k).eval()
    g = router(torch.randn(b, n, P), None)
    assert g.shape == (b, n, blocks, S) and (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(b, n, blocks), atol=1e-5, rtol=0)
    kept = (g > 0).sum(-1)
    assert (kept == (S if top_k is None else top_k)).all()


def test_top_k_keeps_the_largest_and_renormalises():
    router = TokenRouter(2, 4, 1, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    g = router(torch.tensor([[[1.0, 0.0]]]), None)[0, 0, 0]
    p = torch.softmax(torch.tensor([2.0, 3.0]), -1)
    torch.testing.assert_close(g, torch.tensor([0.0, p[0], p[1], 0.0]))


def test_switch_balance_loss_values_and_padding_mask():
    router = TokenRouter(4, 4, 1, top_k=1, aux_loss_coef=0.1)
    uniform = torch.full((2, 3, 1, 4), 0.25)
    collapsed = torch.zeros(2, 3, 1, 4)
    collapsed[..., 0] = 1.0
    assert float(router.balance_loss(collapsed, None)) == pytest.approx(4.0)
    assert float(router.balance_loss(uniform, None)) == pytest.approx(1.0)
    # padded tokens do not count: the loss of a padded batch equals that of its real tokens
    probs = torch.softmax(torch.randn(1, 5, 1, 4), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(router.balance_loss(probs, mask), router.balance_loss(probs[:, :3], None))


def test_token_router_adds_aux_loss_only_in_training_with_grad():
    router = TokenRouter(4, 3, 1, top_k=1, aux_loss_coef=0.5)
    state = _state(token_mask=torch.ones(2, 3))
    router.train()(torch.randn(2, 3, 4), state)
    assert len(state.aux_losses) == 1 and state.aux_losses[0].requires_grad
    with torch.no_grad():
        router(torch.randn(2, 3, 4), state)
    router.eval()(torch.randn(2, 3, 4), state)
    assert len(state.aux_losses) == 1


# ----------------------------------------------------------------------------- task router (OrchMoE)
@SETTINGS
@given(
    b=st.integers(1, 4),
    d=st.integers(2, 16),
    K=st.integers(1, 6),
    hidden=st.sampled_from([0, 5]),
    tau=st.floats(0.1, 5.0),
    seed=st.integers(0, 999),
)
def test_task_router_outputs_distributions(b, d, K, hidden, tau, seed):
    torch.manual_seed(seed)
    router = TaskRouter(d, K, temperature=tau, hidden=hidden)
    pi = router(torch.randn(b, d))
    assert pi.shape == (b, K) and (pi >= 0).all()
    torch.testing.assert_close(pi.sum(-1), torch.ones(b), atol=1e-5, rtol=0)


def test_task_router_hard_routing_and_normalisation():
    torch.manual_seed(0)
    router = TaskRouter(8, 4, hard=True)
    u = torch.randn(3, 8)
    pi = router.eval()(u)
    assert torch.equal(pi.sum(-1), torch.ones(3)) and set(pi.unique().tolist()) <= {0.0, 1.0}
    pi = router.train()(u)  # straight-through Gumbel-softmax: one-hot forward, gradient backward
    assert set(pi.unique().tolist()) <= {0.0, 1.0}
    (pi * torch.arange(4.0)).sum().backward()
    assert router.net.weight.grad is not None and router.net.weight.grad.abs().sum() > 0
    soft = TaskRouter(8, 4).eval()  # no statistics yet: the layer norm alone, so the scale of u(x) does not matter
    torch.testing.assert_close(soft(u), soft(100 * u), atol=1e-5, rtol=1e-4)


@SETTINGS
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5), d=st.integers(2, 12), seed=st.integers(0, 999))
def test_task_router_statistics_are_those_of_every_prompt_seen(sizes, d, seed):
    torch.manual_seed(seed)
    router = TaskRouter(d, 3).train()
    batches = [torch.randn(b, d) * 3 + 5 for b in sizes]
    for u in batches:
        router(u)
    every = torch.cat(batches)
    assert int(router.summary_count) == every.shape[0]
    torch.testing.assert_close(router.summary_mean, every.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(router.summary_var, every.var(0, unbiased=False), atol=1e-3, rtol=1e-3)


def test_task_router_statistics_frozen_outside_training():
    router = TaskRouter(6, 3).train()
    router(torch.randn(4, 6))
    before = {k: v.clone() for k, v in router.named_buffers()}
    router.eval()(torch.randn(5, 6) + 10)
    assert all(torch.equal(v, before[k]) for k, v in router.named_buffers())


def test_standardized_router_sees_past_what_every_prompt_shares():
    """A summary shared by every prompt (the template) is removed: two routers whose prompts differ by a
    common offset route identically, while the layer norm alone is swamped by the offset."""
    torch.manual_seed(0)
    u = torch.randn(64, 16) * 0.05  # task-specific parts of the summaries
    shared = torch.randn(16)  # what every prompt has in common, 20x larger
    std, std_shifted = TaskRouter(16, 4).train(), TaskRouter(16, 4).train()
    std_shifted.load_state_dict(std.state_dict())
    std(u), std_shifted(u + shared)  # one training batch each: the statistics
    torch.testing.assert_close(std.eval()(u), std_shifted.eval()(u + shared), atol=1e-4, rtol=1e-4)
    layer = TaskRouter(16, 4, prompt_norm="layernorm")
    layer.net.load_state_dict(std.net.state_dict())
    assert layer(u + shared).std(0).mean() < 0.2 * std.eval()(u).std(0).mean()  # pi barely varies across prompts
    with pytest.raises(ValueError, match="prompt_norm must be one of"):
        TaskRouter(16, 4, prompt_norm="batch")


def test_task_balance_loss():
    assert float(TaskRouter.balance_loss(torch.full((4, 5), 0.2))) == pytest.approx(1.0)
    assert float(TaskRouter.balance_loss(F.one_hot(torch.zeros(4, dtype=torch.long), 5).float())) == pytest.approx(5.0)


# ----------------------------------------------------------------------------- routing state
def test_state_expands_prompts_for_beams_contiguously():
    weights = torch.arange(2 * 2 * 1 * 3, dtype=torch.float).view(2, 2, 1, 3)  # (L, b, h, S)
    state = _state(task_probs=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), weights=weights)
    assert state.task_probs_for(4)[:, 1].tolist() == [0.0, 0.0, 1.0, 1.0]
    w = state.layer_weights(1, 6)
    torch.testing.assert_close(w, weights[1].repeat_interleave(3, dim=0))
    assert state.layer_weights(1, 6) is w  # computed once per batch size
    assert state.layer_weights(0, 2) is not None and _state().layer_weights(0, 2) is None
    with pytest.raises(RoutingError, match="batch of 3 rows does not extend the routed batch of 2"):
        state.layer_weights(0, 3)


def test_state_token_mask_only_for_matching_tokens():
    state = _state(token_mask=torch.tensor([[1, 1, 0]]))
    assert state.token_mask_for(torch.Size([2, 3])).tolist() == [[1, 1, 0], [1, 1, 0]]
    assert state.token_mask_for(torch.Size([1, 1])) is None  # a decoding step / the T5 decoder side


def _statistics_worker(rank: int, world: int, init_file: str, batches, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        router = TaskRouter(batches[0][0].shape[1], 3).train()
        for step in batches:
            router(step[rank])
        torch.save({k: v.clone() for k, v in router.named_buffers()}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_task_router_statistics_are_global_under_torch_distributed(tmp_path):
    """Two gloo processes, each with its own (unequal, once empty) share of every batch, end with the
    statistics of all prompts together, and the same on both."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(3, 6, generator=g) + 2, torch.randn(5, 6, generator=g) * 4),
        (torch.randn(0, 6), torch.randn(2, 6, generator=g) - 1),
    ]
    mp.spawn(
        _statistics_worker, args=(2, str(tmp_path / "init"), batches, str(tmp_path / "stats")), nprocs=2, join=True
    )
    every = torch.cat([u for step in batches for u in step])
    got = [torch.load(tmp_path / f"stats.{r}") for r in (0, 1)]
    for stats in got:
        assert int(stats["summary_count"]) == every.shape[0]
        torch.testing.assert_close(stats["summary_mean"], every.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats["summary_var"], every.var(0, unbiased=False), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


def test_task_router_summary_diagnostics():
    from orchmoe.core.diagnostics import task_router_summary

    pi = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    s = task_router_summary(pi, torch.tensor([5, 5, 7, 7]))
    assert (
        s["pi_entropy"] == pytest.approx(0.0, abs=1e-6) and s["abstract_tasks_used"] == 2 and s["abstract_tasks"] == 4
    )
    assert s["nmi_pi_task"] == pytest.approx(1.0)
    u = task_router_summary(torch.full((3, 4), 0.25), torch.tensor([0, 1, 2]))
    assert u["pi_entropy"] == pytest.approx(math.log(4)) and u["abstract_tasks_used"] == 1
    assert u["nmi_pi_task"] == 0.0  # everything on one abstract task says nothing about the task
