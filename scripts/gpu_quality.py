"""The quality call of the GPU check: the real model from its two parts, SuperNI, the reduced protocols.

Why two parts: the real default model is SmolLM2-135M-Instruct as its Q4_1 GGUF file, 93.8 MiB, and no
lossless form of it is under 88 MiB (the order-0 entropy of its quantised weights), while one device-tool
call carries at most 64 MiB. ``quick`` (or ``stage``) carries the first part and keeps it in the state
folder while the machine stays warm; ``quality`` carries the second part and SuperNI, joins the two,
checks the SHA-256 against the bundle's manifest, and converts the GGUF as ``orchmoe.loading`` does on a
CPU (with this machine's transformers: the conversion check below makes sure the end and pad tokens are
the GGUF's own, whatever that version's GGUF integration made of them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import gpu_train
from gpu_steps import REPO, outcome, read_json, run_cmd

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PART1 = f"quick/{GGUF_NAME}.part1"
PART2 = f"quality/{GGUF_NAME}.part2"
SUPERNI = "quality/superni.tar.xz"
MANIFEST = "common/MANIFEST.json"
# (cap, need) seconds of one run of a protocol: a run that cannot get `need` is reported as not run.
RUN_TIME = {"cpu": (120, 40), "ni100-reduced": (200, 80)}
DRY_RUN_TIME = (240, 5)
SERVE_VS_PEFT = REPO / "benchmarks" / "serve_vs_peft.py"  # written on the export branch: see step_serve_vs_peft


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def check_sha(bundle: Path, piece: str, path: Path) -> None:
    """Raise unless ``path`` has the SHA-256 the manifest records for ``piece`` (``gguf``: the joined file)."""
    m = manifest(bundle)
    want = m["gguf"]["sha256"] if piece == "gguf" else m["pieces"][piece]["sha256"]
    got = sha256(path)
    if got != want:
        raise ValueError(f"{path}: SHA-256 {got[:12]}..., the bundle's manifest says {want[:12]}... for {piece}")


def keep_part(bundle: Path, piece: str, state: Path) -> dict:
    """Copy a carried model part (checked) into the state folder, where a later call on this machine finds it."""
    src = bundle / piece
    if not src.is_file():
        return {"status": "failed", "reason": f"{src} was not carried (carry .gpu/{piece.split('/')[0]})"}
    check_sha(bundle, piece, src)
    tmp = state / (src.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(state / src.name)
    return {"status": "ok", "data": {"kept": str(state / src.name), "bytes": src.stat().st_size}}


def converted(state: Path) -> Path | None:
    """The converted model an earlier quality call on this machine left, if any."""
    marker = state / "model_dir"
    if marker.is_file() and (Path(marker.read_text().strip()) / "config.json").is_file():
        return Path(marker.read_text().strip())
    return None


def missing_pieces(ctx) -> list[str]:
    """What the quality call lacks, each with what to do; empty when it can run."""
    missing = []
    if not (ctx.bundle / MANIFEST).is_file():
        missing.append("the bundle's manifest is not here: run scripts/gpu_bundle.sh and carry .gpu/common")
    if converted(ctx.state) is None:
        part1 = ctx.state / Path(PART1).name
        if not part1.is_file() and not (ctx.bundle / PART1).is_file():
            missing.append(
                f"the model's first part is not on this machine ({part1}): it is fresh, so no quick or stage call "
                "ran on it; make `bash scripts/gpu_check.sh stage` (or quick) and this call right after it, "
                "while the machine is warm"
            )
        if not (ctx.bundle / PART2).is_file():
            missing.append(f"the model's second part was not carried: carry .gpu/quality ({PART2})")
    if not (ctx.bundle / SUPERNI).is_file() and not (ctx.state / "superni" / "tasks").is_dir():
        missing.append(f"SuperNI was not carried: carry .gpu/quality ({SUPERNI})")
    return missing


# The conversion check, in a fresh process (it loads the model once, as `orchmoe train` will): the end and
# pad tokens are the GGUF metadata's, and greedy decoding of a chat prompt stops at the end token.
CHECK_MODEL = r"""
import json, sys
import torch
from orchmoe.loading.gguf import gguf_special_ids
from orchmoe.loading import load_model_and_tokenizer
gguf = sys.argv[1]
model, tok, info = load_model_and_tokenizer(gguf, device="cuda" if torch.cuda.is_available() else "cpu")
ids = gguf_special_ids(gguf)
got = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id}
msgs = [{"role": "user", "content": "What is the capital of France?"}]
enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=24, do_sample=False)
new = out[0, enc["input_ids"].shape[1]:].tolist()
report = {"source": info["source"], "gguf_ids": ids, "tokenizer_ids": got, "eos_token": tok.eos_token,
          "pad_token": tok.pad_token, "config_eos": model.config.eos_token_id,
          "answer": tok.decode(new, skip_special_tokens=True), "stopped_at_eos": tok.eos_token_id in new}
report["ok"] = all(got[k] == ids[k] for k in got if k in ids) and report["config_eos"] == ids.get("eos")
print("MODEL " + json.dumps(report))
"""


def step_model(ctx, seconds: int) -> dict:
    """Join the parts (once), check them, convert and check the model; its folder goes to state/model_dir."""
    gguf = ctx.state / GGUF_NAME
    if not gguf.is_file():
        part1 = ctx.state / Path(PART1).name
        if not part1.is_file():
            check_sha(ctx.bundle, PART1, ctx.bundle / PART1)
            part1 = ctx.bundle / PART1
        check_sha(ctx.bundle, PART2, ctx.bundle / PART2)
        tmp = gguf.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for part in (part1, ctx.bundle / PART2):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f)
        check_sha(ctx.bundle, "gguf", tmp)
        tmp.replace(gguf)
    log = ctx.state / "model_check.log"
    env = {"ORCHMOE_CACHE": str(ctx.state / "cache")}
    rc, timed_out = run_cmd([ctx.python, "-c", CHECK_MODEL, str(gguf)], seconds, env, log=log)
    report = next((json.loads(x[6:]) for x in log.read_text().splitlines() if x.startswith("MODEL ")), None)
    if timed_out or report is None:
        why = f"stopped after {seconds} s" if timed_out else f"exit code {rc}, no report (see the log)"
        return {"status": "timed out" if timed_out else "failed", "reason": why, "data": report}
    (ctx.state / "model_dir").write_text(report["source"])
    if not report["ok"]:
        return {"status": "failed", "reason": "special tokens differ from the GGUF metadata's", "data": report}
    return {"status": "ok", "data": report}


def step_data(ctx, seconds: int) -> dict:
    """Unpack the carried SuperNI subset (Python's tarfile: no xz program is assumed on the image)."""
    root = ctx.state / "superni"
    if not (root / "tasks").is_dir():
        check_sha(ctx.bundle, SUPERNI, ctx.bundle / SUPERNI)
        tmp = ctx.state / "superni.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(ctx.bundle / SUPERNI, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        (tmp / "superni").replace(root)
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(1 for _ in (root / "tasks").glob("*.json"))
    return {"status": "ok", "data": {"tasks": n, "folder": str(root)}}


def run_step_fn(protocol: str, method: str, options: dict):
    """One `orchmoe train` (+ its evaluation) of a quality protocol; a finished run on this machine is kept."""

    def run(ctx, seconds: int) -> dict:
        model = converted(ctx.state)
        if model is None:
            return {"status": "not run", "reason": "no converted model (the model step did not succeed)"}
        seed = gpu_train.load_config()["quality"]["seed"]
        out = ctx.state / "quality" / protocol / f"{method}-s{seed}"
        if not (out / "metrics.json").is_file():
            opts = {"model": str(model), "data": str(ctx.state / "superni"), **options, "seed": seed}
            opts.update({"progress": False, "out": str(out)})
            env = {"ORCHMOE_CACHE": str(ctx.state / "cache")}
            rc, timed_out = run_cmd(gpu_train.train_command(ctx.python, opts), seconds, env)
            if timed_out or rc != 0:
                why = f"stopped after {seconds} s" if timed_out else f"exit code {rc}"
                return {"status": "timed out" if timed_out else "failed", "reason": why, "rc": rc}
        return {"status": "ok", "data": run_metrics(out)}

    return run


def run_metrics(out: Path) -> dict:
    """The figures the summary's quality table shows, from a finished run's metrics.json."""
    m = json.loads((out / "metrics.json").read_text())
    keep = ("rougeL", "rougeLsum", "rouge1", "exact_match", "n")
    parts = {p: {k: m[p]["overall"].get(k) for k in keep} for p in ("seen", "unseen") if m.get(p, {}).get("overall")}
    return {
        "run": str(out),
        **parts,
        "trainable_parameters": m.get("trainable_parameters"),
        "train_seconds": m.get("train_seconds"),
    }


def step_serve_vs_peft(ctx, seconds: int) -> dict:
    """HOOK for benchmarks/serve_vs_peft.py (the export branch): 64 real prompts of 64 tasks in one routed batch
    against PEFT's mixed-adapter batch of the exported LoRAs, on the real model (fresh adapters, random
    weights). Reported as not run while the script is not in this checkout."""
    if not SERVE_VS_PEFT.is_file():
        return {"status": "not run", "reason": "script missing: benchmarks/serve_vs_peft.py (export branch)"}
    model = converted(ctx.state)
    if model is None:
        return {"status": "not run", "reason": "no converted model (the model step did not succeed)"}
    json_path = ctx.state / "serve_vs_peft.json"
    json_path.unlink(missing_ok=True)
    args = ["--model", str(model), "--data", str(ctx.state / "superni"), "--json", str(json_path)]
    args += "--device cpu --tasks 4 --new-tokens 2 --reps 1 --threads 1".split() if ctx.dry else []
    args += [] if ctx.dry else "--device cuda --dtype bf16 --tasks 64 --new-tokens 32 --reps 3".split()
    rc, timed_out = run_cmd([ctx.python, str(SERVE_VS_PEFT), *args], seconds)
    return outcome(rc, timed_out, seconds, read_json(json_path))


def steps(ctx, step_cls) -> list:
    """The quality call's steps: model, data, then every run of scripts/gpu_check.yaml's protocols."""
    out = [
        step_cls("model", "the real model: join, check, convert, check its special tokens", 240, 20, step_model),
        step_cls("data", "SuperNI: unpack", 60, 5, step_data),
    ]
    for protocol, method, options in gpu_train.quality_runs(gpu_train.load_config(), dry=ctx.dry):
        cap, need = DRY_RUN_TIME if ctx.dry else RUN_TIME.get(protocol, (180, 60))
        title = f"quality {protocol}: {method}, seed 0"
        out.append(step_cls(f"quality-{protocol}-{method}", title, cap, need, run_step_fn(protocol, method, options)))
    title = "benchmarks/serve_vs_peft.py: 64 real prompts of 64 tasks vs PEFT's mixed batch (real model)"
    return out + [step_cls("serve-vs-peft", title, 150, 45, step_serve_vs_peft)]
