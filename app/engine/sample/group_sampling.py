"""Assemble one batched sampler call from many requests' rows (num_return_sequences aware).

A request with n > 1 sampled sequences contributes n rows: on its first token the prompt's
logits row n times (generate prefills n copies), later one row per sibling, and a dummy
row for a finished sibling when seeded, so its generator advances exactly as generate's
batched `multinomial` does (per-row draws in row order equal one batched draw).
"""

from __future__ import annotations

from typing import Any

import torch

from app.engine.core.request import Sequence
from app.engine.outputs import GeneratedToken
from app.engine.request_state import RequestState
from app.engine.sample.row import SamplingRow
from app.engine.sample.sampler import SampleLaunch, Sampler, SamplerOutput


def sampling_rows(
    state: RequestState, logits: torch.Tensor, rows: dict[int, int], dummy_row: int
) -> tuple[list[Sequence], list[SamplingRow], list[int]]:
    """One request's sequences, sampler rows and logits row indices, in sibling order.

    A guidance companion (negative prompt) is not sampled: its logits row rides along
    on the rows it guides."""
    request, params = state.request, state.params
    seqs: list[Sequence] = []
    sampler_rows: list[SamplingRow] = []
    logit_rows: list[int] = []
    companion = state.companion
    siblings = [s for s in request.seqs if s is not companion]
    if len(siblings) == 1 and params.num_return_sequences > 1:
        siblings = [siblings[0]] * params.num_return_sequences
    for seq in siblings:
        if seq.is_finished and state.generator is None:
            continue
        seqs.append(seq)
        row = SamplingRow.from_params(params, seq.token_ids, seq.prompt_len, state.generator)
        if not seq.is_finished:  # a finished sibling's dummy row draws unconstrained
            row.constraint = state.sequences[seq.seq_id].constraint
        if companion is not None:
            row.guidance_scale = params.guidance_scale
            row.uncond_logits = logits[rows[companion.seq_id]]
        sampler_rows.append(row)
        logit_rows.append(dummy_row if seq.is_finished else rows[seq.seq_id])
    return seqs, sampler_rows, logit_rows


def sample_groups(
    sampler: Sampler,
    logits: torch.Tensor,
    plain: list[tuple[RequestState, dict[int, int]]],
    failed: dict[str, Exception],
) -> list[tuple[RequestState, list[Sequence], list[GeneratedToken]]]:
    """One batched sampler call for all requests; if it raises, requests are retried one by
    one so the failing one is isolated (recorded in `failed`). Dummy rows are dropped."""
    if not plain:
        return []
    dummy = logits.shape[0]  # the index of a zero row appended when a dummy row needs it
    built = []
    for state, rows in plain:
        try:
            built.append((state, *sampling_rows(state, logits, rows, dummy)))
        except Exception as err:
            failed[state.request.request_id] = err
    return sample_built(sampler, logits, built, failed)


def sample_built(
    sampler: Sampler,
    logits: torch.Tensor,
    built: list[tuple[RequestState, list[Sequence], list[SamplingRow], list[int]]],
    failed: dict[str, Exception],
) -> list[tuple[RequestState, list[Sequence], list[GeneratedToken]]]:
    """sample_groups' sampler call over rows already built (state, sequences, sampler
    rows, logits rows): batched, or one request at a time when the batch raises."""
    if not built:
        return []
    chunks: list[list[tuple[Any, ...]]] = [built]
    try:
        results = [sample_chunk(sampler, logits, built)]
    except Exception:
        chunks, results = [], []
        for one in built:
            try:
                results.append(sample_chunk(sampler, logits, [one]))
                chunks.append([one])
            except Exception as err:
                failed[one[0].request.request_id] = err
    out = []
    for chunk, picks in zip(chunks, results, strict=True):
        offset = 0
        for state, seqs, _rows, _logit_rows in chunk:
            keep = [i for i in range(len(seqs)) if not seqs[i].is_finished]
            out.append((state, [seqs[i] for i in keep], [picks[offset + i] for i in keep]))
            offset += len(seqs)
    return out


def sample_chunk(
    sampler: Sampler, logits: torch.Tensor, chunk: list[tuple[Any, ...]]
) -> list[GeneratedToken]:
    return generated_tokens(sampler.sample(*chunk_rows(logits, chunk)))


def launch_chunk(
    sampler: Sampler, logits: torch.Tensor, chunk: list[tuple[Any, ...]]
) -> SampleLaunch:
    """sample_chunk's sampler call, launched (Sampler.launch): its results read later."""
    return sampler.launch(*chunk_rows(logits, chunk))


def chunk_rows(
    logits: torch.Tensor, chunk: list[tuple[Any, ...]]
) -> tuple[torch.Tensor, list[SamplingRow]]:
    """The chunk's logits rows (a zero row for dummy rows) and its sampler rows."""
    rows = [r for _state, _seqs, sampler_rows, _lr in chunk for r in sampler_rows]
    index = [i for *_rest, logit_rows in chunk for i in logit_rows]
    if index == list(range(logits.shape[0])):
        return logits, rows  # the sampler copies before it changes anything
    if logits.shape[0] in index:  # a dummy row: zeros
        logits = torch.cat([logits, logits.new_zeros(1, logits.shape[1])])
    return logits.index_select(0, torch.tensor(index, device=logits.device)), rows


def generated_tokens(res: SamplerOutput) -> list[GeneratedToken]:
    """A sampler call's rows as the engine's tokens."""
    n = len(res.token_ids)
    top_ids = res.top_token_ids or [[] for _ in range(n)]
    top_lps = res.top_logprobs or [[] for _ in range(n)]
    lps = res.processed_logprobs or res.logprobs
    return [
        GeneratedToken(res.token_ids[i], lps[i], list(zip(top_ids[i], top_lps[i], strict=True)))
        for i in range(n)
    ]
