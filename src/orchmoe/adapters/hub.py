"""The adapter on the Hugging Face Hub, and where a base model came from.

`RoutedModel.save_pretrained` / `from_pretrained` / `push_to_hub` move the adapter only (the
``adapter_config.json`` + ``adapter_model.safetensors`` of `RoutedModel.save_adapter`), never the
frozen base model: that is what a PEFT model does, and a base model saved through a routed one
would carry renamed keys and no router. A push writes the folder to a temporary directory and
uploads it with `huggingface_hub.HfApi.upload_folder`.

Provenance: an adapter and its PEFT export record the base model's *source*, the path or hub id
that loads it (``config._name_or_path`` of a model loaded with ``from_pretrained``), beside its
portable *name*; a base dequantised from a GGUF file into orchmoe's cache says so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from orchmoe.adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = [
    "AdapterHubMixin",
    "HubError",
    "base_model_provenance",
    "model_card",
    "model_source",
    "push_adapter",
    "resolve_adapter_folder",
]


class HubError(RuntimeError):
    """A Hub transfer that cannot happen (offline) or that failed."""


def model_source(model: Any) -> str | None:
    """The path or hub id `from_pretrained` loaded ``model`` from (``config._name_or_path``), or None."""
    cfg = getattr(model, "config", None)
    source = getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or ""
    return str(source) or None


def base_model_provenance(source: str | None) -> dict[str, Any]:
    """What is known of a base model's origin: its source and, for a checkpoint orchmoe converted
    from a GGUF file, that file (the weights were dequantised from it, so they are not the hub's).

    Returns:
        ``{}`` without a source; else ``source`` and, for a GGUF conversion, ``dequantized_from_gguf``,
        ``converted_checkpoint`` and ``gguf_model_name`` (when known).
    """
    if not source:
        return {}
    out: dict[str, Any] = {"source": source}
    path = Path(source)
    if path.is_dir():
        from orchmoe.loading.gguf import read_marker

        marker = read_marker(path) or {}
        if marker.get("source", "").lower().endswith(".gguf"):
            out["dequantized_from_gguf"] = marker["source"]
            out["converted_checkpoint"] = str(path)
            if marker.get("name"):
                out["gguf_model_name"] = marker["name"]
    return out


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (
        1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~")) and os.sep not in text.replace("/", "")
    )


def resolve_adapter_folder(
    path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """A local adapter folder, or the adapter files of a Hub repository downloaded to the HF cache.

    Args:
        path_or_repo: a local folder, or a Hub repository id (``name`` or ``org/name``).
        revision: the repository's branch, tag or commit.
        token: the Hub token (``huggingface_hub``'s default when None).
    Returns:
        The folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    Raises:
        FileNotFoundError: neither a local folder nor a repository that could be fetched (offline, unknown).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir() or not _looks_like_repo_id(str(path_or_repo)):
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter folder at {path}")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_repo), revision=revision, token=token, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]
            )
        )
    except Exception as e:  # offline, unknown repo, auth: one clear error with the cause chained
        raise FileNotFoundError(
            f"{str(path_or_repo)!r} is not a local adapter folder and could not be fetched from "
            f"the Hugging Face Hub ({type(e).__name__}: {e})"
        ) from e


def model_card(model: Any) -> str:
    """A short README.md for an adapter repository: what it is and what it needs."""
    cfg = model.adapter_config
    source = model.base_model_source or model.base_model_name
    meta = ["---", "library_name: orchmoe", f"tags: [orchmoe, {cfg.method}, lora]"]
    if source and _looks_like_repo_id(source) and not Path(source).exists():
        meta.append(f"base_model: {source}")
    meta.append("---")
    body = [
        f"# {cfg.method} adapter for {model.base_model_name}",
        "",
        (
            f"A routed mixture of LoRA experts ({cfg.method}, {len(model.layer_shapes)} adapted layers) trained "
            "with orchmoe. Load it onto the base model with:"
        ),
        "",
        "```python",
        "from orchmoe import RoutedModel",
        'model = RoutedModel.from_pretrained(base_model, "<this repo>")',
        "```",
    ]
    return "\n".join(meta + [""] + body) + "\n"


def push_adapter(
    model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    metadata: dict | None = None,
) -> Any:
    """Save the adapter (and a model card) to a temporary folder and upload it to ``repo_id``.

    Args:
        model: the `RoutedModel`.
        repo_id: the Hub repository, created if needed.
        private: visibility of a repository created here (None: the Hub's default).
        token: the Hub token.
        revision: the branch to commit to.
        commit_message: default ``"Upload <method> adapter"``.
        create_pr: open a pull request instead of committing.
        metadata: free-form JSON saved in the adapter config.
    Returns:
        `huggingface_hub.HfApi.upload_folder`'s commit info.
    Raises:
        HubError: offline (``HF_HUB_OFFLINE``), or the upload failed (the cause is chained).
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set (no network). Save the adapter with "
            "save_pretrained(folder) and upload that folder when online"
        )
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="orchmoe-push-") as tmp:
        model.save_pretrained(tmp, metadata=metadata)
        (Path(tmp) / "README.md").write_text(model_card(model), encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or f"Upload {model.adapter_config.method} adapter",
            )
        except Exception as e:  # network, auth, permissions: one clear error with the cause chained
            raise HubError(f"pushing the adapter to {repo_id!r} failed: {type(e).__name__}: {e}") from e


class AdapterHubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` of a `RoutedModel`: the adapter only."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        metadata: dict | None = None,
    ) -> Path:
        """Write the adapter folder (as `save_adapter`): what `from_pretrained` and `orchmoe.load_adapter` read.

        Args:
            save_directory: the folder (created if needed).
            is_main_process: False on the other processes of a distributed run (they write nothing).
            safe_serialization: must be True: adapters are always safetensors.
            metadata: free-form JSON kept in the adapter config (``adapter_metadata`` after loading).
        Returns:
            The folder.
        """
        if not safe_serialization:
            raise ValueError(
                "orchmoe adapters are always written as safetensors (safe_serialization=False is not supported)"
            )
        if not is_main_process:
            return Path(save_directory)
        return self.save_adapter(save_directory, metadata=metadata)

    @classmethod
    def from_pretrained(
        cls,
        base_model: Any,
        path_or_repo: str | os.PathLike,
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`orchmoe.load_adapter` from a local adapter folder or a Hub repository (as ``PeftModel.from_pretrained``).

        Args:
            base_model: a fresh transformers model of the shape the adapter was saved for.
            path_or_repo: an adapter folder, or the id of a Hub repository holding one.
            is_trainable: keep the adapter trainable (default: frozen, eval mode).
            revision, token: of the Hub repository.
            **kwargs: ``base_model_name`` / ``base_model_source`` of `orchmoe.load_adapter`.
        Returns:
            The `RoutedModel`.
        """
        folder = resolve_adapter_folder(path_or_repo, revision=revision, token=token)
        return cls.load_folder(base_model, folder, is_trainable=is_trainable, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        metadata: dict | None = None,
    ) -> Any:
        """Upload the adapter (with a model card) to a Hub repository, created if needed.

        Args:
            repo_id, private, token, revision, commit_message, create_pr, metadata: as `push_adapter`.
        Returns:
            The upload's commit info.
        Raises:
            HubError: offline, or the upload failed.
        """
        return push_adapter(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            metadata=metadata,
        )
