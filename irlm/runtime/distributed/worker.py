"""The rendezvous store, the step protocol and the worker process of ranks 1 ... N-1.

Control goes through the rendezvous store (a ``torch.distributed.TCPStore``), data through
the process group.  Under the prefix ``P`` of one launch:

* ``P/ready/{r}`` (JSON: the rank's pool size, vocab...) or ``P/error/{r}`` (one line): rank r
  loaded its shard and built its executor, or could not;
* ``P/pool``: the KV pool every rank uses (rank 0 decides: the smallest any rank can hold),
  or ``abort``;
* ``P/step/{n}``: step n's batch (rank 0 publishes, every rank runs it), or ``stop``;
* ``P/hb/{r}``: ``"<unix time> <steps done>"``, refreshed every :data:`HEARTBEAT_S` by a
  thread of rank r; rank 0 names a rank that stopped beating or fell behind;
* ``P/left/{r}``: rank r read ``stop`` (or ``abort``) and is leaving.

Rank 0 never waits on a worker through the store while it runs steps (a ``set`` does not
block), so a hung worker can only hold rank 0 inside a collective, which the process group's
timeout bounds.  Closing, a rank 0 that did not start the workers (a joined launch) waits at
most :data:`LEAVE_WAIT_S` for their ``left`` keys: where rank 0 hosts the store (env://
without torchrun's agent), a rank 0 that exits at once takes the store away before the others
have read ``stop``, and they fail on a reset connection instead of leaving.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..model_runner import StepBatch
from .comm import Layout, leave_process_group

HEARTBEAT_S = 0.5
STOP = b"stop"
#: how long a closing rank 0 of a joined launch waits for the other ranks to read ``stop``
LEAVE_WAIT_S = 10.0


@dataclass
class LaunchSpec:
    """What every rank needs to join one run of a multi-rank engine (picklable)."""
    engine_dir: str
    tp: int
    pp: int
    host: str
    port: int
    prefix: str
    device: str                      # "cpu" or "cuda"
    store_is_master: bool = False    # for rank 0: host the store (spawned launches)
    num_blocks: Optional[int] = None
    max_model_len: Optional[int] = None
    kv_cache_bytes: int = 512 << 20
    timeout: float = 60.0            # collectives (the process group's timeout)
    load_timeout: float = 600.0      # loading shards and joining the group
    parent_pid: Optional[int] = None  # spawned workers exit when this process is gone
    ranks_per_gpu: int = 1           # > 1: consecutive local ranks share a GPU (NCCL tests)
    threads: Optional[int] = None    # torch's CPU threads per rank (None: the process's own)
    executor: Optional[str] = None   # CPU executor: fast / reference (None: IRLM_CPU_EXECUTOR)
    extra: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def key(self, *parts) -> str:
        return "/".join((self.prefix,) + tuple(str(p) for p in parts))

    def device_of(self, local_rank: int) -> torch.device:
        if self.device == "cuda":
            gpu = local_rank // max(1, self.ranks_per_gpu)
            return torch.device("cuda", gpu % max(1, torch.cuda.device_count()))
        return torch.device("cpu")


def connect_store(spec: LaunchSpec, is_master: bool = False):
    return dist.TCPStore(spec.host, spec.port, None if not is_master else spec.world_size,
                         is_master, timedelta(seconds=spec.load_timeout),
                         wait_for_workers=False)


def encode_batch(batch: StepBatch) -> bytes:
    return pickle.dumps(tuple(t.numpy() for t in (batch.input_ids, batch.positions, batch.q_lens,
                                                   batch.cached_lens, batch.block_tables)),
                        protocol=pickle.HIGHEST_PROTOCOL)


def decode_batch(payload: bytes) -> StepBatch:
    ids, pos, q, cached, tables = (torch.from_numpy(np.ascontiguousarray(a))
                                   for a in pickle.loads(payload))
    return StepBatch(list(range(q.shape[0])), ids, pos, q, cached, tables)


class Heartbeat(threading.Thread):
    """Refreshes ``P/hb/{rank}`` with the steps done; ends this process if the process that
    spawned it is gone (so no worker outlives its scheduler)."""

    def __init__(self, spec: LaunchSpec, rank: int, progress):
        super().__init__(name=f"irlm-heartbeat{rank}", daemon=True)
        self.spec, self.rank, self.progress = spec, rank, progress
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            store = connect_store(self.spec)
        except Exception:                         # noqa: BLE001 - the store is gone
            os._exit(3)
        key = self.spec.key("hb", self.rank)
        while not self._halt.is_set():
            if self.spec.parent_pid is not None and os.getppid() != self.spec.parent_pid:
                os._exit(3)
            try:
                store.set(key, f"{time.time():.3f} {self.progress()}")
            except Exception:                     # noqa: BLE001 - the store is gone
                if self.spec.parent_pid is not None:
                    os._exit(3)
                return
            self._halt.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._halt.set()


def one_line(e: BaseException) -> str:
    """An error on one line: an irlm error's message, or the exception type and message."""
    from irlm.errors import IRLMError
    text = " ".join(str(e).split())
    return text if isinstance(e, IRLMError) else f"{type(e).__name__}: {text}"


def _report(store, key: str, text: str) -> None:
    try:
        store.set(key, text)
    except Exception:                             # noqa: BLE001 - the store is gone too
        pass


def run_rank(spec: LaunchSpec, rank: int, local_rank: int) -> None:
    """The whole life of rank ``rank`` (not 0): load, report, join, run steps until stopped."""
    from .rank import RankWorker, resize_pool
    store = connect_store(spec)
    worker: Optional[RankWorker] = None
    hb = Heartbeat(spec, rank, lambda: worker.steps if worker is not None else -1)
    hb.start()
    try:
        layout = Layout(spec.tp, spec.pp, rank)
        worker = RankWorker(spec.engine_dir, layout, spec.device_of(local_rank),
                            num_blocks=spec.num_blocks, max_model_len=spec.max_model_len,
                            kv_cache_bytes=spec.kv_cache_bytes,
                            shared_gpu=spec.ranks_per_gpu > 1, threads=spec.threads,
                            executor=spec.executor)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names this rank
        _report(store, spec.key("error", rank), one_line(e))
        raise
    store.set(spec.key("ready", rank), json.dumps(worker.info()))
    store.wait([spec.key("pool")], timedelta(seconds=spec.load_timeout))
    pool = store.get(spec.key("pool"))
    if pool == b"abort":
        _report(store, spec.key("left", rank), "abort")
        return
    resize_pool(worker.runner, **json.loads(pool))
    worker.connect(dist.PrefixStore(spec.key("pg"), store), spec.timeout)
    n = 0
    try:
        while True:
            key = spec.key("step", n)
            while True:
                try:
                    store.wait([key], timedelta(seconds=3600))
                    break
                except dist.DistStoreError:
                    if not store.check([spec.key("hb", 0)]):
                        raise
            payload = store.get(key)
            if payload == STOP:
                _report(store, spec.key("left", rank), "stop")
                return
            worker.step(decode_batch(payload))
            n += 1
    except BaseException as e:  # noqa: BLE001
        _report(store, spec.key("error", rank), one_line(e))
        raise
    finally:
        hb.stop()
        hb.join(2 * HEARTBEAT_S + 1)


def worker_main(spec: LaunchSpec, rank: int) -> None:
    """Entry point of a spawned worker process (rank ``rank`` on this host)."""
    code = 0
    try:
        run_rank(spec, rank, rank)
    except BaseException:  # noqa: BLE001 - rank 0 reports it (from the store); exit non-zero
        code = 1
        if os.environ.get("IRLM_DEBUG"):
            import traceback
            traceback.print_exc()
    finally:
        if dist.is_initialized():
            leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: c10d's background threads (store client, gloo) abort
    # the process if they are destroyed there.
    os._exit(code)

if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    worker_main(LaunchSpec(**_spec), int(sys.argv[2]))
