"""Request mix and its in-engine replay for the HTTP load benchmark (tests/benchmarks/http_load.py).

The same seeded mix (prompt token ids, exact output length) is sent over HTTP and then replayed
on an in-process LLMEngine with the same arrival discipline: a closed loop of N clients (a
finished request is replaced by the next one) or Poisson arrivals at a rate. The ratio of the
two throughputs is what HTTP, JSON and SSE cost on top of the engine.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.engine import LLMEngine
from app.modeling.loader import LoadedModel
from app.options.params import SamplingParams
from app.options.resolve import resolve_sampling_params


@dataclass(frozen=True)
class LoadRequest:
    prompt_ids: list[int]
    new_tokens: int  # exact: min_new_tokens = max_new_tokens, greedy
    arrival_s: float = 0.0  # Poisson mode: seconds after the start of the level

    def options(self) -> dict[str, Any]:
        """The generate options, as the HTTP body's `parameters` carries them."""
        n = self.new_tokens
        return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}


def make_mix(
    n: int,
    prompt_range: tuple[int, int],
    new_range: tuple[int, int],
    vocab: int,
    seed: int,
    rate: float | None = None,
) -> list[LoadRequest]:
    """`n` requests with uniform prompt and output lengths; with `rate`, Poisson arrivals."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=gen)
    new_lens = torch.randint(new_range[0], new_range[1] + 1, (n,), generator=gen)
    arrivals = [0.0] * n
    if rate is not None:
        gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=gen)
        arrivals = torch.cumsum(gaps, 0).tolist()
    return [
        LoadRequest(torch.randint(7, vocab, (int(p),), generator=gen).tolist(), int(m), float(t))
        for p, m, t in zip(prompt_lens.tolist(), new_lens.tolist(), arrivals, strict=True)
    ]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99}


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time of a process, all threads (Linux /proc; None elsewhere).

    On a busy machine wall time is shared with others; CPU time per token is not, so it
    separates the HTTP side's own cost from contention."""
    if pid is None:
        return time.process_time()
    stat = Path(f"/proc/{pid}/stat")
    if not stat.is_file():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [s for s in cpuinfo.read_text().splitlines() if s.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def server_params(loaded: LoadedModel, req: LoadRequest) -> SamplingParams:
    """The SamplingParams the server builds for this request (same defaults, same checks)."""
    return resolve_sampling_params(
        req.options(),
        loaded.generation_config.to_dict(),
        int(loaded.config.n_positions),
        len(req.prompt_ids),
        vocab_size=int(loaded.config.vocab_size),
    )


def replay(
    engine: LLMEngine,
    loaded: LoadedModel,
    mix: list[LoadRequest],
    concurrency: int | None,
    tag: str,
) -> dict[str, Any]:
    """Run `mix` on `engine` in-process: closed loop of `concurrency` clients, or (None) the
    requests' Poisson arrival times. Throughput and time to first token, as the client sees."""
    todo = deque(enumerate(mix))
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    tokens = 0

    def admit() -> None:
        i, req = todo.popleft()
        rid = f"{tag}-{i}"
        engine.add_request(rid, req.prompt_ids, server_params(loaded, req))
        added[rid] = time.perf_counter()

    start, cpu_start = time.perf_counter(), time.process_time()
    if concurrency is not None:
        for _ in range(min(concurrency, len(todo))):
            admit()
    while todo or engine.has_unfinished():
        if concurrency is None:
            now = time.perf_counter() - start
            while todo and todo[0][1].arrival_s <= now:
                admit()
            if not engine.has_unfinished():
                time.sleep(max(0.0, todo[0][1].arrival_s - (time.perf_counter() - start)))
                continue
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            new = sum(len(s.token_ids) for s in out.outputs)
            if new and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - added[out.request_id]
            tokens += new
            if out.finished and concurrency is not None and todo:
                admit()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    expected = sum(r.new_tokens for r in mix)
    if tokens != expected:
        raise RuntimeError(f"in-engine replay generated {tokens} tokens, expected {expected}")
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        "cpu_s": cpu,
        "cpu_ms_per_token": 1000 * cpu / tokens,
        "ttft_s": percentiles(list(first.values())),
    }
