"""`AsyncLLMEngine`: the step loop on a background thread, one async output stream per request.

Torch releases the GIL inside its kernels, so the HTTP side keeps running while a step
computes. Requests and aborts reach the loop through a thread-safe inbox; outputs go back to
each caller's asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from llmscale.config import ConfigError, EngineConfig
from llmscale.engine.llm_engine import EngineState, LLMEngine
from llmscale.engine.outputs import RequestOutput
from llmscale.engine.sampling_params import SamplingParams
from llmscale.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_FINISHED = object()


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine],
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        """`engine`, or a function that builds one: it then runs on the loop's thread, so that
        thread is the only one that ever started OpenMP work. Once another thread has (the
        main thread, loading the model), this one's parallel regions run markedly slower
        (BENCHMARKS.md, "the engine's thread"). Waits for the build; its errors raise here.
        `on_death` is called (on the loop's thread) with the error a failed step raised, after
        every waiting request got it (a server stops on it)."""
        self._on_death = on_death
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        built: Future[LLMEngine] = Future()
        if isinstance(engine, LLMEngine):
            self.engine = engine
            built.set_result(engine)
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="llmscale-engine",
                                        daemon=True)
        self._thread.start()
        self.engine = built.result()

    @classmethod
    def from_config(cls, config: EngineConfig,
                    on_death: Callable[[BaseException], None] | None = None) -> AsyncLLMEngine:
        return cls(lambda: LLMEngine(config, stream_text=True, online=True), on_death)

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], built: Future[LLMEngine]) -> None:
        if not built.done():
            try:
                assert callable(engine)
                self.engine = engine()
            except BaseException as e:  # the constructor re-raises it
                built.set_exception(e)
                return
            built.set_result(self.engine)
        try:
            self._loop()
        finally:
            self.engine.shutdown()  # its worker ranks, from the thread that stepped them

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # What the HTTP API needs besides `generate` (see serve/engine_client.py).
    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def states(self) -> dict[str, EngineState]:
        return {"": self.engine.state()}

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)

    async def generate(self, prompt: Any, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs as tokens arrive; the last one has `finished` set.
        Leaving the iterator early (client gone) aborts the request."""
        if not self.is_running:
            raise EngineDeadError("engine loop is not running")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:  # refused before its abort could reach the request holding the id
            raise ConfigError(f"request id {rid!r} is already in use")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[Any] = asyncio.Queue()
        added: Future[None] = Future()
        self._streams[rid] = (loop, stream)
        self._submit("add", (rid, prompt, params, added))
        try:
            # Leaving here before the loop took the request cancels `added`: the loop then drops it.
            await asyncio.wrap_future(added)  # raises the engine's validation error, if any
            while True:
                item = await stream.get()
                if item is _FINISHED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # The inbox is FIFO, so this abort comes after the add; for a request the loop dropped
            # or refused it finds nothing to abort.
            if self._streams.pop(rid, None) is not None:
                self._submit("abort", rid)

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    def _submit(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, prompt, params, fut = payload
                if not fut.set_running_or_notify_cancel():
                    continue  # its caller left before the request got here
                try:
                    self.engine.add_request(rid, prompt, params)
                    fut.set_result(None)
                except Exception as e:  # a bad request fails alone
                    fut.set_exception(e)
            else:
                if payload in self.engine.groups:
                    self.engine.abort_request(payload)
                self._deliver(payload, _FINISHED)

    def _deliver(self, rid: str, item: Any) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _loop(self) -> None:
        """Steps until shut down. Any error here leaves the engine in an unknown state, so the
        loop stops, every waiting caller gets the error and `on_death` hears of it: a server
        must not stay up answering 503 with a dead loop behind it."""
        try:
            while not self._stop:
                self._iterate()
        except Exception as e:
            log.exception("engine loop failed")
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine failed: {e}"))
            if self._on_death is not None:
                self._on_death(e)

    def _iterate(self) -> None:
        self._wake.clear()
        self._drain_inbox()
        if not self.engine.has_unfinished_requests():
            self._wake.wait(0.5)
            return
        steps_before = self.engine.stats["steps"]
        outputs = self.engine.step()
        if self.engine.stats["steps"] == steps_before:
            self._wake.wait(0.002)  # a batching policy is waiting for its batch to fill
        for out in outputs:
            self._deliver(out.request_id, out)
