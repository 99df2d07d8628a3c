"""Beam search (and beam sampling) for one request, step by step, exactly as transformers does.

The engine runs each beam as a sibling sequence sharing KV blocks (copy on write); this
module only decides, after every forward, which beams continue with which tokens. Its
state and arithmetic mirror `GenerationMixin._beam_search` for a batch of one: the same
tensors, the same static helpers of transformers, so results match `model.generate`
token for token. The only change: sampling draws from the request's own generator.
Every tensor stays on the model's device, as in generate: the processors hold tensors on it
and a seeded request's generator is on it (`make_generator(seed, device)`); an unseeded
draw uses that device's default generator, as generate's does.

Processors and stopping criteria come from `prepare_generation`, which asks
`model.generate` itself to build them (through `custom_generate`), so no option is
re-implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.generation.utils import GenerationMixin


@dataclass
class PreparedGeneration:
    """What `model.generate` prepares before decoding, for one prompt."""

    generation_config: GenerationConfig
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    # the model's: the processors' and criteria's tensors are on it
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def prepare_generation(
    model: Any, prompt_ids: Sequence[int], options: dict[str, Any], tokenizer: Any = None
) -> PreparedGeneration:
    """Run generate's preparation (config merge, validation, processors, criteria) only."""

    def capture(_model: Any, input_ids: torch.Tensor, **kwargs: Any) -> PreparedGeneration:
        return PreparedGeneration(
            kwargs["generation_config"],
            kwargs["logits_processor"],
            kwargs["stopping_criteria"],
            input_ids.device,
        )

    ids = torch.tensor([list(prompt_ids)], device=model.device)
    extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
    # generate drops `tokenizer` when custom_generate is a callable, and then refuses stop
    # strings; their criterion is added here exactly as generate's _get_stopping_criteria does.
    stop_strings = options.get("stop_strings")
    if stop_strings and tokenizer is not None:
        options = {**options, "stop_strings": None}
    prepared: PreparedGeneration = model.generate(
        ids, attention_mask=torch.ones_like(ids), custom_generate=capture, **extra, **options
    )
    if stop_strings and tokenizer is not None:
        criterion = StopStringCriteria(stop_strings=stop_strings, tokenizer=tokenizer)
        prepared.stopping_criteria.append(criterion)
        prepared.generation_config.stop_strings = stop_strings
    return prepared


@dataclass
class BeamStep:
    parents: list[int]  # for each new running beam, the index of the beam it extends
    tokens: list[int]  # the token each new running beam appends
    done: bool


class BeamSearch:
    """State of one request's beam search; call `step` with the running beams' logits."""

    def __init__(
        self,
        prepared: PreparedGeneration,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> None:
        gc = prepared.generation_config
        self.processors = prepared.logits_processor
        self.stopping = prepared.stopping_criteria
        self.generator = generator  # on the model's device (None: its default generator)
        self.device = device = prepared.device
        self.num_beams = int(gc.num_beams)
        self.do_sample = bool(gc.do_sample)
        self.early_stopping = gc.early_stopping
        self.length_penalty = gc.length_penalty
        self.max_length = int(gc.max_length)
        self.num_return_sequences = int(gc.num_return_sequences or 1)
        eos = gc._eos_token_tensor
        pad = gc._pad_token_tensor
        n_eos = eos.shape[0] if eos is not None else 0
        self.beams_to_keep = max(2, 1 + n_eos) * self.num_beams
        self.top_num_beam_mask = torch.cat(
            (
                torch.ones(self.num_beams, dtype=torch.bool, device=device),
                torch.zeros(self.beams_to_keep - self.num_beams, dtype=torch.bool, device=device),
            )
        )
        # Same fill value expression as transformers (operator precedence included).
        fill = pad or eos[0] if eos is not None else -1
        self.prompt_len = self.cur_len = len(prompt_ids)
        b, length = self.num_beams, self.max_length
        self.running_sequences = torch.full(
            (1, b, length), int(fill), dtype=torch.int64, device=device
        )
        self.running_sequences[:, :, : self.cur_len] = torch.tensor(list(prompt_ids), device=device)
        self.sequences = self.running_sequences.clone()
        self.running_beam_scores = torch.zeros((1, b), dtype=torch.float, device=device)
        self.running_beam_scores[:, 1:] = -1e9
        self.beam_scores = torch.full((1, b), -1e9, dtype=torch.float, device=device)
        self.is_sent_finished = torch.zeros((1, b), dtype=torch.bool, device=device)
        self.is_early_stop_heuristic_unsatisfied = torch.ones(
            (1, 1), dtype=torch.bool, device=device
        )
        self.running_beam_indices = torch.full(
            (1, b, length - self.cur_len), -1, dtype=torch.int32, device=device
        )
        self.beam_indices = self.running_beam_indices.clone()

    def step(self, logits: torch.Tensor) -> BeamStep:
        """`logits`: [num_beams, V] raw logits of the running beams, in beam order (or [1, V]
        on the first step, when all beams are still the prompt)."""
        mixin = GenerationMixin
        b = self.num_beams
        logits = logits.to(dtype=torch.float32, device=self.device, copy=True)
        if logits.shape[0] == 1 and b > 1:
            logits = logits.expand(b, -1).clone()  # generate prefills b identical copies
        flat_running = mixin._flatten_beam_dim(self.running_sequences[:, :, : self.cur_len])
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        log_probs = self.processors(flat_running, log_probs)
        log_probs = mixin._unflatten_beam_dim(log_probs, 1, b)
        log_probs = log_probs + self.running_beam_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (1, -1))

        topk_log_probs, topk_sequences, topk_beam_indices = self._top_k_continuations(log_probs)
        hits = self.stopping(
            mixin._flatten_beam_dim(topk_sequences[:, :, : self.cur_len + 1]), None
        )
        hits = mixin._unflatten_beam_dim(hits, 1, self.beams_to_keep)
        (
            self.running_sequences,
            self.running_beam_scores,
            self.running_beam_indices,
        ) = mixin._get_running_beams_for_next_iteration(
            mixin,  # type: ignore[arg-type]  # only its static helpers are used
            topk_log_probs=topk_log_probs,
            topk_running_sequences=topk_sequences,
            topk_running_beam_indices=topk_beam_indices,
            next_token_hits_stopping_criteria=hits,
            num_beams=b,
        )
        (
            self.sequences,
            self.beam_scores,
            self.beam_indices,
            self.is_sent_finished,
        ) = mixin._update_finished_beams(
            mixin,  # type: ignore[arg-type]
            sequences=self.sequences,
            topk_running_sequences=topk_sequences,
            beam_scores=self.beam_scores,
            topk_log_probs=topk_log_probs,
            beam_indices=self.beam_indices,
            topk_running_beam_indices=topk_beam_indices,
            is_early_stop_heuristic_unsatisfied=self.is_early_stop_heuristic_unsatisfied,
            is_sent_finished=self.is_sent_finished,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top_num_beam_mask,
            num_beams=b,
            cur_len=self.cur_len,
            decoder_prompt_len=self.prompt_len,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )
        step_col = self.cur_len - self.prompt_len
        parents = self.running_beam_indices[0, :, step_col].tolist()
        tokens = self.running_sequences[0, :, self.cur_len].tolist()
        self.cur_len += 1
        self.is_early_stop_heuristic_unsatisfied = mixin._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.is_early_stop_heuristic_unsatisfied,
            running_beam_scores=self.running_beam_scores,
            beam_scores=self.beam_scores,
            is_sent_finished=self.is_sent_finished,
            cur_len=self.cur_len,
            max_length=self.max_length,
            decoder_prompt_len=self.prompt_len,
            early_stopping=self.early_stopping,
            length_penalty=self.length_penalty,
        )
        unfinished = mixin._beam_search_has_unfinished_sequences(
            self.is_early_stop_heuristic_unsatisfied,
            self.is_sent_finished,
            hits,
            self.early_stopping,
        )
        return BeamStep(parents, tokens, done=not bool(unfinished))

    def _top_k_continuations(
        self, log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """transformers' `_get_top_k_continuations` with the request's own generator."""
        if self.do_sample:
            probs = torch.nn.functional.softmax(log_probs, dim=-1)
            topk_indices = torch.multinomial(
                probs, num_samples=self.beams_to_keep, generator=self.generator
            )
            topk_log_probs = torch.gather(input=log_probs, dim=1, index=topk_indices)
            # transformers >= 5.25 ranks the sampled candidates by log-probability before
            # the beams are chosen (5.23 kept the draw order).
            topk_log_probs, order = topk_log_probs.sort(dim=-1, descending=True)
            topk_indices = topk_indices.gather(dim=-1, index=order)
        else:
            topk_log_probs, topk_indices = torch.topk(log_probs, k=self.beams_to_keep)
        vocab_size = log_probs.shape[-1] // self.num_beams
        current_beams = topk_indices // vocab_size
        gather = GenerationMixin._gather_beams
        topk_beam_indices = gather(self.running_beam_indices, current_beams)
        topk_sequences = gather(self.running_sequences, current_beams)
        topk_sequences[:, :, self.cur_len] = topk_indices % vocab_size
        topk_beam_indices[:, :, self.cur_len - self.prompt_len] = current_beams
        return topk_log_probs, topk_sequences, topk_beam_indices

    def results(self) -> list[tuple[list[int], float]]:
        """The best `num_return_sequences` hypotheses: (generated token ids, sequence score)."""
        out = []
        for j in range(self.num_return_sequences):
            length = int((self.beam_indices[0, j] + 1).bool().sum())
            tokens = self.sequences[0, j, self.prompt_len : self.prompt_len + length].tolist()
            out.append((tokens, float(self.beam_scores[0, j])))
        return out
