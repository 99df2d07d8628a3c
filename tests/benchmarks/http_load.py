"""End-to-end HTTP load benchmark (a script, never a test): `python -m tests.benchmarks.http_load`.

Starts a real server (`python -m app.cli`) on 127.0.0.1, then drives POST /generate_stream
with asyncio + httpx: N concurrent streaming clients in a closed loop (each starts its next
request when the last one ends), or Poisson arrivals at given rates. The request mix is seeded:
prompt and output lengths vary, decoding is greedy with min_new_tokens = max_new_tokens, so
every request generates exactly its length. Measured per level: generated tokens/s, time to
first token (TTFT) and inter-token latency (ITL) p50/p90/p99, as the client sees them.

In the same run, after the server has stopped (so the two never compete), the same mix is
replayed on an in-process LLMEngine (tests/benchmarks/load_mix.py) and the script prints
HTTP throughput / in-engine throughput. Writes http_e2e.json and http_e2e.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoConfig

from app.config import Settings
from app.engine.engine import EngineConfig, LLMEngine
from app.modeling.loader import load_model
from tests.benchmarks.load_mix import (
    LoadRequest,
    cpu_seconds,
    machine_info,
    make_mix,
    percentiles,
    replay,
)
from tests.server_process import start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]


async def stream_one(client: httpx.AsyncClient, req: LoadRequest) -> dict[str, Any]:
    """One /generate_stream request: token event times relative to the send."""
    body = {"input_ids": req.prompt_ids, "parameters": req.options()}
    sent = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", "/generate_stream", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event}")
            times.append(time.perf_counter() - sent)
    if len(times) != req.new_tokens:
        raise RuntimeError(f"got {len(times)} token events, expected {req.new_tokens}")
    return {"times": times, "end": sent + times[-1]}


async def http_level(
    base_url: str, mix: list[LoadRequest], concurrency: int | None, server_pid: int
) -> dict[str, Any]:
    """Closed loop of `concurrency` clients, or (None) Poisson arrivals from the mix."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
        start, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(server_pid), cpu_seconds()
        if concurrency is not None:
            queue = list(reversed(mix))

            async def client_loop() -> None:
                while queue:
                    results.append(await stream_one(client, queue.pop()))

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        else:

            async def arrive(req: LoadRequest) -> None:
                await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - start)))
                results.append(await stream_one(client, req))

            await asyncio.gather(*(arrive(req) for req in mix))
        elapsed = max(r["end"] for r in results) - start
        server_end, client_end = cpu_seconds(server_pid), cpu_seconds()
    tokens = sum(len(r["times"]) for r in results)
    server_s = None if server_cpu is None or server_end is None else server_end - server_cpu
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        "server_cpu_s": server_s,
        "cpu_ms_per_token": None if server_s is None else 1000 * server_s / tokens,
        "client_cpu_s": (client_end or 0.0) - (client_cpu or 0.0),
        "ttft_s": percentiles([r["times"][0] for r in results]),
        "itl_s": percentiles(gaps),
    }


def summary(stats: dict[str, Any]) -> str:
    text = f"{stats['tok_s']:.1f} tok/s"
    if stats.get("cpu_ms_per_token") is not None:
        text += f" ({stats['cpu_ms_per_token']:.0f} CPU-ms/token)"
    for metric in ("ttft_s", "itl_s"):
        if metric in stats:
            q = stats[metric]
            text += f", {metric[:-2].upper()} p50/p90/p99 "
            text += "/".join(f"{q[k] * 1000:.0f}" for k in ("p50", "p90", "p99")) + " ms"
    return text


def int_pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = results["level_key"]
    levels = [r for r in results["levels"] if "http" in r]
    xs = [r[key] for r in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(xs, [r["http"]["tok_s"] for r in levels], marker="o", label="HTTP (streaming)")
    done = [r for r in levels if "engine" in r]
    ys = [r["engine"]["tok_s"] for r in done]
    left.plot([r[key] for r in done], ys, marker="s", label="in-engine, same mix")
    left.set_ylabel("generated tokens / s")
    for metric, style in (("ttft_s", "-"), ("itl_s", "--")):
        for q in ("p50", "p90", "p99"):
            ys = [r["http"][metric][q] * 1000 for r in levels]
            right.plot(xs, ys, style, marker="o", label=f"{metric[:-2].upper()} {q}")
    right.set_yscale("log")
    right.set_ylabel("ms (client side)")
    for ax in (left, right):
        ax.set_xlabel("concurrent clients" if key == "concurrency" else "arrival rate (req/s)")
        if key == "concurrency":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}: HTTP /generate_stream vs in-engine ({results['label']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "http_e2e.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "http_e2e.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "kogpt2-base-random"))
    parser.add_argument("--mode", choices=("closed", "poisson"), default="closed")
    parser.add_argument("--concurrency", default="1,16,64", help="closed loop: clients per level")
    parser.add_argument("--rates", default="0.5,1,2", help="poisson: requests/s per level")
    parser.add_argument(
        "--rounds", type=int, default=3, help="closed loop: requests per level = rounds x clients"
    )
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many a level")
    parser.add_argument("--requests", type=int, default=64, help="poisson: requests per level")
    parser.add_argument("--prompt-tokens", default="8,256", help="min,max prompt length")
    parser.add_argument("--new-tokens", default="16,128", help="min,max output length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-blocks", type=int, default=0, help="0 = what the mix needs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (server and engine)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--label", default="", help="stored in the JSON (e.g. 'quiet machine')")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_range, new_range = int_pair(args.prompt_tokens), int_pair(args.new_tokens)
    closed = args.mode == "closed"
    values = [float(v) for v in (args.concurrency if closed else args.rates).split(",")]

    model_config = AutoConfig.from_pretrained(args.model)
    vocab = int(model_config.vocab_size)
    settings = Settings(model=args.model)  # the server's defaults for everything else
    # One KV pool size for both: every request of the busiest level fits at once (the
    # server's own default depends on the host; preemption would blur the comparison).
    per_seq = -(-(prompt_range[1] + new_range[1]) // settings.block_size)
    in_flight = max(values) if closed else args.requests
    full_length = -(-int(model_config.n_positions) // settings.block_size)
    num_blocks = args.kv_blocks or max(per_seq * int(in_flight) + 8, full_length)
    engine_config = EngineConfig(
        num_blocks=num_blocks,
        block_size=settings.block_size,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=settings.seed,
    )
    server_args = ["--model", args.model, "--dtype", args.dtype, "--device", args.device]
    server_args += ["--num-kv-blocks", str(num_blocks), "--log-level", "warning"]

    key = "concurrency" if closed else "rate"
    results: dict[str, Any] = {
        "label": args.label or "unlabelled run",
        "model": Path(args.model).name,
        "device": args.device,
        "dtype": args.dtype,
        "mode": args.mode,
        "level_key": key,
        "prompt_tokens": list(prompt_range),
        "new_tokens": list(new_range),
        "seed": args.seed,
        "server_args": server_args,
        "engine_config": vars(engine_config),
        "machine": machine_info(),
        "levels": [],
    }
    mixes = []
    for i, value in enumerate(values):
        level = int(value) if closed else value
        n = max(args.min_requests, args.rounds * int(value)) if closed else args.requests
        rate = None if closed else value
        mix = make_mix(n, prompt_range, new_range, vocab, args.seed + i, rate)
        mixes.append((level, mix))
        results["levels"].append({key: level, "requests": n})

    with tempfile.TemporaryDirectory() as tmp:
        proc, base_url = start_server(
            server_args, threads=args.threads, log=Path(tmp) / "server.log"
        )
        try:
            warm = make_mix(2, (8, 8), (4, 4), vocab, seed=-1)
            asyncio.run(http_level(base_url, warm, 2, proc.pid))
            for entry, (level, mix) in zip(results["levels"], mixes, strict=True):
                clients = level if closed else None
                entry["http"] = asyncio.run(http_level(base_url, mix, clients, proc.pid))
                print(f"{key} {level}: HTTP {summary(entry['http'])}", flush=True)
                write(results, Path(args.out))
        finally:
            stop_server(proc)

    # In-engine: one engine for all levels, as the server keeps one; warmed up the same way.
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = LLMEngine(loaded.model, loaded.tokenizer, engine_config)
    replay(engine, loaded, make_mix(2, (8, 8), (4, 4), vocab, seed=-1), 2, "warm")
    for entry, (level, mix) in zip(results["levels"], mixes, strict=True):
        entry["engine"] = replay(engine, loaded, mix, level if closed else None, f"l{level}")
        entry["http_over_engine"] = entry["http"]["tok_s"] / entry["engine"]["tok_s"]
        # The same ratio from CPU time per token (server process vs in-engine): robust to
        # other load on the machine, which the wall-clock ratio is not.
        server_ms = entry["http"]["cpu_ms_per_token"]
        if server_ms:
            entry["http_over_engine_cpu"] = entry["engine"]["cpu_ms_per_token"] / server_ms
        print(
            f"{key} {level}: in-engine {summary(entry['engine'])}; HTTP / in-engine "
            f"{entry['http_over_engine']:.3f} (by CPU time per token "
            f"{entry.get('http_over_engine_cpu', float('nan')):.3f})",
            flush=True,
        )
        write(results, Path(args.out))
    results["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    write(results, Path(args.out))
    print(f"wrote {Path(args.out) / 'http_e2e.json'} and {Path(args.out) / 'http_e2e.png'}")


if __name__ == "__main__":
    main()
