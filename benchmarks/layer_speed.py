"""Layer micro-benchmark: one adapted projection at SmolLM2 shapes, forward + backward.

Every method wraps the same frozen ``nn.Linear`` (576->576, the q projection, and
576->1536, the MLP up projection, of SmolLM2-135M) and is sized to the trainable
budget of a rank-8 LoRA (4 skills x rank 2 for the mixtures; MoDE m=4 with a shared
down-projection, its rank chosen by the docs/methods.md formula to land closest to the
budget). Compared in one run, repetitions interleaved (the order rotates every rep):

* ``plain``      a hand-written LoRA layer, ``base(x) + (x @ A) @ B`` (the speed floor);
* ``ours:*``     orchmoe's ``RoutedLoraLayer`` for each method; parameter-mixing methods are routed
                 by their model-level router built for one layer (its cost included in every call),
                 token routers run inside the layer;
* ``peft:lora`` / ``peft:poly``  PEFT's LoRA / Poly layers on the same shapes;
* ``loop:molora-8`` a naive MoLoRA with a Python loop over 8 experts, against
                 ``ours:molora-8`` (same experts, same gate, no balance loss on either).

The time of one step is forward + backward (the input requires grad, as it does
inside a network; grads are set to None between steps as ``zero_grad`` does), in
train mode (Gumbel sampling for Poly/MHR/OrchMoE, the Switch balance loss for
MoLoRA). Further columns time an eval-mode forward under ``no_grad`` and one
decoding step (``batch x 1`` token, eval, ``no_grad``: what ``generate()`` repeats).
On a shared CPU use ``--threads 1 --timer cpu`` (process CPU time instead of wall
clock: other processes' load then barely moves the numbers).

    python benchmarks/layer_speed.py                       # CPU (or CUDA when present), fp32
    python benchmarks/layer_speed.py --threads 1 --timer cpu --json layer.json
    python benchmarks/layer_speed.py --device cuda --dtype bf16 --reps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

import orchmoe  # noqa: E402
from orchmoe import LoraConfig, MHRConfig, MoDEConfig, MoLoRAConfig, OrchMoEConfig, PolyConfig, count_parameters  # noqa: E402
from orchmoe.core.layer import RoutedLoraLayer  # noqa: E402
from orchmoe.core.registry import router_class  # noqa: E402
from orchmoe.core.routers import LayerRouter, RoutingInputs  # noqa: E402
from orchmoe.core.routing import RoutingState  # noqa: E402

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
N_TASKS = 8  # Poly/MHR training tasks (rows of Z)
N_ABSTRACT = 16  # OrchMoE K
MHR_SPLITS = 8


# ----------------------------------------------------------------------------- reference layers


class OneLayer(nn.Module):
    """The module every method is built on: one frozen projection named ``proj``."""

    def __init__(self, P: int, Q: int) -> None:
        super().__init__()
        self.proj = nn.Linear(P, Q, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PlainLora(nn.Module):
    """Hand-written LoRA: the speed floor for an adapter of this rank."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        P, Q = base.in_features, base.out_features
        self.A = nn.Parameter(torch.empty(P, rank).uniform_(-1 / math.sqrt(P), 1 / math.sqrt(P)))
        self.B = nn.Parameter(torch.zeros(rank, Q))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A) @ self.B * self.scale


class LoopMoLoRA(nn.Module):
    """Naive MoLoRA: softmax gate per token, then a Python loop over the experts."""

    def __init__(self, base: nn.Linear, n_experts: int, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        P, Q = base.in_features, base.out_features
        bound = 1 / math.sqrt(P)
        self.A = nn.ParameterList(
            [nn.Parameter(torch.empty(P, rank).uniform_(-bound, bound)) for _ in range(n_experts)]
        )
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(rank, Q)) for _ in range(n_experts)])
        self.gate = nn.Parameter(torch.empty(P, n_experts).uniform_(-bound, bound))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        g = F.softmax((x @ self.gate).float(), dim=-1).to(x.dtype)  # (b,n,S)
        for s in range(len(self.A)):
            y = y + g[..., s : s + 1] * ((x @ self.A[s]) @ self.B[s]) * self.scale
        return y


# ----------------------------------------------------------------------------- building the methods


def mode_config(P: int, Q: int, budget: int, m: int = 4) -> MoDEConfig:
    """MoDE with m experts per rank column (p = 1), rank chosen closest to `budget` by the docs/methods.md count."""
    best = None
    for r in range(1, 65):
        cfg = MoDEConfig(target_modules=["proj"], n_skills=m, rank=r, expert_rank=1)
        n = count_parameters(cfg, {"proj": (P, Q)}, P)
        if best is None or abs(n - budget) < best[0]:
            best = (abs(n - budget), cfg)
    return best[1]


class Bench:
    """One method: a module, a routing context, and the call that runs it."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        call: Callable[[torch.Tensor], torch.Tensor],
        state: RoutingState | None = None,
        note: str = "",
        routed: bool = False,
    ) -> None:
        self.name, self.module, self.call, self.state, self.note, self.routed = name, module, call, state, note, routed
        self.params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.times: list[float] = []
        self.eval_times: list[float] = []
        self.decode_times: list[float] = []


def routed_bench(label: str, cfg, base: nn.Linear, P: int, Q: int, task_ids: torch.Tensor, device, dtype) -> Bench:
    """Our layer for one method, with the routing a RoutedModel would compute for it before the forward."""
    cls = router_class(cfg)
    per_token = issubclass(cls, LayerRouter)
    holder = OneLayer(P, Q)
    holder.proj = RoutedLoraLayer(
        base,
        n_experts=cfg.n_experts,
        rank=cfg.rank,
        scale=cfg.scale,
        shared_down=cfg.shares_down_projection,
        n_splits=cfg.n_splits,
        router=cls.from_config(cfg, P) if per_token else None,
    )
    holder.model_router = None if per_token else cls.from_config(cfg, 1, P)
    holder = holder.to(device=device, dtype=dtype)
    state = RoutingState()
    holder.proj.state = state
    summary = torch.randn(task_ids.shape[0], P, device=device)  # OrchMoE's prompt summary u(x)
    inputs = RoutingInputs(batch=task_ids.shape[0], task_ids=task_ids, prompt_summary=summary)

    def route() -> None:
        r = holder.model_router(inputs) if holder.model_router is not None else None
        state.set(weights=None if r is None else r.weights)

    def call(x: torch.Tensor) -> torch.Tensor:
        route()
        return holder.proj(x)

    note = {"molora-8x1": "8 experts, no balance loss (vs loop)"}.get(label, "")
    b = Bench(f"ours:{label}", holder, call, state=state, note=note, routed=True)
    b.route, b.decode_call = route, holder.proj  # decoding keeps one routing for every step
    return b


def build_methods(
    P: int, Q: int, batch: int, device: torch.device, dtype: torch.dtype, with_peft: bool, seed: int = 0
) -> list[Bench]:
    torch.manual_seed(seed)
    base = nn.Linear(P, Q, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    budget = 8 * (P + Q)
    task_ids = torch.randint(0, N_TASKS, (batch,), device=device)
    benches: list[Bench] = []

    def one(module: nn.Module) -> nn.Module:
        return module.to(device=device, dtype=dtype)

    plain = one(PlainLora(base, 8))
    benches.append(Bench("plain:lora-8", plain, plain, note="hand-written x@A@B (floor)"))

    ours = {
        "lora-8": LoraConfig(target_modules=["proj"], rank=8),
        "molora-4x2": MoLoRAConfig(target_modules=["proj"], n_skills=4, rank=2),
        "poly-4x2": PolyConfig(target_modules=["proj"], n_tasks=N_TASKS, n_skills=4, rank=2),
        "mhr-4x2-h8": MHRConfig(target_modules=["proj"], n_tasks=N_TASKS, n_skills=4, rank=2, n_splits=MHR_SPLITS),
        "mode": mode_config(P, Q, budget),
        "orchmoe-4x2": OrchMoEConfig(target_modules=["proj"], n_skills=4, rank=2, n_abstract_tasks=N_ABSTRACT),
        "molora-8x1": MoLoRAConfig(target_modules=["proj"], n_skills=8, rank=1, aux_loss_coef=0.0),
    }
    for label, cfg in ours.items():
        if isinstance(cfg, MoDEConfig):
            label = f"mode-{cfg.n_skills}x{cfg.rank}x{cfg.expert_rank}"
        benches.append(routed_bench(label, cfg, base, P, Q, task_ids, device, dtype))

    loop = one(LoopMoLoRA(base, 8, 1))
    benches.append(Bench("loop:molora-8x1", loop, loop, note="Python loop over 8 experts"))

    if with_peft:
        import peft

        pl = peft.get_peft_model(
            OneLayer(P, Q), peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"])
        )
        pl.base_model.model.proj.base_layer = base
        pl = one(pl)
        benches.append(Bench("peft:lora-8", pl, pl))
        pp = peft.get_peft_model(
            OneLayer(P, Q), peft.PolyConfig(r=2, n_skills=4, n_splits=1, n_tasks=N_TASKS, target_modules=["proj"])
        )
        pp.base_model.model.proj.base_layer = base
        pp = one(pp)
        tuner = pp.base_model  # PolyModel: its forward routes task_ids to every Poly layer
        benches.append(Bench("peft:poly-4x2", pp, lambda x, t=tuner: t(x, task_ids=task_ids)))
    return benches


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(b: Bench, x: torch.Tensor, gy: torch.Tensor) -> None:
    for p in b.module.parameters():
        p.grad = None
    x.grad = None
    for leaf in getattr(b, "extra_leaves", []):
        leaf.grad = None
    if b.state is not None:
        b.state.aux_losses.clear()
    y = b.call(x)
    tensors, grads = [y], [gy]
    if b.state is not None and b.state.aux_losses:  # the Switch balance loss joins the loss, as in RoutedModel
        tensors.append(torch.stack([a.float() for a in b.state.aux_losses]).sum())
        grads.append(None)
    torch.autograd.backward(tensors, grads)


def time_method(
    b: Bench,
    x: torch.Tensor,
    gy: torch.Tensor,
    inner: int,
    device: torch.device,
    xd: torch.Tensor | None = None,
    inner_decode: int = 50,
) -> dict[str, float]:
    """ms per call, averaged over `inner` back-to-back calls: fwd+bwd and eval fwd, wall clock and process CPU time;
    with `xd` (batch x 1 token) also the eval forward of one decoding step, in microseconds."""
    b.module.train()
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(inner):
        step(b, x, gy)
    _sync(device)
    w1, c1 = time.perf_counter(), time.process_time()
    b.module.eval()
    with torch.no_grad():
        for _ in range(inner):
            b.call(x)
        _sync(device)
    w2, c2 = time.perf_counter(), time.process_time()
    k = 1e3 / inner
    out = {"wall": (w1 - w0) * k, "cpu": (c1 - c0) * k, "eval_wall": (w2 - w1) * k, "eval_cpu": (c2 - c1) * k}
    if xd is not None:
        decode = getattr(b, "decode_call", b.call)
        with torch.no_grad():
            if hasattr(b, "route"):
                b.route()
            for _ in range(inner_decode):
                decode(xd)
            _sync(device)
        w3, c3 = time.perf_counter(), time.process_time()
        out["decode_wall"], out["decode_cpu"] = (w3 - w2) * 1e6 / inner_decode, (c3 - c2) * 1e6 / inner_decode
    b.module.train()
    return out


def run_shape(P: int, Q: int, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    benches = build_methods(P, Q, args.batch, device, dtype, not args.no_peft)
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.seq, P, device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(args.batch, args.seq, Q, device=device, dtype=dtype)
    xd = torch.randn(args.batch, 1, P, device=device, dtype=dtype)  # one decoding step (KV cache): 1 token per row
    for b in benches:  # warm-up (allocator, kernels, lazy init)
        for _ in range(args.warmup):
            time_method(b, x, gy, 1, device, xd, 5)
    for rep in range(args.reps):
        k = rep % len(benches)
        for b in benches[k:] + benches[:k]:  # rotate the order: drift hits every method alike
            t = time_method(b, x, gy, args.inner, device, xd, args.inner_decode)
            b.times.append(t[args.timer])
            b.eval_times.append(t["eval_" + args.timer])
            b.decode_times.append(t["decode_" + args.timer])
    plain_b = next(b for b in benches if b.name.startswith("plain"))
    plain, plain_dec = statistics.median(plain_b.times), statistics.median(plain_b.decode_times)
    peft_lora = next((statistics.median(b.times) for b in benches if b.name == "peft:lora-8"), None)
    rows = []
    for b in benches:
        med = statistics.median(b.times)
        rows.append(
            {
                "method": b.name,
                "params": b.params,
                "fwd_bwd_ms": med,
                "fwd_bwd_ms_min": min(b.times),
                "fwd_bwd_ms_max": max(b.times),
                "eval_fwd_ms": statistics.median(b.eval_times),
                "decode_us": statistics.median(b.decode_times),
                "decode_vs_plain": statistics.median(b.decode_times) / plain_dec,
                "vs_plain": med / plain,
                "vs_peft_lora": (med / peft_lora) if peft_lora else None,
                "routed": b.routed,
                "note": b.note,
            }
        )
    return rows


def check_targets(
    shape: str, rows: list[dict], limit: float = 1.3, loop_speedup: float = 2.0
) -> list[tuple[str, bool, str]]:
    out = []
    by = {r["method"]: r for r in rows}
    for r in rows:
        if r["routed"]:
            out.append(
                (f"{shape} {r['method']} <= {limit}x plain LoRA", r["vs_plain"] <= limit, f"{r['vs_plain']:.2f}x")
            )
    if "loop:molora-8x1" in by and "ours:molora-8x1" in by:
        s = by["loop:molora-8x1"]["fwd_bwd_ms"] / by["ours:molora-8x1"]["fwd_bwd_ms"]
        out.append((f"{shape} ours:molora-8x1 >= {loop_speedup}x faster than the loop", s >= loop_speedup, f"{s:.2f}x"))
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | params | fwd+bwd ms (median) | min-max | vs plain LoRA | vs PEFT LoRA | eval fwd ms "
        "| decode step us | decode vs plain | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vp = f"{r['vs_peft_lora']:.2f}x" if r["vs_peft_lora"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ms_min']:.2f}-{r['fwd_bwd_ms_max']:.2f} "
            f"| {r['vs_plain']:.2f}x | {vp} | {r['eval_fwd_ms']:.2f} | {r['decode_us']:.0f} | {r['decode_vs_plain']:.2f}x | {r['note']} |"
        )
    return "\n".join(lines)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """The options, with the device, dtype and timer resolved (and --timer cpu refused on a GPU)."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions; the median is reported")
    ap.add_argument("--inner", type=int, default=3, help="back-to-back calls timed together in one repetition")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inner-decode", type=int, default=50, help="back-to-back decoding-step calls per repetition")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--shapes", default="576x576,576x1536", help="comma-separated PxQ layer shapes")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--bf16", action="store_true", help="shorthand for --dtype bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--timer",
        default="auto",
        choices=["auto", "wall", "cpu"],
        help="wall clock, or process CPU time (robust on a shared CPU; use with --threads 1); auto: wall",
    )
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT layers")
    ap.add_argument("--limit", type=float, default=1.3, help="target: routed time / plain LoRA time")
    ap.add_argument("--loop-speedup", type=float, default=2.0, help="target: MoLoRA-8 speed-up over the Python loop")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = DTYPES["bf16" if args.bf16 else args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timer == "auto":
        args.timer = "wall"
    if args.timer == "cpu" and device.type == "cuda":
        ap.error("--timer cpu measures host CPU time: use wall on a GPU")
    return args, device, dtype


def describe_run(args, argv: list[str] | None, device: torch.device, dtype: torch.dtype) -> dict:
    """Print the header and return the run's metadata for the JSON (falls back to --no-peft without peft)."""
    meta = {
        "command": " ".join(["python", "benchmarks/layer_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": hardware(device),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "orchmoe": orchmoe.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "reps": args.reps,
        "inner": args.inner,
        "timer": args.timer,
    }
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        if not args.no_peft:
            print("peft is not installed: running with --no-peft", file=sys.stderr)
            args.no_peft = True
    print(
        f"# layer_speed  {meta['date']}\n{meta['hardware']} | device {device} | {meta['dtype']} | torch {meta['torch']}"
        f" | batch {args.batch} x seq {args.seq} | reps {args.reps} x inner {args.inner} | timer {args.timer}\n"
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    """Time every shape, print its table and the targets; the exit code is 1 when a target fails."""
    args, device, dtype = parse_args(argv)
    meta = describe_run(args, argv, device, dtype)
    results, checks = {}, []
    for shape in args.shapes.split(","):
        P, Q = (int(v) for v in shape.lower().split("x"))
        rows = run_shape(P, Q, args, device, dtype)
        results[shape] = rows
        print(f"## {P} -> {Q}  (budget: LoRA r=8 = {8 * (P + Q):,} params)\n")
        print(markdown(rows) + "\n")
        checks += check_targets(shape, rows, args.limit, args.loop_speedup)
    print("## targets\n")
    for name, ok, value in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {name} ({value})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "meta": meta,
                    "results": results,
                    "targets": [{"target": n, "pass": ok, "value": v} for n, ok, v in checks],
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
