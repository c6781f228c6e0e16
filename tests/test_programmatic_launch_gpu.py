"""Programmatic dependent launch (kernels/src/nvrtc.py, pdl_enter in common.cuh) and the GEMVs'
weight prefetch into L2, on the GPU.

With PDL a kernel may start before its predecessor in the stream has finished and waits for it
inside, so a kernel that read or wrote too early would race.  The oracle is the same work
launched plainly (no PDL, no prefetch), and torch / fp64 for the values: a chain of dependent
irlm kernels captured in a CUDA graph and replayed with fresh inputs, each GEMV under several
prefetch sizes, and an engine's decode graphs with and without PDL.
"""
import pytest
import torch

from irlm_test_helpers import rel_l2 as rel, run_schedule, tiny_llama_engine

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_tactics")]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from irlm.kernels import gemv as dense, nvrtc, ops, quant_linear as ql  # noqa: E402
from irlm.passes.llm.quantize import quantize_fp8, quantize_int4, quantize_int8  # noqa: E402

DEV = "cuda"
GEN = torch.Generator().manual_seed(77)
HOPPER = torch.cuda.get_device_capability()[0] >= 9


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


@pytest.fixture
def launch(monkeypatch):
    """set(pdl, prefetch): later launches with / without PDL and that GEMV prefetch."""
    def set_(pdl, prefetch):
        nvrtc.set_programmatic_launch(pdl)
        monkeypatch.setenv("IRLM_GEMV_PREFETCH", str(prefetch))
    yield set_
    nvrtc.set_programmatic_launch(None)


def test_launches_are_programmatic_on_hopper():
    assert nvrtc.programmatic_launch_enabled(torch.cuda.current_device()) == HOPPER


PREFETCH = [0, 100, 4096, 1 << 20]     # none, part of a line, the default, past every row


@pytest.mark.parametrize("m", [1, 5])
def test_gemvs_give_the_same_bits_under_every_prefetch(m, launch):
    n, k = 391, 4104
    x = randn(m, k).to(torch.bfloat16).to(DEV)
    w = randn(n, k, scale=0.05).to(torch.bfloat16).to(DEV)
    k8 = 1040
    x8 = randn(m, k8).to(torch.bfloat16).to(DEV)
    q8, s8 = (t.to(DEV) for t in quantize_int8(randn(n, k8, scale=0.05)))
    f8, fs = (t.to(DEV) for t in quantize_fp8(randn(n, k8, scale=0.05)))
    k4 = 1536
    x4 = randn(m, k4).to(torch.bfloat16).to(DEV)
    q4, s4, z4 = quantize_int4(randn(n, k4, scale=0.05), 128)
    q4, s4, z4 = q4.to(DEV), s4.float().to(DEV), z4.to(DEV)
    runs = {
        "bf16": lambda: dense.gemv(x, w),
        "int8": lambda: ql.w8a16_gemv(x8, q8, s8.float().reshape(-1)),
        "fp8": lambda: ql.fp8_gemv(x8, f8, fs),
        "int4-mma": lambda: ql.w4a16_gemv(x4, q4, s4, z4, 128, tensor_cores=True),
    }
    launch(False, 0)
    want = {name: f() for name, f in runs.items()}
    assert rel(want["bf16"], x.cpu().double() @ w.cpu().double().t()) < 4e-3
    for pdl in (False, True):
        for pf in PREFETCH:
            launch(pdl, pf)
            for name, f in runs.items():
                assert torch.equal(f(), want[name]), (name, pdl, pf)


def _chain(x, res, wn, w1, w2, wo):
    """A decoder-like run of dependent kernels, each reading what the one before wrote, and
    the buffers reused (WAR hazards) from one round to the next."""
    for _ in range(6):
        h, res = ops.fused_add_rms_norm(x, res, wn, 1e-5)
        gu = dense.gemv(h, w1)                 # [m, 2I]
        a = ops.gated_act(gu, "silu")          # [m, I]
        x = dense.gemv(a, w2)                  # [m, H]
        x = ops.rms_norm(x, wn, 1e-5)
    return dense.gemv(x, wo)


def _chain_reference(x, res, wn, w1, w2, wo):
    x, res, wn, w1, w2, wo = (t.double().cpu() for t in (x, res, wn, w1, w2, wo))

    def norm(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * wn
    for _ in range(6):
        res = x + res
        h = norm(res)
        gu = h @ w1.t()
        i = gu.shape[-1] // 2
        a = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
        x = norm(a @ w2.t())
    return x @ wo.t()


@pytest.mark.parametrize("m", [1, 3])
def test_dependent_kernel_chain_in_a_cuda_graph_matches_plain_launches(m, launch):
    H, I, V = 1024, 2816, 4000
    wn = (1 + randn(H, scale=0.1)).to(torch.bfloat16).to(DEV)
    w1 = randn(2 * I, H, scale=H ** -0.5).to(torch.bfloat16).to(DEV)
    w2 = randn(H, I, scale=I ** -0.5).to(torch.bfloat16).to(DEV)
    wo = randn(V, H, scale=H ** -0.5).to(torch.bfloat16).to(DEV)
    xin = torch.zeros(m, H, dtype=torch.bfloat16, device=DEV)
    rin = torch.zeros(m, H, dtype=torch.bfloat16, device=DEV)
    inputs = [(randn(m, H).to(torch.bfloat16), randn(m, H).to(torch.bfloat16))
              for _ in range(5)]

    launch(False, 0)
    plain = [_chain(a.to(DEV), b.to(DEV), wn, w1, w2, wo) for a, b in inputs]
    assert rel(plain[0], _chain_reference(*inputs[0], wn, w1, w2, wo)) < 3e-2

    launch(True, 4096)   # prefetch on, whatever the default
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _chain(xin, rin, wn, w1, w2, wo)              # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(xin, rin, wn, w1, w2, wo)
    for _ in range(3):                                # replays back to back, then checked
        for (a, b), want in zip(inputs, plain):
            xin.copy_(a)
            rin.copy_(b)
            graph.replay()
            assert torch.equal(out, want)
    eager = [_chain(a.to(DEV), b.to(DEV), wn, w1, w2, wo) for a, b in inputs]
    assert all(torch.equal(g, w) for g, w in zip(eager, plain))


def test_engine_decode_graphs_with_and_without_pdl_agree(launch, monkeypatch):
    """A small Llama whose linears all run irlm's GEMV at 1-8 rows (a stand-in timer), so a
    decode step is nearly all irlm kernels: the same logits, bit for bit, with PDL and the
    default prefetch as with plain launches; prefill and decode through the CUDA runner."""
    from irlm.lowering import tactics
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    graph = tiny_llama_engine()
    monkeypatch.setattr(tactics, "cuda_timer",
                        lambda cands: {name: 1.0 if name == "gemv" else 2.0 for name in cands})
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 512, (40,), generator=g) for _ in range(3)]
    tables = [list(range(r * 8, r * 8 + 8)) for r in range(3)]
    schedule = [{0: 20, 1: 12, 2: 7}] + [{0: 1, 1: 1, 2: 1}] * 4 + [{1: 1}] * 3

    def run(pdl, prefetch):
        launch(pdl, prefetch)
        runner = CudaGraphRunner(graph, num_blocks=64)
        outs = run_schedule(runner.step, seqs, tables, schedule)
        assert runner.stats["graph_replays"] == 7
        return outs
    plain = run(False, 0)
    for got, want in zip(run(True, 4096), plain):
        assert torch.equal(got, want)
