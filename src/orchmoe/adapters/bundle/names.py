"""The names and files of a multi-LoRA bundle, and how a routing picks its LoRA.

A bundle is the folder ``orchmoe export RUN --bundle OUT`` writes::

    manifest.json          what is in the bundle and how a routing maps to a LoRA (written last: the bundle is done)
    README.md              the vllm / SGLang commands that serve the LoRAs by name
    router.json            the router's configuration (+ router.safetensors, OrchMoE's Task Router weights)
    loras/<name>/          one standard PEFT LoRA folder per routing

A LoRA's name comes from one function, `lora_name`, which the serving side (route-only mode) imports so the
names on both sides cannot drift apart: ``abstract-3`` (OrchMoE abstract task 3), ``task-5`` (Poly/MHR task
id 5), ``task-unseen`` (Poly/MHR's -1 routing of an unseen task: the mean allocation) and ``lora`` (a LoRA
adapter's single routing). `BundleManifest` answers which LoRA a routing uses, including abstract tasks that
have no LoRA of their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchmoe.adapters.export import (
    BUNDLE_FORMAT,
    BUNDLE_LORAS,
    BUNDLE_MANIFEST,
    BUNDLE_README,
    BUNDLE_ROUTER_CONFIG,
    BUNDLE_ROUTER_WEIGHTS,
    ExportError,
)

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST",
    "README",
    "ROUTER_CONFIG",
    "ROUTER_WEIGHTS",
    "LORAS",
    "BundleError",
    "BundleManifest",
    "lora_name",
]

BUNDLE_VERSION = 1
MANIFEST = BUNDLE_MANIFEST
README = BUNDLE_README
ROUTER_CONFIG = BUNDLE_ROUTER_CONFIG
ROUTER_WEIGHTS = BUNDLE_ROUTER_WEIGHTS
LORAS = BUNDLE_LORAS


class BundleError(ExportError):
    """A bundle that cannot be written or read, or a routing it has no LoRA for."""


def lora_name(*, abstract_task: int | None = None, task_id: int | None = None) -> str:
    """The name a bundle gives the LoRA of one routing (the ``model`` a multi-LoRA server is asked for).

    Args:
        abstract_task: an OrchMoE abstract task k >= 0 -> ``abstract-k``.
        task_id: a Poly/MHR task id t >= 0 -> ``task-t``; -1 (an unseen task) -> ``task-unseen``.
    Returns:
        The name; ``lora`` when neither is given (a LoRA adapter's one routing).
    Raises:
        BundleError: both given, or a value out of range.
    """
    if abstract_task is not None and task_id is not None:
        raise BundleError("a LoRA is named by an abstract task or by a task id, not both")
    if abstract_task is not None:
        if isinstance(abstract_task, bool) or not isinstance(abstract_task, int) or abstract_task < 0:
            raise BundleError(f"abstract task must be an integer >= 0, got {abstract_task!r}")
        return f"abstract-{abstract_task}"
    if task_id is not None:
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < -1:
            raise BundleError(f"task id must be an integer >= -1, got {task_id!r}")
        return "task-unseen" if task_id == -1 else f"task-{task_id}"
    return "lora"


class BundleManifest:
    """A bundle's ``manifest.json``, read and checked: its LoRAs and the routing -> LoRA maps.

    Attributes:
        folder: the bundle folder.
        data: the manifest as written (`write_bundle` documents the keys).
    """

    def __init__(self, folder: str | os.PathLike, data: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.data = data

    @classmethod
    def read(cls, folder: str | os.PathLike) -> BundleManifest:
        """Read ``folder/manifest.json``.

        Raises:
            BundleError: no manifest (not a bundle, or one whose writing never finished), or not one of ours.
        """
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise BundleError(f"{folder} is not a complete orchmoe LoRA bundle: it has no {MANIFEST}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not readable JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{path} is not an orchmoe LoRA bundle manifest (format {BUNDLE_FORMAT!r})")
        if not isinstance(data.get("loras"), dict) or not data["loras"]:
            raise BundleError(f"{path} lists no LoRAs")
        return cls(folder, data)

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def names(self) -> list[str]:
        """The LoRA names, in the manifest's order."""
        return list(self.data["loras"])

    def lora_paths(self) -> dict[str, Path]:
        """LoRA name -> its PEFT folder (absolute)."""
        return {name: (self.folder / entry["path"]).resolve() for name, entry in self.data["loras"].items()}

    def lora_for(self, *, abstract_task: int | None = None, task: int | str | None = None) -> str:
        """The LoRA that serves one routing.

        Args:
            abstract_task: OrchMoE: the argmax abstract task of pi. One without a LoRA of its own goes to the LoRA
                the manifest's ``route.abstract_task_to_lora`` names (the nearest exported allocation).
            task: Poly/MHR: a task id (-1: unseen) or a training task's name; an unknown name is an unseen task.
        Returns:
            The LoRA name; a LoRA adapter's bundle answers ``lora`` whatever the routing.
        Raises:
            BundleError: the routing does not fit the bundle's method.
        """
        route = self.data["route"]
        if route["by"] == "none":
            return lora_name()
        if route["by"] == "prompt":
            if abstract_task is None or task is not None:
                raise BundleError(f"{self.method} bundles route by the prompt's abstract task (abstract_task=k)")
            found = route["abstract_task_to_lora"].get(str(abstract_task))
            if found is None:
                raise BundleError(f"abstract task {abstract_task!r} is out of range for this bundle")
            return found
        if task is None or abstract_task is not None:
            raise BundleError(f"{self.method} bundles route by task (a task id, or a training task's name)")
        if isinstance(task, str):
            task = route["task_to_id"].get(task, -1)
        name = lora_name(task_id=task)
        if name not in self.data["loras"]:
            raise BundleError(f"task id {task} is out of range for this bundle ({len(route['task_to_id'])} tasks)")
        return name
