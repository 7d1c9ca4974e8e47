"""One Markdown page of the GPU check: every target as PASS / FAIL, the tests, speed, serving and quality tables.

Reads what ``scripts/gpu_check.sh`` leaves in its results folder (tests.xml, speed-<shape>.json, serving.json,
env.json) and the quality runs' folder; anything missing is listed as pending rather than guessed.

    python scripts/gpu_summary.py /tmp/orchmoe-gpu/results /tmp/orchmoe-gpu/quality --out summary.md
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SHAPES = ("smollm2-135m", "1.3b")


def fmt(v, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, spec)}{suffix}"


def tests_section(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        return ["No test result (tests/test_cuda.py did not finish: see stage1.log)."], [
            {"target": "tests/test_cuda.py passes on CUDA", "pass": None, "value": None}
        ]
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [
        f"{c.get('classname', '')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    lines = [
        (
            f"{n['tests']} tests: {n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
            f"{n['errors']} errors, {n['skipped']} skipped."
        )
    ]
    lines += [f"- FAILED {b}" for b in bad]
    ok = n["failures"] == 0 and n["errors"] == 0 and n["skipped"] == 0 and n["tests"] > 0
    return lines, [{"target": "tests/test_cuda.py passes on CUDA (none skipped)", "pass": ok, "value": None}]


def speed_section(data: dict, shape: str) -> list[str]:
    meta = data["meta"]
    lines = [
        (
            f"{meta['model']} | {meta['hardware']} | {meta['dtype']}, autocast {meta.get('autocast')} | train {meta['train']} "
            f"| generate {meta['generate']}"
        ),
        "",
        (
            "| method | trainable | train tok/s | train vs LoRA (paired) | train time vs PEFT LoRA | peak MiB | peak vs LoRA "
            "| decode step ms | decode vs LoRA (paired) | = base tokens |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = data["results"]
    lora_peak = next((r["peak_mb"] for r in rows if r["method"] == "lora"), None)
    for r in rows:
        if r["method"] == "base":
            continue
        peak_ratio = r["peak_mb"] / lora_peak if r["peak_mb"] and lora_peak else None
        same = "-" if r["same_as_base"] is None else ("yes" if r["same_as_base"] else "NO")
        lines.append(
            f"| {r['label']} | {r['params']:,} | {fmt(r['train_tok_s'], ',.0f')} | {fmt(r['train_vs_lora_paired'], '.3f', 'x')} "
            f"| {fmt(r['train_vs_peft_lora'], '.3f', 'x')} | {fmt(r['peak_mb'], ',.0f')} | {fmt(peak_ratio, '.3f', 'x')} "
            f"| {fmt(r['decode_ms'], '.2f')} | {fmt(r['decode_vs_lora_paired'], '.3f', 'x')} | {same} |"
        )
    return lines


def serving_section(data: dict) -> list[str]:
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


def quality_section(folder: Path) -> list[str]:
    runs = sorted(p.parent.name for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
    table = folder / "quality.md"
    lines = [f"Finished runs: {', '.join(runs) if runs else 'none'} (expected lora-s0, mhr-s0, orchmoe-s0, poly-s0)."]
    if table.is_file() and runs:
        lines += ["", table.read_text().strip()]
    return lines


def verdict(target: dict) -> str:
    return "PENDING" if target["pass"] is None else ("PASS" if target["pass"] else "FAIL")


def build(results: Path, quality: Path) -> tuple[str, list[dict]]:
    env = json.loads((results / "env.json").read_text()) if (results / "env.json").is_file() else {}
    out = [
        "# GPU check (issue 9)",
        "",
        " | ".join(f"{k} {env[k]}" for k in ("device", "torch", "transformers", "peft", "orchmoe") if k in env)
        or "(no env.json)",
        "",
    ]
    test_lines, targets = tests_section(results / "tests.xml")
    sections, pending = [], []
    for shape in SHAPES:
        path = results / f"speed-{shape}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            targets += [{**t, "target": f"{shape}: {t['target']}"} for t in data["targets"]]
            sections += [f"## Speed, {shape}", "", *speed_section(data, shape), ""]
        else:
            pending.append(f"speed at the {shape} shape")
    if (results / "serving.json").is_file():
        data = json.loads((results / "serving.json").read_text())
        targets += data["targets"]
        sections += [
            "## Serving: one batch of many tasks vs PEFT's mixed-adapter batch",
            "",
            *serving_section(data),
            "",
        ]
    else:
        pending.append("serving")
    quality_lines = quality_section(quality)
    if not (quality / "quality.md").is_file():
        pending.append("quality (ni100-quick)")
    out += ["## Targets", "", "| target | value | result |", "|---|---:|---|"]
    out += [f"| {t['target']} | {fmt(t['value'], '.3f')} | {verdict(t)} |" for t in targets]
    n_pass = sum(t["pass"] is True for t in targets)
    out += [
        "",
        f"{n_pass} of {len(targets)} targets pass." + (f" Pending: {', '.join(pending)}." if pending else ""),
        "",
    ]
    out += [
        "## tests/test_cuda.py",
        "",
        *test_lines,
        "",
        *sections,
        "## Quality: ni100-quick, seed 0",
        "",
        *quality_lines,
        "",
    ]
    return "\n".join(out), targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="gpu_check.sh's results folder")
    ap.add_argument("quality", type=Path, help="the quality runs' folder")
    ap.add_argument("--out", type=Path, default=None, help="also write the page here")
    ap.add_argument("--json", type=Path, default=None, help="write the targets (target, pass, value) here")
    args = ap.parse_args(argv)
    page, targets = build(args.results, args.quality)
    print(page)
    if args.out:
        args.out.write_text(page)
    if args.json:
        args.json.write_text(json.dumps(targets, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
