"""OpenAI completion fields -> generate options, and engine results -> OpenAI choices.

Mapping (documented in docs/api.md):
  max_tokens (default 16) -> max_new_tokens; temperature (default 1): 0 -> do_sample false
  (greedy), > 0 -> do_sample true with that temperature and top_p; n / best_of ->
  num_return_sequences (best_of sequences sampled, the n most likely returned); stop ->
  stop_strings; logit_bias {"id": b} -> sequence_bias [[[id], b]]; logprobs k -> per-token
  logprob plus top_n_tokens k alternatives when the engine reports them; echo with logprobs
  and vLLM's prompt_logprobs -> SamplingParams.prompt_logprobs (the prompt's log-probs from
  the prefill; max_tokens 0: a prompt-only request); seed -> seed.
  presence_penalty / frequency_penalty -> the options of the same name (OpenAI's formula, as
  vLLM applies it). response_format json_object / json_schema, or TGI's {"type": "json" |
  "json_object" | "json_schema" | "regex", "value"} -> grammar (docs/grammar.md); `grammar`
  itself is an extra field.
  Extra body fields are generate options (validated as in /generate) and win over the above.
vLLM's extensions: max_completion_tokens -> max_new_tokens (beside max_tokens); min_tokens ->
  min_new_tokens; ignore_eos -> ignore_eos; stop_token_ids -> added to the eos ids
  (`apply_stop_token_ids`); include_stop_str_in_output / sglang's no_stop_trim and
  skip_special_tokens -> the text path (`apply_output_flags`); truncate_prompt_tokens and
  return_token_ids -> the routes. Fields with no meaning here (IGNORED_FIELDS) are logged at
  debug level and ignored; tools with a tool_choice other than "none" are refused.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from pydantic import ValidationError

from app.api.errors import APIError
from app.api.options import OPTION_NAMES, GenerateOptions
from app.api.protocol.openai import (
    CompletionRequest,
    LogProbs,
    OpenAIRequestFields,
    PromptLogprobs,
    PromptTokenLogprob,
    ResponseFormat,
)
from app.api.serving import Completion
from app.engine.core.request import FinishReason
from app.engine.outputs import GeneratedToken, PromptLogprob
from app.options.class_b import ClassBParams
from app.options.params import SamplingParams

logger = logging.getLogger("kogpt.api")

DEFAULT_MAX_TOKENS = 16
# OpenAI / sglang fields that mean nothing for this server (see protocol/openai.py).
IGNORED_FIELDS = (
    "metadata", "store", "service_tier", "modalities", "audio", "reasoning_effort", "verbosity",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "safety_identifier",
    "moderation", "web_search_options", "prediction", "parallel_tool_calls", "tool_choice",
    "function_call", "separate_reasoning", "stream_reasoning",
)  # fmt: skip
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
    if extras.get("top_k") == -1:  # vLLM's "no top-k" on its OpenAI routes (0 here, as HF)
        extras = {**extras, "top_k": 0}
    try:
        return GenerateOptions.model_validate(extras).engine_options()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            message = f"unknown field `{field}` (not an OpenAI field nor a generate option)"
            known = sorted(OPTION_NAMES | set(type(body).model_fields))
            closest = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
            if closest:
                message += f"; did you mean `{closest[0]}`?"
        else:
            message = f"`{field}`: {first['msg']}"
        raise APIError(422, message, "validation", field) from exc


def completion_options(body: CompletionRequest) -> tuple[dict[str, Any], dict[str, str], int]:
    """(generate options, error renames, n) for one prompt of the request."""
    if body.suffix:
        raise APIError(422, "`suffix` is not supported (no insertion mode)", field="suffix")
    options: dict[str, Any] = {}
    renames = dict(RENAMES)
    if body.max_completion_tokens is not None:  # chat's name, sent to completions by gateways
        max_tokens = body.max_completion_tokens
        renames["max_new_tokens"] = "max_completion_tokens"
    else:
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    options["max_new_tokens"] = max_tokens
    if body.min_tokens:
        options["min_new_tokens"] = body.min_tokens
        renames["min_new_tokens"] = "min_tokens"
    if body.ignore_eos:
        options["ignore_eos"] = True
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
    for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's / vLLM's formula
        if getattr(body, name):  # 0 and null are off
            options[name] = getattr(body, name)
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


def check_request_fields(body: OpenAIRequestFields, route: str) -> None:
    """Refuse what cannot be served (tool calls, hidden states); log what is ignored."""
    tools_on = body.tool_choice != "none"
    if body.tools and tools_on:
        raise APIError(
            422,
            "tool calling is not supported by this server: send `tools` with "
            '`tool_choice: "none"`, or no `tools`',
            field="tools",
        )
    if body.functions and body.function_call != "none":
        raise APIError(
            422,
            "function calling is not supported by this server: send `functions` with "
            '`function_call: "none"`, or no `functions`',
            field="functions",
        )
    if body.return_hidden_states:
        raise APIError(
            422,
            "`return_hidden_states` is not supported; `output_hidden_states: true` returns "
            "them on non-streaming /v1/completions",
            field="return_hidden_states",
        )
    ignored = [name for name in IGNORED_FIELDS if getattr(body, name) is not None]
    ignored += [name for name in ("tools", "functions") if getattr(body, name) is not None]
    if ignored:
        logger.debug("%s: ignoring %s (no meaning for this server)", route, ", ".join(ignored))


def apply_stop_token_ids(
    options: dict[str, Any],
    renames: dict[str, str],
    stop_token_ids: list[int] | None,
    default_eos: list[int],
) -> None:
    """vLLM's stop_token_ids: generation also ends at these ids. They join the eos ids (the
    request's eos_token_id, else `default_eos`; none with ignore_eos, as in vLLM, where
    ignore_eos leaves stop_token_ids in force), so min_new_tokens masks them too."""
    if not stop_token_ids:
        return
    if "eos_token_id" in options:
        eos = options["eos_token_id"]
        base = [eos] if isinstance(eos, int) else list(eos)
    else:
        base = [] if options.get("ignore_eos") else list(default_eos)
        renames["eos_token_id"] = "stop_token_ids"
    options["eos_token_id"] = base + [t for t in stop_token_ids if t not in base]
    options.pop("ignore_eos", None)


def apply_output_flags(params: SamplingParams, body: OpenAIRequestFields) -> None:
    """vLLM's text options (not generate options: they act on the text, not the tokens)."""
    if body.include_stop_str_in_output or body.no_stop_trim:
        params.include_stop_str_in_output = True
    if body.skip_special_tokens is False:
        params.skip_special_tokens = False


def context_length_error(
    max_total: int, prompt_tokens: int, completion_tokens: int, field: str
) -> APIError:
    """OpenAI's (and vLLM's) wording, which the SDKs and LiteLLM map to their context-window
    error (LiteLLM matches "this model's maximum context length is")."""
    requested = prompt_tokens + completion_tokens
    return APIError(
        422,
        f"This model's maximum context length is {max_total} tokens. However, you requested "
        f"{requested} tokens ({prompt_tokens} in the messages, {completion_tokens} in the "
        f"completion). Please reduce the length of the messages or completion (`{field}`).",
        field=field,
        code="context_length_exceeded",
    )


def truncate_prompt(ids: list[int], keep: int | None, max_input_tokens: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: the most the model
    takes)."""
    if keep is None:
        return ids
    if keep == 0:
        raise APIError(
            422, "`truncate_prompt_tokens` must be >= 1, or -1", field="truncate_prompt_tokens"
        )
    if keep == -1:
        keep = max_input_tokens
    if keep > max_input_tokens:
        raise APIError(
            422,
            f"`truncate_prompt_tokens` ({keep}) must be at most {max_input_tokens} (the longest "
            "prompt accepted), or -1",
            field="truncate_prompt_tokens",
        )
    return ids[-keep:]


def response_format_grammar(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """OpenAI's response_format, or TGI's `{"type", "value"}` (what huggingface_hub's
    InferenceClient sends), as a grammar option (None for text or when absent)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.value is not None:  # TGI's grammar object: json / json_object / json_schema / regex
        if fmt.json_schema is not None:
            raise APIError(
                422, "`response_format`: give `json_schema` (OpenAI) or `value` (TGI), not both",
                field="response_format",
            )  # fmt: skip
        return {"type": fmt.type, "value": fmt.value}
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type in ("json", "regex"):
        raise APIError(
            422, f'`response_format` of type "{fmt.type}" needs a `value` (TGI\'s form)',
            field="response_format",
        )  # fmt: skip
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

    def prompt(
        self, prompt_ids: list[int], computed: list[PromptLogprob | None] | None = None
    ) -> LogProbs:
        """The echoed prompt's entries: each token's log-prob given the tokens before it
        (`computed`, the engine's prompt log-probs) with its top alternatives; the first
        token has none (null, as OpenAI)."""
        out = LogProbs(top_logprobs=[] if self.k else None)
        if computed is not None and len(computed) != len(prompt_ids):
            computed = None  # token healing rewrote the prompt the engine ran
        for position, token in enumerate(prompt_ids):
            text = self.tokenizer.decode([token])
            entry = computed[position] if computed is not None else None
            top = None
            if self.k and entry is not None:
                top = {self.tokenizer.decode([t]): lp for t, lp in entry.top[: self.k]}
            self._add(out, text, None if entry is None else entry.logprob, top)
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


def prompt_logprobs_wanted(body: CompletionRequest) -> int | None:
    """Top alternatives the engine computes for the prompt (SamplingParams.prompt_logprobs):
    echo + logprobs k (OpenAI's echoed prompt log-probs) and vLLM's prompt_logprobs."""
    wanted = [body.prompt_logprobs]
    if body.echo and body.logprobs is not None:
        wanted.append(body.logprobs)
    given = [k for k in wanted if k is not None]
    return max(given) if given else None


def prompt_only(params: SamplingParams, prompt_len: int) -> None:
    """Resolved (as for one new token) params made a prompt-only request: max_tokens 0 with
    echo and log-probs, the prefill and its prompt log-probs, nothing sampled."""
    params.max_new_tokens = 0
    params.max_length = prompt_len
    params.min_new_tokens = 0
    params.min_length = min(params.min_length, prompt_len)
    params.num_return_sequences = 1  # the n choices are one echo, repeated
    # Nothing is decoded, so the decoding method does not matter: the batched lane's prefill.
    params.num_beams = 1
    if isinstance(params, ClassBParams):
        params.class_b = None


def vllm_prompt_logprobs(
    tokenizer: Any, computed: list[PromptLogprob | None], k: int
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None, then per position {the prompt token: its log-prob,
    rank and text} followed by the k most likely tokens (ranks 1..k), -inf as -9999.0."""
    decoded: dict[int, str] = {}

    def entry(token: int, logprob: float, rank: int) -> PromptTokenLogprob:
        if token not in decoded:
            decoded[token] = tokenizer.decode([token])
        return PromptTokenLogprob(
            logprob=max(logprob, -9999.0), rank=rank, decoded_token=decoded[token]
        )

    out: PromptLogprobs = []
    for item in computed:
        if item is None:
            out.append(None)
            continue
        position = {item.id: entry(item.id, item.logprob, item.rank)}
        for rank, (token, logprob) in enumerate(item.top[:k], 1):
            if token not in position:
                position[token] = entry(token, logprob, rank)
        out.append(position)
    return out


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
