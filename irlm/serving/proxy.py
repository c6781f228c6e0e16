"""A stand-in engine without a model, to measure what the serving path itself can carry.

    irlm serve --factory irlm.serving.proxy:proxy_llm --max-batch-size 512
    python benchmarks/serve.py --proxy [--proxy-step-ms 38] [--protocol grpc]

:class:`ProxyEngine` has the surface of :class:`~irlm.runtime.LLMEngine` that the engine
core uses (add_request / abort / step / requests / scheduler and block-manager gauges) but no
runner, no KV cache and no sampler: a step gives every running request (up to
``max_batch_size``, first come first served) its next token, a fixed function of the prompt
and the position, and then sleeps out the rest of ``step_ms`` (0: no sleep, as fast as the
loop goes).  So the core costs almost nothing and the throughput measured through the server
is the ceiling of the front end (HTTP / gRPC, JSON, detokenization, the IPC between the two
processes) and of the load generator.  With ``step_ms`` set to a real GPU's decode step, the
proxy offers the load that GPU would.

Requests end at ``max_tokens``, on ``stop_token_ids`` and on EOS (unless ``ignore_eos``).
Only plain requests (n = 1, no beams); logprobs are 0 (the sampled token has probability 1).
Configured by keyword or by environment (``IRLM_PROXY_STEP_MS``, ``IRLM_PROXY_VOCAB``,
``IRLM_PROXY_TOKENIZER`` = ``none`` | ``tiny``), since ``irlm serve --factory`` passes only
the scheduler flags.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from ..runtime.errors import QueueFullError, RequestRejectedError


@dataclass
class _Seq:
    token_ids: list[int]                 # prompt + output, as a runtime Sequence
    prompt_len: int = 0
    index: int = 0
    num_streamed: int = 0
    stream_done: bool = False
    cumulative_logprob: float = 0.0
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    stop_reason: object = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: object
    seqs: list = field(default_factory=list)
    done: list = field(default_factory=list)
    beam: object = None

    @property
    def finished(self) -> bool:
        return not self.seqs


@dataclass
class _Config:
    max_num_tokens: int
    max_batch_size: int
    max_waiting: int


class _Scheduler:
    def __init__(self, config: _Config):
        self.config = config
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.num_preemptions = 0


@dataclass
class _PrefixStats:
    prefix_queries: int = 0
    prefix_hits: int = 0


class _BlockManager:
    def __init__(self, num_blocks: int):
        self.num_blocks = self.num_free_blocks = num_blocks
        self.stats = _PrefixStats()


@dataclass
class _Runner:
    vocab_size: int
    max_model_len: int
    block_size: int = 16
    max_num_tokens: int = 8192


class ProxyEngine:
    """The engine core's view of an engine, generating tokens without a model."""

    def __init__(self, *, vocab_size: int = 32000, max_model_len: int = 4096,
                 max_batch_size: int = 512, max_waiting: int = 4096, step_ms: float = 0.0,
                 eos_token_id: Optional[int] = None, max_num_tokens: int = 8192):
        self.runner = _Runner(vocab_size, max_model_len, max_num_tokens=max_num_tokens)
        self.tokenizer = None
        self.scheduler = _Scheduler(_Config(max_num_tokens, max_batch_size, max_waiting))
        # as many blocks as the largest batch of longest sequences needs: never the limit
        self.block_manager = _BlockManager(max_batch_size * -(-max_model_len // 16))
        self.eos_token_ids = [] if eos_token_id is None else [eos_token_id]
        self.step_s = step_ms / 1e3
        self.requests: dict[int, _Request] = {}
        self.num_steps = 0
        self._next_id = 0

    def add_request(self, prompt_ids, params) -> int:
        sched = self.scheduler
        if params.num_sequences != 1 or params.use_beam_search:
            raise RequestRejectedError("the proxy engine runs n = 1 requests only")
        if len(prompt_ids) + params.max_tokens > self.runner.max_model_len:
            raise RequestRejectedError(f"prompt + max_tokens exceeds {self.runner.max_model_len}")
        if len(sched.waiting) >= sched.config.max_waiting:
            raise QueueFullError(f"the waiting queue holds {len(sched.waiting)} requests")
        rid, self._next_id = self._next_id, self._next_id + 1
        req = _Request(rid, list(prompt_ids), params, [_Seq(list(prompt_ids), len(prompt_ids))])
        self.requests[rid] = req
        sched.waiting.append(req)
        return rid

    def abort(self, rid: int) -> None:
        req = self.requests.get(rid)
        if req is None or req.finished:
            return
        for seq in req.seqs:
            seq.finish_reason = "abort"
        self._retire(req)

    def _retire(self, req: _Request) -> None:
        req.done.extend(req.seqs)
        req.seqs = []
        sched = self.scheduler
        for q in (sched.running, sched.waiting):
            if req in q:
                q.remove(req)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def step(self) -> list[_Request]:
        t0 = time.perf_counter()
        sched = self.scheduler
        room = sched.config.max_batch_size - len(sched.running)
        if room > 0 and sched.waiting:
            sched.running.extend(sched.waiting[:room])
            del sched.waiting[:room]
        vocab, eos = self.runner.vocab_size, self.eos_token_ids
        ended, changed = [], list(sched.running)
        for req in changed:
            seq, p = req.seqs[0], req.params
            toks = seq.token_ids
            n_out = len(toks) - len(req.prompt_ids) + 1
            token = (req.prompt_ids[-1] * 31 + 7 * n_out) % vocab
            toks.append(token)
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in eos:
                seq.finish_reason = "stop"
            elif n_out >= p.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                ended.append(req)
        for req in ended:
            self._retire(req)
        self.num_steps += 1
        rest = self.step_s - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return changed

    def output(self, rid: int):
        raise NotImplementedError("the proxy engine has no beams")

    def pop_output(self, rid: int) -> None:
        self.requests.pop(rid, None)


class ProxyLLM:
    """What the engine core builds from a factory: ``engine``, ``tokenizer``,
    ``chat_template``."""

    def __init__(self, engine: ProxyEngine, tokenizer=None, chat_template=None):
        self.engine, self.tokenizer, self.chat_template = engine, tokenizer, chat_template


def proxy_llm(step_ms: Optional[float] = None, vocab_size: Optional[int] = None,
              tokenizer: Optional[str] = None, max_batch_size: int = 512,
              max_waiting: int = 4096, max_num_tokens: int = 8192, **_ignored) -> ProxyLLM:
    """Factory for ``irlm serve --factory irlm.serving.proxy:proxy_llm``.  ``tokenizer``:
    ``none`` (token ids only, as the GPU acceptance's random-weight engine) or ``tiny`` (the
    test tokenizer: byte-level BPE, so the server detokenizes every token)."""
    env = os.environ
    step_ms = float(env.get("IRLM_PROXY_STEP_MS", 0.0)) if step_ms is None else step_ms
    tokenizer = tokenizer or env.get("IRLM_PROXY_TOKENIZER", "none")
    tok, template, eos = None, None, None
    if tokenizer == "tiny":
        from ..runtime.testing import tiny_tokenizer
        from .testing import CHAT_TEMPLATE
        tok, template = tiny_tokenizer(), CHAT_TEMPLATE
        vocab_size = vocab_size or len(tok)
    elif tokenizer != "none":
        raise ValueError(f"IRLM_PROXY_TOKENIZER={tokenizer!r}: expected none or tiny")
    vocab_size = vocab_size or int(env.get("IRLM_PROXY_VOCAB", 32000))
    engine = ProxyEngine(vocab_size=vocab_size, max_batch_size=max_batch_size,
                         max_waiting=max_waiting, step_ms=step_ms, eos_token_id=eos,
                         max_num_tokens=max_num_tokens)
    return ProxyLLM(engine, tok, template)
