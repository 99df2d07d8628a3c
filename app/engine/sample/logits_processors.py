"""Per-request logits processors, batched over the rows that enable each, in HF's order.

transformers 5.23 `GenerationMixin._get_logits_processor` builds, for one request:
    sequence_bias, repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length,
    min_new_tokens, forced_bos_token_id, forced_eos_token_id, remove_invalid_values,
    exponential_decay_length_penalty, suppress_tokens, begin_suppress_tokens,
    [if do_sample: temperature, top_h, top_k, top_p, min_p, typical_p, epsilon, eta
     (logits_warpers.py)], watermarking_config, renormalize_logits.
OpenAI's frequency / presence penalties (no HF processor) run right after
repetition_penalty, where vLLM applies them (after its logit_bias, before the warpers).
`apply_processors` runs the part before the warpers, `apply_post` the part after. Each stage
touches only the rows that enable it and repeats HF's element-wise arithmetic exactly (same
float32 operations on the same values), so a row's scores are bit-identical to its own
`generate`. The watermark has no fast path: transformers' own WatermarkLogitsProcessor runs on
that row alone (`HFRowFallback`), so its hashing and generator semantics never drift.
`touched[i]` is set for a row whose scores a stage may have changed (it only decides whether
the processed log-probs need their own log_softmax).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.generation import WatermarkingConfig

from app.engine.sample.grammar_mask import apply_constraints

if TYPE_CHECKING:
    from app.engine.sample.row import SamplingRow
    from app.options.params import SamplingParams

# (batch row, its SamplingRow, its options) for every row whose `options` are set.
Extra = list[tuple[int, "SamplingRow", "SamplingParams"]]
_NEG_INF = float("-inf")
_F32 = np.float32


def _pairs(device: torch.device, rows: list[int], cols: list[int]) -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
    )


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _ban(scores: torch.Tensor, rows: list[int], cols: list[int]) -> None:
    """scores[row, col] = -inf (HF's masked_fill / where with -inf)."""
    if rows:
        scores.index_put_(_pairs(scores.device, rows, cols), _scalar(_NEG_INF, scores))


# -- biases: SequenceBiasLogitsProcessor and NoBadWordsLogitsProcessor ----------------------


def _bias_for_row(
    entries: dict[tuple[int, ...], float], token_ids: Sequence[int], vocab: int
) -> dict[int, Any]:
    """The non-zero entries of HF's float32 `bias` row, accumulated in HF's order."""
    bad = [t for seq in entries for t in seq if t >= vocab]
    if bad:  # SequenceBiasLogitsProcessor._prepare_bias_variables raises the same
        raise ValueError(f"The model vocabulary size is {vocab}, but tokens {bad} were biased")
    acc: dict[int, Any] = {}
    groups: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for seq, bias in entries.items():
        if len(seq) == 1:
            acc[seq[0]] = _F32(bias)  # bias = zeros + length_1_bias
        else:
            groups.setdefault(len(seq) - 1, []).append((seq, bias))
    n = len(token_ids)
    for plen, group in groups.items():  # one index_add_ per prefix length, in HF's order
        if plen > n:
            continue
        tail = tuple(token_ids[n - plen :])
        for seq, bias in group:
            if seq[:-1] == tail:
                acc[seq[-1]] = _F32(acc.get(seq[-1], _F32(0.0)) + _F32(bias))
    return acc


def _add_biases(
    scores: torch.Tensor,
    members: list[tuple[int, Sequence[int], dict[tuple[int, ...], float]]],
    touched: list[bool],
) -> None:
    r: list[int] = []
    c: list[int] = []
    v: list[float] = []
    for i, token_ids, entries in members:
        for tok, bias in _bias_for_row(entries, token_ids, scores.shape[-1]).items():
            r.append(i)
            c.append(tok)
            v.append(float(bias))
        touched[i] = True
    if r:
        at = _pairs(scores.device, r, c)
        scores[at] = scores[at] + torch.tensor(v, dtype=scores.dtype, device=scores.device)


def _sequence_bias(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    members = []
    for i, row, opts in extra:
        if opts.sequence_bias:  # list form -> dict as HF converts it (first position, last value)
            entries = {tuple(ids): float(b) for ids, b in _as_pairs(opts.sequence_bias)}
            members.append((i, row.token_ids, entries))
    _add_biases(scores, members, touched)


def _as_pairs(value: Any) -> list[tuple[Any, Any]]:
    return list(value.items()) if isinstance(value, dict) else [tuple(p) for p in value]


def _bad_words(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    members = []
    for i, row, opts in extra:
        if opts.bad_words_ids:  # NoBadWordsLogitsProcessor drops a 1-token bad word == an eos id
            eos = [[e] for e in row.eos_token_ids]
            kept = [w for w in opts.bad_words_ids if all(list(w) != e for e in eos)]
            members.append((i, row.token_ids, {tuple(w): _NEG_INF for w in kept}))
    _add_biases(scores, members, touched)


# -- penalties and bans ---------------------------------------------------------------------


def _repetition_penalty(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    vocab = scores.shape[-1]
    by_value: dict[float, tuple[list[int], list[int]]] = {}
    for i, row, opts in extra:
        penalty = opts.repetition_penalty
        if penalty != 1.0:
            r, c = by_value.setdefault(penalty, ([], []))
            ids = [t for t in set(row.token_ids) if t < vocab]  # HF drops ids past the head
            r += [i] * len(ids)
            c += ids
            touched[i] = True
    # One group per distinct penalty, divided by the Python float as HF does (on CUDA a
    # tensor / scalar is a multiplication by the reciprocal, which a tensor divisor is not).
    for penalty, (r, c) in by_value.items():
        at = _pairs(scores.device, r, c)
        score = scores[at]
        scores[at] = torch.where(score < 0, score * penalty, score / penalty)


def _penalties(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    """OpenAI's frequency and presence penalties as vLLM applies them (`apply_penalties`,
    vllm/model_executor/layers/utils.py), over each row's own generated tokens (not the
    prompt; n > 1 siblings and verified drafts count their own):
        logits -= frequency_penalty * count;  logits -= presence_penalty * (count > 0)
    in the scores' float32, the penalty as a float32 tensor times the count, two subtractions
    as vLLM does. vLLM runs them right after its repetition penalty, so here they follow HF's
    RepetitionPenaltyLogitsProcessor (after sequence_bias, vLLM's logit_bias too)."""
    vocab = scores.shape[-1]
    r: list[int] = []
    c: list[int] = []
    counts: list[int] = []
    freq: list[float] = []
    pres: list[float] = []
    for i, row, opts in extra:
        if not opts.has_penalties:
            continue
        output = Counter(row.token_ids[row.prompt_len :])
        for tok, count in output.items():
            if 0 <= tok < vocab:
                r.append(i)
                c.append(tok)
                counts.append(count)
                freq.append(opts.frequency_penalty)
                pres.append(opts.presence_penalty)
        touched[i] = True
    if not r:
        return
    at = _pairs(scores.device, r, c)

    def column(values: list[float] | list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=scores.dtype, device=scores.device)

    penalized = scores[at] - column(freq) * column(counts)
    scores[at] = penalized - column(pres)


def _no_repeat_ngram(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    vocab = scores.shape[-1]
    r: list[int] = []
    c: list[int] = []
    for i, row, opts in extra:
        n = opts.no_repeat_ngram_size
        ids = row.token_ids
        if n <= 0 or len(ids) < n:
            continue
        # Every earlier window whose first n-1 tokens equal the current suffix bans its last.
        prefix = list(ids[len(ids) - n + 1 :])
        banned = {
            ids[s + n - 1] for s in range(len(ids) - n + 1) if list(ids[s : s + n - 1]) == prefix
        }
        for tok in banned:
            if tok < vocab:
                r.append(i)
                c.append(tok)
        touched[i] = True
    _ban(scores, r, c)


def _min_length(scores: torch.Tensor, rows: Sequence[SamplingRow], touched: list[bool]) -> None:
    """MinLengthLogitsProcessor / MinNewTokensLengthLogitsProcessor for every row."""
    vocab = scores.shape[-1]
    r: list[int] = []
    c: list[int] = []
    for i, row in enumerate(rows):
        if row.bans_eos:
            for eos in row.eos_token_ids:
                if 0 <= eos < vocab:  # HF's isin() ignores ids outside the vocab
                    r.append(i)
                    c.append(eos)
            touched[i] = True
    _ban(scores, r, c)


def _force(scores: torch.Tensor, forced: list[tuple[int, list[int]]], touched: list[bool]) -> None:
    """ForcedBOS/ForcedEOS: the row becomes -inf except 0 at the forced ids."""
    if not forced:
        return
    r = [i for i, _ in forced]
    scores[torch.tensor(r, device=scores.device)] = _NEG_INF
    fr = [i for i, ids in forced for _ in ids]
    fc = [t for _, ids in forced for t in ids]
    scores.index_put_(_pairs(scores.device, fr, fc), _scalar(0.0, scores))
    for i in r:
        touched[i] = True


def _forced_tokens(extra: Extra) -> tuple[list, list]:
    bos: list[tuple[int, list[int]]] = []
    eos: list[tuple[int, list[int]]] = []
    for i, row, opts in extra:
        n = len(row.token_ids)
        if opts.forced_bos_token_id is not None and n == 1:
            bos.append((i, [opts.forced_bos_token_id]))
        forced = opts.forced_eos_token_id
        if forced is not None and n == row.max_length - 1:
            eos.append((i, [forced] if isinstance(forced, int) else list(forced)))
    return bos, eos


def _remove_invalid(scores: torch.Tensor, members: list[int], touched: list[bool]) -> None:
    """InfNanRemoveLogitsProcessor: nan -> 0, +-inf -> the dtype's max / min."""
    if not members:
        return
    idx = torch.tensor(members, device=scores.device)
    sub = scores[idx]
    info = torch.finfo(sub.dtype)
    out = torch.where(sub != sub, 0.0, sub)
    out = torch.where(sub == float("inf"), info.max, out)
    scores[idx] = torch.where(sub == _NEG_INF, info.min, out)
    for i in members:
        touched[i] = True


def _exp_decay(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    """ExponentialDecayLengthPenalty: eos += |eos| * (factor ** steps - 1) past the start."""
    vocab = scores.shape[-1]
    r: list[int] = []
    c: list[int] = []
    m: list[float] = []
    for i, row, opts in extra:
        decay = opts.exponential_decay_length_penalty
        if decay is None:
            continue
        start = decay[0] + row.prompt_len
        cur = len(row.token_ids)
        if cur <= start or not row.eos_token_ids:
            continue
        factor = pow(decay[1], cur - start) - 1  # Python float, as HF; cast to float32 by torch
        for eos in dict.fromkeys(row.eos_token_ids):
            if eos < vocab:
                r.append(i)
                c.append(eos)
                m.append(factor)
        touched[i] = True
    if r:
        at = _pairs(scores.device, r, c)
        eos_scores = scores[at]
        factors = torch.tensor(m, dtype=scores.dtype, device=scores.device)
        penalty = torch.abs(eos_scores) * factors
        penalty = penalty.masked_fill(~torch.isfinite(eos_scores), 0.0)
        scores[at] = eos_scores + penalty


def _suppress(scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
    """SuppressTokensLogitsProcessor, and SuppressTokensAtBeginLogitsProcessor at begin_index."""
    vocab = scores.shape[-1]
    r: list[int] = []
    c: list[int] = []
    for i, row, opts in extra:
        tokens = list(opts.suppress_tokens or ())
        begin = opts.begin_suppress_tokens
        if begin:
            # HF: begin_index = prompt length, + 1 when a 1-token prompt gets a forced bos first.
            forced_bos = opts.forced_bos_token_id is not None
            index = row.prompt_len + (1 if row.prompt_len <= 1 and forced_bos else 0)
            if len(row.token_ids) == index:
                tokens += begin
        for tok in dict.fromkeys(tokens):
            if 0 <= tok < vocab:  # isin() over the vocab ignores the rest
                r.append(i)
                c.append(tok)
        touched[i] = touched[i] or bool(tokens)
    _ban(scores, r, c)


def apply_processors(
    scores: torch.Tensor, rows: Sequence[SamplingRow], extra: Extra, touched: list[bool]
) -> None:
    """Everything before the warpers, in place, on the [S, V] float32 scores."""
    if extra:
        _sequence_bias(scores, extra, touched)
        _repetition_penalty(scores, extra, touched)
        _penalties(scores, extra, touched)
        _no_repeat_ngram(scores, extra, touched)
        _bad_words(scores, extra, touched)
    _min_length(scores, rows, touched)
    apply_constraints(scores, rows, touched)  # prefix_allowed_tokens_fn's place in HF's order
    if not extra:
        return
    bos, eos = _forced_tokens(extra)
    _force(scores, bos, touched)
    _force(scores, eos, touched)
    _remove_invalid(scores, [i for i, _, opts in extra if opts.remove_invalid_values], touched)
    _exp_decay(scores, extra, touched)
    _suppress(scores, extra, touched)


class HFRowFallback:
    """Options without a fast path: transformers' own processor on that row's [1, V] scores."""

    def __init__(self, max_cached: int = 8) -> None:
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._max_cached = max_cached  # a watermark processor holds an 8 MB hashing table

    def _watermark_processor(self, cfg: dict[str, Any], vocab: int, device: torch.device) -> Any:
        key = ("watermark", tuple(sorted(cfg.items())), vocab, str(device))
        proc = self._cache.get(key)
        if proc is None:
            # What generate builds: construct_processor(config.vocab_size, device).
            proc = WatermarkingConfig(**cfg).construct_processor(vocab, device)
            self._cache[key] = proc
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return proc

    def watermark(self, scores: torch.Tensor, extra: Extra, touched: list[bool]) -> None:
        for i, row, opts in extra:
            cfg = opts.watermarking_config
            if cfg is None:
                continue
            proc = self._watermark_processor(cfg, scores.shape[-1], scores.device)
            ids = torch.tensor([list(row.token_ids)], dtype=torch.long, device=scores.device)
            scores[i : i + 1] = proc(ids, scores[i : i + 1])
            touched[i] = True


def apply_post(
    scores: torch.Tensor, extra: Extra, touched: list[bool], fallback: HFRowFallback
) -> None:
    """After the warpers: the watermark, then LogitNormalization (always last)."""
    fallback.watermark(scores, extra, touched)
    norm = [i for i, _, opts in extra if opts.renormalize_logits]
    if norm:
        idx = torch.tensor(norm, device=scores.device)
        scores[idx] = scores[idx].log_softmax(dim=-1)
        for i in norm:
            touched[i] = True
