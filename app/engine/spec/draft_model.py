"""Draft-model speculative decoding: a smaller GPT-2 proposes tokens, the target verifies them.

The draft has its own KV tensors with the target's geometry in blocks (same block size and
number of blocks) and uses the target's block tables and slot mapping: no second block
manager. Invariant: every slot the target computes, the draft computes too, with the same
token (`mirror` runs the draft over each step's SchedulerOutput, copy-on-write included).
So wherever the target's KV is valid (prefix-cache hits, forks, after preemption and
recompute), the draft's is as well.

After a step, `propose` drafts up to k tokens per sequence greedily: round 0 feeds the
sequence's pending last token, round r its previous draft, all sequences batched as decodes.
Those rounds write the draft's KV at positions the target computes in the next step (the
engine reserves the blocks first, Scheduler.reserve_slots); the mirror then rewrites them
with the same tokens.

Departures from transformers' AssistedCandidateGenerator, none of which can change the
output (drafts are verified against plain decoding, engine/spec/decoder.py): the draft always takes
the argmax of its raw logits (no logits processors, no sampling); the confidence threshold
is fixed (transformers re-tunes it with scikit-learn's ROC curve as generation goes on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine.core.scheduler import SchedulerOutput
from app.modeling.attention_metadata import SeqChunk, build_step_input
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from app.modeling.native import NativeKernels


class DraftModelError(ValueError):
    """The draft model cannot draft for the target (vocabulary, positions, device)."""


@dataclass
class DraftRequest:
    """One sequence to draft for: its tokens, block table and drafting limits."""

    token_ids: list[int]
    block_table: list[int]
    num_tokens: int  # at most this many drafts
    eos_token_ids: tuple[int, ...] = ()
    confidence_threshold: float = 0.0  # stop after a draft the draft model gives less
    drafts: list[int] = field(default_factory=list)


def check_compatible(draft: torch.nn.Module, target: torch.nn.Module) -> None:
    """Start-up checks: the same vocabulary, enough positions, the same device and dtype."""
    d, t = draft.config, target.config
    if d.vocab_size != t.vocab_size:
        raise DraftModelError(
            f"draft model vocab_size {d.vocab_size} != target vocab_size {t.vocab_size}: "
            "the draft must share the target's tokenizer"
        )
    if d.n_positions < t.n_positions:
        raise DraftModelError(
            f"draft model n_positions {d.n_positions} < target n_positions {t.n_positions}"
        )
    dp, tp = next(draft.parameters()), next(target.parameters())
    if dp.device != tp.device or dp.dtype != tp.dtype:
        raise DraftModelError(
            f"draft model on {dp.device} ({dp.dtype}), target on {tp.device} ({tp.dtype})"
        )


def check_same_tokenizer(draft_tokenizer: Any, target_tokenizer: Any) -> None:
    """The draft's token ids must mean what the target's mean (--draft-model start-up check)."""
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise DraftModelError(
            "the draft model's tokenizer differs from the model's: a draft model must share "
            "the model's tokenizer (the same vocabulary and ids)"
        )


class DraftModel:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        target: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        native_kernels: NativeKernels = "auto",
    ) -> None:
        check_compatible(hf_model, target)
        self.config = hf_model.config
        self.model = PagedGPT2.from_hf(hf_model, native_kernels=native_kernels)
        self.device = next(hf_model.parameters()).device
        self.block_size = block_size
        self.kv_cache = KVCache.allocate(
            self.config, num_blocks, block_size, self.model.dtype, self.device
        )

    @torch.inference_mode()
    def mirror(self, out: SchedulerOutput) -> None:
        """The draft's KV for every token the target computes in this step (no logits)."""
        self.kv_cache.copy_blocks(out.cow_copies)
        chunks = [SeqChunk(s.token_ids, s.start_pos, s.block_table, sample=False) for s in out.seqs]
        self._forward(chunks)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> None:
        """Fill each request's `drafts`, one batched single-token forward per round."""
        active = [r for r in requests if r.num_tokens > 0]
        while active:
            chunks = []
            for r in active:
                context = len(r.token_ids) + len(r.drafts)
                last = r.drafts[-1] if r.drafts else r.token_ids[-1]
                chunks.append(SeqChunk([last], context - 1, r.block_table))
            logits = self._forward(chunks).float()
            probs, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
            still = []
            for r, token, prob in zip(active, tokens.tolist(), probs.tolist(), strict=True):
                if token in r.eos_token_ids:
                    continue  # no draft beyond an eos: generation would stop there
                r.drafts.append(token)
                if len(r.drafts) < r.num_tokens and prob >= r.confidence_threshold:
                    still.append(r)
            active = still

    def _forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        step = build_step_input(
            chunks,
            self.block_size,
            self.device,
            max_positions=self.config.n_positions,
            paged_decode=self.model.paged_decode,
        )
        return self.model(step, self.kv_cache)
