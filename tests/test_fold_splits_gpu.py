"""Split decode attention combining its partitions in its last CTA (IRLM_FOLD_SPLITS=1,
attention.cuh: fold_splits) instead of the separate reduce kernel.

Oracle: the op's reference semantics in float32 (tests/test_kernels_gpu.py's ``reference``),
and the reduce-kernel path on the same inputs; plus the counters left at zero after every
launch (a count left behind would make the next launch combine too early), inside CUDA graphs
replayed with other lengths, and a small Llama's decode graphs.
"""
import pytest
import torch

from irlm_test_helpers import rel_l2, run_schedule, tiny_llama_engine

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_tactics")]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from irlm.kernels import ops  # noqa: E402
from test_kernels_gpu import ATTN_TOL, make_case, reference, rel_err, to_dev  # noqa: E402

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def fold(monkeypatch):
    def set_(on: bool):
        monkeypatch.setenv("IRLM_FOLD_SPLITS", "1" if on else "0")
    return set_


def _counters_zero():
    torch.cuda.synchronize()
    return all(int(b.abs().sum()) == 0 for b in ops._SPLIT_COUNTERS_KEPT)


def _decode(case, layer, dtype, fold, on, **kw):
    """Write the step's keys and values, then decode attention with IRLM_FOLD_SPLITS on / off."""
    fold(on)
    d = to_dev(case)
    ops.kv_cache_write(d["k"], d["v"], d["cache"], layer, d["tables"], d["q_lens"], d["cached"])
    out = torch.full(case["q"].shape, float("nan"), dtype=dtype, device="cuda")
    ops.paged_attention_decode(d["q"], d["cache"], layer, d["tables"], d["cached"], out=out,
                               max_kv_len=int(case["cached"].max()) + 1, **kw)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype,D,H,KV,splits", [
    (bf16, 128, 32, 8, 2), (bf16, 128, 32, 8, 13), (bf16, 128, 32, 8, 128),
    (fp16, 64, 12, 4, 5), (fp32, 128, 16, 4, 7),
    (bf16, 256, 8, 2, 9),
    (bf16, 128, 32, 1, 6)])                                   # MQA: two row tiles a kv head
def test_folded_splits_equal_the_reduce_kernel(dtype, D, H, KV, splits, fold):
    # short requests leave later partitions empty: they must not be counted
    ctx = [0, 3, 200, 1000, 2500, 64, 4095]
    case = make_case([(1, c) for c in ctx], H, KV, D, 16, dtype, seed=splits + D)
    _, ref = reference(case, layer=1)
    plain = _decode(case, 1, dtype, fold, False, num_splits=splits)
    folded = _decode(case, 1, dtype, fold, True, num_splits=splits)
    assert _counters_zero()
    assert rel_err(folded, ref) < ATTN_TOL[dtype]
    # the same partials, combined in another order: float32 rounding, then the output dtype's
    assert rel_l2(folded, plain) < (1e-5 if dtype == fp32 else 5e-3)


@pytest.mark.parametrize("window,alibi", [(37, False), (0, True), (100, True)])
def test_folded_splits_with_window_and_alibi(window, alibi, fold):
    ctx = [0, 20, 36, 37, 38, 500, 3000]
    H, KV = 8, 2
    slopes = [2 ** (-8 * (i + 1) / H) for i in range(H)] if alibi else ()
    case = make_case([(1, c) for c in ctx], H, KV, 128, 16, bf16, seed=window + 1)
    _, ref = reference(case, 1, window=window, alibi=slopes)
    out = _decode(case, 1, bf16, fold, True, num_splits=8, sliding_window=window,
                  alibi_slopes=slopes)
    assert _counters_zero()
    assert rel_err(out, ref) < ATTN_TOL[bf16]


def test_folded_splits_replay_in_a_cuda_graph(fold):
    """Captured once, replayed with other lengths: the counters the graph was captured with
    must be zero again before each replay's first CTA counts."""
    fold(True)
    H, KV, D, R = 32, 8, 128, 4
    case = make_case([(1, c) for c in (10, 100, 31, 900)], H, KV, D, 16, bf16, seed=3)
    d = to_dev(case)
    out = torch.empty(R, H, D, dtype=bf16, device="cuda")

    def step():
        ops.paged_attention_decode(d["q"], d["cache"], 1, d["tables"], d["cached"],
                                   max_kv_len=1024, num_splits=6, out=out)
    step()                                      # outside capture: the counters exist
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in ([10, 100, 31, 900], [900, 0, 512, 7], [1, 2, 3, 4]):
        d["cached"].copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        fold(False)
        plain = torch.empty_like(out)
        ops.paged_attention_decode(d["q"], d["cache"], 1, d["tables"], d["cached"],
                                   max_kv_len=1024, num_splits=6, out=plain)
        fold(True)
        assert _counters_zero()
        assert rel_l2(out, plain) < 5e-3


def test_a_llama_decodes_the_same_with_folded_splits(fold):
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    graph = tiny_llama_engine(max_seq=512)
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(0, 512, (300,), generator=g) for _ in range(2)]
    tables = [list(range(r * 20, r * 20 + 20)) for r in range(2)]
    # a 200-token context splits the decode attention (more than 128 keys)
    schedule = [{0: 200, 1: 150}] + [{0: 1, 1: 1}] * 6

    def run(on):
        fold(on)
        runner = CudaGraphRunner(graph, num_blocks=64)
        return run_schedule(lambda b: runner.step(b).float().cpu(), seqs, tables, schedule)
    folded, plain = run(True), run(False)
    assert _counters_zero()
    for a, b in zip(folded, plain):
        assert rel_l2(a, b) < 2e-2
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_bad_setting_is_refused_when_the_engine_loads(monkeypatch):
    from irlm.errors import IRLMError
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    monkeypatch.setenv("IRLM_FOLD_SPLITS", "yes")
    with pytest.raises(IRLMError, match="IRLM_FOLD_SPLITS must be 0 or 1, got 'yes'"):
        CudaGraphRunner(tiny_llama_engine(), num_blocks=8)
