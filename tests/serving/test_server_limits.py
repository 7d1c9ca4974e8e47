"""Bounds and failures through real HTTP: the API key, overload (429 + Retry-After), open streams, clients that
disconnect, a request that fails inside the model, and a bounded load test of a few seconds."""

from __future__ import annotations

import random
import threading
import time

import httpx
import openai
import pytest

from orchmoe.serving.server import ServeOptions, build_app
from serving_helpers import serving


def slowed(app_and_served, seconds: float = 0.02):
    """The app with every decoding step made ``seconds`` longer (so a request stays in flight long enough)."""
    app, served = app_and_served
    decode = served.runner.decode

    def slow(batch, tokens):
        time.sleep(seconds)
        return decode(batch, tokens)

    served.runner.decode = slow
    return app


def running(url: str) -> int:
    return httpx.get(url + "/health").json()["running"]


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def test_api_key_is_checked_on_every_request(runs):
    app, _ = build_app(ServeOptions(path=str(runs["orchmoe"]), api_key="s3cret"))
    with serving(app) as url:
        for path in ("/health", "/metrics", "/v1/models"):
            resp = httpx.get(url + path)
            assert resp.status_code == 401 and "API key" in resp.json()["error"]["message"]
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url + "/v1/completions", json={"prompt": "abc"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="orch", prompt="abc", max_tokens=2).usage.completion_tokens <= 2


def test_overload_is_429_with_retry_after_and_a_disconnect_frees_the_slot(runs):
    opts = ServeOptions(path=str(runs["orchmoe"]), max_batch=1, max_queue=1, max_streams=1)
    with serving(slowed(build_app(opts))) as url:
        with httpx.stream(
            "POST", url + "/v1/completions", json={"prompt": "a", "max_tokens": 400, "stream": True}
        ) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")  # it runs (the only row)
            queued = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                      kwargs={"json": {"prompt": "b", "max_tokens": 2}, "timeout": 60})  # fmt: skip
            queued.start()
            wait_until(lambda: httpx.get(url + "/health").json()["waiting"] == 1)
            full = httpx.post(url + "/v1/completions", json={"prompt": "c", "max_tokens": 2})
            assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
            assert "queue is full" in full.json()["error"]["message"]
            second_stream = httpx.post(url + "/v1/completions", json={"prompt": "d", "stream": True})
            assert second_stream.status_code == 429 and "streams" in second_stream.json()["error"]["message"]
        # the client went away mid-stream: its row leaves, the queued request runs and finishes
        queued.join(30)
        assert not queued.is_alive()
        wait_until(lambda: running(url) == 0)
        assert 'orchmoe_finished_total{reason="cancelled"} 1.0' in httpx.get(url + "/metrics").text


def test_a_waiting_non_streaming_client_that_leaves_frees_its_slot(runs):
    opts = ServeOptions(path=str(runs["orchmoe"]), max_batch=2)
    with serving(slowed(build_app(opts))) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 400}, timeout=0.5)
        wait_until(lambda: running(url) == 0, timeout=5)


def test_a_request_failing_in_the_model_fails_alone(runs):
    app, served = build_app(ServeOptions(path=str(runs["orchmoe"]), max_batch=4))
    marker = served.tokenizer("Maria", add_special_tokens=False)["input_ids"][0]
    prefill = served.runner.prefill

    def faulty(prompts, routes):
        if any(marker in p for p in prompts):
            raise RuntimeError("simulated kernel failure")
        return prefill(prompts, routes)

    served.runner.prefill = faulty
    with serving(app) as url:
        results = {}

        def ask(name, prompt):
            results[name] = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=30)

        threads = [threading.Thread(target=ask, args=(n, p)) for n, p in
                   (("bad", "Maria works"), ("good1", "the quick"), ("good2", "brown fox"))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["bad"].status_code == 500
        assert "simulated kernel failure" in results["bad"].json()["error"]["message"]
        assert "Traceback" not in results["bad"].text
        assert results["good1"].status_code == results["good2"].status_code == 200
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_bounded_load(runs):
    """Eight clients for three seconds against a queue of 4: every answer is a 200 or a 429 with Retry-After,
    many complete, and the server is idle and healthy afterwards."""
    opts = ServeOptions(path=str(runs["orchmoe"]), max_batch=4, max_queue=4, max_streams=4)
    statuses: list[int] = []
    with serving(build_app(opts)[0]) as url:
        stop = time.time() + 3.0

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=30) as http:
                while time.time() < stop:
                    words = [rng.choice(["the", "fox", "Maria", "42"]) for _ in range(rng.randint(1, 40))]
                    body = {"prompt": " ".join(words), "max_tokens": rng.randint(1, 24), "stream": rng.random() < 0.3}
                    resp = http.post("/v1/completions", json=body)
                    if resp.status_code == 429:
                        assert int(resp.headers["retry-after"]) >= 1
                    elif body["stream"]:
                        assert resp.text.rstrip().endswith("data: [DONE]")
                    statuses.append(resp.status_code)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 20
        wait_until(lambda: httpx.get(url + "/health").json() == {"status": "ok", "waiting": 0, "running": 0})
