"""Every Prometheus metric of the server, in one place (names prefixed `kogpt_`).

Each app gets its own `ServerMetrics` with its own registry (several servers can live in one
process, as in the tests); every series carries a `model` label. Request-side metrics are
updated by the HTTP layer and labelled with the full model that ran the request (`--model`'s
reported name; an adapter's request: its base model's, so the label's values are bounded by
the models served, as vLLM's model_name; adapters show in kogpt_lora_requests_info); HTTP
metrics of a request that selected no model (errors before the selection, routes that
generate nothing) carry the default model's. Engine-side ones are read from the engine at
scrape time, except the per-step batch size histogram, which is observed after every engine
step; they are the server's totals, labelled with the default model's name, except the
kogpt_model_* gauges, one series per full model.

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| kogpt_requests_total | counter | endpoint, status | HTTP requests by route and status code |
| kogpt_request_finish_total | counter | endpoint, finish_reason | requests by finish reason |
| kogpt_request_latency_seconds | histogram | endpoint | HTTP request time (to the last byte) |
| kogpt_time_to_first_token_seconds | histogram | endpoint | admission to first token |
| kogpt_inter_token_latency_seconds | histogram | endpoint | between consecutive tokens |
| kogpt_request_prompt_tokens | histogram | endpoint | prompt tokens per request |
| kogpt_request_generation_tokens | histogram | endpoint | generated tokens per request |
| kogpt_prompt_tokens_total | counter | | prompt tokens processed |
| kogpt_generation_tokens_total | counter | | tokens generated |
| kogpt_requests_running | gauge | | requests in the running batch |
| kogpt_requests_waiting | gauge | | requests waiting for admission |
| kogpt_model_requests_running | gauge | | of kogpt_requests_running, those of each full model |
| kogpt_model_requests_waiting | gauge | | requests of each full model in the scheduler's queue |
| kogpt_kv_cache_usage_ratio | gauge | | used KV blocks / all KV blocks |
| kogpt_kv_cache_blocks / _free_blocks | gauge | | KV cache size and free blocks |
| kogpt_prefix_cache_queries_total | counter | | full prompt blocks looked up |
| kogpt_prefix_cache_hits_total | counter | | of which found in the prefix cache |
| kogpt_preemptions_total | counter | | recompute preemptions |
| kogpt_engine_steps_total | counter | | engine steps run |
| kogpt_spec_draft_tokens_total | counter | | speculative (prompt-lookup) tokens verified |
| kogpt_spec_accepted_tokens_total | counter | | of which accepted (equal to plain decoding's) |
| kogpt_batch_size | histogram | | sequences per engine step |
| kogpt_step_device_busy_seconds | histogram | | device time of a step's forward |
| kogpt_step_device_idle_seconds | histogram | | device idle before a forward, requests running |
| kogpt_step_host_seconds | histogram | | host time between forwards, requests running |
| kogpt_device_busy_seconds / _idle_seconds | counter | | their sums (app/engine/step_timing.py) |
| kogpt_device_idle_ratio | gauge | | idle / (idle + busy) device time so far |
| kogpt_draining | gauge | | 1 while shutting down |
| kogpt_lora_requests_info | gauge | running_lora_adapters, ... | LoRA adapter info (below) |
| kogpt_cache_config_info | gauge | block_size, num_gpu_blocks | KV cache layout (value 1) |

The Gateway API Inference Extension's endpoint picker reads kogpt_requests_waiting (queued),
kogpt_requests_running, kogpt_kv_cache_usage_ratio (0..1), kogpt_lora_requests_info and
kogpt_cache_config_info (its model-server protocol; docker/k8s/inference-pool/). The adapter
gauge has vLLM's lora_requests_info labels: running_lora_adapters and waiting_lora_adapters
(comma-separated names of the LoRA adapters of running and of waiting requests; empty when
only the base model runs) and max_lora (--max-loras); its value is when the label set last
changed (the picker keeps the newest series). kogpt_requests_waiting also counts requests
handed to the engine thread and not yet queued, which no model's kogpt_model_requests_waiting
counts yet.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.engine.step_timing import StepTiming

logger = logging.getLogger("kogpt.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (name, type, help, key of LLMEngine.stats()) of the series read at scrape time.
ENGINE_SERIES = (
    ("kogpt_requests_running", "gauge", "Requests in the running batch.", "num_running"),
    ("kogpt_requests_waiting", "gauge", "Requests waiting for admission.", "num_waiting"),
    ("kogpt_kv_cache_usage_ratio", "gauge", "Used KV blocks / all KV blocks.", "kv_usage"),
    ("kogpt_kv_cache_blocks", "gauge", "KV cache blocks.", "kv_total_blocks"),
    ("kogpt_kv_cache_free_blocks", "gauge", "Free KV cache blocks.", "kv_free_blocks"),
    ("kogpt_prefix_cache_queries", "counter", "Full prompt blocks looked up.", "prefix_queries"),
    ("kogpt_prefix_cache_hits", "counter", "Prompt blocks found cached.", "prefix_hits"),
    ("kogpt_preemptions", "counter", "Recompute preemptions.", "num_preemptions"),
    ("kogpt_engine_steps", "counter", "Engine steps run.", "num_steps"),
    ("kogpt_spec_draft_tokens", "counter", "Speculative tokens verified.", "spec_draft_tokens"),
    ("kogpt_spec_accepted_tokens", "counter", "Drafts accepted.", "spec_accepted_tokens"),
    ("kogpt_draining", "gauge", "1 while the server drains.", "draining"),
    ("kogpt_device_busy_seconds", "counter", "Device time in forwards.", "device_busy_seconds"),
    (
        "kogpt_device_idle_seconds",
        "counter",
        "Device idle time between forwards while requests ran.",
        "device_idle_seconds",
    ),
    (
        "kogpt_device_idle_ratio",
        "gauge",
        "Idle / (idle + busy) device time between and in forwards.",
        "device_idle_ratio",
    ),
)


class EngineCollector(Collector):
    """Engine-side gauges and counters, read from the engine at scrape time."""

    def __init__(self, model: str, async_engine: Any) -> None:
        self.model = model
        self.async_engine = async_engine
        # The adapter info gauge's value is when its label set last changed (the picker keeps
        # the newest series).
        self.lora_info_since = time.time()
        self.lora_labels: tuple[str, str] = ("", "")
        # The last per-model counts read whole (running, waiting), for a read that fails.
        self.model_counts: tuple[list[int], list[int]] = ([], [])

    def collect(self) -> Iterator[Metric]:
        engine = self.async_engine.engine
        try:
            stats = engine.stats()
            waiting = self.async_engine.num_waiting
            block_size = engine.config.block_size
        except Exception:  # never fail a scrape because the engine is mid-update
            logger.exception("reading engine stats failed")
            return
        values = {**stats, "num_waiting": waiting, "draining": float(self.async_engine.draining)}
        for name, kind, doc, key in ENGINE_SERIES:
            family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_type(name, doc, labels=["model"])
            family.add_metric([self.model], float(values[key]))
            yield family
        yield from self.model_families()
        yield from self.info_families(block_size, int(stats["kv_total_blocks"]))

    def model_families(self) -> Iterator[Metric]:
        """Running and waiting requests of each full model, labelled with its reported name."""
        engine = self.async_engine.engine
        # The default model is index 0 (the engine may know it by no name).
        names = [self.model, *engine.model_names[1:]]
        # RuntimeError: the scheduler's queues changed while read; the last counts stay.
        with contextlib.suppress(RuntimeError):
            self.model_counts = engine.requests_by_model()
        running, waiting = self.model_counts
        for name, counts, doc in (
            ("kogpt_model_requests_running", running, "Running requests of each full model."),
            ("kogpt_model_requests_waiting", waiting, "Queued requests of each full model."),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for index, model in enumerate(names):
                family.add_metric([model], float(counts[index] if index < len(counts) else 0))
            yield family

    def _lora_labels(self) -> tuple[str, str, str]:
        """(running, waiting, max_lora) label values; the value's timestamp moves when the
        adapter lists change."""
        engine = self.async_engine.engine
        try:
            running, waiting = engine.lora_activity()
            labels = (",".join(running), ",".join(waiting))
        except RuntimeError:  # the scheduler's queues changed while read: the last lists
            labels = self.lora_labels
        if labels != self.lora_labels:
            self.lora_labels = labels
            self.lora_info_since = time.time()
        return (*labels, str(engine.lora.max_loras))

    def info_families(self, block_size: int, num_blocks: int) -> Iterator[Metric]:
        """Info-style gauges of the inference extension's model-server protocol: the label
        values carry the data (the adapters of running and waiting requests, --max-loras)."""
        lora = GaugeMetricFamily(
            "kogpt_lora_requests_info",
            "LoRA adapters running and waiting (value: when the label set last changed).",
            labels=["model", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        lora.add_metric([self.model, *self._lora_labels()], self.lora_info_since)
        yield lora
        cache = GaugeMetricFamily(
            "kogpt_cache_config_info",
            "KV cache layout: tokens per block and blocks (value 1).",
            labels=["model", "block_size", "num_gpu_blocks"],
        )
        cache.add_metric([self.model, str(block_size), str(num_blocks)], 1.0)
        yield cache


class ServerMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        ep = ["model", "endpoint"]
        self.requests = Counter(
            "kogpt_requests", "HTTP requests by endpoint and status.", [*ep, "status"], registry=reg
        )
        self.finished = Counter(
            "kogpt_request_finish",
            "Engine requests by endpoint and finish reason.",
            [*ep, "finish_reason"],
            registry=reg,
        )
        self.latency = Histogram(
            "kogpt_request_latency_seconds",
            "HTTP request latency (to the last byte).",
            ep,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "kogpt_time_to_first_token_seconds",
            "Time from admission to the first generated token.",
            ep,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "kogpt_inter_token_latency_seconds",
            "Time between consecutive generated tokens.",
            ep,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Histogram(
            "kogpt_request_prompt_tokens",
            "Prompt tokens per request.",
            ep,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.generation_tokens = Histogram(
            "kogpt_request_generation_tokens",
            "Generated tokens per request.",
            ep,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens_total = Counter(
            "kogpt_prompt_tokens", "Prompt tokens processed.", ["model"], registry=reg
        )
        self.generation_tokens_total = Counter(
            "kogpt_generation_tokens", "Tokens generated.", ["model"], registry=reg
        )
        self.batch_size = Histogram(
            "kogpt_batch_size",
            "Sequences scheduled per engine step.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.step_busy = Histogram(
            "kogpt_step_device_busy_seconds",
            "Device time of each engine step's forward.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=reg,
        )
        self.step_idle = Histogram(
            "kogpt_step_device_idle_seconds",
            "Device idle time before each forward while requests were running.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=reg,
        )
        self.step_host = Histogram(
            "kogpt_step_host_seconds",
            "Host time between consecutive forwards while requests were running.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=reg,
        )
        self._engine_collector: EngineCollector | None = None
        with contextlib.suppress(Exception):  # platforms without /proc
            ProcessCollector(registry=reg)

    # -- engine ---------------------------------------------------------------------------
    def bind_engine(self, async_engine: Any) -> None:
        """Export the engine's stats and observe the batch size of every step."""
        if self._engine_collector is not None:
            return
        self._engine_collector = EngineCollector(self.model, async_engine)
        self.registry.register(self._engine_collector)
        async_engine.engine.step_observers.append(self.batch_size.labels(self.model).observe)
        async_engine.engine.runner.step_timer.observers.append(self.observe_step_timing)

    def observe_step_timing(self, timing: StepTiming) -> None:
        self.step_busy.labels(self.model).observe(timing.device_busy)
        if timing.device_idle is not None:
            self.step_idle.labels(self.model).observe(timing.device_idle)
        if timing.host is not None:
            self.step_host.labels(self.model).observe(timing.host)

    # -- HTTP side --------------------------------------------------------------------------
    # `model`: the full model's reported name (an adapter's request: its base model's);
    # None: the default model's.
    def observe_http(
        self, endpoint: str, status: int, seconds: float, *, model: str | None = None
    ) -> None:
        label = model or self.model
        self.requests.labels(label, endpoint, str(status)).inc()
        self.latency.labels(label, endpoint).observe(seconds)

    def observe_first_token(
        self, endpoint: str, seconds: float, *, model: str | None = None
    ) -> None:
        self.ttft.labels(model or self.model, endpoint).observe(seconds)

    def observe_inter_token(
        self, endpoint: str, seconds: float, tokens: int = 1, *, model: str | None = None
    ) -> None:
        child = self.itl.labels(model or self.model, endpoint)
        per_token = seconds / max(tokens, 1)
        for _ in range(max(tokens, 1)):
            child.observe(per_token)

    def observe_finished(
        self,
        endpoint: str,
        finish_reason: str,
        prompt_tokens: int,
        generated_tokens: int,
        *,
        model: str | None = None,
    ) -> None:
        label = model or self.model
        self.finished.labels(label, endpoint, finish_reason).inc()
        self.prompt_tokens.labels(label, endpoint).observe(prompt_tokens)
        self.generation_tokens.labels(label, endpoint).observe(generated_tokens)
        self.prompt_tokens_total.labels(label).inc(prompt_tokens)
        self.generation_tokens_total.labels(label).inc(generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
