// irlm kernels: shared device helpers.
//
// Self-contained on purpose: NVRTC ships no cuda_fp16.h / cuda_bf16.h (the CUDA toolkit's
// headers are not installed where CI compiles), so the 16-bit float types are defined here as
// raw storage with PTX conversions (sm_80+).  Every kernel source includes this file.
#pragma once

#define IRLM_DEVICE __device__ __forceinline__
#define IRLM_NEG_INF (-__int_as_float(0x7f800000))

struct __align__(2) irlm_bf16 { unsigned short bits; };
struct __align__(2) irlm_fp16 { unsigned short bits; };

// ---- programmatic dependent launch (sm_90+) --------------------------------------------------
// irlm launches its kernels with programmatic stream serialization (nvrtc.py) on sm_90 and
// later, so a kernel's CTAs may start before the previous kernel in the stream has finished.
// Every irlm kernel therefore begins with pdl_enter(): it lets the next kernel launch (its CTAs
// take free SM slots and wait there, instead of paying the launch after this kernel drains) and
// then waits until the previous kernel has completed and its writes are visible.  Nothing may
// read another kernel's output or write memory before pdl_enter(); the only work allowed ahead
// of it is prefetch_l2 of weights.  Deadlock-free: a kernel's dependents launch only once all of
// its CTAs have started, so a waiting CTA never holds a slot that an earlier kernel still needs.
// Without the launch attribute (TensorRT plugins, other GPUs) both instructions return at once.
IRLM_DEVICE void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Ask L2 for the 128-byte line holding p (no register, no wait): a GEMV issues this for the
// start of its weight rows before pdl_enter(), so the weights stream in while the previous
// kernel (attention, a norm) leaves the memory idle.  A hint only: always safe to issue.
IRLM_DEVICE void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// ---- scalar conversions --------------------------------------------------------------------
IRLM_DEVICE float to_float(float x) { return x; }
IRLM_DEVICE float to_float(irlm_bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
IRLM_DEVICE float to_float(irlm_fp16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}

template <typename T> IRLM_DEVICE T from_float(float f);
template <> IRLM_DEVICE float from_float<float>(float f) { return f; }
template <> IRLM_DEVICE irlm_bf16 from_float<irlm_bf16>(float f) {
  irlm_bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
  return r;
}
template <> IRLM_DEVICE irlm_fp16 from_float<irlm_fp16>(float f) {
  irlm_fp16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
  return r;
}

// Two floats packed into one 32-bit register of two 16-bit values: `lo` in the low half (the
// lower column index in an mma fragment), `hi` in the high half.
template <typename T> IRLM_DEVICE unsigned pack2(float lo, float hi);
template <> IRLM_DEVICE unsigned pack2<irlm_bf16>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> IRLM_DEVICE unsigned pack2<irlm_fp16>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// ---- vectors: N elements of T loaded/stored as one access (16 bytes when N*sizeof(T)==16) ---
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename T, int N>
IRLM_DEVICE void load_vec(const T* p, float (&f)[N]) {
  Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_float(x.v[i]);
}

template <typename T, int N>
IRLM_DEVICE void store_vec(T* p, const float (&f)[N]) {
  Vec<T, N> x;
#pragma unroll
  for (int i = 0; i < N; ++i) x.v[i] = from_float<T>(f[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// ---- 8-bit KV cache elements (passes/llm/quantize_kv.py, irlm.ops.llm.kv_to_cache) ---------
// An int8 cache element is a `signed char`; an fp8 one is e4m3 (OCP "fn": no infinities, 0x7f
// / 0xff are NaN, largest finite 448).  Keys and values are stored divided by one float scale
// per layer each; attention reads them back times the scale.
struct __align__(1) irlm_fp8e4m3 { unsigned char bits; };

template <typename C> struct KvCacheElem { static constexpr bool quantized = false; };
template <> struct KvCacheElem<signed char> { static constexpr bool quantized = true; };
template <> struct KvCacheElem<irlm_fp8e4m3> { static constexpr bool quantized = true; };

// The hardware fp8 conversions (cvt ... e4m3x2) exist from sm_89 on; before that (and in
// tests that define IRLM_SOFT_FP8) the same roundings are done with integer arithmetic.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(IRLM_SOFT_FP8)
#define IRLM_HW_FP8 1
#endif

// e4m3 code -> float, exactly (every e4m3 value is a normal float32).
IRLM_DEVICE float e4m3_to_float_soft(unsigned b) {
  const unsigned e = (b >> 3) & 15u, m = b & 7u;
  float mag = e ? __uint_as_float(((e + 120u) << 23) | (m << 20))  // 2^(e-7) * (1 + m/8)
                : (float)m * 0.001953125f;                           // m * 2^-9
  if ((b & 0x7fu) == 0x7fu) mag = __int_as_float(0x7fffffff);        // NaN
  return (b & 0x80u) ? -mag : mag;
}

// float -> e4m3 code, round to nearest even, saturating to +-448 (as torch's
// x.clamp(-448, 448).to(float8_e4m3fn) for every finite x and infinities; NaN stays NaN).
IRLM_DEVICE unsigned char float_to_e4m3_soft(float x) {
  const unsigned sign = (__float_as_uint(x) >> 24) & 0x80u;
  const float a = fabsf(x);
  if (!(a == a)) return (unsigned char)(sign | 0x7fu);
  if (a >= 448.f) return (unsigned char)(sign | 0x7eu);
  if (a < 0.015625f) {  // below 2^-6: subnormal codes m * 2^-9 (m = 8 is 2^-6, code 0x08)
    return (unsigned char)(sign | (unsigned)__float2int_rn(a * 512.f));
  }
  unsigned u = __float_as_uint(a);
  u += 0x7ffffu + ((u >> 20) & 1u);  // round the mantissa to 3 bits, ties to even
  return (unsigned char)(sign | ((((u >> 23) - 120u) << 3) | ((u >> 20) & 7u)));
}

// Two e4m3 codes (low byte first) -> two floats.
IRLM_DEVICE void e4m3x2_to_float2(unsigned short two, float& lo, float& hi) {
#ifdef IRLM_HW_FP8
  unsigned h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(two));
  lo = to_float(irlm_fp16{(unsigned short)(h2 & 0xffffu)});
  hi = to_float(irlm_fp16{(unsigned short)(h2 >> 16)});
#else
  lo = e4m3_to_float_soft(two & 0xffu);
  hi = e4m3_to_float_soft(two >> 8);
#endif
}

// A float quantized as the cache stores it: x / scale (IEEE division, whatever the fast-math
// options) then int8: rounded half to even, clamped to +-127; fp8: as float_to_e4m3_soft.
template <typename C> IRLM_DEVICE C quantize_kv(float x, float scale);
template <> IRLM_DEVICE signed char quantize_kv<signed char>(float x, float scale) {
  const float y = fminf(fmaxf(rintf(__fdiv_rn(x, scale)), -127.f), 127.f);
  return (signed char)__float2int_rn(y);
}
template <> IRLM_DEVICE irlm_fp8e4m3 quantize_kv<irlm_fp8e4m3>(float x, float scale) {
  const float y = __fdiv_rn(x, scale);
#ifdef IRLM_HW_FP8
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.f), "f"(y));
  return irlm_fp8e4m3{(unsigned char)(r & 0xffu)};
#else
  return irlm_fp8e4m3{float_to_e4m3_soft(y)};
#endif
}

// N floats rounded to T (the model's dtype, as its keys / values are), then stored into a
// cache of element type C: T itself, or quantized with `scale`.
template <typename T, typename C, int N>
IRLM_DEVICE void store_kv(C* dst, const float (&f)[N], float scale) {
  if constexpr (KvCacheElem<C>::quantized) {
    Vec<C, N> x;
#pragma unroll
    for (int i = 0; i < N; ++i) x.v[i] = quantize_kv<C>(to_float(from_float<T>(f[i])), scale);
    *reinterpret_cast<Vec<C, N>*>(dst) = x;
  } else {
    store_vec<T, N>(reinterpret_cast<T*>(dst), f);
  }
}

// 8 cache bytes -> 8 floats, exactly (the scale is applied later, in f32).
template <typename C> IRLM_DEVICE void kv8_to_float(const uint2& raw, float (&f)[8]);
template <> IRLM_DEVICE void kv8_to_float<signed char>(const uint2& raw, float (&f)[8]) {
  const unsigned w[2] = {raw.x, raw.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // 2^23 + (b + 128) is exact in float32: subtract 2^23 + 128 to get b
    const unsigned u = w[i] ^ 0x80808080u;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      f[4 * i + j] = __uint_as_float(0x4b000000u | ((u >> (8 * j)) & 0xffu)) - 8388736.f;
  }
}
template <> IRLM_DEVICE void kv8_to_float<irlm_fp8e4m3>(const uint2& raw, float (&f)[8]) {
  const unsigned w[2] = {raw.x, raw.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    e4m3x2_to_float2((unsigned short)(w[i] & 0xffffu), f[4 * i], f[4 * i + 1]);
    e4m3x2_to_float2((unsigned short)(w[i] >> 16), f[4 * i + 2], f[4 * i + 3]);
  }
}

// ---- streaming loads ------------------------------------------------------------------------
// 16 bytes read once per step (quantized weights): kept out of L1.
IRLM_DEVICE int4 load_stream(const void* p) {
  int4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// ---- reductions ----------------------------------------------------------------------------
IRLM_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
IRLM_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 33 floats of shared memory; the call ends with the block synchronised.
IRLM_DEVICE float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? scratch[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  float r = scratch[32];
  __syncthreads();
  return r;
}

// Max over the block, like block_sum.
IRLM_DEVICE float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? scratch[lane] : IRLM_NEG_INF;
    t = warp_max(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  float r = scratch[32];
  __syncthreads();
  return r;
}

// ---- packed-token bookkeeping --------------------------------------------------------------
// The request owning packed token `t`: the largest r with cu_q_lens[r] <= t (cu_q_lens has
// num_reqs + 1 entries, cu_q_lens[0] == 0); requests with q_len 0 are skipped.
IRLM_DEVICE int request_of_token(const int* cu_q_lens, int num_reqs, int t) {
  int lo = 0, hi = num_reqs - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (cu_q_lens[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---- async copies (sm_80+) -----------------------------------------------------------------
IRLM_DEVICE unsigned smem_addr(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}
// 16-byte global->shared copy; when `valid` is false nothing is read and 16 zero bytes land.
IRLM_DEVICE void cp_async16(void* dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(n));
}
IRLM_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> IRLM_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
