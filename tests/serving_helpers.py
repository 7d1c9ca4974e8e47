"""What the serving tests share: lone-generate references, a server on loopback in a thread, tiny run folders
whose adapters move the logits, and a collector of engine events.

`tests/` is on the import path, so test modules import these by name.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from core_helpers import randomize_adapter
from orchmoe import load_adapter
from orchmoe.loading.pretrained import load_model_and_tokenizer
from orchmoe.serving.engine import Engine, Event, GenerationRequest
from orchmoe.serving.sampling import SamplingParams
from recipe_helpers import SMALL_DATA, tiny_train_argv


def lone_greedy(
    model, prompt: list[int], max_new: int, eos: int | None, task_id: int | None = None, min_new: int = 0
) -> list[int]:
    """The new tokens of a lone greedy ``model.generate`` (a RoutedModel), cut before eos."""
    ids = torch.tensor([prompt])
    kwargs = {"task_ids": torch.tensor([task_id])} if task_id is not None else {}
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
        eos_token_id=eos, pad_token_id=0, temperature=None, top_p=None, top_k=None, min_new_tokens=min_new, **kwargs,
    )  # fmt: skip
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos)] if eos is not None and eos in new else new


class Collector:
    """Engine sinks that record each request's events; `wait` blocks until all are finished."""

    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = {}
        self._done = threading.Semaphore(0)
        self.finished: dict[int, Event] = {}

    def sink(self, key: int):
        self.events[key] = []

        def put(event: Event) -> None:
            self.events[key].append(event)
            if event.kind != "delta":
                self.finished[key] = event
                self._done.release()

        return put

    def wait(self, n: int, timeout: float = 60.0) -> None:
        for _ in range(n):
            assert self._done.acquire(timeout=timeout), "an engine request never finished"


def run_engine(engine: Engine, requests: list[GenerationRequest]) -> dict[int, Event]:
    c = Collector()
    for i, r in enumerate(requests):
        engine.submit(r, c.sink(i))
    c.wait(len(requests))
    return c.finished


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def train_tiny_run(model_dir: Path, data: Path, out: Path, method: str, *extra: str, seed: int = 1) -> Path:
    """A 2-step recipe run of ``method`` on the tiny model, its adapter then randomised (so the routing moves
    the logits) and saved back with the recipe's metadata."""
    from orchmoe.cli import main

    argv = tiny_train_argv(model_dir, data, out, **SMALL_DATA, lr=None)
    assert main([*argv, "--method", method, "--max-steps", "2", "--no-eval", "--no-progress", *extra]) == 0
    base, _, info = load_model_and_tokenizer(str(model_dir))
    routed = load_adapter(base, out / "adapter", base_model_name=info["name"])
    randomize_adapter(routed, seed=seed, std=0.5)
    routed.save_pretrained(out / "adapter", metadata=routed.adapter_metadata)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """Run a FastAPI app with uvicorn on 127.0.0.1 in a thread; yields its base URL; drains it at the end."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
