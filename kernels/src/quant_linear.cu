// irlm kernels: weight-only quantized linears (int8 GEMV for small batches, dequantization for
// large ones).
//
// irlm_w8a16_gemv: out[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n] (+ bias[n]) for up to MAXM
// rows of x, int8 weights q [N, K] (row-major, one float scale per output row), or with WFP8
// e4m3 weights (one scale per tensor).  For quant.linear_a8 fp8 the caller passes x already
// rounded to e4m3 (held exactly in bf16) and its static scale as x_scale, which multiplies the
// result with the weight scale: the products of two e4m3 values are exact in fp32.  The loop
// is gemv.cuh's: one warp streams one output feature's row (16 weights per lane and load, 4
// loads in flight), fp32 sums, one rounding at the end.  Needs K % 16 == 0 and 16-byte aligned
// rows (the launcher checks).
//
// irlm_dequant_int8 / irlm_dequant_int4: the float weight that the stored tensors mean, as the
// reference quant.dequantize computes it (fp32 math, rounded once): int8 q * s[n]; int4
// (q - z[n, k / group]) * s[n, k / group] with q packed two per byte, low nibble first.  Used
// before a cuBLAS GEMM when the batch is large enough for the GEMM to be compute-bound.
#include "gemv.cuh"

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
  int prefetch;      // bytes of each weight row asked into L2 before waiting on the previous kernel
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

// The GEMV's weight formats (gemv.cuh's policies): 16 int8 or e4m3 weights per 16 bytes.
struct Int8Weights {
  static constexpr int PER_LOAD = 16;
  static IRLM_DEVICE void unpack(const int4& v, float (&f)[16]) {
    int8x4_to_float(v.x, f); int8x4_to_float(v.y, f + 4);
    int8x4_to_float(v.z, f + 8); int8x4_to_float(v.w, f + 12);
  }
};
struct E4m3Weights {
  static constexpr int PER_LOAD = 16;
  static IRLM_DEVICE void unpack(const int4& v, float (&f)[16]) {
    e4m3x4_to_float(v.x, f); e4m3x4_to_float(v.y, f + 4);
    e4m3x4_to_float(v.z, f + 8); e4m3x4_to_float(v.w, f + 12);
  }
};

template <bool WFP8> struct W8 { using type = Int8Weights; };
template <> struct W8<true> { using type = E4m3Weights; };

// WPR warps a row (gemv.cuh); blockDim.x / 32 warps a block, a multiple of WPR.
template <typename T, int MAXM, bool WFP8, int WPR>
__global__ void __launch_bounds__(256) irlm_w8a16_gemv(const QGemvParams p) {
  const int warp = threadIdx.x / 32;
  const int row = blockIdx.x * (blockDim.x / 32 / WPR) + warp / WPR;
  const bool valid = row < p.n;
  const char* w_row = reinterpret_cast<const char*>(p.w) + (long long)(valid ? row : 0) * p.k;
  if (valid && warp % WPR == 0) prefetch_row(w_row, p.k, p.prefetch);
  pdl_enter();
  if (WPR == 1 && !valid) return;
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
  if (valid)
    gemv_row<typename W8<WFP8>::type, T, MAXM, WPR>(w_row, reinterpret_cast<const T*>(p.x),
        p.x_stride, p.m, p.k, acc, (warp % WPR) * 32 + (threadIdx.x & 31));
  const float s = valid ? p.scales[(long long)row * p.scale_stride] *
                              (p.x_scale > 0.f ? p.x_scale : 1.f) : 0.f;
  gemv_store<T, MAXM, WPR>(acc, p.out, p.o_stride, p.m, row, s, p.bias, valid);
}

// 16 consecutive weights of one row per thread (K % 16 == 0).
template <typename T>
__global__ void __launch_bounds__(256) irlm_dequant_int8(const DequantParams p) {
  pdl_enter();
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
  pdl_enter();
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
