"""The multi-rank simulator: run the per-rank graphs of a tensor-parallel split on the CPU.

:func:`run_ranks` runs N graphs (one per rank, e.g. from
:func:`irlm.passes.parallel.tp_split.split_for_tensor_parallel`) in lockstep, one Python thread per
rank, each with the reference interpreter.  The ``dist`` ops' reference implementations
(irlm/ops/dist.py) reach the other ranks through a :class:`RankComm` in ``ctx.state["dist"]``:
each collective is an exchange through a shared slot table between two barrier waits.

* Every rank posts (what, type, sequence number); if the ranks disagree (one rank runs an
  all_gather while another runs an all_reduce, or shapes differ) every rank raises the same
  :class:`CollectiveMismatch` naming what each rank posted, instead of deadlocking.
* Reductions run in rank order on every rank, so all ranks hold bit-identical results.
* ``dist.send``/``dist.recv`` (pipeline stages) go through one FIFO queue per
  (sender, receiver, tag); a send does not wait, a recv waits (and stops if a rank fails).
* If a rank fails, the barrier is broken, the other ranks stop at their next collective, and
  :func:`run_ranks` raises the first rank's error, prefixed with its rank.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Optional, Sequence

import torch

from irlm.errors import IRLMError
from irlm.interpreter import Interpreter


class DistributedError(IRLMError):
    """A rank failed, or the ranks disagree about a collective."""


class CollectiveMismatch(DistributedError):
    pass


class RankAborted(DistributedError):
    """Raised in a rank waiting on a collective when another rank failed."""


class Group:
    """What the ranks of one group share: a barrier and one slot per rank."""

    def __init__(self, size: int, timeout: float = 120.0):
        if size < 1:
            raise DistributedError(f"a group needs at least one rank, got {size}")
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[Any] = [None] * size
        self.timeout = timeout
        self._lock = threading.Lock()
        self._queues: dict[tuple, "queue.Queue"] = {}

    def channel(self, src: int, dst: int, tag: int) -> "queue.Queue":
        with self._lock:
            return self._queues.setdefault((src, dst, tag), queue.Queue())

    def comm(self, rank: int) -> "RankComm":
        return RankComm(self, rank)

    def abort(self) -> None:
        self.barrier.abort()

    def wait(self) -> None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise RankAborted("another rank failed (or a collective timed out) while this "
                              "rank waited in a collective") from None


class RankComm:
    """One rank's view of its group: what ``ctx.state["dist"]`` holds."""

    def __init__(self, group: Group, rank: int, *, world: Optional[Group] = None,
                 world_rank: Optional[int] = None, tp: int = 1):
        self.group, self.rank, self.size = group, rank, group.size
        self.seq = 0  # collectives this rank has run
        # tp x pp: collectives over the stage's tp group (``group``); send/recv name a stage,
        # i.e. the rank with this tp rank in that stage, through the world's channels
        self.world = world or group
        self.world_rank = rank if world_rank is None else world_rank
        self.tp = tp

    def exchange(self, what: str, x: torch.Tensor, where: str = "") -> list[torch.Tensor]:
        """Post ``x``; return every rank's tensor (in rank order) once all have posted."""
        g = self.group
        key = (what, tuple(x.shape), str(x.dtype), self.seq)
        g.slots[self.rank] = (key, where, x)
        self.seq += 1
        g.wait()
        posted = list(g.slots)
        g.wait()  # nobody overwrites a slot before every rank has read them all
        keys = {p[0] for p in posted}
        if len(keys) > 1:
            lines = "; ".join(f"rank {r}: {p[0][0]} of {list(p[0][1])} {p[0][2]} "
                              f"(collective #{p[0][3]}) at {p[1]}" for r, p in enumerate(posted))
            raise CollectiveMismatch(f"the ranks disagree about a collective: {lines}")
        return [p[2] for p in posted]

    def all_reduce(self, x: torch.Tensor, op: str = "sum", where: str = "") -> torch.Tensor:
        xs = self.exchange(f"all_reduce({op})", x, where)
        out = xs[0].clone()
        for y in xs[1:]:
            if op == "sum":
                out = out + y
            elif op == "max":
                out = torch.maximum(out, y)
            elif op == "min":
                out = torch.minimum(out, y)
            else:
                raise DistributedError(f"unknown reduction '{op}'")
        return out

    def all_gather(self, x: torch.Tensor, axis: int, where: str = "") -> torch.Tensor:
        return torch.cat(self.exchange(f"all_gather(axis={axis})", x, where), dim=axis)

    def _check_peer(self, peer: int, where: str) -> int:
        """The world rank of stage ``peer`` (a rank when tp is 1)."""
        stages = self.world.size // self.tp
        if not 0 <= peer < stages or peer == self.world_rank // self.tp:
            raise DistributedError(f"{where}: peer {peer} is not another rank of a group of "
                                   f"{stages}")
        return peer * self.tp + self.world_rank % self.tp

    def send(self, x: torch.Tensor, peer: int, tag: int = 0, where: str = "") -> None:
        """Point to point: queue ``x`` for ``peer`` (does not wait for the receiver)."""
        dst = self._check_peer(peer, where)
        self.world.channel(self.world_rank, dst, tag).put(x)

    def recv(self, peer: int, tag: int = 0, where: str = "") -> torch.Tensor:
        """Wait for the next tensor that ``peer`` sent to this rank with ``tag``."""
        src = self._check_peer(peer, where)
        q = self.world.channel(src, self.world_rank, tag)
        deadline = time.monotonic() + self.group.timeout
        while True:
            if self.world.barrier.broken or self.group.barrier.broken:
                raise RankAborted("another rank failed while this rank waited in a recv")
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise DistributedError(f"{where}: nothing arrived from rank {peer} "
                                           f"(tag {tag}) in {self.group.timeout} s") from None


def run_ranks(graphs: Sequence, inputs_per_rank: Sequence, *, states: Optional[Sequence] = None,
              weights=None, timeout: float = 120.0, tp: Optional[int] = None
              ) -> list[list[torch.Tensor]]:
    """Run ``graphs[r]`` on ``inputs_per_rank[r]`` for every rank r at once; return each
    rank's outputs.  ``states[r]`` (optional) is rank r's interpreter state dict; the
    communicator goes in under ``"dist"``.  ``weights`` overrides the graphs' stores.
    ``tp`` (tp x pp engines): rank r is tp rank ``r % tp`` of stage ``r // tp``; its
    collectives run in its stage's group and its send/recv peers are stages.  Without it,
    one group holds every rank."""
    n = len(graphs)
    if len(inputs_per_rank) != n:
        raise DistributedError(f"{n} graphs but inputs for {len(inputs_per_rank)} ranks")
    states = list(states) if states is not None else [{} for _ in range(n)]
    if len(states) != n:
        raise DistributedError(f"{n} graphs but {len(states)} states")
    world = Group(n, timeout)
    if tp is None or tp in (1, n):      # one group: every collective and peer is a world rank
        comms = [RankComm(world, r) for r in range(n)]
        groups = [world]
    else:
        if n % tp:
            raise DistributedError(f"{n} ranks are not stages of tp {tp}")
        groups = [Group(tp, timeout) for _ in range(n // tp)]
        comms = [RankComm(groups[r // tp], r % tp, world=world, world_rank=r, tp=tp)
                 for r in range(n)]
    results: list[Optional[list[torch.Tensor]]] = [None] * n
    errors: list[Optional[BaseException]] = [None] * n

    def abort_all() -> None:
        for g in {id(g): g for g in groups + [world]}.values():
            g.abort()

    def work(r: int) -> None:
        try:
            states[r]["dist"] = comms[r]
            interp = Interpreter(graphs[r], weights)
            results[r] = interp.run(inputs_per_rank[r], state=states[r]).outputs
        except BaseException as e:  # noqa: BLE001 - reported below, per rank
            errors[r] = e
            abort_all()
        finally:
            states[r].pop("dist", None)

    if n == 1:
        work(0)
    else:
        threads = [threading.Thread(target=work, args=(r,), name=f"irlm-rank{r}", daemon=True)
                   for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    first = next(((r, e) for r, e in enumerate(errors)
                  if e is not None and not isinstance(e, RankAborted)), None)
    if first is None:
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is not None:
        r, e = first
        if isinstance(e, DistributedError) and not isinstance(e, RankAborted):
            raise type(e)(f"rank {r}: {e}") from e
        raise DistributedError(f"rank {r}: {type(e).__name__}: {e}") from e
    return [list(x) for x in results]
