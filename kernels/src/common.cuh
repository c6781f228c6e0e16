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
