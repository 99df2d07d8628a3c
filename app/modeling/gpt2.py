"""GPT-2 forward over the paged KV cache, with the weights of a transformers GPT2LMHeadModel.

``PagedGPT2.from_hf(model)`` keeps references to the HF modules (no weight copy), and
``forward(step, kv_cache)`` runs one varlen step: every sequence's new tokens in one flat
``[T, n_embd]`` batch (prefill chunks, continued chunks and decodes mixed), K/V written to
the cache slots, attention over each sequence's whole context, and ln_f + LM head only on
the rows whose logits are needed. It follows HF's arithmetic op for op (Conv1D as
``addmm(bias, x, W)``, layer norms, residual order, SDPA attention, the configured
activation: ACT2FN's, or for gelu_new an equal but faster formula), so logits match
``GPT2LMHeadModel`` to rounding (~1e-15 in float64, ~1e-5 in float32). The matmuls go through
app/modeling/linear.py: HF's own ops, or on a float32 CPU oneDNN with prepacked weights
(or, with quantize=int8, dynamic int8 matmuls: logits then differ beyond rounding). On a
float32 CPU the attention of decode rows and short chunks is one native kernel call per
layer that reads the paged blocks in place, and gelu_new one native pass (app/modeling/native.py);
on CUDA the same rows go to the Triton kernel that reads the blocks in place
(app/modeling/triton_attention.py, through torch.ops.kogpt.paged_decode_attention);
native_kernels=off: torch ops, SDPA over gathered blocks.
In batch-invariant mode (float32 CPU, app/modeling/batch_invariant.py) every token of every
chunk is a row of the native kernel and the matmuls run row-invariant, so a token's numbers
do not depend on the batch or on how its sequence was chunked (docs/reproducibility.md).

Per step, ``plan()`` builds every buffer and view the layers share (tests and the
micro-benchmark call ``plan``/``attention`` directly); per layer, ``attention()`` writes the
new k/v into their slots, then calls the native kernel for the rows it takes (decodes and
short chunks) and, for the others, gathers the contexts block by block and runs SDPA (see
app/modeling/attention_metadata.py for how sequences are batched and why).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from app.modeling.attention_metadata import (
    PAGED_CHUNK_MAX_TOKENS,
    DecodeBatch,
    PagedDecode,
    PrefillChunk,
    StepInput,
)
from app.modeling.batch_invariant import (
    PAGED_ALL_CHUNKS,
    BatchInvariant,
    resolve_batch_invariant,
    row_invariant_linears,
)
from app.modeling.kv_cache import KVCache, Workspace
from app.modeling.linear import GPT2Linears, LinearBackend, Quantize, build_linears
from app.modeling.lora import StepLoRA
from app.modeling.native import (
    NativeKernels,
    gelu_new_,
    paged_decode_attention,
    resolve_native_kernels,
)
from app.modeling.paged_attention_op import paged_decode_attention as triton_paged_attention
from app.modeling.paged_attention_op import triton_available

DecodeKernel = Literal["native", "triton"]
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger("kogpt.native")


def resolve_decode_kernel(
    native_kernels: NativeKernels, device: torch.device, dtype: torch.dtype, uses_native: bool
) -> DecodeKernel | None:
    """The kernel that attends decode rows in place: the C one on a float32 CPU, the Triton
    one (torch.ops.kogpt.paged_decode_attention) on CUDA where triton imports, unless
    native_kernels=off; None: gather the blocks and run SDPA."""
    if uses_native:
        return "native"
    if device.type != "cuda" or native_kernels == "off" or dtype not in _TRITON_DTYPES:
        return None
    ok, why = triton_available()
    if not ok:
        logger.warning("Triton decode attention off (gather + SDPA on %s): %s", device, why)
        return None
    return "triton"


_GELU_C = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    y = x * x
    y.mul_(0.044715 * _GELU_C).add_(_GELU_C).mul_(x)  # 2 sqrt(2/pi) (x + 0.044715 x^3)
    return y.sigmoid_().mul_(x)


def _row_by_row(
    act: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``act`` applied to one row at a time (batch-invariant mode): torch's elementwise
    loops split a whole [T, n] tensor into threads' ranges and vector tails at offsets that
    follow T, and a transcendental's scalar tail may round differently from its vector body."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([act(row) for row in x]) if x.shape[0] else act(x)

    return apply


@dataclass
class _DecodeView:
    batch: DecodeBatch
    q: torch.Tensor | None  # [n, H, 1, hd] view of the qkv buffer; None: index_select rows
    k_buf: torch.Tensor  # [n * nb, B * H * hd] gather target (whole blocks)
    v_buf: torch.Tensor
    k: torch.Tensor  # [n, H, nb * B, hd] view of k_buf
    v: torch.Tensor
    mask: torch.Tensor | None  # additive (0 / -inf) [n, 1, 1, nb * B] in the model dtype


@dataclass
class _PrefillView:
    chunk: PrefillChunk
    # 4-D [1, H, n, hd] views: SDPA's flash and memory-efficient kernels (CUDA) and its CPU
    # flash kernel take only 4-D inputs; 3-D ones fall back to the math path (a full score
    # matrix; measured ~8x slower for a 512-token chunk on the 2-core CPU).
    q: torch.Tensor  # [1, H, n, hd] view of the qkv buffer
    k: torch.Tensor  # [1, H, ctx, hd]: fresh k (start_pos 0) or a view of k_buf
    v: torch.Tensor
    k_buf: torch.Tensor | None  # [nb, B * H * hd] gather target when the chunk has a past
    v_buf: torch.Tensor | None
    mask: torch.Tensor | None  # additive [n, ctx]; None: is_causal


@dataclass
class AttentionPlan:
    """Everything every layer reuses in a step: buffers, views of them, additive masks.

    c_attn writes each layer's q/k/v into ``qkv`` (addmm out=), so all the per-batch views
    (queries, gather targets, transposed K/V) are made once per step instead of per layer.
    """

    qkv: torch.Tensor  # [T, 3 * n_embd]
    q: torch.Tensor  # [T, H, hd] views of qkv
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # [T, H, hd] attention output, every row rewritten by every layer
    decode: list[_DecodeView]
    prefill: list[_PrefillView]
    paged: PagedDecode | None = None  # rows the native kernel attends (decodes, short chunks)


class PagedGPT2(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        linear_backend: LinearBackend = "auto",
        quantize: Quantize = "none",
        native_kernels: NativeKernels = "auto",
        batch_invariant: BatchInvariant = "off",
    ) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise NotImplementedError("scale_attn_by_inverse_layer_idx=True is not supported")
        if getattr(config, "reorder_and_upcast_attn", False):
            raise NotImplementedError("reorder_and_upcast_attn=True is not supported")
        if getattr(config, "add_cross_attention", False):
            raise NotImplementedError("cross-attention GPT-2 is not supported")
        self.config = config
        tr = model.transformer
        # Submodule references: the parameters are the HF model's own tensors (shared, so a
        # .to(dtype/device) on either moves both).
        self.wte = tr.wte
        self.wpe = tr.wpe
        self.h = tr.h
        self.ln_f = tr.ln_f
        self.lm_head = model.lm_head
        self.n_embd = config.n_embd
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.layer_norm_epsilon
        # gelu_new (GPT-2's activation) as x * sigmoid(2u) == 0.5 x (1 + tanh(u)): the same
        # function, 2x faster on CPU (tanh is the slowest op of a decode step after the
        # matmuls); results differ from ACT2FN's by rounding only (<= 2e-15 in float64).
        if config.activation_function == "gelu_new":
            self.act = gelu_new
        else:
            self.act = ACT2FN[config.activation_function]
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.n_positions = config.n_positions
        self._ws = Workspace()
        self.linear_backend = linear_backend
        self.quantize = quantize  # int8: dynamic int8 matmuls (linear.py), float32 CPU only
        self._linears: GPT2Linears | None = None
        self._linears_key: tuple | None = None
        # The C kernels (decode attention reading blocks in place, gelu_new in one pass;
        # app/modeling/native.py), resolved per device and dtype like the matmuls.
        self.native_kernels = native_kernels
        self._native_resolved: tuple[tuple, bool] | None = None
        self._decode_kernel_resolved: tuple[tuple, DecodeKernel | None] | None = None
        # Batch-invariant mode (app/modeling/batch_invariant.py): row-invariant matmuls and
        # every token's attention as one native kernel row; resolved per device and dtype.
        self.batch_invariant = batch_invariant
        self._invariant_resolved: tuple[tuple, bool] | None = None

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        linear_backend: LinearBackend = "auto",
        quantize: Quantize = "none",
        native_kernels: NativeKernels = "auto",
        batch_invariant: BatchInvariant = "off",
    ) -> PagedGPT2:
        return cls(model, linear_backend, quantize, native_kernels, batch_invariant).eval()

    def is_batch_invariant(self) -> bool:
        """Whether steps run batch-invariant for the weights' current device and dtype
        (ValueError when batch_invariant=on cannot run there)."""
        key = (self.device, self.dtype)
        if self._invariant_resolved is None or self._invariant_resolved[0] != key:
            chosen = resolve_batch_invariant(
                self.batch_invariant, self.device, self.dtype, self.quantize, self.uses_native()
            )
            self._invariant_resolved = (key, chosen)
        return self._invariant_resolved[1]

    @property
    def paged_chunk_tokens(self) -> int:
        """Longest chunk whose tokens build_step_input hands to the paged kernel row by row:
        every chunk in batch-invariant mode (SDPA's tiling would follow the chunk length)."""
        return PAGED_ALL_CHUNKS if self.is_batch_invariant() else PAGED_CHUNK_MAX_TOKENS

    def uses_native(self) -> bool:
        """Whether the C kernels run for the weights' current device and dtype (ValueError
        when native_kernels=on cannot run there)."""
        key = (self.device, self.dtype)
        if self._native_resolved is None or self._native_resolved[0] != key:
            chosen = resolve_native_kernels(self.native_kernels, self.device, self.dtype)
            self._native_resolved = (key, chosen)
        return self._native_resolved[1]

    def decode_kernel(self) -> DecodeKernel | None:
        """The kernel that reads decode rows' K/V blocks in place for the weights' current
        device and dtype: "native" (C, float32 CPU), "triton" (CUDA), or None (gather +
        SDPA)."""
        key = (self.device, self.dtype)
        if self._decode_kernel_resolved is None or self._decode_kernel_resolved[0] != key:
            chosen = resolve_decode_kernel(
                self.native_kernels, self.device, self.dtype, self.uses_native()
            )
            self._decode_kernel_resolved = (key, chosen)
        return self._decode_kernel_resolved[1]

    @property
    def paged_decode(self) -> bool:
        """Whether steps for this model are built with ``paged_decode=True``."""
        return self.decode_kernel() is not None

    def linears(self) -> GPT2Linears:
        """The matmuls (app/modeling/linear.py), built on first use and again whenever the
        weights moved to another device or dtype (packed copies do not follow ``.to``)."""
        key = (self.device, self.dtype, self.wte.weight.data_ptr())
        if self._linears is None or self._linears_key != key:
            self._linears = build_linears(
                self.h, self.lm_head, self.linear_backend, self.device, self.dtype, self.quantize
            )
            if self.is_batch_invariant():
                self._linears = row_invariant_linears(
                    self._linears, self.h, self.lm_head, self.dtype
                )
            self._linears_key = key
        return self._linears

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @torch.inference_mode()
    def forward(self, step: StepInput, kv_cache: KVCache) -> torch.Tensor:
        """Logits [len(step.logits_indices), vocab] in the model's dtype."""
        # ln_f and the LM head (the largest matmul) only for rows whose logits are used.
        return self.head(self.forward_hidden(step, kv_cache).index_select(0, step.logits_indices))

    @torch.inference_mode()
    def forward_hidden(self, step: StepInput, kv_cache: KVCache) -> torch.Tensor:
        """The last block's hidden states [T, n_embd] of every row (before ln_f): the caller
        runs ``head`` on the rows it needs (prompt log-probs: model_runner.py)."""
        if kv_cache.block_size != step.block_size:
            raise ValueError(f"cache block_size {kv_cache.block_size} != step {step.block_size}")
        if kv_cache.dtype != self.dtype:
            raise ValueError(f"cache dtype {kv_cache.dtype} != model dtype {self.dtype}")
        if step.max_position >= self.n_positions:
            raise ValueError(f"position {step.max_position} >= n_positions {self.n_positions}")
        if step.paged_decode is not None and not self.paged_decode:
            raise ValueError(
                "a paged_decode step needs the native kernels (C on CPU, Triton on CUDA)"
            )
        if (step.decode or step.prefills) and self.is_batch_invariant():
            raise ValueError(
                "a batch-invariant model attends every token with the paged kernel: build the "
                "step with paged_decode=True, paged_chunk_tokens=model.paged_chunk_tokens"
            )

        plan = self.plan(step)
        hidden = self.run_layers(
            self.embed(step.input_ids, step.positions),
            plan.qkv,
            plan.out,
            lambda i: self.attention(plan, kv_cache.keys[i], kv_cache.values[i], step),
            step.lora,
        )
        return hidden

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.wte.weight) + F.embedding(positions, self.wpe.weight)

    def run_layers(
        self,
        hidden: torch.Tensor,
        qkv: torch.Tensor,
        attn_out: torch.Tensor,
        attend: Callable[[int], None],
        lora: StepLoRA | None = None,
    ) -> torch.Tensor:
        """The transformer blocks over ``hidden`` [T, n_embd]. Each layer writes its q/k/v
        into ``qkv`` [T, 3 * n_embd]; ``attend(i)`` turns them into ``attn_out`` [T, H, hd].
        ``lora``: adapters' rows; each adds its low-rank update after every Conv1D it targets
        (app/modeling/lora.py). Shared by this forward and the fixed-shape decode
        (app/modeling/static_decode.py)."""
        T, E = hidden.shape
        act = gelu_new_ if self.act is gelu_new and self.uses_native() else self.act
        invariant = self.is_batch_invariant()
        if act is not gelu_new_ and invariant:
            act = _row_by_row(act)
        if lora:
            return self._run_layers_lora(hidden, qkv, attn_out, attend, lora, act, invariant)
        for i, (block, lin) in enumerate(zip(self.h, self.linears().blocks, strict=True)):
            x = F.layer_norm(hidden, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            lin.qkv(x, out=qkv)  # the caller's views of qkv are this layer's q/k/v
            attend(i)
            hidden = hidden + lin.attn_proj(attn_out.view(T, E))
            x = F.layer_norm(hidden, (E,), block.ln_2.weight, block.ln_2.bias, self.eps)
            x = act(lin.fc(x))
            hidden = hidden + lin.mlp_proj(x)
        return hidden

    def _run_layers_lora(
        self,
        hidden: torch.Tensor,
        qkv: torch.Tensor,
        attn_out: torch.Tensor,
        attend: Callable[[int], None],
        lora: StepLoRA,
        act: Callable[[torch.Tensor], torch.Tensor],
        invariant: bool,
    ) -> torch.Tensor:
        """``run_layers`` with each adapter's update added to its rows after every Conv1D
        (the base matmul once over all rows; peft's unmerged forward for the adapters')."""
        T, E = hidden.shape
        for i, (block, lin) in enumerate(zip(self.h, self.linears().blocks, strict=True)):
            x = F.layer_norm(hidden, (E,), block.ln_1.weight, block.ln_1.bias, self.eps)
            lin.qkv(x, out=qkv)
            lora.add(qkv, x, i, "attn.c_attn", invariant)  # before attention reads q/k/v
            attend(i)
            a = attn_out.view(T, E)
            hidden = hidden + lora.add(lin.attn_proj(a), a, i, "attn.c_proj", invariant)
            x = F.layer_norm(hidden, (E,), block.ln_2.weight, block.ln_2.bias, self.eps)
            x = act(lora.add(lin.fc(x), x, i, "mlp.c_fc", invariant))
            hidden = hidden + lora.add(lin.mlp_proj(x), x, i, "mlp.c_proj", invariant)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """ln_f and the LM head: logits [rows, vocab] in the model's dtype."""
        E = self.n_embd
        hidden = F.layer_norm(hidden, (E,), self.ln_f.weight, self.ln_f.bias, self.eps)
        return self.linears().lm_head(hidden)

    def _additive(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        # SDPA turns a bool mask into an additive one on every call; do it once per step.
        if mask is None:
            return None
        zeros = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
        return zeros.masked_fill_(~mask, float("-inf"))

    def plan(self, step: StepInput) -> AttentionPlan:
        """Buffers and views for ``step``, shared by all layers."""
        T, E, H, hd, B = step.num_tokens, self.n_embd, self.n_head, self.head_dim, step.block_size
        dt, dev = self.dtype, self.device
        qkv = torch.empty(T, 3 * E, dtype=dt, device=dev)
        q, k, v = (t.view(T, H, hd) for t in qkv.split(E, dim=1))
        out = torch.empty(T, H, hd, dtype=dt, device=dev)
        row = B * H * hd  # one whole block of one layer's keys (or values)

        decode = []
        if step.decode:
            most = max(d.num_seqs * d.num_blocks for d in step.decode)
            k_all = self._ws.get("k", (most, row), dt, dev)
            v_all = self._ws.get("v", (most, row), dt, dev)
            masks = self._additive(step.decode_mask)  # one conversion for all batches
            for d in step.decode:
                n, nb = d.num_seqs, d.num_blocks
                kb, vb = k_all[: n * nb], v_all[: n * nb]
                qd = q[d.row_slice].unsqueeze(2) if d.row_slice is not None else None
                mask = None
                if d.mask is not None:
                    mask = masks[d.first : d.first + n, : nb * B][:, None, None, :]
                decode.append(
                    _DecodeView(
                        d,
                        qd,
                        kb,
                        vb,
                        kb.view(n, nb * B, H, hd).transpose(1, 2),  # strided view: no copy
                        vb.view(n, nb * B, H, hd).transpose(1, 2),
                        mask,
                    )
                )

        prefill = []
        past = [p.ctx_blocks.shape[0] for p in step.prefills if p.ctx_blocks is not None]
        if past:
            pk_all = self._ws.get("pk", (max(past), row), dt, dev)
            pv_all = self._ws.get("pv", (max(past), row), dt, dev)
        for p in step.prefills:
            qp = q[p.start : p.end].transpose(0, 1)[None]  # [1, H, n, hd]
            if p.ctx_blocks is None:  # fresh prompt chunk: its own k/v are the whole context
                prefill.append(
                    _PrefillView(
                        p,
                        qp,
                        k[p.start : p.end].transpose(0, 1)[None],
                        v[p.start : p.end].transpose(0, 1)[None],
                        None,
                        None,
                        None,
                    )
                )
            else:  # continued chunk / prefix hit: gathered context, causal mask offset
                nb = p.ctx_blocks.shape[0]
                kb, vb = pk_all[:nb], pv_all[:nb]
                prefill.append(
                    _PrefillView(
                        p,
                        qp,
                        kb.view(nb * B, H, hd)[: p.ctx_len].transpose(0, 1)[None],
                        vb.view(nb * B, H, hd)[: p.ctx_len].transpose(0, 1)[None],
                        kb,
                        vb,
                        self._additive(p.mask),
                    )
                )
        return AttentionPlan(qkv, q, k, v, out, decode, prefill, step.paged_decode)

    def attention(
        self, plan: AttentionPlan, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepInput
    ) -> None:
        """One layer's paged attention: plan.q/k/v -> plan.out (both [T, H, hd])."""
        H, hd, B = self.n_head, self.head_dim, step.block_size
        # Write this step's k/v first: decodes and continued chunks then read their whole
        # context (cached + new) from the cache in one gather.
        k_cache.index_copy_(0, step.slot_mapping, plan.k)
        v_cache.index_copy_(0, step.slot_mapping, plan.v)
        # Whole blocks as rows: one memcpy of B * H * hd values per block, faster than
        # per-slot rows. A decode batch's gathered K/V (~1 MB each on CPU) are still in
        # cache when SDPA reads them.
        k_blocks = k_cache.view(-1, B * H * hd)
        v_blocks = v_cache.view(-1, B * H * hd)
        out = plan.out
        if plan.paged is not None:
            pd = plan.paged
            if self.decode_kernel() == "triton":
                triton_paged_attention(
                    plan.q, k_cache, v_cache, pd.block_tables, pd.context_lens, pd.rows, out,
                    B, pd.max_context, self.scale,
                )  # fmt: skip
            else:
                paged_decode_attention(
                    plan.q, k_cache, v_cache, pd.block_tables, pd.context_lens, pd.rows, out,
                    B, pd.max_context, self.scale,
                )  # fmt: skip
        for d in plan.decode:
            b = d.batch
            torch.index_select(k_blocks, 0, b.blocks, out=d.k_buf)
            torch.index_select(v_blocks, 0, b.blocks, out=d.v_buf)
            qd = d.q if d.q is not None else plan.q.index_select(0, b.rows).unsqueeze(2)
            o = F.scaled_dot_product_attention(qd, d.k, d.v, attn_mask=d.mask, scale=self.scale)
            if b.row_slice is not None:
                out[b.row_slice] = o.view(b.num_seqs, H, hd)
            else:
                out.index_copy_(0, b.rows, o.view(b.num_seqs, H, hd))

        for p in plan.prefill:
            if p.k_buf is None:
                o = F.scaled_dot_product_attention(p.q, p.k, p.v, is_causal=True, scale=self.scale)
            else:
                torch.index_select(k_blocks, 0, p.chunk.ctx_blocks, out=p.k_buf)
                torch.index_select(v_blocks, 0, p.chunk.ctx_blocks, out=p.v_buf)
                o = F.scaled_dot_product_attention(
                    p.q, p.k, p.v, attn_mask=p.mask, scale=self.scale
                )
            out[p.chunk.start : p.chunk.end] = o[0].transpose(0, 1)
