"""The exact slow lane: output_attentions / output_hidden_states (contract class C).

A request that asks for either runs transformers' own `model.generate` for that request
alone, with the options the engine would use (`SamplingParams.generate_kwargs`), as one
exclusive lane run on the engine thread (the model has one owner), so its tokens are those
of the batched lane. The seed works as in the engine: inside `torch.random.fork_rng()`,
`torch.manual_seed(seed)` (a random one when unseeded), so no other code's global RNG moves.
The attention and hidden-state tensors come back as nested lists in transformers' layout
(`RequestOutput.diagnostics`); callers check their size against a cap before admitting the
request (`float_counts`). Token texts, logprobs, top-n alternatives and finish reasons come
from the engine's one output path.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from app.engine.core.request import FinishReason
from app.engine.lanes.context import LaneContext, LaneRequestError, generate_kwargs
from app.engine.output_processor import OutputProcessor, chosen_token
from app.engine.outputs import SequenceOutput
from app.options.params import SamplingParams

DIAGNOSTIC_OUTPUTS = ("output_attentions", "output_hidden_states")


def _rows(params: SamplingParams) -> int:
    """Batch rows of generate's outputs: the beams, else the returned sequences."""
    return params.num_beams if params.num_beams > 1 else params.num_return_sequences


def float_counts(config: Any, prompt_len: int, params: SamplingParams) -> dict[str, int]:
    """Floats generate returns at most (every new token generated) per diagnostic output.

    attentions: step 0 is [rows, heads, P, P] per layer, step t > 0 [rows, heads, 1, P + t];
    hidden states: step 0 is [rows, P, hidden] per embeddings + layers, then [rows, 1, hidden].
    """
    new = params.max_new_tokens or 1
    rows, layers = _rows(params), int(config.n_layer)
    keys = prompt_len * prompt_len + sum(prompt_len + t for t in range(1, new))
    return {
        "output_attentions": rows * layers * int(config.n_head) * keys,
        "output_hidden_states": rows * (layers + 1) * int(config.n_embd) * (prompt_len + new - 1),
    }


@contextmanager
def _eager_attention(model: Any, wanted: bool) -> Iterator[None]:
    """GPT-2 returns attention weights only with eager attention (sdpa returns none)."""
    before = model.config._attn_implementation
    if not wanted or before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _nested(steps: Any) -> list[Any]:
    return [[t.float().tolist() for t in step] for step in steps]


class ExactRun:
    """One exact-lane request: `step()` runs the whole `generate` (engine thread)."""

    def __init__(
        self, lane: LaneContext, prompt: list[int], params: SamplingParams, asked: list[str]
    ) -> None:
        self.lane = lane
        self.prompt = prompt
        self.params = params
        self.asked = asked
        self.finished = False
        self.diagnostics: dict[str, list[Any]] | None = None

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        params, lane = self.params, self.lane
        if params.token_healing:
            self.prompt = lane.heal(self.prompt)  # the engine's own admission step
        kwargs = generate_kwargs(params, params.token_healing)
        kwargs["tokenizer"] = lane.tokenizer
        if params.negative_prompt_ids is not None:
            negative = torch.tensor([params.negative_prompt_ids], device=lane.device)
            kwargs["negative_prompt_ids"] = negative
        attentions = "output_attentions" in self.asked
        ids = torch.tensor([self.prompt], device=lane.device)
        devices = [lane.device.index or 0] if lane.device.type == "cuda" else []
        try:
            with _eager_attention(lane.model, attentions), torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
                out = lane.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    output_scores=True,
                    return_dict_in_generate=True,
                    output_attentions=attentions,
                    output_hidden_states="output_hidden_states" in self.asked,
                    **kwargs,
                )
        except (ValueError, TypeError) as err:  # generate refused the option combination
            raise LaneRequestError(f"the exact lane failed: {err}", self.asked[0]) from err
        self.finished = True
        self.diagnostics = {}
        if attentions:
            self.diagnostics["attentions"] = _nested(out.attentions)
        if "output_hidden_states" in self.asked:
            self.diagnostics["hidden_states"] = _nested(out.hidden_states)
        return self._outputs(out)

    def _outputs(self, out: Any) -> list[SequenceOutput]:
        """generate's rows as the engine reports them (stop checks cut HF's padding)."""
        params = self.params
        processor = OutputProcessor(params, self.prompt, self.lane.tokenizer, self.lane.token_bytes)
        rows = out.sequences[:, len(self.prompt) :].tolist()[: params.num_return_sequences]
        if params.num_beams > 1:  # as the engine's beam results: whole text, sequence score
            return [
                processor.whole_sequence(index, row, float(out.sequences_scores[index]))
                for index, row in enumerate(rows)
            ]
        results: list[SequenceOutput] = []
        for index, row in enumerate(rows):
            text = processor.sequence_text()
            tokens: list[int] = []
            for k, token in enumerate(row):
                tokens.append(token)
                reason = processor.check(self.prompt + tokens)
                if reason is None and k == len(row) - 1:
                    reason = FinishReason.LENGTH
                logprobs = torch.log_softmax(out.scores[k][index].float(), dim=-1)
                chosen = chosen_token(logprobs, token, params.top_n_tokens)
                results.append(processor.token_output(index, text, chosen, reason, k + 1))
                if reason is not None:
                    break
        return results
