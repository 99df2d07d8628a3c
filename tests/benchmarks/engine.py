"""In-engine throughput benchmark (a script, never a test): `python -m tests.benchmarks.engine`.

Same prompts, same run, greedy, fixed output length. For each concurrency it measures:
- this engine (continuous batching over the paged KV cache), the same on torch ops only
  (no native kernels: gather + SDPA decode attention), and the same with
  quantize=int8 (dynamic int8 matmuls, side by side with CTranslate2 int8), and the same
  with batch-invariant mode the other way round from --batch-invariant (default auto: on
  for float32 CPU), whose cost is printed (app/modeling/batch_invariant.py);
- transformers `generate` one request at a time (sequential);
- transformers `generate` on one static, left-padded batch;
- transformers continuous batching (`generate_batch`);
- CTranslate2 `generate_batch`, fp32 and int8 (tests/benchmarks/ct2_peer.py), with the
  share of our greedy outputs it reproduces exactly in fp32;
- a roofline-style bound: the linear layers + LM head alone, on the same token counts.
It prints tokens/s and ratios and writes JSON and a PNG plot (docs/benchmarks/ by default).
Numbers are ratios measured side by side in one run: machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GPT2LMHeadModel

from app.engine.async_scheduling import AsyncScheduling
from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.batch_invariant import BatchInvariant
from app.modeling.linear import LinearBackend, Quantize, build_linears
from app.modeling.loader import load_model
from app.modeling.native import NativeKernels
from app.options.params import SamplingParams
from tests.benchmarks.linear_micro import block_matmuls

ROOT = Path(__file__).resolve().parents[2]


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(7, vocab, (n_tok,), generator=gen).tolist() for n_tok in lengths]


def bench_engine(
    model: GPT2LMHeadModel,
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    options: list[dict[str, Any]] | None = None,
    token_ids: dict[str, list[int]] | None = None,
    linear_backend: LinearBackend = "auto",
    quantize: Quantize = "none",
    native_kernels: NativeKernels = "auto",
    batch_invariant: BatchInvariant = "auto",
    async_scheduling: AsyncScheduling = "auto",
) -> dict[str, float]:
    """Throughput of our engine; `token_ids`, when given, receives each request's output
    (emptied first: a repeated run replaces, not extends, what an earlier one wrote)."""
    if token_ids is not None:
        token_ids.clear()
    block_size = 16
    per_seq = -(-(max(map(len, prompts)) + new_tokens) // block_size)
    engine = LLMEngine(
        model,
        tokenizer,
        EngineConfig(
            num_blocks=per_seq * len(prompts) + 8,
            block_size=block_size,
            max_num_seqs=max(256, len(prompts)),
            max_num_batched_tokens=2048,
            linear_backend=linear_backend,
            quantize=quantize,
            native_kernels=native_kernels,
            batch_invariant=batch_invariant,
            async_scheduling=async_scheduling,
        ),
    )
    for i, prompt in enumerate(prompts):
        extra = options[i] if options else {}
        # logprobs=False: what an OpenAI completions request without `logprobs` asks (the
        # peers compute no log-probs either).
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=False, **extra)
        engine.add_request(f"r{i}", prompt, params)
    generated = 0
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if first is None:
                first = time.perf_counter() - start
            generated += sum(len(s.token_ids) for s in out.outputs)
            if token_ids is not None:
                token_ids.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    invariant = float(engine.runner.model.is_batch_invariant())
    return {
        "tokens": generated,
        "seconds": elapsed,
        "tok_s": generated / elapsed,
        "batch_invariant": invariant,
        "overlapped_steps": float(engine.num_overlapped_steps),
    }


def _synchronize(model: GPT2LMHeadModel) -> None:
    """Wait for the device's queued work, so a timer read after it counts it all."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _no_eos_config(new_tokens: int) -> GenerationConfig:
    # eos_token_id -1 never matches: every system generates exactly `new_tokens`.
    return GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=3
    )


@torch.inference_mode()
def bench_hf_sequential(
    model: GPT2LMHeadModel, prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    cfg = _no_eos_config(new_tokens)
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    _synchronize(model)
    elapsed = time.perf_counter() - start
    tokens = new_tokens * len(prompts)
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


@torch.inference_mode()
def bench_hf_static(
    model: GPT2LMHeadModel, prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):  # left padding, as decoder-only generate needs
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, generation_config=_no_eos_config(new_tokens))
    _synchronize(model)
    elapsed = time.perf_counter() - start
    tokens = new_tokens * len(prompts)
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


@torch.inference_mode()
def bench_hf_continuous(
    model: GPT2LMHeadModel, prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=_no_eos_config(new_tokens), warmup=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


@torch.inference_mode()
def bench_linear_bound(
    model: GPT2LMHeadModel,
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int = 3,
    linear_backend: LinearBackend = "auto",
) -> dict[str, float]:
    """Time of the matmuls alone, run by the engine's own matmul backend: every prompt
    token through the layers once, then `new_tokens` decode steps of the whole batch, LM
    head only where a token is sampled."""
    dim = model.config.n_embd
    lin = build_linears(
        model.transformer.h, model.lm_head, linear_backend, model.device, model.dtype
    )

    def layers(n: int, head_rows: int) -> float:
        x = torch.randn(n, dim, dtype=model.dtype, device=model.device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            block_matmuls(lin, x)
            lin.lm_head(x[:head_rows])
            _synchronize(model)
            best = min(best, time.perf_counter() - start)
        return best

    prompt_tokens = sum(map(len, prompts))
    seconds = layers(prompt_tokens, len(prompts)) + (new_tokens - 1) * layers(
        len(prompts), len(prompts)
    )
    tokens = new_tokens * len(prompts)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    systems = sorted({s for r in results["runs"] for s in r["systems"]})
    for system in systems:
        xs = [r["concurrency"] for r in results["runs"] if system in r["systems"]]
        ys = [r["systems"][system]["tok_s"] for r in results["runs"] if system in r["systems"]]
        ax.plot(xs, ys, marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(
        f"{results['model']} ({results['dtype']}, {results['new_tokens']} new tokens, greedy)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def head_to_head_runs(
    loaded: Any,
    prompts: list[list[int]],
    args: argparse.Namespace,
    skip: set[str],
    ct2: dict[str, Any],
    ours_ids: dict[str, list[int]],
    ct2_ids: dict[str, list[list[int]]],
) -> dict[str, Callable[[], dict[str, float]]]:
    """One callable per system measured head to head at this level (each returns its stats);
    ours fills `ours_ids`, CTranslate2 fills `ct2_ids` per quantization."""
    model, concurrency = loaded.model, len(prompts)
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "kogpt-serve": lambda: bench_engine(
            model,
            loaded.tokenizer,
            prompts,
            args.new_tokens,
            token_ids=ours_ids,
            linear_backend=args.linear_backend,
            batch_invariant=args.batch_invariant,
        )
    }
    if "batch-invariant" not in skip:
        # The same engine with batch-invariant mode the other way round: the mode's cost.
        other = "off" if args.batch_invariant != "off" else "on"
        runs[f"kogpt-serve (batch-invariant {other})"] = lambda: bench_engine(
            model,
            loaded.tokenizer,
            prompts,
            args.new_tokens,
            linear_backend=args.linear_backend,
            batch_invariant=other,
        )
    if "aten" not in skip and args.linear_backend != "aten":
        # The same engine on torch's own matmuls: what the prepacked backend buys.
        runs["kogpt-serve (aten matmuls)"] = lambda: bench_engine(
            model, loaded.tokenizer, prompts, args.new_tokens, linear_backend="aten"
        )
    if "no-native" not in skip:
        # The same engine on torch ops only (gather + SDPA attention): what the C kernels buy.
        runs["kogpt-serve (no native kernels)"] = lambda: bench_engine(
            model,
            loaded.tokenizer,
            prompts,
            args.new_tokens,
            linear_backend=args.linear_backend,
            native_kernels="off",
        )
    if "int8" not in skip:  # app/modeling/linear.py's Int8Dynamic: lossy, like ct2 int8
        runs["kogpt-serve int8"] = lambda: bench_engine(
            model, loaded.tokenizer, prompts, args.new_tokens, quantize="int8"
        )
    for quantization, (generator, ct2_vocab) in ct2.items():

        def run_ct2(q: str = quantization, g: Any = generator, v: Any = ct2_vocab):
            from tests.benchmarks import ct2_peer  # the optional `bench` extra

            stats, ct2_ids[q] = ct2_peer.bench_ct2(g, v, prompts, args.new_tokens)
            return stats

        runs[f"ctranslate2 {quantization}"] = run_ct2
    if "options" not in skip:
        # Half of the batch with per-request options: measures the cost of the option path.
        opts = [
            {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": i}
            if i % 2
            else {}
            for i in range(concurrency)
        ]
        runs["kogpt-serve (half with options)"] = lambda: bench_engine(
            model,
            loaded.tokenizer,
            prompts,
            args.new_tokens,
            opts,
            linear_backend=args.linear_backend,
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-base-random"))
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-min", type=int, default=8)
    parser.add_argument("--prompt-max", type=int, default=64)
    parser.add_argument(
        "--sequential-requests",
        type=int,
        default=4,
        help="HF sequential runs this many (its rate does not depend on concurrency)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of: sequential,static,continuous,bound,options,ct2,aten,int8,no-native,"
        "batch-invariant",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="round-robin runs of the head-to-head systems (ours, ct2); each keeps its best",
    )
    parser.add_argument(
        "--linear-backend",
        default="auto",
        choices=["auto", "aten", "mkldnn"],
        help="the engine's matmul backend (app/modeling/linear.py); the bound uses the same",
    )
    parser.add_argument(
        "--batch-invariant",
        default="auto",
        choices=["auto", "on", "off"],
        help="the engine's batch-invariant mode (app/modeling/batch_invariant.py); a second "
        "row runs it the other way round and the cost of the mode is printed",
    )
    parser.add_argument(
        "--agreement-prompts",
        type=int,
        default=8,
        help="greedy outputs compared between kogpt-serve and CTranslate2 fp32, per level",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the GPU benchmark)")
    parser.add_argument(
        "--dtype", default="float32", help="float32, bfloat16 or float16 (the model's weights)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model = loaded.model
    if model.device.type != "cpu":
        skip.add("ct2")  # the CTranslate2 peer runs on CPU only
    results: dict[str, Any] = {
        "model": Path(args.model).name,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "linear_backend": args.linear_backend,
        "new_tokens": args.new_tokens,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "runs": [],
    }
    vocab = int(model.config.vocab_size)
    seq_rate = None
    ct2: dict[str, Any] = {}
    if "ct2" not in skip:  # optional peer: needs the `bench` extra's ctranslate2
        from tests.benchmarks import ct2_peer

        for quantization in ct2_peer.QUANTIZATIONS:
            ct2[quantization] = ct2_peer.load_generator(
                Path(args.model), quantization, torch.get_num_threads()
            )
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        prompts = make_prompts(
            concurrency, args.prompt_min, args.prompt_max, vocab, seed=concurrency
        )
        bench_engine(model, loaded.tokenizer, prompts[:2], 4)  # warm-up
        ours_ids: dict[str, list[int]] = {}
        ct2_ids: dict[str, list[list[int]]] = {}
        # The systems compared head to head run round-robin `--rounds` times; each keeps its
        # fastest round, so a burst of noise on the shared machine hits one round, not a system.
        runs = head_to_head_runs(loaded, prompts, args, skip, ct2, ours_ids, ct2_ids)
        systems: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                stats = run()
                if name not in systems or stats["tok_s"] > systems[name]["tok_s"]:
                    systems[name] = stats
        extra: dict[str, Any] = {"rounds": args.rounds}
        # ours as configured and the batch-invariant row (the other mode), side by side
        pair = [s for name, s in systems.items() if name.startswith("kogpt-serve (batch-inv")]
        modes = {bool(s["batch_invariant"]): s["tok_s"] for s in [systems["kogpt-serve"], *pair]}
        if len(modes) == 2:  # share of throughput lost to batch-invariant mode
            extra["batch_invariant_cost"] = 1 - modes[True] / modes[False]
        if "float32" in ct2_ids:
            n = args.agreement_prompts
            ours_first = [ours_ids[f"r{i}"] for i in range(min(n, len(prompts)))]
            extra["greedy_agreement_ours_vs_ct2_float32"] = ct2_peer.agreement(
                ours_first, ct2_ids["float32"][:n]
            )
        if "sequential" not in skip:
            if seq_rate is None:
                seq_rate = bench_hf_sequential(
                    model, prompts[: args.sequential_requests], args.new_tokens
                )
            systems["hf sequential generate"] = seq_rate
        if "static" not in skip:
            systems["hf static batch"] = bench_hf_static(model, prompts, args.new_tokens)
        if "continuous" not in skip:
            systems["hf generate_batch"] = bench_hf_continuous(model, prompts, args.new_tokens)
        if "bound" not in skip:
            systems["linear-layer bound"] = bench_linear_bound(
                model, prompts, args.new_tokens, linear_backend=args.linear_backend
            )
        ours = systems["kogpt-serve"]["tok_s"]
        ratios = {name: ours / s["tok_s"] for name, s in systems.items() if name != "kogpt-serve"}
        results["runs"].append(
            {"concurrency": concurrency, "systems": systems, "ratios_ours_over": ratios, **extra}
        )
        print(f"\n== concurrency {concurrency} ==")
        for name, s in systems.items():
            print(f"  {name:34s} {s['tok_s']:9.1f} tok/s  ({s['seconds']:.2f} s)")
        for name, r in ratios.items():
            print(f"  kogpt-serve / {name:28s} {r:6.2f}x")
        if "batch_invariant_cost" in extra:
            cost = extra["batch_invariant_cost"]
            print(
                f"  batch-invariant mode: {1 - cost:.2f}x the throughput without it "
                f"(costs {cost:.1%})"
            )
        if "greedy_agreement_ours_vs_ct2_float32" in extra:
            agree = extra["greedy_agreement_ours_vs_ct2_float32"]
            print(
                f"  greedy outputs identical to CTranslate2 fp32: {agree['identical']}/"
                f"{agree['sequences']} (first differences at {agree['first_difference_at']})"
            )
        write_results(results, Path(args.out))  # after every level: a long run is never lost


def write_results(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_{results['device'].split(':')[0]}"  # engine_cpu (committed) or engine_cuda
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
