"""Every CUDA kernel compiles with NVRTC for sm_90a (runs on the CPU: no GPU needed).

CI installs nvidia-cuda-nvrtc and cuda-python through the ``test`` extra; the tests skip, with
the reason, only where NVRTC cannot be loaded.  Also checked here: compile errors carry NVRTC's
log, the on-disk cache, and that each ctypes parameter block matches its C struct byte for byte
(static_asserts compiled by NVRTC).
"""
import ctypes
import concurrent.futures as cf
import os
import subprocess
import sys

import pytest

from irlm.errors import IRLMError
from irlm.kernels import gemv, nvrtc as compiler, ops, quant_linear
from irlm.kernels.nvrtc import KernelCompileError, compile_source

OK, WHY = compiler.nvrtc_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"NVRTC (cuda-python) cannot be loaded: {WHY}")

ARCH = "sm_90a"
KERNELS = ops.all_kernels()


def _kid(k):
    return f"{k.filename}:{k.names[0]}"


@pytest.fixture(scope="module")
def compiled():
    """Compile every kernel group once, in parallel threads (NVRTC releases the GIL), without
    the disk cache, so each test below sees a real NVRTC compilation."""
    def job(k):
        try:
            return compile_source(k.filename, k.names, arch=ARCH, fast_math=k.fast_math,
                                  use_disk_cache=False)
        except Exception as e:  # noqa: BLE001 - reported by the test of this kernel
            return e
    with cf.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as ex:
        results = list(ex.map(job, KERNELS))
    return {_kid(k): r for k, r in zip(KERNELS, results)}


def test_every_source_file_has_a_kernel_group():
    sources = {p.name for p in compiler.KERNEL_DIR.glob("*.cu")}
    covered = {k.filename for k in KERNELS}
    assert sources == covered, f"kernel sources without a launcher group: {sources - covered}"
    for name in ("paged_attention_decode.cu", "prefill_attention.cu", "rms_norm.cu",
                 "rope_kv_write.cu", "gated_act.cu", "sampling.cu", "kv_cache_write.cu"):
        assert name in sources


@pytest.mark.parametrize("kernel", KERNELS, ids=_kid)
def test_kernel_compiles_for_sm90a(compiled, kernel):
    mod = compiled[_kid(kernel)]
    if isinstance(mod, Exception):
        raise mod
    assert mod.arch == ARCH and len(mod.cubin) > 1000
    assert mod.cubin[:4] == b"\x7fELF"
    assert set(mod.names) == set(kernel.names)
    for expr, lowered in mod.names.items():
        assert lowered.startswith("_Z"), (expr, lowered)
        assert lowered.encode() in mod.cubin, f"{expr} ({lowered}) missing from the cubin"


def test_compiles_for_ampere_too():
    k = ops.rms_kernel(__import__("torch").bfloat16)
    mod = compile_source(k.filename, k.names, arch="sm_80", use_disk_cache=False)
    assert len(mod.cubin) > 1000


def test_compile_error_carries_nvrtc_log():
    src = '#include "common.cuh"\n__global__ void broken(float* x) { x[0] = undefined_name; }\n'
    with pytest.raises(KernelCompileError) as e:
        compile_source("broken.cu", [], arch=ARCH, source=src, use_disk_cache=False)
    assert isinstance(e.value, IRLMError)
    assert "undefined_name" in e.value.log and "broken.cu(2)" in e.value.log
    assert "sm_90a" in str(e.value)


def test_disk_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("IRLM_CACHE_DIR", str(tmp_path))
    src = ('#include "common.cuh"\ntemplate <typename T> __global__ void f(T* x) '
           '{ x[threadIdx.x] = from_float<T>(2.f * to_float(x[threadIdx.x])); }\n')
    names = ["f<irlm_bf16>", "f<float>"]
    a = compile_source("cache_probe.cu", names, arch=ARCH, source=src)
    assert not a.from_cache
    files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert files == [f"{a.key}.cubin", f"{a.key}.json"]
    compiler._MEM_CACHE.clear()
    b = compile_source("cache_probe.cu", names, arch=ARCH, source=src)
    assert b.from_cache and b.cubin == a.cubin and b.names == a.names
    c = compile_source("cache_probe.cu", names, arch=ARCH, source=src, fast_math=False)
    assert c.key != a.key                     # options are part of the key
    d = compile_source("cache_probe.cu", names, arch=ARCH, source=src + "\n// changed\n")
    assert d.key != a.key                     # so is the source


_STRUCTS = [
    ("attention.cuh", "AttnParams", ops.AttnParams),
    ("kv_cache_write.cu", "KvWriteParams", ops.KvWriteParams),
    ("rope_kv_write.cu", "RopeParams", ops.RopeParams),
    ("rms_norm.cu", "RmsNormParams", ops.RmsNormParams),
    ("gated_act.cu", "GatedActParams", ops.GatedActParams),
    ("sampling.cu", "SampleParams", ops.SampleParams),
    ("rope.cu", "RopeApplyParams", ops.RopeApplyParams),
    ("quant_linear.cu", "QGemvParams", quant_linear.QGemvParams),
    ("quant_linear.cu", "DequantParams", quant_linear.DequantParams),
    ("quant_gemv_int4.cu", "Q4GemvParams", quant_linear.Q4GemvParams),
    ("quant_act.cu", "QuantActParams", quant_linear.QuantActParams),
    ("quant_act.cu", "ScaleI32Params", quant_linear.ScaleI32Params),
    ("gemv.cu", "GemvParams", gemv.GemvParams),
]


@pytest.mark.parametrize("header,cname,cls", _STRUCTS, ids=[s[1] for s in _STRUCTS])
def test_parameter_blocks_match_the_c_structs(header, cname, cls):
    lines = [f'#include "{header}"',
             f'static_assert(sizeof({cname}) == {ctypes.sizeof(cls)}, "sizeof {cname}");']
    for name, _ in cls._fields_:
        off = getattr(cls, name).offset
        lines.append(f'static_assert(__builtin_offsetof({cname}, {name}) == {off}, '
                     f'"{cname}.{name} is not at byte {off}");')
    lines.append("__global__ void layout_probe(int* x) { x[0] = 1; }")
    try:
        compile_source(f"probe_{cname}.cu", [], arch=ARCH, source="\n".join(lines) + "\n",
                       use_disk_cache=False)
    except KernelCompileError as e:
        # NVRTC 13.0 (seen on the GPU machine, 2026-11-23) has no __builtin_offsetof; 13.5 has
        if '"__builtin_offsetof" is undefined' not in e.log:
            raise
        sizes = [lines[0], lines[1], lines[-1]]
        compile_source(f"probe_{cname}_size.cu", [], arch=ARCH, source="\n".join(sizes) + "\n",
                       use_disk_cache=False)
        pytest.skip(f"NVRTC {compiler.nvrtc_version()} has no __builtin_offsetof: only "
                    f"sizeof({cname}) was checked")


def test_importing_irlm_kernels_needs_no_cuda_python():
    # torch may import parts of cuda-python itself; irlm.kernels must add nothing to that
    code = ("import sys, torch; before = {m for m in sys.modules if m.startswith('cuda')}; "
            "import irlm, irlm.kernels, irlm.kernels.ops, irlm.kernels.nvrtc; "
            "new = {m for m in sys.modules if m.startswith('cuda')} - before; "
            "assert not new, sorted(new)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_shared_memory_matches_the_kernel():
    """kernels/src/ops.attention_smem_bytes must equal AttnSmem<...>::BYTES for every variant the
    launchers use (a cache of the model's dtype, int8 and fp8), and fit Hopper's 227 KiB per
    block."""
    import torch
    lines = ['#include "attention.cuh"']
    for dt in ops.FLOAT_DTYPES:
        for cache in (None,) + tuple(ops.KV_QUANT_CTYPES):
            carg = "" if cache is None else f", {ops.KV_QUANT_CTYPES[cache]}"
            for d in ops.ATTENTION_HEAD_DIMS:
                for decode in (True, False):
                    wm, wn = (1, 4) if decode else (4, 1)
                    bn = ops.attention_block_n(dt, d, decode)
                    n = ops.attention_smem_bytes(dt, d, decode, cache)
                    assert n <= 227 * 1024, (dt, cache, d, decode, n)
                    lines.append(f"static_assert(AttnSmem<{ops.CTYPES[dt]}, {d}, {wm}, {wn}, "
                                 f"{bn}{carg}>::BYTES == {n}, \"smem {dt} {cache} {d} "
                                 f"{decode}\");")
    lines.append("__global__ void smem_probe(int* x) { x[0] = 1; }")
    compile_source("smem_probe.cu", [], arch=ARCH, source="\n".join(lines) + "\n",
                   use_disk_cache=False)
    assert torch  # imported for the dtypes


# ---- programmatic dependent launch: every kernel waits before it touches memory -----------------
def _ptx(kernel) -> str:
    """The PTX of one kernel group for compute_90a (the SASS of the cubin has no stable
    spelling for the instructions checked below)."""
    nv = compiler._nvrtc()
    source = (compiler.KERNEL_DIR / kernel.filename).read_text()
    prog = compiler._check_nvrtc(nv.nvrtcCreateProgram(source.encode(), kernel.filename.encode(),
                                                       0, [], []), "nvrtcCreateProgram")
    try:
        for n in kernel.names:
            compiler._check_nvrtc(nv.nvrtcAddNameExpression(prog, n.encode()), "name")
        opts = [o.encode() for o in compiler.compile_options("compute_90a", kernel.fast_math)]
        assert nv.nvrtcCompileProgram(prog, len(opts), opts)[0] == nv.nvrtcResult.NVRTC_SUCCESS
        size = compiler._check_nvrtc(nv.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        buf = b" " * size
        compiler._check_nvrtc(nv.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
    finally:
        nv.nvrtcDestroyProgram(prog)
    return buf.rstrip(b"\0 ").decode()


MEMORY_ACCESS = ("ld.global", "st.global", "atom.", "red.", "ld.param.u64.ptr", "cp.async")


@pytest.mark.parametrize("kernel", KERNELS, ids=_kid)
def test_every_kernel_waits_on_its_predecessor_before_touching_memory(kernel):
    """irlm launches its kernels with programmatic stream serialization on sm_90+ (nvrtc.py):
    a kernel may start before the previous one has finished, so it must execute
    griddepcontrol.wait (pdl_enter, common.cuh) before any global load, store or atomic, and
    launch its dependents (griddepcontrol.launch_dependents); only L2 prefetches may come
    first."""
    ptx = _ptx(kernel)
    entries = ptx.split(".entry ")[1:]
    assert len(entries) == len(kernel.names)
    for body in entries:
        name = body.split("(", 1)[0]
        assert "griddepcontrol.launch_dependents" in body, name
        wait = body.find("griddepcontrol.wait")
        assert wait > 0, f"{name}: no griddepcontrol.wait"
        early = [ins for ins in MEMORY_ACCESS if 0 <= body.find(ins) < wait]
        assert not early, f"{name}: {early} before griddepcontrol.wait"
