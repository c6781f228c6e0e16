// irlm kernels: the loop of the GEMVs that stream one weight row per warp (gemv.cu: weights in
// the activations' dtype; quant_linear.cu: int8 and e4m3 weights).
//
// A decode step of a few rows is bound by reading the weights, so one warp owns one output
// feature and streams its row once: every lane loads 16 bytes per step (a warp reads 512
// consecutive bytes), UNROLL steps issued before the first is used, and multiplies them with each
// of the m rows of x (read through the read-only cache: x is small and every warp reads it).
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
// for the m < rows rows of x; the warp's lanes split the row, so acc holds each lane's share
// (warp_sum adds them).
template <typename Weights, typename T, int MAXM>
IRLM_DEVICE void gemv_row(const void* w_row, const T* x, long long x_stride, int rows, int k,
                          float (&acc)[MAXM]) {
  constexpr int UNROLL = 4, PER = Weights::PER_LOAD, BYTES = 16 / PER;
  const char* w = reinterpret_cast<const char*>(w_row);
  const int lane = threadIdx.x & 31;
  for (int base = lane * PER; base < k; base += 32 * PER * UNROLL) {
    int4 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * PER;
      wv[u] = k0 < k ? load_stream(w + (long long)k0 * BYTES) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * PER;
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

// out[m, row] = (warp sum of acc[m]) * s + bias[row], rounded to T once, for m < rows (lane m
// writes row m's value).
template <typename T, int MAXM>
IRLM_DEVICE void gemv_store(const float (&acc)[MAXM], void* out, long long o_stride, int rows,
                            int row, float s, const void* bias) {
  const int lane = threadIdx.x & 31;
  const float b = bias ? to_float(reinterpret_cast<const T*>(bias)[row]) : 0.f;
  T* o = reinterpret_cast<T*>(out);
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const float v = warp_sum(acc[m]);
    if (m < rows && lane == (m & 31)) o[(long long)m * o_stride + row] = from_float<T>(v * s + b);
  }
}
