"""The weight-only quantized GEMM (irlm.kernels.quant_gemm, a Triton kernel), without a GPU.

Numerics: the kernel runs in Triton's CPU interpreter on CPU tensors and is compared with the
reference op's math (irlm.ops.quant.dequantize_reference: the weight dequantized in fp32 and
rounded to x's dtype, then multiplied here in float64).  The interpreter's float -> bf16
conversion truncates instead of rounding to nearest (Triton 3.6-3.9), so the bound is a few
bf16 ulps of the output (1e-2 relative L2), not the GPU tests' rounding-exact comparison;
a wrong nibble order, group index, scale or row/column mapping gives errors near 1.

Code generation: the configurations the launcher picks compile for sm_90a with Triton's own
compiler and ptxas (no GPU needed), on the tensor cores, without register spills.

Triton is not a CI dependency (it ships with torch's CUDA builds): without it, everything here
skips.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from irlm.kernels import quant_gemm as qg  # noqa: E402
from irlm.kernels.nvrtc import KernelArgumentError  # noqa: E402
from irlm.ops.quant import dequantize_reference  # noqa: E402
from irlm.passes.llm.quantize import quantize_int4, quantize_int8  # noqa: E402


def _interpreter_runs() -> str:
    """'' if Triton's interpreter runs a kernel with a run-time loop bound here; else why not
    (Triton 3.6's interpreter fails under numpy >= 2.4, independently of irlm's kernel)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    def probe(x_ptr, n, B: tl.constexpr):
        r = tl.arange(0, B)
        acc = tl.load(x_ptr + r)
        for _ in range(0, n, B):
            acc += 1.0
        tl.store(x_ptr + r, acc)
    x = torch.zeros(16)
    try:
        InterpretedFunction(probe)[(1,)](x, 32, B=16)
    except Exception as e:  # noqa: BLE001 - the reason to skip
        import numpy
        return (f"Triton {triton.__version__}'s interpreter does not run with numpy "
                f"{numpy.__version__}: {type(e).__name__}: {e}")
    return "" if torch.equal(x, torch.full((16,), 2.0)) else "interpreter probe computed wrongly"


WHY = _interpreter_runs()
interpreted = pytest.mark.skipif(bool(WHY), reason=WHY)
GEN = torch.Generator().manual_seed(77)


def rel(got, want):
    got = got.double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm()).item()


def _reference(x, q, s, z, group, bias):
    w = dequantize_reference(q, s, z, group=group, dtype=x.dtype)
    y = x.double() @ w.double().t()
    return y + bias.double() if bias is not None else y


def _int8(n, k):
    return quantize_int8(torch.randn(n, k, generator=GEN) * 0.05)


def _int4(n, k, group):
    return quantize_int4(torch.randn(n, k, generator=GEN) * 0.05, group)


# M = 17 and 33 / 64 (tokens on the MMA's N side), 100 (64x128 tiles), 130 (128x128); N not a
# multiple of the tile (clamped rows and columns), bias or not
@interpreted
@pytest.mark.parametrize("m,n,k,bias", [(17, 96, 512, True), (33, 80, 256, False),
                                        (64, 48, 256, True), (100, 136, 256, True),
                                        (130, 72, 192, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_gemm_matches_the_reference_op(m, n, k, bias, dtype):
    q, s = _int8(n, k)
    x = torch.randn(m, k, generator=GEN).to(dtype)
    b = torch.randn(n, generator=GEN).to(dtype) if bias else None
    got = qg.w8a16_gemm(x, q, s.float(), b)
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel(got, _reference(x, q, s, None, 0, b)) < 1e-2


@interpreted
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,n,k", [(3, 64, 256), (17, 96, 512), (64, 40, 256), (100, 136, 256),
                                   (130, 72, 384)])
def test_int4_gemm_matches_the_reference_op(group, m, n, k):
    q, s, z = _int4(n, k, group)
    x = torch.randn(m, k, generator=GEN).to(torch.bfloat16)
    b = torch.randn(n, generator=GEN).to(torch.bfloat16)
    st, zt = qg.prepare_int4_scales(s, z)
    got = qg.w4a16_gemm(x, q, st, zt, group, b)
    assert got.shape == (m, n)
    assert rel(got, _reference(x, q, s, z, group, b)) < 1e-2


@interpreted
def test_int4_gemm_in_fp16_with_fp16_scales():
    # scales stored as fp16 (quantize's scale_dtype=f16) are converted exactly at load
    q, s, z = _int4(64, 256, 64)
    s = s.half()
    x = torch.randn(40, 256, generator=GEN).half()
    st, zt = qg.prepare_int4_scales(s, z)
    got = qg.w4a16_gemm(x, q, st, zt, 64)
    assert got.dtype == torch.float16
    assert rel(got, _reference(x, q, s, z, 64, None)) < 1e-2


# every configuration benchmarks/quant_gemm.py --sweep may time, on one shape each
@interpreted
@pytest.mark.parametrize("cfg", [c for c in qg.CANDIDATES if c.bm <= 64 or c.bn <= 128])
def test_each_candidate_configuration_computes_the_same_product(cfg):
    m, n, k = 70, 96, 512
    q8, s8 = _int8(n, k)
    q4, s4, z4 = _int4(n, k, 128)
    x = torch.randn(m, k, generator=GEN).to(torch.bfloat16)
    c8 = qg.fit_config(cfg, k)
    assert rel(qg.w8a16_gemm(x, q8, s8, config=c8), _reference(x, q8, s8, None, 0, None)) < 1e-2
    st, zt = qg.prepare_int4_scales(s4, z4)
    c4 = qg.fit_config(cfg, k)
    assert rel(qg.w4a16_gemm(x, q4, st, zt, 128, config=c4),
               _reference(x, q4, s4, z4, 128, None)) < 1e-2


@interpreted
def test_strided_rows_of_x_are_read_in_place_or_copied():
    q, s = _int8(64, 256)
    wide = torch.randn(20, 384, generator=GEN).to(torch.bfloat16)
    x = wide[:, 64:320]                        # row stride 384, offset 128 bytes
    assert rel(qg.w8a16_gemm(x, q, s), _reference(x, q, s, None, 0, None)) < 1e-2


def test_launch_configuration_table():
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (96, 48))
    for m in (17, 24, 32, 48, 64, 65, 128, 129, 512, 8192):
        for n, k in shapes:
            c = qg.gemm_config(m, n, k)
            assert k % (c.bk * c.split) == 0 and c.bk >= 16, (m, n, k, c)
            assert c.swap == (m <= 64)
            assert c.bm >= min(m, 64)
            tiles = -(-m // c.bm) * -(-n // c.bn)
            # split only where the tiles leave multiprocessors idle, never past that
            assert c.split == 1 or tiles * c.split // 2 < 132 * 7 // 8, (m, n, k, c)
    # Llama-3-8B at 32 rows: 128 features x 32 tokens per tile; the 4096-wide outputs (32
    # tiles) split K four ways, the 28672-wide one (224 tiles) not at all
    assert qg.gemm_config(32, 4096, 4096) == qg.GemmConfig(32, 128, 128, True, 8, 4, 4)
    assert qg.gemm_config(32, 4096, 14336).split == 4
    assert qg.gemm_config(32, 28672, 4096).split == 1
    assert qg.gemm_config(8192, 4096, 4096).split == 1


@interpreted
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_split_k_sums_the_parts_and_leaves_the_counters_at_zero(mode):
    """A K split of 4 over 2x3 tiles (M and N not multiples of the tile), twice in a row:
    the second launch finds the counters the first reset."""
    m, n, k = 40, 300, 1024
    cfg = qg.GemmConfig(32, 128, 64, True, 4, 4, 4)
    x = torch.randn(m, k, generator=GEN).to(torch.bfloat16)
    b = torch.randn(n, generator=GEN).to(torch.bfloat16)
    if mode == "int8":
        q, s = _int8(n, k)
        z, want = None, _reference(x, q, s, None, 0, b)
        outs = [qg.w8a16_gemm(x, q, s, b, config=cfg) for _ in range(2)]
    else:
        q, s, z = _int4(n, k, 32)
        st, zt = qg.prepare_int4_scales(s, z)
        want = _reference(x, q, s, z, 32, b)
        outs = [qg.w4a16_gemm(x, q, st, zt, 32, b, config=cfg) for _ in range(2)]
    for got in outs:
        assert rel(got, want) < 1e-2
    assert torch.equal(outs[0], outs[1])          # the parts are added in split order
    assert not qg.split_locks("cpu").any()


def test_bad_arguments_name_the_problem():
    q, s = _int8(64, 256)
    x = torch.randn(4, 256).to(torch.bfloat16)
    with pytest.raises(KernelArgumentError, match="x has 128 features"):
        qg.w8a16_gemm(x[:, :128], q, s)
    with pytest.raises(KernelArgumentError, match="bfloat16/float16"):
        qg.w8a16_gemm(x.float(), q, s)
    with pytest.raises(KernelArgumentError, match="scales must be contiguous f32"):
        qg.w8a16_gemm(x, q, s.half())
    with pytest.raises(KernelArgumentError, match=r"bias must be torch.bfloat16 \[64\]"):
        qg.w8a16_gemm(x, q, s, torch.zeros(63, dtype=torch.bfloat16))
    q4, s4, z4 = _int4(64, 256, 64)
    st, zt = qg.prepare_int4_scales(s4, z4)
    with pytest.raises(KernelArgumentError, match="group of"):
        qg.w4a16_gemm(x, q4, st, zt, 48)
    with pytest.raises(KernelArgumentError, match="prepare_int4_scales"):
        qg.w4a16_gemm(x, q4, s4, z4, 64)        # not transposed
    with pytest.raises(KernelArgumentError, match="BK must be a power of two"):
        qg.w4a16_gemm(x, q4, st, zt, 64, config=qg.GemmConfig(16, 32, 96, True, 4, 2))
    with pytest.raises(KernelArgumentError, match=r"split \* BK must divide K \(256\)"):
        qg.w4a16_gemm(x, q4, st, zt, 64, config=qg.GemmConfig(16, 32, 128, True, 4, 2, 4))


# ----- sm_90a code generation -------------------------------------------------------------------

def _ptxas():
    """The ptxas Triton itself runs for sm_90 (Triton's own lookup), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - an internal API: without it the check is skipped
        return None


@pytest.mark.slow
@pytest.mark.parametrize("m", [17, 48, 100, 512])
@pytest.mark.parametrize("group", [0, 32, 128])
def test_table_configurations_compile_for_sm90a_on_the_tensor_cores(m, group, tmp_path):
    import subprocess
    cfg = qg.gemm_config(m, 4096, 4096, group)
    kernel = qg.compile_for(90, cfg, group, bias=True)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx
    # tiles of 64+ output rows on the MMA's M side run on wgmma, smaller ones on mma.sync
    mma_rows = cfg.bn if cfg.swap else cfg.bm
    assert ("wgmma.mma_async" in ptx) == (mma_rows >= 64), cfg
    assert "mma" in ptx
    assert "cp.async" in ptx            # the loads are software-pipelined
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("Triton's ptxas not found: register use not checked")
    f = tmp_path / "k.ptx"
    f.write_text(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(f), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, check=True).stderr
    assert "0 bytes spill stores" in out and "0 bytes spill loads" in out, out
    assert "wgmma.mma_async instructions are serialized" not in out, out


# ----- the run-time choice in lowering/quant_linears.py ------------------------------------------

def _engine(mode, group, dtype):
    import transformers
    from irlm.compilation import compile_causal_lm
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    g = f",group={group}" if group else ""
    return compile_causal_lm(model, max_seq=64, extra_pipeline=(
        f"quantize{{mode={mode}{g},fuse=false}},fuse-quant,dce"))


@interpreted
@pytest.mark.slow
@pytest.mark.parametrize("mode,group,dtype,ms,path", [
    ("int8", 0, torch.bfloat16, (17, 300), "int8: gemv / triton gemm / dequantize+cublas"),
    ("int4", 64, torch.bfloat16, (17, 300), "int4: triton gemm / dequantize+cublas"),
    # fp16 int4 has no tinygemm: the GEMM below 17 rows too
    ("int4", 64, torch.float16, (5, 17), "int4: triton gemm / dequantize+cublas"),
])
def test_plan_runs_the_gemm_for_17_rows_and_more(mode, group, dtype, ms, path, monkeypatch):
    """The plan's load-time check and run-time dispatch, with the kernel interpreted on the
    CPU (``available`` patched to say yes): every quantized linear of a compiled engine takes
    the GEMM at these row counts and computes what its reference op does."""
    from types import SimpleNamespace
    from irlm.lowering.quant_linears import QuantLinearPlan
    from irlm.registry import get_op_def
    monkeypatch.setattr(qg, "available", lambda device: (True, ""))
    # tinygemm (small batches only) is not what this test is about
    monkeypatch.setattr(QuantLinearPlan, "_tinygemm", lambda self, device: False)
    graph = _engine(mode, group, dtype)
    plan = QuantLinearPlan().prepare(graph, graph.weights, torch.device("cpu"))
    assert plan.summary() == {path: 4} and plan.gemm_ok == {(mode, group, dtype): True}
    calls = []
    for name in ("w8a16_gemm", "w4a16_gemm"):
        real = getattr(qg, name)
        monkeypatch.setattr(qg, name, lambda *a, real=real, name=name, **k: (
            calls.append(name), real(*a, **k))[1])
    ops = [op for op in graph.ops if op.name == "quant.linear"]
    for m in ms:
        for op in ops:
            k = op.operands[0].type.shape[-1]
            xv = torch.randn(1, m, k, generator=GEN).to(dtype)
            operands = [xv] + [graph.weights.get(v.producer.attrs["name"])
                               for v in op.operands[1:]]
            got = plan.linear(SimpleNamespace(op=op), operands, op.attrs)[0]
            want = get_op_def("quant.linear").reference(SimpleNamespace(op=op), operands,
                                                        op.attrs)[0]
            assert got.shape == want.shape == (1, m, op.results[0].type.shape[-1])
            assert rel(got, want.double()) < 1e-2
    assert calls == [f"w{'8' if mode == 'int8' else '4'}a16_gemm"] * (len(ms) * len(ops))
