"""A trained adapter named by a path: a run folder (``orchmoe train --out``) or an adapter folder.

The one place that resolves what ``orchmoe serve``, ``predict`` and ``export`` are given: the adapter folder,
the run's options when it is inside a run folder (read with the run folder's own strict reader), the
adapter's ``adapter_config.json``, and which base model to load when the user names none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchmoe.adapters.folder import ADAPTER_CONFIG, describe_adapter_config, read_adapter_config
from orchmoe.loading.pretrained import DEFAULT_MODEL
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.utils.fileio import path_kind

__all__ = ["TrainedAdapter", "locate_adapter"]


@dataclass
class TrainedAdapter:
    """What a path names.

    Attributes:
        adapter_dir: the adapter folder.
        run: its run folder, or None for an adapter folder outside one.
        options: the run's options (config.yaml; empty without a run).
        meta: the adapter's ``adapter_config.json``.
    """

    adapter_dir: Path
    run: RunFolder | None
    options: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run folder's name, else the adapter folder's (a served model's default id)."""
        return (self.run.path if self.run is not None else self.adapter_dir).resolve().name

    def base_model(self, model: str | None = None) -> str | None:
        """The base model to load: ``model`` if given, else the run's ``model`` option, else the adapter's recorded
        base (the default model by name, a recorded local path that exists, or the recorded name)."""
        if model or self.options.get("model"):
            return model or self.options["model"]
        saved = describe_adapter_config(self.meta)["record"].get("base_model") or {}
        name, source = saved.get("name"), saved.get("source")
        if name and str(name).lower() == DEFAULT_MODEL.lower():
            return DEFAULT_MODEL
        if source and Path(source).exists():
            return source
        return name


def locate_adapter(path: str | os.PathLike) -> TrainedAdapter:
    """The trained adapter at ``path`` (a run folder or an adapter folder).

    Raises:
        FileNotFoundError: nothing there, or a folder that is neither.
        NotADirectoryError: a file, link target or FIFO where a folder should be.
    """
    p = Path(path).expanduser()
    kind = path_kind(p)
    if kind is None:
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a {kind}: give a run folder or an adapter folder")
    if path_kind(p / ADAPTER_CONFIG) is not None:
        run = RunFolder(p.parent) if p.name == RunFolder.ADAPTER and (p.parent / RunFolder.CONFIG).is_file() else None
        adapter = p
    elif path_kind(p / RunFolder.ADAPTER / ADAPTER_CONFIG) is not None:
        run, adapter = RunFolder(p), p / RunFolder.ADAPTER
    else:
        raise FileNotFoundError(
            f"{p} is neither a run folder (with {RunFolder.ADAPTER}/) nor an adapter folder (with {ADAPTER_CONFIG})"
        )
    options = run.read_config()[0] if run is not None and (run.path / RunFolder.CONFIG).is_file() else {}
    return TrainedAdapter(adapter, run, dict(options), read_adapter_config(adapter))
