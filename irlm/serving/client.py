"""The server side of the engine core: submit requests, stream their tokens back as text.

:class:`EngineClient` owns the core process and its two queues.  A reader thread blocks on
the out-queue and hands each step's batch to the event loop; every request has an inbox of
its deltas (:meth:`RequestStream.put`).  Detokenization (incremental, never splitting a UTF-8
character: :class:`~irlm.runtime.detokenizer.IncrementalDetokenizer`) and stop strings run
here, in the server process; a sequence that hits a stop string ends here, and the request is
aborted in the core once all its sequences ended, which frees its KV blocks.

If the core dies (an exception in a step, a native crash, SIGKILL, the OOM killer), every
request in flight gets an error naming the cause, new ones are refused and :attr:`failed` is
set: the server then shuts down, for its supervisor to restart it.
"""
from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait as wait_ready
from typing import Any, Optional

from ..runtime.detokenizer import IncrementalDetokenizer
from ..runtime.sampling import SamplingParams
from .engine_core import CoreInfo, Delta, EngineSpec, start_core
from .errors import ServingError, bad_field
from .metrics import ServingMetrics

# core exception class names -> HTTP status
_REJECT_STATUS = {"QueueFullError": 429, "RequestRejectedError": 400,
                  "SamplingParamsError": 400, "IRLMError": 400}


@dataclass
class Chunk:
    """What one sequence (``index``) of a request produced since the previous Chunk."""
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: Optional[list[dict[int, float]]]
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class _Seq:
    detok: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


class RequestStream:
    """Async iterator of :class:`Chunk` for one request; ``cancel()`` (or leaving early and
    calling ``aclose``) aborts it in the core at once."""

    def __init__(self, client: "EngineClient", rid: int, prompt_ids: list[int],
                 params: SamplingParams, stop: list[str]):
        self.client, self.rid, self.prompt_ids, self.params = client, rid, prompt_ids, params
        self.inbox: list = []          # Deltas (or an error) not yet taken by the iterator
        self._waiter: Optional[asyncio.Future] = None
        tok = client.info.tokenizer
        self.seqs = [_Seq(IncrementalDetokenizer(tok, stop, params.skip_special_tokens)
                          if tok is not None else None) for _ in range(max(1, params.n))]
        self.arrival = time.perf_counter()
        self.first_token: Optional[float] = None
        self.last_token: Optional[float] = None
        self.num_generated = 0
        self.finished = False
        self.finish_reasons: list[Optional[str]] = [None] * len(self.seqs)

    def put(self, item) -> None:
        """Hand a Delta (or an exception) to the iterator.  A plain list and one future
        rather than an asyncio.Queue: at 512 streams this runs 512 times per engine step."""
        self.inbox.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        loop = asyncio.get_running_loop()
        try:
            while not self.finished:
                if not self.inbox:
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                # everything that arrived meanwhile (the server fell behind): one chunk
                items, self.inbox = self.inbox, []
                for item in (items if len(items) == 1 else _merge(items)):
                    if isinstance(item, BaseException):
                        self._end("abort", count=False)
                        raise item
                    for chunk in self._chunks(item):
                        yield chunk
        finally:
            if not self.finished:
                self.cancel()

    def _chunks(self, delta) -> list[Chunk]:
        seq = self.seqs[delta.index]
        if seq.finished:                      # ended here by a stop string; the rest is moot
            return []
        now = time.perf_counter()
        m = self.client.metrics
        if delta.token_ids:
            k = len(delta.token_ids)
            if self.first_token is None:
                self.first_token = now
                m.ttft.observe(now - self.arrival)
                k -= 1
            elif self.last_token is not None:
                m.itl.observe(now - self.last_token)
                k -= 1
            for _ in range(k):               # tokens that arrived together
                m.itl.observe(0.0)
            self.last_token = now
        ids, lps = list(delta.token_ids), list(delta.logprobs)
        tops = delta.top_logprobs
        finish, stop_reason = delta.finish_reason, delta.stop_reason
        text = ""
        if seq.detok is not None:
            # With stop strings the text is checked after every token, so that the tokens
            # reported end exactly at the one that completed the stop string.
            for k, t in enumerate(ids):
                seq.token_ids.append(t)
                if not seq.detok.stop and k < len(ids) - 1:
                    continue
                found = seq.detok.update(seq.token_ids,
                                         len(seq.token_ids) >= self.params.min_tokens)
                if found is not None:
                    ids, lps = ids[:k + 1], lps[:k + 1]
                    tops = tops[:k + 1] if tops is not None else None
                    finish, stop_reason = "stop", found
                    break
            text = seq.detok.delta(final=finish is not None)
        else:
            seq.token_ids.extend(ids)
        self.num_generated += len(ids)
        m.generation_tokens.inc(len(ids))
        if finish is not None:
            seq.finished = True
            self.finish_reasons[delta.index] = finish
            if all(s.finished for s in self.seqs):
                if delta.finish_reason is None:   # a stop string ended it: stop the core too
                    self.client._abort(self.rid)
                self._end(None)
        return [Chunk(delta.index, ids, text, lps, tops, finish, stop_reason)]

    def _end(self, reason: Optional[str], count: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self.client._forget(self.rid)
        if not count:
            return
        m = self.client.metrics
        reasons = [r or "abort" for r in self.finish_reasons]
        reason = reason or ("abort" if "abort" in reasons else
                            "length" if "length" in reasons else "stop")
        m.success[reason].inc()
        m.e2e.observe(time.perf_counter() - self.arrival)
        if self.first_token is not None and self.num_generated > len(self.seqs):
            m.tpot.observe((self.last_token - self.first_token) /
                           max(1, self.num_generated / len(self.seqs) - 1))

    def cancel(self) -> None:
        """Abort now: the core frees the request's KV blocks before its next step."""
        if self.finished:
            return
        self.client._abort(self.rid)
        self._end("abort")


class EngineClient:
    """Starts the engine core and talks to it.  Use ``await start()`` then ``submit()``."""

    def __init__(self, spec: EngineSpec, *, max_queue: int = 256,
                 metrics: Optional[ServingMetrics] = None, model_name: str = "model"):
        self.spec, self.max_queue = spec, max_queue
        self.metrics = metrics or ServingMetrics(model_name)
        self.info: Optional[CoreInfo] = None
        self.streams: dict[int, RequestStream] = {}
        self.draining = False
        self.last_stats = None
        self._ids = itertools.count()
        self._proc = self._inq = self._outq = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reader: Optional[threading.Thread] = None
        #: why the engine core is gone (None while it runs); set once, on the event loop
        self.failure: Optional[str] = None
        #: set on the event loop when the core failed or died
        self.failed: Optional[asyncio.Event] = None
        self._stopping = False           # shutdown() asked the core to exit: not a failure

    # ----- life cycle -----------------------------------------------------------------------
    def start_process(self) -> None:
        """Start the core and wait until its engine is loaded (blocking)."""
        self._proc, self._inq, self._outq = start_core(self.spec)
        # The server never writes to the out-queue.  Without its copy of the write end, a core
        # that dies in the middle of a message leaves the reader an end of file rather than a
        # read that never returns.
        self._outq._writer.close()
        proc = self._proc
        while True:
            try:
                msg = self._next_message(proc)
            except _CoreGone:
                raise ServingError(f"the engine core exited while loading "
                                   f"({_exit_cause(proc)})", 500) from None
            if msg[0] == "fatal":
                proc.join(5)
                raise ServingError(f"the engine failed to load: {msg[1]}", 500)
            if msg[0] == "ready":
                self.info = msg[1]
                return

    def _next_message(self, proc):
        """The core's next message; raises _CoreGone once the core has exited and everything
        it sent before has been read."""
        conn = self._outq._reader
        # The process sentinel as well as the pipe: a dead core never writes again, and the
        # pipe alone would not say so while any other process holds its write end.
        ready = wait_ready([conn, proc.sentinel])
        if conn not in ready:
            raise _CoreGone
        # Readable comes first even when the core has exited: its last words (a "fatal"
        # with its traceback, the step before it died) are still in the pipe.
        try:
            return self._outq.get()
        except (EOFError, OSError):
            raise _CoreGone from None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering the core's output on ``loop``."""
        self._loop = loop
        self.failed = asyncio.Event()
        self._reader = threading.Thread(target=self._read, name="irlm-core-reader",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        proc = self._proc           # shutdown() drops self._proc while this thread may run
        while True:
            try:
                msg = self._next_message(proc)
            except _CoreGone:
                if self._stopping:
                    return
                msg = ("died", f"the engine core process (pid {proc.pid}) died: "
                               f"{_exit_cause(proc)}")
            try:
                self._loop.call_soon_threadsafe(self._dispatch, msg)
            except RuntimeError:              # loop closed
                return
            if msg[0] == "died":
                return

    def _dispatch(self, msg) -> None:
        kind = msg[0]
        if kind == "fatal":
            last = (str(msg[1]).strip().splitlines() or ["no message"])[-1]
            self._fail(f"the engine core failed: {last}")
            return
        if kind == "died":
            self._fail(msg[1])
            return
        batch = msg[1]
        self.last_stats = batch.stats
        self.metrics.on_core_stats(batch.stats)
        for rid, seconds in batch.queued.items():
            self.metrics.queue_time.observe(seconds)
        for rid, kind, message in batch.rejected:
            s = self.streams.get(rid)
            status = _REJECT_STATUS.get(kind, 400)
            self.metrics.reject("queue_full" if status == 429 else "invalid")
            if s is not None:
                s.put(ServingError(message, status))
        streams = self.streams
        for t in batch.deltas:
            s = streams.get(t[0])
            if s is not None:
                s.put(Delta(*t))

    def _fail(self, message: str) -> None:
        # A core that raised sends "fatal" and then exits ("died"): the first cause stands,
        # it is the one that says what went wrong.
        if self.failure is None:
            self.failure = message
        err = ServingError(self.failure, 500)
        for s in list(self.streams.values()):
            s.put(err)
        self.failed.set()

    def shutdown(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        try:
            if proc.is_alive():
                self._inq.put(("shutdown",))
                proc.join(10)
        finally:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            # Nobody reads the in-queue any more; exiting must not wait for its feeder thread
            # to push what is left into a pipe that may be full.
            self._inq.cancel_join_thread()
            self._proc = None

    # ----- requests -------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.streams)

    def check_room(self) -> None:
        if self.failure is not None:
            raise ServingError(self.failure, 503)
        if self.draining:
            raise ServingError("the server is shutting down", 503)
        if self.num_active >= self.info.max_batch_size + self.max_queue:
            self.metrics.reject("queue_full")
            raise ServingError(f"the server is at capacity ({self.num_active} requests "
                               f"running or queued); retry later", 429)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.info.tokenizer
        if tok is None:
            raise ServingError("this engine has no tokenizer: send token ids", 400)
        return list(tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tok = self.info.tokenizer
        return "" if tok is None else tok.decode(list(ids),
                                                 skip_special_tokens=skip_special_tokens)

    def validate(self, prompt_ids: list[int], params: SamplingParams,
                 prompt_field: str = "prompt", max_tokens_field: str = "max_tokens") -> None:
        info = self.info
        if not prompt_ids:
            raise bad_field(prompt_field, "the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < info.vocab_size]
        if bad:
            raise bad_field(prompt_field, f"token id {bad[0]} is outside the vocabulary "
                                          f"[0, {info.vocab_size})")
        if len(prompt_ids) + params.max_tokens > info.max_model_len:
            raise bad_field(max_tokens_field,
                            f"the prompt ({len(prompt_ids)} tokens) plus {max_tokens_field} "
                            f"({params.max_tokens}) exceeds the model's maximum length of "
                            f"{info.max_model_len} tokens")
        if params.num_sequences > info.max_batch_size:
            raise bad_field("n", f"{params.num_sequences} sequences exceed the server's "
                                 f"max batch size {info.max_batch_size}")
        blocks = params.num_sequences * -(-(len(prompt_ids) + params.max_tokens)
                                          // info.block_size)
        if blocks > info.num_blocks:
            raise bad_field(max_tokens_field, f"needs {blocks} KV-cache blocks; the cache has "
                                              f"{info.num_blocks}")

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               prompt_field: str = "prompt", max_tokens_field: str = "max_tokens"
               ) -> RequestStream:
        """Queue a request (raises ServingError at once for what can never run)."""
        self.check_room()
        self.validate(prompt_ids, params, prompt_field, max_tokens_field)
        stop = list(params.stop)
        core_params = params
        if stop:   # the core works on token ids: stop strings are matched here
            core_params = SamplingParams(**{**_fields(params), "stop": []})
        rid = next(self._ids)
        stream = RequestStream(self, rid, list(prompt_ids), params, stop)
        self.streams[rid] = stream
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._inq.put(("add", rid, list(prompt_ids), core_params))
        return stream

    def _abort(self, rid: int) -> None:
        if self._inq is not None and self.failure is None:
            self._inq.put(("abort", rid))

    def _forget(self, rid: int) -> None:
        self.streams.pop(rid, None)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, wait (up to ``timeout`` s) for the running ones to end."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.streams.values()):
            s.put(ServingError("the server shut down before the request finished", 503))
            s.cancel()


class _CoreGone(Exception):
    """The engine core process has exited (and its output has all been read)."""


def _exit_cause(proc) -> str:
    """How a process ended, for an operator: ``killed by signal SIGKILL``."""
    proc.join(2.0)                    # it has exited (or is exiting): this reaps it
    code = proc.exitcode
    if code is None:
        return "its output pipe closed"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _merge(items: list) -> list:
    """Deltas that queued up for one request, merged per sequence (order kept), so that a
    server running behind the engine sends one chunk per sequence instead of one per step.
    An error ends the list."""
    out: list = []
    by_index: dict[int, int] = {}
    for item in items:
        if isinstance(item, BaseException):
            out.append(item)
            break
        j = by_index.get(item.index)
        if j is None or out[j].finish_reason is not None:
            by_index[item.index] = len(out)
            out.append(item)
            continue
        a = out[j]
        tops = None if a.top_logprobs is None else a.top_logprobs + (item.top_logprobs or [])
        out[j] = replace(a, token_ids=a.token_ids + item.token_ids,
                         logprobs=a.logprobs + item.logprobs, top_logprobs=tops,
                         finish_reason=item.finish_reason, stop_reason=item.stop_reason,
                         cumulative_logprob=item.cumulative_logprob)
    return out


def _fields(params: SamplingParams) -> dict:
    from dataclasses import fields
    return {f.name: getattr(params, f.name) for f in fields(params)}
