"""Starting a server: the backend for what is served, the application, uvicorn on a bound socket.

uvicorn turns SIGTERM and SIGINT into a graceful shutdown: it stops accepting connections, lets the
requests in flight finish (streams included), then the application's lifespan stops the engine
(which has nothing left to do) and the process exits 0.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from orchmoe.serving.api import ServerSettings, create_app
from orchmoe.serving.protocol import Limits

__all__ = ["ServeOptions", "build_app", "serve"]

API_KEY_ENV = "ORCHMOE_API_KEY"
UPSTREAM_KEY_ENV = "ORCHMOE_UPSTREAM_API_KEY"  # route-only mode: the key of the server requests are forwarded to


@dataclass
class ServeOptions:
    """Everything ``orchmoe serve`` takes (see its ``--help``)."""

    path: str | None = None
    model: str | None = None
    dtype: str | None = None
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    loras: dict[str, str] = field(default_factory=dict)
    route_to: str | None = None
    bundle: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_prefill_tokens: int = 2048
    prefill_batch: int = 1
    max_prompt_tokens: int | None = None
    max_tokens: int = 512
    default_max_tokens: int | None = None
    temperature: float = 0.0
    max_body_bytes: int = 1 << 20
    max_streams: int = 64
    upstream_timeout: float = 600.0
    threads: int | None = None
    log_level: str = "warning"


def _limits(opts: ServeOptions, served: Any) -> Limits:
    fmt = served.prompt_format
    max_prompt = opts.max_prompt_tokens or max(fmt.max_source_len, min(2048, served.max_positions or 2048) // 2)
    default_tokens = min(opts.default_max_tokens or fmt.generation_tokens, opts.max_tokens)
    return Limits(
        max_prompt_tokens=max_prompt,
        max_tokens=opts.max_tokens,
        default_max_tokens=default_tokens,
        default_temperature=opts.temperature,
    )


def build_app(opts: ServeOptions):
    """The FastAPI application for ``opts`` (the model loaded, the engine started), and what it serves."""
    from orchmoe.serving.engine import Engine
    from orchmoe.serving.loader import load_lora_set, load_served
    from orchmoe.serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    settings = ServerSettings(
        api_key=opts.api_key if opts.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=opts.max_body_bytes,
        max_streams=opts.max_streams,
    )
    from orchmoe.adapters.bundle import BundleManifest
    from orchmoe.serving.route_only import RouteOnlyBackend

    bundle = BundleManifest.read(opts.bundle) if opts.bundle else None
    if opts.route_to:
        if opts.loras:
            raise ValueError("--route-to forwards every request; it serves no --lora itself")
        served = load_served(_need_path(opts), model=opts.model, dtype=opts.dtype, name=opts.name)
        backend = RouteOnlyBackend(served, opts.route_to, _limits(opts, served), timeout=opts.upstream_timeout,
                                   api_key=os.environ.get(UPSTREAM_KEY_ENV), bundle=bundle)  # fmt: skip
        return create_app(backend, settings, metrics), served
    if bundle is not None:
        opts.loras = {**{name: str(path) for name, path in bundle.lora_paths().items()}, **opts.loras}
    if opts.loras:
        if opts.path:
            raise ValueError("give either PATH (a routed adapter) or --lora NAME=PATH ..., not both")
        served = load_lora_set(opts.loras, model=opts.model, dtype=opts.dtype)
    else:
        served = load_served(_need_path(opts), model=opts.model, dtype=opts.dtype, name=opts.name)
    from orchmoe.serving.backend import LocalBackend

    engine = Engine(
        served.runner,
        max_batch=opts.max_batch,
        max_queue=opts.max_queue,
        max_prefill_tokens=opts.max_prefill_tokens,
        prefill_batch=opts.prefill_batch,
        stats=metrics,
    ).start()
    return create_app(LocalBackend(served, engine, _limits(opts, served)), settings, metrics), served


def _need_path(opts: ServeOptions) -> str:
    if not opts.path:
        raise ValueError("give the run folder or adapter folder to serve (or --lora NAME=PATH)")
    return opts.path


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def steady_heap(threshold: int = 256 * 1024) -> bool:
    """glibc only: give every allocation over ``threshold`` bytes its own mapping, returned to the system when
    freed. A server allocates and frees KV caches of changing sizes for as long as it runs; with glibc's
    default (a threshold that rises after frees) they come from the heap, which fragments and whose peak
    resident size only grows. Returns whether it was set."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # mallopt's M_MMAP_THRESHOLD (setting it also turns the dynamic threshold off)
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def _draining_server_class():
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM once it has drained (the process then dies of it, status 143);
        a drained server has done what SIGTERM asks, so it exits 0 instead. SIGINT is still re-raised."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]

    return DrainingServer


def serve(opts: ServeOptions) -> None:
    """Load, bind, print the address, serve until SIGTERM/SIGINT (then drain and return)."""
    import uvicorn

    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    steady_heap()
    sock = _bind(opts.host, opts.port)  # bound before loading: a taken port fails in a second, not a minute
    app, served = build_app(opts)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"orchmoe serve: {served.method} as {', '.join(served.model_ids()[:4])}"
          f"{' ...' if len(served.model_ids()) > 4 else ''} on http://{shown}:{port}", flush=True)  # fmt: skip
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not (opts.api_key or os.environ.get(API_KEY_ENV)):
        print(f"orchmoe serve: warning: listening on {opts.host} without an API key", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=opts.log_level, timeout_graceful_shutdown=None, access_log=False)
    _draining_server_class()(config).run(sockets=[sock])
    print("orchmoe serve: stopped", flush=True)
