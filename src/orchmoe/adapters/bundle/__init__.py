"""A routed adapter as a multi-LoRA bundle of standard PEFT LoRAs that existing serving engines run (one
routing as one LoRA folder: `orchmoe.adapters.export.export_peft_lora`).

- `write_bundle`: a multi-LoRA bundle (one LoRA per routing a request can take, the router, a manifest, a
  README with the vLLM / SGLang commands); `BundleManifest` reads it, `BundleRouter` picks a request's LoRA.
- `lora_name`: the one naming of the LoRAs (``abstract-3``, ``task-5``, ``task-unseen``, ``lora``).
"""

from orchmoe.adapters.bundle.check import RoutedPrompt, check_bundle, greedy_answers, load_peft_loras
from orchmoe.adapters.bundle.names import BundleError, BundleManifest, lora_name
from orchmoe.adapters.bundle.readme import serve_commands, vllm_max_lora_rank
from orchmoe.adapters.bundle.router import BundleRouter
from orchmoe.adapters.bundle.writer import plan_bundle, write_bundle

__all__ = [
    "BundleError",
    "BundleManifest",
    "BundleRouter",
    "RoutedPrompt",
    "check_bundle",
    "greedy_answers",
    "load_peft_loras",
    "lora_name",
    "plan_bundle",
    "serve_commands",
    "vllm_max_lora_rank",
    "write_bundle",
]
