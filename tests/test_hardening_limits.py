"""Absurd cache geometry is one line naming the value, before anything is allocated (issue 21,
finding 6): tokens_per_block, num_blocks, and a KV cache whose layer count asks for more memory
than the machine has."""
from __future__ import annotations

import pytest

from irlm import DType, Graph, IRError, IRLMError, TensorType
from irlm.cli import main as irlm_main

from test_hardening_engine import tiny_graph


def inference_graph(layers: int, block: int = 16) -> Graph:
    """The runner's six inputs; the cache is also the output (only shapes matter here)."""
    g = Graph("paged")
    for name in ("input_ids", "position_ids", "q_lens", "cached_lens"):
        g.add_input(TensorType((4,), DType.i64), name)
    g.add_input(TensorType((4, 8), DType.i32), "block_tables")
    cache = g.add_input(TensorType((layers, 2, 2, block, 2, 64), DType.f32), "kv_cache")
    g.set_outputs([cache])
    return g


def make_runner(layers: int, num_blocks, block: int = 16):
    from irlm.runtime.runners.interpreter import GraphRunner
    GraphRunner(inference_graph(layers, block), num_blocks=num_blocks)


@pytest.mark.parametrize("num_blocks", [-1, 0, 2.5, True])
def test_bad_num_blocks_is_named(bounded, num_blocks):
    with pytest.raises(IRLMError, match=f"num_blocks must be an int >= 1, got {num_blocks!r}"):
        bounded(make_runner, 2, num_blocks, memory_mb=256)


def test_kv_cache_larger_than_memory_is_refused_before_allocation(bounded):
    """Old behaviour: 10**8 layers x 2 blocks (3 TiB) went straight to torch.zeros."""
    gib = 2 * 10 ** 8 * 2 * 16 * 2 * 64 * 4 / 2 ** 30        # blocks, layers, K/V, tokens, ...
    with pytest.raises(IRLMError, match=f"2 blocks x 16 tokens x 100000000 layers needs "
                                        f"{gib:.1f} GiB, more than the .* GiB available"):
        bounded(make_runner, 10 ** 8, None, memory_mb=256)


def test_zero_block_size_in_an_engine_is_refused(bounded):
    """Old behaviour: ZeroDivisionError sizing the default pool."""
    with pytest.raises(IRLMError, match=r"KV cache shape .* has a dimension < 1"):
        bounded(make_runner, 2, None, 0, memory_mb=256)


@pytest.mark.parametrize("value", [0, -4, 10 ** 6])
def test_tokens_per_block_is_checked_by_the_pass_and_the_cli(value, capsys):
    from irlm.passes.llm.substitute_attention import substitute_attention
    with pytest.raises(IRError, match=f"tokens_per_block must be an int in \\[1, 4096\\], got "
                                      f"{value}"):
        substitute_attention(tiny_graph(), value)
    assert irlm_main(["compile", "--hf", "nowhere", "-o", "unused",
                      "--tokens-per-block", str(value)]) == 1
    assert f"--tokens-per-block {value}: must be in [1, 4096]" in capsys.readouterr().err
