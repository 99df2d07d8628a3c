"""DoLa, Decoding by Contrasting Layers (Chuang et al., ICLR 2024), a port of transformers
4.x's `GenerationMixin._dola_decoding` for one prompt.

Every step applies the LM head to the hidden states of the candidate "premature" layers, picks
the one whose next-token distribution is furthest (Jensen-Shannon) from the final layer's, and
decodes from log p_final - log p_premature over the tokens whose final probability is at least
a tenth of the top one (the rest get -inf). The logits processors then apply as usual, and the
token is the argmax, or a draw when do_sample.

A step's premature LM heads run in chunks of at most CHUNK_HEAD_LOGITS logits, one chunk
per engine step (`PAUSE` in between); each head is the same call on the same hidden state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from app.engine.lanes.class_b.common import (
    CHUNK_HEAD_LOGITS,
    PAUSE,
    MethodInputs,
    StepIterator,
    TokenChoice,
)
from app.options.class_b import candidate_layers


def relative_top_filter(
    scores: torch.Tensor,
    baseline_scores: torch.Tensor,
    relative_top: float = 0.1,
    filter_value: float = -float("Inf"),
    base_filter_value: float = -1e-3,
    min_tokens_to_keep: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """4.x's `_relative_top_filter`: keep tokens with probability >= relative_top * max."""
    scores_normalized = scores.log_softmax(dim=-1)
    baseline_normalized = baseline_scores.log_softmax(dim=-1)
    sorted_logits, _ = torch.sort(scores_normalized, descending=True)
    min_thresh = sorted_logits[..., min_tokens_to_keep - 1]
    probs_max = torch.max(scores_normalized, dim=-1).values
    probs_thresh = torch.min(min_thresh, probs_max + math.log(relative_top)).unsqueeze(-1)
    baseline_normalized[scores_normalized < probs_thresh] = base_filter_value
    scores_normalized[scores_normalized < probs_thresh] = filter_value
    return scores_normalized, baseline_normalized


def select_contrast(
    layers: list[int], premature_logits: dict[int, torch.Tensor], final_logits: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """4.x's `_dola_select_contrast`, also returning the premature layer it contrasted."""
    if len(layers) == 1:
        premature = layers[0]
    else:
        stacked = torch.stack([premature_logits[i] for i in layers], dim=0)
        softmax_mature = F.softmax(final_logits, dim=-1)
        softmax_premature = F.softmax(stacked, dim=-1)
        avg_dist = 0.5 * (softmax_mature[None, :, :] + softmax_premature)
        log_softmax_mature = F.log_softmax(final_logits, dim=-1)
        log_softmax_premature = F.log_softmax(stacked, dim=-1)
        kl1 = F.kl_div(log_softmax_mature[None, :, :], avg_dist, reduction="none").mean(-1)
        kl2 = F.kl_div(log_softmax_premature, avg_dist, reduction="none").mean(-1)
        js_divs = (0.5 * (kl1 + kl2)).mean(-1)  # [num premature layers]
        premature = layers[int(js_divs.argmax().cpu().item())]
    final, base = relative_top_filter(final_logits, premature_logits[premature])
    return final - base, premature


def dola_decoding(
    inputs: MethodInputs, dola_layers: str | list[int], chosen: list[int] | None = None
) -> StepIterator:
    """`chosen`, when given, collects the premature layer contrasted at every step."""
    model: Any = inputs.model
    config = model.config.get_text_config()
    layers = candidate_layers(dola_layers, config.num_hidden_layers, config.tie_word_embeddings)
    lm_head = model.get_output_embeddings()
    heads_per_chunk = max(1, CHUNK_HEAD_LOGITS // int(config.vocab_size))
    do_sample = bool(inputs.generation_config.do_sample)
    input_ids = inputs.prompt_tensor()
    step_input, cache = input_ids, None
    while True:
        inputs.checkpoint()
        outputs = inputs.forward(step_input, cache, hidden_states=True)
        cache = outputs.past_key_values
        final_logits = outputs.logits[:, -1, :].float()
        premature_logits: dict[int, torch.Tensor] = {}
        heads = 1  # LM heads in this chunk (engine step): the final one ran with the forward
        for layer in layers:  # one LM head per premature layer: a checkpoint before each
            if layer not in premature_logits and heads >= heads_per_chunk:
                yield PAUSE  # at most heads_per_chunk premature heads per engine step
                heads = 0
            inputs.checkpoint()
            if layer not in premature_logits:
                heads += 1
                hidden = outputs.hidden_states[layer][:, -1, :]
                premature_logits[layer] = lm_head(hidden).to(final_logits.device)
        del outputs
        next_token_logits, premature = select_contrast(layers, premature_logits, final_logits)
        if chosen is not None:
            chosen.append(premature)
        scores = inputs.processors(input_ids, next_token_logits.to(input_ids.device))
        if do_sample:
            probs = F.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=inputs.generator).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        step_input = next_tokens[:, None]
        yield TokenChoice(int(next_tokens[0]), scores[0])
        if inputs.should_stop(input_ids):
            return
