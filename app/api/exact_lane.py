"""The exact slow lane: output_attentions / output_hidden_states (contract class C).

A request that asks for either runs transformers' own `model.generate` for that request
alone, with the options the engine would use (`SamplingParams.generate_kwargs`), on the
engine thread between two steps (`AsyncEngine.run_exclusive`: the model has one owner), so
its tokens are those of the batched lane. The seed works as in the engine: inside
`torch.random.fork_rng()`, `torch.manual_seed(seed)` (a random one when unseeded), so no
other code's global RNG moves. The attention and hidden-state tensors come back as nested
lists in transformers' layout; their size is checked against --exact-lane-max-floats before
anything runs (422 naming the field and the cap). Token texts, logprobs, top-n alternatives
and finish reasons are built with the engine's own stop checker and detokenizer.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from app.api.errors import APIError
from app.api.serving import Completion, RequestContext, admission_error, decoder
from app.engine.async_engine import EngineNotRunningError
from app.engine.core.request import FinishReason
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.engine import LLMEngine
from app.engine.outputs import SequenceOutput
from app.engine.sampling_params import SamplingParams
from app.engine.stop import StopChecker, StopStringTextFilter
from app.state import ServerState

logger = logging.getLogger("kogpt.request")


@dataclass
class ExactResult:
    outputs: list[SequenceOutput]  # engine-shaped: one per token (sampling) or per beam
    diagnostics: dict[str, list[Any]]  # "attentions" / "hidden_states" as nested lists


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


def check_cap(
    state: ServerState, prompt_len: int, params: SamplingParams, asked: list[str]
) -> None:
    """422 naming the field and the cap when the asked outputs would exceed it."""
    cap = state.settings.exact_lane_max_floats
    counts = float_counts(state.loaded.config, prompt_len, params)
    total = sum(counts[name] for name in asked)
    if total > cap:
        name = max(asked, key=lambda n: counts[n])
        raise APIError(
            422,
            f"`{name}` would return up to {total} floats, over the cap of {cap} "
            "(--exact-lane-max-floats); ask for fewer new tokens or a shorter prompt",
            field=name,
        )


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


def _generate_kwargs(params: SamplingParams, tokenizer: Any, healed: bool) -> dict[str, Any]:
    kwargs = params.generate_kwargs
    if healed:  # the healed prompt may differ in length: count new tokens, as the engine does
        del kwargs["max_length"], kwargs["min_length"]
        kwargs["max_new_tokens"] = params.max_new_tokens
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = params.min_new_tokens
    if params.ignore_eos:
        kwargs["eos_token_id"] = None  # our extension's meaning: generate(eos_token_id=None)
    if kwargs.get("watermarking_config") is not None:
        from transformers.generation import WatermarkingConfig

        kwargs["watermarking_config"] = WatermarkingConfig(**kwargs["watermarking_config"])
    kwargs["tokenizer"] = tokenizer
    return kwargs


def _nested(steps: Any) -> list[Any]:
    return [[t.float().tolist() for t in step] for step in steps]


def _sequence_outputs(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, out: Any
) -> list[SequenceOutput]:
    """generate's rows as the engine reports them (stop checks cut HF's padding)."""
    tokenizer = engine.tokenizer
    table = engine.token_bytes if params.stop_strings else None
    checker = StopChecker(params, len(prompt), table)
    rows = out.sequences[:, len(prompt) :].tolist()[: params.num_return_sequences]
    results: list[SequenceOutput] = []
    for index, row in enumerate(rows):
        tokens: list[int] = []
        reason = None
        for token in row:
            tokens.append(token)
            reason = checker.check(prompt + tokens)
            if reason is not None:
                break
        reason = reason or FinishReason.LENGTH
        if params.num_beams > 1:  # as the engine's beam results: whole text, sequence score
            text = StopStringTextFilter(params.stop_strings).finish(
                tokenizer.decode(tokens, skip_special_tokens=True), reason
            )
            score = float(out.sequences_scores[index])
            results.append(SequenceOutput(index, text, tokens, [], len(tokens), reason, score))
            continue
        detok = IncrementalDetokenizer(tokenizer, prompt)
        text_filter = StopStringTextFilter(params.stop_strings)
        for k, token in enumerate(tokens):
            lp = torch.log_softmax(out.scores[k][index].float(), dim=-1)
            delta = detok.add(token)
            last = k == len(tokens) - 1
            text = (
                text_filter.finish(delta + detok.flush(), reason)
                if last
                else text_filter.push(delta)
            )
            top_lp, top_ids = torch.topk(lp, min(params.top_n_tokens, lp.shape[-1]))
            keep = [j for j, v in enumerate(top_lp.tolist()) if v != -float("inf")]
            results.append(
                SequenceOutput(
                    index,
                    text,
                    [token],
                    [float(lp[token])],
                    k + 1,
                    reason if last else None,
                    top_token_ids=[[int(top_ids[j]) for j in keep]],
                    top_logprobs=[[float(top_lp[j]) for j in keep]],
                )
            )
    return results


@torch.inference_mode()
def generate_exact(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, asked: list[str]
) -> ExactResult:
    """transformers' generate for one request (call it on the engine thread only)."""
    model, device = engine.runner.hf_model, engine.runner.device
    if params.token_healing:
        prompt = engine._heal(prompt)  # the engine's own admission step
    kwargs = _generate_kwargs(params, engine.tokenizer, params.token_healing)
    if params.negative_prompt_ids is not None:
        kwargs["negative_prompt_ids"] = torch.tensor([params.negative_prompt_ids], device=device)
    attentions = "output_attentions" in asked
    ids = torch.tensor([prompt], device=device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with _eager_attention(model, attentions), torch.random.fork_rng(devices=devices):
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        torch.manual_seed(seed)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            output_scores=True,
            return_dict_in_generate=True,
            output_attentions=attentions,
            output_hidden_states="output_hidden_states" in asked,
            **kwargs,
        )
    diagnostics = {}
    if attentions:
        diagnostics["attentions"] = _nested(out.attentions)
    if "output_hidden_states" in asked:
        diagnostics["hidden_states"] = _nested(out.hidden_states)
    return ExactResult(_sequence_outputs(engine, prompt, params, out), diagnostics)


async def run_exact(
    state: ServerState,
    ctx: RequestContext,
    prompt: list[int],
    params: SamplingParams,
    asked: list[str],
) -> tuple[list[Completion], dict[str, list[Any]]]:
    """Run the exact lane for one request: its completions (as run_to_completion returns
    them) and the diagnostic tensors. Counts in the request metrics and logs like any other."""
    start = time.perf_counter()
    reason, generated = "abort", 0  # abort: the client left (or shutdown cut it) meanwhile
    state.inflight += 1
    try:
        engine = state.engine.engine
        try:
            result = await state.engine.run_exclusive(
                lambda: generate_exact(engine, prompt, params, asked)
            )
        except EngineNotRunningError as err:
            reason = "error"
            raise admission_error(err) from err
        except (ValueError, TypeError) as err:  # generate refused the option combination
            reason = "error"
            raise APIError(422, f"the exact lane failed: {err}", field=asked[0]) from err
        except Exception:
            reason = "error"
            raise
        completions = [Completion(i) for i in range(params.num_return_sequences)]
        for seq in result.outputs:
            completions[seq.index].add(seq, decoder(state))
        generated = sum(len(c.steps) for c in completions)
        reason = (completions[0].finish_reason or FinishReason.LENGTH).value
        return completions, result.diagnostics
    finally:
        state.inflight -= 1
        state.metrics.observe_finished(ctx.endpoint, reason, len(prompt), generated)
        record = {
            "event": "generation",
            "lane": "exact",
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "prompt_tokens": len(prompt),
            "generated_tokens": generated,
            "finish_reason": reason,
            "latency_s": round(time.perf_counter() - start, 4),
            "user": ctx.user,
        }
        logger.info(json.dumps(record, ensure_ascii=False))
