"""The ``serve`` and ``predict`` subcommands of ``orchmoe`` (their flags, and running them).

orchmoe serve runs/main                                  # http://127.0.0.1:8000/v1 (OpenAI API)
orchmoe serve runs/main --port 8001 --api-key KEY       # or ORCHMOE_API_KEY
orchmoe serve --lora abstract-0=bundle/abstract-0 --lora abstract-1=bundle/abstract-1 --port 8001
orchmoe serve runs/main --route-to http://127.0.0.1:8001 # route here, generate on a multi-LoRA server
orchmoe predict runs/main --input rows.jsonl --output answers.jsonl
"""

from __future__ import annotations

import argparse

__all__ = ["add_serve_parser", "add_predict_parser", "run_serve", "run_predict"]


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free port), got {n}")
    return n


def _temperature(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= t <= 2.0:
        raise argparse.ArgumentTypeError(f"temperature is 0..2, got {t}")
    return t


def _lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="the base model (default: the run's, else the one recorded in the adapter)")
    p.add_argument("--dtype", help="dtype of the base weights (default: the run's; auto = float32 on CPU)")
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's; 1 is steadier on a "
                   "CPU shared with other work)")  # fmt: skip


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "serve",
        help="serve an adapter over the OpenAI HTTP API",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics) for a run folder or adapter folder, batching requests of every task together "
        "(continuous batching); or several PEFT LoRAs by name (--lora); or routing only (--route-to).",
    )
    s.add_argument("path", nargs="?", metavar="PATH", help="run folder or adapter folder")
    _add_model_flags(s)
    s.add_argument("--name", help="the model id clients use (default: the run folder's name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0: any free port)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request (default: $ORCHMOE_API_KEY)")
    s.add_argument("--lora", action="append", type=_lora, default=[], metavar="NAME=PATH",
                   help="serve this PEFT LoRA folder as model NAME (repeat for several)")  # fmt: skip
    s.add_argument("--bundle", metavar="DIR", help="an `orchmoe export --bundle` folder: serve its LoRAs by name, "
                   "or with --route-to, map the routing to its LoRAs through its manifest")  # fmt: skip
    s.add_argument("--route-to", metavar="URL", help="compute the routing here and forward each request to this "
                   "OpenAI-compatible server with the routing's LoRA (abstract-K / task-T) as model")  # fmt: skip
    g = s.add_argument_group("limits")
    g.add_argument("--max-batch", type=_positive, default=16, help="rows decoded together (default: 16)")
    g.add_argument(
        "--max-queue", type=_positive, default=64, help="requests waiting at most; more get 429 (default: 64)"
    )
    g.add_argument("--max-prefill-tokens", type=_positive, default=2048,
                   help="prompt tokens prefilled between two decoding steps (default: 2048)")  # fmt: skip
    g.add_argument("--prefill-batch", type=_positive, default=1,
                   help="newcomers prefilled in one forward (default: 1, each alone)")  # fmt: skip
    g.add_argument("--max-prompt-tokens", type=_positive, help="longest prompt accepted (default: half the context)")
    g.add_argument("--max-tokens", type=_positive, default=512, help="largest max_tokens accepted (default: 512)")
    g.add_argument(
        "--default-max-tokens", type=_positive, help="max_tokens when a request has none (default: the run's)"
    )
    g.add_argument("--temperature", type=_temperature, default=0.0,
                   help="temperature when a request has none (default: 0, greedy as the evaluation)")  # fmt: skip
    g.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body (default: 1 MiB)")
    g.add_argument("--max-streams", type=_positive, default=64, help="streaming responses open at once (default: 64)")
    s.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return s


def add_predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="answer every row of a jsonl/parquet file",
        description="Greedy answers for rows with a 'prompt', or 'definition' and 'input' (the training format; "
        "optional 'examples', 'task', 'id'), batched as the server batches. Resumable: a killed run "
        "started again continues where it stopped.",
    )
    p.add_argument("path", metavar="PATH", help="run folder or adapter folder")
    p.add_argument("--input", required=True, metavar="FILE", help=".jsonl or .parquet rows")
    p.add_argument("--output", required=True, metavar="FILE", help=".jsonl (or .parquet) answers, in input order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and start over)")
    _add_model_flags(p)
    p.add_argument("--max-tokens", type=_positive, help="tokens to generate (default: the run's evaluation length)")
    p.add_argument("--max-batch", type=_positive, default=16, help="rows decoded together (default: 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_serve(args: argparse.Namespace) -> None:
    _need_server_packages()
    from orchmoe.serving.server import ServeOptions, serve

    loras = dict(args.lora)
    if len(loras) != len(args.lora):
        raise ValueError("a --lora NAME is given twice")
    opts = ServeOptions(**{k: v for k, v in vars(args).items() if k in ServeOptions.__dataclass_fields__})
    opts.path, opts.loras = args.path, loras
    serve(opts)


def run_predict(args: argparse.Namespace) -> None:
    from orchmoe.serving.predict import predict
    from orchmoe.serving.server import steady_heap

    steady_heap()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = predict(
        args.path,
        args.input,
        args.output,
        overwrite=args.overwrite,
        model=args.model,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        progress=not args.no_progress,
    )
    resumed = f", {result['resumed']} kept from the interrupted run" if result["resumed"] else ""
    failed = f", {result['errors']} failed (see their 'error')" if result["errors"] else ""
    print(f"orchmoe predict: {result['rows']} rows answered in {args.output}{resumed}{failed}")


def _need_server_packages() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(f"serving needs {', '.join(missing)}: pip install 'orchmoe[serve]'")
