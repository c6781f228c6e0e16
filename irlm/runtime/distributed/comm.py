"""The ``dist`` ops on torch.distributed: one rank's communicator and the op overrides.

A multi-rank engine has ``tp * pp`` ranks; rank ``r`` is tp rank ``r % tp`` of pipeline stage
``r // tp`` (lowering/engine_format.py).  Its graph's collectives (``dist.all_reduce``,
``dist.all_gather``) run over the **tp group of its stage** (ranks ``s*tp ... s*tp + tp-1``);
its ``dist.send``/``dist.recv`` name a **stage** as ``peer`` (pp-split numbers stages), which is
the rank with the same tp rank in that stage (``peer * tp + tp_rank``).

:func:`dist_kernels` gives the interpreter overrides that run those ops through a
:class:`TorchComm`, on the CPU (gloo) or inside the CUDA executor's decode graphs (NCCL: its
collectives and point-to-point calls can be captured in a CUDA graph once the communicator
exists, which the executor's warm-up runs make sure of).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from irlm.runtime.distributed.simulator import DistributedError

_REDUCE = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def configure_nccl_env() -> None:
    """Environment NCCL must see before its first communicator is made (spawned workers
    inherit it).  NVLink SHARP / multicast (NVLS) stays off: on machines whose fabric manager
    or driver does not allow multicast objects (the lent H200 machines among them),
    NCCL's NVLS setup fails or hangs at communicator creation instead of falling back."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"


def leave_process_group() -> None:
    """Leave the default process group without waiting for the other ranks.

    NCCL's communicator teardown (``destroy_process_group``) waits for every rank's: a rank
    0 that waits for its workers to exit before leaving, or a worker whose peer was killed,
    would block there for good (seen on the H200 with two ranks on one GPU).  Every step is
    complete when a rank leaves, so aborting the communicators loses nothing and returns at
    once; torch then forgets the group as ``destroy_process_group`` does.  Gloo's teardown
    is local."""
    try:
        if dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group
            _abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception:                             # noqa: BLE001 - a peer already gone
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:                     # noqa: BLE001
                pass


def configure_shared_gpu_nccl_env(rank: int) -> None:
    """NCCL settings for rank ``rank`` when several ranks share one GPU (``ranks_per_gpu``).

    NCCL (since 2.5) refuses a communicator in which two ranks of one host use the same GPU
    ("Duplicate GPU detected": it compares the host hash and the GPU's bus id of every pair),
    because its topology search assumes one rank per GPU.  Each rank gets a host identifier of
    its own (``NCCL_HOSTID``, which NCCL hashes instead of the host name), so NCCL sees one
    rank per "host" and connects the ranks through its network transport: the built-in socket
    transport (``NCCL_NET=Socket``, ``NCCL_IB_DISABLE=1``) over the loopback interface
    (``NCCL_SOCKET_IFNAME=lo``).  Slow, but a real NCCL communicator, captured in CUDA graphs
    like any other: a correctness check of the NCCL path on one GPU.  Settings the user made
    (other than the host id) are kept."""
    import socket
    os.environ["NCCL_HOSTID"] = f"{socket.gethostname()}-irlm-rank{rank}"
    os.environ.setdefault("NCCL_NET", "Socket")
    os.environ.setdefault("NCCL_IB_DISABLE", "1")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


@dataclass(frozen=True)
class Layout:
    """Where one rank sits in a ``tp x pp`` engine."""
    tp: int
    pp: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    def stage_rank(self, stage: int) -> int:
        """The global rank of this rank's peer in pipeline stage ``stage``."""
        return stage * self.tp + self.tp_rank

    @property
    def logits_rank(self) -> int:
        """The rank whose output is the logits rank 0 samples from: tp rank 0 of the last
        stage (every tp rank of it holds the gathered logits)."""
        return (self.pp - 1) * self.tp


class TorchComm:
    """One rank's collectives and point-to-point transfers, with the interface of the
    simulator's :class:`irlm.runtime.distributed.simulator.RankComm` (so the ``dist`` ops' reference
    implementations run on it unchanged).  ``tp_groups[s]`` is stage s's tp group (every
    rank must create every subgroup, in the same order: :func:`make_tp_groups`)."""

    def __init__(self, layout: Layout, tp_group):
        self.layout = layout
        self.rank = layout.tp_rank
        self.size = layout.tp
        self.group = tp_group
        self.seq = 0

    def all_reduce(self, x: torch.Tensor, op: str = "sum", where: str = "") -> torch.Tensor:
        if op not in _REDUCE:
            raise DistributedError(f"{where}: unknown reduction '{op}'")
        out = x.contiguous().clone()
        dist.all_reduce(out, op=_REDUCE[op], group=self.group)
        self.seq += 1
        return out

    def all_gather(self, x: torch.Tensor, axis: int, where: str = "") -> torch.Tensor:
        n = self.size
        x = x.contiguous()
        if x.device.type == "cuda":
            # one buffer of [n * d0, ...]: one NCCL call, capturable
            buf = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype,
                              device=x.device)
            dist.all_gather_into_tensor(buf, x, group=self.group)
            parts = buf.chunk(n, dim=0)
        else:
            parts = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(parts, x, group=self.group)
        self.seq += 1
        return torch.cat(parts, dim=axis)

    def _peer(self, peer: int, where: str) -> int:
        lay = self.layout
        if not 0 <= peer < lay.pp or peer == lay.stage:
            raise DistributedError(f"{where}: peer {peer} is not another stage of a "
                                   f"{lay.pp}-stage pipeline")
        return lay.stage_rank(peer)

    def send(self, x: torch.Tensor, peer: int, tag: int = 0, where: str = "") -> None:
        # Stages send in tag order at the end and receive in tag order at the start
        # (pp-split), so plain ordered sends match the peer's receives (NCCL matches
        # point-to-point calls by order, not tag).
        dist.send(x.contiguous(), self._peer(peer, where), tag=tag)

    def recv_into(self, buf: torch.Tensor, peer: int, tag: int = 0, where: str = "") -> torch.Tensor:
        dist.recv(buf, self._peer(peer, where), tag=tag)
        return buf


def make_tp_groups(layout: Layout, backend: str | None = None):
    """Stage s's tp group, for every s (collective: every rank calls it); the group of
    ``layout``'s stage.  With tp = world size the default group is the tp group."""
    if layout.tp == layout.world_size:
        return dist.group.WORLD
    mine = None
    for s in range(layout.pp):
        g = dist.new_group(list(range(s * layout.tp, (s + 1) * layout.tp)), backend=backend)
        if s == layout.stage:
            mine = g
    return mine


def dist_kernels(comm: TorchComm, device=None) -> dict:
    """Interpreter overrides running the graph's ``dist`` ops through ``comm``."""

    def check(ctx, a):
        if a["group_size"] != comm.size:
            raise DistributedError(f"{ctx.op.describe()}: group_size {a['group_size']}, but the "
                                   f"engine's tp groups have {comm.size} ranks")

    def all_reduce(ctx, x, a):
        check(ctx, a)
        if comm.size == 1:
            return [x[0]]
        return [comm.all_reduce(x[0], a["op"], ctx.op.describe())]

    def all_gather(ctx, x, a):
        check(ctx, a)
        if comm.size == 1:
            return [x[0]]
        axis = a["axis"] % x[0].dim()
        return [comm.all_gather(x[0], axis, ctx.op.describe())]

    def send(ctx, x, a):
        comm.send(x[0], a["peer"], a["tag"], ctx.op.describe())
        return [x[0]]

    def recv(ctx, x, a):
        t = a["type"]
        shape = [ctx.dim(d) for d in t.shape]
        buf = torch.empty(shape, dtype=t.dtype.torch, device=ctx.device or device)
        return [comm.recv_into(buf, a["peer"], a["tag"], ctx.op.describe())]

    return {"dist.all_reduce": all_reduce, "dist.all_gather": all_gather,
            "dist.send": send, "dist.recv": recv}
