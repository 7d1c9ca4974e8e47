"""The engine: a bounded queue of requests and one thread that batches them continuously. No HTTP here.

Scheduling, one iteration of the engine thread at a time:

1. **Admit.** While the running batch has free rows (``max_batch``) and the newcomers' prompt tokens stay
   within ``max_prefill_tokens`` (the first newcomer always fits), take requests from the queue in
   arrival order. Prefill them in groups of ``prefill_batch`` (1 by default: a prompt prefilled alone is
   computed exactly as a lone ``generate`` computes it, with no padding); choose each one's first token;
   merge their KV caches and routing into the running batch (`KVBatch`: every row left-padded to the
   longest). A request never waits for the running batch to finish, only for the current step.
2. **Decode.** One forward for every running row (each under its own routing), then each row's next token.
3. **Retire.** Rows that hit eos, a stop string, ``max_tokens`` or the model's context end, and rows whose
   client went away, leave the batch; its columns are cut to the longest remaining row.

A prefill that fails fails only its requests (a group is retried one request at a time first); a failed
decoding step fails the rows of that step and the engine goes on with the queue. `stop` drains: no new
requests, everything queued or running finishes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchmoe.serving.runner import KVBatch
from orchmoe.serving.sampling import SamplingParams, TextTracker, choose_tokens

__all__ = ["Engine", "EngineStats", "GenerationRequest", "Handle", "Overloaded", "Event"]


class Overloaded(RuntimeError):
    """The queue is full, or the engine is shutting down: try again later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class GenerationRequest:
    """One prompt to complete.

    Attributes:
        prompt_ids: the prompt's token ids.
        route: what routes the row besides its prompt (a Poly/MHR task id, a LoRA name; None otherwise).
        params: decoding parameters.
    """

    prompt_ids: list[int]
    route: Any = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Event:
    """What the engine tells a request's owner: ``kind`` is "delta" (new ``text``), "done" (``finish_reason``,
    the whole ``text``) or "error" (``message``)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Handle:
    """A submitted request: its events go to ``sink`` (called on the engine thread); `cancel` frees its slot."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None]) -> None:
        self.request, self.sink = request, sink
        self.id = next(self._ids)
        self.cancelled = False
        self.done = False  # an end event ("done" or "error") was delivered
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


def _deliver(handle: Handle, event: Event) -> None:
    """Hand an event to its owner; an owner whose sink fails loses its request, never the engine thread."""
    try:
        handle.sink(event)
    except Exception:  # noqa: BLE001
        handle.cancel()


class EngineStats:
    """What the engine reports as it runs (no-ops here; the server's Prometheus metrics override them)."""

    def queue(self, waiting: int, running: int) -> None: ...

    def batch(self, size: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float, reason: str) -> None: ...


class _Row:
    """A request in the running batch."""

    def __init__(self, handle: Handle, tokenizer: Any) -> None:
        self.handle = handle
        self.params = handle.request.params
        self.generator = self.params.generator()
        self.tokens: list[int] = []
        self.text = TextTracker(tokenizer, self.params.stop)
        self.finish: str | None = None


class Engine:
    """Continuous batching over a runner (`orchmoe.serving.runner`): see the module docstring.

    Args:
        runner: a `RoutedRunner` or `PeftRunner`.
        max_batch: rows decoding together at most.
        max_queue: requests waiting at most (more: `Overloaded`).
        max_prefill_tokens: prompt tokens prefilled between two decoding steps (the first newcomer always).
        prefill_batch: newcomers prefilled in one forward (1: each alone, exactly as a lone ``generate``).
        stats: where the engine reports (`EngineStats`).
    """

    def __init__(
        self,
        runner: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 2048,
        prefill_batch: int = 1,
        stats: EngineStats | None = None,
    ) -> None:
        if min(max_batch, max_queue, max_prefill_tokens, prefill_batch) < 1:
            raise ValueError("max_batch, max_queue, max_prefill_tokens and prefill_batch must be >= 1")
        self.runner, self.stats = runner, stats or EngineStats()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prefill_tokens, self.prefill_batch = max_prefill_tokens, prefill_batch
        self._waiting: deque[Handle] = deque()
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._cv = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None

    # -- the owner's side ------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="orchmoe-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Handle:
        """Queue a request. Raises `Overloaded` when the queue is full or the engine is stopping."""
        handle = Handle(request, sink)
        with self._cv:
            if not self._accepting:
                raise Overloaded("the server is shutting down", retry_after=5.0)
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests waiting)", retry_after=1.0)
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    @property
    def load(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        with self._cv:
            return len(self._waiting), len(self._rows)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish what is queued and running, end the thread; False if it is still busy."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._rows and self._accepting:
                    self._cv.wait()
                if not self._waiting and not self._rows:
                    return  # stopped and drained
                newcomers = self._take_newcomers()
            try:
                self._admit(newcomers)
                self._retire()
                if self._rows:
                    self._step()
                    self._retire()
            except Exception as e:  # noqa: BLE001 - never let the thread die: fail the batch, go on
                handles = [r.handle for r in self._rows] + [h for h in newcomers if not h.done]
                self._rows, self._batch = [], None
                self._fail(list({id(h): h for h in handles if not h.done}.values()), e)
            self.stats.queue(*self.load)

    def _take_newcomers(self) -> list[Handle]:
        taken: list[Handle] = []
        tokens = 0
        while self._waiting and len(self._rows) + len(taken) < self.max_batch:
            h = self._waiting[0]
            if h.cancelled:
                self._waiting.popleft()
                continue
            n = len(h.request.prompt_ids)
            if taken and tokens + n > self.max_prefill_tokens:
                break
            taken.append(self._waiting.popleft())
            tokens += n
        return taken

    def _admit(self, handles: list[Handle]) -> None:
        """Prefill the newcomers (in groups), choose their first tokens, then merge them into the running batch
        at once (one copy of the running cache per admission, not one per newcomer)."""
        rows, batches = [], []
        for start in range(0, len(handles), self.prefill_batch):
            group = handles[start : start + self.prefill_batch]
            try:
                logits, batch = self.runner.prefill(
                    [h.request.prompt_ids for h in group], [h.request.route for h in group]
                )
            except Exception as e:  # noqa: BLE001 - a failing prompt fails its own request only
                if len(group) > 1:
                    self._admit_one_by_one(group)
                else:
                    self._fail(group, e)
                continue
            new = [_Row(h, self.runner.tokenizer) for h in group]
            self._advance(new, logits)
            rows, batches = rows + new, batches + [batch]
        if batches:
            self._batch = self.runner.merge(self._batch, *batches)
            self._rows += rows

    def _admit_one_by_one(self, group: list[Handle]) -> None:
        saved, self.prefill_batch = self.prefill_batch, 1
        try:
            self._admit(group)
        finally:
            self.prefill_batch = saved

    def _step(self) -> None:
        self.stats.batch(len(self._rows))
        try:
            logits = self.runner.decode(self._batch, [row.tokens[-1] for row in self._rows])
        except Exception as e:  # noqa: BLE001 - the step's rows fail; the engine goes on with the queue
            rows, self._rows, self._batch = self._rows, [], None
            self._fail([r.handle for r in rows], e)
            return
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits) -> None:
        """Each row's next token from its logits (b, V), its new text, and whether it is finished."""
        early = [i for i, r in enumerate(rows) if len(r.tokens) < r.params.min_tokens]
        if early and self.runner.eos_id is not None:
            logits = logits.clone()  # (an inference tensor of the runner's: not written in place)
            logits[early, self.runner.eos_id] = float("-inf")  # min_tokens: no eos yet
        tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        now = time.perf_counter()
        limit = self.runner.max_positions
        for row, tok in zip(rows, tokens):
            h = row.handle
            if h.first_token_at is None:
                h.first_token_at = now
                self.stats.first_token(now - h.submitted)
            if tok == self.runner.eos_id:
                row.finish = "stop"
                continue
            row.tokens.append(tok)
            delta, stopped = row.text.push(row.tokens)
            if delta:
                _deliver(h, Event("delta", text=delta))
            if stopped:
                row.finish = "stop"
            elif len(row.tokens) >= row.params.max_tokens or (
                limit and len(h.request.prompt_ids) + len(row.tokens) >= limit
            ):
                row.finish = "length"

    def _retire(self) -> None:
        """Finished and cancelled rows leave the running batch."""
        keep = [i for i, r in enumerate(self._rows) if r.finish is None and not r.handle.cancelled]
        if len(keep) == len(self._rows):
            return
        for r in self._rows:
            if r.handle.cancelled:
                self.stats.finished(len(r.handle.request.prompt_ids), len(r.tokens), 0.0, "cancelled")
            elif r.finish is not None:
                self._finish(r)
        self._rows = [self._rows[i] for i in keep]
        self._batch = self.runner.select(self._batch, keep) if keep else None

    def _finish(self, row: _Row) -> None:
        h, rest = row.handle, row.text.flush()
        if rest:
            _deliver(h, Event("delta", text=rest))
        n_prompt, n_out = len(h.request.prompt_ids), len(row.tokens)
        self.stats.finished(n_prompt, n_out, time.perf_counter() - h.submitted, row.finish)
        h.done = True
        _deliver(
            h,
            Event(
                "done", text=row.text.text, finish_reason=row.finish, prompt_tokens=n_prompt, completion_tokens=n_out
            ),
        )

    def _fail(self, handles: list[Handle], error: BaseException) -> None:
        for h in handles:
            h.done = True
            self.stats.finished(len(h.request.prompt_ids), 0, time.perf_counter() - h.submitted, "error")
            _deliver(h, Event("error", message=f"the model failed on this request: {type(error).__name__}: {error}"))
