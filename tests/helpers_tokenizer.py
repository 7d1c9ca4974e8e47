"""A tiny, offline Hugging Face tokenizer for tests (no network, builds in milliseconds).

Usage from a test module anywhere under tests/ (tests/ is on the import path, see pyproject.toml)::

    from helpers_tokenizer import make_tiny_tokenizer

It is a byte-level BPE (every string is encodable, as with GPT-2/SmolLM tokenizers) trained on a
few prompt-like strings, with ``<pad>`` (id 0), ``</s>`` (eos, id 1) and ``<s>`` (bos, id 2).
These are the special ids of ``tiny_models.tiny_model``; build the model with ``vocab_size=len(tok)``
(``recipe_helpers.save_tiny`` writes both to a folder). The suite's one tiny tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS = "<pad>", "</s>", "<s>"

_CORPUS = [
    "Definition: Reverse the order of the letters in the given word.\n\n",
    "Positive Example 1 -\nInput: hello world\nOutput: dlrow olleh\n\n",
    "Now complete the following example -\nInput: the quick brown fox jumps over the lazy dog\nOutput:",
    "Add the two numbers and write the sum. 12 + 30 = 42. Sort the numbers in ascending order.",
    "The food was great and the staff were friendly. positive negative even odd",
    "Maria works as a teacher in Lisbon. Extract the name of the city mentioned in the sentence.",
    "user assistant system <|im_start|> <|im_end|>",
]

#: A minimal chat template in the style of ChatML (used by SmolLM2-Instruct).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_tiny_tokenizer(
    *, add_bos: bool = False, add_eos: bool = False, chat_template: bool = False, vocab_size: int = 600
) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast``.

    ``add_bos`` / ``add_eos`` make ``tokenizer(text)`` add ``<s>`` before / ``</s>`` after (like
    Llama / T5 tokenizers); by default no special tokens are added (like GPT-2 / SmolLM).
    ``chat_template`` installs :data:`CHAT_TEMPLATE`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos or add_eos:
        single = (f"{BOS} " if add_bos else "") + "$A" + (f" {EOS}" if add_eos else "")
        specials = [(t, tok.token_to_id(t)) for t, on in ((BOS, add_bos), (EOS, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf
