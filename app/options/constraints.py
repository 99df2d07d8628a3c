"""Options that restrict which tokens may be generated: `grammar` and `allowed_token_ids`.

No torch. These are the HTTP forms of `generate(prefix_allowed_tokens_fn=...)` (contract
class F): `allowed_token_ids` is a fixed list (vLLM's name), `grammar` a JSON schema or a
regex that the output must match, run by llguidance (docs/grammar.md says why that library).
Both are checked here, before anything reaches the engine, so a bad regex or schema is a
422 naming `grammar` with llguidance's own message.

Accepted grammar forms (TGI's `{"type", "value"}` plus its newer names):
  {"type": "json", "value": <schema object or JSON text>}     (alias "json_object")
  {"type": "json_schema", "value": {"name": ..., "schema": <schema>}}
  {"type": "json_object"} without a value: any JSON object
  {"type": "regex", "value": "<regex>"}                        (the whole output matches)
JSON is generated compactly (no whitespace between tokens) unless the schema's
"x-guidance" object says otherwise (llguidance's JSON options, e.g. whitespace_flexible).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

from app.options.checks import ParamValidationError, is_int

GRAMMAR_TYPES = ("json", "json_object", "json_schema", "regex")
# llguidance's JSON compiler defaults for this server: compact output. A small model that may
# put free whitespace anywhere can wander into whitespace and never close the object.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class GrammarSpec:
    """A validated grammar: what the request asked for and llguidance's compiled form."""

    kind: str  # "json" or "regex"
    source: str  # the schema as JSON text, or the regex
    grammar: str  # llguidance's grammar (what a matcher is built from)


def _error(message: str) -> ParamValidationError:
    return ParamValidationError("grammar", f"`grammar`: {message}")


def _schema(kind: str, value: Any) -> Any:
    if value is None:
        if kind == "json_object":
            return ANY_OBJECT
        raise _error(f'type "{kind}" needs a `value`: a JSON schema')
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _error(f"the value is not valid JSON text: {err}") from err
    if kind == "json_schema" and isinstance(value, Mapping) and "schema" in value:
        value = value["schema"]  # OpenAI / TGI: {"name": ..., "schema": {...}, "strict": ...}
    if not isinstance(value, (Mapping, bool)):
        raise _error(f"a JSON schema must be an object (or true / false), got {value!r}")
    return value


def parse_grammar(value: Any) -> GrammarSpec:
    """`{"type": ..., "value": ...}` -> a GrammarSpec, or ParamValidationError naming `grammar`."""
    if isinstance(value, GrammarSpec):
        return value
    if not isinstance(value, Mapping) or "type" not in value:
        raise _error(f'must be an object {{"type": ..., "value": ...}}, got {value!r}')
    kind = value["type"]
    if kind not in GRAMMAR_TYPES:
        raise _error(f"type must be one of {', '.join(GRAMMAR_TYPES)}; got {kind!r}")
    body = value.get("value")
    if kind == "regex":
        if not isinstance(body, str) or not body:
            raise _error(f'type "regex" needs a non-empty string `value`, got {body!r}')
        spec = GrammarSpec("regex", body, LLMatcher.grammar_from_regex(body))
    else:
        schema = _schema(kind, body)
        source = json.dumps(schema, ensure_ascii=False)
        try:
            grammar = LLMatcher.grammar_from_json_schema(source, defaults=JSON_DEFAULTS)
        except ValueError as err:
            raise _error(f"invalid JSON schema: {err}") from err
        spec = GrammarSpec("json", source, grammar)
    problem = LLMatcher.validate_grammar(spec.grammar)
    if problem:
        what = "regex" if spec.kind == "regex" else "JSON schema"
        raise _error(f"invalid {what}: {problem.strip()}")
    return spec


def _allowed_ids(value: Any, vocab_size: int | None) -> list[int]:
    name = "allowed_token_ids"
    if not isinstance(value, (list, tuple)) or not value:
        raise ParamValidationError(name, f"`{name}` must be a non-empty list of token ids")
    for token in value:
        if not is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            upper = f" and < {vocab_size} (the vocabulary size)" if vocab_size is not None else ""
            raise ParamValidationError(
                name, f"`{name}` token ids must be >= 0{upper}, got {token!r}"
            )
    return sorted(set(value))


def resolve_constraints(
    given: Mapping[str, Any], vocab_size: int | None, resolved: Mapping[str, Any]
) -> dict[str, Any]:
    """The SamplingParams fields `grammar` and `allowed_token_ids`, validated.

    `resolved`: the other resolved fields. A constraint runs in the batched sampler, so beam
    search (transformers' own processors) is refused; so is a grammar with
    forced_bos_token_id, which forces a first token the grammar may not allow."""
    grammar = given.get("grammar")
    allowed = given.get("allowed_token_ids")
    out: dict[str, Any] = {
        "grammar": None if grammar is None else parse_grammar(grammar),
        "allowed_token_ids": None if allowed is None else _allowed_ids(allowed, vocab_size),
    }
    for name, value in out.items():
        if value is not None and resolved.get("num_beams", 1) > 1:
            raise ParamValidationError(
                name, f"`{name}` is not supported with beam search; use num_beams = 1"
            )
    if grammar is not None and resolved.get("forced_bos_token_id") is not None:
        raise ParamValidationError(
            "grammar", "`grammar` cannot be combined with `forced_bos_token_id`"
        )
    return out
