"""The Triton source of the weight-only quantized GEMM (launcher: :mod:`.quant_gemm`).

Imported only by the launcher, and only where Triton is installed (it ships with torch's CUDA
builds; CI has no GPU and may not have it): nothing else in irlm imports this module.

``out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])`` with ``W`` dequantized tile by tile in
registers, multiplied on the tensor cores (``tl.dot``: wgmma on sm_90 where the tile allows,
else mma.sync), accumulated in fp32 and rounded to x's dtype once:

* int8 (``INT4 = False``): ``q i8 [N, K]`` row-major as stored; the tile is converted to x's
  dtype exactly (integers up to 127 are exact in bf16 and fp16) and the per-channel scale
  multiplies the fp32 sums in the epilogue, so the only roundings are the MMA's.
* int4 (``INT4 = True``): ``q u8 [N, K/2]`` as stored (element 2j in the low nibble), split
  into nibbles and interleaved back into k order in registers; the scales and zero points
  come transposed, ``[K/group, N]`` (f32 and u8, a load-time copy), so one tile's are a
  contiguous row: ``(q - z) * s`` in fp32 rounded to x's dtype, the reference op's
  dequantization bit for bit (``q - z`` as ``(2^23 + q) - (2^23 + z)``, with ``2^23 + q`` made
  by OR-ing q into the float's mantissa, not by a conversion instruction).  A K tile holds
  part of one group (``BK <= GROUP``) or ``BK / GROUP`` whole groups (both powers of two),
  whose scales broadcast over a ``[BN, BK / GROUP, GROUP]`` view of the tile.

``SPLIT_K``: the K range is split over ``SPLIT_K`` programs per output tile (grid axis 1), so
that a small batch against a narrow weight still gives every multiprocessor work with wide
tiles (each x tile is then re-read from L2 by fewer programs); they meet in an fp32 workspace
``[SPLIT_K, M, N]`` and a per-tile counter (``lock_ptr``, zero between launches: the last
program resets it).  Launches sharing one counter buffer must not run concurrently (one
stream, as the CUDA runner's).

``SWAP``: compute the transposed tile ``W_tile @ x_tile^T`` (output features on the MMA's M
side, tokens on its N side), for small M: the MMA's M side is at least 64 rows on sm_90 and
M = 17..64 tokens would leave most of it idle.

Rows and columns past M and N are clamped (``% M``, ``% N``) instead of masked in the main
loop (a valid duplicate row is read and dropped at the store); K must be a multiple of ``BK``
(the launcher picks ``BK`` that way).  ``INTERPRET``: run the dot on fp32 copies of the
operands (Triton's CPU interpreter multiplies bf16 bit patterns as integers); the GPU build
never sets it.
"""
import triton.language as tl

MAGIC: tl.constexpr = tl.constexpr(8388608.0)   # 2^23


def wo_gemm(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, o_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm,
            stride_om, INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr,
            SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr):
    # program -> (tile row, tile column), GROUP_M tile rows at a time so that consecutive
    # programs share weight tiles in L2 (large M)
    pid = tl.program_id(0)
    tiles_m = (M + BM - 1) // BM
    tiles_n = (N + BN - 1) // BN
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    # split-K: program_id(1) takes K / SPLIT_K consecutive input features
    split = tl.program_id(1)
    k_len = K // SPLIT_K                          # a multiple of BK (the launcher checks)
    k_start = tl.multiple_of(split * k_len, BK)

    rm = (pid_m * BM + tl.arange(0, BM)) % M
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    rk = k_start + tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    if INT4:
        rkh = k_start // 2 + tl.arange(0, BK // 2)
        q_ptrs = q_ptr + rn[:, None] * (K // 2) + rkh[None, :]
        sz_off = rn
    else:
        q_ptrs = q_ptr + rn[:, None] * K + rk[None, :]
    if SWAP:
        acc = tl.full((BN, BM), 0.0, tl.float32)
    else:
        acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(k_start, k_start + k_len, BK):
        a = tl.load(x_ptrs)
        if INT4:
            # nibble q OR-ed into the mantissa of 2^23 is the float 2^23 + q, and 2^23 + z is
            # exact too, so one subtraction gives q - z exactly without an integer-to-float
            # conversion per weight (a quarter of the fp32 rate on sm_90)
            b = tl.load(q_ptrs).to(tl.uint32)
            qv = tl.reshape(tl.join((b & 0xF) | 0x4B000000, (b >> 4) | 0x4B000000), (BN, BK))
            qf = qv.to(tl.float32, bitcast=True)                   # [BN, BK], k order
            if BK > GROUP:      # BK // GROUP groups per tile: [BN, groups, GROUP]
                g = k0 // GROUP + tl.arange(0, BK // GROUP)
                s = tl.load(s_ptr + g[None, :] * N + sz_off[:, None])
                z = tl.load(z_ptr + g[None, :] * N + sz_off[:, None]).to(tl.float32) + MAGIC
                q3 = tl.reshape(qf, (BN, BK // GROUP, GROUP))
                w = tl.reshape((q3 - z[:, :, None]) * s[:, :, None], (BN, BK))
                w = w.to(x_ptr.dtype.element_ty)
            else:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + sz_off)
                z = tl.load(z_ptr + g * N + sz_off).to(tl.float32) + MAGIC
                w = ((qf - z[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            q_ptrs += BK // 2
        else:
            w = tl.load(q_ptrs).to(tl.float32).to(x_ptr.dtype.element_ty)   # exact
            q_ptrs += BK
        if INTERPRET:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        x_ptrs += BK

    # epilogue in fp32: per-channel scale (int8), bias, one rounding
    if SWAP:
        acc = tl.trans(acc)
    cn = pid_n * BN + tl.arange(0, BN)
    cm = pid_m * BM + tl.arange(0, BM)
    mask = (cm[:, None] < M) & (cn[None, :] < N)
    if not INT4:
        acc = acc * tl.load(s_ptr + rn)[None, :]
    if SPLIT_K > 1:
        # every split stores its fp32 partial; the last of the tile's splits to finish (a
        # counter per tile, released after the stores, acquired before the loads) adds them in
        # split order, so the sum does not depend on which finished last, and resets the
        # counter for the next launch
        offs = cm[:, None] * N + cn[None, :]
        tl.store(ws_ptr + split * M * N + offs, acc, mask=mask)
        tl.debug_barrier()
        tile = pid_m * tiles_n + pid_n
        done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            acc = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for j in range(1, SPLIT_K):
                acc += tl.load(ws_ptr + j * M * N + offs, mask=mask, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc = acc + tl.load(b_ptr + rn).to(tl.float32)[None, :]
            tl.store(o_ptr + cm[:, None] * stride_om + cn[None, :],
                     acc.to(o_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(o_ptr + cm[:, None] * stride_om + cn[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=mask)
