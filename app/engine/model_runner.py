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

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, repeat

import torch

from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.outputs import PromptLogprob
from app.engine.step_timing import StepTimer
from app.modeling.attention_metadata import build_step_input
from app.modeling.batch_invariant import BatchInvariant
from app.modeling.cuda_graphs import DecodeGraphs
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
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
    ) -> None:
        """``enforce_eager``: never capture CUDA graphs. ``static_decode``: run all-decode
        steps through the padded fixed-shape forward (default: where graphs are captured,
        i.e. on CUDA unless ``enforce_eager``); True without graphs runs it eagerly (tests)."""
        self.config = hf_model.config
        self.hf_model = hf_model  # kept for transformers-side preparation (beam search)
        self.model = PagedGPT2.from_hf(
            hf_model, linear_backend, quantize, native_kernels, batch_invariant
        )
        # Packs weights and builds the native kernels now: a bad backend fails at start-up.
        self.model.linears()
        self.model.uses_native()
        self.device = next(hf_model.parameters()).device
        self.dtype = self.model.dtype
        self.block_size = block_size
        capture = self.device.type == "cuda" and not enforce_eager
        padded = capture if static_decode is None else static_decode
        # The padded decode needs one scratch block that the block manager never hands out:
        # block `num_blocks`, past the managed pool.
        self.kv_cache = KVCache.allocate(
            self.config, num_blocks + int(padded), block_size, self.dtype, self.device
        )
        self.step_timer = StepTimer(self.device)
        # Concatenated weights of the adapter sets recent steps ran (app/modeling/lora.py).
        self.lora_stacks = LoRAStacks()
        self.decode_graphs: DecodeGraphs | None = None
        if padded:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, max_num_seqs, num_blocks)
            if capture:
                self.decode_graphs.capture()

    @property
    def num_decode_graphs(self) -> int:
        """CUDA graphs captured for decode steps (0 on CPU or with enforce_eager)."""
        return len(self.decode_graphs.graphs) if self.decode_graphs is not None else 0

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [num sampling seqs, vocab], rows in the order of `out.seqs` that sample."""
        return self.execute_step(out).logits

    @torch.inference_mode()
    def execute_step(self, out: SchedulerOutput) -> StepResult:
        """The step's forward: sampling logits, and prompt log-probs where chunks ask."""
        self.kv_cache.copy_blocks(out.cow_copies)
        asking = any(item.prompt_targets for item in out.seqs)
        lora = any(item.lora is not None for item in out.seqs)
        # Graphs return sampling rows only, and are captured without LoRA updates: a step
        # with adapter rows runs the eager varlen forward.
        graphs = None if asking or lora else self.decode_graphs
        shape = graphs.shape_for(out.seqs) if graphs is not None else None
        prompt: list[tuple[ScheduledSeq, list[PromptLogprob]]] = []
        if graphs is not None and shape is not None:
            rows = graphs.prepare(out.seqs, shape)
            self.step_timer.forward_started()
            logits = graphs.run(shape, rows)
        else:
            step = build_step_input(
                out.seqs,
                self.block_size,
                self.device,
                max_positions=self.config.n_positions,
                paged_decode=self.model.paged_decode,
                paged_chunk_tokens=self.model.paged_chunk_tokens,
            )
            if lora:  # each token row runs with its sequence's adapter (None: the base)
                rows = chain.from_iterable(
                    repeat(item.lora, len(item.token_ids)) for item in out.seqs
                )
                step.lora = StepLoRA.build(rows, self.device, self.lora_stacks)
            self.step_timer.forward_started()
            if asking:
                hidden = self.model.forward_hidden(step, self.kv_cache)
                logits = self.model.head(hidden.index_select(0, step.logits_indices))
                prompt = self._prompt_logprobs(out.seqs, hidden)
            else:
                logits = self.model(step, self.kv_cache)
        self.step_timer.forward_finished()
        return StepResult(logits, prompt)

    def _prompt_logprobs(
        self, seqs: list[ScheduledSeq], hidden: torch.Tensor
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
        scored = iter(score_prompt_rows(self.model.head, hidden, rows, targets, top_n, vocab))
        result = []
        for item in seqs:
            if item.prompt_targets:
                entries = [next(scored) for _ in item.prompt_targets]
                for entry in entries:
                    del entry.top[item.prompt_top_n :]
                result.append((item, entries))
        return result


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
