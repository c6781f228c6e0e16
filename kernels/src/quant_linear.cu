// irlm kernels: weight-only quantized linears (int8 GEMV for small batches, dequantization for
// large ones).
//
// irlm_w8a16_gemv: out[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n] (+ bias[n]) for up to MAXM
// rows of x, int8 weights q [N, K] (row-major, one float scale per output row), or with WFP8
// e4m3 weights (one scale per tensor).  For quant.linear_a8 fp8 the caller passes x already
// rounded to e4m3 (held exactly in bf16) and its static scale as x_scale, which multiplies the
// result with the weight scale: the products of two e4m3 values are exact in fp32.  Decode is
// bound by reading the weights, so one warp owns one output feature and streams its row once:
// every lane loads 16 weight bytes per step (a warp reads 512 consecutive bytes), UNROLL steps
// issued before the first is used, and multiplies them with each of the m rows of x (read
// through the read-only cache: x is small and every warp reads it).  Accumulation in fp32,
// one rounding at the end.  Needs K % 16 == 0 and 16-byte aligned rows (the launcher checks).
//
// irlm_dequant_int8 / irlm_dequant_int4: the float weight that the stored tensors mean, as the
// reference quant.dequantize computes it (fp32 math, rounded once): int8 q * s[n]; int4
// (q - z[n, k / group]) * s[n, k / group] with q packed two per byte, low nibble first.  Used
// before a cuBLAS GEMM when the batch is large enough for the GEMM to be compute-bound.
#include "common.cuh"

struct QGemvParams {
  const void* x;
  const void* w;
  const float* scales;
  const void* bias;
  void* out;
  long long x_stride, o_stride;
  int m, n, k;
  int scale_stride;  // 1: one scale per output row (int8); 0: one per tensor (fp8)
  float x_scale;     // > 0: x holds e4m3 values of an activation with this scale (fp8 W8A8)
};

struct DequantParams {
  const void* q;
  const float* scales;
  const unsigned char* zeros;
  void* out;
  long long n, k;
  int group;
};

// Four int8 values (byte i = element i) -> floats, exactly, without integer-to-float
// conversions: those run at a quarter of the fp32 add rate on sm_90 (16 per clock and SM), about
// the rate at which the GEMV streams weights.  byte ^ 0x80 = q + 128 placed in the mantissa of
// 2^23 (byte_perm) is the float 2^23 + 128 + q, and one exact subtraction leaves q.
IRLM_DEVICE void int8x4_to_float(int v, float* f) {
  const unsigned u = static_cast<unsigned>(v) ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + i)) - 8388736.f;
}

// Four e4m3 values (byte i = element i) -> floats, exactly (every e4m3 value is an fp16 value).
IRLM_DEVICE void e4m3x4_to_float(int v, float* f) {
  unsigned lo, hi;
  const unsigned short a = v & 0xffff, b = (unsigned)v >> 16;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"(a));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"(b));
  irlm_fp16 h[4] = {{(unsigned short)(lo & 0xffff)}, {(unsigned short)(lo >> 16)},
                    {(unsigned short)(hi & 0xffff)}, {(unsigned short)(hi >> 16)}};
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = to_float(h[i]);
}

// 16 weights of one kind (WFP8: e4m3, else int8) from 16 bytes.
template <bool WFP8> IRLM_DEVICE void weights_to_float(const int4& v, float (&f)[16]) {
  if (WFP8) {
    e4m3x4_to_float(v.x, f); e4m3x4_to_float(v.y, f + 4);
    e4m3x4_to_float(v.z, f + 8); e4m3x4_to_float(v.w, f + 12);
  } else {
    int8x4_to_float(v.x, f); int8x4_to_float(v.y, f + 4);
    int8x4_to_float(v.z, f + 8); int8x4_to_float(v.w, f + 12);
  }
}

template <typename T>
IRLM_DEVICE void load16(const T* p, float (&f)[16]) {
  float a[8], b[8];
  load_vec<T, 8>(p, a);
  load_vec<T, 8>(p + 8, b);
#pragma unroll
  for (int i = 0; i < 8; ++i) { f[i] = a[i]; f[8 + i] = b[i]; }
}

template <typename T, int MAXM, bool WFP8>
__global__ void __launch_bounds__(256) irlm_w8a16_gemv(const QGemvParams p) {
  constexpr int UNROLL = 4;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= p.n) return;
  const signed char* w = reinterpret_cast<const signed char*>(p.w) + (long long)row * p.k;
  const T* x = reinterpret_cast<const T*>(p.x);
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
  for (int base = lane * 16; base < p.k; base += 32 * 16 * UNROLL) {
    int4 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * 16;
      wv[u] = k0 < p.k ? load_stream(w + k0) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * 16;
      if (k0 >= p.k) break;
      float wf[16];
      weights_to_float<WFP8>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < p.m) {
          float xf[16];
          load16<T>(x + (long long)m * p.x_stride + k0, xf);
#pragma unroll
          for (int i = 0; i < 16; ++i) acc[m] = fmaf(xf[i], wf[i], acc[m]);
        }
      }
    }
  }
  const float s = p.scales[(long long)row * p.scale_stride] * (p.x_scale > 0.f ? p.x_scale : 1.f);
  const float b = p.bias ? to_float(reinterpret_cast<const T*>(p.bias)[row]) : 0.f;
  T* out = reinterpret_cast<T*>(p.out);
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const float v = warp_sum(acc[m]);
    if (m < p.m && lane == (m & 31)) out[(long long)m * p.o_stride + row] = from_float<T>(v * s + b);
  }
}

// 16 consecutive weights of one row per thread (K % 16 == 0).
template <typename T>
__global__ void __launch_bounds__(256) irlm_dequant_int8(const DequantParams p) {
  const long long per_row = p.k / 16, total = p.n * per_row;
  const signed char* q = reinterpret_cast<const signed char*>(p.q);
  T* out = reinterpret_cast<T*>(p.out);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / per_row;
    const int4 v = load_stream(q + i * 16);
    float f[16];
    int8x4_to_float(v.x, f);
    int8x4_to_float(v.y, f + 4);
    int8x4_to_float(v.z, f + 8);
    int8x4_to_float(v.w, f + 12);
    const float s = p.scales[row];
    float a[8], b[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) { a[e] = f[e] * s; b[e] = f[8 + e] * s; }
    store_vec<T, 8>(out + i * 16, a);
    store_vec<T, 8>(out + i * 16 + 8, b);
  }
}

// 16 consecutive weights (8 packed bytes) of one row per thread; group % 16 == 0, so the 16
// share one scale and zero point.
template <typename T>
__global__ void __launch_bounds__(256) irlm_dequant_int4(const DequantParams p) {
  const long long per_row = p.k / 16, total = p.n * per_row;
  const long long groups = p.k / p.group;
  const unsigned char* q = reinterpret_cast<const unsigned char*>(p.q);
  T* out = reinterpret_cast<T*>(p.out);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / per_row;
    const long long col = (i - row * per_row) * 16;
    const long long g = row * groups + col / p.group;
    const uint2 v = *reinterpret_cast<const uint2*>(q + i * 8);
    const float s = p.scales[g];
    const float z = static_cast<float>(p.zeros[g]);
    float a[8], b[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const unsigned lo = (v.x >> (8 * e)) & 0xff, hi = (v.y >> (8 * e)) & 0xff;
      a[2 * e] = (static_cast<float>(lo & 0xf) - z) * s;
      a[2 * e + 1] = (static_cast<float>(lo >> 4) - z) * s;
      b[2 * e] = (static_cast<float>(hi & 0xf) - z) * s;
      b[2 * e + 1] = (static_cast<float>(hi >> 4) - z) * s;
    }
    store_vec<T, 8>(out + i * 16, a);
    store_vec<T, 8>(out + i * 16 + 8, b);
  }
}
