"""The bundle's README and the commands that serve it on vLLM and SGLang.

Flags as documented by the engines (read 2026-12): vLLM ``vllm serve BASE --enable-lora --lora-modules
NAME=PATH ... --max-lora-rank R --max-loras N`` (``--max-lora-rank`` takes one of 1, 8, 16, 32, 64, 128,
256, 320, 512 in vLLM 0.14, 8..256 in older ones; ``--max-loras``, the LoRAs one batch may mix, defaults
to 1) and a request names its LoRA as the OpenAI ``model``; SGLang ``python -m sglang.launch_server
--model-path BASE --enable-lora --lora-paths NAME=PATH ... --max-loras-per-batch N --max-lora-rank R
--lora-target-modules ...`` (``--max-loras-per-batch`` defaults to 8) and a request names its LoRA as
``model="BASE:NAME"`` or ``extra_body={"lora_path": NAME}``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from orchmoe.adapters.bundle.names import MANIFEST

__all__ = ["bundle_readme", "serve_commands", "vllm_max_lora_rank"]

_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds `rank` (8 and up: every version's)."""
    for r in _VLLM_RANKS:
        if rank <= r:
            return r
    raise ValueError(f"rank {rank} is above vLLM's largest --max-lora-rank ({_VLLM_RANKS[-1]})")


def serve_commands(manifest: dict[str, Any], dest: Path) -> dict[str, str]:
    """The vllm and SGLang command lines serving every LoRA of the bundle at `dest` by its name."""
    base = manifest["base_model"]["source"] or manifest["base_model"]["name"]
    loras = [f"{name}={dest / entry['path']}" for name, entry in manifest["loras"].items()]
    n, rank = len(loras), manifest["rank"]
    vllm = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(rank))]
    vllm += ["--max-loras", str(n), "--lora-modules", *loras]
    sglang = ["python", "-m", "sglang.launch_server", "--model-path", base, "--enable-lora"]
    sglang += ["--max-lora-rank", str(rank), "--lora-target-modules", *manifest["target_modules"]]
    sglang += ["--max-loras-per-batch", str(n), "--lora-paths", *loras]
    return {"vllm": shlex.join(vllm), "sglang": shlex.join(sglang)}


def _routing_section(manifest: dict[str, Any]) -> list[str]:
    route = manifest["route"]
    if route["by"] == "none":
        return ["Every request uses the one LoRA, `lora`."]
    if route["by"] == "task":
        lines = [
            "Poly/MHR route by task: a request of training task `t` (id in `route.task_to_id` of the manifest) "
            "uses `task-<id>`; any other task uses `task-unseen` (the mean allocation of the training tasks, as "
            "orchmoe routes task id -1).",
            "",
            "| LoRA | task |",
            "|---|---|",
        ]
        return lines + [f"| `{name}` | {entry.get('task') or '?'} |" for name, entry in manifest["loras"].items()]
    src = manifest["prompts"]
    lines = [
        f"OrchMoE routes by the prompt: the Task Router (`router.json`, `router.safetensors`) maps the prompt to pi "
        f"over {route['n_abstract_tasks']} abstract tasks, and the request uses the LoRA of argmax pi "
        f"(`route.abstract_task_to_lora` in the manifest). The LoRAs are the abstract tasks that were the argmax "
        f"for at least one of {src['count']} prompts ({src['source']}); an abstract task no prompt used maps to "
        "the exported one with the nearest allocation.",
        "",
        "| LoRA | prompts routed to it | their tasks (most frequent first) |",
        "|---|---:|---|",
    ]
    for name, entry in manifest["loras"].items():
        tasks = ", ".join(f"{t} ({c})" for t, c in list(entry.get("tasks", {}).items())[:4]) or "-"
        lines.append(f"| `{name}` | {entry.get('prompts', '-')} | {tasks} |")
    return lines


def _exactness_section(manifest: dict[str, Any]) -> list[str]:
    lines = [("Exact. " if manifest["exact"] else "Not exact. ") + manifest["exactness"] + "."]
    a = manifest.get("agreement")
    if a:
        lines += [
            "",
            f"Checked on {a['prompts']} prompts ({a['loras_checked']} LoRAs, greedy, {a['max_new_tokens']} new "
            f"tokens): the bundle's answer equals the routed adapter's on {a['answers_equal']} of {a['prompts']} "
            f"({100 * a['rate']:.1f} %; first token {100 * a['first_token_equal']:.1f} %). The adapter changes the "
            f"base model's answer on {a['adapter_changes_answer']} of these prompts"
            + (" (none: the agreement says nothing about routing)" if a["adapter_changes_answer"] == 0 else "")
            + f". Compared: {a['compared']}.",
        ]
    elif not manifest["exact"]:
        lines += ["", "Not checked (no prompts, or the check was skipped)."]
    return lines


def bundle_readme(manifest: dict[str, Any], dest: Path) -> str:
    """README.md of a bundle: what it holds, how a request picks its LoRA, exactness, the serve commands."""
    cmds = manifest["serve"]
    fmt = manifest.get("prompt_format")
    first = next(iter(manifest["loras"]))
    parts = [
        f"# Multi-LoRA bundle of an orchmoe adapter ({manifest['method']})",
        "",
        f"{len(manifest['loras'])} standard PEFT LoRAs (rank {manifest['rank']}, alpha {manifest['lora_alpha']}, "
        f"on {', '.join(manifest['target_modules'])}) of the base model `{manifest['base_model']['source']}` "
        f"({manifest['base_model']['name']}), one per routing, in `loras/`; `{MANIFEST}` says which routing each "
        "one is and how a request picks its LoRA.",
        "",
        "## Which LoRA a request uses",
        "",
        *_routing_section(manifest),
        "",
        "## Exactness",
        "",
        *_exactness_section(manifest),
        "",
        "## Serving",
        "",
        "vLLM (a request names its LoRA as the OpenAI `model`):",
        "",
        "```bash",
        cmds["vllm"],
        "```",
        "",
        'SGLang (a request names its LoRA as `model="<base>:<LoRA>"`, or `extra_body={"lora_path": "<LoRA>"}`):',
        "",
        "```bash",
        cmds["sglang"],
        "```",
        "",
        "Then, for example with the `openai` client against vLLM:",
        "",
        "```python",
        "from openai import OpenAI",
        'client = OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")',
        f'client.completions.create(model="{first}", prompt=PROMPT, max_tokens=32, temperature=0)',
        "```",
        "",
        "Requests must carry the prompt as the adapter was trained on it"
        + (
            f" (Tk-Instruct format, demonstrations: {fmt.get('n_pos')}, at most {fmt.get('max_source_len')} tokens, "
            f"chat template {'on' if fmt.get('chat_template') else 'off'})."
            if isinstance(fmt, dict)
            else "."
        )
        + " Picking the LoRA needs the router: `orchmoe.adapters.bundle.BundleRouter.from_folder(<this folder>)` "
        "(OrchMoE: the Task Router over the base model's input embeddings; Poly/MHR: the task's name), or "
        "orchmoe's route-only server in front of the engine.",
    ]
    return "\n".join(parts) + "\n"
