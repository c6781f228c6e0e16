// irlm kernels: rotary position embedding on q and k, fused with writing the rotated k and v
// into the paged KV cache.
//
// NEOX (rotate-half, Llama / NeoX): pairs (i, i + rot/2); otherwise GPT-J (interleaved): pairs
// (2i, 2i + 1).  Only the first rot_dim dims of each head rotate.  Element j of the rotated
// dims becomes x[j] cos[j] - x[partner] sin[j] for the first of its pair and
// x[j] cos[j] + x[partner] sin[j] for the second, with cos / sin either
//  * read from a table row per token (cos / sin [tokens, rot_dim], row stride cs_stride):
//    the graph's own tables, so the result is llm.rope's, or
//  * computed: pair i turns by angle pos * inv_freq[i] (inv_freq has rot/2 float32 entries;
//    the launcher computes it, with Llama-3 / linear scaling if asked), accurate sincosf (this
//    file is compiled without --use_fast_math).  pos is positions[t] when given, else the
//    token's cache position cached_lens[r] + (t - cu_q_lens[r]), where the cache write always
//    goes.
// The rotated q and k go to q_out / k_out when given (with k's unrotated tail dims), else back
// in place.  One CTA per token: the token's cos / sin go to shared memory once, then the q
// heads, the k heads and the v copy are spread over the threads in VEC-element chunks.  C is
// the cache's element type: T, or signed char / irlm_fp8e4m3 for an int8 / fp8 cache, which
// gets the rotated k (rounded to T, as stored in k) and v quantized with k_scale / v_scale as
// kv_cache_write.cu does.
#include "common.cuh"

struct RopeParams {
  void* q;                  // [tokens, heads, D]
  void* k;                  // [tokens, kv_heads, D]
  const void* v;            // [tokens, kv_heads, D] (cache write only)
  void* cache;              // null: rotate only
  const int* block_tables;
  const int* cu_q_lens;     // [reqs + 1]
  const int* cached_lens;   // [reqs]
  const int* positions;     // [tokens] or null
  const float* inv_freq;    // [rot_dim / 2], or null with a cos / sin table
  const void* cos;          // [tokens, rot_dim] of T, row stride cs_stride (or null)
  const void* sin;
  void* q_out;              // [tokens, heads, D] (null: q in place)
  void* k_out;              // [tokens, kv_heads, D] (null: k in place)
  long long q_stride, k_stride, v_stride, layer_offset, cs_stride, q_out_stride, k_out_stride;
  int num_reqs, heads, kv_heads, head_dim, rot_dim;
  int block_size, block_shift, max_blocks;
  float k_scale, v_scale;   // quantized caches only
};

#define IRLM_ROPE_MAX_HALF 256

template <typename T, int VEC>
IRLM_DEVICE void copy_vec(T* dst, const T* src) {
  *reinterpret_cast<Vec<T, VEC>*>(dst) = *reinterpret_cast<const Vec<T, VEC>*>(src);
}

// one chunk of T from src to the cache (quantized there when C is int8 / fp8)
template <typename T, typename C, int VEC>
IRLM_DEVICE void write_kv(C* dst, const T* src, float scale) {
  if constexpr (KvCacheElem<C>::quantized) {
    float f[VEC];
    load_vec<T, VEC>(src, f);
    store_kv<T, C, VEC>(dst, f, scale);
  } else {
    copy_vec<T, VEC>(reinterpret_cast<T*>(dst), src);
  }
}

template <typename T, int VEC, bool NEOX, typename C = T>
__global__ void __launch_bounds__(256) irlm_rope_kv_write(const RopeParams p) {
  pdl_enter();
  // cos / sin of each rotated element j (the two of a pair share them when computed)
  __shared__ float s_cos[2 * IRLM_ROPE_MAX_HALF], s_sin[2 * IRLM_ROPE_MAX_HALF];
  const int t = blockIdx.x;
  int r = 0, cpos = 0;
  if (p.cache != nullptr || (p.positions == nullptr && p.cos == nullptr)) {
    r = request_of_token(p.cu_q_lens, p.num_reqs, t);
    cpos = p.cached_lens[r] + t - p.cu_q_lens[r];
  }
  const int half = p.rot_dim / 2, D = p.head_dim;
  if (p.cos != nullptr) {
    const T* ct = reinterpret_cast<const T*>(p.cos) + (long long)t * p.cs_stride;
    const T* st = reinterpret_cast<const T*>(p.sin) + (long long)t * p.cs_stride;
    for (int j = threadIdx.x; j < p.rot_dim; j += blockDim.x) {
      s_cos[j] = to_float(ct[j]);
      s_sin[j] = to_float(st[j]);
    }
  } else {
    const int pos = p.positions != nullptr ? p.positions[t] : cpos;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      float s, c;
      sincosf((float)pos * p.inv_freq[i], &s, &c);
      const int j0 = NEOX ? i : 2 * i, j1 = NEOX ? i + half : 2 * i + 1;
      s_cos[j0] = c;
      s_sin[j0] = s;
      s_cos[j1] = c;
      s_sin[j1] = s;
    }
  }
  __syncthreads();

  C* dk = nullptr;
  C* dv = nullptr;
  if (p.cache != nullptr) {
    const int blk = p.block_tables[(long long)r * p.max_blocks + (cpos >> p.block_shift)];
    const int slot = cpos & (p.block_size - 1);
    const long long row = (long long)p.kv_heads * D;
    dk = reinterpret_cast<C*>(p.cache) + p.layer_offset +
         (long long)blk * 2 * p.block_size * row + slot * row;
    dv = dk + p.block_size * row;
  }
  T* q = reinterpret_cast<T*>(p.q) + (long long)t * p.q_stride;
  T* k = reinterpret_cast<T*>(p.k) + (long long)t * p.k_stride;
  T* qo = p.q_out != nullptr ? reinterpret_cast<T*>(p.q_out) + (long long)t * p.q_out_stride : q;
  T* ko = p.k_out != nullptr ? reinterpret_cast<T*>(p.k_out) + (long long)t * p.k_out_stride : k;

  // chunks of VEC elements (NEOX: VEC pairs (i, i + half); GPT-J: VEC / 2 adjacent pairs)
  const int per_head = NEOX ? half / VEC : p.rot_dim / VEC;
  const int nq = p.heads * per_head, nk = p.kv_heads * per_head;
  for (int it = threadIdx.x; it < nq + nk; it += blockDim.x) {
    const bool is_q = it < nq;
    const int j = is_q ? it : it - nq;
    const int h = j / per_head, c = (j % per_head) * VEC;
    const T* x = (is_q ? q : k) + h * D;
    T* y = (is_q ? qo : ko) + h * D;
    if (NEOX) {
      float a[VEC], b[VEC];
      load_vec<T, VEC>(x + c, a);
      load_vec<T, VEC>(x + half + c, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int j0 = c + e, j1 = half + c + e;
        const float a2 = a[e] * s_cos[j0] - b[e] * s_sin[j0];
        b[e] = b[e] * s_cos[j1] + a[e] * s_sin[j1];
        a[e] = a2;
      }
      store_vec<T, VEC>(y + c, a);
      store_vec<T, VEC>(y + half + c, b);
      if (!is_q && dk != nullptr) {
        store_kv<T, C, VEC>(dk + h * D + c, a, p.k_scale);
        store_kv<T, C, VEC>(dk + h * D + half + c, b, p.k_scale);
      }
    } else {
      float a[VEC];
      load_vec<T, VEC>(x + c, a);
#pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        const int j = c + e;
        const float x0 = a[e], x1 = a[e + 1];
        a[e] = x0 * s_cos[j] - x1 * s_sin[j];
        a[e + 1] = x1 * s_cos[j + 1] + x0 * s_sin[j + 1];
      }
      store_vec<T, VEC>(y + c, a);
      if (!is_q && dk != nullptr) store_kv<T, C, VEC>(dk + h * D + c, a, p.k_scale);
    }
  }
  // the unrotated tail dims (rot_dim < D) of q and k when rotated out of place, the tail of
  // k and all of v to the cache
  const bool oop_q = p.q_out != nullptr, oop_k = p.k_out != nullptr;
  const int tail = (D - p.rot_dim) / VEC;
  const int nqt = oop_q ? p.heads * tail : 0;
  const int nkt = (oop_k || dk != nullptr) ? p.kv_heads * tail : 0;
  const int nv = dk != nullptr ? p.kv_heads * (D / VEC) : 0;
  const T* v = dk != nullptr ? reinterpret_cast<const T*>(p.v) + (long long)t * p.v_stride
                             : nullptr;
  for (int it = threadIdx.x; it < nqt + nkt + nv; it += blockDim.x) {
    if (it < nqt) {
      const int h = it / tail, c = p.rot_dim + (it % tail) * VEC;
      copy_vec<T, VEC>(qo + h * D + c, q + h * D + c);
    } else if (it < nqt + nkt) {
      const int j = it - nqt;
      const int h = j / tail, c = p.rot_dim + (j % tail) * VEC;
      if (oop_k) copy_vec<T, VEC>(ko + h * D + c, k + h * D + c);
      if (dk != nullptr) write_kv<T, C, VEC>(dk + h * D + c, k + h * D + c, p.k_scale);
    } else {
      const int j = it - nqt - nkt, vd = D / VEC;
      const int h = j / vd, c = (j % vd) * VEC;
      write_kv<T, C, VEC>(dv + h * D + c, v + h * D + c, p.v_scale);
    }
  }
}
