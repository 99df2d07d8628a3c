"""Opt-in soak test, never in CI: `make soak` or `python -m tests.soak.soak [--minutes 10]`.

Starts a real server (`python -m app.cli`, 127.0.0.1, a free port), keeps `--concurrency`
mixed requests in flight for `--minutes` (every route, streaming and not, many options: the
mix of tests/integration/mixed_requests.py, whose checks count an incomplete or inconsistent
answer as an error), and samples the server's RSS (/proc/<pid>/status) and KV usage
(/metrics) every few seconds. Then it sends `--bursts` bursts of maximal requests (the
largest each admission limit accepts, and a refused 900 KB prompt list), each followed by
`--rest-seconds` idle, and checks that the RSS returns within 10% of its level before them.
Afterwards it checks that the KV pool is entirely free again and that SIGTERM ends the
server with status 0. It prints a summary (errors, per-window
p50/p90/p99 latency, memory growth after the warm-up window) and writes soak.json and
soak.png to --out (docs/reliability/ by default). Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.mixed_requests import build_case, run_case
from tests.server_process import ServerStartError, start_server
from tests.soak.report import Record, Sample, build_report, summary_text, write_outputs

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (64)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="per request (32)")
    p.add_argument("--window-seconds", type=float, default=60.0, help="latency window (60)")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="RSS / KV sampling (5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability")
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="server KV pool size")
    p.add_argument(
        "--bursts", type=int, default=2, help="bursts of maximal requests after the load (2)"
    )
    p.add_argument(
        "--rest-seconds", type=float, default=20.0, help="idle time after each burst (20)"
    )
    return p.parse_args(argv)


def server_args(args: argparse.Namespace) -> list[str]:
    cmd = ["--log-level", "warning"]  # otherwise the defaults: what a deployment runs
    if args.model:
        cmd += ["--model", args.model]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    return cmd


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def engine_metrics(text: str) -> dict[str, float]:
    wanted = {
        "kogpt_kv_cache_usage_ratio": "kv_usage",
        "kogpt_kv_cache_free_blocks": "kv_free_blocks",
        "kogpt_kv_cache_blocks": "kv_total_blocks",
        "kogpt_requests_running": "running",
        "kogpt_requests_waiting": "waiting",
        "kogpt_preemptions_total": "preemptions",
    }
    values = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[wanted[sample.name]] += sample.value
    return values


async def sample_forever(
    client: httpx.AsyncClient, pid: int, started: float, every: float, out: list[Sample]
) -> None:
    while True:
        m = engine_metrics((await client.get("/metrics")).text)
        out.append(
            Sample(
                time.monotonic() - started,
                rss_mib(pid),
                m["kv_usage"],
                m["kv_free_blocks"],
                m["running"],
                m["waiting"],
                m["preemptions"],
            )
        )
        await asyncio.sleep(every)


async def drive(
    url: str, pid: int, args: argparse.Namespace
) -> tuple[list[Record], list[Sample], float]:
    """Keep `concurrency` requests in flight until the deadline; the records and samples."""
    rng = random.Random(args.seed)
    records: list[Record] = []
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.monotonic()
        deadline = started + args.minutes * 60

        async def worker() -> None:
            while time.monotonic() < deadline:
                case = build_case(rng, args.max_new_tokens)
                outcome = await run_case(client, case)
                done = time.monotonic() - started
                records.append(Record(done, outcome.latency_s, case.kind, outcome.error))

        sampler = asyncio.ensure_future(
            sample_forever(client, pid, started, args.sample_seconds, samples)
        )
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        sampler.cancel()
        return records, samples, time.monotonic() - started


def maximal_requests(info: dict[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(route, body, expected status) of the largest requests the server accepts, one per
    admission limit, and the 900 KB prompt list it refuses (issue #21's shapes)."""
    model = info["model_id"]
    sequences = int(info["max_request_sequences"])
    prompts = [[5 + (i + j) % 900 for j in range(200)] for i in range(sequences // 4)]
    batch = {"model": model, "prompt": prompts, "n": 4, "max_tokens": 8, "ignore_eos": True}
    beams = 8
    per_word = 4
    words = int(info["max_constraint_work"]) // beams // per_word
    force = [[20 + 5 * w + t for t in range(per_word)] for w in range(words)]
    constrained = {"num_beams": beams, "force_words_ids": force, "max_new_tokens": 4}
    positions = int(info["max_total_tokens"])
    top_k = max(2, int(info["max_contrastive_work"]) // positions)
    long_prompt = [5 + j % 900 for j in range(positions - 8)]
    contrastive = {"model": model, "prompt": long_prompt, "max_tokens": 8, "temperature": 0,
                   "penalty_alpha": 0.6, "top_k": top_k, "ignore_eos": True}  # fmt: skip
    layers = int(info["max_dola_work"]) // int(info["config"]["vocab_size"])
    dola = {"dola_layers": [1] * layers, "max_new_tokens": 8, "ignore_eos": True}
    refused = {"model": model, "prompt": [[5]] * 150_000, "max_tokens": 1}
    return [
        ("/v1/completions", batch, 200),
        ("/generate", {"inputs": "대한민국은", "parameters": constrained}, 200),
        ("/v1/completions", contrastive, 200),
        ("/generate", {"inputs": "대한민국은", "parameters": dola}, 200),
        ("/v1/completions", refused, 400),
    ]


async def burst(client: httpx.AsyncClient, info: dict[str, Any]) -> list[str]:
    """Every maximal request at once; the unexpected answers."""
    requests = maximal_requests(info)
    replies = await asyncio.gather(*(client.post(route, json=body) for route, body, _ in requests))
    return [
        f"{route} answered {r.status_code}: {r.text[:200]}"
        for (route, _, expected), r in zip(requests, replies, strict=True)
        if r.status_code != expected and not (expected == 400 and r.status_code == 422)
    ]


async def bursts(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """RSS at rest before the bursts, at its peak, and after each burst's rest."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        info = (await client.get("/info")).json()
        before = rss_mib(pid)
        peak = before
        after: list[float] = []
        errors: list[str] = []
        for _ in range(args.bursts):
            task = asyncio.ensure_future(burst(client, info))
            while not task.done():
                peak = max(peak, rss_mib(pid))
                await asyncio.sleep(0.5)
            errors += task.result()
            await asyncio.sleep(args.rest_seconds)
            after.append(rss_mib(pid))
    return {
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_each_mib": [round(a, 1) for a in after],
        "rss_return_ratio": round(after[-1] / before, 3) if after else None,
        "errors": errors,
    }


def settle(url: str, timeout: float = 120.0) -> dict[str, float]:
    """Engine metrics once no request is running or waiting (aborts are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        m = engine_metrics(httpx.get(f"{url}/metrics").text)
        if m["running"] + m["waiting"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        proc, url = start_server(server_args(args))
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from exc
    try:
        records, samples, duration = asyncio.run(drive(url, proc.pid, args))
        settle(url)
        burst_report = asyncio.run(bursts(url, proc.pid, args)) if args.bursts else None
        m = settle(url)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    final: dict[str, Any] = {
        "kv_free_blocks": int(m["kv_free_blocks"]),
        "kv_total_blocks": int(m["kv_total_blocks"]),
        "preemptions": int(m["preemptions"]),
        "exit_status": status,
    }
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = build_report(config, records, samples, final, duration)
    report["bursts"] = burst_report
    print(summary_text(report))
    if burst_report is not None:
        print(
            f"bursts of maximal requests: RSS {burst_report['rss_before_mib']:.0f} MiB at rest "
            f"before, peak {burst_report['rss_peak_mib']:.0f}, after each rest "
            f"{burst_report['rss_after_each_mib']} MiB (end / before "
            f"{burst_report['rss_return_ratio']}); unexpected answers: {burst_report['errors']}"
        )
    json_path, png_path = write_outputs(report, args.out)
    print(f"wrote {json_path} and {png_path}")
    failed = report["totals"]["errors"] or status != 0
    if burst_report is not None:  # #21: memory returns within 10% after maximal requests
        ratio = burst_report["rss_return_ratio"]
        failed = failed or bool(burst_report["errors"]) or ratio is None or ratio > 1.10
    return 1 if failed or final["kv_free_blocks"] != final["kv_total_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())
