// irlm kernels: write this step's keys and values into the paged KV cache.
//
// cache: [layers, blocks, 2, block_size, kv_heads, D]; packed token t of request r sits at
// position cached_lens[r] + (t - cu_q_lens[r]), i.e. in block block_tables[r, pos / block_size],
// slot pos % block_size.  One (slot, key-or-value) row holds kv_heads * D contiguous elements,
// so a token's keys are one contiguous copy.  Grid (tokens), 128 threads, VEC-element (16-byte
// when possible) copies; bits are copied unchanged.  C is the cache's element type: T, or
// signed char / irlm_fp8e4m3 for an int8 / fp8 cache, which stores k / k_scale and v / v_scale
// quantized as irlm.ops.llm.kv_to_cache does (common.cuh: quantize_kv), bit for bit.
#include "common.cuh"

struct KvWriteParams {
  const void* k;            // [tokens, kv_heads, D], token stride k_stride
  const void* v;            // [tokens, kv_heads, D], token stride v_stride
  void* cache;
  const int* block_tables;  // [reqs, max_blocks]
  const int* cu_q_lens;     // [reqs + 1]
  const int* cached_lens;   // [reqs]
  long long k_stride, v_stride, layer_offset;
  int num_reqs, kv_heads, head_dim, block_size, block_shift, max_blocks;
  float k_scale, v_scale;   // quantized caches only
};

template <typename T, int VEC, typename C = T>
__global__ void __launch_bounds__(128) irlm_kv_cache_write(const KvWriteParams p) {
  pdl_enter();
  const int t = blockIdx.x;
  const int r = request_of_token(p.cu_q_lens, p.num_reqs, t);
  const int pos = p.cached_lens[r] + t - p.cu_q_lens[r];
  const int blk = p.block_tables[(long long)r * p.max_blocks + (pos >> p.block_shift)];
  const int slot = pos & (p.block_size - 1);
  const long long row = (long long)p.kv_heads * p.head_dim;
  C* dk = reinterpret_cast<C*>(p.cache) + p.layer_offset +
          (long long)blk * 2 * p.block_size * row + slot * row;
  C* dv = dk + p.block_size * row;
  const T* sk = reinterpret_cast<const T*>(p.k) + (long long)t * p.k_stride;
  const T* sv = reinterpret_cast<const T*>(p.v) + (long long)t * p.v_stride;
  const int n = (int)(row / VEC);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if constexpr (KvCacheElem<C>::quantized) {
      float fk[VEC], fv[VEC];
      load_vec<T, VEC>(sk + i * VEC, fk);
      load_vec<T, VEC>(sv + i * VEC, fv);
      store_kv<T, C, VEC>(dk + i * VEC, fk, p.k_scale);
      store_kv<T, C, VEC>(dv + i * VEC, fv, p.v_scale);
    } else {
      *reinterpret_cast<Vec<T, VEC>*>(dk + i * VEC) = *reinterpret_cast<const Vec<T, VEC>*>(sk + i * VEC);
      *reinterpret_cast<Vec<T, VEC>*>(dv + i * VEC) = *reinterpret_cast<const Vec<T, VEC>*>(sv + i * VEC);
    }
  }
}
