"""Micro-benchmark of one decode step of the paged GPT-2 forward (not a test).

    python -m tests.benchmarks.forward_micro [--seqs 64] [--ctx 70] [--threads 2]

A random GPT-2 of kogpt2-base shape (12 layers, 768 wide, 12 heads, vocab 51200) is built
in-process (seeded); the KV cache is filled with random values (their content does not
change the work) and ``--seqs`` sequences with contexts around ``--ctx`` tokens, on
shuffled block ids, decode one token each. Printed (median of ``--repeat`` runs):

1. the full paged forward (and build_step_input on its own);
2. the "linear bound": the same matmuls (c_attn, c_proj, c_fc, mlp c_proj per layer + the LM
   head) on [seqs, 768] inputs, without layer norms, activations or attention;
3. attention + KV write for all layers, as the forward runs it (on a float32 CPU with a C
   compiler: the native kernel reading blocks in place, app/modeling/native.py;
   else whole-block gather + one SDPA call per decode batch of <= CPU_DECODE_BATCH_TOKENS
   keys), and, interleaved with it, the alternatives that were tried, each checked against
   it: the torch path when the kernel is the kept one, all
   decodes in one SDPA batch (block gather / per-slot gather), per-slot gather + explicit
   matmul/softmax/matmul, one SDPA call per sequence, FlexAttention without torch.compile.

Timings are medians of interleaved runs; on a shared machine, compare ratios rather than
absolute times (``--threads 1`` is steadier when other processes use the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from app.modeling.attention_metadata import (
    CPU_DECODE_BATCH_TOKENS,
    SeqChunk,
    build_step_input,
)
from app.modeling.gpt2 import PagedGPT2
from app.modeling.kv_cache import KVCache
from tests.benchmarks.linear_micro import block_matmuls


def timeit(fn, repeat: int, warmup: int = 2) -> float:
    return interleaved([fn], repeat, warmup)[0]


def interleaved(fns, repeat: int, warmup: int = 1) -> list[float]:
    """Median seconds of each fn, runs interleaved so background load hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def make_step(n_seqs: int, ctx: int, block_size: int, num_blocks: int, gen: torch.Generator):
    lens = torch.randint(max(2, ctx - 10), ctx + 11, (n_seqs,), generator=gen).tolist()
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    seqs, used = [], 0
    for n in lens:
        nb = (n + block_size - 1) // block_size
        table = perm[used : used + nb]
        used += nb
        seqs.append(
            SeqChunk(
                token_ids=[int(torch.randint(0, 51200, (1,), generator=gen))],
                start_pos=n - 1,
                block_table=table,
                sample=True,
            )
        )
    return seqs


# --- attention alternatives (same inputs and output as PagedGPT2.attention, decode only) ---


class SlotIndex:
    """Per-slot gather indices [D, L] for the alternatives (padding repeats the last slot)."""

    def __init__(self, seqs: list[SeqChunk], block_size: int):
        ctx = torch.tensor([s.start_pos + 1 for s in seqs])
        self.D, self.L = len(seqs), int(ctx.max())
        pos = torch.minimum(torch.arange(self.L)[None, :], (ctx - 1)[:, None])
        tables = [s.block_table + [s.block_table[-1]] * (self.L // block_size + 1) for s in seqs]
        bt = torch.tensor([t[: self.L // block_size + 1] for t in tables])
        self.slots = (bt.gather(1, pos // block_size) * block_size + pos % block_size).reshape(-1)
        self.lens = ctx.tolist()
        self.mask = (torch.arange(self.L)[None, :] < ctx[:, None])[:, None, None, :]


def attn_row_gather(model: PagedGPT2, ix: SlotIndex, q, k, v, kc, vc, step, out) -> None:
    """Per-slot gather of all decodes (index_select rows) + one SDPA call."""
    H, hd, D, L = model.n_head, model.head_dim, ix.D, ix.L
    kc.index_copy_(0, step.slot_mapping, k)
    vc.index_copy_(0, step.slot_mapping, v)
    kk = kc.index_select(0, ix.slots).view(D, L, H, hd).transpose(1, 2)
    vv = vc.index_select(0, ix.slots).view(D, L, H, hd).transpose(1, 2)
    out.copy_(
        F.scaled_dot_product_attention(
            q.unsqueeze(2), kk, vv, attn_mask=ix.mask, scale=model.scale
        ).squeeze(2)
    )


def attn_matmul(model: PagedGPT2, ix: SlotIndex, q, k, v, kc, vc, step, out) -> None:
    """Per-slot gather + explicit matmul / softmax / matmul."""
    H, hd, D, L = model.n_head, model.head_dim, ix.D, ix.L
    kc.index_copy_(0, step.slot_mapping, k)
    vc.index_copy_(0, step.slot_mapping, v)
    kk = kc.index_select(0, ix.slots).view(D, L, H, hd)
    vv = vc.index_select(0, ix.slots).view(D, L, H, hd)
    s = torch.einsum("dhe,dlhe->dhl", q, kk) * model.scale
    s = s.masked_fill(~ix.mask[:, 0], float("-inf"))
    out.copy_(torch.einsum("dhl,dlhe->dhe", torch.softmax(s, -1), vv))


def attn_per_seq(model: PagedGPT2, ix: SlotIndex, q, k, v, kc, vc, step, out) -> None:
    """One SDPA call per sequence over its exact (unpadded) context."""
    kc.index_copy_(0, step.slot_mapping, k)
    vc.index_copy_(0, step.slot_mapping, v)
    slots = ix.slots.view(ix.D, ix.L)
    for d in range(ix.D):
        ii = slots[d, : ix.lens[d]]
        out[d] = F.scaled_dot_product_attention(
            q[d].unsqueeze(1), kc[ii].transpose(0, 1), vc[ii].transpose(0, 1), scale=model.scale
        ).squeeze(1)


def attn_flex(model: PagedGPT2, ix: SlotIndex, q, k, v, kc, vc, step, out) -> None:
    """FlexAttention in eager mode (no torch.compile) over the per-slot gather."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    H, hd, D, L = model.n_head, model.head_dim, ix.D, ix.L
    kc.index_copy_(0, step.slot_mapping, k)
    vc.index_copy_(0, step.slot_mapping, v)
    kk = kc.index_select(0, ix.slots).view(D, L, H, hd).transpose(1, 2)
    vv = vc.index_select(0, ix.slots).view(D, L, H, hd).transpose(1, 2)
    mask = ix.mask[:, 0, 0]

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(mask[b, kv_idx], score, -float("inf"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = flex_attention(q.unsqueeze(2), kk, vv, score_mod=score_mod, scale=model.scale)
    out.copy_(o.squeeze(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=70)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--decode-batch-tokens", type=int, default=None, help="default: auto")
    ap.add_argument("--skip-alternatives", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=51200,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=0,
        eos_token_id=1,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    model = PagedGPT2.from_hf(hf)
    B = args.block_size
    num_blocks = args.seqs * ((args.ctx + 10 + B - 1) // B + 1)
    kv = KVCache.allocate(cfg, num_blocks, B, torch.float32, "cpu")
    for t in (*kv.keys, *kv.values):
        t.normal_()
    gen = torch.Generator().manual_seed(0)
    seqs = make_step(args.seqs, args.ctx, B, num_blocks, gen)
    cap = "auto" if args.decode_batch_tokens is None else args.decode_batch_tokens
    paged = model.paged_decode  # the native kernel's step layout
    step = build_step_input(seqs, B, "cpu", decode_batch_tokens=cap, paged_decode=paged)
    print(
        f"threads={torch.get_num_threads()} seqs={args.seqs} mean ctx="
        f"{sum(s.start_pos + 1 for s in seqs) / len(seqs):.1f}"
        f" max ctx={max(s.start_pos + 1 for s in seqs)} block_size={B}"
        f" decode batches={len(step.decode)} load avg={os.getloadavg()[0]:.2f}"
    )

    t_build = timeit(
        lambda: build_step_input(seqs, B, "cpu", decode_batch_tokens=cap, paged_decode=paged), 50
    )

    x = torch.randn(args.seqs, 768)
    linears = model.linears()  # the forward's own matmul backend (app/modeling/linear.py)
    print(f"matmul backend: {linears.backend}, native kernels: {model.uses_native()}")

    @torch.inference_mode()
    def linear_only():
        block_matmuls(linears, x)
        linears.lm_head(x)

    t_fwd, t_lin = interleaved([lambda: model(step, kv), linear_only], args.repeat)

    def plan_for(st):
        plan = model.plan(st)
        plan.qkv.copy_(qkv)  # the same random q/k/v for every variant
        return plan

    qkv = torch.randn(step.num_tokens, 3 * model.n_embd)
    plan = plan_for(step)

    def kept(q, k, v, kc, vc, st, out):
        model.attention(plan, kc, vc, st)

    def run_attn(fn):
        @torch.inference_mode()
        def f():
            for i in range(cfg.n_layer):
                fn(plan.q, plan.k, plan.v, kv.keys[i], kv.values[i], step, out)

        return f

    out = plan.out
    t_attn = timeit(run_attn(kept), args.repeat)
    ref = out.clone()
    out = torch.empty_like(ref)  # the alternatives write here

    print(f"build_step_input          {t_build * 1e3:8.2f} ms")
    print(f"paged forward (1)         {t_fwd * 1e3:8.2f} ms")
    print(f"linear + LM head bound (2) {t_lin * 1e3:7.2f} ms")
    print(
        f"ratio bound / forward     {t_lin / t_fwd:8.3f}   (with build: "
        f"{t_lin / (t_fwd + t_build):.3f})"
    )
    keys = CPU_DECODE_BATCH_TOKENS if cap == "auto" else cap
    kept_name = "native kernel" if paged else f"block gather + SDPA per batch of <= {keys} keys"
    print(f"attention+write(+gather)  {t_attn * 1e3:8.2f} ms  (12 layers, kept path: {kept_name})")
    print(
        f"rest (ln, gelu, residual) {(t_fwd - t_lin - t_attn) * 1e3:8.2f} ms"
        "  (forward - bound - attention)"
    )

    if args.skip_alternatives:
        return
    one_batch = build_step_input(seqs, B, "cpu", decode_batch_tokens=0)
    ix = SlotIndex(seqs, B)
    one_plan = plan_for(one_batch)

    def one_sdpa(q, k, v, kc, vc, st, o):
        model.attention(one_plan, kc, vc, one_batch)
        o.copy_(one_plan.out)

    alts = []
    if paged:  # the kept path is the kernel: the torch path is an alternative
        batched = build_step_input(seqs, B, "cpu", decode_batch_tokens=cap)
        batched_plan = plan_for(batched)

        def torch_path(q, k, v, kc, vc, st, o):
            model.attention(batched_plan, kc, vc, batched)
            o.copy_(batched_plan.out)

        alts.append(("block gather, SDPA per batch", torch_path))
    alts += [
        ("block gather, one SDPA batch", one_sdpa),
        ("slot gather, one SDPA batch", lambda *a: attn_row_gather(model, ix, *a)),
        ("slot gather + matmul/softmax", lambda *a: attn_matmul(model, ix, *a)),
        ("per-sequence SDPA", lambda *a: attn_per_seq(model, ix, *a)),
        ("FlexAttention eager", lambda *a: attn_flex(model, ix, *a)),
    ]
    # all variants interleaved with the kept path, so background load hits them alike
    fns = [run_attn(kept)] + [run_attn(fn) for _, fn in alts]
    times = interleaved(fns, max(3, args.repeat // 2))
    print(f"  interleaved: kept path {times[0] * 1e3:8.2f} ms")
    for (name, fn), t in zip(alts, times[1:], strict=True):
        out.zero_()
        run_attn(fn)()
        err = (out - ref).abs().max().item()
        print(f"  alt {name:30s} {t * 1e3:8.2f} ms  max|diff| {err:.2e}")


if __name__ == "__main__":
    main()
