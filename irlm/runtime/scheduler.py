"""In-flight batching: which sequences run in the next step, and how many tokens each.

Every step is built under two limits: ``max_num_tokens`` new tokens in all (the token budget)
and ``max_batch_size`` live sequences.  Running requests go first, oldest first: a decoding
sequence needs one token, a sequence still in its prompt takes as much of the remaining
budget as it can (chunked prefill), so long prompts never stall the decodes of the others.
Waiting requests are then admitted in arrival order while budget, batch slots and the policy
allow.

Policies decide what happens when the KV cache runs short:

``guaranteed-no-evict``
    A request is admitted only when the blocks it may ever need (every sequence at its
    longest, prompt blocks shared) fit in the free blocks not already promised to running
    requests.  Nothing is ever preempted, so admitted requests never stall; the price is that
    the cache is under-used while requests are shorter than their worst case.
``max-utilization``
    Requests are admitted as soon as their first chunk fits.  When a running sequence needs a
    block and none is free, the most recently admitted request is preempted: its blocks are
    freed and it goes back to the front of the queue, to be recomputed from its prompt plus
    the tokens it generated so far (prefix reuse often finds those blocks still cached).
    Its outputs are kept, so nothing is dropped or corrupted; only work is repeated.

Requests that could never run (prompt not shorter than ``max_model_len``, or needing more
blocks than the whole cache) are rejected when submitted, which is also what guarantees
progress: the oldest request can always run alone.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import IRLMError
from .errors import QueueFullError, RequestRejectedError
from .kv_cache import BlockManager
from .sequence import Request, Sequence, Status

POLICIES = ("guaranteed-no-evict", "max-utilization")


@dataclass
class SchedulerConfig:
    max_num_tokens: int = 512        # new tokens per step, all sequences together
    max_batch_size: int = 64         # live sequences in flight
    policy: str = "guaranteed-no-evict"
    max_waiting: int = 1024          # queued requests before add() raises QueueFullError
    max_model_len: int = 2048

    def __post_init__(self):
        for name in ("max_num_tokens", "max_batch_size", "max_waiting", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise IRLMError(f"scheduler {name} must be an int >= 1, got {value!r}")
        if self.policy not in POLICIES:
            raise IRLMError(f"unknown scheduler policy {self.policy!r}; "
                            f"expected one of {', '.join(POLICIES)}")


@dataclass
class ScheduledStep:
    rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Request] = field(default_factory=list)
    budget: int = 0                                                 # tokens left

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.rows)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config, self.blocks = config, block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []      # in admission order
        self.num_preemptions = 0

    # ----- requests in and out -----------------------------------------------------------
    def check(self, req: Request) -> None:
        """Reject a request that could never run, with what would be valid."""
        cfg, bm = self.config, self.blocks
        if len(req.prompt_ids) == 0:
            raise RequestRejectedError(f"request {req.request_id}: the prompt is empty")
        if len(req.prompt_ids) >= cfg.max_model_len:
            raise RequestRejectedError(
                f"request {req.request_id}: prompt of {len(req.prompt_ids)} tokens leaves no "
                f"room to generate within max_model_len={cfg.max_model_len}")
        if req.width > cfg.max_batch_size:
            raise RequestRejectedError(
                f"request {req.request_id}: {req.width} sequences (n or beam_width) exceed "
                f"max_batch_size={cfg.max_batch_size}")
        # No sharing assumed: a preempted request is recomputed sequence by sequence.
        need = req.width * bm.blocks_for(req.max_len)
        if need > bm.num_blocks:
            raise RequestRejectedError(
                f"request {req.request_id}: {req.width} x {req.max_len} tokens need {need} KV "
                f"blocks of {bm.block_size}, the whole cache has {bm.num_blocks}; lower "
                f"max_tokens or n, or give the cache more memory")

    def add(self, req: Request) -> None:
        self.check(req)
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"request {req.request_id}: the waiting queue is full "
                f"({self.config.max_waiting} requests); retry after some are admitted")
        req.status = Status.WAITING
        self.waiting.append(req)

    def finish(self, req: Request) -> None:
        """Release everything a finished or cancelled request holds."""
        for seq in req.seqs:
            self.blocks.free(seq.seq_id)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_live_sequences(self) -> int:
        return sum(len(r.seqs) for r in self.running)

    # ----- the step ------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(budget=self.config.max_num_tokens)
        i = 0
        while i < len(self.running) and step.budget > 0:
            req = self.running[i]
            if self._schedule_sequences(req, step, may_preempt=True):
                i += 1
            # else: req was the newest and preempted itself; it has left `running`
        # A request preempted in this step is not re-admitted in the same one.
        while self.waiting and step.budget > 0 and not step.preempted:
            req = self.waiting[0]
            if self.num_live_sequences + req.width > self.config.max_batch_size:
                break
            if (self.config.policy == "guaranteed-no-evict"
                    and self._worst_case_need(req) > self.blocks.num_free_blocks
                    - sum(self._future_need(r) for r in self.running)):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = Status.RUNNING
            for seq in req.seqs:
                seq.num_computed = self.blocks.allocate_prefix(seq.seq_id, seq.token_ids)
            if not self._schedule_sequences(req, step, may_preempt=False):
                self._release(req, step)      # its first chunk does not fit: wait
                break
        return step

    def _schedule_sequences(self, req: Request, step: ScheduledStep, may_preempt: bool) -> bool:
        """Give each of ``req``'s sequences its next chunk; False if ``req`` could not get
        blocks (it is then preempted, or, when admitting, not admitted)."""
        for seq in req.seqs:
            n = min(seq.num_uncomputed, step.budget)
            if n == 0:
                if step.budget == 0:
                    break
                continue          # a beam waiting for its siblings' logits
            while not self.blocks.ensure_slots(seq.seq_id, seq.num_computed + n):
                if not may_preempt:
                    return False
                if self.config.policy == "guaranteed-no-evict":
                    raise AssertionError("guaranteed-no-evict ran out of KV blocks: the "
                                         "admission reservation is wrong")
                victim = self.running[-1]
                self._release(victim, step)
                self.num_preemptions += 1
                step.preempted.append(victim)
                if victim is req:
                    return False
            step.rows.append((seq, n))
            step.budget -= n
        return True

    def _release(self, req: Request, step: ScheduledStep) -> None:
        """Free a running request's blocks and queue it first, to be recomputed."""
        kept = [(s, n) for s, n in step.rows if s.request is not req]
        step.budget += step.num_tokens - sum(n for _, n in kept)
        step.rows = kept
        for seq in req.seqs:
            self.blocks.free(seq.seq_id)
            seq.num_computed = 0
            seq.beam_logits = None
        self.running.remove(req)
        self.waiting.appendleft(req)
        req.status = Status.WAITING

    # ----- guaranteed-no-evict accounting --------------------------------------------------
    def _blocks_at_max_len(self, req: Request) -> tuple[int, int]:
        """(blocks a sequence of ``req`` holds at its longest, full prompt blocks all share)."""
        return self.blocks.blocks_for(req.max_len), len(req.prompt_ids) // self.blocks.block_size

    def _future_need(self, req: Request) -> int:
        """Free blocks a running request may still take: each live sequence up to its longest
        (its future blocks are all its own), plus the sequences it will fork (sharing at least
        the full prompt blocks)."""
        cap, shared = self._blocks_at_max_len(req)
        own = sum(max(0, cap - len(self.blocks.block_table(s.seq_id))) for s in req.seqs)
        return own + req.pending_forks * (cap - shared)

    def _worst_case_need(self, req: Request) -> int:
        cap, shared = self._blocks_at_max_len(req)
        first = req.seqs[0]
        return (cap - self.blocks.num_hits_in_use(first.token_ids)
                + (req.width - 1) * (cap - shared))
