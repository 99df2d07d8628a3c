"""Fairness under one maximal request (a script, never a test; opt-in):

    python -m tests.benchmarks.fairness [--canaries 30] [--big KIND ...] [--unchunked] [ARGS]

Starts a real server (`python -m app.cli`, default settings unless --server-arg) on
127.0.0.1 and sends a small canary request (`POST /generate`, 4 new tokens, greedy) one
after another: first on the idle server, then while one client's largest accepted request
runs. Prints the canary's latency p50 / p99 idle and loaded and the ratio loaded p99 / idle
p99, side by side in one run (issue #21 asks for at most 3x). The maximal requests:

- batch: `/v1/completions` with --max-request-sequences sequences (prompts x n), long
  prompts and --big-tokens new tokens each (the most sequences and tokens one request may
  ask for);
- class_b: contrastive search at --max-contrastive-work (top_k x positions) and --big-tokens
  new tokens (an exclusive-lane method, one chunk of a step per engine step);
- dola: DoLa at --max-dola-work (premature layers x vocabulary, the layers repeated), 8 x
  --big-tokens new tokens (its steps are short on a small model);
- constrained: constrained beam search at --max-constraint-work (constraint tokens x beams),
  4 x --big-tokens new tokens.

--unchunked first runs the class-B kinds on a second server whose class-B steps are not
split into chunks (the same code with the chunk bounds set past any step: "before"), then on
the normal server ("after"), each with its own idle canaries, in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server_process import ROOT, start_server, stop_server

CANARY = {"inputs": "대한민국은", "parameters": {"max_new_tokens": 4}}
CLASS_B_KINDS = ["class_b", "dola", "constrained"]

# Imported first by the "before" server (a sitecustomize on its PYTHONPATH): class-B steps
# run whole, one per engine step, as they did before the chunks.
UNCHUNKED = """
from app.engine.lanes.class_b import beam_scorer, contrastive, dola
contrastive.CHUNK_ROW_POSITIONS = 1 << 60
dola.CHUNK_HEAD_LOGITS = 1 << 60
beam_scorer.CHUNK_BEAMS = 1 << 60
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def canaries(url: str, count: int, until: threading.Event | None = None) -> list[float]:
    """Latencies of `count` canaries sent one after another (stops early once `until`)."""
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(count):
            if until is not None and until.is_set():
                break
            start = time.perf_counter()
            r = client.post("/generate", json=CANARY)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


def vocab_size(url: str, model: str) -> int:
    """The model's vocabulary, as the DoLa limit's refusal names it (/info does not)."""
    body = {"model": model, "prompt": [5], "max_tokens": 1, "dola_layers": [0] * 100_000}
    refusal = httpx.post(f"{url}/v1/completions", json=body, timeout=60).text
    found = re.search(r"x (\d+) vocabulary", refusal)
    if found is None:
        raise RuntimeError(f"no vocabulary size in the DoLa refusal: {refusal[:300]}")
    return int(found.group(1))


def big_request(
    kind: str, info: dict[str, Any], tokens: int, url: str
) -> tuple[str, dict[str, Any]]:
    """The route and body of the largest request of `kind` the server accepts."""
    if kind == "batch":
        sequences = int(info["max_request_sequences"])
        n = 4
        prompt_len = min(200, int(info["max_input_tokens"]) - tokens)
        prompts = [[5 + (i + j) % 900 for j in range(prompt_len)] for i in range(sequences // n)]
        body = {"model": info["model_id"], "prompt": prompts, "n": n, "max_tokens": tokens,
                "ignore_eos": True}  # fmt: skip
        return "/v1/completions", body
    model = info["model_id"]
    if kind == "dola":  # premature layers x vocabulary at the limit (layers 0 and 1 repeated)
        count = int(info.get("max_dola_work", 1_048_576)) // vocab_size(url, model)
        prompt = [5 + j % 900 for j in range(200)]
        body = {"model": model, "prompt": prompt, "max_tokens": 8 * tokens, "temperature": 0,
                "dola_layers": [i % 2 for i in range(count)], "ignore_eos": True}  # fmt: skip
        return "/v1/completions", body
    if kind == "constrained":  # constraint tokens x beams at the limit: 4-token forced words
        beams = min(8, int(info["max_num_seqs"]))
        words = int(info.get("max_constraint_work", 2048)) // beams // 4
        forced = [[1000 + 4 * w + t for t in range(4)] for w in range(words)]
        prompt = [5 + j % 900 for j in range(200)]
        body = {"model": model, "prompt": prompt, "max_tokens": 4 * tokens, "num_beams": beams,
                "temperature": 0, "force_words_ids": forced}  # fmt: skip
        return "/v1/completions", body
    work = int(info["max_contrastive_work"])
    positions = int(info["max_total_tokens"])
    top_k = max(2, min(int(info["max_num_seqs"]), work // positions))
    prompt_len = min(work // top_k, positions) - tokens
    prompt = [5 + j % 900 for j in range(prompt_len)]
    body = {"model": info["model_id"], "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "penalty_alpha": 0.6, "top_k": top_k, "ignore_eos": True}  # fmt: skip
    return "/v1/completions", body


def loaded_run(url: str, route: str, body: dict[str, Any], count: int) -> tuple[list[float], float]:
    """Canary latencies while the big request runs, and the big request's own time."""
    done = threading.Event()
    result: dict[str, Any] = {}

    def run_big() -> None:
        start = time.perf_counter()
        try:
            r = httpx.post(f"{url}{route}", json=body, timeout=3600)
            result["status"] = r.status_code
            result["text"] = r.text[:300]
        finally:
            result["seconds"] = time.perf_counter() - start
            done.set()

    thread = threading.Thread(target=run_big)
    thread.start()
    time.sleep(0.5)  # the big request is admitted and running
    latencies = canaries(url, count, until=done)
    thread.join()
    if result.get("status") != 200:
        raise RuntimeError(f"the big request failed: {result}")
    return latencies, float(result["seconds"])


def report(name: str, idle: list[float], loaded: list[float], big_seconds: float) -> None:
    if not loaded:
        print(
            f"{name:21s} the big request ({big_seconds:.1f} s) ended before any canary", flush=True
        )
        return
    ip50, ip99 = statistics.median(idle), percentile(idle, 0.99)
    lp50, lp99 = statistics.median(loaded), percentile(loaded, 0.99)
    print(
        f"{name:21s} idle p50 {ip50 * 1000:7.1f} ms p99 {ip99 * 1000:7.1f} ms | loaded "
        f"p50 {lp50 * 1000:7.1f} ms p99 {lp99 * 1000:7.1f} ms ({len(loaded)} canaries, big "
        f"request {big_seconds:.1f} s) | p99 ratio {lp99 / ip99:.2f}x "
        f"({'within' if lp99 <= 3 * ip99 else 'OVER'} 3x)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canaries", type=int, default=30, help="canaries per phase")
    parser.add_argument(
        "--big",
        choices=["batch", *CLASS_B_KINDS, "both", "all"],
        action="append",
        help="the big request (repeatable; both: batch and class_b; all: every kind)",
    )
    parser.add_argument(
        "--unchunked", action="store_true", help="class-B kinds on an unchunked server first"
    )
    parser.add_argument("--big-tokens", type=int, default=16, help="new tokens of the big one")
    parser.add_argument("--threads", type=int, default=0, help="server OMP threads (0: torch's)")
    parser.add_argument("--server-arg", action="append", default=[], help="a server flag")
    args = parser.parse_args()
    kinds: list[str] = []
    for big in args.big or ["both"]:
        expanded = {"both": ["batch", "class_b"], "all": ["batch", *CLASS_B_KINDS]}.get(big, [big])
        kinds += [kind for kind in expanded if kind not in kinds]
    if args.unchunked and any(kind in CLASS_B_KINDS for kind in kinds):
        with tempfile.TemporaryDirectory() as patch_dir:
            (Path(patch_dir) / "sitecustomize.py").write_text(UNCHUNKED)
            before = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join([patch_dir, str(ROOT), before or ""])
            try:
                proc, url = start_server(args.server_arg, threads=args.threads)
            finally:
                if before is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = before
            measure(proc, url, [k for k in kinds if k in CLASS_B_KINDS], args, " unchunked")
    proc, url = start_server(args.server_arg, threads=args.threads)
    measure(proc, url, kinds, args, "")


def measure(proc: Any, url: str, kinds: list[str], args: argparse.Namespace, label: str) -> None:
    """Idle then loaded canaries for every kind on this server; stops it at the end."""
    try:
        info = httpx.get(f"{url}/info", timeout=30).json()
        canaries(url, 5)  # warm-up
        for kind in kinds:
            idle = canaries(url, args.canaries)
            route, body = big_request(kind, info, args.big_tokens, url)
            loaded, seconds = loaded_run(url, route, body, args.canaries)
            report(kind + label, idle, loaded, seconds)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
