"""Properties of the generate-parameter schema, checked through the functions the routes use
(the request models, routes_generate.prepare, routes_fewshot.prepare, and for /v1/completions
completion_options + prompt_list + build_params): every invalid value or combination is a
422 whose field and message name the option; every valid one is accepted.

The state is the server's own (build_state on the embedded model, engine started but idle),
limited to TOTAL positions so the length rules are exercised with small numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from app.api.errors import APIError, validation_error
from app.api.options import OPTION_NAMES, GenerateOptions
from app.api.protocol.fewshot import FewShotRequest
from app.api.protocol.openai import CompletionRequest
from app.api.protocol.openai_options import completion_options
from app.api.protocol.tgi import GenerateParameters, GenerateRequest
from app.api.routes import fewshot as routes_fewshot
from app.api.routes import generate as routes_generate
from app.api.routes.openai import prompt_list
from app.api.serving import build_params
from app.config import Settings
from app.options.params import SamplingParams
from app.state import ServerState, build_state

TOTAL = 256
PROMPT = "대한민국은"
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def state() -> Iterator[ServerState]:
    server = build_state(Settings(num_kv_blocks=64, max_num_seqs=8, max_total_tokens=TOTAL))
    server.engine.start()  # idle: prepare() only checks that it would admit
    try:
        yield server
    finally:
        server.engine.stop()


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """The request model, a validation failure as the app's handler renders it."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from exc


def tgi(state: ServerState, parameters: dict[str, Any], inputs: str = PROMPT) -> SamplingParams:
    body = parse(GenerateRequest, {"inputs": inputs, "parameters": parameters})
    return routes_generate.prepare(state, body).params


def few_shot(state: ServerState, parameters: dict[str, Any]) -> SamplingParams:
    body = parse(FewShotRequest, {"query": PROMPT, "parameters": parameters})
    return routes_fewshot.prepare(state, body).params


def openai(state: ServerState, fields: dict[str, Any]) -> SamplingParams:
    """What POST /v1/completions does before it runs one prompt."""
    body = parse(CompletionRequest, {"prompt": PROMPT, **fields})
    options, renames, _ = completion_options(body)
    ((ids, _, field),) = prompt_list(state, body, options["max_new_tokens"])
    return build_params(state, options, len(ids), {**renames, "inputs": field})


def prompt_len(state: ServerState) -> int:
    return len(state.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])


def expect(call: Callable[[], Any], valid: bool, name: str) -> None:
    """Accepted when valid; else a 422 whose field ends with `name` and whose message names it."""
    if valid:
        call()
        return
    with pytest.raises(APIError) as info:
        call()
    err = info.value
    assert err.status_code == 422, err.message
    assert err.field is not None and err.field.split(".")[-1] == name, (err.field, err.message)
    assert name in err.message, err.message


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def ints(lo: int, hi: float = math.inf) -> Callable[[Any], bool]:
    return lambda x: is_int(x) and lo <= x <= hi


def unit(lo_open: bool, hi_open: bool) -> Callable[[Any], bool]:
    def ok(x: Any) -> bool:
        if not finite(x):
            return False
        return (x > 0 if lo_open else x >= 0) and (x < 1 if hi_open else x <= 1)

    return ok


SAMPLING = {"do_sample": True, "max_new_tokens": 8}
# option -> (which numbers are valid, the other options sent with it)
RANGES: dict[str, tuple[Callable[[Any], bool], dict[str, Any]]] = {
    "temperature": (lambda x: finite(x) and x > 0, SAMPLING),
    "top_k": (ints(0), SAMPLING),
    "top_p": (unit(True, False), SAMPLING),
    "min_p": (unit(False, False), SAMPLING),
    "typical_p": (unit(True, False), SAMPLING),
    "epsilon_cutoff": (unit(False, True), SAMPLING),
    "eta_cutoff": (unit(False, True), SAMPLING),
    "top_h": (unit(True, False), SAMPLING),
    "repetition_penalty": (lambda x: finite(x) and x > 0, SAMPLING),
    "no_repeat_ngram_size": (ints(0), SAMPLING),
    "min_new_tokens": (ints(0, 8), SAMPLING),
    "top_n_tokens": (ints(0, 20), SAMPLING),
    "seed": (ints(SEED_MIN, SEED_MAX), SAMPLING),
    "max_time": (lambda x: finite(x) and x > 0, SAMPLING),
    "length_penalty": (finite, SAMPLING),
    "guidance_scale": (finite, SAMPLING),
    "max_new_tokens": (ints(1, TOTAL), {}),  # and prompt + max_new_tokens <= TOTAL (below)
}
EDGES = [0, 1, -1, 0.0, 1.0, 0.5, -0.0, 5, 6, 8, 9, TOTAL - 3, TOTAL - 2, TOTAL - 1, 2**64]
EDGES += [SEED_MIN - 1, SEED_MAX + 1, 1e-300, math.nextafter(1.0, 2.0), math.inf, -math.inf]
EDGES += [math.nan]
NUMBERS = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
)


@pytest.mark.parametrize("name", sorted(RANGES))
@PROPERTY
@given(value=NUMBERS)
def test_numeric_ranges(state: ServerState, name: str, value: float) -> None:
    valid, base = RANGES[name]
    ok = valid(value) and (name != "max_new_tokens" or value + prompt_len(state) <= TOTAL)
    params = {**base, name: value}
    expect(lambda: tgi(state, params), ok, name)
    if name not in CompletionRequest.model_fields:  # OpenAI's own fields: test_openai_fields
        extra = {"temperature": 1.0, "max_tokens": 8, name: value}  # as an extra body field
        vllm_no_top_k = name == "top_k" and value == -1  # /v1 reads it as vLLM does: top_k 0
        expect(lambda: openai(state, extra), ok or vllm_no_top_k, name)


@PROPERTY
@given(params=st.dictionaries(st.sampled_from(sorted(RANGES)), NUMBERS, max_size=4))
def test_few_shot_validates_as_generate(state: ServerState, params: dict[str, Any]) -> None:
    """Same options, same verdict and same field on /few-shot as on /generate (few-shot only
    adds its own max_new_tokens default)."""
    params = {"max_new_tokens": 8, **params}
    # The few-shot prompt is longer, so near the context limit only it may be too long.
    assume(not isinstance(params["max_new_tokens"], int) or params["max_new_tokens"] <= 128)
    # /generate follows TGI: a warper that is set turns sampling on (temperature 0: greedy);
    # few-shot keeps generate's rule, so it is asked for sampling explicitly.
    warpers = [
        n
        for n in ("temperature", "top_k", "top_p", "typical_p")
        if n in params and not (n == "temperature" and params[n] == 0)
    ]
    shot_params = {**params, "do_sample": True} if warpers else params

    def verdict(call: Callable[[], Any]) -> str | None:
        try:
            call()
        except APIError as err:
            assert err.status_code == 422
            return err.field
        return None

    assert verdict(lambda: tgi(state, params)) == verdict(lambda: few_shot(state, shot_params))


OPENAI_FIELDS: dict[str, tuple[Callable[[Any], bool], dict[str, Any]]] = {
    "temperature": (lambda x: finite(x) and x >= 0, {}),  # 0 = greedy
    "top_p": (unit(True, False), {}),
    "max_tokens": (ints(1, TOTAL), {}),
    "logprobs": (ints(0, 20), {}),
    "n": (ints(1, 8), {"temperature": 1.0, "max_tokens": 2}),
    "presence_penalty": (lambda x: finite(x) and -2 <= x <= 2, {}),
    "frequency_penalty": (lambda x: finite(x) and -2 <= x <= 2, {}),
    "seed": (ints(SEED_MIN, SEED_MAX), {}),
}


@pytest.mark.parametrize("name", sorted(OPENAI_FIELDS))
@PROPERTY
@given(value=NUMBERS)
def test_openai_fields(state: ServerState, name: str, value: float) -> None:
    valid, base = OPENAI_FIELDS[name]
    if name == "n" and is_int(value) and value > 8:
        return  # n > max_num_seqs is refused by the engine at admission, not here
    ok = valid(value) and (name != "max_tokens" or value + prompt_len(state) <= TOTAL)
    expect(lambda: openai(state, {**base, name: value}), ok, name)


@PROPERTY
@given(prompt_tokens=st.integers(1, TOTAL + 4), new_tokens=st.integers(1, TOTAL + 4))
def test_prompt_plus_new_tokens_fits_the_context(
    state: ServerState, prompt_tokens: int, new_tokens: int
) -> None:
    ids = [100] * prompt_tokens
    body = parse(GenerateRequest, {"input_ids": ids, "parameters": {"max_new_tokens": new_tokens}})
    if prompt_tokens > TOTAL - 1:  # state.max_input_tokens
        expect(lambda: routes_generate.prepare(state, body), False, "input_ids")
    else:
        valid = prompt_tokens + new_tokens <= TOTAL
        expect(lambda: routes_generate.prepare(state, body), valid, "max_new_tokens")


SCALAR_FIELDS = {
    name: field.annotation
    for name, field in GenerateParameters.model_fields.items()
    if field.annotation in (int | None, float | None, bool | None, str | None, bool, int)
}
WRONG_TYPES: dict[Any, st.SearchStrategy[Any]] = {
    "number": st.one_of(st.text(max_size=4), st.booleans(), st.lists(st.integers(), max_size=2)),
    "bool": st.one_of(st.integers(0, 1), st.text(max_size=5), st.just({})),
    "str": st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(), max_size=2)),
}


def kind(annotation: Any) -> str:
    text = str(annotation)
    if "bool" in text:
        return "bool"
    return "str" if "str" in text else "number"


@pytest.mark.parametrize("name", sorted(SCALAR_FIELDS))
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_wrong_json_types_name_the_field(state: ServerState, name: str, data: Any) -> None:
    """A string is never a number or a boolean, nor a number a string (strict models)."""
    value = data.draw(WRONG_TYPES[kind(SCALAR_FIELDS[name])])
    expect(lambda: tgi(state, {name: value}), False, name)


KNOWN = OPTION_NAMES | set(GenerateParameters.model_fields) | set(CompletionRequest.model_fields)


@PROPERTY
@given(name=st.text(min_size=1, max_size=12).filter(lambda n: n not in KNOWN and "." not in n))
def test_unknown_options_are_named(state: ServerState, name: str) -> None:
    expect(lambda: tgi(state, {name: 1}), False, name)
    expect(lambda: openai(state, {name: 1}), False, name)


@PROPERTY
@given(
    do_sample=st.booleans(),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 100),
    top_p=st.floats(0.01, 1.0),
    repetition_penalty=st.floats(0.5, 2.0),
    new_tokens=st.integers(1, 40),
    min_frac=st.floats(0.0, 1.0),
    beams=st.integers(1, 4),
    returned=st.integers(1, 4),
)
def test_valid_combinations_resolve_to_what_was_asked(
    state: ServerState,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    new_tokens: int,
    min_frac: float,
    beams: int,
    returned: int,
) -> None:
    returned = min(returned, beams) if beams > 1 or not do_sample else returned
    if beams == 1 and not do_sample:
        returned = 1
    options = {
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "max_new_tokens": new_tokens,
        "min_new_tokens": int(min_frac * new_tokens),
        "num_beams": beams,
        "num_return_sequences": returned,
    }
    params = few_shot(state, options)  # generate's rules
    got = {name: getattr(params, name) for name in options}
    assert got == options
    assert GenerateOptions.model_validate(options).engine_options() == options
    # /generate follows TGI: temperature (> 0 here) is set, so it samples, with a seed.
    params = tgi(state, options)
    got = {name: getattr(params, name) for name in options}
    assert got == {**options, "do_sample": True} and params.seed is not None
