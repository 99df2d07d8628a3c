"""Constrained beam search (Hokamp & Liu 2017; Post & Vilar 2018 "dynamic beam allocation"), a
port of transformers 4.x's `GenerationMixin._constrained_beam_search` for one prompt.

Beam search where, every step, each beam may also take the tokens that advance its
constraints (forced words, phrasal or one-of-several); the candidates are ranked in banks of
constraint progress and picked round-robin over the banks, so beams that fulfil more of the
constraints survive. A hypothesis may end (eos) only once every constraint is met. As in 4.x,
the constraints are tracked over the whole sequence, prompt included, and when no beam meets
them before max_length the best unconstrained beams are returned.
"""

from __future__ import annotations

import torch
from torch import nn

from app.engine.lanes.class_b.beam_scorer import ConstrainedBeamSearchScorer
from app.engine.lanes.class_b.common import (
    DEADLINE,
    BeamOutcome,
    MethodInputs,
    StepInterrupted,
    StepIterator,
    beam_prefill,
)
from app.engine.lanes.class_b.constraints import Constraint


def constrained_beam_search(inputs: MethodInputs, constraints: list[Constraint]) -> StepIterator:
    gc = inputs.generation_config
    num_beams = int(gc.num_beams)
    scorer = ConstrainedBeamSearchScorer(
        num_beams,
        constraints,
        gc.length_penalty,
        gc.early_stopping,
        int(gc.num_return_sequences or 1),
        int(gc.max_length),
        inputs.checkpoint,
    )
    eos, pad = inputs.eos_token_ids, inputs.pad_token_id
    n_eos = len(eos)
    device = inputs.device
    input_ids = inputs.prompt_tensor(num_beams)
    prompt_len = input_ids.shape[-1]
    beam_scores = torch.zeros((num_beams,), dtype=torch.float, device=device)
    beam_scores[1:] = -1e9  # one live beam until the first step fans out
    cache, logits = beam_prefill(inputs, num_beams)
    try:
        while True:
            next_token_scores = nn.functional.log_softmax(logits.clone().float(), dim=-1)
            processed = inputs.processors(input_ids, next_token_scores)
            next_token_scores = processed + beam_scores[:, None].expand_as(processed)
            scores_for_all_vocab = next_token_scores.clone()
            vocab_size = next_token_scores.shape[-1]
            next_token_scores = next_token_scores.view(1, num_beams * vocab_size)
            next_token_scores, next_tokens = torch.topk(
                next_token_scores, max(2, 1 + n_eos) * num_beams, dim=1, largest=True, sorted=True
            )
            next_indices = (next_tokens / vocab_size).long()
            next_tokens = next_tokens % vocab_size
            scores, tokens, beam_idx = yield from scorer.process(  # a pause per beam
                input_ids.cpu(),
                next_token_scores.cpu(),
                next_tokens.cpu(),
                next_indices.cpu(),
                scores_for_all_vocab.cpu(),
                pad,
                eos,
                prompt_len,
            )
            scores, tokens, beam_idx = scores.to(device), tokens.to(device), beam_idx.to(device)
            beam_scores, input_ids = (
                scores,
                torch.cat([input_ids[beam_idx, :], tokens[:, None]], -1),
            )
            cache.reorder_cache(beam_idx)
            if scorer.is_done or inputs.should_stop(input_ids):
                break
            yield None
            inputs.checkpoint()
            outputs = inputs.forward(tokens[:, None], cache)
            cache, logits = outputs.past_key_values, outputs.logits[:, -1, :]
            del outputs
    except StepInterrupted as stop:
        if stop.reason != DEADLINE:
            raise
        # max_time passed inside a step: the beams as the last whole step left them end the
        # search, as generate's MaxTimeCriteria ends it after a step.
    hypotheses = scorer.finalize(input_ids.cpu(), beam_scores.cpu(), prompt_len)
    yield BeamOutcome([(ids[prompt_len:], score) for ids, score in hypotheses])
