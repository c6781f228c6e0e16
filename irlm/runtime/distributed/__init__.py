"""Multi-rank engines (``irlm compile --tp N --pp M``) as one process per rank over
torch.distributed: NCCL between GPUs, gloo between CPUs.  See docs/distributed.md.

:mod:`.comm` (the ``dist`` ops on torch.distributed, the rank layout), :mod:`.rank` (one
rank's shard and executor), :mod:`.worker` (the store protocol, the worker process),
:mod:`.runner` (rank 0: the ModelRunner the scheduler drives, launching, faults).
"""
from .comm import Layout, TorchComm, configure_nccl_env
from .runner import DistributedRunner, EngineStopped, is_multi_rank, launched_rank, serve_rank

__all__ = ["DistributedRunner", "EngineStopped", "Layout", "TorchComm", "configure_nccl_env",
           "is_multi_rank", "launched_rank", "serve_rank"]
