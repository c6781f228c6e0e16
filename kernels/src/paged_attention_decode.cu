// irlm kernels: decode attention over the paged KV cache (one query token per request).
//
// Grid (tiles * num_splits, kv_heads, reqs), 128 threads.  A CTA takes the G = heads / kv_heads
// query heads of one kv head (16 rows per tile; tiles = ceil(G / 16)), so each K/V row is read
// from the cache once for all of them, and one of num_splits partitions of the context
// (flash-decoding).  Its four warps split each 64-key tile (32 for float32) four ways and are
// merged at the end.  With num_splits > 1, irlm_attention_split_reduce combines the partitions (at most 128).
// The query of request r sits at position cached_lens[r]; its key and value must already be in
// the cache (kv_cache_write.cu or rope_kv_write.cu, run first by the launcher).  C is the
// cache's element type: T, or signed char / irlm_fp8e4m3 for an int8 / fp8 cache
// (attention.cuh); partial outputs of a quantized cache already carry the value scale.
#include "attention.cuh"

template <typename T, int D, int BLOCK_N, typename C = T>
__global__ void __launch_bounds__(128) irlm_paged_attention_decode(const AttnParams p) {
  pdl_enter();
  paged_attention_tile<T, D, 1, 4, BLOCK_N, true, C>(p);
}

// Combine the partial outputs of one (request, head): grid (heads, reqs), 128 threads.  The
// weights of the n <= 128 non-empty partitions (l_s * 2^(m_s - max), normalised) go to shared
// memory; then G = floor(128 / (D / 4)) groups of threads each sum every G-th partition's
// float4 columns (independent loads, several in flight per thread) and the groups are added at
// the end.  Threads past G groups (head dims whose D / 4 does not divide 128: 80, 96) idle.
#define IRLM_MAX_SPLITS 128

template <typename T, int D>
__global__ void __launch_bounds__(128) irlm_attention_split_reduce(const AttnParams p) {
  pdl_enter();
  constexpr int V4 = D / 4;        // float4 columns of a head
  constexpr int G = 128 / V4;      // partition groups
  static_assert(D % 4 == 0 && V4 <= 128, "head_dim must be a multiple of 4, at most 512");
  __shared__ float scratch[33];
  __shared__ float s_w[IRLM_MAX_SPLITS];
  __shared__ float4 s_red[G][V4];
  const int r = blockIdx.y, h = blockIdx.x, tid = threadIdx.x;
  const int qpos = p.cached_lens[r];
  const int kbeg = p.window > 0 ? max(0, qpos - p.window + 1) : 0;
  const int n = min(min(p.num_splits, IRLM_MAX_SPLITS),
                    (qpos + 1 - kbeg + p.split_size - 1) / p.split_size);
  const long long row = (long long)r * p.heads + h;            // token r, head h
  const long long split_stride = (long long)p.num_tokens * p.heads;
  float m = IRLM_NEG_INF, l = 0.f;
  if (tid < n) {
    m = p.part_ml[(tid * split_stride + row) * 2];
    l = p.part_ml[(tid * split_stride + row) * 2 + 1];
  }
  const float mx = block_max(m, scratch);
  const float w = tid < n ? l * exp2f(m - (mx == IRLM_NEG_INF ? 0.f : mx)) : 0.f;
  const float total = block_sum(w, scratch);
  if (tid < n) s_w[tid] = total > 0.f ? w / total : 0.f;
  __syncthreads();
  const int c = tid % V4, grp = tid / V4;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* src = reinterpret_cast<const float4*>(p.part_out) + row * V4 + c;
  if (grp < G) {
#pragma unroll 4
    for (int s = grp; s < n; s += G) {
      const float4 x = src[s * split_stride * V4];
      const float ws = s_w[s];
      acc.x += ws * x.x; acc.y += ws * x.y; acc.z += ws * x.z; acc.w += ws * x.w;
    }
    s_red[grp][c] = acc;
  }
  __syncthreads();
  if (grp == 0) {
    float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float4 x = s_red[g][c];
      o[0] += x.x; o[1] += x.y; o[2] += x.z; o[3] += x.w;
    }
    store_vec<T, 4>(reinterpret_cast<T*>(p.out) + (long long)r * p.o_stride + (long long)h * D +
                    c * 4, o);
  }
}
