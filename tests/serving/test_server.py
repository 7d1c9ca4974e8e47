"""The OpenAI HTTP API through real HTTP on loopback (uvicorn in a thread), with the `openai` client and httpx:
answers equal lone generates under concurrency, streaming, chat, the structured training format, Poly's task
routing, and every refusal as a 4xx JSON error."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from orchmoe.serving.server import ServeOptions, build_app
from serving_helpers import lone_greedy, serving

MAX = 8


@pytest.fixture(scope="module")
def orch_url(runs):
    app, _ = build_app(ServeOptions(path=str(runs["orchmoe"]), max_batch=4, max_queue=32, max_body_bytes=8192))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def poly_url(runs):
    app, _ = build_app(ServeOptions(path=str(runs["poly"]), max_batch=4))
    with serving(app) as url:
        yield url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(served, ids: list[int], task: int | None = None, n: int = MAX) -> str:
    new = lone_greedy(served.model, ids, n, served.tokenizer.eos_token_id, task)
    return served.tokenizer.decode(new, skip_special_tokens=True)


def test_concurrent_requests_of_many_tasks_get_the_lone_answers(orch_url, references, task_requests):
    """16 requests at once (structured form of 8 tasks and raw prompts): each answer is a lone generate's."""
    ref = references["orchmoe"]
    raw = [f"Definition: {r['definition']}\n\nNow complete the following example -\nInput: {r['input']}\nOutput:"
           for r in task_requests[:8]]  # fmt: skip
    c = client(orch_url)

    def ask(i):
        if i < len(task_requests):
            r = task_requests[i]
            extra = {k: r[k] for k in ("definition", "input", "examples")}
            return c.completions.create(model="orch", prompt=None, max_tokens=MAX, temperature=0, extra_body=extra)
        return c.completions.create(model="orch", prompt=raw[i - len(task_requests)], max_tokens=MAX, temperature=0)

    n = len(task_requests) + len(raw)
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(ask, range(n)))
    fmt, tok = ref.prompt_format, ref.tokenizer
    for i, a in enumerate(answers):
        if i < len(task_requests):
            r = task_requests[i]
            ids = fmt.encode(tok, r["definition"], r["input"], r["examples"])
        else:
            ids = fmt.encode_text(tok, raw[i - len(task_requests)])
        assert a.choices[0].text == reference(ref, ids), i
        assert a.usage.prompt_tokens == len(ids) and a.model == "orch"


def test_streaming_gives_the_same_text_in_openai_chunks(orch_url, task_requests):
    c = client(orch_url)
    r = task_requests[0]
    extra = {k: r[k] for k in ("definition", "input", "examples")}
    whole = c.completions.create(model="orch", prompt=None, max_tokens=MAX, extra_body=extra).choices[0].text
    chunks = list(c.completions.create(model="orch", prompt=None, max_tokens=MAX, stream=True, extra_body=extra))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.stream("POST", orch_url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3, "stream": True,
                      "stream_options": {"include_usage": True}}) as resp:  # fmt: skip
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert (
        usage["completion_tokens"] <= 3 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )


def test_chat_where_trained_with_a_chat_template_else_400(runs, references, orch_url):
    with pytest.raises(openai.BadRequestError, match="without a chat template"):
        client(orch_url).chat.completions.create(model="orch", messages=[{"role": "user", "content": "hi"}])
    ref = references["chat"]
    app, _ = build_app(ServeOptions(path=str(runs["chat"]), name="chat"))
    messages = [{"role": "user", "content": "Reverse the word.\nInput: abc\nOutput:"}]
    with serving(app) as url:
        c = client(url)
        answer = c.chat.completions.create(model="chat", messages=messages, max_tokens=MAX, temperature=0)
        streamed = list(c.chat.completions.create(model="chat", messages=messages, max_tokens=MAX, stream=True))
    want = reference(ref, ref.prompt_format.encode_chat(ref.tokenizer, messages))
    assert answer.choices[0].message.content == want and answer.choices[0].message.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == want


def test_poly_routes_by_task_field_or_model_name(poly_url, references, task_requests):
    ref = references["poly"]
    tasks = ref.tasks
    c = client(poly_url)
    ids_of = {m.id for m in c.models.list().data}
    assert {"poly", "poly/unseen"} | {f"poly/{t}" for t in tasks} <= ids_of
    seen = [r for r in task_requests if r["task"] in tasks][:3]
    unseen = [r for r in task_requests if r["task"] not in tasks][:1]
    jobs = [(r, {"model": "poly", "extra_body": {"task": r["task"]}}) for r in seen]
    jobs += [(seen[0], {"model": f"poly/{seen[0]['task']}", "extra_body": {}})]
    jobs += [(unseen[0], {"model": "poly", "extra_body": {"task": -1}})]

    def ask(job):
        r, how = job
        body = {k: r[k] for k in ("definition", "input", "examples")}
        return c.completions.create(
            prompt=None, max_tokens=MAX, model=how["model"], extra_body={**body, **how["extra_body"]}
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (r, _), a in zip(jobs, answers):
        ids = ref.prompt_format.encode(ref.tokenizer, r["definition"], r["input"], r["examples"])
        assert a.choices[0].text == reference(ref, ids, tasks.get(r["task"], -1))
    with pytest.raises(openai.BadRequestError, match="routes by task"):
        c.completions.create(model="poly", prompt="abc")
    with pytest.raises(openai.BadRequestError, match="unknown task"):
        c.completions.create(model="poly", prompt="abc", extra_body={"task": "task_nobody_has"})


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt: must be a string or a list of token ids"),
    (json.dumps({"prompt": "  "}).encode(), 400, "prompt is empty"),
    (json.dumps({}).encode(), 400, "prompt is required"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens must be at least 1"),
    (json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), 400, "max_tokens: Input should be a valid integer"),
    (json.dumps({"prompt": "x", "max_tokens": 100_000}).encode(), 400, "over this server's limit"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n=2 is not supported"),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model 'gpt-4' does not exist"),
    (json.dumps({"prompt": "word " * 1200}).encode(), 400, "this server takes at most"),
    (json.dumps({"prompt": [1, 2, 10**9]}).encode(), 400, "token ids must be in"),
    (json.dumps({"prompt": "x", "definition": "d", "input": "i"}).encode(), 400, "not both"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (b"x" * 10_000, 413, "over the limit"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_get_a_4xx_json_error_naming_the_problem(orch_url, body, status, message):
    resp = httpx.post(orch_url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert message in error["message"] and error["type"].endswith("_error") and "Traceback" not in resp.text


def test_unknown_routes_and_methods_are_json_errors(orch_url):
    assert httpx.get(orch_url + "/v1/nothing").json()["error"]["message"].startswith("GET /v1/nothing")
    resp = httpx.get(orch_url + "/v1/completions")
    assert resp.status_code == 405 and "error" in resp.json()


def test_models_health_and_metrics(orch_url):
    assert httpx.get(orch_url + "/health").json()["status"] == "ok"
    assert [m["id"] for m in httpx.get(orch_url + "/v1/models").json()["data"]] == ["orch"]
    httpx.post(orch_url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    text = httpx.get(orch_url + "/metrics").text
    for series in ("orchmoe_requests_total", "orchmoe_prompt_tokens_total", "orchmoe_generation_tokens_total",
                   "orchmoe_queue_depth", "orchmoe_running_requests", "orchmoe_batch_size_bucket",
                   "orchmoe_request_latency_seconds_bucket", "orchmoe_time_to_first_token_seconds_bucket"):  # fmt: skip
        assert series in text, series
    assert 'orchmoe_requests_total{endpoint="/v1/completions",status="200"}' in text
