"""Weight-only quantized GEMM on the tensor cores (W8A16 per-channel int8, W4A16 grouped int4
with zero points) for batches of 17 rows up to prefill chunks of thousands: the weight is
dequantized tile by tile in registers instead of into a bf16 copy for cuBLAS.

The kernel is written in Triton (:mod:`.quant_gemm_kernel`, imported lazily: Triton ships
with torch's CUDA builds, and nothing here needs it until a GEMM runs).  On CPU tensors the
same kernel runs in Triton's interpreter, which is how the tests check it without a GPU.

Launch configuration: fixed per range of M (:func:`gemm_config`), so that every kernel an
engine needs is compiled the first time its range runs (the CUDA runner's warm-up run before
each graph capture) and a capture never compiles or autotunes; ``benchmarks/quant_gemm.py
--sweep`` times the candidates on the device to revise the table.  Triton compiles one binary
per configuration, mode, group and dtype (M is not specialised).

Weights: int8 is read as stored (``i8 [N, K]``); int4 reads the stored ``u8 [N, K/2]`` and
the transposed ``[K/group, N]`` scales (f32) and zero points (u8) that
:func:`prepare_int4_scales` makes once at load.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from .nvrtc import KernelArgumentError

DTYPES = (torch.bfloat16, torch.float16)
#: the kernel indexes with 32-bit integers: every tensor it reads or writes stays below this
_INDEX_LIMIT = 1 << 31
#: up to this many rows (per mode) lowering/quant_linears.py runs this GEMM (above the GEMV /
#: tinygemm limits); above, dequantize + cuBLAS, whose extra pass over the weight costs little
#: next to a GEMM of that size while cuBLAS's bf16 GEMM is the faster MMA loop.  Measured with
#: ``benchmarks/quant_gemm.py`` on an H200 (Llama-3-8B's four linear shapes, 2026-12-04):
#: int8 was faster than dequantize + cuBLAS in sum over the shapes up to 256 rows (355 vs
#: 429 us) and slower at 512; int4 up to 64 rows (221 vs 357 us) and slower at 128
GEMM_MAX_M = {"int8": 256, "int4": 64}
#: the int4 groups the kernel takes (powers of two: a K tile holds part of one or whole groups)
GROUPS = (16, 32, 64, 128, 256)


class GemmConfig(NamedTuple):
    bm: int          # tokens per tile
    bn: int          # output features per tile
    bk: int          # input features per step (a power of two; split * bk divides K)
    swap: bool       # MMA on W_tile @ x_tile^T (features on the MMA's M side)
    warps: int
    stages: int      # software-pipelining depth
    split: int = 1   # programs per output tile, each over K / split input features

    def describe(self) -> str:
        return (f"{self.bm}x{self.bn}x{self.bk}{' swap' if self.swap else ''} "
                f"w{self.warps} s{self.stages}{f' k{self.split}' if self.split > 1 else ''}")


def available(device) -> tuple[bool, str]:
    """(True, "") when the kernel can run on ``device`` (a CUDA GPU of compute capability 8.0
    or newer, with Triton importable), else (False, why)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"{device} is not a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "needs compute capability 8.0 or newer (bf16 tensor cores)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"Triton is not importable ({e})"
    return True, ""


def supported(n: int, k: int, group: int = 0) -> bool:
    """Whether a weight of ``[N, K]`` (int4: with this group) fits the kernel."""
    if n < 16 or k < 16 or k % 16 or n * k >= _INDEX_LIMIT:
        return False
    return group == 0 or (group in GROUPS and k % group == 0)


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


def gemm_config(m: int, n: int, k: int, group: int = 0, sms: int = 132) -> GemmConfig:
    """The launch configuration for ``M`` rows against a ``[N, K]`` weight (int4: ``group``),
    on a GPU with ``sms`` multiprocessors.

    M <= 64 is bound by reading the weight: tokens go on the MMA's N side (16, 32 or 64 of
    them; ``swap``) against 128 output features, so that each x tile is re-read from L2 by
    few programs.  Above, the tiles of a compute-bound GEMM (64x128 up to
    128 rows, then 128x128 with 8 warps).  Where the tiles alone would leave multiprocessors
    idle (a 4096-wide output at small M: 32 tiles), K is split over up to 8 programs per tile
    (:func:`split_for`)."""
    if m <= 64:     # 8 warps: no register spills with int4 g32, wgmma not serialized
        cfg = GemmConfig(_pow2_at_least(m, 16), 128, 128, True, 8, 4)
    elif m <= 128:
        cfg = GemmConfig(64, 128, 64, False, 4, 4)
    else:
        cfg = GemmConfig(128, 128, 64, False, 8, 3)
    cfg = cfg._replace(split=split_for(m, n, k, cfg, sms))
    return fit_config(cfg, k)


def split_for(m: int, n: int, k: int, cfg: GemmConfig, sms: int) -> int:
    """The smallest power-of-two K split (at most 8, each part at least 4 K steps) that gives
    about one program per multiprocessor (7/8 of them); 1 where the tiles already do."""
    tiles = -(-m // cfg.bm) * -(-n // cfg.bn)
    split = 1
    while tiles * split < sms * 7 // 8 and split < 8 and k % (2 * split * cfg.bk) == 0 \
            and k // (2 * split) >= 4 * cfg.bk:
        split *= 2
    return split


#: the configurations ``benchmarks/quant_gemm.py --sweep`` times per shape and M (those with
#: ``bm`` up to twice M's power of two), each fitted to K (:func:`fit_config`)
CANDIDATES = (
    GemmConfig(16, 32, 256, True, 4, 4), GemmConfig(16, 64, 256, True, 4, 4),
    GemmConfig(16, 128, 128, True, 8, 4), GemmConfig(16, 128, 128, True, 8, 4, 4),
    GemmConfig(32, 32, 256, True, 4, 4), GemmConfig(32, 64, 256, True, 4, 4),
    GemmConfig(32, 64, 128, True, 4, 4, 2), GemmConfig(32, 128, 128, True, 8, 4),
    GemmConfig(32, 128, 128, True, 8, 4, 2), GemmConfig(32, 128, 128, True, 8, 4, 4),
    GemmConfig(32, 128, 128, True, 8, 6, 4), GemmConfig(64, 64, 128, True, 4, 4),
    GemmConfig(64, 128, 128, True, 8, 4), GemmConfig(64, 128, 128, True, 8, 4, 4),
    GemmConfig(64, 128, 64, False, 4, 4), GemmConfig(64, 128, 64, False, 4, 4, 2),
    GemmConfig(64, 256, 64, False, 8, 3), GemmConfig(128, 128, 64, False, 8, 3),
    GemmConfig(128, 128, 64, False, 8, 3, 2), GemmConfig(128, 128, 64, False, 8, 4),
    GemmConfig(128, 256, 64, False, 8, 3),
)


def fit_config(cfg: GemmConfig, k: int) -> GemmConfig:
    """``cfg`` with the split halved until 16 * split divides K, then BK halved until
    split * BK does."""
    split, bk = cfg.split, cfg.bk
    while split > 1 and k % (16 * split):
        split //= 2
    while k % (bk * split):
        bk //= 2
    return cfg._replace(bk=bk, split=split)


# ---- load-time weight transform ------------------------------------------------------------------
def prepare_int4_scales(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """irlm's ``[N, K/group]`` scales and zero points -> ``[K/group, N]`` f32 and u8, the
    layout the kernel reads (one contiguous row per K tile)."""
    return scales.float().t().contiguous(), zeros.to(torch.uint8).t().contiguous()


# ---- launchers -----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _kernel(interpret: bool):
    from . import quant_gemm_kernel as src
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(src.wo_gemm)
    import triton
    return triton.jit(src.wo_gemm, do_not_specialize=["M"])


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise KernelArgumentError(f"x must be a 2-d bfloat16/float16 tensor, got "
                                  f"{x.dtype} {tuple(x.shape)}")
    if x.shape[1] != k:
        raise KernelArgumentError(f"x has {x.shape[1]} features, the weight {k}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    return x


def _check_bias(bias, x, n):
    if bias is None:
        return None
    if bias.dtype != x.dtype or tuple(bias.shape) != (n,) or bias.device != x.device:
        raise KernelArgumentError(f"bias must be {x.dtype} [{n}] on {x.device}, got "
                                  f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    return bias.contiguous()


def w8a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               bias: Optional[torch.Tensor] = None,
               config: Optional[GemmConfig] = None) -> torch.Tensor:
    """quant.linear{mode=int8}: ``x [M, K] @ (qweight i8 [N, K] * scales f32 [N, 1])^T
    (+ bias)`` in x's dtype, fp32 accumulation."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8 or not qweight.is_contiguous():
        raise KernelArgumentError(f"qweight must be a contiguous i8 [N, K] tensor, got "
                                  f"{qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    x = _check_x(x, k)
    if scales.dtype != torch.float32 or tuple(scales.shape) != (n,) \
            or not scales.is_contiguous():
        raise KernelArgumentError(f"scales must be contiguous f32 [{n}], got {scales.dtype} "
                                  f"{tuple(scales.shape)}")
    if not supported(n, k):
        raise KernelArgumentError(f"the weight-only GEMM needs N >= 16 and K % 16 == 0, got "
                                  f"[{n}, {k}]")
    return _launch(x, qweight, scales, scales, _check_bias(bias, x, n), n, k, 0, config)


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor,
               zeros_t: torch.Tensor, group: int, bias: Optional[torch.Tensor] = None,
               config: Optional[GemmConfig] = None) -> torch.Tensor:
    """quant.linear{mode=int4}: x [M, K] times irlm's packed int4 weight ``qweight u8
    [N, K/2]`` with the transposed scales ``f32 [K/group, N]`` and zero points ``u8
    [K/group, N]`` (:func:`prepare_int4_scales`), in x's dtype."""
    if qweight.dim() != 2 or qweight.dtype != torch.uint8 or not qweight.is_contiguous():
        raise KernelArgumentError(f"qweight must be a contiguous u8 [N, K/2] tensor, got "
                                  f"{qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    x = _check_x(x, k)
    if not supported(n, k, group) or group == 0:
        raise KernelArgumentError(f"the int4 GEMM needs N >= 16, K % 16 == 0 and a group of "
                                  f"{'/'.join(map(str, GROUPS))} dividing K, got [{n}, {k}] "
                                  f"group {group}")
    want = (k // group, n)
    if scales_t.dtype != torch.float32 or zeros_t.dtype != torch.uint8 \
            or tuple(scales_t.shape) != want or tuple(zeros_t.shape) != want \
            or not (scales_t.is_contiguous() and zeros_t.is_contiguous()):
        raise KernelArgumentError(f"scales_t / zeros_t must be contiguous f32 / u8 {list(want)} "
                                  f"(prepare_int4_scales), got {scales_t.dtype} "
                                  f"{tuple(scales_t.shape)} / {zeros_t.dtype} "
                                  f"{tuple(zeros_t.shape)}")
    return _launch(x, qweight, scales_t, zeros_t, _check_bias(bias, x, n), n, k, group, config)


def _launch(x, q, s, z, bias, n, k, group, config):
    dev = x.device
    for name, t in (("qweight", q), ("scales", s), ("zeros", z)):
        if t.device != dev:
            raise KernelArgumentError(f"{name} is on {t.device}, x on {dev}")
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=dev)
    if m == 0:
        return out
    interpret = dev.type == "cpu"
    if config is None:
        config = gemm_config(m, n, k, group, 132 if interpret else _sm_count(dev.index or 0))
    elif config.bk < 16 or config.bk & (config.bk - 1) or config.split < 1:
        raise KernelArgumentError(f"config {config.describe()}: BK must be a power of two of "
                                  f"at least 16, split at least 1")
    if k % (config.bk * config.split):
        raise KernelArgumentError(f"config {config.describe()}: split * BK must divide K ({k})")
    if m * max(n * config.split, x.stride(0)) >= _INDEX_LIMIT:
        raise KernelArgumentError(f"{m} rows against a [{n}, {k}] weight overflow the kernel's "
                                  f"32-bit indexing; split the rows")
    tiles = -(-m // config.bm) * -(-n // config.bn)
    if config.split > 1:
        if tiles > LOCKS:
            raise KernelArgumentError(f"config {config.describe()}: {tiles} tiles; a K split "
                                      f"takes at most {LOCKS}")
        ws = torch.empty(config.split, m, n, dtype=torch.float32, device=dev)
        locks = split_locks(dev)
    else:
        ws, locks = s, z                          # not read
    launch = {} if interpret else {"num_warps": config.warps, "num_stages": config.stages}
    _kernel(interpret)[(tiles, config.split)](
        x, q, s, z, bias if bias is not None else s, out, ws, locks, m, n, k, x.stride(0),
        out.stride(0), INT4=group > 0, GROUP=group or 1, HAS_BIAS=bias is not None,
        BM=config.bm, BN=config.bn, BK=config.bk, SWAP=config.swap, SPLIT_K=config.split,
        GROUP_M=8, INTERPRET=interpret, **launch)
    return out


#: the per-tile counters of K-split launches (one buffer per device, zero between launches)
LOCKS = 1 << 16
_LOCKS: dict = {}


def split_locks(device) -> torch.Tensor:
    """The device's counter buffer for K-split launches, allocated (zeroed) on first use: call
    it before capturing a CUDA graph (the plan does, at load) so that it is not allocated in
    a graph's memory pool."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _LOCKS:
        _LOCKS[key] = torch.zeros(LOCKS, dtype=torch.int32, device=device)
    return _LOCKS[key]



# ---- ahead-of-time compilation (no GPU needed) ---------------------------------------------------
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_for(capability: int, config: GemmConfig, group: int = 0,
                dtype: torch.dtype = torch.bfloat16, bias: bool = False):
    """Compile the kernel for a CUDA compute capability (90: sm_90a) with Triton's own
    compiler and ptxas, without a GPU, specialised as a launch on real weights would be
    (16-byte aligned pointers, N, K and the row strides multiples of 16; M not specialised).
    Returns Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _kernel(False)
    t = _TRITON_TYPES[dtype]
    sig = {"x_ptr": f"*{t}", "q_ptr": "*u8" if group else "*i8", "s_ptr": "*fp32",
           "z_ptr": "*u8" if group else "*fp32", "b_ptr": f"*{t}" if bias else "*fp32",
           "o_ptr": f"*{t}", "ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_om": "i32"}
    consts = {"INT4": group > 0, "GROUP": group or 1, "HAS_BIAS": bias, "BM": config.bm,
              "BN": config.bn, "BK": config.bk, "SWAP": config.swap, "SPLIT_K": config.split,
              "GROUP_M": 8, "INTERPRET": False}
    sig.update({name: "constexpr" for name in consts})
    aligned = [i for i, name in enumerate(fn.arg_names)
               if name not in consts and name != "M"]
    src = ASTSource(fn, sig, consts, {(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.warps, "num_stages": config.stages})
