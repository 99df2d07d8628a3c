"""The class-B options, validated with transformers 4.x's rules (no torch).

penalty_alpha (contrastive search), num_beam_groups + diversity_penalty (group beam search),
dola_layers (DoLa), constraints / force_words_ids and our `force_words` strings (constrained
beam search). `resolve_class_b` runs after `resolve_sampling_params` (the other options are
already resolved) and returns a `ClassBParams`: the request's SamplingParams plus the method.

Which method a request asks for follows 4.x's `GenerationConfig.get_generation_mode`;
4.x's `validate` and the methods' own checks become 422s naming the field. Departures, all
stricter: 4.x silently ignores penalty_alpha when sampling or with beams, and diversity_penalty
without groups (or fails later); here those are 422s, as are two methods in one request,
penalty_alpha outside [0, 1], dola_layers indices outside [0, n_layer) (4.x drops the large
ones) and DoLa with num_return_sequences > 1 (4.x returns one sequence).
Neutral values (penalty_alpha 0, num_beam_groups 1, diversity_penalty 0) mean "omitted".
JSON form of `constraints`: {"type": "phrasal", "token_ids": [...]} (these tokens, in order)
or {"type": "disjunctive", "nested_token_ids": [[...], ...]} (one of these sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from app.options.checks import ParamValidationError, is_int
from app.options.checks import finite as _finite
from app.options.params import SamplingParams
from app.options.registry import CLASS_B, names, option_range

CLASS_B_OPTIONS = names(lane=CLASS_B)
CONTRASTIVE, GROUP_BEAM, DOLA, CONSTRAINED = "contrastive", "group_beam", "dola", "constrained_beam"
_METHOD_FIELD = {
    CONTRASTIVE: "penalty_alpha",
    GROUP_BEAM: "num_beam_groups",
    DOLA: "dola_layers",
    CONSTRAINED: "force_words_ids",
}


@dataclass(frozen=True)
class ClassBOptions:
    method: str  # CONTRASTIVE, GROUP_BEAM, DOLA or CONSTRAINED
    penalty_alpha: float = 0.0
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    dola_layers: str | tuple[int, ...] | None = None
    # Constrained beam search: `constraints` first, then force words (4.x's order), JSON form.
    constraints: tuple[dict[str, Any], ...] = ()


@dataclass
class ClassBParams(SamplingParams):
    """A request's options when it asks for a class-B method (engine/lanes/class_b/runner.py)."""

    class_b: ClassBOptions | None = None


def _token_list(name: str, value: Any, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not value or not all(is_int(t) and t >= 0 for t in value):
        raise ParamValidationError(
            name, f"`{name}`: every word must be a non-empty list of token ids >= 0, got {value!r}"
        )
    if vocab_size is not None and max(value) >= vocab_size:
        raise ParamValidationError(name, f"`{name}`: token ids must be < {vocab_size}")
    return list(value)


def _disjunctive(name: str, value: Any, vocab_size: int | None) -> dict[str, Any]:
    if not isinstance(value, list) or not value:
        raise ParamValidationError(name, f"`{name}`: a one-of list must be non-empty")
    nested = [_token_list(name, ids, vocab_size) for ids in value]
    for i, a in enumerate(nested):  # 4.x's DisjunctiveTrie refuses prefixes
        for j, b in enumerate(nested):
            if i != j and b[: len(a)] == a:
                raise ParamValidationError(
                    name, f"`{name}`: alternative {a} is a prefix of {b}; none may be"
                )
    return {"type": "disjunctive", "nested_token_ids": nested}


def _force_words_ids(value: Any, vocab_size: int | None) -> list[dict[str, Any]]:
    """4.x's shapes: list[list[int]] (phrasal words) and list[list[list[int]]] (one-of)."""
    name = "force_words_ids"
    if not isinstance(value, list) or not value:
        raise ParamValidationError(
            name,
            f"`{name}` must be a non-empty list of words (list[list[int]]) or one-of lists "
            f"(list[list[list[int]]]), got {value!r}",
        )
    out = []
    for word in value:
        if isinstance(word, list) and word and isinstance(word[0], list):
            out.append(_disjunctive(name, word, vocab_size))
        else:
            out.append({"type": "phrasal", "token_ids": _token_list(name, word, vocab_size)})
    return out


def _force_words(value: Any, encode: Callable[[str], list[int]] | None) -> list[Any]:
    """Strings -> force_words_ids (a list of strings in the list is a one-of word)."""
    name = "force_words"
    if encode is None:
        raise ParamValidationError(name, "`force_words` needs the tokenizer")
    if not isinstance(value, list) or not value:
        raise ParamValidationError(name, f"`{name}` must be a non-empty list, got {value!r}")

    def ids(word: Any) -> list[int]:
        tokens = encode(word) if isinstance(word, str) and word else []
        if not tokens:
            raise ParamValidationError(name, f"`{name}`: {word!r} is not a non-empty string")
        return tokens

    return [[ids(w) for w in word] if isinstance(word, list) else ids(word) for word in value]


def _constraints(value: Any, vocab_size: int | None) -> list[dict[str, Any]]:
    name = "constraints"
    if not isinstance(value, list):
        raise ParamValidationError(name, f"`{name}` must be a list, got {value!r}")
    out = []
    for spec in value:
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "phrasal" and set(spec) == {"type", "token_ids"}:
            out.append(
                {"type": kind, "token_ids": _token_list(name, spec["token_ids"], vocab_size)}
            )
        elif kind == "disjunctive" and set(spec) == {"type", "nested_token_ids"}:
            out.append(_disjunctive(name, spec["nested_token_ids"], vocab_size))
        else:
            raise ParamValidationError(
                name,
                f'`{name}`: each item must be {{"type": "phrasal", "token_ids": [...]}} or '
                f'{{"type": "disjunctive", "nested_token_ids": [[...], ...]}}, got {spec!r}',
            )
    return out


def _dola_layers(value: Any, num_layers: int) -> str | tuple[int, ...]:
    if value in ("low", "high"):
        return str(value)
    if isinstance(value, list) and value and all(is_int(i) and 0 <= i < num_layers for i in value):
        return tuple(value)
    raise ParamValidationError(
        "dola_layers",
        f'`dola_layers` must be "low", "high" or a non-empty list of layer indices in '
        f"[0, {num_layers}) (0 = the embeddings), got {value!r}",
    )


def _methods(given: dict[str, Any], constraints: list[dict[str, Any]]) -> list[str]:
    methods = []
    if given.get("penalty_alpha", 0.0) > 0:
        methods.append(CONTRASTIVE)
    if given.get("num_beam_groups", 1) != 1 or given.get("diversity_penalty", 0.0) != 0:
        methods.append(GROUP_BEAM)
    if given.get("dola_layers") is not None:
        methods.append(DOLA)
    if constraints:
        methods.append(CONSTRAINED)
    return methods


def _check(method: str, opts: dict[str, Any], p: SamplingParams, vocab: int | None) -> None:
    """4.x's cross-field rules for the method (each failure names the field to change)."""

    def fail(name: str, message: str) -> None:
        raise ParamValidationError(name, message)

    if method == CONTRASTIVE:
        if p.do_sample:
            fail("penalty_alpha", "contrastive search (`penalty_alpha` > 0) needs do_sample=false")
        if p.num_beams != 1:
            fail("penalty_alpha", "contrastive search (`penalty_alpha` > 0) needs num_beams = 1")
        if p.top_k <= 1 or (vocab is not None and p.top_k > vocab):
            limit = f"[2, {vocab}]" if vocab is not None else ">= 2"
            fail("top_k", f"contrastive search needs `top_k` in {limit} (got {p.top_k})")
    elif method == GROUP_BEAM:
        groups, penalty = opts["num_beam_groups"], opts["diversity_penalty"]
        if groups == 1:
            fail("diversity_penalty", "`diversity_penalty` needs num_beam_groups > 1")
        if p.num_beams == 1 or p.num_beams % groups != 0:
            fail(
                "num_beam_groups",
                f"`num_beam_groups` ({groups}) must divide num_beams ({p.num_beams}), and "
                "group beam search needs num_beams > 1",
            )
        if p.do_sample:
            fail("do_sample", "group beam search (`num_beam_groups` > 1) needs do_sample=false")
        if not penalty > 0:
            fail(
                "diversity_penalty",
                f"group beam search needs `diversity_penalty` > 0 (got {penalty}); "
                "otherwise the groups are identical",
            )
    elif method == DOLA:
        if p.num_beams != 1:
            fail("dola_layers", "DoLa (`dola_layers`) needs num_beams = 1 (greedy or sampling)")
        if p.num_return_sequences != 1:
            fail("num_return_sequences", "DoLa returns one sequence: set num_return_sequences=1")
    else:
        if p.num_beams == 1:
            fail(opts["field"], "constrained beam search needs num_beams > 1")
        if p.do_sample:
            fail("do_sample", "constrained beam search needs do_sample=false")


def constraint_tokens(constraints: list[dict[str, Any]]) -> int:
    """Every token id the constraints list: each phrase's, each alternative's."""
    total = 0
    for c in constraints:
        if c["type"] == "phrasal":
            total += len(c["token_ids"])
        else:
            total += sum(len(ids) for ids in c["nested_token_ids"])
    return total


def _check_constraint_work(
    field: str, constraints: list[dict[str, Any]], num_beams: int, limit: int | None
) -> None:
    """Constrained beam search tracks every beam's progress through every constraint each
    step: its work grows with constraint tokens x beams (50 words x 50 alternatives x 5 tokens
    with 4 beams took 11 GB and minutes; 30 single tokens with 256 beams, over 300 s)."""
    if limit is None:
        return
    work = constraint_tokens(constraints) * num_beams
    if work > limit:
        raise ParamValidationError(
            field,
            f"`{field}` asks for {constraint_tokens(constraints)} constraint tokens x "
            f"{num_beams} beams = {work}; at most {limit} (--max-constraint-work)",
        )


def candidate_layers(dola_layers: str | list[int], num_layers: int, tied: bool) -> list[int]:
    """4.x's choice of DoLa's premature layers. Index 0 is the embeddings' output; with tied
    word embeddings it is skipped ("low" starts at 2, or lower for models of <= 2 layers).
    For N <= 40 layers, "low" is range(start, N // 2, 2) and "high" range(N // 2, N, 2)."""
    if not tied:
        start = 0
    elif num_layers > 2:
        start = 2
    elif num_layers == 2:
        start = 1
    else:
        start = 0
    if dola_layers == "low":
        if start == num_layers // 2:
            return [start]
        end = num_layers // 2 if num_layers <= 40 else 20
        return list(range(start, end, 2))
    if dola_layers == "high":
        first = num_layers // 2 if num_layers <= 40 else num_layers - 20
        return list(range(first, num_layers, 2))
    if isinstance(dola_layers, list):
        return [i for i in dola_layers if i < num_layers]
    raise ValueError("dola_layers must be either 'low', 'high' or a list of integers.")


@dataclass(frozen=True)
class MethodLimits:
    """The most work per decoding step a class-B method may ask for (None: no limit)."""

    constraint_work: int | None = None  # constraint tokens x num_beams (--max-constraint-work)
    contrastive_work: int | None = None  # top_k x positions (--max-contrastive-work)
    dola_work: int | None = None  # premature layers x vocab (--max-dola-work)


def _refuse_past(field: str, work: int, what: str, limit: int | None, flag: str) -> None:
    if limit is not None and work > limit:
        raise ParamValidationError(
            field, f"`{field}` asks for {what} = {work}; at most {limit} ({flag})"
        )


def _check_method_work(
    method: str,
    opts: dict[str, Any],
    params: SamplingParams,
    prompt_len: int,
    num_layers: int,
    vocab_size: int | None,
    limits: MethodLimits,
) -> None:
    """Each method's work per step, priced before it reaches the engine.

    Contrastive search copies the KV cache once per top_k candidate and runs a forward of
    top_k rows every step: top_k x positions (prompt + new tokens). DoLa applies the LM head
    to every premature layer and contrasts a vocabulary row per listed layer every step:
    layers x vocab logits (a list may repeat a layer)."""
    if method == CONTRASTIVE:
        positions = params.stop_length(prompt_len)
        work = params.top_k * max(params.num_beams, params.num_return_sequences) * positions
        what = f"top_k {params.top_k} x {positions} positions (prompt + new tokens)"
        _refuse_past("top_k", work, what, limits.contrastive_work, "--max-contrastive-work")
    elif method == DOLA and vocab_size is not None:
        layers = opts["dola_layers"]
        chosen = list(layers) if isinstance(layers, tuple) else layers
        count = len(candidate_layers(chosen, num_layers, tied=False))  # untied: the most
        what = f"{count} premature layers x {vocab_size} vocabulary logits per step"
        _refuse_past("dola_layers", count * vocab_size, what, limits.dola_work, "--max-dola-work")


def resolve_class_b(
    options: Mapping[str, Any],
    params: SamplingParams,
    *,
    num_layers: int,
    vocab_size: int | None = None,
    encode: Callable[[str], list[int]] | None = None,
    max_constraint_work: int | None = None,
    prompt_len: int = 0,
    limits: MethodLimits | None = None,
) -> SamplingParams:
    """`params` itself when no class-B method is asked for, else a validated ClassBParams.
    `max_constraint_work`: the most constraint tokens x beams a constrained beam search may
    take (None: no limit; `limits.constraint_work` when given). `limits`: every method's
    work per step, `prompt_len` the prompt it runs on (contrastive search's positions)."""
    limits = limits or MethodLimits(constraint_work=max_constraint_work)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(CLASS_B_OPTIONS)
    if unknown:
        name = sorted(unknown)[0]
        raise ParamValidationError(name, f"`{name}` is not a class-B option")
    opts: dict[str, Any] = {"num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": 0.0}
    if "penalty_alpha" in given:
        alpha = option_range("penalty_alpha").check_float("penalty_alpha", given["penalty_alpha"])
        opts["penalty_alpha"] = given["penalty_alpha"] = alpha
    if "num_beam_groups" in given:
        opts["num_beam_groups"] = option_range("num_beam_groups").check_int(
            "num_beam_groups", given["num_beam_groups"]
        )
    if "diversity_penalty" in given:
        opts["diversity_penalty"] = _finite("diversity_penalty", given["diversity_penalty"])
    if "dola_layers" in given:
        opts["dola_layers"] = _dola_layers(given["dola_layers"], num_layers)
    constraints = _constraints(given["constraints"], vocab_size) if "constraints" in given else []
    words: list[Any] = list(given.get("force_words_ids") or [])
    opts["field"] = "force_words_ids" if words else "constraints"
    if "force_words" in given:
        words += _force_words(given["force_words"], encode)
        opts["field"] = "force_words"
    if words or "force_words_ids" in given:
        constraints += _force_words_ids(words, vocab_size)
    methods = _methods(given, constraints)
    if not methods:
        return params
    named = {**_METHOD_FIELD, CONSTRAINED: opts["field"]}  # the field the caller used
    if len(methods) > 1:
        first, second = (named[m] for m in methods[:2])
        raise ParamValidationError(
            second, f"`{second}` and `{first}` select different decoding methods; use one"
        )
    method = methods[0]
    _check(method, opts, params, vocab_size)
    if method == CONSTRAINED:
        _check_constraint_work(opts["field"], constraints, params.num_beams, limits.constraint_work)
    _check_method_work(method, opts, params, prompt_len, num_layers, vocab_size, limits)
    for name in ("grammar", "allowed_token_ids"):  # token constraints of the batched engine
        if getattr(params, name, None) is not None:
            raise ParamValidationError(
                name, f"`{name}` is not combined with `{named[method]}` (class B)"
            )
    chosen = ClassBOptions(
        method=method,
        penalty_alpha=opts["penalty_alpha"],
        num_beam_groups=opts["num_beam_groups"],
        diversity_penalty=opts["diversity_penalty"],
        dola_layers=opts.get("dola_layers"),
        constraints=tuple(constraints),
    )
    base = {f.name: getattr(params, f.name) for f in fields(SamplingParams)}
    return ClassBParams(**base, class_b=chosen)
