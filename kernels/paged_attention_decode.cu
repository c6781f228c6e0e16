// irlm kernels: decode attention over the paged KV cache (one query token per request).
//
// Grid (tiles * num_splits, kv_heads, reqs), 128 threads.  A CTA takes the G = heads / kv_heads
// query heads of one kv head (16 rows per tile; tiles = ceil(G / 16)), so each K/V row is read
// from the cache once for all of them, and one of num_splits partitions of the context
// (flash-decoding).  Its four warps split each 64-key tile (32 for float32) four ways and are
// merged at the end.  With num_splits > 1, irlm_attention_split_reduce combines the partitions.
// The query of request r sits at position cached_lens[r]; its key and value must already be in
// the cache (kv_cache_write.cu or rope_kv_write.cu, run first by the launcher).
#include "attention.cuh"

template <typename T, int D, int BLOCK_N>
__global__ void __launch_bounds__(128) irlm_paged_attention_decode(const AttnParams p) {
  paged_attention_tile<T, D, 1, 4, BLOCK_N, true>(p);
}

// Combine the num_splits partial outputs of each (request, head).  Grid (ceil(heads / 4), reqs),
// 128 threads: one warp per head.
template <typename T, int D>
__global__ void __launch_bounds__(128) irlm_attention_split_reduce(const AttnParams p) {
  const int r = blockIdx.y, h = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (h >= p.heads) return;
  const int qpos = p.cached_lens[r];
  const int kbeg = p.window > 0 ? max(0, qpos - p.window + 1) : 0;
  const int n = min(p.num_splits, (qpos + 1 - kbeg + p.split_size - 1) / p.split_size);
  float mx = IRLM_NEG_INF;
  for (int s = 0; s < n; ++s) {
    const long long idx = ((long long)s * p.num_tokens + r) * p.heads + h;
    mx = fmaxf(mx, p.part_ml[idx * 2]);
  }
  const float m_use = mx == IRLM_NEG_INF ? 0.f : mx;
  float total = 0.f;
  for (int s = 0; s < n; ++s) {
    const long long idx = ((long long)s * p.num_tokens + r) * p.heads + h;
    total += p.part_ml[idx * 2 + 1] * exp2f(p.part_ml[idx * 2] - m_use);
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = reinterpret_cast<T*>(p.out) + (long long)r * p.o_stride + (long long)h * D;
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int s = 0; s < n; ++s) {
      const long long idx = ((long long)s * p.num_tokens + r) * p.heads + h;
      const float w = p.part_ml[idx * 2 + 1] * exp2f(p.part_ml[idx * 2] - m_use);
      o += w * p.part_out[idx * D + d];
    }
    out[d] = from_float<T>(o * inv);
  }
}
