"""One Markdown page of a GPU-check call: every step (ok / failed / timed out / not run, and why), every
target as PASS / FAIL, then the tests, speed, serving and quality tables.

Reads the call's check.json (scripts/gpu_check.py writes it, raw results included); anything a step did not
produce is shown as not run with its reason, never guessed.

    python scripts/gpu_summary.py check.json [--out summary.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def fmt(v, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, spec)}{suffix}"


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def junit_counts(path: Path) -> dict:
    """Counts and failed tests (with the first line of their message) of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["failed"] = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").strip().splitlines()
            n["failed"].append({"test": case.get("name"), "message": message[0][:300] if message else ""})
    n["seconds"] = float(suite.get("time", 0) or 0)
    reasons: dict[str, int] = {}
    for case in suite.iter("testcase"):
        if (skip := case.find("skipped")) is not None:
            why = (skip.get("message") or "").strip()
            reasons[why] = reasons.get(why, 0) + 1
    n["skipped_reasons"] = reasons
    return n


def tests_lines(data: dict) -> list[str]:
    lines = [
        f"{data['tests']} tests: {data['passed']} passed, {data['failures']} failed, {data['errors']} errors, "
        f"{data['skipped']} skipped ({data['seconds']:.0f} s)."
    ]
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in data["failed"]]
    return lines + [f"- skipped ({n}): {why}" for why, n in (data.get("skipped_reasons") or {}).items()]


def speed_lines(data: dict) -> list[str]:
    """Every method against our LoRA and PEFT's LoRA: training tokens/s, generation, decoding steps, peak memory."""
    meta = data["meta"]
    lines = [
        f"{meta['model']} | {meta['hardware']} | {meta['dtype']}, autocast {meta.get('autocast')} | "
        f"train {meta['train']} | generate {meta['generate']}",
        "",
        "| method | trainable | train tok/s | train time vs LoRA (paired) | vs PEFT LoRA | generate tok/s "
        "| generate time vs LoRA | vs PEFT LoRA | decode step ms | decode vs LoRA (paired) | peak MiB | peak vs LoRA "
        "| vs PEFT LoRA | = base tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [r for r in data["results"] if r["method"] != "base"]
    peak = {r["method"]: r.get("peak_mb") for r in rows}
    for r in rows:
        same = "-" if r.get("same_as_base") is None else ("yes" if r["same_as_base"] else "NO")
        lines.append(
            f"| {r['label']} | {r['params']:,} | {fmt(r['train_tok_s'], ',.0f')} "
            f"| {fmt(r['train_vs_lora_paired'] or r['train_vs_lora'], '.3f', 'x')} "
            f"| {fmt(r['train_vs_peft_lora'], '.3f', 'x')} | {fmt(r.get('gen_tok_s'), ',.0f')} "
            f"| {fmt(r['gen_vs_lora'], '.3f', 'x')} "
            f"| {fmt(r['gen_vs_peft_lora'], '.3f', 'x')} | {fmt(r.get('decode_ms'), '.2f')} "
            f"| {fmt(r.get('decode_vs_lora_paired'), '.3f', 'x')} | {fmt(r.get('peak_mb'), ',.0f')} "
            f"| {fmt(ratio(r.get('peak_mb'), peak.get('lora')), '.3f', 'x')} "
            f"| {fmt(ratio(r.get('peak_mb'), peak.get('peft-lora')), '.3f', 'x')} | {same} |"
        )
    return lines + ["", "Time ratios: below 1 is faster. Peak memory: of a training step, over what was allocated."]


def serving_lines(data: dict) -> list[str]:
    meta = data["meta"]
    lines = [
        f"{meta['model']} | {meta['hardware']} | {meta['dtype']}, autocast {meta.get('autocast')} | {meta['batch']}",
        "",
        "| server | batch s | new tok/s | speed-up vs PEFT mixed | rows = PEFT's | logits gap / adapter effect |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        a = r.get("agreement") or {}
        lines.append(
            f"| {r['label']} | {r['s']:.3f} | {r['new_tok_s']:,.0f} | {fmt(r['speedup_vs_peft'], '.2f', 'x')} "
            f"| {fmt(a.get('rows_equal'), '.3f')} | {fmt(a.get('gap_over_effect'), '.2e')} |"
        )
    return lines


def generic_lines(data: dict) -> list[str]:
    """Any benchmark's ``results`` rows as a table (for scripts whose layout this page does not know)."""
    rows = data.get("results") or []
    if not rows or not isinstance(rows[0], dict):
        return ["```", json.dumps(data, indent=1)[:4000], "```"]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]


def quality_lines(steps: list[dict]) -> list[str]:
    """One table per protocol: method, figures on seen and unseen tasks, train time, or why there are none."""
    out: list[str] = []
    model = next((s for s in steps if s["key"] == "model"), None)
    if model and model.get("data"):
        m = model["data"]
        out += [
            f"Model check: end token {m['eos_token']!r} (id {m['tokenizer_ids']['eos']}), pad {m['pad_token']!r}; "
            f"the GGUF names {m['gguf_ids']}; greedy answer {m['answer']!r} (stopped at the end token: "
            f"{m['stopped_at_eos']}).",
            "",
        ]
    protocols: dict[str, list[dict]] = {}
    for s in steps:
        if s["key"].startswith("quality-"):
            protocols.setdefault(s["key"].split("-", 1)[1].rsplit("-", 1)[0], []).append(s)
    for protocol, runs in protocols.items():
        out += [
            f"### {protocol}",
            "",
            "| method | trainable | seen ROUGE-L | seen ROUGE-Lsum | seen EM | unseen ROUGE-L | unseen EM | train s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            method = r["key"].rsplit("-", 1)[1]
            d = r.get("data") or {}
            if r["status"] != "ok" or not d:
                out.append(f"| {method} | {r['status']}: {r.get('reason', '')} |  |  |  |  |  |  |")
                continue
            seen, unseen = d.get("seen", {}), d.get("unseen", {})
            out.append(
                f"| {method} | {fmt(d.get('trainable_parameters'), ',')} | {fmt(seen.get('rougeL'), '.2f')} "
                f"| {fmt(seen.get('rougeLsum'), '.2f')} | {fmt(seen.get('exact_match'), '.2f')} "
                f"| {fmt(unseen.get('rougeL'), '.2f')} | {fmt(unseen.get('exact_match'), '.2f')} "
                f"| {fmt(d.get('train_seconds'), '.0f')} |"
            )
        out.append("")
    return out


def header(check: dict) -> list[str]:
    env = next((s.get("data") for s in check["steps"] if s["key"] == "env"), None) or {}
    v = env.get("versions", {})
    line = " | ".join(
        [f"device {env.get('device', '?')}"] + [f"{k} {v.get(k)}" for k in ("torch", "transformers", "peft") if k in v]
    )
    title = f"# GPU check: {check['mode']}" + (
        " (DRY RUN on a CPU: the plumbing at tiny sizes, no figures)" if check["dry"] else ""
    )
    return [title, "", line, "", f"Budget {check['budget_s']:.0f} s, used {check['elapsed_s']:.0f} s.", ""]


def render(check: dict) -> str:
    """The page for one call's check.json."""
    steps = check["steps"]
    out = header(check) + ["## Steps", "", "| step | status | s | note |", "|---|---|---:|---|"]
    targets = []
    for s in steps:
        data = s.get("data") or {}
        targets += [{**t, "where": s["key"]} for t in (data.get("targets") or []) if isinstance(data, dict)]
        note = s.get("reason", "")
        if s["key"] == "tests" and data:
            note = note or tests_lines(data)[0]
        out.append(f"| {s['title']} | {s['status']} | {fmt(s.get('seconds'), '.0f')} | {note} |")
    if targets:
        out += ["", "## Targets", "", "| step | target | value | result |", "|---|---|---:|---|"]
        out += [
            f"| {t['where']} | {t['target']} | {fmt(t['value'], '.3f')} | {'PASS' if t['pass'] else 'FAIL'} |"
            for t in targets
        ]
        out += ["", f"{sum(bool(t['pass']) for t in targets)} of {len(targets)} targets pass."]
    for s in steps:
        data = s.get("data")
        if not data:
            continue
        if s["key"] == "tests":
            out += ["", "## tests/test_cuda.py", "", *tests_lines(data)]
        elif s["key"].startswith("speed-") and "results" in data:
            out += ["", f"## {s['title']}", "", *speed_lines(data)]
        elif s["key"] == "serving" and "results" in data:
            out += ["", f"## {s['title']}", "", *serving_lines(data)]
        elif s["key"] == "serve-vs-peft":
            out += ["", f"## {s['title']}", "", *generic_lines(data)]
    if any(s["key"].startswith("quality-") or s["key"] == "model" for s in steps):
        out += ["", "## Quality (seed 0)", "", *quality_lines(steps)]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", type=Path, help="a call's check.json")
    ap.add_argument("--out", type=Path, default=None, help="also write the page here")
    args = ap.parse_args(argv)
    page = render(json.loads(args.check.read_text()))
    print(page)
    if args.out:
        args.out.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
