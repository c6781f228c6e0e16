// irlm kernels: RMSNorm, plain and fused with the residual add.
//
//   plain: out = x * rsqrt(mean(x^2) + eps) * w
//   fused: residual = x + residual (rounded to the dtype, written back in place, as the
//          unfused model rounds it), out = rmsnorm(residual) * w
// One CTA per row; each thread keeps up to MAXV vectors of VEC elements (16 bytes when hidden
// allows) in registers, so x/residual are read once and out/residual written once.  Statistics
// in fp32.  `out` may alias `x`.
#include "common.cuh"

struct RmsNormParams {
  const void* x;
  void* residual;   // fused only
  const void* weight;
  void* out;
  long long x_stride, r_stride, o_stride;
  int hidden;
  float eps;
};

template <typename T, int VEC, int MAXV, bool ADD>
__global__ void __launch_bounds__(1024) irlm_rms_norm(const RmsNormParams p) {
  pdl_enter();
  __shared__ float scratch[33];
  const long long row = blockIdx.x;
  const int nvec = p.hidden / VEC;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_stride;
  T* res = ADD ? reinterpret_cast<T*>(p.residual) + row * p.r_stride : nullptr;
  const T* w = reinterpret_cast<const T*>(p.weight);
  T* out = reinterpret_cast<T*>(p.out) + row * p.o_stride;
  Vec<T, VEC> v[MAXV];  // the (summed) row, kept in registers in its own dtype
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      v[i] = *reinterpret_cast<const Vec<T, VEC>*>(x + idx * VEC);
      if (ADD) {
        const Vec<T, VEC> rv = *reinterpret_cast<const Vec<T, VEC>*>(res + idx * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          v[i].v[e] = from_float<T>(to_float(v[i].v[e]) + to_float(rv.v[e]));
        *reinterpret_cast<Vec<T, VEC>*>(res + idx * VEC) = v[i];
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float f = to_float(v[i].v[e]);
        ss += f * f;
      }
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / (float)p.hidden + p.eps);
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      float wv[VEC], o[VEC];
      load_vec<T, VEC>(w + idx * VEC, wv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = to_float(v[i].v[e]) * inv * wv[e];
      store_vec<T, VEC>(out + idx * VEC, o);
    }
  }
}
