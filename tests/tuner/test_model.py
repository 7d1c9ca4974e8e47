"""RoutedModel: injection, training, generation, routing context, aux losses, dtype and device.

Saving and loading adapter folders: tests/adapters/test_folder.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core_helpers import (
    ARCHS,
    CROSS_PATH,
    METHOD_NAMES,
    N_TASKS,
    PAD,
    decoder_inputs,
    lm_logits,
    method_config,
    randomize_adapter,
    task_kwargs,
    tiny_base,
    toy_batch,
)
from orchmoe import (
    ConfigError,
    LoraConfig,
    MoDEConfig,
    MoLoRAConfig,
    OrchMoEConfig,
    RoutedLoraLayer,
    RoutingError,
    get_model,
)


def _routed(arch, method, seed=0, **overrides):
    model = get_model(tiny_base(arch, seed=seed), method_config(method, **overrides))
    randomize_adapter(model)
    return model.eval()


def _sharpen(model):
    """A decisive task router, so OrchMoE routes different prompts differently."""
    if model.task_router is not None:
        with torch.no_grad():
            for p in model.task_router.parameters():
                p.mul_(20)


# ----------------------------------------------------------------------------- injection
def test_injection_by_names_and_regex_freezes_everything_else():
    model = get_model(tiny_base("llama"), LoraConfig(rank=2, target_modules=["q_proj", "down_proj"]))
    assert sorted(model.routed_layers) == sorted(
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    adapter = {id(p) for p in model.adapter_state_dict().values()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapter), name
    regex = get_model(tiny_base("llama"), LoraConfig(rank=2, target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj"))
    assert sorted(regex.routed_layers) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    # defaults per model type
    assert sorted(get_model(tiny_base("t5"), LoraConfig(rank=2)).routed_layers)[0].endswith(".q")
    assert all(k.endswith("c_attn") for k in get_model(tiny_base("gpt2"), LoraConfig(rank=2)).routed_layers)


def test_target_modules_matching_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"matched no nn.Linear / Conv1D.*q_proj"):
        get_model(tiny_base("llama"), LoraConfig(target_modules=["query"]))


def test_mhr_splits_must_divide_layer_width():
    with pytest.raises(ValueError, match="n_splits=5 must divide"):
        get_model(tiny_base("llama"), method_config("mhr", n_splits=5))


def test_getattr_delegates_to_base_model():
    base = tiny_base("llama")
    model = get_model(base, LoraConfig(rank=2))
    assert model.config is base.config and model.generation_config is base.generation_config
    assert model.device == torch.device("cpu")
    assert model.get_input_embeddings() is base.get_input_embeddings()
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing  # noqa: B018


# ----------------------------------------------------------------------------- routing errors
def test_poly_needs_task_ids_in_range():
    model = _routed("llama", "poly")
    ids = torch.randint(3, 60, (2, 5))
    with pytest.raises(RoutingError, match="task_ids"):
        model(input_ids=ids)
    with pytest.raises(RoutingError, match=f"task id {N_TASKS} out of range.*n_tasks={N_TASKS}"):
        model(input_ids=ids, task_ids=torch.tensor([0, N_TASKS]))
    with pytest.raises(RoutingError, match="got 3 task_ids for a batch of 2"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(RoutingError, match="task_ids"):
        model.generate(input_ids=ids, max_new_tokens=2)


def test_unseen_task_uses_mean_allocation():
    model = _routed("llama", "poly")
    ids = torch.randint(3, 60, (1, 5))
    out = model(input_ids=ids, task_ids=torch.tensor([-1])).logits
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- equivalences
def _copy_adapter(src, dst, extra_ok=()):
    """Copy adapter weights across models; keys only `dst` has must end with one of `extra_ok`."""
    with torch.no_grad():
        s, d = src.adapter_state_dict(), dst.adapter_state_dict()
        assert (
            set(s) <= set(d) and all(k.endswith(tuple(extra_ok)) for k in set(d) - set(s))
            if extra_ok
            else set(s) == set(d)
        )
        for k in s:
            d[k].copy_(s[k])


def test_mode_m1_equals_lora_and_mode_p_eq_r_equals_molora_sd():
    batch, _ = toy_batch("llama")
    lora = _routed("llama", "lora", rank=4)
    mode1 = get_model(tiny_base("llama"), MoDEConfig(n_skills=1, rank=4, expert_rank=2)).eval()
    _copy_adapter(lora, mode1, extra_ok=[".router.weight"])  # a softmax over one expert: its router is inert
    torch.testing.assert_close(lm_logits(mode1, batch), lm_logits(lora, batch), **CROSS_PATH)

    sd = get_model(tiny_base("llama"), MoLoRAConfig(n_skills=3, rank=4, shared_down=True)).eval()
    randomize_adapter(sd)
    mode = get_model(tiny_base("llama"), MoDEConfig(n_skills=3, rank=4, expert_rank=4)).eval()
    _copy_adapter(sd, mode)
    torch.testing.assert_close(lm_logits(mode, batch), lm_logits(sd, batch), **CROSS_PATH)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_orchmoe_with_onehot_pi_equals_poly(arch):
    batch, tasks = toy_batch(arch)
    poly = _routed(arch, "poly")
    orch = get_model(tiny_base(arch), OrchMoEConfig(n_skills=4, rank=2, n_abstract_tasks=N_TASKS)).eval()
    with torch.no_grad():
        for path, layer in poly.routed_layers.items():
            o = orch.routed_layers[path]
            o.lora_A.copy_(layer.lora_A), o.lora_B.copy_(layer.lora_B)
        orch.router.skill_router.logits.copy_(poly.router.logits)  # (L, T, S) both
    expected = lm_logits(poly, batch, task_ids=tasks)
    # pi = the one-hot true task: fill the routing context, then run the base model under it
    with torch.no_grad():
        weights = orch.router.skill_router(F.one_hot(tasks, N_TASKS).float())
    orch.routing_state.set(weights=weights, token_mask=batch["attention_mask"])
    with torch.no_grad(), orch.base_model.holding_routing():
        got = orch.get_base_model()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **decoder_inputs(orch, batch)
        ).logits
    torch.testing.assert_close(got, expected, **CROSS_PATH)


# ----------------------------------------------------------------------------- training
def _grads_exactly_on_adapter(model):
    adapter = model.adapter_state_dict()
    ids = {id(p) for p in adapter.values()}
    for name, p in model.get_base_model().named_parameters():
        if id(p) not in ids:
            assert p.grad is None and not p.requires_grad, f"base parameter {name} got a gradient"
    for name, p in adapter.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    if model.task_router is not None:
        assert any(k.startswith("router.task_router.") for k in adapter)


TRAIN_TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "t5": ["q", "v", "o", "wo"]}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_loss_falls_and_only_adapters_train(arch, method):
    torch.manual_seed(0)
    over = {"top_k": None} if method == "molora" else {}
    model = get_model(tiny_base(arch), method_config(method, target_modules=TRAIN_TARGETS[arch], **over))
    batch, tasks = toy_batch(arch)
    kw = task_kwargs(method, tasks)
    opt = torch.optim.Adam(model.parameter_groups(lr=3e-2, router_lr=0.15))
    model.train()
    losses = []
    for step in range(16):
        opt.zero_grad()
        loss = model(**batch, **kw).loss
        loss.backward()
        losses.append(loss.item())
        if step < 15:
            opt.step()
    _grads_exactly_on_adapter(model)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- aux losses, DDP-safety
def _ce(model, batch, logits):
    labels = batch["labels"]
    if not model.config.is_encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("method,arch", [("molora", "llama"), ("molora", "t5"), ("orchmoe", "llama")])
def test_aux_loss_reported_and_added_in_training_only(method, arch):
    over = {"top_k": 1, "aux_loss_coef": 0.5} if method == "molora" else {"balance_coef": 0.5}
    model = _routed(arch, method, **over)
    batch, _ = toy_batch(arch)
    model.train()
    out = model(**batch)
    assert out.aux_loss is not None and out.aux_loss.requires_grad and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, _ce(model, batch, out.logits) + out.aux_loss)
    model.eval()
    out = model(**batch)
    assert out.get("aux_loss") is None
    torch.testing.assert_close(out.loss, _ce(model, batch, out.logits))
    with torch.no_grad():  # training mode without gradients (e.g. a validation pass): no aux term either
        model.train()
        assert model(**batch).get("aux_loss") is None


def test_top1_molora_gives_every_expert_a_gradient():
    model = _routed("llama", "molora", top_k=1)
    model.train()
    batch, _ = toy_batch("llama", n_per_task=1)
    model(**batch).loss.backward()
    for name, p in model.adapter_state_dict().items():
        assert p.grad is not None, name


# ----------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_gradient_checkpointing_same_gradients(method):
    arch = "t5" if method == "orchmoe" else "llama"
    batch, tasks = toy_batch(arch, n_per_task=2)
    grads = []
    for ckpt in (False, True):
        model = _routed(arch, method)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        calls = []
        first = next(iter(model.routed_layers.values()))
        handle = first.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        torch.manual_seed(123)  # the same Gumbel samples in both runs
        model(**batch, **task_kwargs(method, tasks)).loss.backward()
        handle.remove()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing really recomputed the layer in backward
        grads.append({k: p.grad.clone() for k, p in model.adapter_state_dict().items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4, msg=k)


def test_reentrant_checkpointing_works_without_model_routers_and_is_refused_where_it_loses_gradients():
    """Reentrant checkpointing backpropagates only into a checkpoint's explicit inputs: fine for methods whose
    routing lives inside the layers (LoRA, MoDE, MoLoRA without a balance loss), refused where the routing is
    computed once per forward outside the layers (Poly, MHR, OrchMoE) or adds a loss inside them."""
    batch, tasks = toy_batch("llama", n_per_task=1)
    for method, over in (("lora", {}), ("mode", {}), ("molora", {"aux_loss_coef": 0.0})):
        grads = []
        for reentrant in (None, True):
            model = _routed("llama", method, **over)
            if reentrant:
                model.gradient_checkpointing_enable({"use_reentrant": True})
            model.train()
            torch.manual_seed(5)
            model(**batch).loss.backward()
            grads.append([p.grad.clone() for p in model.adapter_state_dict().values()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for method in ("poly", "mhr", "orchmoe", "molora"):
        with pytest.raises(ConfigError, match="needs non-reentrant checkpointing"):
            _routed("llama", method).gradient_checkpointing_enable({"use_reentrant": True})


# ----------------------------------------------------------------------------- generation
def _prompts(arch):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (2, 6), generator=g)
    ids[0, :2], ids[1, :2] = 3, 5  # two different tasks
    return ids


def _gen(model, ids, method, tasks, **kw):
    kw = {"max_new_tokens": 4, **kw}
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **task_kwargs(method, tasks), **kw
    )


def _same_up_to_padding(a, b):
    n = max(a.shape[-1], b.shape[-1])
    a, b = F.pad(a, (0, n - a.shape[-1]), value=PAD), F.pad(b, (0, n - b.shape[-1]), value=PAD)
    assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_cache_and_beams_match_per_example_routing(arch, method):
    if arch == "t5":  # the random T5 decoder repeats one token whatever q/v do: adapt every projection, strongly
        model = _routed(arch, method, target_modules=["q", "k", "v", "o", "wi", "wo"])
        randomize_adapter(model, std=1.0)
    else:
        model = _routed(arch, method)
    _sharpen(model)
    ids, tasks = _prompts(arch), torch.tensor([0, 2])
    base_out = tiny_base(arch).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    cached = _gen(model, ids, method, tasks)
    assert not torch.equal(cached, base_out)  # the adapter changes what is generated
    _same_up_to_padding(_gen(model, ids, method, tasks, use_cache=False), cached)
    beams = _gen(model, ids, method, tasks, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4
    for i in range(2):  # beam search over the batch == beam search of each example alone
        alone = _gen(model, ids[i : i + 1], method, tasks[i : i + 1], num_beams=3, num_return_sequences=2)
        _same_up_to_padding(beams[2 * i : 2 * i + 2], alone)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_padded_batch_equals_each_prompt_alone(arch, method):
    model = _routed(arch, method)
    _sharpen(model)
    g = torch.Generator().manual_seed(11)
    short, long_ = torch.randint(3, 60, (1, 4), generator=g), torch.randint(3, 60, (1, 7), generator=g)
    left = arch != "t5"  # decoder-only models generate from left-padded prompts
    pad = torch.full((1, 3), PAD)
    ids = torch.cat([torch.cat([pad, short] if left else [short, pad], 1), long_])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0 if left else 1
    mask[0, 4:] = 1 if left else 0
    together = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **task_kwargs(method, [0, 2])
    )
    for row, (prompt, task) in enumerate([(short, 0), (long_, 2)]):
        alone = _gen(model, prompt, method, torch.tensor([task]), max_new_tokens=5)
        got = together[row, 3:] if (left and row == 0) else together[row]
        _same_up_to_padding(got[None], alone)


def test_encoder_decoder_routing_comes_from_encoder_input():
    model = _routed("t5", "orchmoe")
    _sharpen(model)
    ids = _prompts("t5")
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2)
    torch.testing.assert_close(model.routing_state.task_probs, model.task_probabilities(ids, torch.ones_like(ids)))


# ----------------------------------------------------------------------------- padding does not change routing
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_orchmoe_routing(side):
    model = _routed("llama", "orchmoe")
    _sharpen(model)
    short, long_ = torch.randint(3, 60, (1, 4)), torch.randint(3, 60, (1, 7))
    pad = torch.full((1, 3), PAD)
    short_p = torch.cat([pad, short] if side == "left" else [short, pad], 1)
    mask = torch.cat(
        [torch.zeros(1, 3), torch.ones(1, 4)] if side == "left" else [torch.ones(1, 4), torch.zeros(1, 3)], 1
    ).long()
    batch_ids, batch_mask = torch.cat([short_p, long_]), torch.cat([mask, torch.ones(1, 7, dtype=torch.long)])
    pi_batch = model.task_probabilities(batch_ids, batch_mask)
    torch.testing.assert_close(pi_batch[0], model.task_probabilities(short, torch.ones_like(short))[0])
    torch.testing.assert_close(pi_batch[1], model.task_probabilities(long_, torch.ones_like(long_))[0])
    if side == "right":  # causal model, right padding: the real positions' logits are those of the row alone
        with torch.no_grad():
            together = model(input_ids=batch_ids, attention_mask=batch_mask).logits
            alone = model(input_ids=short, attention_mask=torch.ones_like(short)).logits
        torch.testing.assert_close(together[0, :4], alone[0], atol=1e-5, rtol=0)
    # the training prompt mask: answer tokens (labels != -100) do not route
    labels = torch.full_like(batch_ids, -100)
    labels[1, 5:] = batch_ids[1, 5:]
    model.set_routing(input_ids=batch_ids, attention_mask=batch_mask, labels=labels)
    torch.testing.assert_close(
        model.routing_state.task_probs[1], model.task_probabilities(long_[:, :5], torch.ones(1, 5, dtype=torch.long))[0]
    )


# ----------------------------------------------------------------------------- dtype and device
def test_bf16_base_with_fp32_adapters():
    batch, tasks = toy_batch("llama")
    ref = _routed("llama", "orchmoe")
    model = get_model(tiny_base("llama", dtype=torch.bfloat16), method_config("orchmoe")).eval()
    _copy_adapter(ref, model)
    assert all(p.dtype == torch.float32 for p in model.adapter_state_dict().values())
    out = lm_logits(model, batch)
    assert out.dtype == torch.bfloat16
    assert F.cosine_similarity(out.float().flatten(), lm_logits(ref, batch).flatten(), dim=0) > 0.99
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.adapter_state_dict().values())


def test_task_router_statistics_stay_fp32_and_keep_updating_after_a_bf16_cast():
    """model.to(torch.bfloat16) casts everything but the Task Router's running statistics: in bf16 a
    running mean stops moving once the count is large (1/n below bf16's resolution). They keep
    accumulating every training prompt's fp32 summary exactly."""
    from orchmoe.core.routing import prompt_token_mask

    model = _routed("llama", "orchmoe").to(torch.bfloat16)
    tr = model.task_router
    assert (
        tr.net.weight.dtype == torch.bfloat16
        and next(iter(model.adapter_state_dict().values())).dtype == torch.bfloat16
    )
    assert tr.summary_mean.dtype == tr.summary_var.dtype == torch.float32 and tr.summary_count.dtype == torch.long
    model.train()
    summaries = []
    for seed in range(3):
        batch, _ = toy_batch("llama", seed=seed)
        before = tr.summary_mean.clone()
        model(**batch).loss.backward()
        assert not torch.equal(tr.summary_mean, before)  # still updating
        mask = prompt_token_mask(batch["attention_mask"], batch["labels"], batch["input_ids"].shape, "cpu")
        summaries.append(model.prompt_summary(batch["input_ids"], batch["attention_mask"], prompt_mask=mask))
    every = torch.cat(summaries)
    assert tr.summary_mean.dtype == torch.float32 and int(tr.summary_count) == every.shape[0]
    torch.testing.assert_close(tr.summary_mean, every.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr.summary_var, every.var(0, unbiased=False), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_adapters_and_routers_live_on_the_base_model_device(method):
    with torch.device("meta"):
        base = tiny_base("llama")
    model = get_model(base, method_config(method))
    assert {p.device.type for p in model.adapter_state_dict().values()} == {"meta"}


# ----------------------------------------------------------------------------- optimiser groups
def test_parameter_groups_two_speeds():
    model = get_model(tiny_base("llama"), method_config("orchmoe"))
    groups = {g["name"]: g for g in model.parameter_groups(lr=1e-3, router_lr=0.1)}
    assert {k: g["lr"] for k, g in groups.items()} == {"experts": 1e-3, "allocation": 0.1, "routers": 1e-3}
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) == model.num_parameters_split()[0]
    assert all(p.dim() == 3 for p in groups["experts"]["params"])  # lora_A / lora_B
    L, K = len(model.routed_layers), model.adapter_config.n_abstract_tasks
    assert [tuple(p.shape[:2]) for p in groups["allocation"]["params"]] == [(L, K)]  # W_skill of every layer
    defaults = {g["name"]: g["lr"] for g in model.parameter_groups()}
    assert defaults == {"experts": 1e-3, "allocation": 0.1, "routers": 1e-3}  # the references' two speeds
    poly = get_model(tiny_base("llama"), method_config("poly"))
    assert {g["name"]: g["lr"] for g in poly.parameter_groups(lr=3e-3)} == {"experts": 3e-3, "allocation": 0.1}
    assert any(p is model.task_router.net.weight for p in groups["routers"]["params"])  # dense: the slow rate
    molora = get_model(tiny_base("llama"), method_config("molora"))
    assert [g["name"] for g in molora.parameter_groups(lr=1e-3, router_lr=0.1)] == ["experts", "routers"]


def test_routed_layers_are_leaf_modules_owning_their_experts():
    model = get_model(tiny_base("llama"), method_config("molora"))
    for layer in model.routed_layers.values():
        assert isinstance(layer, RoutedLoraLayer)
        own = dict(layer.named_parameters(recurse=False))
        assert set(own) == {"lora_A", "lora_B"}


def test_second_injection_is_refused():
    base = tiny_base("llama")
    get_model(base, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already carries routed adapters"):
        get_model(base, LoraConfig(rank=2))


def test_deepcopy_keeps_one_shared_routing_state():
    import copy

    model = copy.deepcopy(_routed("llama", "orchmoe"))
    assert all(layer.state is model.routing_state for layer in model.routed_layers.values())
    batch, _ = toy_batch("llama")
    assert torch.isfinite(lm_logits(model, batch)).all()


@pytest.mark.parametrize("method", ["poly", "orchmoe", "molora"])
def test_generate_in_training_mode_routes_as_in_evaluation(method):
    model = _routed("llama", method)
    ids, tasks = _prompts("llama"), torch.tensor([1, 2])
    expected = _gen(model, ids, method, tasks)
    model.train()
    torch.manual_seed(0)
    assert torch.equal(_gen(model, ids, method, tasks), expected)
    assert all(r.training for r in model._routers())  # modes restored


def test_t5_decoder_step_over_encoder_outputs_keeps_the_prompt_routing():
    model = _routed("t5", "orchmoe", target_modules=["q", "v", "o", "wo"])
    _sharpen(model)
    ids = _prompts("t5")
    dec = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        full = model(input_ids=ids, decoder_input_ids=dec).logits
        enc = model.get_encoder()(input_ids=ids)  # runs under the routing just set from `ids`
        model(input_ids=ids[[1, 0]], decoder_input_ids=dec)  # another routing in between...
        model.set_routing(input_ids=ids)  # ...restored for this prompt batch
        step = model(encoder_outputs=enc, decoder_input_ids=dec).logits
    torch.testing.assert_close(step, full)


def test_encoder_decoder_token_routers_read_the_decoder_mask():
    model = _routed("t5", "molora", target_modules=["q", "v"])
    sides = {p: layer.router.decoder_side for p, layer in model.routed_layers.items()}
    assert all(v == p.startswith("decoder.") for p, v in sides.items()) and any(sides.values())
    ids = torch.randint(3, 60, (2, 4))
    labels = torch.tensor([[5, 6, -100, -100], [5, 6, 7, 8]])  # same length as the encoder input
    model.set_routing(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), labels=labels)
    state = model.routing_state
    assert state.token_mask_for(torch.Size([2, 4]), decoder=True).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert state.token_mask_for(torch.Size([2, 4])).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("method", ["poly", "mhr", "orchmoe"])
def test_decode_cache_reuses_mixed_weights_and_follows_weight_changes(method):
    """While decoding, mixed weights are built once per routing and rebuilt when routing or weights change."""
    from core_helpers import method_config, randomize_adapter, task_kwargs, tiny_base

    model = get_model(tiny_base("llama"), method_config(method))
    randomize_adapter(model)
    model.eval()
    ids = torch.randint(3, 60, (2, 6))
    kw = task_kwargs(method, [0, 1])
    layer = next(iter(model.routed_layers.values()))
    calls, mix = [], layer.mixed_weights
    layer.mixed_weights = lambda w: calls.append(1) or mix(w)
    with torch.no_grad():
        out1 = model(input_ids=ids, **kw).logits
        with model.base_model.holding_routing():  # decoding-style calls under the same routing
            model.get_base_model()(input_ids=ids)  # cache hit
            assert len(calls) == 1
            layer.lora_B.add_(0.5)  # an in-place weight change invalidates the cache
            out2 = model.get_base_model()(input_ids=ids).logits
            assert len(calls) == 2
            model.routing_state.mixed.clear()  # drop every layer's mixed weights: rebuilt from scratch
            fresh = model.get_base_model()(input_ids=ids).logits
    torch.testing.assert_close(out2, fresh)
    assert not torch.allclose(out1, out2)


# ----------------------------------------------------------------------------- torch.compile, static KV cache
@pytest.mark.parametrize("method", ["mhr", "orchmoe", "molora"])
def test_compiled_static_cache_decoding_does_not_recompile_per_prompt_batch(method):
    """generate() with a static cache compiles its decoding step (transformers' auto-compile; the eager
    backend, only the graph capture matters). The layers read the routing's mixed weights as tensors, so
    new prompt batches of the same shape, routed differently, reuse the one graph (fullgraph: no break)
    and decode exactly as eager generation with a dynamic cache."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only, unless asked
    model = _routed("llama", method)
    _sharpen(model)
    g = torch.Generator().manual_seed(5)
    outs = []
    for tasks in ([0, 2], [1, 0], [2, 1]):
        ids = torch.randint(3, 60, (2, 6), generator=g)
        compiled = _gen(
            model,
            ids,
            method,
            torch.tensor(tasks),
            max_new_tokens=5,
            cache_implementation="static",
            compile_config=config,
        )
        assert len(graphs) == 1, f"recompiled for prompt batch {len(outs) + 1}: {len(graphs)} graphs"
        _same_up_to_padding(compiled, _gen(model, ids, method, torch.tensor(tasks), max_new_tokens=5))
        outs.append(compiled)
    assert not torch.equal(outs[0], outs[1])  # different prompts (and routings) really decoded differently
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["mhr", "orchmoe", "mode"])
def test_compiled_training_forward_is_one_graph(method):
    """The whole training forward, routing included (task-id check, Gumbel noise, Task Router statistics,
    balance losses), compiles without a graph break (fullgraph) into one graph reused for new batches of the
    same shape, and its gradients are the eager ones."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager, compiled = _routed("llama", method), _routed("llama", method)
    step = torch.compile(compiled, backend=backend, fullgraph=True)
    for seed in range(2):
        batch, tasks = toy_batch("llama", seed=seed)
        grads = []
        for model, call in ((eager, eager), (compiled, step)):
            model.train().zero_grad()
            torch.manual_seed(seed)  # the same Gumbel noise
            call(**batch, **task_kwargs(method, tasks)).loss.backward()
            grads.append({k: p.grad for k, p in model.adapter_state_dict().items()})
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4, msg=k)
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    torch._dynamo.reset()
