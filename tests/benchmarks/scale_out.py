"""Scale-out benchmark (a script, never a test): `python -m tests.benchmarks.scale_out`.

Replicas of the server (subprocesses, one torch thread each) behind SGLang's model gateway
(`sglang-router`, run from .venv-clients), on a few-shot workload: 8 tasks, each a long
shared prompt prefix (instruction + few-shot examples in the /few-shot template's format),
and short queries, sent to /v1/completions as streams by a closed loop of clients. The same
seeded request sequence runs under each routing policy on fresh replicas (cold caches):

- prefix-cache hit rate: kogpt_prefix_cache_hits_total / kogpt_prefix_cache_queries_total
  summed over the replicas (full prompt KV blocks), from each replica's /metrics;
- time to first token p50/p90 as the client sees it (through the router), requests/s;
- the baseline: one server holding the KV cache of all replicas together, no router (every
  task's prefix can stay cached in one place: the hit rate routing can at best keep).

Each replica's KV cache holds about --cache-prefixes task prefixes (less than all 8), as when
the working set of shared prompts outgrows one replica's memory: round-robin sends every
task to every replica, whose caches then evict each other's prefixes; cache-aware routing
keeps each task on the replica that already holds its prefix.

--scale-down: replicas behind the router under the same load; one is sent SIGTERM partway
through. Counts every request's outcome as the client sees it (a complete stream or an
error): the draining replica finishes what it runs and answers 503 to new requests, which
the router retries on another replica.

Writes docs/benchmarks/scale_out.json and scale_out.png (or scale_down.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from tests.benchmarks.load_mix import machine_info, percentiles
from tests.server_process import ROOT, free_port, start_server, stop_server

CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
DEFAULT_MODEL = ROOT / "models" / "kogpt2-mini"
OUT_DIR = ROOT / "docs" / "benchmarks"
BLOCK_SIZE = 16
NUM_TASKS = 8

# Words the few-shot examples are drawn from (seeded): the model's own language.
WORDS = (
    "서울",
    "부산",
    "학교",
    "회사",
    "친구",
    "가족",
    "음식",
    "날씨",
    "여행",
    "영화",
    "음악",
    "책",
    "시장",
    "정부",
    "경제",
    "사회",
    "문화",
    "기술",
    "과학",
    "역사",
    "바다",
    "산",
    "강",
    "도시",
    "마을",
    "아침",
    "저녁",
    "오늘",
    "내일",
    "어제",
    "사람",
    "아이",
    "학생",
    "선생님",
    "의사",
    "시간",
    "마음",
    "생각",
    "이야기",
    "문제",
    "결과",
    "방법",
    "계획",
    "회의",
    "발표",
    "연구",
    "시험",
    "운동",
    "건강",
    "병원",
)
LABELS = ("긍정", "부정", "중립", "질문", "요청", "설명", "감사", "사과")


@dataclass
class Outcome:
    task: int
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Workload:
    prefixes: list[str]
    prefix_tokens: list[int]
    requests: list[tuple[int, str]]  # (task, full prompt), in sending order
    max_tokens: int


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build_workload(
    tokenizer: Any, prefix_tokens: int, num_requests: int, max_tokens: int, seed: int
) -> Workload:
    """8 task prefixes of about `prefix_tokens` tokens each, then `num_requests` short queries
    over the tasks in a seeded random order (the /few-shot template: task, examples, query)."""
    rng = random.Random(seed)
    prefixes, lengths = [], []
    for task in range(NUM_TASKS):
        text = f"작업 {task + 1}: 다음 문장을 읽고 알맞은 답을 한 단어로 쓰세요."
        while len(tokenizer.encode(text)) < prefix_tokens:
            example = sentence(rng, rng.randint(6, 12))
            text += f"\n\n입력: {example}\n출력: {rng.choice(LABELS)}"
        prefixes.append(text)
        lengths.append(len(tokenizer.encode(text)))
    requests = []
    for _ in range(num_requests):
        task = rng.randrange(NUM_TASKS)
        query = sentence(rng, rng.randint(2, 4))
        requests.append((task, f"{prefixes[task]}\n\n입력: {query}\n출력:"))
    return Workload(prefixes, lengths, requests, max_tokens)


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Router:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def start_router(
    policy: str, workers: list[str], extra: list[str], timeout: float = 90.0
) -> Router:
    """sglang-router in front of `workers`; returns once it routes (503 until it has probed
    them). The probe is a 1-token prompt: no full KV block, so no prefix-cache query."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"sglang-router-{policy}-", suffix=".log")[1])
    cmd = [
        str(CLIENTS_PYTHON), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
        "--port", str(port), "--worker-urls", *workers, "--policy", policy,
        "--log-level", "warn", *extra,
    ]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "any", "prompt": "안녕", "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 200:
                return Router(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"sglang-router never routed:\n{log.read_text()[-3000:]}")


def stop_router(router: Router) -> None:
    router.proc.terminate()
    try:
        router.proc.wait(30)
    except subprocess.TimeoutExpired:
        router.proc.kill()
        router.proc.wait()


def start_replicas(count: int, model: Path, kv_blocks: int) -> list[tuple[Any, str]]:
    args = ["--model", str(model), "--num-kv-blocks", str(kv_blocks)]
    args += ["--block-size", str(BLOCK_SIZE), "--max-num-seqs", "16"]
    with ThreadPoolExecutor(count) as pool:  # their start-ups overlap
        return list(pool.map(lambda _: start_server(args, threads=1), range(count)))


def prefix_counters(url: str) -> dict[str, float]:
    """This replica's prefix-cache counters and /v1/completions answers (all, and 503s)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {"hits": 0.0, "queries": 0.0, "completions": 0.0, "completions_503": 0.0}
    for line in text.splitlines():
        if line.startswith("kogpt_prefix_cache_hits_total{"):
            out["hits"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("kogpt_prefix_cache_queries_total{"):
            out["queries"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("kogpt_requests_total{") and 'endpoint="/v1/completions"' in line:
            out["completions"] += float(line.rsplit(" ", 1)[1])
            if 'status="503"' in line:
                out["completions_503"] += float(line.rsplit(" ", 1)[1])
    return out


# -- load --------------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, task: int, prompt: str, max_tokens: int) -> Outcome:
    body = {
        "model": "kogpt2-mini",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    sent = time.perf_counter()
    ttft, tokens, finished = None, 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread())[:200].decode(errors="replace")
                return Outcome(task, False, error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Outcome(task, False, error=f"stream error: {event['error']}")
                for choice in event.get("choices") or []:
                    if choice.get("text") and ttft is None:
                        ttft = time.perf_counter() - sent
                    tokens += 1 if choice.get("text") else 0
    except httpx.HTTPError as exc:
        return Outcome(task, False, error=f"{type(exc).__name__}: {exc}")
    if not finished:
        return Outcome(task, False, error="stream ended without [DONE]")
    return Outcome(task, True, ttft, time.perf_counter() - sent, tokens)


async def closed_loop(
    url: str, workload: Workload, concurrency: int, on_progress: Any = None
) -> tuple[list[Outcome], float]:
    """`concurrency` clients take the next request of the sequence when their last one ends."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in workload.requests:
        queue.put_nowait(item)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            while not queue.empty():
                task, prompt = queue.get_nowait()
                outcomes.append(await stream_one(client, task, prompt, workload.max_tokens))
                if on_progress is not None:
                    on_progress(len(outcomes))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:10],
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds,
        "tokens_per_s": sum(o.tokens for o in ok) / seconds,
        "ttft_s": percentiles(ttfts),
        "latency_s": percentiles([o.latency for o in ok]),
    }


def hit_rate(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    per_replica = [a["completions"] - b["completions"] for a, b in zip(after, before, strict=True)]
    return {
        "prefix_hit_rate": hits / queries if queries else None,
        "prefix_hit_blocks": hits,
        "prefix_query_blocks": queries,
        "requests_per_replica": per_replica,
    }


# -- runs --------------------------------------------------------------------------------------
def run_single(args: argparse.Namespace, workload: Workload, kv_blocks: int) -> dict[str, Any]:
    """The baseline: one server with every replica's KV cache, clients straight to it."""
    ((proc, url),) = start_replicas(1, args.model, kv_blocks * args.replicas)
    try:
        before = [prefix_counters(url)]
        outcomes, seconds = asyncio.run(closed_loop(url, workload, args.concurrency))
        after = [prefix_counters(url)]
    finally:
        stop_server(proc)
    return {"kv_blocks": kv_blocks * args.replicas, **summarize(outcomes, seconds)} | hit_rate(
        before, after
    )


def run_policy(
    args: argparse.Namespace, workload: Workload, kv_blocks: int, policy: str
) -> dict[str, Any]:
    replicas = start_replicas(args.replicas, args.model, kv_blocks)
    urls = [url for _, url in replicas]
    router = None
    try:
        router = start_router(policy, urls, [])
        before = [prefix_counters(u) for u in urls]
        outcomes, seconds = asyncio.run(closed_loop(router.url, workload, args.concurrency))
        after = [prefix_counters(u) for u in urls]
    finally:
        if router is not None:
            stop_router(router)
        for proc, _ in replicas:
            stop_server(proc)
    return {"policy": policy, **summarize(outcomes, seconds)} | hit_rate(before, after)


# Router settings for scale-down: a draining replica answers 503 at once and /ready turns 503
# (its /health stays 200 while it drains, so the router checks /ready); retries back off long
# enough to outlast the replica's exit and the health check that then drops it.
SCALE_DOWN_ROUTER_ARGS = [
    "--health-check-endpoint", "/ready",
    "--health-check-interval-secs", "2",
    "--health-failure-threshold", "1",
    "--retry-max-retries", "8",
    "--retry-initial-backoff-ms", "100",
    "--retry-max-backoff-ms", "2000",
]  # fmt: skip


def run_scale_down(args: argparse.Namespace, workload: Workload, kv_blocks: int) -> dict[str, Any]:
    replicas = start_replicas(args.replicas, args.model, kv_blocks)
    urls = [url for _, url in replicas]
    victim_proc, victim_url = replicas[0]
    router_args = [] if args.router_defaults else SCALE_DOWN_ROUTER_ARGS
    router = start_router(args.scale_down_policy, urls, router_args)
    sent_sigterm: dict[str, Any] = {}
    kill_after = max(1, len(workload.requests) // 3)
    last_seen: dict[str, float] = {}

    def watch_drain() -> None:
        """The draining replica's counters while it still answers: it serves /metrics while
        its in-flight requests finish, then closes its port (connection refused) and exits
        once its open connections have closed."""
        while victim_proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                last_seen.update(prefix_counters(victim_url))
            time.sleep(0.1)
        sent_sigterm["victim_exit_after_s"] = time.monotonic() - sent_sigterm["at"]

    watcher = threading.Thread(target=watch_drain, daemon=True)

    def on_progress(done: int) -> None:
        if done >= kill_after and not sent_sigterm:
            victim_proc.send_signal(signal.SIGTERM)
            sent_sigterm.update(
                after_requests=done, at=time.monotonic(), after_s=time.perf_counter() - start
            )
            watcher.start()

    start = time.perf_counter()
    try:
        outcomes, seconds = asyncio.run(
            closed_loop(router.url, workload, args.concurrency, on_progress)
        )
        victim_exit = victim_proc.wait(120)
        watcher.join(10)
        sent_sigterm.pop("at")
        sent_sigterm["load_ended_after_s"] = seconds - sent_sigterm.pop("after_s")
        after = [prefix_counters(u) for u in urls[1:]]
    finally:
        stop_router(router)
        for proc, _ in replicas:
            stop_server(proc)
    return {
        "policy": args.scale_down_policy,
        "router_args": router_args,
        "sigterm": sent_sigterm,
        "victim_exit_status": victim_exit,
        # Its /v1/completions answers (the router's probe included) and the drain's 503s
        # among them, at its last scrape after SIGTERM; None: its port closed first.
        "victim_completions": last_seen.get("completions"),
        "victim_503": last_seen.get("completions_503"),
        "survivors_completions": [c["completions"] for c in after],
        **summarize(outcomes, seconds),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["policies"]
    names = ["single server"] + [r["policy"] for r in runs]
    rates = [result["single_server"]["prefix_hit_rate"]] + [r["prefix_hit_rate"] for r in runs]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
    ax1.bar(names, [100 * (r or 0) for r in rates], color=["grey", "tab:blue", "tab:orange"])
    ax1.set_ylabel("prefix-cache hit rate (%)")
    ax1.set_title("KV blocks found cached")
    width = 0.35
    xs = range(len(runs))
    for offset, key in ((-width / 2, "p50"), (width / 2, "p90")):
        ax2.bar(
            [x + offset for x in xs],
            [1000 * (r["ttft_s"][key] or 0) for r in runs],
            width,
            label=key,
        )
    ax2.set_xticks(list(xs), [r["policy"] for r in runs])
    ax2.set_ylabel("TTFT through the router (ms)")
    ax2.set_title("Time to first token")
    ax2.legend()
    ax3.bar([r["policy"] for r in runs], [r["requests_per_s"] for r in runs])
    ax3.set_ylabel("completed requests / s")
    ax3.set_title("Throughput")
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['replicas']} replicas behind sglang-router, {NUM_TASKS} few-shot tasks "
        f"(~{cfg['prefix_tokens']} shared tokens each), {cfg['requests']} requests, "
        f"{cfg['concurrency']} clients"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--replicas", type=int, default=2, choices=range(2, 5))
    parser.add_argument("--requests", type=int, default=160, help="per policy")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=700)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument(
        "--cache-prefixes",
        type=float,
        default=5.0,
        help="task prefixes one replica's KV cache holds (the replicas together hold all 8)",
    )
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-down", action="store_true")
    parser.add_argument("--scale-down-policy", default="cache_aware")
    parser.add_argument(
        "--router-defaults",
        action="store_true",
        help="--scale-down with sglang-router's default health checks and retries",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    if not CLIENTS_PYTHON.exists():
        raise SystemExit("no .venv-clients (sglang-router): run `make clients` first")

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    workload = build_workload(
        tokenizer, args.prefix_tokens, args.requests, args.max_tokens, args.seed
    )
    prefix_blocks = max(workload.prefix_tokens) // BLOCK_SIZE + 1
    # Room for `cache_prefixes` prefixes plus the running sequences' own tail blocks.
    kv_blocks = int(args.cache_prefixes * prefix_blocks) + 16 * 3
    if args.cache_prefixes * args.replicas < NUM_TASKS:
        raise SystemExit("the replicas together must hold all 8 prefixes: raise --cache-prefixes")
    config = {
        "model": args.model.name,
        "replicas": args.replicas,
        "omp_threads_per_replica": 1,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "tasks": NUM_TASKS,
        "prefix_tokens": round(sum(workload.prefix_tokens) / NUM_TASKS),
        "max_tokens": args.max_tokens,
        "block_size": BLOCK_SIZE,
        "kv_blocks_per_replica": kv_blocks,
        "prefix_blocks": prefix_blocks,
        "seed": args.seed,
    }
    print(json.dumps(config))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scale_down:
        result = {"config": config, "machine": machine_info()}
        result["scale_down"] = run_scale_down(args, workload, kv_blocks)
        print(json.dumps(result["scale_down"], indent=1))
        name = "scale_down_router_defaults.json" if args.router_defaults else "scale_down.json"
        (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
        lost = result["scale_down"]["failed"]
        print(f"scale-down: {lost} of {args.requests} requests failed")
        raise SystemExit(1 if lost else 0)

    result = {"config": config, "machine": machine_info()}
    result["single_server"] = run_single(args, workload, kv_blocks)
    print("single server:", json.dumps(result["single_server"]))
    result["policies"] = []
    for policy in args.policies:
        run = run_policy(args, workload, kv_blocks, policy)
        print(f"{policy}:", json.dumps(run))
        result["policies"].append(run)
    by_policy = {r["policy"]: r for r in result["policies"]}
    if {"cache_aware", "round_robin"} <= by_policy.keys():
        ca, rr = by_policy["cache_aware"], by_policy["round_robin"]
        single = result["single_server"]["prefix_hit_rate"]
        result["comparison"] = {
            "cache_aware_hit_rate_over_single": ca["prefix_hit_rate"] / single,
            "round_robin_hit_rate_over_single": rr["prefix_hit_rate"] / single,
            "ttft_p50_round_robin_over_cache_aware": rr["ttft_s"]["p50"] / ca["ttft_s"]["p50"],
            "ttft_p90_round_robin_over_cache_aware": rr["ttft_s"]["p90"] / ca["ttft_s"]["p90"],
            "throughput_cache_aware_over_round_robin": ca["requests_per_s"] / rr["requests_per_s"],
        }
        print(json.dumps(result["comparison"], indent=1))
    (args.out / "scale_out.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "scale_out.png")
    print(f"wrote {args.out / 'scale_out.json'} and scale_out.png")


if __name__ == "__main__":
    main()
