"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation"),
a port of transformers 4.x's `GenerationMixin._contrastive_search` for one prompt.

Each step takes the top_k candidates of the processed distribution, runs all k of them
through the model (one batched forward over the KV cache repeated k times) and picks

    argmax_v  (1 - alpha) * p(v | x)  -  alpha * max_j cos(h_v, h_j)

where h_v is the candidate's last hidden state and h_j those of every previous token (the
degeneration penalty). The chosen candidate's forward is kept: its cache row and its logits
become the next step's input, so each step costs one forward of k rows.

The k-row forward is run in row groups of at most CHUNK_ROW_POSITIONS rows x cached
positions (each group its own copy of the cache), one group per engine step (`PAUSE` in
between), and the LM head once over all k rows as one forward applies it. A step within
the bound is one group: exactly the unsplit forward. Split steps compute every row on the
same inputs; only BLAS blocking may differ by the row count (float32 with torch's threads:
bit-identical in tests; float64 on one thread: last-bit differences seen).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from app.engine.lanes.class_b.common import (
    CHUNK_ROW_POSITIONS,
    PAUSE,
    MethodInputs,
    StepIterator,
    TokenChoice,
)


def ranking_fast(
    context_hidden: torch.Tensor,
    next_hidden: torch.Tensor,
    next_top_k_probs: torch.Tensor,
    cosine_matrix_mask: torch.Tensor,
    alpha: float,
    beam_width: int,
) -> torch.Tensor:
    """4.x's `_ranking_fast`: the index of the best candidate per row by model confidence
    minus the degeneration penalty (context_hidden [k, S, H], next_hidden [k, 1, H])."""
    norm_context = context_hidden / context_hidden.norm(dim=2, keepdim=True)
    norm_next = next_hidden / next_hidden.norm(dim=2, keepdim=True)
    cosine_matrix = torch.matmul(norm_context, norm_next.transpose(1, 2)).squeeze(-1)  # [k, S]
    mask = cosine_matrix_mask.to(dtype=cosine_matrix.dtype)
    cosine_matrix = cosine_matrix + (1 - mask) * torch.finfo(cosine_matrix.dtype).min
    degeneration_penalty, _ = torch.max(cosine_matrix, dim=-1)  # [k]
    contrastive_score = (1.0 - alpha) * next_top_k_probs.view(-1) - alpha * degeneration_penalty
    contrastive_score = torch.stack(torch.split(contrastive_score, beam_width))  # [1, k]
    _, selected_idx = contrastive_score.max(dim=-1)
    return selected_idx


def row_groups(top_k: int, positions: int) -> list[range]:
    """The candidate rows split into groups of at most CHUNK_ROW_POSITIONS rows x positions,
    as even as possible and of at least 2 rows (one row takes other BLAS paths)."""
    per_group = max(2, CHUNK_ROW_POSITIONS // max(1, positions))
    count = max(1, -(-top_k // per_group))
    count = min(count, max(1, top_k // 2))
    bounds = [top_k * i // count for i in range(count + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(count)]


def repeated_cache(cache: Any, rows: int) -> DynamicCache:
    """A new cache holding `cache`'s one row `rows` times (batch_repeat_interleave's values)."""
    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(
            layer.keys.repeat_interleave(rows, dim=0),
            layer.values.repeat_interleave(rows, dim=0),
            index,
        )
    return copy


def contrastive_search(inputs: MethodInputs, penalty_alpha: float, top_k: int) -> StepIterator:
    transformer, lm_head = inputs.model.base_model, inputs.model.get_output_embeddings()
    input_ids = inputs.prompt_tensor()
    out = inputs.forward(input_ids, None, hidden_states=True)
    cache = out.past_key_values
    last_hidden_states = out.hidden_states[-1]  # [1, P, H]: the degeneration penalty's context
    logit_for_next_step = out.logits[:, -1, :].clone().float()
    cosine_matrix_mask = torch.ones_like(input_ids).repeat_interleave(top_k, dim=0)
    del out
    while True:
        processed = inputs.processors(input_ids, logit_for_next_step)
        next_probs = nn.functional.softmax(processed, dim=-1)
        top_k_probs, top_k_ids = torch.topk(next_probs, dim=-1, k=top_k)

        candidates = top_k_ids.view(-1, 1)
        groups = row_groups(top_k, cache.get_seq_length())
        hidden_parts: list[torch.Tensor] = []
        group_caches: list[Any] = []
        for number, rows in enumerate(groups):
            if number > 0:
                yield PAUSE  # one row group per engine step
            inputs.checkpoint()  # before each group's forward, and again after it
            group_cache = repeated_cache(cache, len(rows))  # one cache row per candidate
            out = transformer(
                input_ids=candidates[rows.start : rows.stop],
                past_key_values=group_cache,
                use_cache=True,
                return_dict=True,
            )
            inputs.checkpoint()
            hidden_parts.append(out.last_hidden_state)
            group_caches.append(group_cache)
            del out
        del cache
        next_hidden = torch.cat(hidden_parts) if len(groups) > 1 else hidden_parts[0]  # [k, 1, H]
        logits = lm_head(next_hidden)[:, -1, :].float()  # as the k-row forward applies it
        context_hidden = last_hidden_states.repeat_interleave(top_k, dim=0)
        selected_idx = ranking_fast(
            context_hidden, next_hidden, top_k_probs, cosine_matrix_mask, penalty_alpha, top_k
        ).to("cpu")
        cosine_matrix_mask = torch.cat(
            [cosine_matrix_mask, cosine_matrix_mask.new_ones((cosine_matrix_mask.shape[0], 1))],
            dim=-1,
        )
        augmented_idx = torch.tensor([x + i * top_k for i, x in enumerate(selected_idx)])
        next_tokens = top_k_ids[range(len(top_k_ids)), selected_idx]
        next_hidden = torch.stack(torch.split(next_hidden.squeeze(dim=1), top_k))
        next_hidden = next_hidden[range(1), selected_idx, :]
        last_hidden_states = torch.cat([last_hidden_states, next_hidden.unsqueeze(1)], dim=1)
        chosen = int(augmented_idx[0])
        group = next(i for i, rows in enumerate(groups) if chosen in rows)
        cache = group_caches[group]
        keep = torch.tensor([chosen - groups[group].start], device=logits.device)
        cache.batch_select_indices(keep)  # keep the chosen row
        logit_for_next_step = torch.stack(torch.split(logits, top_k))[range(1), selected_idx, :]
        del group_caches, hidden_parts

        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        yield TokenChoice(int(next_tokens[0]), processed[0])
        if inputs.should_stop(input_ids):
            return
