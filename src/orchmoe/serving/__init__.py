"""Serving a trained adapter: ``orchmoe serve`` (the OpenAI HTTP API) and ``orchmoe predict`` (files of rows).

Layers, each importing only those below it:

* `runner` — the one place that runs the model: prefill, one decoding step, merging and shrinking a running
  batch's KV cache and routing (`RoutedRunner` for orchmoe adapters, `PeftRunner` for PEFT LoRAs by name);
* `sampling` — next tokens (greedy, temperature / top-p with per-row seeds) and text with stop strings;
* `engine` — the bounded queue and the continuous-batching thread (no HTTP): `Engine`, `GenerationRequest`;
* `loader` — what is served (a run or adapter folder with its prompt format, or LoRAs by name) and how model
  ids and ``task`` fields route a request;
* `protocol` — the OpenAI request bodies, checked, into engine requests; `errors` — the refusal type;
* `backend`, `route_only` — where requests go: the local engine, or an upstream multi-LoRA server;
* `api`, `metrics`, `server` — the FastAPI application, Prometheus metrics, uvicorn with graceful SIGTERM;
* `predict`, `cli` — batch prediction and the two subcommands.

See docs/serving.md for the API, the scheduler and the limits.
"""
