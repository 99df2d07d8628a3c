"""Async scheduling (`--async-scheduling`): step k+1 is scheduled while step k runs.

As vLLM v1's async scheduler: the engine schedules step k+1 assuming every sequence that
samples at step k gets exactly one token there (a placeholder id stands in the sequence's
token list), and the worker thread that runs the steps' forwards and sampler calls, in
order, puts step k's sampled token in place of the placeholder before step k+1's forward.
Meanwhile the engine thread takes step k's tokens (read back on the worker) and processes
them (stop checks, text, delivery). A sequence that finished at step k had its placeholder
computed at step k+1: that row is not sampled, its output never emitted, its blocks freed
(never hashed into the prefix cache). The engine falls back to its synchronous step, after
draining the step in flight, whenever a request is not `overlappable`.

Pure Python: the setting, the eligibility rule and the worker (one thread, FIFO jobs).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from app.options.params import SamplingParams

AsyncScheduling = Literal["auto", "on", "off"]

# Stands in a sequence's token list for the token its in-flight step is sampling.
PLACEHOLDER_TOKEN = -1


def resolve_async_scheduling(setting: AsyncScheduling, device_type: str) -> bool:
    """`auto`: on for CUDA, where the host work between forwards leaves the device idle;
    off on CPU, where the forward and the host work share the same cores (measured with
    tests/benchmarks/async_scheduling.py: no gain on the 2-core CPU)."""
    if setting == "auto":
        return device_type == "cuda"
    return setting == "on"


def overlappable(params: SamplingParams, prompt_len: int) -> bool:
    """A request whose steps may overlap: one sequence, greedy or temperature / top-k /
    top-p sampling (seeded or not), nothing on the host reading its token history at
    sampling time (logits processors, min-length bans, grammar or allowed tokens), no
    beams, no n > 1 forks, no drafts, no guidance companion, no prompt log-probs."""
    return (
        params.num_beams == 1
        and params.num_return_sequences == 1
        and params.max_new_tokens != 0
        and not params.has_logits_options
        and params.min_total_length(prompt_len) <= prompt_len
        and params.guidance_scale is None
        and params.grammar is None
        and params.allowed_token_ids is None
        and params.prompt_logprobs is None
        and params.prompt_lookup_num_tokens is None
    )


def step_worker(initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """The thread that runs the overlapped steps' jobs (forwards, sampler calls) in the order
    they are submitted, as one CUDA stream would. One worker of an executor: FIFO, and at
    interpreter exit the jobs in flight finish before the thread is joined (a daemon thread
    killed inside torch's C++ code aborts the process). `initializer` runs on the thread
    first (the engine makes the model's CUDA device current there: it is per thread)."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="kogpt-step", initializer=initializer
    )
