"""Owns the KV tensors and the paged model; turns a SchedulerOutput into logits.

All-decode steps that fit the CUDA-graph ladder run the padded decode (replayed graphs on
CUDA, app/modeling/cuda_graphs.py); every other step runs the varlen forward, and so does
every step with a LoRA adapter's rows (`ScheduledSeq.lora`: the step carries the adapters'
row plan, app/modeling/lora.py; the graphs are captured for the base model only).

Prompt log-probs (SamplingParams.prompt_logprobs) are computed in the same batched forward:
the LM head runs over the prompt positions of the chunks that ask for them
(`ScheduledSeq.prompt_targets`), at most `PROMPT_LOGITS_MAX_ELEMENTS` logits at a time, so
no request materialises a [prompt_len, vocab] tensor; other rows are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat

import torch

from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.outputs import PromptLogprob
from app.engine.step_timing import StepTimer
from app.modeling.attention_metadata import build_step_input
from app.modeling.batch_invariant import BatchInvariant
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache, kv_layout
from app.modeling.linear import LinearBackend, Quantize
from app.modeling.lora import LoRAStacks, StepLoRA
from app.modeling.native import NativeKernels

# Logits (rows x vocab) of prompt positions computed at once: 2**24 (64 MiB in float32; 320
# rows of a 51,200-token vocabulary), whatever the chunk or the number of requests asking.
PROMPT_LOGITS_MAX_ELEMENTS = 1 << 24


@dataclass
class StepResult:
    """A step's forward: logits rows for the sampling sequences (in `out.seqs` order) and,
    per chunk that asked, its prompt positions' log-probs (position start_pos + 1 first)."""

    logits: torch.Tensor
    prompt_logprobs: list[tuple[ScheduledSeq, list[PromptLogprob]]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        linear_backend: LinearBackend = "auto",
        *,
        quantize: Quantize = "none",
        max_num_seqs: int = 256,
        enforce_eager: bool = False,
        static_decode: bool | None = None,
        native_kernels: NativeKernels = "auto",
        batch_invariant: BatchInvariant = "off",
        more_models: Sequence[torch.nn.Module] = (),
    ) -> None:
        """``enforce_eager``: never capture CUDA graphs. ``static_decode``: run all-decode
        steps through the padded fixed-shape forward (default: where graphs are captured,
        i.e. on CUDA unless ``enforce_eager``); True without graphs runs it eagerly (tests).
        ``more_models``: the server's other full models (model 1, 2, ...; ``hf_model`` is
        model 0), on the same device, dtype and vocabulary: their requests share the block
        pool and run in the same steps, one forward per model."""
        self.config = hf_model.config
        self.hf_models = [hf_model, *more_models]
        self.models = [
            PagedGPT2.from_hf(m, linear_backend, quantize, native_kernels, batch_invariant)
            for m in self.hf_models
        ]
        for model in self.models:  # packs weights, builds native kernels: fail at start-up
            model.linears()
            model.uses_native()
        self.hf_model = hf_model  # model 0's, for transformers-side preparation (beam search)
        self.model = self.models[0]
        self.device = next(hf_model.parameters()).device
        self.dtype = self.model.dtype
        self.block_size = block_size
        capture = self.device.type == "cuda" and not enforce_eager
        padded = capture if static_decode is None else static_decode
        # The padded decode needs one scratch block that the block manager never hands out:
        # block `num_blocks`, past the managed pool. Models of one KV layout (fine-tunes of
        # one base) write into the same tensors: a block id is storage for any of them, and
        # the prefix cache's per-model salt keeps one model from reading another's blocks.
        # A model of another layout gets its own tensors over the same block ids.
        layouts: dict[tuple[int, int, int], KVCache] = {}
        self.kv_caches: list[KVCache] = []
        for config in (m.config for m in self.hf_models):
            layout = kv_layout(config)
            if layout not in layouts:
                layouts[layout] = KVCache.allocate(
                    config, num_blocks + int(padded), block_size, self.dtype, self.device
                )
            self.kv_caches.append(layouts[layout])
        self.kv_cache = self.kv_caches[0]
        self.step_timer = StepTimer(self.device)
        # Concatenated weights of the adapter sets recent steps ran (app/modeling/lora.py).
        self.lora_stacks = LoRAStacks()
        self.graphs: list[DecodeGraphs | None] = [None] * len(self.models)
        if padded:
            for i, (model, kv) in enumerate(zip(self.models, self.kv_caches, strict=True)):
                self.graphs[i] = DecodeGraphs(model, kv, max_num_seqs, num_blocks)
                if capture:
                    self.graphs[i].capture()
        self.decode_graphs = self.graphs[0]

    @property
    def num_decode_graphs(self) -> int:
        """CUDA graphs captured for decode steps, all models (0 on CPU or enforce_eager)."""
        return sum(len(g.graphs) for g in self.graphs if g is not None)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write block copies in every KV layout's tensors."""
        for kv in {id(kv): kv for kv in self.kv_caches}.values():
            kv.copy_blocks(copies)

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [num sampling seqs, vocab], rows in the order of `out.seqs` that sample."""
        return self.execute_step(out).logits

    @torch.inference_mode()
    def execute_step(
        self, out: SchedulerOutput, handed_off: torch.Tensor | None = None
    ) -> StepResult:
        """The step's forward: sampling logits, and prompt log-probs where chunks ask. With
        several models in the step, one forward per model, the logits rows put back in
        `out.seqs` order. ``handed_off``: the previous step's sampled tokens, on the device,
        that input ids ``handed_off_id(j)`` stand for (async scheduling)."""
        self.copy_blocks(out.cow_copies)
        first = out.seqs[0].model if out.seqs else 0
        if all(item.model == first for item in out.seqs):
            return self._forward(first, out.seqs, handed_off)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(out.seqs):
            groups.setdefault(item.model, []).append(i)
        # Each sequence's logits rows: its chunk's tokens (drafts to verify), 1 or none.
        counts = [len(s.token_ids) if s.all_logits else int(s.sample) for s in out.seqs]
        starts = list(accumulate(counts, initial=0))
        parts: list[torch.Tensor] = []
        order: list[int] = []  # for each row of cat(parts), its row in out.seqs order
        prompt: list[tuple[ScheduledSeq, list[PromptLogprob]]] = []
        for model, members in groups.items():
            result = self._forward(model, [out.seqs[i] for i in members], handed_off)
            parts.append(result.logits)
            prompt.extend(result.prompt_logprobs)
            for i in members:
                order.extend(range(starts[i], starts[i] + counts[i]))
        logits = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        logits = logits.index_select(0, inverse.to(logits.device))
        return StepResult(logits, prompt)

    def _forward(
        self, index: int, seqs: list[ScheduledSeq], handed_off: torch.Tensor | None
    ) -> StepResult:
        """One model's forward over its sequences of the step."""
        model, kv = self.models[index], self.kv_caches[index]
        asking = any(item.prompt_targets for item in seqs)
        lora = any(item.lora is not None for item in seqs)
        # Graphs return sampling rows only, and are captured without LoRA updates: a step
        # with adapter rows runs the eager varlen forward.
        graphs = None if asking or lora else self.graphs[index]
        shape = graphs.shape_for(seqs) if graphs is not None else None
        prompt: list[tuple[ScheduledSeq, list[PromptLogprob]]] = []
        if graphs is not None and shape is not None:
            rows = graphs.prepare(seqs, shape)
            if handed_off is not None:
                take_handed_off(graphs.buffers.input_ids[: len(seqs)], handed_off)
            self.step_timer.forward_started()
            logits = graphs.run(shape, rows)
        else:
            step = build_step_input(
                seqs,
                self.block_size,
                self.device,
                max_positions=model.n_positions,
                paged_decode=model.paged_decode,
                paged_chunk_tokens=model.paged_chunk_tokens,
            )
            if handed_off is not None:
                take_handed_off(step.input_ids, handed_off)
            if lora:  # each token row runs with its sequence's adapter (None: the base)
                rows = chain.from_iterable(repeat(item.lora, len(item.token_ids)) for item in seqs)
                step.lora = StepLoRA.build(rows, self.device, self.lora_stacks)
            self.step_timer.forward_started()
            if asking:
                hidden = model.forward_hidden(step, kv)
                logits = model.head(hidden.index_select(0, step.logits_indices))
                prompt = self._prompt_logprobs(model, seqs, hidden)
            else:
                logits = model(step, kv)
        self.step_timer.forward_finished()
        return StepResult(logits, prompt)

    def _prompt_logprobs(
        self, model: PagedGPT2, seqs: list[ScheduledSeq], hidden: torch.Tensor
    ) -> list[tuple[ScheduledSeq, list[PromptLogprob]]]:
        """The asking chunks' prompt rows through ln_f and the LM head (score_prompt_rows)."""
        rows: list[int] = []
        targets: list[int] = []
        first = 0  # each chunk's first row in the step's flat batch
        for item in seqs:
            rows.extend(range(first, first + len(item.prompt_targets)))
            targets.extend(item.prompt_targets)
            first += len(item.token_ids)
        top_n = max(item.prompt_top_n for item in seqs if item.prompt_targets)
        vocab = int(self.config.vocab_size)
        scored = iter(score_prompt_rows(model.head, hidden, rows, targets, top_n, vocab))
        result = []
        for item in seqs:
            if item.prompt_targets:
                entries = [next(scored) for _ in item.prompt_targets]
                for entry in entries:
                    del entry.top[item.prompt_top_n :]
                result.append((item, entries))
        return result


def handed_off_id(index: int) -> int:
    """The input id that stands for ``handed_off[index]`` (execute_step): the sampled token
    of the step before, still on the device (async scheduling: the host does not know it
    yet). Negative, so no vocabulary id; -1 stays async scheduling's placeholder."""
    return -2 - index


def take_handed_off(ids: torch.Tensor, handed_off: torch.Tensor) -> None:
    """In place, on the device, no host sync: every ``handed_off_id(j)`` in ``ids`` becomes
    ``handed_off[j]`` (vLLM v1 scatters the previous step's sampled ids into the next
    step's input ids the same way)."""
    index = (-2 - ids).clamp_(0, max(handed_off.numel() - 1, 0))
    ids.copy_(torch.where(ids <= -2, handed_off.index_select(0, index), ids))


def score_prompt_rows(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    rows: list[int],
    targets: list[int],
    top_n: int,
    vocab_size: int,
) -> list[PromptLogprob]:
    """log_softmax of `head(hidden[row])` for each row: the target's log-prob and rank, and
    the `top_n` most likely tokens. The head runs on at most PROMPT_LOGITS_MAX_ELEMENTS
    logits at a time; float16 / bfloat16 logits are scored in float32."""
    out: list[PromptLogprob] = []
    per_slice = max(1, PROMPT_LOGITS_MAX_ELEMENTS // vocab_size)
    for start in range(0, len(rows), per_slice):
        index = torch.tensor(
            rows[start : start + per_slice], dtype=torch.long, device=hidden.device
        )
        target = torch.tensor(
            targets[start : start + per_slice], dtype=torch.long, device=hidden.device
        )
        scores = head(hidden.index_select(0, index))
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # as the sampler's log-probs
        lp = torch.log_softmax(scores, dim=-1)
        own = lp.gather(1, target[:, None])
        logprobs = own[:, 0].tolist()
        ranks = (lp >= own).sum(dim=-1).tolist()
        n = len(logprobs)
        top_ids: list[list[int]] = [[] for _ in range(n)]
        top_values: list[list[float]] = [[] for _ in range(n)]
        if top_n:
            values, ids = torch.topk(lp, min(top_n, lp.shape[-1]), dim=-1)
            top_ids, top_values = ids.tolist(), values.tolist()
        for i in range(n):
            top = list(zip(top_ids[i], top_values[i], strict=True))
            out.append(PromptLogprob(targets[start + i], logprobs[i], ranks[i], top))
    return out
