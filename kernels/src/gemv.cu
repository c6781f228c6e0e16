// irlm kernels: the dense GEMV for decode steps of a few rows, with weights in the activations'
// own dtype (bf16 / fp16).
//
// out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for up to MAXM rows of x, w row-major [N, K] as
// a linear stores it.  A batch-1 decode step is bound by reading the weights, and cuBLAS's GEMM
// read the Llama-3-8B linears at about 3.6 TB/s on the H200 at one row (docs/performance.md),
// short of what the memory gives.  Which of the two runs a linear is decided per weight shape at
// engine load by timing both (lowering/tactics.py), so this kernel only runs where it wins.
//
// Work split, as the int8 GEMV's (quant_linear.cu): one warp owns one output feature and streams
// its row once; every lane loads 16 bytes (8 weights) per step, a warp 512 consecutive bytes,
// UNROLL steps issued before the first is used, each multiplied with the m rows of x (read
// through the read-only cache).  Accumulation in fp32, one rounding at the end.  Needs K % 8 == 0
// and 16-byte aligned rows of w and x (the launcher checks).
#include "common.cuh"

struct GemvParams {
  const void* x;
  const void* w;
  const void* bias;
  void* out;
  long long x_stride, o_stride;
  int m, n, k;
};

// 8 weights of type T from 16 bytes.  bf16 -> fp32 is a shift (no conversion instruction).
template <typename T> IRLM_DEVICE void unpack8(const int4& v, float (&f)[8]);
template <> IRLM_DEVICE void unpack8<irlm_bf16>(const int4& v, float (&f)[8]) {
  const unsigned u[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
template <> IRLM_DEVICE void unpack8<irlm_fp16>(const int4& v, float (&f)[8]) {
  const unsigned u[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = to_float(irlm_fp16{(unsigned short)(u[i] & 0xffffu)});
    f[2 * i + 1] = to_float(irlm_fp16{(unsigned short)(u[i] >> 16)});
  }
}

template <typename T, int MAXM>
__global__ void __launch_bounds__(256) irlm_gemv(const GemvParams p) {
  constexpr int UNROLL = 4, PER_LOAD = 8;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= p.n) return;
  const T* w = reinterpret_cast<const T*>(p.w) + (long long)row * p.k;
  const T* x = reinterpret_cast<const T*>(p.x);
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
  for (int base = lane * PER_LOAD; base < p.k; base += 32 * PER_LOAD * UNROLL) {
    int4 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * PER_LOAD;
      wv[u] = k0 < p.k ? load_stream(w + k0) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * PER_LOAD;
      if (k0 >= p.k) break;
      float wf[8];
      unpack8<T>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < p.m) {
          float xf[8];
          load_vec<T, 8>(x + (long long)m * p.x_stride + k0, xf);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m] = fmaf(xf[i], wf[i], acc[m]);
        }
      }
    }
  }
  const float b = p.bias ? to_float(reinterpret_cast<const T*>(p.bias)[row]) : 0.f;
  T* out = reinterpret_cast<T*>(p.out);
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const float v = warp_sum(acc[m]);
    if (m < p.m && lane == (m & 31)) out[(long long)m * p.o_stride + row] = from_float<T>(v + b);
  }
}
