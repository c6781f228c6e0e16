// irlm kernels: rotary position embedding on q and k (in place), fused with writing the
// rotated k and v into the paged KV cache.
//
// NEOX (rotate-half, Llama / NeoX): pairs (i, i + rot/2); otherwise GPT-J (interleaved): pairs
// (2i, 2i + 1).  Pair i turns by angle pos * inv_freq[i] (inv_freq has rot/2 float32 entries;
// the launcher computes it, with Llama-3 / linear scaling if asked).  Only the first rot_dim
// dims of each head rotate.  pos is positions[t] when given, else the token's cache position
// cached_lens[r] + (t - cu_q_lens[r]), where the cache write always goes.
// One CTA per token: cos/sin of the token's rot/2 angles go to shared memory once (accurate
// sincosf: this file is compiled without --use_fast_math), then the q heads, the k heads and
// the v copy are spread over the threads in VEC-element chunks.  C is the cache's element type:
// T, or signed char / irlm_fp8e4m3 for an int8 / fp8 cache, which gets the rotated k (rounded
// to T, as stored in k) and v quantized with k_scale / v_scale as kv_cache_write.cu does.
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
  const float* inv_freq;    // [rot_dim / 2]
  long long q_stride, k_stride, v_stride, layer_offset;
  int num_reqs, heads, kv_heads, head_dim, rot_dim;
  int block_size, block_shift, max_blocks;
  float k_scale, v_scale;   // quantized caches only
};

#define IRLM_ROPE_MAX_HALF 256

template <typename T, int VEC>
IRLM_DEVICE void copy_vec(T* dst, const T* src) {
  *reinterpret_cast<Vec<T, VEC>*>(dst) = *reinterpret_cast<const Vec<T, VEC>*>(src);
}

template <typename T, int VEC, bool NEOX, typename C = T>
__global__ void __launch_bounds__(256) irlm_rope_kv_write(const RopeParams p) {
  pdl_enter();
  __shared__ float s_cos[IRLM_ROPE_MAX_HALF], s_sin[IRLM_ROPE_MAX_HALF];
  const int t = blockIdx.x;
  int r = 0, cpos = 0;
  if (p.cache != nullptr || p.positions == nullptr) {
    r = request_of_token(p.cu_q_lens, p.num_reqs, t);
    cpos = p.cached_lens[r] + t - p.cu_q_lens[r];
  }
  const int pos = p.positions != nullptr ? p.positions[t] : cpos;
  const int half = p.rot_dim / 2, D = p.head_dim;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf((float)pos * p.inv_freq[i], &s, &c);
    s_cos[i] = c;
    s_sin[i] = s;
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

  // chunks of VEC elements (NEOX: VEC pairs (i, i + half); GPT-J: VEC / 2 adjacent pairs)
  const int per_head = NEOX ? half / VEC : p.rot_dim / VEC;
  const int nq = p.heads * per_head, nk = p.kv_heads * per_head;
  for (int it = threadIdx.x; it < nq + nk; it += blockDim.x) {
    const bool is_q = it < nq;
    const int j = is_q ? it : it - nq;
    const int h = j / per_head, c = (j % per_head) * VEC;
    T* x = (is_q ? q : k) + h * D;
    if (NEOX) {
      float a[VEC], b[VEC];
      load_vec<T, VEC>(x + c, a);
      load_vec<T, VEC>(x + half + c, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float cs = s_cos[c + e], sn = s_sin[c + e];
        const float a2 = a[e] * cs - b[e] * sn;
        b[e] = b[e] * cs + a[e] * sn;
        a[e] = a2;
      }
      store_vec<T, VEC>(x + c, a);
      store_vec<T, VEC>(x + half + c, b);
      if (!is_q && dk != nullptr) {
        store_kv<T, C, VEC>(dk + h * D + c, a, p.k_scale);
        store_kv<T, C, VEC>(dk + h * D + half + c, b, p.k_scale);
      }
    } else {
      float a[VEC];
      load_vec<T, VEC>(x + c, a);
#pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        const float cs = s_cos[(c + e) / 2], sn = s_sin[(c + e) / 2];
        const float x0 = a[e], x1 = a[e + 1];
        a[e] = x0 * cs - x1 * sn;
        a[e + 1] = x1 * cs + x0 * sn;
      }
      store_vec<T, VEC>(x + c, a);
      if (!is_q && dk != nullptr) store_kv<T, C, VEC>(dk + h * D + c, a, p.k_scale);
    }
  }
  if (dk == nullptr) return;
  // the unrotated tail of k (rot_dim < D) and all of v go to the cache unchanged
  const T* v = reinterpret_cast<const T*>(p.v) + (long long)t * p.v_stride;
  const int tail = (D - p.rot_dim) / VEC, vd = D / VEC;
  const int ntail = p.kv_heads * tail, nv = p.kv_heads * vd;
  for (int it = threadIdx.x; it < ntail + nv; it += blockDim.x) {
    const bool is_k = it < ntail;
    int h, c;
    if (is_k) {
      h = it / tail;
      c = p.rot_dim + (it % tail) * VEC;
    } else {
      const int j = it - ntail;
      h = j / vd;
      c = (j % vd) * VEC;
    }
    C* dst = (is_k ? dk : dv) + h * D + c;
    const T* src = (is_k ? k : v) + h * D + c;
    if constexpr (KvCacheElem<C>::quantized) {
      float f[VEC];
      load_vec<T, VEC>(src, f);
      store_kv<T, C, VEC>(dst, f, is_k ? p.k_scale : p.v_scale);
    } else {
      copy_vec<T, VEC>(dst, src);
    }
  }
}
