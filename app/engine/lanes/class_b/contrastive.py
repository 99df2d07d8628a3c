"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation"),
a port of transformers 4.x's `GenerationMixin._contrastive_search` for one prompt.

Each step takes the top_k candidates of the processed distribution, runs all k of them
through the model (one batched forward over the KV cache repeated k times) and picks

    argmax_v  (1 - alpha) * p(v | x)  -  alpha * max_j cos(h_v, h_j)

where h_v is the candidate's last hidden state and h_j those of every previous token (the
degeneration penalty). The chosen candidate's forward is kept: its cache row and its logits
become the next step's input, so each step costs one forward of k rows.
"""

from __future__ import annotations

import torch
from torch import nn

from app.engine.lanes.class_b.common import MethodInputs, StepIterator, TokenChoice


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


def contrastive_search(inputs: MethodInputs, penalty_alpha: float, top_k: int) -> StepIterator:
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

        inputs.checkpoint()  # before the step's k-row forward, and again after it
        cache.batch_repeat_interleave(top_k)  # one cache row per candidate
        outputs = inputs.forward(top_k_ids.view(-1, 1), cache, hidden_states=True)
        inputs.checkpoint()
        next_hidden = outputs.hidden_states[-1]  # [k, 1, H]
        logits = outputs.logits[:, -1, :].float()
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
        cache = outputs.past_key_values
        cache.batch_select_indices(augmented_idx.to(logits.device))  # keep the chosen row
        logit_for_next_step = torch.stack(torch.split(logits, top_k))[range(1), selected_idx, :]
        del outputs

        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        yield TokenChoice(int(next_tokens[0]), processed[0])
        if inputs.should_stop(input_ids):
            return
