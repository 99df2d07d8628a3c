"""transformers 4.x's beam scorers for a batch of one: BeamHypotheses, BeamSearchScorer (with
beam groups) and ConstrainedBeamSearchScorer, ported from generation/beam_search.py (4.46).

Differences from 4.x that do not change which tokens win: one prompt only, no beam_indices
bookkeeping, and a hypothesis that ended with an eos token keeps that token (4.x stores the
hypothesis without it and writes eos_token_id[0] behind it when padding the output).
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np
import torch

from app.engine.lanes.class_b.common import CHUNK_BEAMS, PAUSE, Pause
from app.engine.lanes.class_b.constraints import Constraint, ConstraintListState

Hypothesis = tuple[list[int], float]  # generated token ids (prompt included), sequence score


class BeamHypotheses:
    """The n best finished hypotheses of one beam group (4.x's BeamHypotheses)."""

    def __init__(
        self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_length: int
    ) -> None:
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.num_beams = num_beams
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: list[int], sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, decoder_prompt_len: int) -> bool:
        """Whether no running beam can beat the worst kept hypothesis (early_stopping rules)."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            best = best_sum_logprobs / (cur_len - decoder_prompt_len) ** self.length_penalty
        else:  # "never" with a positive length penalty: the longest possible sequence
            best = best_sum_logprobs / (self.max_length - decoder_prompt_len) ** self.length_penalty
        return bool(self.worst_score >= best)


def _best(candidates: list[tuple[float, list[int]]], keep: int) -> list[Hypothesis]:
    """4.x's finalize order: a stable sort by score, the best popped from the end; scores as
    the float32 tensor 4.x returns them in."""
    ranked = sorted(candidates, key=lambda x: x[0])
    out = []
    for _ in range(keep):
        score, hyp = ranked.pop()
        out.append((hyp, float(torch.tensor(score, dtype=torch.float32))))
    return out


class BeamSearchScorer:
    """4.x's BeamSearchScorer for one prompt, `num_beam_groups` groups of hypotheses."""

    def __init__(
        self,
        num_beams: int,
        num_beam_groups: int,
        length_penalty: float,
        early_stopping: bool | str,
        num_beam_hyps_to_keep: int,
        max_length: int,
    ) -> None:
        self.num_beams = num_beams
        self.num_beam_groups = num_beam_groups
        self.group_size = num_beams // num_beam_groups
        self.num_beam_hyps_to_keep = num_beam_hyps_to_keep
        self.hyps = [
            BeamHypotheses(self.group_size, length_penalty, early_stopping, max_length)
            for _ in range(num_beam_groups)
        ]
        self.done = [False] * num_beam_groups

    @property
    def is_done(self) -> bool:
        return all(self.done)

    def process(
        self,
        input_ids: torch.Tensor,
        next_scores: torch.Tensor,
        next_tokens: torch.Tensor,
        next_indices: torch.Tensor,
        pad_token_id: int | None,
        eos_token_ids: list[int],
        group_index: int,
        decoder_prompt_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One group's step: (scores, tokens, parent indices) of its next running beams."""
        cur_len = input_ids.shape[-1] + 1
        size = self.group_size
        scores = torch.zeros(size, dtype=next_scores.dtype)
        tokens = torch.zeros(size, dtype=next_tokens.dtype)
        indices = torch.zeros(size, dtype=next_indices.dtype)
        if self.done[group_index]:
            if pad_token_id is None:
                raise ValueError("a finished beam group needs a pad token id")
            tokens[:] = pad_token_id
            return scores, tokens, indices
        hyps = self.hyps[group_index]
        beam_idx = 0
        for rank, (token, score, index) in enumerate(
            zip(next_tokens[0].tolist(), next_scores[0], next_indices[0].tolist(), strict=True)
        ):
            if token in eos_token_ids:
                if rank >= size:  # an eos outside the top group_size is not a hypothesis
                    continue
                hyp = [*input_ids[index].tolist(), token]
                hyps.add(hyp, score.item(), generated_len=cur_len - decoder_prompt_len)
            else:
                scores[beam_idx], tokens[beam_idx], indices[beam_idx] = score, token, index
                beam_idx += 1
            if beam_idx == size:
                break
        if beam_idx < size:
            raise ValueError(f"at most {size} of the top tokens may be eos")
        self.done[group_index] = hyps.is_done(
            next_scores[0].max().item(), cur_len, decoder_prompt_len
        )
        return scores, tokens, indices

    def finalize(
        self, input_ids: torch.Tensor, final_beam_scores: torch.Tensor, decoder_prompt_len: int
    ) -> list[Hypothesis]:
        """The best `num_beam_hyps_to_keep` hypotheses over all groups, best first."""
        for group, hyps in enumerate(self.hyps):
            if self.done[group]:
                continue
            for i in range(self.group_size):
                row = group * self.group_size + i
                tokens = input_ids[row].tolist()
                hyps.add(tokens, final_beam_scores[row].item(), len(tokens) - decoder_prompt_len)
        candidates = [beam for hyps in self.hyps for beam in hyps.beams]
        return _best(candidates, self.num_beam_hyps_to_keep)


class ConstrainedBeamSearchScorer:
    """4.x's ConstrainedBeamSearchScorer for one prompt: beams are ranked in banks of
    constraint progress, so hypotheses that advance the constraints survive."""

    def __init__(
        self,
        num_beams: int,
        constraints: list[Constraint],
        length_penalty: float,
        early_stopping: bool | str,
        num_beam_hyps_to_keep: int,
        max_length: int,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.num_beams = num_beams
        self.constraints = constraints
        self.checkpoint = checkpoint  # called before each beam's constraint advances
        self.num_beam_hyps_to_keep = num_beam_hyps_to_keep
        self.hyps = BeamHypotheses(num_beams, length_penalty, early_stopping, max_length)
        self.done = False

    @property
    def is_done(self) -> bool:
        return self.done

    def make_constraint_states(self, n: int) -> list[ConstraintListState]:
        return [ConstraintListState([c.copy() for c in self.constraints]) for _ in range(n)]

    def check_completes_constraints(self, sequence: list[int]) -> bool:
        state = self.make_constraint_states(1)[0]
        state.reset(sequence)
        return state.completed

    def process(
        self,
        input_ids: torch.Tensor,
        next_scores: torch.Tensor,
        next_tokens: torch.Tensor,
        next_indices: torch.Tensor,
        scores_for_all_vocab: torch.Tensor,
        pad_token_id: int | None,
        eos_token_ids: list[int],
        decoder_prompt_len: int,
    ) -> Generator[Pause, None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """4.x's process; a generator (`yield from`) that pauses between beams' constraint
        advances, one beam per engine step, and returns the scores, tokens and indices."""
        cur_len = input_ids.shape[-1] + 1
        size = self.num_beams
        scores = torch.zeros(size, dtype=next_scores.dtype)
        tokens = torch.zeros(size, dtype=next_tokens.dtype)
        indices = torch.zeros(size, dtype=next_indices.dtype)
        if self.done:
            if pad_token_id is None:
                raise ValueError("a finished beam search needs a pad token id")
            tokens[:] = pad_token_id
            return scores, tokens, indices
        beam_idx = 0
        for rank, (token, score, index) in enumerate(
            zip(next_tokens[0].tolist(), next_scores[0], next_indices[0].tolist(), strict=True)
        ):
            if token in eos_token_ids:
                if rank >= size:
                    continue
                prefix = input_ids[index].tolist()
                if self.check_completes_constraints(prefix):  # only complete hypotheses end
                    self.hyps.add([*prefix, token], score.item(), cur_len - decoder_prompt_len)
            else:
                scores[beam_idx], tokens[beam_idx], indices[beam_idx] = score, token, index
                beam_idx += 1
            if beam_idx == size:
                break
        scores, tokens, indices = yield from self.step_sentence_constraint(
            input_ids, scores_for_all_vocab, scores, tokens, indices
        )
        if beam_idx < size:
            raise ValueError(f"at most {size} of the top tokens may be eos")
        self.done = self.hyps.is_done(next_scores[0].max().item(), cur_len, decoder_prompt_len)
        return scores, tokens, indices

    def step_sentence_constraint(
        self,
        input_ids: torch.Tensor,
        vocab_scores: torch.Tensor,
        sent_beam_scores: torch.Tensor,
        sent_beam_tokens: torch.Tensor,
        sent_beam_indices: torch.Tensor,
    ) -> Generator[Pause, None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Add, for every beam, the continuations that advance its constraints, then keep the
        best beams bank by bank (round-robin over the banks of constraint progress). Pauses
        after every CHUNK_BEAMS beams' advances (one chunk per engine step)."""
        orig_len = sent_beam_indices.size(0)
        topk_states = self.make_constraint_states(orig_len)
        advance_states = self.make_constraint_states(orig_len)
        full_hypotheses = torch.cat(
            (input_ids[sent_beam_indices], sent_beam_tokens.unsqueeze(-1)), dim=-1
        )
        new_seqs = full_hypotheses.tolist()
        new_states: list[ConstraintListState] = []
        new_indices: list[int] = []
        new_tokens: list[torch.Tensor] = []
        new_scores: list[torch.Tensor] = []
        for seq_idx, pre_seq in enumerate(input_ids):
            if seq_idx > 0 and seq_idx % CHUNK_BEAMS == 0:
                yield PAUSE
            if self.checkpoint is not None:
                self.checkpoint()
            topk_states[seq_idx].reset(full_hypotheses[seq_idx].tolist())
            advance_state = advance_states[seq_idx]
            advance_state.reset(pre_seq.tolist())
            if advance_state.completed:
                continue
            for advance_token in torch.LongTensor(advance_state.advance() or []):
                new_state = advance_state.copy(stateful=True)
                new_state.add(advance_token.tolist())
                advance_seq = torch.cat((pre_seq, advance_token.unsqueeze(0)), -1).tolist()
                if advance_seq not in new_seqs:
                    new_seqs.append(advance_seq)
                    new_indices.append(seq_idx)
                    new_tokens.append(advance_token)
                    new_scores.append(vocab_scores[seq_idx].take(advance_token))
                    new_states.append(new_state)
        if not new_indices:
            return sent_beam_scores, sent_beam_tokens, sent_beam_indices
        all_states = topk_states + new_states
        all_tokens = torch.cat((sent_beam_tokens, torch.stack(new_tokens)), -1)
        all_scores = torch.cat((sent_beam_scores, torch.stack(new_scores)), -1)
        all_banks = torch.tensor([state.get_bank() for state in all_states])
        indices = (all_banks * 100 + all_scores).sort(descending=True).indices
        sorted_banks = all_banks[indices]
        counter, cur_bank, increments = -1, sorted_banks[0], []
        for bank in sorted_banks:
            if bank == cur_bank:
                counter += 1
            else:
                counter, cur_bank = 0, bank
            increments.append(counter)
        rearrangers = torch.tensor(np.argsort(increments, kind="mergesort"))
        indices = indices[rearrangers][:orig_len]
        merged_indices = torch.cat((sent_beam_indices, torch.tensor(new_indices)))
        return all_scores[indices], all_tokens[indices], merged_indices[indices]

    def finalize(
        self, input_ids: torch.Tensor, final_beam_scores: torch.Tensor, decoder_prompt_len: int
    ) -> list[Hypothesis]:
        """Running beams that complete the constraints join the hypotheses; when fewer than
        `num_beam_hyps_to_keep` do, incomplete ones fill up (as 4.x)."""
        if not self.done:
            collected: list[int] = []
            for beam in range(self.num_beams):
                tokens = input_ids[beam].tolist()
                if self.check_completes_constraints(tokens):
                    self.hyps.add(
                        tokens, final_beam_scores[beam].item(), len(tokens) - decoder_prompt_len
                    )
                    collected.append(beam)
            if len(collected) < self.num_beam_hyps_to_keep:
                for beam in range(self.num_beams):
                    if beam not in collected:
                        tokens = input_ids[beam].tolist()
                        self.hyps.add(
                            tokens,
                            final_beam_scores[beam].item(),
                            len(tokens) - decoder_prompt_len,
                        )
                    if len(collected) >= self.num_beam_hyps_to_keep:
                        break
        return _best(self.hyps.beams, self.num_beam_hyps_to_keep)
