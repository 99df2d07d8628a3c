"""Group (diverse) beam search (Vijayakumar et al. 2016, "Diverse Beam Search"), a port of
transformers 4.x's `GenerationMixin._group_beam_search` for one prompt.

The beams form `num_beam_groups` groups that take turns within a step: group g searches over
its own beams as ordinary beam search, after subtracting `diversity_penalty` times the number
of times each token was already chosen by groups 0..g-1 at this step (4.x's
HammingDiversityLogitsProcessor, applied in generate's processor order: after sequence_bias,
before repetition_penalty). Hypotheses from every group compete for the returned sequences.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LogitsProcessorList, SequenceBiasLogitsProcessor

from app.engine.lanes.class_b.beam_scorer import BeamSearchScorer
from app.engine.lanes.class_b.common import (
    DEADLINE,
    BeamOutcome,
    MethodInputs,
    StepInterrupted,
    StepIterator,
    beam_prefill,
)


class HammingDiversityLogitsProcessor:
    """4.x's HammingDiversityLogitsProcessor for one prompt."""

    def __init__(self, diversity_penalty: float, num_beams: int, num_beam_groups: int) -> None:
        self.diversity_penalty = diversity_penalty
        self.num_beams = num_beams
        self.num_sub_beams = num_beams // num_beam_groups

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        current_tokens: torch.Tensor,
        beam_group_idx: int,
    ) -> torch.Tensor:
        group_start_idx = beam_group_idx * self.num_sub_beams
        if group_start_idx == 0:
            return scores
        previous_group_tokens = current_tokens[:group_start_idx]  # this step's earlier groups
        frequency = torch.bincount(previous_group_tokens, minlength=scores.shape[-1])
        return scores - self.diversity_penalty * frequency.to(scores.device)


def with_diversity(
    processors: LogitsProcessorList, hamming: HammingDiversityLogitsProcessor
) -> LogitsProcessorList:
    """generate 4.x's order: guidance and sequence_bias come first, then the diversity
    penalty, then everything else (repetition_penalty, n-gram bans, ...)."""
    head = 0
    while head < len(processors) and isinstance(processors[head], SequenceBiasLogitsProcessor):
        head += 1
    return LogitsProcessorList([*processors[:head], hamming, *processors[head:]])


def group_beam_search(
    inputs: MethodInputs, num_beam_groups: int, diversity_penalty: float
) -> StepIterator:
    gc = inputs.generation_config
    num_beams = int(gc.num_beams)
    group_size = num_beams // num_beam_groups
    scorer = BeamSearchScorer(
        num_beams,
        num_beam_groups,
        gc.length_penalty,
        gc.early_stopping,
        int(gc.num_return_sequences or 1),
        int(gc.max_length),
    )
    hamming = HammingDiversityLogitsProcessor(diversity_penalty, num_beams, num_beam_groups)
    processors = with_diversity(inputs.processors, hamming)
    eos, pad = inputs.eos_token_ids, inputs.pad_token_id
    n_eos = len(eos)
    device = inputs.device
    input_ids = inputs.prompt_tensor(num_beams)
    prompt_len = input_ids.shape[-1]
    beam_scores = torch.full((num_beams,), -1e9, dtype=torch.float, device=device)
    beam_scores[::group_size] = 0  # the first beam of every group starts live
    cache, logits = beam_prefill(inputs, num_beams)
    while True:
        current_tokens = torch.zeros(num_beams, dtype=input_ids.dtype, device=device)
        reordering_indices = torch.zeros(num_beams, dtype=torch.long, device=device)
        for group in range(num_beam_groups):
            start = group * group_size
            rows = list(range(start, start + group_size))
            group_input_ids = input_ids[rows]
            next_token_scores = nn.functional.log_softmax(logits[rows].float(), dim=-1)
            vocab_size = next_token_scores.shape[-1]
            processed = processors(
                group_input_ids,
                next_token_scores,
                current_tokens=current_tokens,
                beam_group_idx=group,
            )
            next_token_scores = processed + beam_scores[rows].unsqueeze(-1)
            next_token_scores = next_token_scores.view(1, group_size * vocab_size)
            next_token_scores, next_tokens = torch.topk(
                next_token_scores, max(2, 1 + n_eos) * group_size, dim=1, largest=True, sorted=True
            )
            next_indices = torch.div(next_tokens, vocab_size, rounding_mode="floor")
            next_tokens = next_tokens % vocab_size
            scores, tokens, beam_idx = scorer.process(
                group_input_ids.cpu(),
                next_token_scores.cpu(),
                next_tokens.cpu(),
                next_indices.cpu(),
                pad,
                eos,
                group,
                prompt_len,
            )
            beam_idx = beam_idx.to(device)
            beam_scores[rows] = scores.to(device)
            input_ids[rows] = group_input_ids[beam_idx]
            current_tokens[rows] = tokens.to(device)
            reordering_indices[rows] = (
                num_beams * torch.div(beam_idx, group_size, rounding_mode="floor")
                + start
                + (beam_idx % group_size)
            )
        input_ids = torch.cat([input_ids, current_tokens.unsqueeze(-1)], dim=-1)
        cache.reorder_cache(reordering_indices)
        if scorer.is_done or inputs.should_stop(input_ids):
            break
        yield None
        try:
            inputs.checkpoint()  # the beams are whole here: a deadline ends the search with them
        except StepInterrupted as stop:
            if stop.reason != DEADLINE:
                raise
            break
        outputs = inputs.forward(current_tokens[:, None], cache)
        cache, logits = outputs.past_key_values, outputs.logits[:, -1, :]
        del outputs
    hypotheses = scorer.finalize(input_ids.cpu(), beam_scores.cpu(), prompt_len)
    yield BeamOutcome([(tokens[prompt_len:], score) for tokens, score in hypotheses])
