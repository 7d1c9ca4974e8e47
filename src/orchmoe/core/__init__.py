"""The method core: what each method computes, with no knowledge of files, trainers or PEFT's wrapper.

`registry` (a method = a config + a router + one registration line), `config` (one dataclass per method),
`layer` (the one mixture-of-low-rank-experts layer), `routing` (the per-forward routing state), `routers/`
(model-level and token-level routers), `targets` (which layers to adapt), `budget` (parameter accounting),
`diagnostics` (what the routers learned).
"""
