"""Score finished runs' adapters on every test-split task of a SuperNI folder: generation only, no retraining.

A training run scores its unseen tasks on the few it was given (4 tasks x 10 instances at the CPU sizes).
This script scores any finished run folder (or a copy made by `keep_adapters.py`) on ALL the test-split
tasks present in the data (14 in ``../shared/superni``), on the first ``--per-task`` instances of each
task (the official choice for test tasks, so every run of every method and seed sees the same instances),
with the run's own prompt settings (demonstrations, prompt budget, generation length, from its
``config.yaml``), greedy decoding and the official scores (`orchmoe.evaluation.metrics`). Poly and MHR route an
unseen task by their mean allocation (task id -1), the other methods from the prompt, as in training's
own evaluation. ``--base OUT`` adds the untrained base model (no adapter) as a reference row, and
``--copy-input OUT`` the score of "predicting" each instance's own input (no model: how much a task rewards
copying). One run takes about 2.5 min of CPU time on one core (SmolLM2-135M, 280 instances, 24 new tokens).

    OMP_NUM_THREADS=1 python benchmarks/unseen_eval.py runs/quality-cpu-long/*-s* --base runs/quality-cpu-long/base
    python benchmarks/paired_stats.py runs/quality-cpu-long          # tables and paired comparisons

Writes ``<run>/unseen14/results.json`` (per task: mean scores, per instance id, prediction and scores),
beside the run's files and never over them (``--name`` changes the folder, ``--out`` puts the folders
elsewhere). Each task is written as soon as it is done, so an interrupted run resumes at the next task;
a run whose results exist for the same adapter, tasks, instances and settings is skipped. Runs still
training (no final adapter) are skipped with a note, so a glob over a benchmark's folder can be rerun
as runs finish.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from orchmoe import load_adapter
from orchmoe.data import encode_prompt, load_task, pad_batch, read_split, unseen_eval_instances
from orchmoe.evaluation.metrics import aggregate, score_example
from orchmoe.loading import is_encoder_decoder, load_model_and_tokenizer
from orchmoe.utils.fileio import atomic_write_text, sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import run_label  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "superni"
DEFAULT_NAME = "unseen14"
RESULTS = "results.json"
PARTIAL = "partial"  # one file per finished task until results.json is written
FORMAT = 1  # of results.json


class UnseenEvalError(ValueError):
    """A run folder or option this script cannot use; the message names it."""


@dataclass
class RunSettings:
    """What a run's config.yaml says about how it was trained and prompted (what scoring it needs)."""

    label: str  # the run's method label: its folder name without "-s<seed>" (+ "-frozen" for router_lr 0)
    method: str
    seed: int | None
    model: str | None
    dtype: str | None
    n_pos: int
    max_source_len: int
    max_new_tokens: int
    chat_template: bool
    batch_size: int

    def prompt_fingerprint(self) -> dict:
        """The settings that change predictions (not the label or batch size)."""
        return {
            "n_pos": self.n_pos,
            "max_source_len": self.max_source_len,
            "max_new_tokens": self.max_new_tokens,
            "chat_template": self.chat_template,
        }


def read_settings(run: Path) -> RunSettings:
    """The run's settings from its config.yaml (read as YAML: only the keys named here are used)."""
    path = run / "config.yaml"
    if not path.is_file():
        raise UnseenEvalError(f"{run} has no config.yaml: not an orchmoe run folder")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UnseenEvalError(f"{path} is not readable YAML: {e}") from None
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise UnseenEvalError(f"{path} does not hold an orchmoe run configuration")
    try:
        return RunSettings(
            label=run_label(run, cfg["method"], cfg.get("router_lr")),
            method=str(cfg["method"]),
            seed=None if cfg.get("seed") is None else int(cfg["seed"]),
            model=cfg.get("model"),
            dtype=cfg.get("dtype"),
            n_pos=int(cfg.get("n_pos", 2)),
            max_source_len=int(cfg.get("max_source_len", 512)),
            max_new_tokens=int(cfg.get("max_new_tokens") or cfg.get("max_target_len", 64)),
            chat_template=bool(cfg.get("chat_template", False)),
            batch_size=int(cfg.get("eval_batch_size", 16)),
        )
    except (TypeError, ValueError) as e:
        raise UnseenEvalError(f"{path}: a prompt or generation setting is not a number: {e}") from None


def is_finished(run: Path) -> bool:
    """A final adapter and a record that training ended (train_summary.json, or metrics.json of a copy)."""
    return (run / "adapter" / "adapter_config.json").is_file() and (
        (run / "train_summary.json").is_file() or (run / "metrics.json").is_file()
    )


def adapter_digest(run: Path) -> str:
    """sha256 over the adapter folder's files: results of a retrained adapter are never taken as done."""
    files = sorted(p for p in (run / "adapter").iterdir() if p.is_file())
    return sha256_file_list(files)


def sha256_file_list(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The evaluation set: the first n instances of every test-split task present in the data


def split_test_tasks(data: str, split: str) -> list[str]:
    """Test-split tasks of ``split`` that have a task file in ``data`` (sorted)."""
    from orchmoe.data import available_tasks

    present = set(available_tasks(data))
    tasks = sorted(t for t in read_split(data, split, "test") if t in present)
    if not tasks:
        raise UnseenEvalError(f"no test-split task of split {split!r} has a task file in {data}")
    return tasks


def load_eval_set(data: str, tasks: list[str], per_task: int) -> dict[str, tuple]:
    """``{task: (task definition, first per_task instances)}``; a task with fewer instances is an error."""
    out = {}
    for name in tasks:
        task = load_task(data, name)
        instances = unseen_eval_instances(task, per_task)
        if len(instances) < per_task:
            raise UnseenEvalError(f"task {name} has only {len(instances)} instances; --per-task {per_task} asked")
        out[name] = (task, instances)
    return out


# ----------------------------------------------------------------------------------------------
# The model: base (+ adapter), batched greedy generation with left padding


class Generator:
    """Greedy generation of one model (a routed adapter, or the bare base model) for token-id prompts.

    The only code here that talks to the model: ``generate`` of the adapter (``task_ids`` -1 for methods
    that look the allocation up by task: the mean allocation) or of the base model, and the tokenizer.
    """

    def __init__(self, model, tokenizer, *, needs_task_ids: bool, encoder_decoder: bool) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.needs_task_ids, self.encoder_decoder = needs_task_ids, encoder_decoder
        eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.eos = eos

    @torch.no_grad()
    def predict(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
        """Predictions in the prompts' order; batches cut from the prompts sorted longest first."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        preds: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_batch([{"input_ids": prompts[i]} for i in idx], self.pad, "left")
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=self.eos,
                          pad_token_id=self.pad, temperature=None, top_p=None, top_k=None)  # fmt: skip
            if self.needs_task_ids:
                kwargs["task_ids"] = torch.full((len(idx),), -1, dtype=torch.long)  # unseen: mean allocation
            seqs = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
            new = seqs if self.encoder_decoder else seqs[:, batch["input_ids"].shape[1] :]
            for i, text in zip(idx, self._decode(new)):
                preds[i] = text
        return preds

    def _decode(self, new: torch.Tensor) -> list[str]:
        """Each row up to its eos (an encoder-decoder's start token dropped), decoded and stripped."""
        start = self._decoder_start() if self.encoder_decoder else None
        out = []
        for row in new.tolist():
            if start is not None and row and row[0] == start:
                row = row[1:]
            if self.eos in row:
                row = row[: row.index(self.eos)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    def _decoder_start(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.generation_config.decoder_start_token_id


class Models:
    """Base models loaded once per (model, dtype) and copied for each adapter (loading one changes the base)."""

    def __init__(self, override: str | None = None) -> None:
        self.override, self._cache = override, {}

    def base(self, settings: RunSettings):
        key = (self.override or settings.model, settings.dtype)
        if key not in self._cache:
            self._cache[key] = load_model_and_tokenizer(key[0], dtype=key[1])
        return self._cache[key]

    def generator(self, settings: RunSettings, run: Path | None) -> Generator:
        """The run's adapter on a fresh copy of its base model; ``run=None``: the base model alone."""
        base, tokenizer, info = self.base(settings)
        enc_dec = is_encoder_decoder(base)
        if run is None:
            return Generator(base, tokenizer, needs_task_ids=False, encoder_decoder=enc_dec)
        model = load_adapter(copy.deepcopy(base), run / "adapter", base_model_name=info["name"])
        return Generator(model, tokenizer, needs_task_ids=model.adapter_config.needs_task_ids, encoder_decoder=enc_dec)


# ----------------------------------------------------------------------------------------------
# Scoring a run, task by task, resumable


def score_task(gen: Generator, tokenizer, task, instances, settings: RunSettings, batch_size: int) -> dict:
    """Predictions and official scores of one task's instances, and their means."""
    prompts = [
        encode_prompt(tokenizer, task, inst["input"], n_pos=settings.n_pos, max_source_len=settings.max_source_len,
                      decoder_only=not gen.encoder_decoder, chat_template=settings.chat_template)
        for inst in instances
    ]  # fmt: skip
    preds = gen.predict(prompts, settings.max_new_tokens, batch_size)
    rows = [
        {"id": inst["id"], "prediction": p, "scores": score_example(p, list(inst["output"]))}
        for inst, p in zip(instances, preds)
    ]
    records = [{"task": task.name, "pred": r["prediction"], "refs": ["-"], "scores": r["scores"]} for r in rows]
    mean = aggregate(records)["overall"]
    return {"category": task.category, "n": len(rows), "mean": mean, "instances": rows}


def fingerprint(settings: RunSettings, model: str | None, digest: str | None, data: str, eval_set: dict) -> dict:
    """What results must match to be reused: the adapter, the prompts, the tasks and their instance ids."""
    return {
        "format": FORMAT,
        "adapter_sha256": digest,
        "model": model,
        "prompt": settings.prompt_fingerprint(),
        "data": str(data),
        "instances": {t: [i["id"] for i in insts] for t, (_, insts) in eval_set.items()},
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent or cut short: computed again


def evaluate_run(
    run: Path | None,
    out: Path,
    settings: RunSettings,
    models: Models,
    data: str,
    eval_set: dict,
    batch_size: int | None,
) -> dict:
    """Score one run (``run=None``: the base model) into ``out/results.json``; reuse what is already there.

    Returns:
        The results dict (as written).
    """
    digest = adapter_digest(run) if run is not None else None
    fp = fingerprint(settings, models.override or settings.model, digest, data, eval_set)
    done = _read_json(out / RESULTS)
    if done is not None and done.get("fingerprint") == fp:
        print(f"= {out / RESULTS} is up to date, skipped", flush=True)
        return done
    gen, t0, tasks = None, time.perf_counter(), {}
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)
    for name, (task, instances) in eval_set.items():
        part = out / PARTIAL / f"{name}.json"
        saved = _read_json(part)
        if saved is not None and saved.get("fingerprint") == fp:
            tasks[name] = saved["result"]
            continue
        gen = gen or models.generator(settings, run)
        tokenizer = models.base(settings)[1]
        tasks[name] = score_task(gen, tokenizer, task, instances, settings, batch_size or settings.batch_size)
        atomic_write_text(part, json.dumps({"fingerprint": fp, "result": tasks[name]}, ensure_ascii=False))
        empty = sum(not i["prediction"] for i in tasks[name]["instances"])  # generation ended at once
        print(
            f"  {name}: ROUGE-L {tasks[name]['mean']['rougeL']:.2f} (n={tasks[name]['n']}, {empty} empty)", flush=True
        )
    records = [
        {"task": t, "category": r["category"], "pred": i["prediction"], "refs": ["-"], "scores": i["scores"]}
        for t, r in tasks.items()
        for i in r["instances"]
    ]
    results = {
        "run": str(run) if run is not None else None,
        **{k: v for k, v in asdict(settings).items() if k in ("label", "method", "seed")},
        "fingerprint": fp,
        "overall": aggregate(records)["overall"],
        "tasks": tasks,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1, ensure_ascii=False))
    for name in eval_set:  # the per-task files are in results.json now
        (out / PARTIAL / f"{name}.json").unlink(missing_ok=True)
    if (out / PARTIAL).is_dir() and not any((out / PARTIAL).iterdir()):
        (out / PARTIAL).rmdir()
    return results


def copy_input_results(out: Path, data: str, eval_set: dict) -> dict:
    """A reference row that needs no model: every instance "predicts" its own input. It shows how much a task
    rewards copying the input (a fluent rewrite of a disfluent question scores high; a summary does not)."""
    fp = {"format": FORMAT, "copy_input": True, "data": str(data),
          "instances": {t: [i["id"] for i in insts] for t, (_, insts) in eval_set.items()}}  # fmt: skip
    tasks = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, (task, instances) in eval_set.items():
        rows = [
            {"id": i["id"], "prediction": i["input"], "scores": score_example(i["input"], list(i["output"]))}
            for i in instances
        ]
        records = [{"task": name, "pred": r["prediction"], "refs": ["-"], "scores": r["scores"]} for r in rows]
        tasks[name] = {"category": task.category, "n": len(rows), "mean": aggregate(records)["overall"]}
        tasks[name]["instances"] = [{**r, "prediction": None} for r in rows]  # the input itself: not stored again
    records = [
        {"task": t, "pred": "", "refs": ["-"], "scores": i["scores"]} for t, r in tasks.items() for i in r["instances"]
    ]
    results = {"run": None, "label": "copy-input", "method": "copy-input", "seed": None, "fingerprint": fp,
               "overall": aggregate(records)["overall"], "tasks": tasks, "seconds": 0.0}  # fmt: skip
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1, ensure_ascii=False))
    return results


def base_settings(like: RunSettings) -> RunSettings:
    """The base model scored with a run's prompt settings (it has no seed and no adapter)."""
    return RunSettings(**{**asdict(like), "label": "base", "method": "base", "seed": None})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (or copies from keep_adapters.py); unfinished ones are skipped")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="SuperNI folder (default: ../shared/superni)")
    p.add_argument("--split", default="default", help="the split whose test part is scored")
    p.add_argument("--per-task", type=int, default=20, help="the first N instances of every task (default 20)")
    p.add_argument("--name", default=DEFAULT_NAME, help="results folder inside each run (default unseen14)")
    p.add_argument("--out", default=None, help="put each run's results folder under OUT/<parent>/<run>/ instead")
    p.add_argument("--base", default=None, help="also score the base model, into BASE/<name>/")
    p.add_argument("--copy-input", default=None, help="also score 'predict the input' (no model), into COPY/<name>/")
    p.add_argument("--like", default=None, help="run whose prompt settings the base model uses (default: the first)")
    p.add_argument("--model", default=None, help="base model for every run (default: each run's own)")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch (default: each run's eval batch)")
    args = p.parse_args(argv)
    if args.per_task < 1:
        p.error("--per-task must be >= 1")
    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        p.error(f"not a folder: {', '.join(missing)}")
    if not runs and args.base is None and args.copy_input is None:
        p.error("name run folders, --base OUT and/or --copy-input OUT")
    try:
        return _score_all(args, runs)
    except (UnseenEvalError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _score_all(args, runs: list[Path]) -> int:
    eval_set = load_eval_set(args.data, split_test_tasks(args.data, args.split), args.per_task)
    n = sum(len(i) for _, i in eval_set.values())
    print(f"{len(eval_set)} test-split tasks x {args.per_task} instances = {n} from {args.data}", flush=True)
    models = Models(args.model)
    finished = [r for r in runs if is_finished(r)]
    for r in runs:
        if r not in finished:
            print(f"- {r}: not finished (no final adapter), skipped", flush=True)
    if args.copy_input is not None:
        res = copy_input_results(Path(args.copy_input) / args.name, args.data, eval_set)
        print(f"= copy-input: overall ROUGE-L {res['overall']['rougeL']:.2f}", flush=True)
    if args.base is not None:
        like = Path(args.like) if args.like else (finished[0] if finished else None)
        if like is None:
            raise UnseenEvalError("--base needs a run whose prompt settings it uses (--like RUN)")
        out = Path(args.base) / args.name
        print(f"base model, prompt settings of {like} -> {out}", flush=True)
        res = evaluate_run(None, out, base_settings(read_settings(like)), models, args.data, eval_set, args.batch_size)
        print(f"= base: overall ROUGE-L {res['overall']['rougeL']:.2f} ({res['seconds']:.0f} s)", flush=True)
    for run in finished:
        settings = read_settings(run)
        out = (Path(args.out) / run.parent.name / run.name if args.out else run) / args.name
        print(f"{run} ({settings.label}, seed {settings.seed}) -> {out}", flush=True)
        res = evaluate_run(run, out, settings, models, args.data, eval_set, args.batch_size)
        print(f"= {run.name}: overall ROUGE-L {res['overall']['rougeL']:.2f} ({res['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
