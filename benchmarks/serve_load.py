"""Serving load: `orchmoe serve` under 16 concurrent clients vs the same requests one at a time, in one run.

A real server process (``python -m orchmoe serve RUN``) answers requests built from one instance of each of
16 different SuperNI tasks (the adapter's training tasks, in the structured training form: definition, input,
demonstrations), greedy, exactly ``new-tokens`` new tokens each (``min_tokens`` = ``max_tokens``: eos is masked
until then, as ``generate(min_new_tokens=...)`` does), so both modes generate the same tokens. Measured:

* throughput: completed tokens/s with all 16 clients at once against the same 16 requests sent one after the
  other (each waits for the previous answer); p50 / p99 request latency of both (``reps`` rounds, medians);
* time to first token of a lone streamed request (first SSE chunk with text) against a direct
  ``model.generate(max_new_tokens=1)`` of the same prompt ids in this process, alternating, medians;
* peak RSS: the server's ``VmHWM`` after the load against a fresh process that loads the same model and adapter
  and runs one lone ``generate`` of the longest prompt;
* greedy agreement: the server's answers (concurrent and sequential rounds) against lone ``model.generate``
  calls here (``min_new_tokens`` = ``max_new_tokens``), prompt by prompt.

``--threads`` sets torch's CPU threads of the server, of this process and of the lone-generate process alike
(on a CPU shared with other work, 1 thread is far steadier than 2: OpenMP threads wait for descheduled ones).

Goals (issue 16, 2-core CPU, SmolLM2-135M fp32): concurrent >= 4x sequential tokens/s; TTFT <= 1.2x a direct
generate; peak RSS <= 1.2x a lone generate's.

    python benchmarks/serve_load.py runs/orch --json serve_load.json
    python benchmarks/serve_load.py runs/orch --clients 4 --new-tokens 8 --reps 1 --ttft-reps 1   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set of a process in bytes (``VmHWM``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def task_requests(served, n: int) -> list[dict]:
    """One structured request per task: the adapter's training tasks first, then others of its data."""
    from orchmoe.data import load_task, read_split

    meta = served.model.adapter_metadata
    data = meta.get("data_dir") or meta.get("data")
    names = list(meta.get("tasks") or [])
    names += [t for t in read_split(data, "default", "train") if t not in names]
    out = []
    for name in names:
        try:
            task = load_task(data, name)
        except Exception:  # noqa: BLE001 - a task listed by the split but absent from this copy
            continue
        inst = task.instances[-1]
        examples = [{"input": e["input"], "output": e["output"]} for e in task.positive_examples[:2]]
        out.append({"task": name, "definition": task.definition, "input": inst["input"], "examples": examples})
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} tasks found in {data}; need {n}")


class Server:
    """``python -m orchmoe serve RUN --port 0`` in a subprocess."""

    def __init__(self, run: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "orchmoe", "serve", run, "--port", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = None
        for line in self.proc.stdout:
            m = re.search(r" on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            raise SystemExit(f"the server did not start: {self.proc.stderr.read()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def post(client, url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    resp = client.post(url + "/v1/completions", json=body, timeout=600)
    resp.raise_for_status()
    return time.perf_counter() - t0, resp.json()


def sequential(url: str, bodies: list[dict]) -> dict:
    import httpx

    with httpx.Client() as client:
        t0 = time.perf_counter()
        results = [post(client, url, b) for b in bodies]
        wall = time.perf_counter() - t0
    return summarise(results, wall)


def concurrent(url: str, bodies: list[dict]) -> dict:
    import httpx

    results: list = [None] * len(bodies)
    gate = threading.Barrier(len(bodies) + 1)

    def client(i: int) -> None:
        with httpx.Client() as c:
            gate.wait()
            results[i] = post(c, url, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return summarise(results, time.perf_counter() - t0)


def summarise(results: list, wall: float) -> dict:
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
            "texts": [r[1]["choices"][0]["text"] for r in results]}  # fmt: skip


def ttft_server(url: str, body: dict) -> float:
    import httpx

    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=600) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def lone_generate(served, ids: list[int], max_new: int):
    import torch

    x = torch.tensor([ids])
    eos = served.tokenizer.eos_token_id
    out = served.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                min_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                pad_token_id=served.runner.pad_id, temperature=None, top_p=None, top_k=None)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    return served.tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


def lone_rss(run: str, new_tokens: int, n: int) -> None:
    """(subprocess) load as the server does, one lone generate of the longest prompt, print VmHWM."""
    from orchmoe.serving.loader import load_served

    served = load_served(run)
    reqs = task_requests(served, n)
    fmt, tok = served.prompt_format, served.tokenizer
    ids = max((fmt.encode(tok, r["definition"], r["input"], r["examples"]) for r in reqs), key=len)
    lone_generate(served, ids, new_tokens)
    print(json.dumps({"vm_hwm": vm_hwm()}))


def measure(args) -> dict:
    from orchmoe.serving.loader import load_served

    served = load_served(args.run)
    reqs = task_requests(served, args.clients)
    fmt, tok = served.prompt_format, served.tokenizer
    prompt_ids = [fmt.encode(tok, r["definition"], r["input"], r["examples"]) for r in reqs]
    keys = ("definition", "input", "examples")
    n = args.new_tokens
    bodies = [{**{k: r[k] for k in keys}, "max_tokens": n, "min_tokens": n, "temperature": 0} for r in reqs]
    threads = ["--threads", str(args.threads)] if args.threads else []
    server = Server(args.run, "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients), *threads)
    try:
        sequential(server.url, bodies[:2])  # warm-up
        lone = [lone_generate(served, ids, args.new_tokens) for ids in prompt_ids]
        rounds = {"sequential": [], "concurrent": []}
        for rep in range(args.reps):
            for mode in ("sequential", "concurrent") if rep % 2 == 0 else ("concurrent", "sequential"):
                rounds[mode].append((sequential if mode == "sequential" else concurrent)(server.url, bodies))
        mid = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))[len(prompt_ids) // 2]
        t_server, t_direct = [], []
        for _ in range(args.ttft_reps):
            t_server.append(ttft_server(server.url, {**bodies[mid], "max_tokens": 1, "min_tokens": 1}))
            t0 = time.perf_counter()
            lone_generate(served, prompt_ids[mid], 1)
            t_direct.append(time.perf_counter() - t0)
        server_rss = vm_hwm(server.proc.pid)
    finally:
        exit_code = server.stop()
    lone_proc = subprocess.run([sys.executable, __file__, args.run, "--lone-rss", "--new-tokens", str(args.new_tokens),
                                "--clients", str(args.clients), *threads], capture_output=True, text=True, check=True)  # fmt: skip
    lone_hwm = json.loads(lone_proc.stdout.strip().splitlines()[-1])["vm_hwm"]
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "tokens", "tokens_per_s", "p50_s", "p99_s")}
           for m, rs in rounds.items()}  # fmt: skip
    agree = {m: [sum(a == b for a, b in zip(r["texts"], lone)) for r in rs] for m, rs in rounds.items()}
    return {"median": med, "agreement": agree, "n": len(lone), "ttft_server_s": statistics.median(t_server),
            "ttft_direct_s": statistics.median(t_direct), "server_rss": server_rss, "lone_rss": lone_hwm,
            "server_exit": exit_code, "prompt_tokens": [len(p) for p in prompt_ids],
            "tasks": [r["task"] for r in reqs], "method": served.method}  # fmt: skip


def report(res: dict, args) -> None:
    seq, con = res["median"]["sequential"], res["median"]["concurrent"]
    speedup = con["tokens_per_s"] / seq["tokens_per_s"]
    ttft = res["ttft_server_s"] / res["ttft_direct_s"]
    rss = res["server_rss"] / res["lone_rss"]
    p = res["prompt_tokens"]
    print(f"## serve_load: {res['method']} adapter of {args.run}, {args.clients} tasks, {args.new_tokens} new tokens each,"
          f" greedy, fp32; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today()}; torch threads {args.threads or 'default'}; prompts {min(p)}-{max(p)} tokens "
          f"(mean {sum(p) / len(p):.0f})")  # fmt: skip
    print()
    print("| mode | tokens | wall s | tokens/s | p50 latency s | p99 latency s | greedy = lone generate |")
    print("|---|---|---|---|---|---|---|")
    for name, m in (("one at a time", seq), (f"{args.clients} concurrent", con)):
        key = "sequential" if name == "one at a time" else "concurrent"
        agree = ", ".join(f"{a}/{res['n']}" for a in res["agreement"][key])
        print(f"| {name} | {m['tokens']:.0f} | {m['wall_s']:.2f} | {m['tokens_per_s']:.2f} | {m['p50_s']:.2f} | "
              f"{m['p99_s']:.2f} | {agree} |")  # fmt: skip
    print()
    print("| check | measured | goal | met |")
    print("|---|---|---|---|")
    rows = [("concurrent / sequential tokens/s", f"{speedup:.2f}x", ">= 4x", speedup >= 4),
            ("lone TTFT: server / direct generate", f"{res['ttft_server_s'] * 1e3:.0f} / {res['ttft_direct_s'] * 1e3:.0f} ms"
             f" = {ttft:.2f}x", "<= 1.2x", ttft <= 1.2),
            ("peak RSS: server under load / lone generate", f"{res['server_rss'] / 2**20:.0f} / "
             f"{res['lone_rss'] / 2**20:.0f} MiB = {rss:.2f}x", "<= 1.2x", rss <= 1.2),
            ("server exit status after SIGTERM", str(res["server_exit"]), "0", res["server_exit"] == 0)]  # fmt: skip
    for name, value, goal, ok in rows:
        print(f"| {name} | {value} | {goal} | {'yes' if ok else 'NO'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder or adapter folder (an OrchMoE adapter trained on SuperNI tasks)")
    p.add_argument("--clients", type=int, default=16, help="tasks = concurrent clients")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="rounds of each mode (alternating order), medians")
    p.add_argument("--ttft-reps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads of every process (default: torch's)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--lone-rss", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.lone_rss:
        return lone_rss(args.run, args.new_tokens, args.clients)
    res = measure(args)
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
