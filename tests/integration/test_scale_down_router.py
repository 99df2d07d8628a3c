"""Scale-down under load through a real router (slow, opt-in: `pytest -m slow`): two replica
subprocesses behind sglang-router with the drain-aware settings of docs/deployment.md, one
sent SIGTERM a third of the way through a closed loop of streamed few-shot requests. Every
request completes as the client sees it: the draining replica finishes what it runs and its
503s for new requests are retried by the router on the other replica.

Starting two servers and the router takes 30 s to a minute on two shared cores, so this is
not in `make test`; `make bench-scale-out ARGS=--scale-down` is the same run, larger."""

from __future__ import annotations

import argparse

import pytest
from transformers import AutoTokenizer

from tests.benchmarks.scale_out import (
    BLOCK_SIZE,
    CLIENTS_PYTHON,
    DEFAULT_MODEL,
    build_workload,
    run_scale_down,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CLIENTS_PYTHON.exists(), reason="no .venv-clients: run `make clients`"),
]


def test_sigterm_to_a_replica_under_load_loses_no_request() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    workload = build_workload(tokenizer, prefix_tokens=300, num_requests=36, max_tokens=4, seed=1)
    args = argparse.Namespace(
        replicas=2,
        model=DEFAULT_MODEL,
        concurrency=6,
        scale_down_policy="cache_aware",
        router_defaults=False,
    )
    kv_blocks = 8 * (max(workload.prefix_tokens) // BLOCK_SIZE + 1) + 48
    result = run_scale_down(args, workload, kv_blocks)
    assert result["sigterm"]["after_requests"] < result["requests"], "SIGTERM came too late"
    assert result["victim_exit_status"] == 0
    assert result["errors"] == []
    assert result["completed"] == result["requests"] == 36
    assert result["survivors_completions"][0] > 0
