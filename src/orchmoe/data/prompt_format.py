"""The prompt format an adapter was trained with, saved beside it so inference needs only the adapter folder.

A routed adapter is only as good as the prompts it is given: OrchMoE's Task Router reads the mean
embedding of the prompt, so a prompt built another way (another number of demonstrations, no chat
template, another token budget) is routed elsewhere. `PromptFormat` records everything
:func:`orchmoe.data.encode_prompt` needs to rebuild the training prompt; the recipe stores it in the
adapter's metadata under ``"prompt_format"`` and serving, batch prediction and export read it back
with :meth:`PromptFormat.from_adapter_metadata`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from orchmoe.data.prompts import encode_prompt, special_affixes

__all__ = ["PROMPT_FORMAT_KEY", "TEMPLATES", "PromptFormat", "PromptFormatWarning"]

#: the adapter-metadata key the format is saved under
PROMPT_FORMAT_KEY = "prompt_format"
#: the prompt templates orchmoe.data builds (``format_prompt``)
TEMPLATES = ("tk-instruct",)


class PromptFormatWarning(UserWarning):
    """An adapter without a recorded prompt format: prompts are built with assumed settings."""


@dataclass(frozen=True)
class PromptFormat:
    """How the training prompts of an adapter were built (the defaults are the recipe's defaults).

    Attributes:
        template: the prompt template (``"tk-instruct"``: definition, demonstrations, ``Input:``/``Output:``).
        n_pos: positive demonstrations put in the prompt (fewer when over the budget).
        max_source_len: the prompt's token budget.
        max_target_len: the answer's token budget in training (eos included).
        max_new_tokens: generation length of the run's evaluation (default: ``max_target_len``).
        chat_template: prompts were wrapped in the tokenizer's chat template.
        definition: the task definition was part of the prompt.
        decoder_only: the model is decoder-only (an encoder-decoder's prompt is its encoder input).
    """

    template: str = "tk-instruct"
    n_pos: int = 1
    max_source_len: int = 160
    max_target_len: int = 24
    max_new_tokens: int | None = None
    chat_template: bool = False
    definition: bool = True
    decoder_only: bool = True

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {self.template!r}; this orchmoe builds {list(TEMPLATES)}")
        for name in ("n_pos", "max_source_len", "max_target_len", "max_new_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_new_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n_pos" else 1):
                raise ValueError(f"prompt format: {name} must be an integer >= {0 if name == 'n_pos' else 1}")
        for name in ("chat_template", "definition", "decoder_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"prompt format: {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def generation_tokens(self) -> int:
        """Tokens to generate by default: the evaluation's length, else the training answer budget."""
        return self.max_new_tokens or self.max_target_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptFormat:
        """From a saved mapping; keys this version does not know are ignored (a newer writer), bad values raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_adapter_metadata(cls, metadata: Mapping[str, Any] | None, *, where: str = "the adapter") -> PromptFormat:
        """The format saved in an adapter's metadata (``model.adapter_metadata`` after `orchmoe.load_adapter`).

        Adapters saved before the format was recorded load too: from the older ``"prompt"`` record of the
        recipe when present, else with the defaults; either way with a `PromptFormatWarning` saying so.
        """
        metadata = metadata or {}
        saved = metadata.get(PROMPT_FORMAT_KEY)
        if isinstance(saved, Mapping):
            return cls.from_dict(saved)
        legacy = metadata.get("prompt")
        if isinstance(legacy, Mapping):
            warnings.warn(
                f"{where} has no recorded prompt_format (saved by an older orchmoe): using its 'prompt' record "
                f"{dict(legacy)} with the Tk-Instruct template and the definition",
                PromptFormatWarning,
                stacklevel=2,
            )
            return cls.from_dict(legacy)
        default = cls()
        warnings.warn(
            f"{where} has no recorded prompt format: building prompts with the defaults (n_pos={default.n_pos}, "
            f"max_source_len={default.max_source_len}, no chat template); answers may differ from training",
            PromptFormatWarning,
            stacklevel=2,
        )
        return default

    # -- building prompts ----------------------------------------------------------------------
    def encode(
        self,
        tokenizer: Any,
        definition: str,
        input_text: str,
        examples: Sequence[Mapping[str, Any]] = (),
    ) -> list[int]:
        """Token ids of the training prompt for one input (`orchmoe.data.encode_prompt` with these settings).

        Args:
            tokenizer: the base model's tokenizer.
            definition: the task definition (may be empty).
            input_text: the instance's input.
            examples: demonstrations, each with ``input`` and ``output`` (at most ``n_pos`` are used).
        Returns:
            The prompt's token ids, at most ``max_source_len`` of them.
        """
        task = SimpleNamespace(definition=definition, positive_examples=list(examples))
        return encode_prompt(
            tokenizer,
            task,
            input_text,
            n_pos=self.n_pos,
            max_source_len=self.max_source_len,
            decoder_only=self.decoder_only,
            chat_template=self.chat_template,
            definition=self.definition,
        )

    def encode_text(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of a raw prompt text, with the special tokens the training prompts started with (BOS for
        tokenizers that add one; nothing after it for a decoder-only model); no chat template is applied."""
        pre, post = special_affixes(tokenizer)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return (pre if not self.chat_template else []) + ids + ([] if self.decoder_only else post)

    def encode_chat(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, with the assistant's header.

        Raises:
            ValueError: the adapter was not trained with a chat template, or the tokenizer has none.
        """
        if not self.chat_template:
            raise ValueError(
                "this adapter was trained without a chat template (prompt_format.chat_template is false): "
                "use /v1/completions with a prompt, or with definition and input"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
