"""Route-only mode: compute the routing here, generate on an OpenAI-compatible multi-LoRA server.

A parameter-mixing adapter under a fixed routing is one plain LoRA (`RoutedModel.export_peft_lora`), so an
engine that serves many LoRAs (vLLM ``--enable-lora``, SGLang, LoRAX, or ``orchmoe serve --lora``) can
generate once this process has chosen the LoRA: OrchMoE's most probable abstract task of pi(x) (exact for
a hard-routed adapter; with a soft pi the argmax is an approximation), or the Poly/MHR task of the request.
The prompt is built here (the training format, a chat template) and sent as token ids, so the upstream
server sees exactly the tokens the routing was computed from. The upstream answers are streamed back.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import torch

from orchmoe.adapters.bundle import BundleManifest, lora_name
from orchmoe.serving.backend import EventStream, Prepared
from orchmoe.serving.engine import Event, Overloaded
from orchmoe.serving.loader import Served
from orchmoe.serving.protocol import ChatBody, CompletionBody, Limits, RequestError, build_request

__all__ = ["RouteOnlyBackend", "route_of"]


def route_of(served: Served, prompt_ids: list[int], route: Any, bundle: BundleManifest | None = None) -> str:
    """The bundle LoRA that serves this prompt (named by `orchmoe.adapters.bundle.lora_name`); with a bundle's
    manifest, the LoRA its routing maps to (an abstract task without a LoRA of its own goes where it says)."""
    model = served.model
    if served.routes_by_task:
        return bundle.lora_for(task=int(route)) if bundle is not None else lora_name(task_id=int(route))
    if served.routing == "prompt":
        ids = torch.as_tensor([prompt_ids], dtype=torch.long, device=served.runner.device)
        with torch.inference_mode():
            pi = model.task_probabilities(input_ids=ids, attention_mask=torch.ones_like(ids))  # (1, K)
        k = int(pi.argmax(-1))
        return bundle.lora_for(abstract_task=k) if bundle is not None else lora_name(abstract_task=k)
    raise ValueError(
        f"route-only mode needs an adapter that folds into plain LoRAs per routing (OrchMoE, Poly, MHR); "
        f"{served.method} routes every token and has no such form"
    )


class _UpstreamStream(EventStream):
    """The upstream server's SSE chunks as engine `Event`s. A task of its own reads the upstream response into a
    queue, so a reader that stops waiting (to check its client) never interrupts the upstream read."""

    def __init__(self, response, prompt_tokens: int) -> None:
        super().__init__()  # the queue and the iteration over it (EventStream's)
        self.response, self.prompt_tokens = response, prompt_tokens
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        text, tokens, reason = [], 0, "stop"
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    self.queue.put_nowait(Event("error", message=f"upstream: {chunk['error'].get('message')}"))
                    return
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        text.append(choice["text"])
                        self.queue.put_nowait(Event("delta", text=choice["text"]))
                    reason = choice.get("finish_reason") or reason
        except Exception as e:  # noqa: BLE001 - a broken upstream stream fails this request only
            self.queue.put_nowait(Event("error", message=f"upstream stream failed: {type(e).__name__}"))
            return
        finally:
            await self.response.aclose()
        self.queue.put_nowait(Event("done", text="".join(text), finish_reason=reason,
                                    prompt_tokens=self.prompt_tokens, completion_tokens=tokens))  # fmt: skip

    def close(self) -> None:
        """Stop reading: closing the connection ends the upstream request too."""
        self.finished = True
        if not self.task.done():
            self.task.cancel()


class RouteOnlyBackend:
    """Routes here, forwards to ``url`` (an OpenAI-compatible server with the bundle's LoRAs as models)."""

    def __init__(
        self,
        served: Served,
        url: str,
        limits: Limits,
        *,
        timeout: float = 600.0,
        api_key: str | None = None,
        bundle: BundleManifest | None = None,
    ):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--route-to {url!r}: give the upstream server's base URL, e.g. http://127.0.0.1:8001")
        route_of(served, [served.tokenizer.eos_token_id or 0], None if not served.routes_by_task else 0)  # refuse early
        self.served, self.limits, self.bundle = served, limits, bundle
        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers)
        self._lock = threading.Lock()  # one routing computation at a time on the model

    def model_ids(self) -> list[str]:
        return self.served.model_ids()

    def prepare(self, body: CompletionBody | ChatBody) -> Prepared:
        request, model_id = build_request(self.served, body, self.limits)
        with self._lock:
            request.route = route_of(self.served, request.prompt_ids, request.route, self.bundle)
        return Prepared(request, model_id, body, route_name=request.route)

    async def open(self, prepared: Prepared) -> _UpstreamStream:
        import httpx

        req, p = prepared.request, prepared.request.params
        payload = {"model": req.route, "prompt": req.prompt_ids, "max_tokens": p.max_tokens,
                   "temperature": p.temperature, "top_p": p.top_p, "stop": list(p.stop) or None, "seed": p.seed,
                   "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        if p.min_tokens:
            payload["min_tokens"] = p.min_tokens  # vLLM's extension, as this server's
        try:
            response = await self.client.send(
                self.client.build_request("POST", f"{self.url}/v1/completions", json=payload), stream=True
            )
        except httpx.HTTPError as e:
            raise RequestError(f"the upstream server {self.url} cannot be reached: {type(e).__name__}", 502) from None
        if response.status_code >= 400:
            raw = await response.aread()
            await response.aclose()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw[:200].decode("utf-8", "replace")
            if response.status_code in (429, 503):
                raise Overloaded(f"upstream: {message}", float(response.headers.get("retry-after", 1) or 1))
            status = response.status_code if response.status_code < 500 else 502
            raise RequestError(f"upstream ({req.route}): {message}", status)
        return _UpstreamStream(response, len(req.prompt_ids))

    def load(self) -> dict[str, Any]:
        return {"upstream": self.url}

    async def aclose(self) -> None:
        await self.client.aclose()
