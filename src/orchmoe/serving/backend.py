"""Where the HTTP layer's requests go: the local engine (`LocalBackend`), or another server (route-only mode,
`orchmoe.serving.route_only`). A backend checks a request body, opens a stream of engine `Event`s for
it (raising `Overloaded` when full) and lists its model ids; the HTTP layer only formats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from orchmoe.serving.engine import Engine, Event, GenerationRequest
from orchmoe.serving.loader import Served
from orchmoe.serving.protocol import ChatBody, CompletionBody, Limits, build_request

__all__ = ["Prepared", "EventStream", "LocalBackend"]


@dataclass
class Prepared:
    """A checked request: what the engine runs and the model id the answer names."""

    request: GenerationRequest
    model_id: str
    body: CompletionBody | ChatBody
    route_name: str | None = None  # route-only mode: the upstream LoRA chosen (sent back as x-orchmoe-route)


class EventStream:
    """The events of one request as an async iterator; `close` cancels the request (frees its slot)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False
        self._cancel = None

    def put(self, event: Event) -> None:
        """Thread-safe: called from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        event = await self.queue.get()
        self.finished = event.kind != "delta"
        return event

    def close(self) -> None:
        if not self.finished and self._cancel is not None:
            self._cancel()
        self.finished = True


class LocalBackend:
    """The engine of this process over a served model."""

    def __init__(self, served: Served, engine: Engine, limits: Limits) -> None:
        self.served, self.engine, self.limits = served, engine, limits

    def model_ids(self) -> list[str]:
        return self.served.model_ids()

    def prepare(self, body: CompletionBody | ChatBody) -> Prepared:
        request, model_id = build_request(self.served, body, self.limits)
        return Prepared(request, model_id, body)

    async def open(self, prepared: Prepared) -> EventStream:
        stream = EventStream()
        handle = self.engine.submit(prepared.request, stream.put)
        stream._cancel = handle.cancel
        return stream

    def load(self) -> dict[str, Any]:
        waiting, running = self.engine.load
        return {"waiting": waiting, "running": running}

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.stop)
