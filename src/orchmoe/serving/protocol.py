"""The OpenAI request bodies this server takes, checked, and turned into engine requests. No HTTP here.

``/v1/completions`` takes a ``prompt`` (text, or token ids) or the structured training format
(``definition``, ``input``, optional ``examples``), which builds exactly the prompt the adapter was
trained on (`orchmoe.data.PromptFormat`). ``/v1/chat/completions`` takes ``messages`` where the
adapter was trained with a chat template. ``task`` (a seen task's name or id, ``-1`` for an unseen
task) or a model id ``NAME/TASK`` routes Poly and MHR; the other methods route each prompt by itself.
Every problem is a `RequestError` with an HTTP status and a message naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from orchmoe.serving.engine import GenerationRequest
from orchmoe.serving.errors import RequestError
from orchmoe.serving.sampling import SamplingParams

__all__ = ["RequestError", "Limits", "CompletionBody", "ChatBody", "parse_body", "build_request"]


class Limits(BaseModel):
    """What one request may ask for (the server's bounds), and the defaults of what it leaves out.

    ``default_temperature`` is 0 (greedy, as the evaluation decodes), not OpenAI's 1: a task adapter's
    answer is its greedy one; a request sets ``temperature`` to sample.
    """

    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    default_max_tokens: int = 64
    default_temperature: float = 0.0


class _Example(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr
    output: StrictStr


_Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=8)] | None


class _Common(BaseModel):
    """Fields both endpoints share (unknown fields are ignored, as OpenAI-compatible servers do)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    stop: _Stop = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    seed: StrictInt | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    task: StrictStr | StrictInt | None = None
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    best_of: StrictInt | None = None
    echo: StrictBool | None = None


class CompletionBody(_Common):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | None = None
    definition: StrictStr | None = None
    input: StrictStr | None = None
    examples: Annotated[list[_Example], Field(max_length=16)] | None = None
    suffix: StrictStr | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatBody(_Common):
    messages: Annotated[list[_Message], Field(min_length=1, max_length=64)]
    max_completion_tokens: StrictInt | None = None


def _first_error(e: ValidationError) -> RequestError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int")))]
    param = ".".join(loc) or None
    what = err["msg"]
    if err["type"] == "missing":
        what = "is required"
    elif param == "prompt" or (param or "").startswith("prompt."):
        what = "must be a string or a list of token ids"
    return RequestError(f"{param}: {what}" if param else what, param=(loc[0] if loc else None))


def parse_body(raw: bytes, kind: str) -> CompletionBody | ChatBody:
    """The body as JSON, validated for the endpoint (``"completion"`` or ``"chat"``)."""
    import json

    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return (ChatBody if kind == "chat" else CompletionBody).model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from None


def _unsupported(body: _Common) -> None:
    if body.n not in (None, 1):
        raise RequestError(f"n={body.n} is not supported: this server returns one completion per request", param="n")
    if body.best_of not in (None, 1):
        raise RequestError("best_of is not supported", param="best_of")
    if body.logprobs not in (None, False, 0):
        raise RequestError("logprobs are not supported", param="logprobs")
    if body.echo:
        raise RequestError("echo is not supported", param="echo")
    if getattr(body, "suffix", None):
        raise RequestError("suffix is not supported", param="suffix")


def _sampling(body: _Common, limits: Limits, n_prompt: int, max_positions: int) -> SamplingParams:
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise RequestError(
            f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}", param="max_tokens"
        )
    if max_positions and n_prompt + max_tokens > max_positions:
        raise RequestError(
            f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is over the model's context of "
            f"{max_positions} tokens",
            param="max_tokens",
        )
    if body.min_tokens is not None and body.min_tokens > max_tokens:
        raise RequestError(f"min_tokens={body.min_tokens} is over max_tokens={max_tokens}", param="min_tokens")
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    if any(len(s) > 64 for s in stop):
        raise RequestError("a stop string is longer than 64 characters", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=limits.default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(stop),
        seed=body.seed,
        min_tokens=body.min_tokens or 0,
    )


def _completion_prompt(served: Any, body: CompletionBody) -> list[int]:
    structured = body.definition is not None or body.input is not None or body.examples is not None
    if structured and body.prompt is not None:
        raise RequestError("give either prompt, or definition and input (the training format), not both")
    if structured:
        if body.input is None or not body.input.strip():
            raise RequestError("input: the structured form needs a non-empty input", param="input")
        examples = [e.model_dump() for e in body.examples or []]
        return served.prompt_format.encode(served.tokenizer, body.definition or "", body.input, examples)
    if body.prompt is None:
        raise RequestError("prompt is required (or definition and input)", param="prompt")
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
        if len(body.prompt) != 1:
            raise RequestError("one prompt per request: send the others as separate requests", param="prompt")
        body.prompt = body.prompt[0]
    if isinstance(body.prompt, str):
        if not body.prompt.strip():
            raise RequestError("prompt is empty", param="prompt")
        return served.prompt_format.encode_text(served.tokenizer, body.prompt)
    if not body.prompt:
        raise RequestError("prompt is empty", param="prompt")
    vocab = served.vocab_size
    if any(t < 0 or t >= vocab for t in body.prompt):
        raise RequestError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
    return list(body.prompt)


def build_request(served: Any, body: CompletionBody | ChatBody, limits: Limits) -> tuple[GenerationRequest, str]:
    """The engine request of a validated body, and the model id it answers as.

    Args:
        served: the `orchmoe.serving.loader.Served` model (tokenizer, prompt format, model ids, routing).
        body: the parsed body.
        limits: the server's bounds.
    Raises:
        RequestError: anything the request asks that this server cannot or will not do.
    """
    _unsupported(body)
    model_id = body.model or served.name
    route = served.route(model_id, body.task)
    if isinstance(body, ChatBody):
        try:
            ids = served.prompt_format.encode_chat(served.tokenizer, [m.model_dump() for m in body.messages])
        except ValueError as e:
            raise RequestError(str(e), param="messages") from None
    else:
        ids = _completion_prompt(served, body)
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; this server takes at most {limits.max_prompt_tokens}", param="prompt"
        )
    params = _sampling(body, limits, len(ids), served.max_positions)
    return GenerationRequest(prompt_ids=ids, route=route, params=params), model_id
