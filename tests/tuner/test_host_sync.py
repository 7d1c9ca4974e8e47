"""No host sync in any forward: every method, training and evaluation, decoder-only and T5.

A host sync (``.item()``, ``bool(tensor)``, boolean-mask indexing, ``nonzero``, a data-dependent
output size) makes the CPU wait for the accelerator and drains its launch queue. They are counted
with a dispatch hook below autograd (:class:`orchmoe.opcount.OpCounter`), so this runs on a CPU.

The only syncs allowed are transformers' own, checked to be exactly those of the bare base model on
the same inputs: its SDPA mask check (``_ignore_causal_mask_sdpa`` / ``_ignore_bidirectional_mask_sdpa``
read whether ``padding_mask`` is all ones, to pass ``is_causal`` instead of a mask). One more is
documented and excluded by name: ``RoutedModel._task_ids`` validates *CPU* task ids on the host
(where a DataLoader delivers them: free on a GPU machine, the ids are not on the device yet) and
device task ids with ``torch._assert_async``; a CPU-only test has no device tensor to pass.
"""

from __future__ import annotations

import pytest
import torch

from core_helpers import (
    METHOD_NAMES,
    method_config,
    randomize_adapter,
    task_kwargs,
    tiny_base,
    toy_batch,
)
from opcount import OpCounter
from orchmoe import get_model

HOST_CHECKS = ("checked_task_ids",)  # see the module docstring
BASE_SYNC_SITES = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")

# every method with its defaults, plus the options that take other code paths
CASES = [(m, {}) for m in METHOD_NAMES] + [
    ("molora", {"top_k": None}),  # dense gates, balance loss over the argmax
    ("molora", {"top_k": 1, "shared_down": True}),
    ("orchmoe", {"hard_routing": True, "balance_coef": 0.1}),
    ("orchmoe", {"prompt_norm": "layernorm", "task_router_hidden": 8}),
]
IDS = [m + "".join(f"-{k}={v}" for k, v in o.items()) for m, o in CASES]


def _model(arch, method, overrides):
    model = get_model(tiny_base(arch), method_config(method, **overrides))
    randomize_adapter(model)
    return model


def _padded(batch):
    """The toy batch with one row's first two tokens padded (so masks are not all ones)."""
    batch = dict(batch)
    mask = batch["attention_mask"].clone()
    mask[0, :2] = 0
    batch["attention_mask"] = mask
    return batch


def _base_syncs(arch, batch) -> OpCounter:
    base = tiny_base(arch)
    with OpCounter() as counter, torch.no_grad():
        base(**batch)
    return counter


def _assert_only_base_syncs(counter: OpCounter, base: OpCounter, where: str) -> None:
    assert counter.syncs_from("/orchmoe/") == 0, f"{where}: orchmoe syncs: {counter.sync_sites}"
    assert all(any(s in site for s in BASE_SYNC_SITES) for _, site in counter.sync_sites), (
        f"{where}: {counter.sync_sites}"
    )
    assert counter.syncs == base.syncs, f"{where}: {counter.syncs} vs the base model's {base.syncs}"
    assert counter.tensors_from_data == base.tensors_from_data, (
        f"{where}: torch.tensor(...) from Python data in a forward"
    )


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("method,overrides", CASES, ids=IDS)
def test_no_host_sync_in_a_training_forward_and_backward(arch, method, overrides):
    model = _model(arch, method, overrides).train()
    batch, tasks = toy_batch(arch)
    batch = _padded(batch)
    kw = task_kwargs(method, tasks)
    with OpCounter(exclude=HOST_CHECKS) as counter:
        out = model(**batch, **kw)
        out.loss.backward()
    assert all(p.grad is not None for p in model.adapter_state_dict().values())  # a real training step ran
    _assert_only_base_syncs(counter, _base_syncs(arch, batch), "training")
    assert sum(counter.excluded.values()) == (1 if method_config(method).needs_task_ids else 0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("method,overrides", CASES, ids=IDS)
def test_no_host_sync_in_an_eval_forward(arch, method, overrides):
    model = _model(arch, method, overrides).eval()
    batch, tasks = toy_batch(arch)
    batch = _padded(batch)
    with OpCounter(exclude=HOST_CHECKS) as counter, torch.no_grad():
        model(**batch, **task_kwargs(method, tasks))
    _assert_only_base_syncs(counter, _base_syncs(arch, batch), "eval")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_no_host_sync_in_a_decoding_step(method, cache):
    """A KV-cache step through RoutedModel.forward keeps the prompt's routing (its mixed weights are read,
    not rebuilt) without reading anything on the host, a static cache's on-device length included."""
    from transformers import StaticCache

    model = _model("llama", method, {}).eval()
    ids = torch.randint(3, 60, (2, 6))
    kw = task_kwargs(method, [0, 2])
    past = StaticCache(config=model.config, max_cache_len=12) if cache == "static" else None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=past, use_cache=True, **kw)
        nxt = out.logits[:, -1:].argmax(-1)
        step = {
            "input_ids": nxt,
            "attention_mask": torch.ones(2, 7, dtype=torch.long),
            "past_key_values": out.past_key_values,
        }
        with OpCounter(exclude=HOST_CHECKS) as counter:
            logits = model(**step, use_cache=True).logits[:, -1]
        model.set_routing(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)  # the prompt's routing...
        with model.base_model.holding_routing():  # ...over prompt + token, without a cache
            full = model.get_base_model()(input_ids=torch.cat([ids, nxt], 1))
    assert counter.syncs_from("/orchmoe/") == 0, counter.sync_sites
    assert all(any(s in site for s in BASE_SYNC_SITES) for _, site in counter.sync_sites), counter.sync_sites
    assert not counter.excluded  # a continued decode keeps its routing: task ids are not even read again
    torch.testing.assert_close(logits, full.logits[:, -1], atol=1e-5, rtol=1e-5)  # under the prompt's routing


def test_the_counter_sees_each_kind_of_host_sync():
    """The hook catches what it must (so a zero above means something), and only that."""
    from torch.distributions import RelaxedBernoulli

    x = torch.randn(4, 3)
    syncing = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "mask indexing": lambda: x[x > 0],
        "nonzero": lambda: torch.nonzero(x),
        "one_hot on CPU": lambda: torch.nn.functional.one_hot(torch.tensor([0, 2]), 3),
        "distribution validation": lambda: RelaxedBernoulli(torch.tensor(1.0), logits=x, validate_args=True),
        "equal": lambda: torch.equal(x, x),
        "repeat_interleave by a tensor": lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 1]), dim=0),
    }
    for name, fn in syncing.items():
        with OpCounter() as c:
            fn()
        assert c.host_syncs >= 1, name
        assert c.syncs_from("test_host_sync.py") == c.host_syncs, (name, c.sync_sites)  # the innermost caller is named
    with OpCounter() as c:
        (x @ x.T).softmax(-1).topk(2, -1).indices.repeat_interleave(2, dim=0)
        torch.zeros(4, 3).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    assert c.host_syncs == 0 and c.total > 0 and c.tensors_from_data == 0
    with OpCounter() as c:
        torch.tensor([1.0, 2.0])
    assert c.tensors_from_data == 1


def test_host_checks_are_excluded_only_by_name():
    def checked_task_ids():
        return bool(torch.ones(1) > 0)

    with OpCounter(exclude=HOST_CHECKS) as c:
        checked_task_ids()
        bool(torch.ones(1) > 0)
    assert c.host_syncs == 1 and sum(c.excluded.values()) == 1
