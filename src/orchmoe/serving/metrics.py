"""Prometheus metrics of a server (``GET /metrics``), in a registry of its own (several servers may share a
process, as the tests do): requests by endpoint and status, prompt and generated tokens, queue depth and
running rows, decoding batch sizes, latency and time-to-first-token histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchmoe.serving.engine import EngineStats

__all__ = ["ServerMetrics"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics(EngineStats):
    """The engine's reports (`EngineStats`) and the HTTP layer's counts, as Prometheus series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "orchmoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("orchmoe_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("orchmoe_generation_tokens", "tokens generated", registry=r)
        self.finished_requests = Counter("orchmoe_finished", "engine requests by finish reason", ["reason"], registry=r)
        self.waiting = Gauge("orchmoe_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("orchmoe_running_requests", "rows in the running batch", registry=r)
        self.streams = Gauge("orchmoe_open_streams", "streaming responses open", registry=r)
        self.batch_size = Histogram(
            "orchmoe_batch_size", "rows per decoding step", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.latency = Histogram(
            "orchmoe_request_latency_seconds", "submit to last token", buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "orchmoe_time_to_first_token_seconds", "submit to first token", buckets=_LATENCY, registry=r
        )

    def queue(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float, reason: str) -> None:
        self.finished_requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if reason in ("stop", "length"):
            self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
