// irlm kernels: rotary position embedding, rotate-half form (Llama, NeoX, Qwen, Mistral...).
//
// x viewed as [B, H, T, D] with any strides but a contiguous last dim (the attention layout
// [1, heads, tokens, head_dim] is a transposed view of the projection's output, so no copy
// is made); cos/sin [B, H, T, R] broadcast views (stride 0 where they broadcast), R <= D
// rotary dims.  For i < R/2:  out[i] = x[i] cos[i] - x[i+R/2] sin[i],
// out[i+R/2] = x[i+R/2] cos[i+R/2] + x[i] sin[i+R/2]; dims >= R pass through.  fp32 math,
// one rounding.  Grid (T, H, B), one thread per rotated pair (and per passed-through dim).
#include "common.cuh"

struct RopeApplyParams {
  const void* x;
  void* out;
  const void* cos;
  const void* sin;
  long long xs[3], os[3], cs[3];  // strides of dims B, H, T (elements)
  int D, R;
};

template <typename T, typename TC>
__global__ void __launch_bounds__(128) irlm_rope(const RopeApplyParams p) {
  pdl_enter();
  const long long t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.xs[0] + h * p.xs[1] + t * p.xs[2];
  T* out = reinterpret_cast<T*>(p.out) + b * p.os[0] + h * p.os[1] + t * p.os[2];
  const long long c_off = b * p.cs[0] + h * p.cs[1] + t * p.cs[2];
  const TC* c = reinterpret_cast<const TC*>(p.cos) + c_off;
  const TC* s = reinterpret_cast<const TC*>(p.sin) + c_off;
  const int half = p.R / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    out[i] = from_float<T>(x1 * to_float(c[i]) - x2 * to_float(s[i]));
    out[i + half] = from_float<T>(x2 * to_float(c[i + half]) + x1 * to_float(s[i + half]));
  }
  for (int i = p.R + threadIdx.x; i < p.D; i += blockDim.x) out[i] = x[i];
}
