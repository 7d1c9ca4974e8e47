"""Exporting a routed adapter to standard PEFT LoRAs that existing serving engines run.

- `export_lora`: one fixed routing as one PEFT LoRA folder.
- `write_bundle`: a multi-LoRA bundle (one LoRA per routing a request can take, the router, a manifest, a
  README with the vLLM / SGLang commands); `BundleManifest` reads it, `BundleRouter` picks a request's LoRA.
- `lora_name`: the one naming of the LoRAs (``abstract-3``, ``task-5``, ``task-unseen``, ``lora``).
"""

from .check import RoutedPrompt, check_bundle, greedy_answers, load_peft_loras
from .names import BundleError, BundleManifest, lora_name
from .readme import serve_commands, vllm_max_lora_rank
from .router import BundleRouter
from .writer import export_lora, plan_bundle, refuse_token_routing, write_bundle

__all__ = [
    "BundleError",
    "BundleManifest",
    "BundleRouter",
    "RoutedPrompt",
    "check_bundle",
    "export_lora",
    "greedy_answers",
    "load_peft_loras",
    "lora_name",
    "plan_bundle",
    "refuse_token_routing",
    "serve_commands",
    "vllm_max_lora_rank",
    "write_bundle",
]
