"""The mixture-of-experts ops on the GPU (lowering/moe_kernels.py) against their references.

``core.grouped_mm`` on each of its paths against the op's reference (one GEMM per expert
over its rows, run on the CPU in float64 from the same bf16 / fp16 values): relative L2 error
within bf16 rounding.  Inside a CUDA graph the offsets must be read on the device: a graph
captured with one routing and replayed after the routing tensor is overwritten in place must
give the new routing's result.  ``core.histc`` as the scatter-add equals ``torch.histc``.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from irlm.lowering.moe_kernels import grouped_mm, grouped_mm_path, histc_scatter  # noqa: E402
from irlm.registry import get_op_def  # noqa: E402

DEV = torch.device("cuda")


def reference(x, w, offs):
    return get_op_def("core.grouped_mm").reference(
        None, [x.cpu().double(), w.cpu().double(), offs.cpu()], {})[0]


def rel(got, want):
    got = got.cpu().double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def routing(rows, experts, seed):
    """Sorted expert ids of ``rows`` rows (some experts get none) -> cumulative offsets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (rows,), generator=g)
    ids[ids == 1] = 0                               # expert 1 gets no rows
    counts = torch.bincount(ids, minlength=experts)
    return counts.cumsum(0).to(torch.int32)


def operands(rows, k, n, experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype).to(DEV)
    # stored [experts, n, k], read as [experts, k, n]: the layout the traced Mixtral has
    w = (torch.randn(experts, n, k, generator=g) * k ** -0.5).to(dtype).to(DEV).transpose(1, 2)
    return x, w


@pytest.mark.parametrize("rows", [1, 4, 37, 300])
def test_grouped_kernel_matches_reference(rows):
    x, w = operands(rows, 256, 512, 8, torch.bfloat16)
    offs = routing(rows, 8, rows).to(DEV)
    cap = torch.cuda.get_device_capability(DEV)
    path = grouped_mm_path(x, w, capturing=False, capability=cap)
    if cap in ((9, 0), (10, 0)):
        assert path == "grouped"
    got = grouped_mm(x, w, offs)
    assert got.shape == (rows, 512) and got.dtype == torch.bfloat16
    assert rel(got, reference(x, w, offs)) < 1e-2


def test_rows_past_the_last_offset_are_zero():
    x, w = operands(20, 256, 128, 4, torch.bfloat16)
    offs = torch.tensor([3, 3, 9, 14], dtype=torch.int32, device=DEV)
    got = grouped_mm(x, w, offs)
    assert (got[14:] == 0).all()
    assert rel(got, reference(x, w, offs)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_captured_graph_reads_the_routing_on_the_device(dtype):
    """bf16 takes torch's grouped kernel on sm_90 / sm_100, fp16 the dense fallback."""
    rows, experts = 24, 8
    x, w = operands(rows, 256, 256, experts, dtype)
    offs = routing(rows, experts, 1).to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grouped_mm(x, w, offs)          # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_mm(x, w, offs)
    for seed in (2, 3, 4):
        offs.copy_(routing(rows, experts, seed))
        x.copy_(operands(rows, 256, 256, experts, dtype, seed=seed)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, reference(x, w, offs)) < 1e-2, seed


def test_histc_scatter_equals_torch_histc_on_the_gpu():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 8, (1000,), generator=g).float().to(DEV)
    assert torch.equal(histc_scatter(ids, 8, 0.0, 7.0), torch.histc(ids, 8, 0, 7))
    x = (torch.rand(5000, generator=g) * 3 - 1).to(DEV)
    assert torch.equal(histc_scatter(x, 13, 0.0, 1.0), torch.histc(x, 13, 0, 1))
