"""Choosing the next token of each row, and turning a row's tokens into text with stop strings.

Greedy rows take the argmax of their logits, as ``generate(do_sample=False)`` does (no logits
processor runs: the evaluation's greedy decoding uses none either). Sampled rows draw from the
softmax of ``logits / temperature`` cut to the smallest set of tokens whose probability reaches
``top_p``, each row with its own generator: a seeded request draws the same tokens whatever else
is in the batch (up to last-bit differences of batched logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "choose_tokens", "TextTracker"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling threshold in (0, 1].
        stop: strings that end the answer (not included in it).
        seed: the seed of this row's generator (None: a fresh random one).
        min_tokens: eos is not chosen before this many tokens (vLLM's ``min_tokens``; ``generate``'s
            ``min_new_tokens``): its logit is masked out.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The row's generator on the CPU (None for greedy rows)."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from (V,) logits under temperature and top-p."""
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # probability mass of the tokens ranked above each one
        sorted_p[before >= params.top_p] = 0.0  # the first token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of every row.

    Args:
        logits: (b, V) the rows' next-token logits.
        params: each row's sampling parameters.
        generators: each row's generator (None for greedy rows).
    Returns:
        b token ids.
    """
    greedy = logits.argmax(dim=-1).tolist()  # (b,) one transfer for the whole batch
    return [greedy[i] if p.greedy else _sample(logits[i], p, generators[i]) for i, p in enumerate(params)]


class TextTracker:
    """A row's text as its tokens arrive: the new text to stream at each token, and the stop strings.

    Text that might be the start of a stop string, or an incomplete UTF-8 character (decoded as U+FFFD),
    is held back until the next tokens decide it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # the text of every token so far (what the final answer is cut from)
        self.sent = 0  # characters of it already handed out

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Decode the row's tokens so far; returns (new text to hand out, whether a stop string ended it)."""
        self.text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        hold = 0  # the longest tail that could still grow into a stop string
        for s in self.stop:
            hold = max(
                [hold] + [k for k in range(1, min(len(s), end - self.sent + 1)) if self.text[end - k : end] == s[:k]]
            )
        end -= hold
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta, False

    def flush(self) -> str:
        """The text not handed out yet (at the end of the row)."""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta
