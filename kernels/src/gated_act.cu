// irlm kernels: gated activations on the concatenated gate/up layout.
//
// x: [tokens, 2 * inter] (first half gate, second half up) -> out: [tokens, inter],
// out = act(gate) * up computed in fp32 and rounded once.  ACT: 0 SiLU, 1 GELU (tanh
// approximation), 2 GELU (exact, erf).  A flat grid-stride loop over VEC-element (16-byte when
// inter allows) chunks.
#include "common.cuh"

struct GatedActParams {
  const void* x;
  void* out;
  long long rows, x_stride, o_stride;
  int inter;
};

template <int ACT> IRLM_DEVICE float activation(float g) {
  if (ACT == 0) return g / (1.f + __expf(-g));
  if (ACT == 1) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2/pi)
    return 0.5f * g * (1.f + tanhf(k0 * (g + k1 * g * g * g)));
  }
  return 0.5f * g * (1.f + erff(g * 0.7071067811865476f));
}

template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(256) irlm_gated_act(const GatedActParams p) {
  pdl_enter();
  const long long per_row = p.inter / VEC;
  const long long n = p.rows * per_row;
  const T* x = reinterpret_cast<const T*>(p.x);
  T* out = reinterpret_cast<T*>(p.out);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / per_row;
    const int c = (int)(i - row * per_row) * VEC;
    float g[VEC], u[VEC];
    load_vec<T, VEC>(x + row * p.x_stride + c, g);
    load_vec<T, VEC>(x + row * p.x_stride + p.inter + c, u);
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] = activation<ACT>(g[e]) * u[e];
    store_vec<T, VEC>(out + row * p.o_stride + c, g);
  }
}
