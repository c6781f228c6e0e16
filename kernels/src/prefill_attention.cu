// irlm kernels: attention of packed variable-length prompts (chunked prefill) over the paged
// KV cache.
//
// Grid (ceil(max_q_len * G / 64), kv_heads, reqs), 128 threads (flash-attention-2 layout: each
// warp owns 16 of the CTA's 64 (token, head) rows and walks every key tile).  Request r's rows
// attend causally to positions [0, cached_lens[r] + i] (limited by sliding_window), i.e. to its
// cached prefix and to this step's keys, all read from the paged cache: the launcher writes
// this step's keys and values into the cache first (kv_cache_write.cu or rope_kv_write.cu).
// Decode requests (q_len 1) may share the batch.  C: the cache's element type (T, or an
// int8 / fp8 cache: attention.cuh).
#include "attention.cuh"

template <typename T, int D, int BLOCK_N, typename C = T>
__global__ void __launch_bounds__(128) irlm_prefill_attention(const AttnParams p) {
  pdl_enter();
  paged_attention_tile<T, D, 4, 1, BLOCK_N, false, C>(p);
}
