"""kernels/CMakeLists.txt builds libirlm_kernels.so from the same sources and the same
template instantiations as the NVRTC path.

CPU (CI: nvcc and cmake are on every machine): configure + build for sm_90a, load the library
with ctypes, and compare its kernel table with irlm.kernels.ops.all_kernels()'s name
expressions.  GPU (the device): the GPU kernel tests (tests/test_kernels_gpu.py) run again with
every launch routed through the library's C ABI (tests/kernel_library_launch.py), so each
entry point is checked against the same oracles as the NVRTC-compiled kernel.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory) -> Path:
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc and cmake are needed to build kernels/CMakeLists.txt")
    build = tmp_path_factory.mktemp("kernels-build")
    cfg = subprocess.run(["cmake", "-S", str(ROOT / "kernels"), "-B", str(build),
                          "-DCMAKE_CUDA_ARCHITECTURES=90a",
                          f"-DPython3_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    assert "building libirlm_kernels.so alone" in cfg.stdout or "TensorRT found" in cfg.stdout
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    b = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True,
                       text=True, timeout=1200)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    lib = build / "libirlm_kernels.so"
    assert lib.is_file()
    return lib


@pytest.mark.slow
def test_library_holds_every_kernel_the_nvrtc_path_compiles(kernel_library):
    from irlm.kernels.ops import all_kernels
    lib = ctypes.CDLL(str(kernel_library))
    lib.irlm_kernel_name.restype = ctypes.c_char_p
    lib.irlm_kernel_function.restype = ctypes.c_void_p
    lib.irlm_kernel_function.argtypes = [ctypes.c_char_p]
    lib.irlm_launch_kernel.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
        ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
    assert lib.irlm_kernels_abi_version() == 1
    names = [lib.irlm_kernel_name(i).decode() for i in range(lib.irlm_kernel_count())]
    want = {n for k in all_kernels() for n in k.names}
    assert len(names) == len(set(names))
    assert set(names) == want
    for n in names:
        assert lib.irlm_kernel_function(n.encode())
    assert lib.irlm_kernel_function(b"irlm_no_such_kernel<float>") is None
    assert lib.irlm_launch_kernel(b"irlm_no_such_kernel<float>", 1, 1, 1, 1, 1, 1, 0,
                                  None, None) == -1


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_kernel_tests_pass_through_the_library(kernel_library, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    count = tmp_path / "launches"
    env = dict(os.environ, IRLM_TEST_KERNEL_LIBRARY=str(kernel_library),
               IRLM_TEST_KERNEL_LAUNCHES=str(count),
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "kernel_library_launch",
                        str(ROOT / "tests" / "test_kernels_gpu.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert int(count.read_text()) > 0


# ---- irlm_paged_attention: the C++ launch logic of irlm.kernels.ops.paged_attention ------------
def test_paged_attention_c_structs_match_the_ctypes_mirrors(tmp_path):
    """kernels/capi/irlm_paged_attention.h against irlm.kernels.capi, checked by the C++
    compiler: sizes, every field's offset, and the enum values."""
    from irlm.kernels import capi
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lines = ['#include "irlm_paged_attention.h"', "#include <cstddef>"]
    for cname, cls in capi.STRUCTS:
        lines.append(f'static_assert(sizeof({cname}) == {ctypes.sizeof(cls)}, "sizeof {cname}");')
        for name, _ in cls._fields_:
            off = getattr(cls, name).offset
            lines.append(f'static_assert(offsetof({cname}, {name}) == {off}, '
                         f'"{cname}.{name} is not at byte {off}");')
    enums = {"IRLM_DTYPE_F32": capi.DTYPES[torch_dtype("float32")],
             "IRLM_DTYPE_F16": capi.DTYPES[torch_dtype("float16")],
             "IRLM_DTYPE_BF16": capi.DTYPES[torch_dtype("bfloat16")],
             "IRLM_DTYPE_I8": capi.DTYPES[torch_dtype("int8")],
             "IRLM_DTYPE_F8E4M3": capi.DTYPES[torch_dtype("float8_e4m3fn")],
             "IRLM_PA_OK": capi.OK, "IRLM_PA_INVALID": capi.INVALID,
             "IRLM_PA_UNSUPPORTED": capi.UNSUPPORTED, "IRLM_PA_WORKSPACE": capi.WORKSPACE,
             "IRLM_PA_INTERNAL": capi.INTERNAL, "IRLM_PA_MAX_ALIBI_HEADS": capi.MAX_ALIBI_HEADS}
    lines += [f'static_assert({k} == {v}, "{k}");' for k, v in enums.items()]
    probe = tmp_path / "probe.cpp"
    probe.write_text("\n".join(lines) + "\n")
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{ROOT / 'kernels' / 'capi'}",
                        str(probe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def torch_dtype(name):
    import torch
    return getattr(torch, name)


_FAKE = 1 << 20   # fake, 256-byte aligned device addresses for host-only plans


def _plan_args(dtype, D, H, KV, bs, T, R, *, window=0, max_q=0, max_kv=0, max_blocks=64,
               decode=-1, sms=132, k_stride=0, k_misalign=0, alibi=False, cache=None):
    from irlm.kernels import capi
    a = capi.IrlmPagedAttentionArgs()
    a.query, a.key, a.value, a.kv_cache = _FAKE, _FAKE * 2 + k_misalign, _FAKE * 3, _FAKE * 4
    a.block_tables, a.q_lens, a.cached_lens, a.out = _FAKE * 5, _FAKE * 6, _FAKE * 7, _FAKE * 8
    a.key_stride = k_stride
    a.num_tokens, a.num_reqs, a.heads, a.kv_heads, a.head_dim = T, R, H, KV, D
    a.layers, a.num_blocks, a.block_size, a.max_blocks, a.layer = 3, 500, bs, max_blocks, 2
    a.dtype = a.cache_dtype = capi.DTYPES[dtype]
    if cache is not None:   # an int8 / fp8 cache with its scales
        a.cache_dtype, a.kv_scale_k, a.kv_scale_v = capi.DTYPES[cache], 0.03, 0.02
    a.sliding_window, a.max_q_len, a.max_kv_len, a.decode, a.num_sms = (window, max_q, max_kv,
                                                                         decode, sms)
    if alibi:
        slopes = (ctypes.c_float * H)(*[0.5] * H)
        a.alibi_slopes, a.num_alibi_slopes = ctypes.addressof(slopes), H
        a._keep = slopes
    return a


_PLAN_CASES = [
    # dtype, D, H, KV, bs, tokens, reqs, window, max_q_len, max_kv_len, sms, k stride, misalign
    ("bfloat16", 128, 32, 8, 16, 9, 9, 0, 0, 0, 132, 0, 0),          # decode, shape bounds
    ("bfloat16", 128, 32, 8, 16, 9, 9, 0, 0, 2048, 132, 0, 0),       # decode, given bound
    ("float16", 64, 12, 4, 64, 3, 3, 0, 0, 777, 108, 0, 0),          # G = 3
    ("float32", 256, 16, 8, 64, 2, 2, 0, 0, 513, 132, 0, 0),
    ("bfloat16", 128, 32, 1, 16, 1, 1, 0, 0, 100, 132, 0, 0),        # MQA: two row tiles, short
    ("bfloat16", 128, 8, 2, 16, 7, 7, 37, 0, 3001, 132, 0, 0),       # sliding window
    ("bfloat16", 128, 64, 8, 16, 256, 256, 0, 0, 4096, 132, 0, 0),   # a big decode batch
    ("bfloat16", 128, 8, 1, 16, 1, 1, 0, 0, 16384, 132, 0, 0),       # the most partitions (64)
    ("bfloat16", 128, 32, 8, 16, 435, 7, 0, 200, 0, 132, 0, 0),      # prefill
    ("float16", 64, 8, 8, 32, 204, 4, 0, 0, 0, 132, 0, 0),           # prefill, max_q = tokens
    ("float32", 128, 16, 4, 16, 158, 4, 0, 90, 290, 132, 0, 0),
    ("bfloat16", 256, 8, 1, 64, 188, 3, 16, 120, 0, 132, 0, 0),
    ("bfloat16", 128, 16, 4, 16, 100, 3, 0, 70, 0, 132, 3072, 0),    # fused-qkv key stride
    ("float16", 128, 16, 4, 16, 100, 3, 0, 70, 0, 132, 0, 2),        # misaligned key: VEC 1
    ("float32", 64, 4, 1, 16, 43, 3, 0, 40, 0, 132, 130, 0),         # key stride % 4 != 0
    # int8 / fp8 caches (a 14th field: the cache dtype)
    ("bfloat16", 128, 32, 8, 16, 9, 9, 0, 0, 2048, 132, 0, 0, "int8"),        # decode, split
    ("bfloat16", 128, 8, 1, 16, 1, 1, 0, 0, 16384, 132, 0, 0, "float8_e4m3fn"),
    ("float16", 64, 12, 4, 64, 3, 3, 0, 0, 777, 108, 0, 0, "float8_e4m3fn"),
    ("float32", 256, 16, 8, 64, 2, 2, 0, 0, 513, 132, 0, 0, "int8"),
    ("bfloat16", 128, 32, 8, 16, 435, 7, 0, 200, 0, 132, 0, 0, "int8"),       # prefill
    ("bfloat16", 256, 8, 1, 64, 188, 3, 16, 120, 0, 132, 0, 0, "float8_e4m3fn"),
    ("float16", 128, 16, 4, 16, 100, 3, 0, 70, 0, 132, 0, 2, "int8"),         # VEC 1 write
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _PLAN_CASES,
                         ids=[f"{c[0]}-d{c[1]}-t{c[5]}r{c[6]}-{i}" + (f"-{c[13]}" if c[13:] else "")
                              for i, c in enumerate(_PLAN_CASES)])
def test_paged_attention_plans_follow_the_python_launchers(kernel_library, case):
    """The kernels, grids, shared memory and split-KV partitions irlm_paged_attention picks are
    the ones irlm.kernels.ops.paged_attention picks for the same shapes and bounds (the two
    launch paths kept in step), every one of them is in the library's table, and the workspace
    query bounds what any smaller batch uses."""
    from irlm.kernels import capi, ops
    dt_name, D, H, KV, bs, T, R, window, max_q, max_kv, sms, k_stride, mis, *cache = case
    dt = torch_dtype(dt_name)
    cdt = torch_dtype(cache[0]) if cache else None
    lib = capi.PagedAttentionLibrary(kernel_library)
    lib.lib.irlm_kernel_function.restype = ctypes.c_void_p
    lib.lib.irlm_kernel_function.argtypes = [ctypes.c_char_p]
    a = _plan_args(dt, D, H, KV, bs, T, R, window=window, max_q=max_q, max_kv=max_kv, sms=sms,
                   k_stride=k_stride, k_misalign=mis, cache=cdt)
    ws = lib.workspace_size(a)
    plan = lib.plan(a, ws)
    for launch in (plan.kv_write, plan.attention, plan.split_reduce):
        if launch.kernel is not None:
            assert lib.lib.irlm_kernel_function(launch.kernel), launch.kernel
    # ops.kv_cache_write's variant choice
    vec = 16 // torch_dtype_size(dt)
    ks = k_stride or KV * D
    vec_ok = (KV * D) % vec == 0 and ks % vec == 0 and mis % 16 == 0
    assert plan.kv_write.kernel.decode() == \
        ops.kv_write_kernel(dt, cdt).names[0 if vec_ok else 1]
    assert (tuple(plan.kv_write.grid), tuple(plan.kv_write.block)) == ((T, 1, 1), (128, 1, 1))
    G = H // KV
    if T == R:   # ops.paged_attention_decode
        kv_len = max_kv or 64 * bs
        kv_len = min(kv_len, window) if window else kv_len
        tiles = -(-G // 16)
        bn = ops.attention_block_n(dt, D, True)
        splits, size = ops.choose_splits(R * KV * tiles, kv_len, bn, sms)
        assert plan.decode == 1
        assert (plan.num_splits, plan.split_size) == (splits, size)
        names = ops.decode_kernel(dt, D, cdt).names
        assert plan.attention.kernel.decode() == names[0]
        assert tuple(plan.attention.grid) == (tiles * splits, KV, R)
        assert plan.attention.shared_mem_bytes == ops.attention_smem_bytes(dt, D, True, cdt)
        if splits > 1:
            assert plan.split_reduce.kernel.decode() == names[1]
            assert tuple(plan.split_reduce.grid) == (H, R, 1)
        else:
            assert plan.split_reduce.kernel is None
    else:        # ops.prefill_attention
        assert plan.decode == 0 and plan.num_splits == 1 and plan.split_reduce.kernel is None
        assert plan.attention.kernel.decode() == ops.prefill_kernel(dt, D, cdt).names[0]
        assert tuple(plan.attention.grid) == (-(-(max_q or T) * G // 64), KV, R)
        assert plan.attention.shared_mem_bytes == ops.attention_smem_bytes(dt, D, False, cdt)
    assert tuple(plan.attention.block) == (128, 1, 1)
    # the workspace query holds any smaller batch's plan; a small workspace means fewer splits
    kv_top = max_kv or 64 * bs
    for r in sorted(x for x in {1, 2, 3, R // 2, R - 1, R} if 0 < x <= R):
        for kv in sorted(x for x in {kv_top, kv_top - 100, kv_top // 2 + 5, 1000, 129}
                         if 0 < x <= kv_top):
            small = _plan_args(dt, D, H, KV, bs, r if T == R else T, r, window=window,
                               max_q=max_q, max_kv=kv, sms=sms, k_stride=k_stride, cache=cdt)
            assert lib.plan(small, ws).workspace_bytes + 256 <= ws
            assert lib.workspace_size(small) <= ws
    if plan.num_splits > 1:
        tight = lib.plan(a, plan.workspace_bytes - 1)   # no alignment slack: one split less
        assert 1 <= tight.num_splits < plan.num_splits
        assert lib.plan(a, 2048).num_splits == 1


def torch_dtype_size(dt):
    import torch
    return torch.empty((), dtype=dt).element_size()


@pytest.mark.slow
def test_paged_attention_refuses_what_has_no_kernel_with_a_reason(kernel_library):
    from irlm.kernels import capi
    from irlm.kernels.nvrtc import KernelArgumentError
    lib = capi.PagedAttentionLibrary(kernel_library)
    bf16 = torch_dtype("bfloat16")

    def refused(why, **change):
        a = _plan_args(bf16, 128, 32, 8, 16, 40, 4, max_q=10)
        for k, v in change.items():
            setattr(a, k, v)
        with pytest.raises(KernelArgumentError, match=why):
            lib.plan(a, 1 << 30)
        rc = lib.lib.irlm_paged_attention(ctypes.byref(a), None, 0, None)
        assert rc in (capi.INVALID, capi.UNSUPPORTED) and why.split()[0] in lib.error()

    refused("the i8 kv_cache needs kv_scales", cache_dtype=capi.DTYPES[torch_dtype("int8")])
    refused("the f8e4m3 kv_cache needs kv_scales", kv_scale_k=0.5, kv_scale_v=0.0,
            cache_dtype=capi.DTYPES[torch_dtype("float8_e4m3fn")])
    refused("kv_cache dtype f16 differs from bf16",
            cache_dtype=capi.DTYPES[torch_dtype("float16")])
    refused("kv_scales are for an i8", kv_scale_k=0.5, kv_scale_v=0.5)
    refused("head_dim 72 has no attention kernel", head_dim=72)
    refused("32 query heads are not a multiple of 5 kv heads", kv_heads=5)
    refused("decode takes one query per request", decode=1)
    refused("block_size must be a power of two", block_size=24)
    refused("layer 3 is outside", layer=3)
    refused("sliding_window must be >= 0", sliding_window=-1)
    refused("7 alibi slopes for 32 heads", num_alibi_slopes=7, alibi_slopes=_FAKE)
    refused("q must be 16-byte aligned", query=_FAKE + 8)
    refused("kv_cache must be 16-byte aligned", kv_cache=_FAKE + 4)
    refused("a tensor pointer is NULL", out=None)
    # a valid call with too small a workspace is refused before any launch (no device needed)
    a = _plan_args(bf16, 128, 32, 8, 16, 40, 4, max_q=10, alibi=True)
    rc = lib.lib.irlm_paged_attention(ctypes.byref(a), None, 0, None)
    assert rc == capi.WORKSPACE and "workspace" in lib.error()


def _attn_case(seqs, H, KV, D, bs, dtype, seed, fused_qkv=False):
    """seqs: [(q_len, cached_len)]; block ids a random permutation, unused table entries random
    valid blocks, the cache (2 layers) full of random values (as tests/test_kernels_gpu.py)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-(n + c) // bs) for n, c in seqs]
    R, total = len(seqs), sum(nblk) + 3
    perm = torch.randperm(total, generator=g).to(torch.int32)
    tables = torch.randint(0, total, (R, max(nblk) + 2), generator=g, dtype=torch.int32)
    at = 0
    for r, n in enumerate(nblk):
        tables[r, :n] = perm[at:at + n]
        at += n
    T = sum(n for n, _ in seqs)
    if fused_qkv:   # q, k, v as strided views of one projection
        qkv = torch.randn(T, (H + 2 * KV) * D, generator=g).to(dtype)
        q = qkv[:, :H * D].view(T, H, D)
        k = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
        v = qkv[:, (H + KV) * D:].view(T, KV, D)
    else:
        q = (torch.randn(T, H, D, generator=g) * 1.5).to(dtype)
        k = torch.randn(T, KV, D, generator=g).to(dtype)
        v = torch.randn(T, KV, D, generator=g).to(dtype)
    return dict(q=q, k=k, v=v, cache=torch.randn(2, total, 2, bs, KV, D, generator=g).to(dtype),
                tables=tables, q_lens=torch.tensor([n for n, _ in seqs], dtype=torch.int32),
                cached=torch.tensor([c for _, c in seqs], dtype=torch.int32))


_GPU_CASES = [
    # id, dtype, head_dim, heads, kv_heads, block_size, [(q_len, cached_len)], window, alibi,
    # extra arguments (bounds, forced splits, strided views, scale)
    ("prefill-cached-prefix", "bfloat16", 128, 32, 8, 16,
     [(37, 0), (1, 0), (128, 0), (200, 50), (1, 77), (64, 64), (5, 300)], 0, False, {}),
    ("prefill-fp16-bound", "float16", 64, 8, 8, 32, [(100, 0), (33, 31), (1, 5), (70, 130)],
     0, False, {"max_q_len": 100, "max_kv_len": 200}),
    ("prefill-f32-gqa", "float32", 128, 16, 4, 16, [(50, 0), (17, 16), (1, 1), (90, 200)],
     0, False, {}),
    ("prefill-window-alibi", "bfloat16", 64, 8, 4, 16, [(60, 0), (1, 70), (100, 25), (9, 9)],
     50, True, {}),
    ("prefill-d256-mqa-window", "bfloat16", 256, 8, 1, 64, [(65, 0), (3, 62), (120, 10)],
     16, False, {}),
    ("prefill-fused-qkv-scale", "bfloat16", 128, 16, 4, 16, [(33, 0), (1, 12), (70, 64)],
     0, False, {"fused_qkv": True, "scale": 0.05}),
    ("decode-batch", "bfloat16", 128, 32, 8, 16,
     [(1, c) for c in (0, 1, 15, 16, 17, 100, 511, 1000, 2047)], 0, False, {}),
    ("decode-fp16-g3-bound", "float16", 64, 12, 4, 64, [(1, 0), (1, 129), (1, 777)], 0, False,
     {"max_kv_len": 778}),
    ("decode-f32-long-split", "float32", 128, 16, 4, 16, [(1, 4095), (1, 9000), (1, 16383)],
     0, False, {}),
    ("decode-window-alibi", "bfloat16", 128, 8, 2, 16,
     [(1, c) for c in (0, 20, 36, 37, 38, 500, 3000)], 37, True, {}),
    ("decode-alibi-forced-splits", "float16", 128, 32, 8, 16,
     [(1, c) for c in (0, 3, 200, 1000, 2500, 64, 8191)], 0, True, {"num_splits": 13}),
    ("decode-mqa-d256", "bfloat16", 256, 32, 1, 16, [(1, 9), (1, 333), (1, 1024)], 0, False, {}),
    ("decode-fused-qkv-small-workspace", "bfloat16", 128, 16, 4, 16,
     [(1, 40), (1, 7), (1, 3000)], 0, False, {"fused_qkv": True, "workspace": 4096}),
    # int8 / fp8 caches (random 8-bit prefixes; kv_scales as quantize-kv-cache makes them)
    ("decode-int8-split", "bfloat16", 128, 32, 8, 16,
     [(1, c) for c in (0, 17, 511, 4000)], 0, False, {"kv_cache": "int8"}),
    ("decode-fp8-window-alibi", "float16", 128, 8, 2, 16,
     [(1, c) for c in (0, 20, 36, 37, 38, 500, 3000)], 37, True, {"kv_cache": "float8_e4m3fn"}),
    ("prefill-fp8-cached-prefix", "bfloat16", 128, 32, 8, 16,
     [(37, 0), (1, 0), (200, 50), (5, 300)], 0, False, {"kv_cache": "float8_e4m3fn"}),
    ("prefill-int8-f32-gqa", "float32", 64, 16, 4, 16, [(50, 0), (17, 16), (1, 1), (90, 200)],
     0, False, {"kv_cache": "int8"}),
]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", _GPU_CASES, ids=[c[0] for c in _GPU_CASES])
def test_gpu_irlm_paged_attention_matches_the_reference(kernel_library, case):
    """irlm_paged_attention (the C call the TensorRT plugin makes), loaded with ctypes, against
    llm.paged_attention's registry reference (float32 on the CPU) for the output and
    irlm.ops.llm.write_kv for the cache (bit for bit); the output starts as NaN."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from irlm.kernels import capi
    from irlm.ops.llm import kv_to_cache, write_kv
    from irlm.registry import get_op_def
    name, dt_name, D, H, KV, bs, seqs, window, alibi, extra = case
    dt = torch_dtype(dt_name)
    extra = dict(extra)
    fused, scale, ws_bytes, kv = (extra.pop("fused_qkv", False), extra.pop("scale", None),
                                  extra.pop("workspace", None), extra.pop("kv_cache", None))
    c = _attn_case(seqs, H, KV, D, bs, dt, seed=len(name) * 7 + D + H, fused_qkv=fused)
    slopes = [2 ** (-8 * (i + 1) / H) for i in range(H)] if alibi else []
    layer = 1
    scales = ()
    if kv is not None:   # the cache as int8 / fp8 codes, written with these scales
        cdt = torch_dtype(kv)
        qmax = 127.0 if cdt == torch.int8 else 448.0
        scales = (3.5 / qmax, 3.0 / qmax)
        codes = c["cache"].float()
        for i in (0, 1):
            codes[:, :, i] = kv_to_cache(codes[:, :, i], cdt, scales[i]).float()
        c["cache"] = codes.to(cdt)
        extra["kv_scales"] = scales
    exp_cache = c["cache"].clone()
    write_kv(exp_cache, layer, c["k"], c["v"], c["tables"], c["q_lens"], c["cached"],
             scales or (1.0, 1.0))
    one_layer = c["cache"][layer:layer + 1]
    ref = get_op_def("llm.paged_attention").run_reference(
        [c["q"].float(), c["k"].float(), c["v"].float(),
         one_layer.clone() if scales else one_layer.float(), c["tables"], c["q_lens"],
         c["cached"]],
        {"layer": 0, "scale": scale, "sliding_window": window, "alibi_slopes": tuple(slopes),
         "kv_scales": scales})[0]

    lib = capi.PagedAttentionLibrary(kernel_library)
    dev = torch.device("cuda")
    if fused:   # keep the strided views on the device
        T = c["q"].shape[0]
        qkv = torch.cat([c["q"].reshape(T, -1), c["k"].reshape(T, -1), c["v"].reshape(T, -1)],
                        1).to(dev)
        q = qkv[:, :H * D].view(T, H, D)
        k = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
        v = qkv[:, (H + KV) * D:].view(T, KV, D)
        assert q.stride(0) == (H + 2 * KV) * D
    else:
        q, k, v = (c[n].to(dev) for n in ("q", "k", "v"))
    cache, tables, q_lens, cached = (c[n].to(dev) for n in ("cache", "tables", "q_lens",
                                                            "cached"))
    out = torch.full(q.shape, float("nan"), dtype=dt, device=dev)
    if ws_bytes is None:
        lib.paged_attention(q, k, v, cache, tables, q_lens, cached, layer, scale=scale,
                            sliding_window=window, alibi_slopes=slopes, out=out, **extra)
    else:   # a workspace too small for the chosen partitions: fewer of them, same answer
        sl = (ctypes.c_float * H)(*slopes) if slopes else None
        args = capi.tensor_args(q, k, v, cache, tables, q_lens, cached, out, layer, scale=scale,
                                sliding_window=window, alibi_slopes=sl, **extra)
        assert lib.plan(args, lib.workspace_size(args)).num_splits > 1
        assert lib.plan(args, ws_bytes).num_splits == 1
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        rc = lib.lib.irlm_paged_attention(ctypes.byref(args), ws.data_ptr() + 1, ws_bytes - 1,
                                          torch.cuda.current_stream().cuda_stream)
        assert rc == 0, lib.error()
    torch.cuda.synchronize()
    assert torch.equal(cache.cpu().view(torch.uint8), exp_cache.view(torch.uint8)), \
        "cache after the k/v write differs"
    tol = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3, torch.float32: 3e-3}[dt]
    o, r = out.double().cpu(), ref.double()
    assert torch.isfinite(o).all(), "unwritten (NaN) outputs"
    err = ((o - r).norm() / r.norm()).item()
    assert err < tol, err


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_irlm_paged_attention_replays_in_a_cuda_graph(kernel_library):
    """The call never synchronises: captured once in a CUDA graph (as TensorRT or a runtime
    would), replays with new lengths in the same buffers give the reference's answers."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from irlm.kernels import capi
    from irlm.registry import get_op_def
    H, KV, D, bs = 16, 4, 128, 16
    c = _attn_case([(1, 100), (1, 2000), (1, 5)], H, KV, D, bs, torch.bfloat16, seed=3)
    lib = capi.PagedAttentionLibrary(kernel_library)
    d = {n: c[n].cuda() for n in ("q", "k", "v", "cache", "tables", "q_lens", "cached")}
    out = torch.empty_like(d["q"])
    args = capi.tensor_args(d["q"], d["k"], d["v"], d["cache"], d["tables"], d["q_lens"],
                            d["cached"], out, 0)
    ws = torch.empty(lib.workspace_size(args), dtype=torch.uint8, device="cuda")
    s = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            rc = lib.lib.irlm_paged_attention(ctypes.byref(args), ws.data_ptr(), ws.numel(),
                                              s.cuda_stream)
    assert rc == 0, lib.error()
    for cached in ([100, 2000, 5], [101, 7, 2040]):
        d["cached"].copy_(torch.tensor(cached, dtype=torch.int32))
        before = d["cache"][0:1].float().cpu()
        graph.replay()
        torch.cuda.synchronize()
        ref = get_op_def("llm.paged_attention").run_reference(
            [c["q"].float(), c["k"].float(), c["v"].float(), before, c["tables"], c["q_lens"],
             torch.tensor(cached, dtype=torch.int32)],
            {"layer": 0, "scale": None, "sliding_window": 0, "alibi_slopes": ()})[0]
        o = out.double().cpu()
        assert ((o - ref.double()).norm() / ref.double().norm()).item() < 1.2e-2
