// irlm kernels: the tiled, tensor-core attention core shared by paged_attention_decode.cu and
// prefill_attention.cu.
//
// One CTA owns BLOCK_M = 16 * WARPS_M "query rows" of one request and one kv head, where a row
// is a (token, query head) pair: row i of request r is token i / G, head kv_head * G + i % G
// (G = heads / kv_heads).  All G query heads of a kv head therefore share every K/V tile, which
// is read once from the paged cache [layers, blocks, 2, block_size, kv_heads, D] (cp.async,
// 16-byte chunks, two shared-memory stages).  Scores and P@V run on the tensor cores:
// mma.sync m16n8k16 (bf16 / fp16, fragments through ldmatrix) or m16n8k8 tf32 (float32).
// Softmax is online in the log2 domain with fp32 statistics and accumulators.
//
// Warps: WARPS_M warps split the rows (prefill: 4 x 16 rows, flash-attention-2 style);
// WARPS_N warps split the keys of each tile (decode: one 16-row tile, four warps each taking a
// quarter of the keys) and are merged through shared memory at the end.  A CTA may also take
// one of `num_splits` partitions of the key range (split-K / flash-decoding); it then writes a
// normalised partial output and its (max, sum) to part_out / part_ml for
// irlm_attention_split_reduce, or (decode, split_counters given) counts itself done and, if it
// is the tile's last partition, combines them all itself (fold_splits).
//
// Quantized caches (C = signed char for int8, irlm_fp8e4m3): the 8-bit K/V tiles are copied to
// shared memory as they are (cp.async, half the bytes of a bf16 tile), then converted in
// registers to T (exact: every int8 and e4m3 value is a bf16 / fp16 / tf32 value) into one
// T tile that the same tensor-core code reads.  The scales are applied in f32 where they are
// exact up to rounding order: the key scale is folded into scale_log2 by the launcher
// (q . (k * s) == s * (q . k)) and the value scale multiplies the normalised output.
#pragma once
#include "common.cuh"

#define IRLM_LOG2E 1.4426950408889634f

// Kernel parameters (passed by value; mirrored by a ctypes.Structure in kernels/ops.py: keep
// the two in the same order).
struct AttnParams {
  const void* q;            // [tokens, heads, D]; token stride q_stride, heads contiguous
  void* out;                // [tokens, heads, D]; token stride o_stride
  const void* cache;        // the pool's first element
  const int* block_tables;  // [reqs, max_blocks]
  const int* cu_q_lens;     // [reqs + 1] prefix sums of q_lens (prefill; unused by decode)
  const int* cached_lens;   // [reqs]
  const float* alibi;       // [heads] or null
  float* part_out;          // [splits, tokens, heads, D] when num_splits > 1
  float* part_ml;           // [splits, tokens, heads, 2]: (max in log2 units, sum)
  int* split_counters;      // decode with num_splits > 1: [reqs, kv_heads, tiles] zeros, or null.
                            // Given, the last partition of a tile to finish combines them
                            // (fold_splits) and no reduce kernel runs; it leaves the count at 0
  long long q_stride;
  long long o_stride;
  long long layer_offset;   // elements from the pool's start to layer `layer`
  int num_reqs, heads, kv_heads, group;
  int block_size, block_shift, max_blocks;
  int window;               // 0: no sliding window
  int num_splits, split_size;
  int num_tokens;
  int smem_bytes;           // dynamic shared memory given at launch (checked)
  float scale_log2;         // softmax scale * log2(e) (times the key scale: quantized caches)
  float v_scale;            // quantized caches: the value scale (unquantized kernels ignore it)
};

// ---- tensor-core primitives ----------------------------------------------------------------
IRLM_DEVICE void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
IRLM_DEVICE void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T> IRLM_DEVICE void mma16816(float (&d)[4], const unsigned (&a)[4],
                                                unsigned b0, unsigned b1);
template <> IRLM_DEVICE void mma16816<irlm_bf16>(float (&d)[4], const unsigned (&a)[4],
                                                 unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> IRLM_DEVICE void mma16816<irlm_fp16>(float (&d)[4], const unsigned (&a)[4],
                                                 unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
IRLM_DEVICE void mma1688_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
IRLM_DEVICE unsigned to_tf32(float f) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
  return r;
}

// S[16 x 8*NS] += Q[16 x D] K[8*NS x D]^T for one warp.  sQ: the warp's first query row,
// sK: its first key row, both with a row pitch of LD elements.
template <typename T, int D, int NS, int LD>
struct WarpMma {
  static IRLM_DEVICE void qk(float (&s)[NS][4], const T* sQ, const T* sK, int lane) {
    static_assert(NS % 2 == 0, "16-bit path takes keys in pairs of n8 tiles");
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      unsigned a[4];
      ldmatrix_x4(a, sQ + (lane & 15) * LD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int j = 0; j < NS; j += 2) {
        unsigned b[4];
        ldmatrix_x4(b, sK + (j * 8 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk +
                           ((lane >> 3) & 1) * 8);
        mma16816<T>(s[j], a, b[0], b[1]);
        mma16816<T>(s[j + 1], a, b[2], b[3]);
      }
    }
  }
  // acc[16 x D] += P[16 x 8*NS] V[8*NS x D]; P is s (already exponentiated), C-fragment layout.
  static IRLM_DEVICE void pv(float (&acc)[D / 8][4], const float (&s)[NS][4], const T* sV,
                             int lane) {
#pragma unroll
    for (int j = 0; j < NS / 2; ++j) {
      unsigned a[4];
      a[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
      a[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
      a[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
      a[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 8; dn += 2) {
        unsigned b[4];
        ldmatrix_x4_trans(b, sV + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dn * 8 +
                                 (lane >> 4) * 8);
        mma16816<T>(acc[dn], a, b[0], b[1]);
        mma16816<T>(acc[dn + 1], a, b[2], b[3]);
      }
    }
  }
};

// float32: tf32 m16n8k8 with fragments read straight from shared memory.
template <int D, int NS, int LD>
struct WarpMma<float, D, NS, LD> {
  static IRLM_DEVICE void qk(float (&s)[NS][4], const float* sQ, const float* sK, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < D; kk += 8) {
      unsigned a[4];
      a[0] = to_tf32(sQ[g * LD + kk + t]);
      a[1] = to_tf32(sQ[(g + 8) * LD + kk + t]);
      a[2] = to_tf32(sQ[g * LD + kk + t + 4]);
      a[3] = to_tf32(sQ[(g + 8) * LD + kk + t + 4]);
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        const float* kr = sK + (j * 8 + g) * LD + kk;
        mma1688_tf32(s[j], a, to_tf32(kr[t]), to_tf32(kr[t + 4]));
      }
    }
  }
  static IRLM_DEVICE void pv(float (&acc)[D / 8][4], const float (&s)[NS][4], const float* sV,
                             int lane) {
    const int g = lane >> 2, t = lane & 3;
    const int src0 = (lane & ~3) | (t >> 1), src1 = src0 + 2;
    const bool odd = t & 1;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      // C layout (row g / g+8, keys 2t, 2t+1) -> A layout (row g / g+8, keys t and t+4).
      float x0 = __shfl_sync(0xffffffffu, s[j][0], src0);
      float x1 = __shfl_sync(0xffffffffu, s[j][1], src0);
      float y0 = __shfl_sync(0xffffffffu, s[j][2], src0);
      float y1 = __shfl_sync(0xffffffffu, s[j][3], src0);
      float z0 = __shfl_sync(0xffffffffu, s[j][0], src1);
      float z1 = __shfl_sync(0xffffffffu, s[j][1], src1);
      float w0 = __shfl_sync(0xffffffffu, s[j][2], src1);
      float w1 = __shfl_sync(0xffffffffu, s[j][3], src1);
      unsigned a[4];
      a[0] = to_tf32(odd ? x1 : x0);
      a[1] = to_tf32(odd ? y1 : y0);
      a[2] = to_tf32(odd ? z1 : z0);
      a[3] = to_tf32(odd ? w1 : w0);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        unsigned b0 = to_tf32(sV[(j * 8 + t) * LD + dn * 8 + g]);
        unsigned b1 = to_tf32(sV[(j * 8 + t + 4) * LD + dn * 8 + g]);
        mma1688_tf32(acc[dn], a, b0, b1);
      }
    }
  }
};

// Shared-memory bytes of one CTA (kernels/ops.py computes the same number).  C: the cache's
// element type (T, or an 8-bit one: then the two cp.async stages hold 8-bit K/V tiles with a
// row pitch of D bytes, followed by one K/V tile converted to T).
template <typename T, int D, int WARPS_M, int WARPS_N, int BLOCK_N, typename C = T>
struct AttnSmem {
  static constexpr bool QUANT = KvCacheElem<C>::quantized;
  static constexpr int EPC = 16 / (int)sizeof(T);  // elements per 16-byte chunk
  static constexpr int LD = D + EPC;                // padded row pitch (elements)
  static constexpr int BLOCK_M = 16 * WARPS_M;
  static constexpr int Q_BYTES = BLOCK_M * LD * (int)sizeof(T);
  static constexpr int TILE_BYTES = 2 * BLOCK_N * LD * (int)sizeof(T);     // K and V as T
  static constexpr int RAW_BYTES = QUANT ? 2 * 2 * BLOCK_N * D : 0;        // 2 stages, 8-bit
  static constexpr int KV_BYTES = QUANT ? RAW_BYTES + TILE_BYTES : 2 * TILE_BYTES;
  static constexpr int LDA = D + 4;
  static constexpr int EPI_BYTES = (WARPS_N * BLOCK_M * LDA + 2 * WARPS_N * BLOCK_M) * 4;
  static constexpr int BYTES = Q_BYTES + (KV_BYTES > EPI_BYTES ? KV_BYTES : EPI_BYTES);
};

// Decode with split_counters: after this CTA's partial of partition `split` is stored, count
// it; the CTA that brings the count to the request's number of non-empty partitions n (the
// empty ones return before storing anything, and n is computed as irlm_attention_split_reduce
// does) combines the n partials of its rows exactly as that kernel weighs them
// (l_s * 2^(m_s - max), normalised) and resets the count for the next launch.  The fences order
// every CTA's partial stores before its count, and the last CTA's count before its reads; the
// reads bypass L1 (__ldcg), which other SMs' stores do not update.
template <typename T, int D, int BLOCK_M>
IRLM_DEVICE void fold_splits(const AttnParams& p, int r, int kvh, int tile, int rows) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  const int cached = p.cached_lens[r];
  const int kbeg = p.window > 0 ? max(0, cached - p.window + 1) : 0;
  const int n = min(p.num_splits, (cached + 1 - kbeg + p.split_size - 1) / p.split_size);
  if (threadIdx.x == 0) {
    const int tiles = gridDim.x / p.num_splits;
    int* count = p.split_counters + ((long long)r * p.kv_heads + kvh) * tiles + tile;
    s_last = atomicAdd(count, 1) == n - 1;
    if (s_last) *count = 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const long long split_stride = (long long)p.num_tokens * p.heads;
  T* og = reinterpret_cast<T*>(p.out);
  const int row0 = tile * BLOCK_M;
  for (int c = threadIdx.x; c < BLOCK_M * (D / 4); c += blockDim.x) {
    const int lr = c / (D / 4), d = (c % (D / 4)) * 4;
    const int grow = row0 + lr;
    if (grow >= rows) continue;
    const int h = kvh * p.group + grow;          // decode: one token, row = head in the group
    const long long row = (long long)r * p.heads + h;
    float mx = IRLM_NEG_INF;
    for (int s = 0; s < n; ++s) mx = fmaxf(mx, __ldcg(p.part_ml + (s * split_stride + row) * 2));
    const float m_use = mx == IRLM_NEG_INF ? 0.f : mx;
    float total = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < n; ++s) {
      const long long i = s * split_stride + row;
      const float w = __ldcg(p.part_ml + i * 2 + 1) * exp2f(__ldcg(p.part_ml + i * 2) - m_use);
      const float4 x = __ldcg(reinterpret_cast<const float4*>(p.part_out + i * D + d));
      total += w;
      o[0] += w * x.x; o[1] += w * x.y; o[2] += w * x.z; o[3] += w * x.w;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] *= inv;
    store_vec<T, 4>(og + (long long)r * p.o_stride + (long long)h * D + d, o);
  }
}

template <typename T, int D, int WARPS_M, int WARPS_N, int BLOCK_N, bool DECODE, typename C = T>
IRLM_DEVICE void paged_attention_tile(const AttnParams& p) {
  using S = AttnSmem<T, D, WARPS_M, WARPS_N, BLOCK_N, C>;
  constexpr bool QUANT = S::QUANT;
  static_assert(QUANT || sizeof(C) == sizeof(T), "a cache of another float type than q");
  constexpr int NT = WARPS_M * WARPS_N * 32;
  constexpr int BLOCK_M = S::BLOCK_M;
  constexpr int KPW = BLOCK_N / WARPS_N;  // keys per warp per tile
  constexpr int NS = KPW / 8;             // n8 score tiles per warp
  constexpr int EPC = S::EPC;
  constexpr int CPR = D / EPC;            // 16-byte chunks per row
  constexpr int LD = S::LD;
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  static_assert(KPW % (sizeof(T) == 4 ? 8 : 16) == 0, "keys per warp must fill the mma k");

  constexpr int CEPC = 16 / (int)sizeof(C);  // cache elements per 16-byte chunk
  constexpr int CCPR = D / CEPC;              // 16-byte chunks per cache row
  constexpr int CLD = QUANT ? D : LD;         // row pitch of the cp.async stages (elements)

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  C* sKV = reinterpret_cast<C*>(smem_raw + S::Q_BYTES);            // 2 stages x (K, V)
  T* sConv = reinterpret_cast<T*>(smem_raw + S::Q_BYTES + S::RAW_BYTES);  // QUANT: K, V as T

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int g = lane >> 2, t4 = lane & 3;
  const int r = blockIdx.z, kvh = blockIdx.y;
  const int split = blockIdx.x % p.num_splits, tile = blockIdx.x / p.num_splits;
  if (tid == 0 && p.smem_bytes < S::BYTES) __trap();  // launcher/kernel mismatch: never silent

  int q_start, q_len;
  if (DECODE) {
    q_start = r;
    q_len = 1;
  } else {
    q_start = p.cu_q_lens[r];
    q_len = p.cu_q_lens[r + 1] - q_start;
  }
  const int G = p.group;
  const int rows = q_len * G;
  const int row0 = tile * BLOCK_M;
  if (row0 >= rows) return;
  const int cached = p.cached_lens[r];
  const int row_last = min(rows, row0 + BLOCK_M) - 1;
  const int qpos_lo = cached + row0 / G, qpos_hi = cached + row_last / G;
  int kbeg = p.window > 0 ? max(0, qpos_lo - p.window + 1) : 0;
  int kend = qpos_hi + 1;
  if (p.num_splits > 1) {
    kbeg += split * p.split_size;
    kend = min(kend, kbeg + p.split_size);
    if (kbeg >= kend) return;  // the reduce kernel counts only the non-empty partitions
  }

  // ---- Q tile -> shared memory (rows past the request are zero) ----
  const T* qg = reinterpret_cast<const T*>(p.q);
#pragma unroll
  for (int c0 = 0; c0 < BLOCK_M * CPR; c0 += NT) {
    const int c = c0 + tid;
    if ((BLOCK_M * CPR) % NT != 0 && c >= BLOCK_M * CPR) break;
    const int i = c / CPR, ch = c % CPR;
    const int grow = row0 + i;
    const bool ok = grow < rows;
    const T* src = qg;
    if (ok) {
      const int tok = grow / G, h = kvh * G + grow % G;
      src = qg + (long long)(q_start + tok) * p.q_stride + (long long)h * D + ch * EPC;
    }
    cp_async16(sQ + i * LD + ch * EPC, src, ok);
  }

  // ---- paged K/V tiles ----
  const C* cache = reinterpret_cast<const C*>(p.cache) + p.layer_offset;
  const int* table = p.block_tables + (long long)r * p.max_blocks;
  const long long slot_stride = (long long)p.kv_heads * D;
  const long long v_offset = (long long)p.block_size * slot_stride;
  const long long block_stride = 2 * v_offset;
  auto load_tile = [&](int stage, int k0) {
    C* sK = sKV + stage * 2 * BLOCK_N * CLD;
    C* sV = sK + BLOCK_N * CLD;
#pragma unroll
    for (int c0 = 0; c0 < BLOCK_N * CCPR; c0 += NT) {
      const int c = c0 + tid;
      if ((BLOCK_N * CCPR) % NT != 0 && c >= BLOCK_N * CCPR) break;
      const int i = c / CCPR, ch = c % CCPR;
      const int pos = k0 + i;
      const bool ok = pos < kend;
      const C* src = cache;
      if (ok) {
        const int blk = __ldg(table + (pos >> p.block_shift));
        const int slot = pos & (p.block_size - 1);
        src = cache + (long long)blk * block_stride + slot * slot_stride + kvh * D + ch * CEPC;
      }
      cp_async16(sK + i * CLD + ch * CEPC, src, ok);
      cp_async16(sV + i * CLD + ch * CEPC, ok ? src + v_offset : src, ok);
    }
  };
  // QUANT: a stage's 8-bit K and V rows (2 * BLOCK_N rows of D bytes, K first) -> sConv as T.
  // Rows past kend were zero-filled, so they convert to zeros (never NaN: P is 0 there).
  auto convert_tile = [&](int stage) {
    if constexpr (QUANT) {
      const unsigned char* raw =
          reinterpret_cast<const unsigned char*>(sKV + stage * 2 * BLOCK_N * CLD);
      // 8 codes a thread and step: 8-byte reads and (16-bit T) 16-byte writes that are
      // consecutive across the threads, so neither side has bank conflicts
#pragma unroll 4
      for (int c = tid; c < 2 * BLOCK_N * (D / 8); c += NT) {
        const int row = c / (D / 8), ch = c % (D / 8);
        float f[8];
        kv8_to_float<C>(*reinterpret_cast<const uint2*>(raw + row * D + ch * 8), f);
        T* dst = sConv + row * LD + ch * 8;
#pragma unroll
        for (int j = 0; j < 8; j += EPC) {
          float part[EPC];
#pragma unroll
          for (int e = 0; e < EPC; ++e) part[e] = f[j + e];
          store_vec<T, EPC>(dst + j, part);
        }
      }
    }
  };

  // Per-lane constants of the two rows (g, g + 8) this lane holds in C fragments.
  int qpos_r[2];
  float slope_r[2];
  bool valid_r[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int grow = row0 + wm * 16 + g + 8 * hr;
    valid_r[hr] = grow < rows;
    const int tok = grow / G, h = kvh * G + grow % G;
    qpos_r[hr] = cached + tok;
    slope_r[hr] = (p.alibi != nullptr && valid_r[hr]) ? p.alibi[h] * IRLM_LOG2E : 0.f;
  }

  float m_i[2] = {IRLM_NEG_INF, IRLM_NEG_INF};
  float l_i[2] = {0.f, 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  const int ntiles = (kend - kbeg + BLOCK_N - 1) / BLOCK_N;
  load_tile(0, kbeg);
  cp_async_commit();

  for (int it = 0; it < ntiles; ++it) {
    const int k0 = kbeg + it * BLOCK_N;
    if (it + 1 < ntiles) load_tile((it + 1) & 1, k0 + BLOCK_N);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sK;
    if constexpr (QUANT) {
      convert_tile(it & 1);
      __syncthreads();
      sK = sConv;
    } else {
      sK = reinterpret_cast<const T*>(sKV) + (it & 1) * 2 * BLOCK_N * LD;
    }
    const T* sV = sK + BLOCK_N * LD;
    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    WarpMma<T, D, NS, LD>::qk(s, sQ + wm * 16 * LD, sK + wn * KPW * LD, lane);

    // mask, scale, alibi (log2 units).  A tile that no row masks (wholly before the earliest
    // query, inside the window and the partition, no alibi) is only scaled.  Rows past the
    // request are never stored, so they need no mask there.
    const bool unmasked = k0 + BLOCK_N <= kend && k0 + BLOCK_N - 1 <= qpos_lo &&
                          (p.window <= 0 || qpos_hi - k0 < p.window) && p.alibi == nullptr;
    if (unmasked) {
#pragma unroll
      for (int j = 0; j < NS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= p.scale_log2;
      }
    } else {
#pragma unroll
      for (int j = 0; j < NS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hr = e >> 1;
          const int kpos = k0 + wn * KPW + j * 8 + 2 * t4 + (e & 1);
          const int dist = qpos_r[hr] - kpos;
          const bool ok = valid_r[hr] && dist >= 0 && kpos < kend &&
                          (p.window <= 0 || dist < p.window);
          s[j][e] = ok ? s[j][e] * p.scale_log2 - slope_r[hr] * (float)dist : IRLM_NEG_INF;
        }
      }
    }
    // online softmax
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = IRLM_NEG_INF;
#pragma unroll
      for (int j = 0; j < NS; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hr], s[j][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_i[hr], mx);
      const float m_use = m_new == IRLM_NEG_INF ? 0.f : m_new;
      const float alpha = exp2f(m_i[hr] - m_use);
      m_i[hr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        s[j][2 * hr] = exp2f(s[j][2 * hr] - m_use);
        s[j][2 * hr + 1] = exp2f(s[j][2 * hr + 1] - m_use);
        sum += s[j][2 * hr] + s[j][2 * hr + 1];
      }
      l_i[hr] = l_i[hr] * alpha + sum;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][2 * hr] *= alpha;
        acc[dn][2 * hr + 1] *= alpha;
      }
    }
    WarpMma<T, D, NS, LD>::pv(acc, s, sV + wn * KPW * LD, lane);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- epilogue: merge the WARPS_N key-split warps through shared memory, then store ----
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l_i[hr] += __shfl_xor_sync(0xffffffffu, l_i[hr], 1);
    l_i[hr] += __shfl_xor_sync(0xffffffffu, l_i[hr], 2);
  }
  constexpr int LDA = S::LDA;
  float* sAcc = reinterpret_cast<float*>(sKV);
  float* sM = sAcc + WARPS_N * BLOCK_M * LDA;
  float* sL = sM + WARPS_N * BLOCK_M;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int lr = wm * 16 + g + 8 * hr;
    float* dst = sAcc + (wn * BLOCK_M + lr) * LDA;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      dst[dn * 8 + 2 * t4] = acc[dn][2 * hr];
      dst[dn * 8 + 2 * t4 + 1] = acc[dn][2 * hr + 1];
    }
    if (t4 == 0) {
      sM[wn * BLOCK_M + lr] = m_i[hr];
      sL[wn * BLOCK_M + lr] = l_i[hr];
    }
  }
  __syncthreads();

  T* og = reinterpret_cast<T*>(p.out);
  for (int c = tid; c < BLOCK_M * (D / 4); c += NT) {
    const int lr = c / (D / 4), d = (c % (D / 4)) * 4;
    const int grow = row0 + lr;
    if (grow >= rows) continue;
    float mx = IRLM_NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) mx = fmaxf(mx, sM[w * BLOCK_M + lr]);
    const float m_use = mx == IRLM_NEG_INF ? 0.f : mx;
    float l = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) {
      const float sc = exp2f(sM[w * BLOCK_M + lr] - m_use);
      l += sL[w * BLOCK_M + lr] * sc;
      const float* src = sAcc + (w * BLOCK_M + lr) * LDA + d;
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] += src[e] * sc;
    }
    float inv = l > 0.f ? 1.f / l : 0.f;
    if constexpr (QUANT) inv *= p.v_scale;
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] *= inv;
    const int tok = grow / G, h = kvh * G + grow % G;
    if (p.num_splits == 1) {
      store_vec<T, 4>(og + (long long)(q_start + tok) * p.o_stride + (long long)h * D + d, o);
    } else {
      const long long idx = ((long long)split * p.num_tokens + q_start + tok) * p.heads + h;
      store_vec<float, 4>(p.part_out + idx * D + d, o);
      if (d == 0) {
        p.part_ml[idx * 2] = mx;
        p.part_ml[idx * 2 + 1] = l;
      }
    }
  }
  if constexpr (DECODE) {
    if (p.num_splits > 1 && p.split_counters != nullptr)
      fold_splits<T, D, BLOCK_M>(p, r, kvh, tile, rows);
  }
}
