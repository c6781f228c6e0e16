"""The engine core: an :class:`~irlm.runtime.LLMEngine` stepping in its own process.

The HTTP and gRPC front ends parse JSON and protobuf, tokenize, detokenize and write
responses; at high load that is a lot of Python.  Running the step loop in the same
interpreter would make every step wait for that work on the GIL.  So the engine lives in a
child process (started with ``spawn``: CUDA cannot cross a ``fork``) and talks to the server
through two multiprocessing queues:

* in:  ``("add", rid, prompt_ids, SamplingParams)``, ``("abort", rid)``, ``("shutdown",)``
* out: ``("ready", CoreInfo)`` once, then after every step one ``("out", CoreBatch)`` carrying
  every request's new token ids (never text: detokenization is the server's job), the
  requests that were refused, and the scheduler's gauges for the metrics.

Token ids go out after every step, one message per step for all requests, so the message
count does not grow with the number of streams.  The core never blocks on the server.

What the core does between two steps delays the next step by as much, so it is kept to a
few microseconds per running request: the new tokens are sliced out of each sequence's token
list (never a copy of its whole output), a Delta travels as a plain tuple, and the queue's
feeder thread pickles the batch while the next step runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import IRLMError
from ..runtime.sequence import PLACEHOLDER


@dataclass
class EngineSpec:
    """What the core process builds: an engine directory, or a factory ``"module:function"``
    / ``"path/file.py:function"`` returning an :class:`~irlm.runtime.LLM` (custom runners,
    benchmarks with random weights).  ``llm_kwargs`` go to ``LLM.from_engine`` / the factory."""
    engine_dir: Optional[str] = None
    factory: Optional[str] = None
    device: str = "auto"
    num_blocks: Optional[int] = None
    kv_cache_fraction: Optional[float] = None
    llm_kwargs: dict[str, Any] = field(default_factory=dict)

    kv_tokens: Optional[int] = None          # KV-cache size in tokens (overrides fraction)
    #: torch's CPU threads for a CPU engine (None: leave the process's setting)
    threads: Optional[int] = None

    def build(self):
        if self.factory is not None:
            return load_factory(self.factory)(**self.llm_kwargs)
        from irlm.lowering.engine_format import load_engine
        from ..runtime import LLM
        from ..runtime.runners.interpreter import runner_for_engine
        engine = load_engine(self.engine_dir)
        num_blocks = self.num_blocks
        block_size = int(_kv_cache_type(engine).shape[3])
        if num_blocks is None and self.kv_tokens is not None:
            num_blocks = -(-self.kv_tokens // block_size)
        if num_blocks is None and self.kv_cache_fraction is not None:
            num_blocks = blocks_for_fraction(engine, self.device, self.kv_cache_fraction)
        runner = runner_for_engine(engine, device=self.device, num_blocks=num_blocks,
                                   threads=self.threads)
        kwargs = dict(self.llm_kwargs)
        kwargs.setdefault("chat_template", engine.chat_template)
        kwargs.setdefault("eos_token_id", engine.config.get("eos_token_id"))
        if getattr(runner, "max_num_tokens", None):
            kwargs.setdefault("max_num_tokens", min(512, runner.max_num_tokens))
        return LLM(runner, engine.tokenizer, **kwargs)


def _kv_cache_type(engine):
    from ..ops.llm import kv_cache_input
    return kv_cache_input(engine.graph).type


def load_factory(target: str):
    """``module:function`` or ``path/to/file.py:function``."""
    mod_name, sep, fn_name = target.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise IRLMError(f"--factory {target!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise IRLMError(f"--factory {target!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise IRLMError(f"--factory {target!r}: {mod_name} has no function {fn_name}")
    return fn


def blocks_for_fraction(engine, device: str, fraction: float) -> Optional[int]:
    """KV blocks that fill ``fraction`` of the GPU memory left free by the weights and the
    activation arena (TensorRT-LLM's kv_cache_free_gpu_mem_fraction); None on the CPU (the
    runner's default size)."""
    import torch
    if not 0 < fraction <= 1:
        raise IRLMError(f"--kv-cache-fraction {fraction}: must be in (0, 1]")
    if device == "cpu" or not torch.cuda.is_available():
        return None
    from ..runtime import kv_block_bytes
    layers, _, _, block_size, kv_heads, head_dim = _kv_cache_type(engine).shape
    weight_bytes = engine.graph.weights.nbytes()
    reserved = weight_bytes + int(engine.config.get("activation_arena_bytes") or 0)
    per_block = kv_block_bytes(layers, block_size, kv_heads, head_dim,
                               _kv_cache_type(engine).dtype.torch)
    free, _ = torch.cuda.mem_get_info()
    n = int(max(0, free - reserved) * fraction) // per_block
    if n < 1:
        raise IRLMError(f"--kv-cache-fraction {fraction}: the GPU memory left after the "
                        f"weights ({weight_bytes / 2**30:.1f} GiB) holds no KV block")
    return n


@dataclass
class CoreInfo:
    """What the server needs to know about the engine (sent once, at start)."""
    tokenizer: Any
    chat_template: Optional[str]
    eos_token_ids: list[int]
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    max_num_tokens: int
    max_batch_size: int
    max_waiting: int
    device: str
    pid: int


@dataclass(slots=True)
class Delta:
    """New tokens of one sequence of one request since the previous Delta.  On the wire (the
    out-queue) a Delta is the plain tuple of its fields in this order: at 512 streams a step
    sends 512 of them, and pickling tuples costs a fraction of pickling dataclasses."""
    rid: int
    index: int
    token_ids: list[int]
    logprobs: list[float]                           # sampled token's logprob, one per token
    top_logprobs: Optional[list[dict[int, float]]]  # when the request asked for logprobs
    finish_reason: Optional[str] = None             # "stop" | "length" | "abort"
    stop_reason: Any = None
    cumulative_logprob: float = 0.0


@dataclass
class CoreStats:
    """Scheduler gauges after a step (or an idle poll)."""
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefix_queries: int                 # cumulative, from the block manager
    prefix_hits: int
    num_preemptions: int
    step_seconds: Optional[float]       # duration of the step just run (None: no step)
    step_new_tokens: int                # output tokens it produced
    num_steps: int


@dataclass
class CoreBatch:
    deltas: list[tuple]                     # Delta fields as tuples (see Delta)
    rejected: list[tuple[int, str, str]]    # (rid, error class name, message)
    queued: dict[int, float]                # rid -> seconds from arrival to first scheduling
    stats: CoreStats


def start_core(spec: EngineSpec, ctx=None):
    """Start the core process; returns (process, in_queue, out_queue)."""
    ctx = ctx or mp.get_context("spawn")
    inq, outq = ctx.Queue(), ctx.Queue()
    # not a daemon: a multi-rank engine starts worker processes of its own; the core exits
    # on "shutdown" or when it sees its server gone
    proc = ctx.Process(target=core_main, args=(spec, inq, outq), name="irlm-engine-core")
    proc.start()
    return proc, inq, outq


def core_main(spec: EngineSpec, inq, outq) -> None:
    try:
        llm = spec.build()
    except BaseException as e:      # the server reports it and exits
        msg = str(e) if isinstance(e, IRLMError) else traceback.format_exc()
        outq.put(("fatal", msg))
        return
    try:
        EngineCore(llm, inq, outq).run()
    except BaseException:
        outq.put(("fatal", traceback.format_exc()))
    finally:
        close = getattr(llm, "close", None)      # a multi-rank engine's workers
        if close is not None:
            close()


class EngineCore:
    def __init__(self, llm, inq, outq):
        engine = self.engine = llm.engine
        self.inq, self.outq = inq, outq
        tokenizer = llm.tokenizer
        # Detokenization and stop strings happen in the server; the core handles token ids.
        engine.tokenizer = None
        runner, cfg = engine.runner, engine.scheduler.config
        device = getattr(getattr(runner, "device", None), "type", "cpu")
        outq.put(("ready", CoreInfo(
            tokenizer, llm.chat_template, list(engine.eos_token_ids), runner.vocab_size,
            runner.max_model_len, engine.block_manager.num_blocks, runner.block_size,
            cfg.max_num_tokens, cfg.max_batch_size, cfg.max_waiting, device, os.getpid())))
        self.eid_of: dict[int, int] = {}       # server rid -> engine request id
        self.rid_of: dict[int, int] = {}
        self.arrival: dict[int, float] = {}    # rid -> time the core received it
        self.cum: dict[tuple[int, int], float] = {}
        self.running = True
        self.parent = os.getppid()

    # ----- messages from the server ----------------------------------------------------------
    def _handle(self, msg, rejected) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt_ids, params = msg
            try:
                eid = self.engine.add_request(prompt_ids, params)
            except Exception as e:           # QueueFull, RequestRejected, IRLMError
                rejected.append((rid, type(e).__name__, str(e)))
                return
            self.eid_of[rid], self.rid_of[eid] = eid, rid
            self.arrival[rid] = time.perf_counter()
        elif kind == "abort":
            eid = self.eid_of.get(msg[1])
            if eid is not None:
                self.engine.abort(eid)     # frees its blocks now
        elif kind == "shutdown":
            self.running = False

    def _poll(self, block: bool, rejected) -> None:
        try:
            msg = self.inq.get(timeout=0.5) if block else self.inq.get_nowait()
        except queue.Empty:
            return
        self._handle(msg, rejected)
        while True:                        # everything else already queued, without waiting
            try:
                msg = self.inq.get_nowait()
            except queue.Empty:
                return
            self._handle(msg, rejected)

    # ----- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        while self.running:
            if os.getppid() != self.parent:    # the server died without telling us
                return
            rejected: list = []
            self._poll(not engine.has_unfinished() and not self.eid_of, rejected)
            step_s = t0 = None
            waiting_before = {r.request_id for r in engine.scheduler.waiting}
            if engine.has_unfinished():
                t0 = time.perf_counter()
                engine.step()
                step_s = time.perf_counter() - t0
            queued = self._newly_scheduled(waiting_before, t0)
            deltas = self._collect()
            if deltas or rejected or step_s is not None or queued:
                self.outq.put(("out", CoreBatch(deltas, rejected, queued,
                                                self._stats(step_s, deltas))))

    def _newly_scheduled(self, waiting_before: set[int], t0) -> dict[int, float]:
        if t0 is None:
            return {}
        still = {r.request_id for r in self.engine.scheduler.waiting}
        out = {}
        for eid in waiting_before - still:
            rid = self.rid_of.get(eid)
            if rid is not None and rid in self.arrival:
                out[rid] = max(0.0, t0 - self.arrival.pop(rid))
        return out

    def _collect(self) -> list[tuple]:
        """New tokens of every request (Delta tuples); forget finished ones."""
        engine, deltas = self.engine, []
        requests, cum = engine.requests, self.cum
        for eid, rid in list(self.rid_of.items()):
            req = requests.get(eid)
            if req is None:
                continue
            if req.beam is not None:
                if req.finished:
                    for o in engine.output(eid).outputs:
                        deltas.append((rid, o.index, o.token_ids, [], None,
                                       o.finish_reason or "abort", None,
                                       o.cumulative_logprob))
            else:
                seqs = req.seqs if not req.done else \
                    sorted(req.done + req.seqs, key=lambda s: s.index)
                plen = len(req.prompt_ids)
                for seq in seqs:
                    if seq.stream_done:
                        continue
                    toks = seq.token_ids
                    end = len(toks)
                    if end and toks[-1] == PLACEHOLDER:     # a token still on the device
                        end -= 1
                    start = plen + seq.num_streamed
                    finished = seq.finish_reason is not None
                    if start >= end and not finished:
                        continue
                    new = toks[start:end]
                    key = (rid, seq.index)
                    lp_total = seq.cumulative_logprob - cum.get(key, 0.0)
                    cum[key] = seq.cumulative_logprob
                    tops = None
                    if seq.logprobs is not None:
                        tops = seq.logprobs[seq.num_streamed:seq.num_streamed + len(new)]
                    lps = [lp_total] if len(new) == 1 else _per_token_logprobs(new, lp_total,
                                                                               tops)
                    deltas.append((rid, seq.index, new, lps, tops, seq.finish_reason,
                                   seq.stop_reason, seq.cumulative_logprob))
                    seq.num_streamed, seq.stream_done = end - plen, finished
            if req.finished:
                engine.pop_output(eid)
                del self.rid_of[eid], self.eid_of[rid]
                self.arrival.pop(rid, None)
                for index in range(len(req.seqs) + len(req.done)):
                    cum.pop((rid, index), None)
        return deltas

    def _stats(self, step_s, deltas) -> CoreStats:
        engine = self.engine
        bm, sched = engine.block_manager, engine.scheduler
        return CoreStats(len(sched.running), len(sched.waiting), bm.num_free_blocks,
                         bm.num_blocks, bm.stats.prefix_queries, bm.stats.prefix_hits,
                         sched.num_preemptions, step_s,
                         sum(len(d[2]) for d in deltas), engine.num_steps)


def _per_token_logprobs(new: list[int], total: float, tops) -> list[float]:
    """Each new token's own logprob.  A step adds one token per sequence, so a delta of one
    token has it exactly (the growth of the cumulative logprob); for longer deltas (beams at
    the end) the top-k lists supply it where they hold the token."""
    if len(new) == 1:
        return [total]
    out = []
    for i, t in enumerate(new):
        top = tops[i] if tops and i < len(tops) else None
        out.append(float(top[t]) if top and t in top else float("nan"))
    return out
