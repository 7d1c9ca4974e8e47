"""The engine without HTTP: continuous batching gives each row the answer a lone `generate` gives, rows of
every task share one batch, requests join and leave between steps, and failures stay with their request."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from core_helpers import method_config, randomize_adapter, tiny_base
from helpers_tokenizer import make_tiny_tokenizer
from orchmoe import get_model
from orchmoe.serving.engine import Engine, GenerationRequest, Overloaded
from orchmoe.serving.runner import RoutedRunner, UnsupportedModelError
from orchmoe.serving.sampling import SamplingParams, TextTracker
from serving_helpers import Collector, greedy, lone_greedy, run_engine

TOK = make_tiny_tokenizer()
EOS = TOK.eos_token_id


def routed(method: str, arch: str = "llama", seed: int = 1):
    model = get_model(tiny_base(arch), method_config(method))
    randomize_adapter(model, seed=seed)
    return model.eval()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 64, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize(
    "method,arch",
    [("orchmoe", "llama"), ("orchmoe", "gpt2"), ("poly", "llama"), ("mhr", "gpt2"), ("molora", "llama"),
     ("mode", "llama"), ("lora", "llama")],
)  # fmt: skip
def test_batched_greedy_equals_lone_generate(method, arch):
    """10 prompts of different lengths (Poly/MHR: of different tasks, one unseen) through a batch of at most 4
    rows: rows join while others decode, leave at eos or max_tokens; every answer equals a lone generate."""
    model = routed(method, arch)
    ps = prompts(10)
    tasks = [i % 3 if i != 7 else -1 for i in range(10)] if method_config(method).needs_task_ids else [None] * 10
    lengths = [6 + (i * 5) % 13 for i in range(10)]  # different max_tokens: rows leave at different steps
    engine = Engine(RoutedRunner(model, TOK), max_batch=4, max_prefill_tokens=64).start()
    try:
        out = run_engine(engine, [GenerationRequest(p, t, greedy(n)) for p, t, n in zip(ps, tasks, lengths)])
    finally:
        assert engine.stop(10)
    for i, (p, t, n) in enumerate(zip(ps, tasks, lengths)):
        want = TOK.decode(lone_greedy(model, p, n, EOS, t), skip_special_tokens=True)
        assert out[i].kind == "done" and out[i].text == want, (i, out[i], want)


def test_prefill_groups_with_padding_give_the_same_answers():
    """prefill_batch > 1 prefills newcomers left-padded together: still the lone answers."""
    model = routed("orchmoe")
    ps = prompts(8, seed=3)
    engine = Engine(RoutedRunner(model, TOK), max_batch=8, prefill_batch=4).start()
    try:
        out = run_engine(engine, [GenerationRequest(p, None, greedy(10)) for p in ps])
    finally:
        engine.stop(10)
    for i, p in enumerate(ps):
        assert out[i].text == TOK.decode(lone_greedy(model, p, 10, EOS), skip_special_tokens=True)


def test_newcomers_join_a_running_batch():
    """A request submitted while a long one decodes is admitted between steps and finishes first."""
    model = routed("orchmoe")
    engine = Engine(RoutedRunner(model, TOK), max_batch=4).start()
    c = Collector()
    try:
        engine.submit(GenerationRequest(prompts(1)[0], None, greedy(300)), c.sink(0))
        while not c.events[0]:
            time.sleep(0.001)
        engine.submit(GenerationRequest(prompts(1, seed=2)[0], None, greedy(3)), c.sink(1))
        c.wait(2)
    finally:
        engine.stop(10)
    assert c.finished[1].finish_reason == "length" and c.finished[1].completion_tokens == 3
    assert c.finished[0].completion_tokens > 3  # the long one was still running: the newcomer did not wait


def test_cancel_frees_the_slot_and_overload_is_refused():
    model = routed("lora")
    engine = Engine(RoutedRunner(model, TOK), max_batch=1, max_queue=2).start()
    c = Collector()
    try:
        long = engine.submit(GenerationRequest(prompts(1)[0], None, greedy(10_000)), c.sink(0))
        while engine.load[1] == 0:
            time.sleep(0.001)
        engine.submit(GenerationRequest(prompts(1)[0], None, greedy(2)), c.sink(1))
        engine.submit(GenerationRequest(prompts(1)[0], None, greedy(2)), c.sink(2))
        with pytest.raises(Overloaded, match="queue is full"):
            engine.submit(GenerationRequest(prompts(1)[0], None, greedy(2)), c.sink(3))
        long.cancel()  # its row leaves at the next step; the queued ones run
        c.wait(2, timeout=30)
        assert {1, 2} <= set(c.finished) and 0 not in c.finished
    finally:
        engine.stop(10)


def test_a_failing_request_fails_alone():
    """A prefill that raises fails its own request; the others of its group and of the batch finish."""
    model = routed("orchmoe")
    runner = RoutedRunner(model, TOK)
    prefill = runner.prefill

    def faulty(ps, routes):
        if any(p[0] == 63 for p in ps):
            raise RuntimeError("boom")
        return prefill(ps, routes)

    runner.prefill = faulty
    ps = prompts(6, seed=4)
    ps[2][0] = 63
    for p in ps[:2] + ps[3:]:
        p[0] = 5
    engine = Engine(runner, max_batch=8, prefill_batch=3).start()
    try:
        out = run_engine(engine, [GenerationRequest(p, None, greedy(5)) for p in ps])
    finally:
        engine.stop(10)
    assert out[2].kind == "error" and "boom" in out[2].message
    for i in (0, 1, 3, 4, 5):
        assert out[i].kind == "done" and out[i].text == TOK.decode(
            lone_greedy(model, ps[i], 5, EOS), skip_special_tokens=True
        )


def test_stop_drains_queued_and_running_requests():
    model = routed("lora")
    engine = Engine(RoutedRunner(model, TOK), max_batch=2).start()
    c = Collector()
    for i in range(5):
        engine.submit(GenerationRequest(prompts(1, seed=i)[0], None, greedy(8)), c.sink(i))
    assert engine.stop(30)
    assert sorted(c.finished) == list(range(5)) and all(e.kind == "done" for e in c.finished.values())
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit(GenerationRequest([5, 6], None, greedy(2)), c.sink(9))


def test_seeded_sampling_is_reproducible_in_any_batch():
    model = routed("orchmoe")
    engine = Engine(RoutedRunner(model, TOK), max_batch=8).start()
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    p = prompts(1, seed=5)[0]
    try:
        alone = run_engine(engine, [GenerationRequest(p, None, sampled)])[0].text
        crowd = run_engine(engine, [GenerationRequest(q, None, sampled) for q in [p, *prompts(5, seed=6)]])
    finally:
        engine.stop(10)
    assert crowd[0].text == alone


def test_stop_strings_and_held_back_text():
    t = TextTracker(TOK, stop=["world"])
    ids = TOK("hello world again", add_special_tokens=False)["input_ids"]
    sent, stopped = "", False
    for k in range(1, len(ids) + 1):
        delta, stopped = t.push(ids[:k])
        sent += delta
        if stopped:
            break
    assert stopped and sent == "hello " and t.text == "hello "


def test_encoder_decoder_models_are_refused_clearly():
    model = get_model(tiny_base("t5"), method_config("lora"))
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        RoutedRunner(model, TOK)


def test_engine_thread_survives_a_failing_sink():
    model = routed("lora")
    engine = Engine(RoutedRunner(model, TOK), max_batch=2).start()
    c = Collector()

    def bad(event):
        raise ValueError("a broken client")

    try:
        engine.submit(GenerationRequest(prompts(1)[0], None, greedy(4)), bad)
        engine.submit(GenerationRequest(prompts(1, seed=1)[0], None, greedy(4)), c.sink(0))
        c.wait(1)
    finally:
        assert engine.stop(10)
    assert c.finished[0].kind == "done" and threading.active_count() >= 1


def test_peft_lora_rows_each_get_their_own_lora():
    """Plain PEFT LoRAs by name (and the base model): batched answers equal PEFT's lone generate per LoRA."""
    import peft

    from orchmoe.serving.runner import PeftRunner

    base = tiny_base("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg, adapter_name="first")
    model.add_adapter("second", cfg)
    model.eval()
    ps = prompts(6, seed=8)
    names = ["first", "second", "__base__", "second", "first", "__base__"]
    engine = Engine(PeftRunner(model, TOK), max_batch=3).start()
    try:
        out = run_engine(engine, [GenerationRequest(p, n, greedy(8)) for p, n in zip(ps, names)])
    finally:
        engine.stop(10)
    for i, (p, name) in enumerate(zip(ps, names)):
        ids = torch.tensor([p])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0, adapter_names=[name])  # fmt: skip
        new = seq[0, len(p) :].tolist()
        new = new[: new.index(EOS)] if EOS in new else new
        assert out[i].text == TOK.decode(new, skip_special_tokens=True), (i, name)
    assert len({out[i].text for i in range(3)}) == 3  # the two LoRAs and the base model answer differently


def test_a_failed_decoding_step_fails_its_rows_and_the_engine_goes_on():
    model = routed("orchmoe")
    runner = RoutedRunner(model, TOK)
    decode, calls = runner.decode, []

    def once_broken(batch, tokens):
        calls.append(len(tokens))
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return decode(batch, tokens)

    runner.decode = once_broken
    engine = Engine(runner, max_batch=4).start()
    try:
        first = run_engine(engine, [GenerationRequest(p, None, greedy(6)) for p in prompts(2, seed=9)])
        later = run_engine(engine, [GenerationRequest(prompts(1, seed=10)[0], None, greedy(6))])
    finally:
        assert engine.stop(10)
    assert any(e.kind == "error" and "simulated" in e.message for e in first.values())
    assert later[0].kind == "done"


def test_min_tokens_masks_eos_as_generate_min_new_tokens_does():
    model = routed("orchmoe", seed=3)
    ps = prompts(5, seed=11)
    engine = Engine(RoutedRunner(model, TOK), max_batch=5).start()
    try:
        out = run_engine(engine, [GenerationRequest(p, None, greedy(12, min_tokens=12)) for p in ps])
    finally:
        engine.stop(10)
    for i, p in enumerate(ps):
        assert out[i].completion_tokens == 12
        assert out[i].text == TOK.decode(lone_greedy(model, p, 12, EOS, min_new=12), skip_special_tokens=True)


def test_a_broken_iteration_fails_its_requests_instead_of_losing_them():
    """An error outside the model calls (here: merging caches) fails the running rows and the newcomers taken from
    the queue; nobody waits forever and the engine serves the next requests."""
    model = routed("lora")
    runner = RoutedRunner(model, TOK)
    merge, broken = runner.merge, [True]

    def merge_once_broken(a, b):
        if broken and a is not None:
            broken.clear()
            raise RuntimeError("merge failed")
        return merge(a, b)

    runner.merge = merge_once_broken
    engine = Engine(runner, max_batch=4).start()
    try:
        first = run_engine(engine, [GenerationRequest(p, None, greedy(4)) for p in prompts(3, seed=12)])
        later = run_engine(engine, [GenerationRequest(prompts(1, seed=13)[0], None, greedy(4))])
    finally:
        assert engine.stop(10)
    assert sorted(e.kind for e in first.values()).count("error") >= 1 and later[0].kind == "done"
