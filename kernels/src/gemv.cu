// irlm kernels: the dense GEMV for decode steps of a few rows, with weights in the activations'
// own dtype (bf16 / fp16).
//
// out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for up to MAXM rows of x, w row-major [N, K] as
// a linear stores it.  A batch-1 decode step is bound by reading the weights, and cuBLAS's GEMM
// read the Llama-3-8B linears at about 3.6 TB/s on the H200 at one row (docs/performance.md),
// short of what the memory gives.  Which of the two runs a linear is decided per weight shape at
// engine load by timing both (lowering/tactics.py), so this kernel only runs where it wins.
//
// The loop is gemv.cuh's (shared with the int8 / e4m3 GEMV of quant_linear.cu): one warp per
// output feature, 16-byte weight loads (8 weights), 4 in flight per lane, fp32 sums, one
// rounding at the end.  Needs K % 8 == 0 and 16-byte aligned rows of w and x (the launcher
// checks).
#include "gemv.cuh"

struct GemvParams {
  const void* x;
  const void* w;
  const void* bias;
  void* out;
  long long x_stride, o_stride;
  int m, n, k;
  int prefetch;  // bytes of each weight row asked into L2 before waiting on the previous kernel
};

// Weights in T itself, 8 per 16 bytes.  bf16 -> fp32 is a shift (no conversion instruction).
template <typename T> struct SameWeights;
template <> struct SameWeights<irlm_bf16> {
  static constexpr int PER_LOAD = 8;
  static IRLM_DEVICE void unpack(const int4& v, float (&f)[8]) {
    const unsigned u[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  }
};
template <> struct SameWeights<irlm_fp16> {
  static constexpr int PER_LOAD = 8;
  static IRLM_DEVICE void unpack(const int4& v, float (&f)[8]) {
    const unsigned u[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = to_float(irlm_fp16{(unsigned short)(u[i] & 0xffffu)});
      f[2 * i + 1] = to_float(irlm_fp16{(unsigned short)(u[i] >> 16)});
    }
  }
};

// WPR warps a row (gemv.cuh); blockDim.x / 32 warps a block, a multiple of WPR.
template <typename T, int MAXM, int WPR>
__global__ void __launch_bounds__(256) irlm_gemv(const GemvParams p) {
  const int warp = threadIdx.x / 32;
  const int row = blockIdx.x * (blockDim.x / 32 / WPR) + warp / WPR;
  const bool valid = row < p.n;
  const T* w_row = reinterpret_cast<const T*>(p.w) + (long long)(valid ? row : 0) * p.k;
  if (valid && warp % WPR == 0) prefetch_row(w_row, (long long)p.k * sizeof(T), p.prefetch);
  pdl_enter();
  if (WPR == 1 && !valid) return;
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
  if (valid)
    gemv_row<SameWeights<T>, T, MAXM, WPR>(w_row, reinterpret_cast<const T*>(p.x), p.x_stride,
                                           p.m, p.k, acc, (warp % WPR) * 32 + (threadIdx.x & 31));
  gemv_store<T, MAXM, WPR>(acc, p.out, p.o_stride, p.m, row, 1.f, p.bias, valid);
}
