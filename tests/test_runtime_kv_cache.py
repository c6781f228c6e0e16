"""BlockManager: allocation, freeing, reference-counted prefix reuse, forks, eviction."""
import pytest
from hypothesis import given, settings, strategies as st

from irlm.errors import IRLMError
from irlm.runtime.kv_cache import BlockManager, kv_block_bytes, num_blocks_for_free_memory

BS = 4


def run_prefill(bm, seq_id, tokens):
    """Admit a sequence and compute all of its tokens (what the engine does, minus the model)."""
    cached = bm.allocate_prefix(seq_id, tokens)
    assert bm.ensure_slots(seq_id, len(tokens))
    bm.commit(seq_id, tokens, len(tokens))
    return cached


def test_allocate_grow_and_free():
    bm = BlockManager(8, BS)
    assert bm.allocate_prefix(0, list(range(5))) == 0
    assert bm.ensure_slots(0, 5) and len(bm.block_table(0)) == 2
    assert bm.ensure_slots(0, 8) and len(bm.block_table(0)) == 2     # still fits
    assert bm.ensure_slots(0, 9) and len(bm.block_table(0)) == 3
    assert bm.num_free_blocks == 5 and bm.can_allocate(5) and not bm.can_allocate(6)
    bm.free(0)
    assert bm.num_free_blocks == 8


def test_ensure_slots_is_all_or_nothing():
    bm = BlockManager(3, BS)
    bm.allocate_prefix(0, [1])
    assert not bm.ensure_slots(0, 4 * BS)          # needs 4 blocks, 3 exist
    assert bm.block_table(0) == [] and bm.num_free_blocks == 3


def test_full_blocks_are_shared_by_a_later_sequence_with_the_same_prefix():
    bm = BlockManager(16, BS)
    prefix = list(range(100, 112))                 # 3 full blocks
    run_prefill(bm, 0, prefix + [1, 2])
    cached = run_prefill(bm, 1, prefix + [7, 8, 9])
    assert cached == 12
    assert bm.block_table(1)[:3] == bm.block_table(0)[:3]
    assert bm.block_table(1)[3] != bm.block_table(0)[3]      # the partial block is private
    assert all(bm.ref_count(b) == 2 for b in bm.block_table(0)[:3])
    assert bm.stats.prefix_hits == 3


def test_a_diverging_block_breaks_the_chain():
    bm = BlockManager(16, BS)
    run_prefill(bm, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Same second block, different first block: the chain hash must not match block 2.
    assert bm.match_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []
    assert len(bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 0, 9])) == 1


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(16, BS)
    tokens = list(range(8))                        # exactly 2 full blocks
    run_prefill(bm, 0, tokens)
    assert bm.allocate_prefix(1, tokens) == 4      # only the first block: token 7 is computed
    assert bm.ensure_slots(1, 8)
    assert bm.block_table(1)[1] != bm.block_table(0)[1]


def test_uncomputed_blocks_are_not_shared():
    bm = BlockManager(16, BS)
    bm.allocate_prefix(0, list(range(9)))
    bm.ensure_slots(0, 9)
    bm.commit(0, list(range(9)), 5)                # only the first block is computed yet
    assert len(bm.match_prefix(list(range(9)))) == 1


def test_freed_blocks_stay_reusable_until_evicted_least_recent_first():
    bm = BlockManager(4, BS)
    a, b = [1] * 4 + [2] * 4 + [0], [3] * 4 + [0]
    run_prefill(bm, 0, a)
    bm.free(0)
    run_prefill(bm, 1, b)
    bm.free(1)
    assert bm.num_free_blocks == 4
    assert len(bm.match_prefix(a)) == 2 and len(bm.match_prefix(b)) == 1
    # Two fresh blocks: the one plain free block, then the least recently freed reusable
    # block, which is a's tail (blocks of one sequence are freed tail first).
    bm.allocate_prefix(2, [9])
    assert bm.ensure_slots(2, 2 * BS)
    assert bm.stats.evictions == 1
    assert len(bm.match_prefix(a)) == 1 and len(bm.match_prefix(b)) == 1
    bm.free(2)
    assert run_prefill(bm, 3, a) == 4


def test_duplicate_prefix_computed_twice_keeps_one_shared_copy():
    bm = BlockManager(16, BS)
    tokens = list(range(9))
    for s in (0, 1):                               # admitted in the same step: no hits yet
        bm.allocate_prefix(s, tokens)
        bm.ensure_slots(s, 9)
    for s in (0, 1):
        bm.commit(s, tokens, 9)
    hits = bm.match_prefix(tokens)
    assert hits == bm.block_table(0)[:2]
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 16


def test_fork_shares_computed_full_blocks_only():
    bm = BlockManager(16, BS)
    tokens = list(range(10))
    run_prefill(bm, 0, tokens)
    assert bm.fork(0, 1, 10) == 8
    assert bm.block_table(1) == bm.block_table(0)[:2]
    assert bm.ensure_slots(1, 11) and bm.block_table(1)[2] not in bm.block_table(0)
    bm.free(0)
    assert all(bm.ref_count(b) == 1 for b in bm.block_table(1)[:2])
    bm.free(1)
    assert bm.num_free_blocks == 16


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    run_prefill(bm, 0, list(range(9)))
    assert run_prefill(bm, 1, list(range(9))) == 0
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 16


def test_errors_are_clear():
    with pytest.raises(IRLMError, match="num_blocks >= 1"):
        BlockManager(0, BS)
    bm = BlockManager(4, BS)
    bm.allocate_prefix(0, [1])
    with pytest.raises(IRLMError, match="already has a block table"):
        bm.allocate_prefix(0, [1])


def test_block_bytes_and_gpu_sizing():
    import torch
    assert kv_block_bytes(2, 16, 4, 64, torch.float16) == 2 * 2 * 16 * 4 * 64 * 2
    if not torch.cuda.is_available():
        with pytest.raises(IRLMError, match="CUDA"):
            num_blocks_for_free_memory(1 << 20)
    with pytest.raises(IRLMError, match="fraction"):
        num_blocks_for_free_memory(1 << 20, fraction=1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5),
                          st.integers(1, 20)), max_size=40))
def test_random_operations_keep_the_books_balanced(ops):
    """Every block is exactly one of: free, or held; refcounts equal the number of tables
    holding a block; shared blocks are full and identical in content."""
    bm = BlockManager(12, BS)
    tokens = {}
    for op, sid, n in ops:
        if op == "add" and not bm.has(sid):
            tokens[sid] = [7] * 4 + [sid] * n      # a common first block, then private ones
            bm.allocate_prefix(sid, tokens[sid])
        elif op == "grow" and bm.has(sid):
            want = min(len(tokens[sid]), BS * len(bm.block_table(sid)) + n)
            if bm.ensure_slots(sid, want):
                bm.commit(sid, tokens[sid], want)
        elif op == "free":
            bm.free(sid)
            tokens.pop(sid, None)
        held, content = {}, {}
        for s in tokens:
            for i, b in enumerate(bm.block_table(s)):
                held[b] = held.get(b, 0) + 1
                content.setdefault(b, set()).add((i, tuple(tokens[s][i * BS:(i + 1) * BS])))
        assert all(bm.ref_count(b) == c for b, c in held.items())
        assert bm.num_free_blocks + len(held) == bm.num_blocks
        for b, c in held.items():
            if c > 1:        # shared: same place in every table, same full block of tokens
                assert len(content[b]) == 1 and len(next(iter(content[b]))[1]) == BS
    for s in list(tokens):
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
