"""OpenAI completion fields -> generate options, and engine results -> OpenAI choices.

Mapping (documented in docs/api.md):
  max_tokens (default 16) -> max_new_tokens; temperature (default 1): 0 -> do_sample false
  (greedy), > 0 -> do_sample true with that temperature and top_p; n / best_of ->
  num_return_sequences (best_of sequences sampled, the n most likely returned); stop ->
  stop_strings; logit_bias {"id": b} -> sequence_bias [[[id], b]]; logprobs k -> per-token
  logprob plus top_n_tokens k alternatives when the engine reports them; seed -> seed.
  presence_penalty / frequency_penalty have no transformers equivalent: a non-zero value is a
  422 "not supported" (0, OpenAI's default, is accepted). response_format
  json_object / json_schema -> grammar (docs/grammar.md); `grammar` itself is an extra field.
  Extra body fields are generate options (validated as in /generate) and win over the above.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from app.api.errors import APIError
from app.api.options import GenerateOptions
from app.api.protocol.openai import CompletionRequest, LogProbs, ResponseFormat
from app.api.serving import Completion
from app.engine.core.request import FinishReason
from app.engine.outputs import GeneratedToken

DEFAULT_MAX_TOKENS = 16
RENAMES = {
    "max_new_tokens": "max_tokens",
    "stop_strings": "stop",
    "sequence_bias": "logit_bias",
    "top_n_tokens": "logprobs",
    "inputs": "prompt",
}


def extra_options(body: CompletionRequest) -> dict[str, Any]:
    """The extra body fields, validated as generate options (a typo is a 422 naming it)."""
    extras = body.extra_options
    if not extras:
        return {}
    try:
        return GenerateOptions.model_validate(extras).engine_options()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            message = f"unknown field `{field}` (not an OpenAI field nor a generate option)"
        else:
            message = f"`{field}`: {first['msg']}"
        raise APIError(422, message, "validation", field) from exc


def completion_options(body: CompletionRequest) -> tuple[dict[str, Any], dict[str, str], int]:
    """(generate options, error renames, n) for one prompt of the request."""
    if body.suffix:
        raise APIError(422, "`suffix` is not supported (no insertion mode)", field="suffix")
    options: dict[str, Any] = {}
    renames = dict(RENAMES)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    options["max_new_tokens"] = max_tokens
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0:
        options["do_sample"] = False
    else:
        options["do_sample"] = True
        options["temperature"] = temperature
        options["top_p"] = 1.0 if body.top_p is None else body.top_p
    n = body.n or 1
    best_of = body.best_of or n
    if best_of < n:
        raise APIError(422, f"`best_of` ({best_of}) must be >= `n` ({n})", field="best_of")
    if best_of > 1:
        options["num_return_sequences"] = best_of
        renames["num_return_sequences"] = "best_of" if body.best_of else "n"
    if body.stop:
        options["stop_strings"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if body.seed is not None:
        options["seed"] = body.seed
    if body.logprobs:
        options["top_n_tokens"] = body.logprobs
    if body.logit_bias:
        options["sequence_bias"] = logit_bias(body.logit_bias)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(
                422,
                f"`{name}` is not supported (transformers has no equivalent); "
                "use `repetition_penalty` as an extra field, or 0",
                field=name,
            )
    extras = extra_options(body)
    grammar = response_format_grammar(body.response_format)
    if grammar is not None:
        if "grammar" in extras:
            raise APIError(
                422, "give `response_format` or `grammar`, not both", field="response_format"
            )
        options["grammar"] = grammar
        renames["grammar"] = "response_format"
    options.update(extras)
    for name in extras:  # an option sent under its own name is named so in errors
        renames.pop(name, None)
    return options, renames, n


def response_format_grammar(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """OpenAI's response_format as a grammar option (None for text or when absent)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.json_schema is None:
        raise APIError(
            422, '`response_format` of type "json_schema" needs `json_schema.schema`',
            field="response_format",
        )  # fmt: skip
    return {"type": "json_schema", "value": {"schema": fmt.json_schema.schema_}}


def logit_bias(bias: dict[str, float]) -> list[list[Any]]:
    out = []
    for key, value in bias.items():
        if not key.strip().lstrip("-").isdigit():
            raise APIError(
                422, f"`logit_bias` keys must be token ids, got {key!r}", field="logit_bias"
            )
        out.append([[int(key)], value])
    return out


def finish_reason(reason: FinishReason | None) -> str | None:
    if reason in (FinishReason.EOS, FinishReason.STOP):
        return "stop"
    if reason is FinishReason.LENGTH:
        return "length"
    return None


def select(completions: list[Completion], n: int) -> list[Completion]:
    """best_of: the n most likely sequences (by cumulative logprob), in that order."""
    if len(completions) <= n:
        return completions
    return sorted(completions, key=lambda c: c.cumulative_logprob, reverse=True)[:n]


class LogprobBuilder:
    """OpenAI `logprobs` for a choice: tokens (each token decoded alone, so a Korean
    syllable split over tokens shows U+FFFD, as in OpenAI and vLLM), their logprobs, top
    alternatives (the chosen token only, until the engine reports alternatives) and the
    character offset of each token's text in the choice's text."""

    def __init__(self, tokenizer: Any, k: int, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.k = k
        self.offset = offset

    def prompt(self, prompt_ids: list[int]) -> LogProbs:
        out = LogProbs(top_logprobs=[] if self.k else None)
        for token in prompt_ids:
            text = self.tokenizer.decode([token])
            self._add(out, text, None, {} if self.k else None)
            self.offset += len(text)
        return out

    def steps(self, steps: list[GeneratedToken]) -> LogProbs:
        out = LogProbs(top_logprobs=[] if self.k else None)
        for step in steps:
            name = self.tokenizer.decode([step.id])
            top = None
            if self.k:
                pairs = step.top[: self.k] or (
                    [(step.id, step.logprob)] if step.logprob is not None else []
                )
                top = {self.tokenizer.decode([t]): lp for t, lp in pairs}
            self._add(out, name, step.logprob, top)
            self.offset += len(step.text)
        return out

    def _add(
        self, out: LogProbs, name: str, logprob: float | None, top: dict[str, float] | None
    ) -> None:
        out.tokens.append(name)
        out.token_logprobs.append(logprob)
        out.text_offset.append(self.offset)
        if out.top_logprobs is not None:
            out.top_logprobs.append(top)


def merge_logprobs(first: LogProbs | None, second: LogProbs) -> LogProbs:
    if first is None:
        return second
    top = None
    if first.top_logprobs is not None or second.top_logprobs is not None:
        top = (first.top_logprobs or []) + (second.top_logprobs or [])
    return LogProbs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=top,
        text_offset=first.text_offset + second.text_offset,
    )
