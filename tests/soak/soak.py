"""Opt-in soak test, never in CI: `make soak` or `python -m tests.soak.soak [--minutes 10]`.

Starts a real server (`python -m app.cli`, 127.0.0.1, a free port), keeps `--concurrency`
mixed requests in flight for `--minutes` (every route, streaming and not, many options: the
mix of tests/integration/mixed_requests.py, whose checks count an incomplete or inconsistent
answer as an error), and samples the server's RSS (/proc/<pid>/status) and KV usage
(/metrics) every few seconds. Afterwards it checks that the KV pool is entirely free again
and that SIGTERM ends the server with status 0. It prints a summary (errors, per-window
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
    print(summary_text(report))
    json_path, png_path = write_outputs(report, args.out)
    print(f"wrote {json_path} and {png_path}")
    failed = report["totals"]["errors"] or status != 0
    return 1 if failed or final["kv_free_blocks"] != final["kv_total_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())
