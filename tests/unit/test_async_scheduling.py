"""Async scheduling (app/engine/async_scheduling.py): step k+1 is scheduled and its forward
launched before step k's outputs are processed, and the outputs equal the synchronous
engine's exactly (float64 tiny GPT-2 on CPU, where `on` forces the overlapped path)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

from app.engine.async_scheduling import PLACEHOLDER_TOKEN, overlappable, resolve_async_scheduling
from app.engine.core.scheduler import ScheduledSeq, SchedulerOutput
from app.engine.engine import EngineConfig, LLMEngine
from app.engine.model_runner import ModelRunner, handed_off_id
from app.options.resolve import resolve_sampling_params
from tests.unit.test_engine import PROMPTS

GREEDY: dict[str, Any] = {"max_new_tokens": 14}
SEEDED: list[dict[str, Any]] = [
    {"max_new_tokens": 12, "do_sample": True, "seed": 3},
    {"max_new_tokens": 11, "do_sample": True, "top_k": 0, "temperature": 0.7, "seed": 5},
    {"max_new_tokens": 13, "do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 11},
]


def make_engine(model, tokenizer, mode: str, **overrides: Any) -> LLMEngine:  # type: ignore[no-untyped-def]
    config = EngineConfig(
        num_blocks=128, block_size=4, max_num_batched_tokens=16, async_scheduling=mode
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return LLMEngine(model, tokenizer, config)


@dataclass
class Received:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None


@dataclass
class Event:
    """When request `after` has received `count` tokens: add `job` as `name`, or abort
    `name` (job None). Counted in delivered tokens, so both modes act at the same point."""

    after: str
    count: int
    name: str
    job: tuple[list[int], dict[str, Any]] | None = None


def run_workload(
    engine: LLMEngine,
    jobs: dict[str, tuple[list[int], dict[str, Any]]],
    events: list[Event] = (),  # type: ignore[assignment]
) -> dict[str, Received]:
    def add(name: str, prompt: list[int], options: dict[str, Any]) -> None:
        params = resolve_sampling_params(options, {}, 128, len(prompt))
        engine.add_request(name, prompt, params)
        got[name] = Received()

    got: dict[str, Received] = {}
    for name, (prompt, options) in jobs.items():
        add(name, prompt, options)
    pending = list(events)
    while engine.has_unfinished():
        for out in engine.step():
            seen = got[out.request_id]
            seen.error = out.error or seen.error
            for seq in out.outputs:
                seen.tokens += seq.token_ids
                seen.text += seq.text
                seen.finish = seq.finish_reason or seen.finish
        engine.check_integrity()
        for event in list(pending):
            if event.after in got and len(got[event.after].tokens) >= event.count:
                pending.remove(event)
                if event.job is None:
                    engine.abort_request(event.name)
                else:
                    add(event.name, *event.job)
    assert not pending
    engine.check_integrity()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return got


def cached_hashes(engine: LLMEngine) -> set[bytes]:
    return set(engine.kv.pool._cached)


def both_ways(model, tokenizer, jobs, events=(), **overrides: Any):  # type: ignore[no-untyped-def]
    """The workload with async scheduling on and off; asserts the overlapped path ran."""
    sync = make_engine(model, tokenizer, "off", **overrides)
    overlapped = make_engine(model, tokenizer, "on", **overrides)
    expected = run_workload(sync, jobs, events)
    got = run_workload(overlapped, jobs, events)
    assert sync.num_overlapped_steps == 0
    assert overlapped.num_overlapped_steps > 0
    return expected, got, sync, overlapped


def eos_of(model, tokenizer, prompt: list[int], at: int) -> int:  # type: ignore[no-untyped-def]
    """A token greedy decoding of `prompt` produces at output position `at`."""
    free_run = run_workload(make_engine(model, tokenizer, "off"), {"x": (prompt, GREEDY)})
    return free_run["x"].tokens[at]


def test_mixed_workload_equals_the_synchronous_engine(tiny_model, tiny_tokenizer) -> None:
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = eos_of(tiny_model, tiny_tokenizer, prompts[1], 4)
    jobs = {
        "greedy": (prompts[0], GREEDY),
        "seeded0": (prompts[1], SEEDED[0]),
        "seeded1": (prompts[2], SEEDED[1]),
        "seeded2": (prompts[3], SEEDED[2]),
        "eos": (prompts[1], {**GREEDY, "eos_token_id": eos}),
        "one": (prompts[2], {"max_new_tokens": 1}),
        "one_seeded": (prompts[0], {"max_new_tokens": 1, "do_sample": True, "seed": 2}),
        "doomed": (prompts[3], {"max_new_tokens": 30}),
    }
    events = [
        Event("greedy", 3, "late_greedy", (prompts[3], GREEDY)),
        Event("greedy", 5, "late_seeded", (prompts[2], SEEDED[2])),
        Event("doomed", 6, "doomed"),  # aborted mid-run, after its sixth token
        Event("late_greedy", 2, "late_one", (prompts[1], {"max_new_tokens": 1})),
    ]
    expected, got, sync, overlapped = both_ways(tiny_model, tiny_tokenizer, jobs, events)
    assert got == expected
    assert expected["eos"].finish == "eos_token" and expected["eos"].tokens[-1] == eos
    assert len(expected["eos"].tokens) <= 5
    assert len(got["one"].tokens) == 1 and got["one"].finish == "length"
    assert got["doomed"].finish is None and len(got["doomed"].tokens) == 6
    # The discarded extra tokens were never hashed into the prefix cache.
    assert cached_hashes(overlapped) == cached_hashes(sync)


def test_stop_strings_and_texts_equal(tiny_model, tiny_tokenizer) -> None:
    prompt = tiny_tokenizer(PROMPTS[1])["input_ids"]
    options = {"max_new_tokens": 20, "do_sample": True, "seed": 7}
    free_run = run_workload(
        make_engine(tiny_model, tiny_tokenizer, "off"), {"x": (prompt, options)}
    )
    texts = [tiny_tokenizer.decode([t]) for t in free_run["x"].tokens]
    stop = next(t.strip() for t in texts[3:] if t.strip() and "\ufffd" not in t)
    jobs = {
        "stop": (prompt, {**options, "stop_strings": [stop]}),
        "kept": (prompt, {**options, "stop_strings": [stop], "include_stop_str_in_output": True}),
        "free": (tiny_tokenizer(PROMPTS[0])["input_ids"], SEEDED[0]),
    }
    expected, got, _, _ = both_ways(tiny_model, tiny_tokenizer, jobs)
    assert got == expected
    assert got["stop"].finish == "stop_sequence" and stop not in got["stop"].text


def test_preemption_under_a_tiny_pool(tiny_model, tiny_tokenizer) -> None:
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = {f"r{i}": (p, {**SEEDED[i % 3], "max_new_tokens": 30}) for i, p in enumerate(prompts)}
    jobs["g"] = (prompts[0], {"max_new_tokens": 30})
    expected, got, sync, overlapped = both_ways(
        tiny_model, tiny_tokenizer, jobs, num_blocks=22, enable_prefix_caching=False
    )
    assert got == expected
    assert sync.scheduler.num_preemptions > 0 and overlapped.scheduler.num_preemptions > 0


def test_unseeded_rows_draw_as_in_the_synchronous_engine(tiny_model, tiny_tokenizer) -> None:
    """A sequence whose token in flight is its last (its length) is not scheduled again,
    so no row of it takes from the generator the unseeded rows share: with finishes on
    length only (all admitted in the first step) both engines draw the same numbers for
    the same rows."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = {
        f"u{i}": (p, {"max_new_tokens": 3 + 4 * i, "do_sample": True})
        for i, p in enumerate(prompts)
    }
    expected, got, _, _ = both_ways(tiny_model, tiny_tokenizer, jobs, max_num_batched_tokens=128)
    assert got == expected


def test_next_step_is_scheduled_before_the_outputs_are_processed(
    tiny_model, tiny_tokenizer
) -> None:
    events: list[str] = []
    forwards: list[list[list[int]]] = []  # each forward's input ids, as the device saw them
    handed: list[bool] = []  # whether a forward's decode input was still on the device
    device_threads: list[str] = []  # where forwards and sampler calls ran
    got = {}
    for mode in ("off", "on"):
        engine = make_engine(tiny_model, tiny_tokenizer, mode)
        schedule, advance = engine.scheduler.schedule, engine._advance
        execute = engine.runner.execute_step

        def spy_schedule(schedule=schedule) -> SchedulerOutput:  # type: ignore[no-untyped-def]
            events.append("schedule")
            return schedule()

        def spy_advance(*args: Any, advance=advance) -> None:  # type: ignore[no-untyped-def]
            events.append("advance")
            advance(*args)

        def spy_execute(out: SchedulerOutput, handed_off=None, execute=execute):  # type: ignore[no-untyped-def]
            ids = [list(item.token_ids) for item in out.seqs]
            handed.append(any(t <= -2 for seq in ids for t in seq))
            if handed_off is not None:  # what execute_step resolves on the device
                ids = [[int(handed_off[-2 - t]) if t <= -2 else t for t in seq] for seq in ids]
            forwards.append(ids)
            device_threads.append(threading.current_thread().name)
            return execute(out, handed_off=handed_off)

        sampler = engine.sampler
        name = "launch" if mode == "on" else "sample"

        call = getattr(sampler, name)

        def spy_sample(logits, rows, call=call):  # type: ignore[no-untyped-def]
            device_threads.append(threading.current_thread().name)
            return call(logits, rows)

        engine.scheduler.schedule = spy_schedule  # type: ignore[method-assign]
        engine._advance = spy_advance  # type: ignore[method-assign]
        engine.runner.execute_step = spy_execute  # type: ignore[method-assign]
        setattr(sampler, name, spy_sample)
        events.clear()
        forwards.clear()
        handed.clear()
        device_threads.clear()
        prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
        got[mode] = run_workload(engine, {"a": (prompt, {"max_new_tokens": 4})})["a"]
        if mode == "off":
            assert events[:4] == ["schedule", "advance", "schedule", "advance"]
            assert not any(handed)
        else:
            # Step 2 is scheduled (and queued) before step 1's token is processed. The
            # fifth schedule plans nothing: the token in flight is the last (length), so no
            # extra forward is computed for it (vLLM's async scheduler skips it too).
            assert events[:5] == ["schedule", "schedule", "advance", "schedule", "advance"]
            assert events.count("advance") == 4 and events.count("schedule") == 5
            # Every decode's input token was handed over on the device: the host did not
            # know it when the forward was queued.
            assert handed == [False, True, True, True]
        # Overlapped: every forward and sampler call on the worker, none on the engine
        # thread, which only waits for the step's results (4 forwards, 4 sampler calls).
        worker = {name.startswith("kogpt-step") for name in device_threads}
        assert worker == {mode == "on"} and len(device_threads) == 8
        # Every decode's input is the token emitted before it: the placeholder never
        # reaches the forward.
        decodes = [seqs[0] for seqs in forwards[1:]]
        assert all(PLACEHOLDER_TOKEN not in ids for seqs in forwards for ids in seqs)
        assert [ids[0] for ids in decodes] == got[mode].tokens[:3]
    assert got["on"] == got["off"]


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"num_beams": 2},
        {"do_sample": True, "seed": 1, "num_return_sequences": 2},
        {"min_new_tokens": 5},
        {"prompt_lookup_num_tokens": 3},
        {"guidance_scale": 1.5},
    ],
)
def test_ineligible_requests_fall_back(tiny_model, tiny_tokenizer, options) -> None:
    """A request that needs the synchronous step drains the step in flight and runs
    synchronous steps while it lives; overlapped steps resume after it."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = {
        "plain": (prompts[0], {"max_new_tokens": 30}),
        "seeded": (prompts[1], {**SEEDED[0], "max_new_tokens": 30}),
    }
    events = [Event("plain", 4, "special", (prompts[2], {**options, "max_new_tokens": 6}))]
    sync = make_engine(tiny_model, tiny_tokenizer, "off")
    engine = make_engine(tiny_model, tiny_tokenizer, "on")
    expected = run_workload(sync, jobs, events)
    modes: list[bool] = []
    step = engine.step

    def spy_step():  # type: ignore[no-untyped-def]
        overlapped = engine.num_overlapped_steps
        outs = step()
        modes.append(engine.num_overlapped_steps > overlapped)
        return outs

    engine.step = spy_step  # type: ignore[method-assign]
    got = run_workload(engine, jobs, events)
    assert got == expected
    # overlapped, then synchronous while "special" runs, then overlapped again
    first_sync = modes.index(False)
    assert all(modes[:first_sync]) and first_sync >= 4
    assert any(modes[first_sync:]) and not all(modes[first_sync:])


def test_overlappable_rule(tiny_tokenizer) -> None:
    def params(**options: Any):  # type: ignore[no-untyped-def]
        return resolve_sampling_params({"max_new_tokens": 5, **options}, {}, 128, 4)

    assert overlappable(params(), 4)
    assert overlappable(params(do_sample=True, seed=1, top_k=5, top_p=0.5, temperature=0.5), 4)
    assert overlappable(params(stop_strings=["x"], top_n_tokens=3), 4)
    assert not overlappable(params(presence_penalty=0.5), 4)
    assert not overlappable(params(bad_words_ids=[[5]]), 4)
    assert not overlappable(params(allowed_token_ids=[5, 6]), 4)
    assert not overlappable(replace(params(), prompt_logprobs=1), 4)
    assert not overlappable(replace(params(), max_new_tokens=0), 4)  # the prompt only


def test_the_setting() -> None:
    assert resolve_async_scheduling("on", "cpu") and resolve_async_scheduling("on", "cuda")
    assert not resolve_async_scheduling("off", "cuda")
    assert resolve_async_scheduling("auto", "cuda")
    assert not resolve_async_scheduling("auto", "cpu")


def test_a_failing_forward_fails_its_request_alone(tiny_model, tiny_tokenizer) -> None:
    """The worker retries a failing batch one request at a time, as the synchronous step
    does: the broken request fails (its blocks never hashed), the others go on unchanged."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = {
        "a": (prompts[0], GREEDY),
        "bad": (prompts[1], GREEDY),
        "b": (prompts[2], SEEDED[0]),
    }
    bad_len = len(prompts[1])
    got = {}
    for mode in ("off", "on"):
        engine = make_engine(tiny_model, tiny_tokenizer, mode)
        execute = engine.runner.execute_step

        def exploding(out: SchedulerOutput, handed_off=None, execute=execute):  # type: ignore[no-untyped-def]
            for item in out.seqs:
                if item.request_id == "bad" and item.start_pos >= bad_len + 2:
                    raise RuntimeError("boom")
            return execute(out, handed_off=handed_off)

        engine.runner.execute_step = exploding  # type: ignore[method-assign]
        got[mode] = run_workload(engine, jobs)
        assert got[mode]["bad"].error is not None and "boom" in got[mode]["bad"].error
        assert len(got[mode]["bad"].tokens) == 3
        assert len(got[mode]["a"].tokens) == GREEDY["max_new_tokens"]
    assert got["on"] == got["off"]


@pytest.mark.parametrize("static_decode", [False, True])
def test_the_padded_decode_takes_the_handed_off_tokens(
    tiny_model, tiny_tokenizer, static_decode: bool
) -> None:
    """Overlapped steps on the padded decode (CUDA's graphs, run eagerly here) and on the
    varlen forward give the synchronous engine's tokens."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = {f"r{i}": (p, {**SEEDED[i % 3], "max_new_tokens": 9 + i}) for i, p in enumerate(prompts)}
    jobs["g"] = (prompts[1], GREEDY)
    expected, got, _sync, overlapped = both_ways(
        tiny_model, tiny_tokenizer, jobs, static_decode=static_decode
    )
    assert got == expected
    graphs = overlapped.runner.decode_graphs
    assert (graphs is not None and graphs.num_padded_steps > 0) == static_decode


@pytest.mark.parametrize("static_decode", [False, True])
def test_handed_off_ids_resolve_on_the_device(tiny_model, static_decode: bool) -> None:
    """execute_step with `handed_off`: each id handed_off_id(j) reads handed_off[j], in
    every forward (varlen, padded) and per model when several run in one step; the logits
    equal those of the same step with the ids written on the host."""
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)

    def runner() -> ModelRunner:
        return ModelRunner(
            tiny_model, 16, 4, static_decode=static_decode, max_num_seqs=8, more_models=[other]
        )

    prefill = [
        ScheduledSeq(0, "a", [5, 6, 7], 0, [0], True),
        ScheduledSeq(1, "b", [8, 9], 0, [1], True, model=1),
        ScheduledSeq(2, "c", [10, 11, 12, 13, 14], 0, [2, 3], True),
    ]
    host, device = runner(), runner()
    for r in (host, device):
        r.execute_step(SchedulerOutput(seqs=prefill, num_batched_tokens=10))
    tokens = [21, 34, 40]
    decode = [(0, "a", 3, [0], 0), (1, "b", 2, [1], 1), (2, "c", 5, [2, 3], 0)]
    handed_off = torch.tensor([99, 40, 34, 21])  # this order: ids point into it

    def step(ids: list[int]) -> SchedulerOutput:
        seqs = [
            ScheduledSeq(seq, rid, [t], start, table, True, model=m)
            for (seq, rid, start, table, m), t in zip(decode, ids, strict=True)
        ]
        return SchedulerOutput(seqs=seqs, num_batched_tokens=3)

    want = host.execute_step(step(tokens)).logits
    marked = [handed_off_id(3), handed_off_id(2), 40]  # a host id may stand beside them
    got = device.execute_step(step(marked), handed_off=handed_off).logits
    assert torch.equal(got, want)
    graphs = device.decode_graphs
    assert (graphs is not None and graphs.num_padded_steps == 1) == static_decode


def test_an_invalid_distribution_fails_its_request_alone(tiny_model, tiny_tokenizer) -> None:
    """A row whose probabilities multinomial refuses (NaN logits here) fails its request
    with multinomial's error, read back with the step's tokens: the other requests go on
    exactly as in the synchronous engine (which retries its batch request by request)."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = {
        "a": (prompts[0], GREEDY),
        "bad": (prompts[1], {**SEEDED[1], "max_new_tokens": 12}),
        "b": (prompts[2], SEEDED[0]),
        "c": (prompts[3], SEEDED[2]),
    }
    bad_len = len(prompts[1])
    got = {}
    for mode in ("off", "on"):
        engine = make_engine(tiny_model, tiny_tokenizer, mode)
        execute = engine.runner.execute_step

        def poisoned(out: SchedulerOutput, handed_off=None, execute=execute):  # type: ignore[no-untyped-def]
            result = execute(out, handed_off=handed_off)
            sampling = [item for item in out.seqs if item.sample]
            with torch.inference_mode():  # the logits are an inference tensor
                for row, item in enumerate(sampling):
                    if item.request_id == "bad" and item.start_pos >= bad_len + 3:
                        result.logits[row] = float("nan")
            return result

        engine.runner.execute_step = poisoned  # type: ignore[method-assign]
        got[mode] = run_workload(engine, jobs)
        bad = got[mode]["bad"]
        assert bad.error is not None and "probability tensor contains" in bad.error
        assert len(bad.tokens) == 4
        assert len(got[mode]["c"].tokens) == SEEDED[2]["max_new_tokens"]
    assert got["on"] == got["off"]


def test_a_failing_sampler_call_fails_its_request_alone(tiny_model, tiny_tokenizer) -> None:
    """When the batched sampler call raises, the requests are sampled one at a time, as the
    synchronous step does: the failing request fails, the others' tokens (then handed to
    the next step from the host) are the synchronous engine's."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    poison = 0.55  # the temperature only the failing request uses
    jobs = {
        "a": (prompts[0], GREEDY),
        "bad": (prompts[1], {**SEEDED[1], "temperature": poison}),
        "b": (prompts[2], SEEDED[0]),
        "c": (prompts[3], SEEDED[2]),
    }
    got = {}
    for mode in ("off", "on"):
        engine = make_engine(tiny_model, tiny_tokenizer, mode)
        calls = {"sample": 0, "launch": 0}
        for name in calls:
            poison_sampler(engine.sampler, name, poison, calls)
        got[mode] = run_workload(engine, jobs)
        assert got[mode]["bad"].error is not None and "sampler boom" in got[mode]["bad"].error
        assert got[mode]["bad"].tokens == []
        assert (calls["launch"] > 0) == (mode == "on")
    assert got["on"] == got["off"]


def poison_sampler(sampler: Any, name: str, poison: float, calls: dict[str, int]) -> None:
    """`sampler.<name>` raises for a call with a row at temperature `poison`; calls counted."""
    call = getattr(sampler, name)

    def failing(logits, rows):  # type: ignore[no-untyped-def]
        calls[name] += 1
        if any(row.temperature == poison for row in rows):
            raise RuntimeError("sampler boom")
        return call(logits, rows)

    setattr(sampler, name, failing)
