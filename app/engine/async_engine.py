"""AsyncEngine: one engine thread owns the model; asyncio callers stream RequestOutputs.

Hand-offs are batched: the engine thread delivers all outputs of a step to each event
loop with a single `call_soon_threadsafe`, so the HTTP side costs one thread hop per
step, not one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.engine.engine import LLMEngine
from app.engine.memory import IdleTrimmer
from app.engine.outputs import RequestOutput
from app.options.params import SamplingParams

logger = logging.getLogger("kogpt.engine")

T = TypeVar("T")


class EngineQueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should answer 429."""


class EngineNotRunningError(RuntimeError):
    """The engine is stopped, draining or dead: the caller should answer 503."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_adds = 0
        self.draining = False
        self.error: BaseException | None = None
        self.debug_integrity_checks = False
        self.trimmer = IdleTrimmer()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kogpt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self._pending_adds

    # -- API for asyncio callers ---------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        diagnostics: tuple[str, ...] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs, whatever lane serves it (LLMEngine.add_request);
        closing the iterator early aborts the request."""
        self.check_admission()
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
            self._pending_adds += 1
        self._inbox.put(("add", (request_id, prompt_token_ids, params, diagnostics)))
        self._wakeup.set()
        finished = False
        try:
            while True:
                out = await stream.queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (it may use the model: nothing else
        does meanwhile) and return its result or raise its exception. Other requests wait
        while it runs. Cancelling the caller does not stop `fn` once it has started."""
        if not self.is_running:
            raise EngineNotRunningError("the engine is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put(("call", (loop, future, fn)))
        self._wakeup.set()
        return await future

    def check_admission(self) -> None:
        """Raise if a new request would be refused now (callers check before streaming)."""
        if self.draining:
            raise EngineNotRunningError("the server is shutting down and accepts no new requests")
        if not self.is_running:
            raise EngineNotRunningError("the engine is not running")
        if self.num_waiting >= self.max_waiting_requests:
            raise EngineQueueFullError(
                f"{self.num_waiting} requests are already waiting (limit "
                f"{self.max_waiting_requests}); retry later"
            )

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self.engine.signal_abort(request_id)  # seen inside a long lane step at once
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    if self.debug_integrity_checks:
                        self.engine.check_integrity()
                    self.trimmer.idle()  # a burst's freed memory back to the OS
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                self.trimmer.busy()
                self._deliver(self.engine.step())
        except BaseException as err:  # the loop itself broke: fail everyone, report unready
            logger.exception("engine loop died")
            self.error = err
            self._fail_all(f"engine loop died: {type(err).__name__}: {err}")

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt, params, diagnostics = payload
                with self._lock:
                    self._pending_adds -= 1
                    alive = request_id in self._streams
                if not alive:
                    continue  # aborted before it reached the engine
                try:
                    self.engine.add_request(request_id, prompt, params, diagnostics=diagnostics)
                except Exception as err:
                    self._deliver([self._error_output(request_id, prompt, err)])
            elif kind == "call":
                _run_call(*payload)
            else:
                self.engine.abort_request(payload)

    @staticmethod
    def _error_output(request_id: str, prompt: list[int], err: Exception) -> RequestOutput:
        message = f"{type(err).__name__}: {err}"
        return RequestOutput(request_id, prompt, [], True, message, error_kind="invalid_request")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            # A closed caller loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            items = list(self._streams.items())
            self._streams.clear()
        for request_id, stream in items:
            out = RequestOutput(request_id, [], [], True, message)
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)


def _run_call(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Any) -> None:
    """run_exclusive's call, on the engine thread; the result goes back to the caller's loop."""
    try:
        result, error = fn(), None
    except Exception as err:
        result, error = None, err

    def resolve() -> None:
        if future.done():  # the caller was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed
        loop.call_soon_threadsafe(resolve)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)
