"""What the sampler knows about one sequence this step: the one type every stage of
sample/ reads (processors, warpers, the top-k path, grammar masks). It imports nothing else of
sample/, so those stages depend on it and not on the sampler that drives them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from app.options.params import SamplingParams

if TYPE_CHECKING:
    from app.engine.grammar import TokenConstraint


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator: same stream as `torch.manual_seed(seed)` gives that device."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    token_ids: Sequence[int]  # prompt + output so far (HF's input_ids)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_length: int = 0  # eos is banned while len(token_ids) < min_length
    eos_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None  # None: the unseeded (batched) draw
    prompt_len: int = 0  # HF's input_ids_seq_length (begin_suppress_tokens, length penalty)
    max_length: int = 0  # total length at which generation stops (forced_eos_token_id)
    options: SamplingParams | None = None  # set only when params.has_logits_options
    top_n: int = 0  # top alternatives to report
    logprob: bool = True  # False: the chosen token's log-prob is not computed (not reported)
    # Classifier-free guidance: the companion (negative prompt) sequence's logits row.
    guidance_scale: float = 1.0
    uncond_logits: torch.Tensor | None = None
    # grammar / allowed_token_ids: this sequence's TokenConstraint (grammar.py), or None.
    constraint: TokenConstraint | None = None

    @property
    def bans_eos(self) -> bool:
        """MinLength(NewTokens)LogitsProcessor applies: eos is banned at this length."""
        return bool(self.eos_token_ids) and len(self.token_ids) < self.min_length

    @classmethod
    def from_params(
        cls,
        params: SamplingParams,
        token_ids: Sequence[int],
        prompt_len: int,
        generator: torch.Generator | None = None,
    ) -> SamplingRow:
        return cls(
            token_ids=token_ids,
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_length=params.min_total_length(prompt_len),
            eos_token_ids=params.eos_token_ids,
            generator=generator,
            prompt_len=prompt_len,
            max_length=params.stop_length(prompt_len),
            options=params if params.has_logits_options else None,
            top_n=params.top_n_tokens,
            logprob=params.logprobs,
        )
