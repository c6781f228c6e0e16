"""The paged KV cache's bookkeeping: blocks, block tables, reference-counted prefix reuse.

The cache itself is one tensor pool ``[layers, num_blocks, 2, block_size, kv_heads, head_dim]``
owned by the model runner (see :mod:`irlm.ops.llm`).  This module owns *which* block holds
which tokens of which sequence; it never touches tensor data.

Prefix reuse.  A block that is full and whose keys/values have been computed gets a content
identity: the hash chain ``h_i = H(h_{i-1}, tokens of block i)``, so equal identities mean equal
whole prefixes, hence equal keys and values.  A new sequence whose tokens start with known
blocks shares them (reference count + 1) instead of recomputing them.  Copy-on-write is never
needed: only *full* blocks are shared, and a sequence only ever writes past its last full
block, into a block it owns alone.  A block whose count drops to zero keeps its identity and
stays reusable until it is handed out again (least recently freed first).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from ..errors import IRLMError


@dataclass
class CacheStats:
    """Counters since construction (tests and benchmarks read them)."""
    blocks_allocated: int = 0   # fresh blocks handed out (each one costs a KV computation)
    prefix_queries: int = 0     # full prompt blocks looked up for reuse
    prefix_hits: int = 0        # ... of which were found and shared
    evictions: int = 0          # reusable blocks whose identity was dropped to make room

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def chain_hash(parent: bytes, tokens) -> bytes:
    """Identity of a full block: a digest of its parent's identity and its own token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Hands out ``num_blocks`` blocks of ``block_size`` tokens to sequences (by integer id)."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise IRLMError(f"a KV cache needs num_blocks >= 1 and block_size >= 1, "
                            f"got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = CacheStats()
        self._refcount = [0] * num_blocks
        self._identity: list[bytes | None] = [None] * num_blocks
        self._by_identity: dict[bytes, int] = {}
        # Free blocks without an identity are handed out first, so reusable ones live longest.
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_reusable: OrderedDict[int, None] = OrderedDict()   # oldest first
        self._tables: dict[int, list[int]] = {}
        # identities of each sequence's computed full blocks, in order
        self._chains: dict[int, list[bytes]] = {}

    # ----- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (including reusable ones, which can be evicted at once)."""
        return len(self._free_plain) + len(self._free_reusable)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def ref_count(self, block: int) -> int:
        return self._refcount[block]

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks a sequence with these tokens would share (no side effects).

        Never covers the last token: its logits are needed, so at least one token is computed.
        """
        if not self.enable_prefix_caching:
            return []
        blocks, parent = [], b""
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = chain_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._by_identity.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_hits_in_use(self, token_ids: list[int]) -> int:
        """How many of :meth:`match_prefix`'s blocks are held already (those cost no free block)."""
        return sum(1 for b in self.match_prefix(token_ids) if self._refcount[b] > 0)

    # ----- changes ---------------------------------------------------------------------------
    def allocate_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Start a block table for a sequence, sharing its cached prefix; returns tokens cached."""
        if seq_id in self._tables:
            raise IRLMError(f"sequence {seq_id} already has a block table")
        hits = self.match_prefix(token_ids)
        if self.enable_prefix_caching:
            self.stats.prefix_queries += (len(token_ids) - 1) // self.block_size
            self.stats.prefix_hits += len(hits)
        for b in hits:
            self._take(b)
        self._tables[seq_id] = list(hits)
        self._chains[seq_id] = [self._identity[b] for b in hits]
        return len(hits) * self.block_size

    def ensure_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Grow a sequence's table to hold ``num_tokens`` tokens; False (and no change) if the
        free blocks do not suffice."""
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        table.extend(self._allocate_fresh() for _ in range(need))
        return True

    def commit(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Record that the first ``num_computed`` tokens' keys/values are in the cache: the full
        blocks among them get identities and become reusable by other sequences."""
        chain, table, bs = self._chains[seq_id], self._tables[seq_id], self.block_size
        for i in range(len(chain), num_computed // bs):
            identity = chain_hash(chain[-1] if chain else b"", token_ids[i * bs:(i + 1) * bs])
            chain.append(identity)
            block = table[i]
            # A twin (same prefix computed in the same step by another sequence) keeps the
            # first block as the shared one; this copy simply stays private.
            if (self.enable_prefix_caching and self._identity[block] is None
                    and identity not in self._by_identity):
                self._identity[block] = identity
                self._by_identity[identity] = block

    def fork(self, parent_id: int, child_id: int, parent_num_computed: int) -> int:
        """Start ``child_id`` as a copy of the parent's computed full blocks (shared, not
        copied); returns the tokens the child has cached.  The parent's partial last block is
        not shared, so the child recomputes those few tokens into a block of its own."""
        if child_id in self._tables:
            raise IRLMError(f"sequence {child_id} already has a block table")
        table = self._tables.get(parent_id, [])
        shared = table[:min(len(table), parent_num_computed // self.block_size)]
        for b in shared:
            self._take(b)
        self._tables[child_id] = list(shared)
        self._chains[child_id] = list(self._chains.get(parent_id, [])[:len(shared)])
        return len(shared) * self.block_size

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (finish, cancel, preempt).  Unknown ids are ignored."""
        table = self._tables.pop(seq_id, None)
        self._chains.pop(seq_id, None)
        # Last block first: the tail of a prefix is the least likely to be shared again, so it
        # should be the first evicted.
        for b in reversed(table or []):
            self._refcount[b] -= 1
            assert self._refcount[b] >= 0, f"block {b} freed more often than taken"
            if self._refcount[b] == 0:
                if self._identity[b] is not None:
                    self._free_reusable[b] = None
                else:
                    self._free_plain.append(b)

    # ----- internals -------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._refcount[block] == 0:
            del self._free_reusable[block]
        self._refcount[block] += 1

    def _allocate_fresh(self) -> int:
        if self._free_plain:
            block = self._free_plain.popleft()
        else:
            block, _ = self._free_reusable.popitem(last=False)
            del self._by_identity[self._identity[block]]
            self._identity[block] = None
            self.stats.evictions += 1
        self._refcount[block] = 1
        self.stats.blocks_allocated += 1
        return block


def kv_block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes one block takes in the pool ``[layers, blocks, 2, block_size, kv_heads, head_dim]``."""
    from irlm.ops.llm import KVCacheLayout
    itemsize = torch.empty((), dtype=dtype).element_size()
    return KVCacheLayout(num_layers, 1, 2, block_size, kv_heads, head_dim).block_bytes(itemsize)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_kv_pool(shape, dtype: torch.dtype, num_blocks, device: torch.device,
                  where: str) -> int:
    """``num_blocks`` as an int after checking it, and the pool ``shape`` (a graph's
    ``kv_cache`` input with ``num_blocks`` in dimension 1) against the memory left on
    ``device``, before anything is allocated: a bad count or an absurd layer count is one
    line naming the value, not an allocator failure (or the machine swapping)."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise IRLMError(f"{where}: num_blocks must be an int >= 1, got {num_blocks!r}")
    dims = [int(d) for i, d in enumerate(shape) if i != 1]
    if any(d < 1 for d in dims):
        raise IRLMError(f"{where}: KV cache shape {tuple(shape)} has a dimension < 1")
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = num_blocks * itemsize
    for d in dims:
        total *= d
    free = available_memory(device)
    if free is not None and total > free:
        layers, block = dims[0], dims[2]
        raise IRLMError(f"{where}: a KV cache of {num_blocks} blocks x {block} tokens x "
                        f"{layers} layers needs {total / 2**30:.1f} GiB, more than the "
                        f"{free / 2**30:.1f} GiB available on {device}; lower num_blocks")
    return num_blocks


def num_blocks_for_free_memory(bytes_per_block: int, fraction: float = 0.9,
                               device: int | str | torch.device | None = None) -> int:
    """How many blocks fit in ``fraction`` of the GPU memory free now (call after the weights
    and activation buffers are allocated, so that what is left is the cache's)."""
    if not 0.0 < fraction <= 1.0:
        raise IRLMError(f"fraction of free GPU memory must be in (0, 1], got {fraction}")
    if not torch.cuda.is_available():
        raise IRLMError("sizing the KV cache from free GPU memory needs a CUDA device")
    free, _total = torch.cuda.mem_get_info(device)
    n = int(free * fraction) // bytes_per_block
    if n < 1:
        raise IRLMError(f"{free / 2**20:.0f} MiB free GPU memory holds no KV block of "
                        f"{bytes_per_block / 2**20:.2f} MiB")
    return n
