// irlm kernels: activation quantization in front of the 8-bit GEMMs (quant.linear_a8).
//
// As separate torch ops these took four (fp8: float, divide, clamp, convert) and eight (int8
// per token: float, abs, amax, divide, clamp, divide, round, clamp, convert) kernels per linear
// and per step; each launch costs the step about as much as the work.  One kernel each here,
// computing what quant.quantize / quant.quantize_per_token compute, bit for bit: true fp32
// division (not a reciprocal), round to nearest even, the same clamps.
//
// irlm_quantize_fp8: out[r, c] = e4m3(clamp(x[r, c] / scale, +-448)), `scale` a 0-d f32 tensor
// read on the device (a CUDA graph replays it unchanged).  8 elements per thread; cols % 8 == 0.
// irlm_quantize_per_token_i8: one block per row: s[r] = max(amax|x[r]| / 127, 1e-12),
// q[r, c] = clamp(rint(x[r, c] / s[r]), +-127).
// irlm_scale_i32: the w8a8 epilogue, out = T(float(acc) * xs[r] * ws[c] (+ float(bias[c]))),
// each step rounded as torch's ops round it (no fused multiply-add); cols % 4 == 0.
#include "common.cuh"

struct ScaleI32Params {
  const int* acc;        // [rows, cols] int32 sums of int8 products
  const float* x_scale;  // [rows] per token
  const float* w_scale;  // [cols] per output channel
  const void* bias;      // [cols] in T, or null
  void* out;             // [rows, cols] in T
  long long rows, cols, acc_stride;
};

struct QuantActParams {
  const void* x;
  const float* scale;   // fp8: the static scale (0-d); i8: out, one per row
  void* out;
  long long rows, cols, x_stride;
};

template <typename T>
__global__ void __launch_bounds__(256) irlm_quantize_fp8(const QuantActParams p) {
  pdl_enter();
  const long long per_row = p.cols / 8, total = p.rows * per_row;
  const float s = *p.scale;
  const T* x = reinterpret_cast<const T*>(p.x);
  unsigned char* out = reinterpret_cast<unsigned char*>(p.out);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / per_row, col = (i - row * per_row) * 8;
    float f[8];
    load_vec<T, 8>(x + row * p.x_stride + col, f);
    unsigned short code[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float lo = __fdiv_rn(f[2 * j], s), hi = __fdiv_rn(f[2 * j + 1], s);
#ifdef IRLM_HW_FP8
      // the first source goes to the upper byte; satfinite saturates to +-448 as the clamp
      // does, and keeps NaN
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(code[j]) : "f"(hi), "f"(lo));
#else
      code[j] = (unsigned short)(float_to_e4m3_soft(lo) | (float_to_e4m3_soft(hi) << 8));
#endif
    }
    uint2 packed;
    packed.x = (unsigned)code[0] | ((unsigned)code[1] << 16);
    packed.y = (unsigned)code[2] | ((unsigned)code[3] << 16);
    *reinterpret_cast<uint2*>(out + row * p.cols + col) = packed;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) irlm_quantize_per_token_i8(const QuantActParams p) {
  pdl_enter();
  __shared__ float scratch[33];
  const long long row = blockIdx.x;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_stride;
  signed char* out = reinterpret_cast<signed char*>(p.out) + row * p.cols;
  float amax = 0.f;
  int nan = 0;   // fmaxf drops NaN; torch's amax (and then the scale) propagates it
  for (long long c = threadIdx.x * 8; c < p.cols; c += blockDim.x * 8) {
    float f[8];
    load_vec<T, 8>(x + c, f);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      amax = fmaxf(amax, fabsf(f[j]));
      nan |= f[j] != f[j];
    }
  }
  amax = warp_max(amax);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = amax;
  const int any_nan = __syncthreads_or(nan);
  if (warp == 0) {
    float t = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
    t = warp_max(t);
    // a row with a NaN gets a NaN scale, as torch's ops give it, so its outputs are NaN
    if (lane == 0) scratch[32] = any_nan ? __int_as_float(0x7fffffff)
                                         : fmaxf(__fdiv_rn(t, 127.f), 1e-12f);
  }
  __syncthreads();
  const float s = scratch[32];
  if (threadIdx.x == 0) const_cast<float*>(p.scale)[row] = s;
  for (long long c = threadIdx.x * 8; c < p.cols; c += blockDim.x * 8) {
    float f[8];
    load_vec<T, 8>(x + c, f);
    unsigned w[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int q = max(-127, min(127, __float2int_rn(__fdiv_rn(f[j], s))));
      w[j / 4] |= ((unsigned)q & 0xffu) << (8 * (j % 4));
    }
    *reinterpret_cast<uint2*>(out + c) = make_uint2(w[0], w[1]);
  }
}

template <typename T>
__global__ void __launch_bounds__(256) irlm_scale_i32(const ScaleI32Params p) {
  pdl_enter();
  const long long per_row = p.cols / 4, total = p.rows * per_row;
  T* out = reinterpret_cast<T*>(p.out);
  const T* bias = reinterpret_cast<const T*>(p.bias);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / per_row, col = (i - row * per_row) * 4;
    const int4 a = *reinterpret_cast<const int4*>(p.acc + row * p.acc_stride + col);
    const int av[4] = {a.x, a.y, a.z, a.w};
    const float xs = p.x_scale[row];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v = __fmul_rn(__fmul_rn(__int2float_rn(av[j]), xs), p.w_scale[col + j]);
      if (bias) v = __fadd_rn(v, to_float(bias[col + j]));
      out[row * p.cols + col + j] = from_float<T>(v);
    }
  }
}
