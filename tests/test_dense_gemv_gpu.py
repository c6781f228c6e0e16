"""irlm's dense GEMV (irlm.kernels.gemv) and the load-time tactics that choose it over cuBLAS
for linears of a few rows (lowering/tactics.py, lowering/dense_linears.py), on the GPU.

The GEMV against an fp64 matmul of the same bf16 / fp16 values (relative L2 error within the
output's rounding); the real CUDA timer; and an engine whose small-batch linears were made to
choose the GEMV (a stand-in timer) against the same engine on cuBLAS, prefill eager and decode
as CUDA graph replays.
"""
import pytest
import torch

from irlm_test_helpers import rel_l2 as rel, tiny_llama_engine

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_tactics")]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from irlm.kernels import gemv as dense  # noqa: E402
from irlm.kernels.nvrtc import KernelArgumentError  # noqa: E402
from irlm.lowering import tactics  # noqa: E402
from irlm.lowering.dense_linears import gemv_matches_reference  # noqa: E402

DEV = "cuda"
GEN = torch.Generator().manual_seed(4321)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


@pytest.mark.parametrize("warps_per_row", [None, 1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_gemv_matches_an_fp64_matmul(m, dtype, warps_per_row):
    # 391 rows: a partial last CTA (for 1, 2 and 4 warps a row); K = 4104: not a multiple of a
    # warp's 256-element step
    n, k = 391, 4104
    w = randn(n, k, scale=0.05).to(dtype)
    x = randn(m, k).to(dtype)
    bias = randn(n).to(dtype)
    got = dense.gemv(x.to(DEV), w.to(DEV), bias.to(DEV), warps_per_row=warps_per_row)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().t() + bias.double()
    assert rel(got, want) < 4e-3


def test_gemv_reads_strided_and_misaligned_rows():
    n, k = 128, 1024
    w = randn(n, k, scale=0.05).to(torch.bfloat16)
    base = randn(6, 2 * k + 8).to(torch.bfloat16).to(DEV)
    for x in (base[:, :k], base[1:4, 3:3 + k], base[2:3, 5:5 + k]):   # stride 2K+8, odd offsets
        got = dense.gemv(x, w.to(DEV))
        want = x.cpu().double() @ w.double().t()
        assert rel(got, want) < 4e-3


def test_warps_per_row_fill_the_gpu_once():
    from irlm.kernels.quant_linear import gemv_warps_per_row
    slots = torch.cuda.get_device_properties(0).multi_processor_count * 64
    for n in (391, 4096, 6144, 28672, 128256):
        w = gemv_warps_per_row(n, 0)
        assert w in (1, 2, 4) and (n * w <= slots or w == 1)
        assert w == 4 or n * 2 * w > slots            # the most that fits


def test_gemv_refuses_what_it_cannot_take():
    w = torch.zeros(16, 36, dtype=torch.bfloat16, device=DEV)      # K % 8 != 0
    with pytest.raises(KernelArgumentError, match="K % 8 == 0"):
        dense.gemv(torch.zeros(1, 36, dtype=torch.bfloat16, device=DEV), w)
    w = torch.zeros(16, 32, dtype=torch.float16, device=DEV)
    with pytest.raises(KernelArgumentError, match="weight must be bfloat16"):
        dense.gemv(torch.zeros(1, 32, dtype=torch.bfloat16, device=DEV), w)
    w = torch.zeros(16, 32, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(KernelArgumentError, match="warps_per_row=3"):
        dense.gemv(torch.zeros(1, 32, dtype=torch.bfloat16, device=DEV), w, warps_per_row=3)


def test_load_check_and_real_timer_run_on_this_device():
    assert gemv_matches_reference(DEV, torch.bfloat16)
    assert gemv_matches_reference(DEV, torch.float16)
    w = [torch.randn(1024, 1024, dtype=torch.bfloat16, device=DEV) for _ in range(4)]
    x = torch.randn(1, 1024, dtype=torch.bfloat16, device=DEV)
    times = tactics.cuda_timer({
        "cublas": lambda: [torch.nn.functional.linear(x, t) for t in w],
        "gemv": lambda: [dense.gemv(x, t) for t in w]})
    assert set(times) == {"cublas", "gemv"} and all(0 < t < 1e5 for t in times.values())


def test_engine_with_gemv_tactics_matches_cublas(monkeypatch):
    """Every linear made to choose the GEMV at 1-8 rows (a timer that says it is faster)
    against the same engine with tactics off (cuBLAS throughout): a prefill (eager; its LM
    head of 3 rows on cuBLAS), decode of 3 requests (4 rows in the bucket-4 graph) and of 1
    as graph replays."""
    from irlm.runtime.model_runner import StepBatch
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    graph = tiny_llama_engine()
    monkeypatch.setattr(tactics, "cuda_timer",
                        lambda cands: {name: 1.0 if name == "gemv" else 2.0 for name in cands})
    fast = CudaGraphRunner(graph, num_blocks=64)
    linears = [op for op in graph.ops if op.name == "core.linear"]
    assert len(fast.dense_plan.gemv_rows) == len(linears) >= 9   # 4 per layer, the LM head
    assert all(v.startswith("gemv") for v in fast.linear_tactics().values())
    monkeypatch.setenv("IRLM_TACTICS", "0")
    ref = CudaGraphRunner(graph, num_blocks=64)
    assert not ref.dense_plan.gemv_rows
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 512, (40,), generator=g) for _ in range(3)]
    tables = [list(range(r * 8, r * 8 + 8)) for r in range(3)]
    done = [0, 0, 0]
    schedule = [{0: 20, 1: 12, 2: 7}] + [{0: 1, 1: 1, 2: 1}] * 3 + [{1: 1}] * 3
    for step in schedule:
        reqs = sorted(step)
        batch = StepBatch.pack(reqs, [seqs[r][done[r]:done[r] + step[r]].tolist() for r in reqs],
                               [done[r] for r in reqs], [tables[r] for r in reqs])
        got, want = fast.step(batch), ref.step(batch)
        for r in reqs:
            done[r] += step[r]
        assert rel(got, want) < 2e-2, step
    assert fast.stats["graph_replays"] == 6 and fast.stats["graph_captures"] == 2
