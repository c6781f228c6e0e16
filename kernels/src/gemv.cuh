// irlm kernels: the loop of the GEMVs that stream each weight row once, by 1-4 warps (gemv.cu:
// weights in the activations' dtype; quant_linear.cu: int8 and e4m3 weights).
//
// A decode step of a few rows is bound by reading the weights, so S warps (WPR, "warps per row":
// 1, 2 or 4) own one output feature and stream its row once: every lane loads 16 bytes per step
// (a warp reads 512 consecutive bytes, the row's S warps take turns), UNROLL steps issued before
// the first is used, and multiplies them with each of the m rows of x (read through the
// read-only cache: x is small and every warp reads it).  More than one warp a row when the
// features are too few to fill the GPU with one warp each (o and down of Llama-3-8B: 4096 rows,
// half a wave); their sums meet in shared memory.
// Accumulation in fp32.  A weight format is a policy: PER_LOAD weights per 16 bytes and
// unpack(), which turns them into floats.  Needs K % PER_LOAD == 0 and 16-byte aligned rows of
// the weight and of x (the launchers check).
#pragma once
#include "common.cuh"

// PER consecutive activations of one row as floats (16-byte loads).
template <typename T, int PER>
IRLM_DEVICE void load_x(const T* p, float (&f)[PER]) {
  static_assert(PER % 8 == 0, "x is read 8 elements (16 bytes) at a time");
#pragma unroll
  for (int h = 0; h < PER / 8; ++h) {
    float a[8];
    load_vec<T, 8>(p + 8 * h, a);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[8 * h + i] = a[i];
  }
}

// Ask L2 for the first min(bytes, row_bytes) bytes of one weight row, a 128-byte line per lane
// and step: issued before pdl_enter(), while the previous kernel still runs (common.cuh).
IRLM_DEVICE void prefetch_row(const void* w_row, long long row_bytes, int bytes) {
  const long long n = bytes < row_bytes ? (long long)bytes : row_bytes;
  for (long long off = (threadIdx.x & 31) * 128; off < n; off += 32 * 128)
    prefetch_l2(reinterpret_cast<const char*>(w_row) + off);
}

// acc[m] += sum_k x[m, k] * w[k] over one weight row (`w_row`: its first byte) of k elements,
// for the m < rows rows of x; the row's WPR warps' lanes split it (`lane`: this thread's index
// among them), so acc holds each lane's share (gemv_store adds them).
template <typename Weights, typename T, int MAXM, int WPR = 1>
IRLM_DEVICE void gemv_row(const void* w_row, const T* x, long long x_stride, int rows, int k,
                          float (&acc)[MAXM], int lane = threadIdx.x & 31) {
  constexpr int UNROLL = 4, PER = Weights::PER_LOAD, BYTES = 16 / PER, LANES = 32 * WPR;
  const char* w = reinterpret_cast<const char*>(w_row);
  for (int base = lane * PER; base < k; base += LANES * PER * UNROLL) {
    int4 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * LANES * PER;
      wv[u] = k0 < k ? load_stream(w + (long long)k0 * BYTES) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * LANES * PER;
      if (k0 >= k) break;
      float wf[PER];
      Weights::unpack(wv[u], wf);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < rows) {
          float xf[PER];
          load_x<T, PER>(x + (long long)m * x_stride + k0, xf);
#pragma unroll
          for (int i = 0; i < PER; ++i) acc[m] = fmaf(xf[i], wf[i], acc[m]);
        }
      }
    }
  }
}

// out[m, row] = (sum of acc[m] over the row's lanes) * s + bias[row], rounded to T once, for
// m < rows (lane m of the row's first warp writes row m's value).  With WPR > 1 every thread of
// the block must call it (it synchronises the block); `valid`: whether this warp's row exists.
template <typename T, int MAXM, int WPR = 1>
IRLM_DEVICE void gemv_store(const float (&acc)[MAXM], void* out, long long o_stride, int rows,
                            int row, float s, const void* bias, bool valid = true) {
  const int lane = threadIdx.x & 31;
  float v[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) v[m] = warp_sum(acc[m]);
  if (WPR > 1) {
    __shared__ float part[32][MAXM];            // one slot per warp of the block
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MAXM; ++m) part[warp][m] = v[m];
    }
    __syncthreads();
    if (warp % WPR != 0) return;
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
      for (int j = 1; j < WPR; ++j) v[m] += part[warp + j][m];
  }
  if (!valid) return;
  const float b = bias ? to_float(reinterpret_cast<const T*>(bias)[row]) : 0.f;
  T* o = reinterpret_cast<T*>(out);
#pragma unroll
  for (int m = 0; m < MAXM; ++m)
    if (m < rows && lane == (m & 31))
      o[(long long)m * o_stride + row] = from_float<T>(v[m] * s + b);
}
