"""Rank 0 of a multi-rank engine: the :class:`ModelRunner` the scheduler drives.

:class:`DistributedRunner` runs in the scheduler's process, which is rank 0 (tp rank 0 of
stage 0).  It either starts ranks 1 ... N-1 as processes on this host (``launch="spawn"``,
torch.multiprocessing with the spawn method) or joins a launch that started every rank
already (``launch="env"``: torchrun or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``).  Each step it publishes the batch that the
scheduler decided (every rank runs it), runs rank 0's shard, and returns the logits (from the
last pipeline stage when there are several).  Rank 0 samples.

Faults stop the whole engine with one :class:`EngineStopped` that names the rank and the cause:
a worker that cannot load its shard (before any step), one that dies (its socket closes, gloo
fails at once), one that hangs (the process group's timeout, or the watchdog for NCCL).  The
other workers are stopped and, when this process spawned them, reaped: none is left behind.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import time
import uuid
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from irlm.runtime.distributed.simulator import DistributedError

from .comm import Layout, configure_nccl_env, leave_process_group
from .worker import (STOP, HEARTBEAT_S, LEAVE_WAIT_S, LaunchSpec, connect_store, encode_batch,
                     one_line)

#: a worker whose heartbeat does not change for this long is reported as dead or frozen
SILENT_S = max(3.0, 6 * HEARTBEAT_S)


class EngineStopped(DistributedError):
    """A rank of a multi-rank engine failed; the engine is stopped (every rank)."""


def is_multi_rank(engine_dir) -> bool:
    """Whether ``engine_dir`` is a multi-rank engine (``irlm compile --tp/--pp``)."""
    try:
        manifest = json.loads((Path(engine_dir) / "engine.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "parallel" in manifest


def launched_rank() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) when a launcher (torchrun...) started this process as
    one rank of several; None otherwise."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))


def _master_port() -> int:
    port = int(os.environ.get("MASTER_PORT", 29500))
    if port == 0:
        raise DistributedError("MASTER_PORT=0: the ranks need one known port to meet at; "
                               "give the launcher a port (torchrun --master-port PORT)")
    return port


def _env_prefix() -> str:
    env = os.environ
    return f"irlm/{env.get('TORCHELASTIC_RUN_ID', 'env')}/{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"


def _ranks_per_gpu(value: Optional[int]) -> int:
    """``ranks_per_gpu`` as given, else ``IRLM_RANKS_PER_GPU`` (a launch's ranks all read the
    same environment), else 1."""
    if value is None:
        return _positive(os.environ.get("IRLM_RANKS_PER_GPU", "1"), "IRLM_RANKS_PER_GPU")
    return _positive(value, "ranks_per_gpu")


def _positive(value, where: str) -> int:
    """``value`` (an int or its text) as a whole number >= 1; an error naming ``where``."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise DistributedError(f"{where}={value!r}: expected a whole number of at least 1")
    return n


def _pick_device(device: str, local_ranks: int, ranks_per_gpu: int = 1) -> str:
    gpus = -(-local_ranks // ranks_per_gpu)
    if device == "auto":
        ok = torch.cuda.is_available() and torch.cuda.device_count() >= gpus
        return "cuda" if ok else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda: no CUDA GPU is available here")
        if torch.cuda.device_count() < gpus:
            each = "one GPU each" if ranks_per_gpu == 1 else f"{ranks_per_gpu} per GPU"
            raise DistributedError(f"--device cuda: this engine runs {local_ranks} ranks on "
                                   f"this host, {each}, but it has "
                                   f"{torch.cuda.device_count()} GPU(s)")
    elif device != "cpu":
        raise DistributedError(f"device '{device}': expected auto, cpu or cuda")
    return device


def _threads_per_rank(local_ranks: int) -> int:
    """CPU threads for each of ``local_ranks`` ranks on this host: OMP_NUM_THREADS, else
    this process's cores shared out among them."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value:
        return _positive(value, "OMP_NUM_THREADS")
    return max(1, len(os.sched_getaffinity(0)) // local_ranks)


def _watchdog(ref) -> None:
    """The watchdog thread: :meth:`DistributedRunner._watch` every 0.2 s while the runner
    exists, is open and asks to go on."""
    while True:
        time.sleep(0.2)
        runner = ref()
        if runner is None or runner._closed or not runner._watch():
            return
        del runner


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class DistributedRunner:
    """A multi-rank engine as one :class:`~irlm.runtime.model_runner.ModelRunner`.

    ``ranks_per_gpu`` (default: ``IRLM_RANKS_PER_GPU`` or 1): with more than 1, that many
    consecutive local ranks share a GPU, NCCL connecting them through its socket transport
    (:func:`~.comm.configure_shared_gpu_nccl_env`); for checking the NCCL path on one GPU,
    not for speed.

    ``threads``: torch's CPU threads of each rank of a CPU engine.  A spawned launch defaults
    to ``OMP_NUM_THREADS`` or else this host's cores shared out among its ranks (every core
    per process would oversubscribe them, and gloo's collectives then wait on descheduled
    peers); under torchrun (which sets ``OMP_NUM_THREADS``) each process keeps its own
    setting unless ``threads`` is given.  ``executor``: the CPU ranks' executor (``fast``,
    the default, or ``reference``; default ``IRLM_CPU_EXECUTOR``)."""

    supports_device_inputs = False    # the engine reads async tokens before publishing a step

    def __init__(self, engine_dir, *, device: str = "auto", num_blocks: Optional[int] = None,
                 max_model_len: Optional[int] = None, kv_cache_bytes: int = 512 << 20,
                 launch: str = "auto", timeout: float = 60.0, load_timeout: float = 600.0,
                 ranks_per_gpu: Optional[int] = None, threads: Optional[int] = None,
                 executor: Optional[str] = None):
        from irlm.lowering.engine_format import load_engine_header
        from .rank import RankWorker, resize_pool
        self.engine_dir = str(engine_dir)
        header = load_engine_header(engine_dir)
        self.header = header
        tp, pp = int(header.parallel["tp"]), int(header.parallel["pp"])
        env = launched_rank()
        ranks_per_gpu = _ranks_per_gpu(ranks_per_gpu)
        if launch == "auto":
            launch = "env" if env is not None else "spawn"
        if launch not in ("spawn", "env"):
            raise DistributedError(f"launch '{launch}': expected auto, spawn or env")
        self.launch = launch
        if launch == "env":
            if env is None:
                raise DistributedError("launch='env' needs RANK and WORLD_SIZE (start the "
                                       "program with torchrun)")
            rank, world, local = env
            if world != tp * pp:
                raise DistributedError(f"{engine_dir}: the engine has {tp * pp} ranks (tp {tp} x "
                                       f"pp {pp}) but the launch has WORLD_SIZE={world}")
            if rank != 0:
                raise DistributedError(f"rank {rank}: only rank 0 drives the engine; the other "
                                       f"ranks run serve_rank()")
            device = _pick_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                  ranks_per_gpu)
            self.spec = LaunchSpec(self.engine_dir, tp, pp, os.environ.get("MASTER_ADDR",
                                   "127.0.0.1"), _master_port(),
                                   _env_prefix(), device, num_blocks=num_blocks,
                                   max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
                                   timeout=timeout, load_timeout=load_timeout,
                                   ranks_per_gpu=ranks_per_gpu, threads=threads,
                                   executor=executor)
            # The store is torchrun's (its agent hosts it), or the one the program's own
            # init_process_group made at MASTER_ADDR:MASTER_PORT (env://: rank 0 hosts it in
            # this process already); otherwise this rank hosts it.
            master = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true" \
                and not dist.is_initialized()
        else:
            if dist.is_initialized() and _live:
                # an engine the program dropped (``del llm``) may wait in a reference cycle:
                # collecting it closes it and leaves its process group
                import gc
                gc.collect()
            if dist.is_initialized():
                raise DistributedError("this process already has a torch.distributed process "
                                       "group; close the other multi-rank engine first, or "
                                       "launch with torchrun (launch='env')")
            local = 0
            device = _pick_device(device, tp * pp, ranks_per_gpu)
            if device == "cpu" and threads is None:
                threads = _threads_per_rank(tp * pp)
            self.spec = LaunchSpec(self.engine_dir, tp, pp, "127.0.0.1", 0,
                                   f"irlm/{uuid.uuid4().hex}", device, num_blocks=num_blocks,
                                   max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
                                   timeout=timeout, load_timeout=load_timeout,
                                   parent_pid=os.getpid(), ranks_per_gpu=ranks_per_gpu,
                                   threads=threads, executor=executor)
            master = True
        if device == "cuda":
            configure_nccl_env()        # before any worker starts: they inherit it
        self.layout = Layout(tp, pp, 0)
        # a process group the program made itself (it joined a launch before opening the
        # engine) is the program's: closing the engine leaves it in place
        self._owns_group = not dist.is_initialized()
        self._procs: dict[int, object] = {}
        self._closed, self._fault = False, None
        self._step_started: Optional[float] = None
        self.num_steps = 0
        self._store = connect_store(self.spec, is_master=master)
        if launch == "spawn":
            self.spec.port = self._store.port
            self._spawn()
        _live.add(self)
        try:
            self.worker = RankWorker(self.engine_dir, self.layout,
                                     self.spec.device_of(local), num_blocks=num_blocks,
                                     max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
                                     shared_gpu=ranks_per_gpu > 1 and device == "cuda",
                                     threads=self.spec.threads, executor=executor)
            infos = self._wait_ready(self.worker.info())
            pool = {"num_blocks": min(i["num_blocks"] for i in infos),
                    "max_model_len": min(i["max_model_len"] for i in infos)}
            self._store.set(self.spec.key("pool"), json.dumps(pool))
            resize_pool(self.worker.runner, **pool)
            self.worker.connect(dist.PrefixStore(self.spec.key("pg"), self._store), timeout)
        except EngineStopped:
            self._shutdown(abort_pool=True)
            raise
        except BaseException as e:
            msg = self._diagnose(e, "while starting")
            self._shutdown(abort_pool=True)
            raise EngineStopped(msg) from e
        last = infos[self.layout.logits_rank]
        #: each rank's executor, in rank order (what ``irlm run`` reports)
        self.rank_executors = [i["executor"] for i in infos]
        self.vocab_size = self.worker.vocab_size = int(last["vocab_size"])
        self.block_size = int(self.worker.runner.block_size)
        self.num_blocks = int(pool["num_blocks"])
        self.max_model_len = int(pool["max_model_len"])
        self.max_num_tokens = last["max_num_tokens"]
        self.device = self.worker.device
        # the thread holds the runner weakly: a dropped engine (``del llm``) is freed and
        # closed, not kept alive by its own watchdog
        self._watchdog = threading.Thread(target=_watchdog, args=(weakref.ref(self),),
                                          name="irlm-watchdog", daemon=True)
        self._watchdog.start()

    # ----- launching -------------------------------------------------------------------------
    def _spawn(self) -> None:
        # Fresh interpreters running this package's worker module (the spawn start method,
        # without re-running the caller's main script: a script needs no __main__ guard).
        for r in range(1, self.layout.world_size):
            self._procs[r] = WorkerProcess(self.spec, r)

    def _wait_ready(self, mine: dict) -> list[dict]:
        """Every rank's info once all loaded their shards; an EngineStopped naming the first
        rank that failed (its message) or died, or that did not report in time."""
        spec, store = self.spec, self._store
        deadline = time.monotonic() + spec.load_timeout
        infos: dict[int, dict] = {0: mine}
        while len(infos) < self.layout.world_size:
            for r in range(1, self.layout.world_size):
                if r in infos:
                    continue
                if store.check([spec.key("error", r)]):
                    raise EngineStopped(self._stopped(
                        f"rank {r} could not start: {store.get(spec.key('error', r)).decode()}"))
                if store.check([spec.key("ready", r)]):
                    infos[r] = json.loads(store.get(spec.key("ready", r)))
                    continue
                p = self._procs.get(r)
                if p is not None and p.exitcode is not None:
                    time.sleep(0.2)          # its error report may be on its way
                    if store.check([spec.key("error", r)]):
                        continue
                    raise EngineStopped(self._stopped(
                        f"rank {r} (pid {p.pid}) {_exit_text(p.exitcode)} while loading its "
                        f"shard"))
            if len(infos) < self.layout.world_size:
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.layout.world_size) if r not in infos]
                    raise EngineStopped(self._stopped(
                        f"rank {missing[0]} did not load its shard within "
                        f"{spec.load_timeout:.0f} s (load_timeout)"))
                time.sleep(0.05)
        return [infos[r] for r in range(self.layout.world_size)]

    def _stopped(self, why: str) -> str:
        return f"multi-rank engine {self.engine_dir} stopped: {why}"

    # ----- steps -----------------------------------------------------------------------------
    def describe(self) -> str:
        """``DistributedRunner, tp 2 x pp 1: CpuGraphRunner, f16 linears, threads 1`` (each
        rank's executor where they differ)."""
        kinds = list(dict.fromkeys(self.rank_executors))
        ranks = kinds[0] if len(kinds) == 1 else "; ".join(
            f"rank {r}: {e}" for r, e in enumerate(self.rank_executors))
        return f"DistributedRunner, tp {self.layout.tp} x pp {self.layout.pp}: {ranks}"

    def step(self, batch) -> torch.Tensor:
        if self._closed:
            raise EngineStopped(self._fault or self._stopped("the engine was closed"))
        n = self.num_steps
        self._step_started = time.monotonic()
        try:
            self._store.set(self.spec.key("step", n), encode_batch(batch))
            logits = self.worker.step(batch)
            if logits.device.type == "cuda":
                torch.cuda.current_stream(logits.device).synchronize()
        except BaseException as e:
            msg = self._fault or self._diagnose(e, f"during step {n}")
            self._fault = msg
            self._shutdown()
            raise EngineStopped(msg) from e
        finally:
            self._step_started = None
        if n > 0:     # every rank has read step n-1 (it took part in step n-1's transfers)
            self._store.delete_key(self.spec.key("step", n - 1))
        self.num_steps = n + 1
        return logits

    # ----- faults ----------------------------------------------------------------------------
    def _heartbeats(self) -> dict[int, tuple[float, int]]:
        out = {}
        for r in range(1, self.layout.world_size):
            key = self.spec.key("hb", r)
            try:
                if self._store.check([key]):
                    t, steps = self._store.get(key).decode().split()
                    out[r] = (float(t), int(steps))
            except Exception:                     # noqa: BLE001
                pass
        return out

    def _diagnose(self, cause: BaseException, when: str) -> str:
        """One line naming the rank that failed and how, from what the workers reported,
        their processes' exit codes, their heartbeats; the cause seen on rank 0 otherwise."""
        time.sleep(min(1.0, 2 * HEARTBEAT_S))      # let the failing rank's report land
        spec = self.spec
        for r in range(1, self.layout.world_size):
            try:
                if self._store.check([spec.key("error", r)]):
                    return self._stopped(f"rank {r} failed {when}: "
                                         f"{self._store.get(spec.key('error', r)).decode()}")
            except Exception:                     # noqa: BLE001
                break
        for r, p in self._procs.items():
            if p.exitcode is not None:
                return self._stopped(f"rank {r} (pid {p.pid}) {_exit_text(p.exitcode)} {when}")
        # A rank whose heartbeat does not move for SILENT_S is dead or frozen (the heartbeat is
        # a thread of its own, beating whatever the rank's main thread does).  Watching it
        # move, rather than comparing its time with this host's clock, also holds across
        # hosts whose clocks differ (launches over several nodes, where there is no process
        # exit code to read).
        first, start = self._heartbeats(), time.monotonic()
        beats, silent = first, sorted(first)
        while silent and time.monotonic() - start < SILENT_S:
            time.sleep(HEARTBEAT_S / 2)
            beats = self._heartbeats()
            silent = [r for r in silent if beats.get(r) == first[r]]
        for r in silent:
            return self._stopped(f"rank {r} stopped responding {when} (no heartbeat for "
                                 f"{SILENT_S:.0f} s: its process died or froze)")
        behind = [r for r, (_, steps) in beats.items() if steps < self.num_steps]
        if behind:
            return self._stopped(f"rank {behind[0]} did not finish step {self.num_steps} "
                                 f"within the timeout ({spec.timeout:.0f} s); rank 0 saw: "
                                 f"{one_line(cause)}")
        return self._stopped(f"rank 0 failed {when}: {one_line(cause)}")

    def _watch(self) -> None:
        """One look of the watchdog: a worker process that exited, or (NCCL, where a dead
        peer can leave a collective waiting forever) a step past the timeout, ends the engine.
        Whether to keep watching."""
        dead = next(((r, p) for r, p in self._procs.items() if p.exitcode is not None), None)
        started = self._step_started
        late = started is not None and time.monotonic() - started > self.spec.timeout
        if dead is None and not late:
            return True
        if self._closed:
            return False
        if dead is not None:
            r, p = dead
            self._fault = self._stopped(f"rank {r} (pid {p.pid}) {_exit_text(p.exitcode)}"
                                        f" during step {self.num_steps}")
        if self.worker.backend == "nccl":
            self._fault = self._fault or self._diagnose(TimeoutError(
                f"step {self.num_steps} ran past {self.spec.timeout:.0f} s"),
                f"during step {self.num_steps}")
            _abort_nccl()
        return not (dead is not None or self.worker.backend == "nccl")

    # ----- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every rank (and reap the processes this runner started)."""
        if not self._closed:
            self._shutdown()

    def _shutdown(self, abort_pool: bool = False) -> None:
        self._closed = True
        _live.discard(self)
        try:
            if abort_pool:
                self._store.set(self.spec.key("pool"), "abort")
            self._store.set(self.spec.key("step", self.num_steps), STOP)
        except Exception:                         # noqa: BLE001 - the store may be gone
            pass
        if not (self._procs or abort_pool) and self._fault is None:
            self._wait_left()
        # Leave the process group now, before waiting for the workers (see leave_process_group)
        if dist.is_initialized():
            if self._owns_group:
                if self._fault is None:       # graphs in flight on a fault: abort at once
                    _release_graphs(getattr(self, "worker", None))
                leave_process_group()
            elif self._fault is not None and getattr(self, "worker", None) is not None and \
                    self.worker.backend == "nccl":
                _abort_nccl()
        deadline = time.monotonic() + 5.0
        for p in self._procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs.values():
            if p.exitcode is None:
                p.terminate()
        for p in self._procs.values():
            p.join(2.0)
            if p.exitcode is None:
                p.kill()
                p.join()

    def _wait_left(self) -> None:
        """A joined launch: wait (at most LEAVE_WAIT_S) until every other rank has read the
        stop, so that a rank 0 hosting the store does not take it away from under them
        (worker.py's module doc)."""
        others = [self.spec.key("left", r) for r in range(1, self.layout.world_size)]
        if others:
            try:
                self._store.wait(others, timedelta(seconds=LEAVE_WAIT_S))
            except Exception:                     # noqa: BLE001 - gone or late: leave anyway
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:                         # noqa: BLE001
            pass


_WORKER_MAIN = ("import json, sys; from irlm.runtime.distributed.worker import LaunchSpec, "
                "worker_main; worker_main(LaunchSpec(**json.loads(sys.argv[1])), "
                "int(sys.argv[2]))")


class WorkerProcess:
    """A spawned worker: a fresh interpreter running :func:`worker.worker_main` (SPEC RANK)."""

    def __init__(self, spec: LaunchSpec, rank: int):
        import dataclasses
        import subprocess
        import sys
        self.rank = rank
        env = dict(os.environ)
        if spec.device == "cpu" and spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)     # before torch starts its pool
        # ``-c`` rather than ``-m ...worker``: the package already imports that module, and
        # runpy warns when it runs a module that is in sys.modules
        self._p = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN,
                                    json.dumps(dataclasses.asdict(spec)), str(rank)], env=env)
        self.pid = self._p.pid

    @property
    def exitcode(self) -> Optional[int]:
        return self._p.poll()

    def join(self, timeout: Optional[float] = None) -> None:
        try:
            self._p.wait(timeout)
        except Exception:                         # noqa: BLE001 - subprocess.TimeoutExpired
            pass

    def terminate(self) -> None:
        self._p.terminate()

    def kill(self) -> None:
        self._p.kill()


def _release_graphs(worker) -> None:
    """Destroy this rank's captured decode graphs before it leaves the process group: NCCL's
    abort waits for every graph that captured one of its calls (``release_graphs``).  The
    other ranks' graphs go with their worker objects when ``run_rank`` returns."""
    runner = getattr(worker, "runner", None)
    release = getattr(runner, "release_graphs", None)
    if release is not None:
        try:
            release()
        except Exception:                         # noqa: BLE001 - leave the group regardless
            pass


def _abort_nccl() -> None:
    """Abort every NCCL communicator of this process so a collective waiting on a dead peer
    returns (with an error) instead of blocking forever."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group
        _abort_process_group()
    except Exception:                             # noqa: BLE001 - best effort
        pass


_live: "weakref.WeakSet[DistributedRunner]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for r in list(_live):
        r.close()


def serve_rank(engine_dir, *, device: str = "auto", num_blocks: Optional[int] = None,
               max_model_len: Optional[int] = None, kv_cache_bytes: int = 512 << 20,
               timeout: float = 60.0, load_timeout: float = 600.0,
               ranks_per_gpu: Optional[int] = None, threads: Optional[int] = None,
               executor: Optional[str] = None) -> None:
    """Run this launched process's rank (not 0) of the engine until rank 0 stops it.  For
    ranks started by torchrun: ``irlm run`` and ``LLM(ENGINE)`` call it on ranks != 0."""
    from irlm.lowering.engine_format import load_engine_header
    from .worker import run_rank
    env = launched_rank()
    if env is None:
        raise DistributedError("serve_rank needs RANK and WORLD_SIZE (start it with torchrun)")
    rank, world, local = env
    par = load_engine_header(engine_dir).parallel
    tp, pp = int(par["tp"]), int(par["pp"])
    if world != tp * pp:
        raise DistributedError(f"{engine_dir}: the engine has {tp * pp} ranks (tp {tp} x pp "
                               f"{pp}) but the launch has WORLD_SIZE={world}")
    ranks_per_gpu = _ranks_per_gpu(ranks_per_gpu)
    device = _pick_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)), ranks_per_gpu)
    if device == "cuda":
        configure_nccl_env()
    spec = LaunchSpec(str(engine_dir), tp, pp, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      _master_port(), _env_prefix(), device,
                      num_blocks=num_blocks, max_model_len=max_model_len,
                      kv_cache_bytes=kv_cache_bytes, timeout=timeout, load_timeout=load_timeout,
                      ranks_per_gpu=ranks_per_gpu, threads=threads, executor=executor)
    owns_group = not dist.is_initialized()     # else the program's own: left in place
    try:
        run_rank(spec, rank, local)
    finally:
        if owns_group and dist.is_initialized():
            leave_process_group()
