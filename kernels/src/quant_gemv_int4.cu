// irlm kernels: the int4 weight-only GEMV (W4A16) for decode steps of a few rows.
//
// out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k / G]) * s[n, k / G] (+ bias[n]) for up to MAXM
// rows of x, reading irlm's own int4 storage as the engine holds it (quant.linear{int4}: q u8
// [N, K/2], element 2j in the low nibble of byte j; s f32 and z u8 [N, K/G]), so no load-time
// repacking.  Batch-1 decode is bound by reading the weights; tinygemm read them at about 41%
// of the copy bandwidth on the H200 (docs/performance.md), which is what this replaces.
//
// Work split: one warp owns ROWS output features and streams their rows once.  Each lane loads
// 16 bytes (32 weights, all in one scale group since G % 32 == 0) per row per step, UNROLL
// steps in flight.  Its 32 activations are converted to fp32 once and serve every row of the
// warp.  The nibbles become floats without the (quarter-rate) integer conversion: OR-ing a
// nibble, left where it lies in its 32-bit word (bits 4i..4i+3, i < 5), into the mantissa of
// 2^23 gives the float 2^23 + q * 16^i exactly; subtracting 2^23 leaves q * 16^i, and the 16^-i
// is folded into the activations once per chunk (exact powers of two), so a weight costs one
// LOP3, one FADD and one FFMA.  Nibbles 5..7 are shifted down first.  Then per group chunk:
// acc += s * (sum x*q - z * sum x), fp32 throughout, one rounding at the end.  Needs K % 32 == 0 and 16-byte aligned rows (the launcher checks).
#include "common.cuh"

struct Q4GemvParams {
  const void* x;
  const unsigned char* w;
  const float* scales;
  const unsigned char* zeros;
  const void* bias;
  void* out;
  long long x_stride, o_stride;
  int m, n, k, group;
  int prefetch;  // irlm_w4a16_mma: bytes of each weight row asked into L2 before pdl_enter()
};

// The factor that undoes where nibble i is read (see dot8_nibbles): 16^-i for i < 5; nibbles
// 5..7 are read from v >> 20, at 16^0, 16^1, 16^2.
IRLM_DEVICE float nibble_scale(int i) {
  switch (i & 7) {
    case 1: case 6: return 0.0625f;
    case 2: case 7: return 0.00390625f;
    case 3: return 0.000244140625f;
    case 4: return 1.52587890625e-05f;
    default: return 1.f;
  }
}

// sum_i xs[i] * q_i * 16^pos(i) over the 8 nibbles of `v` (element i in bits 4i..4i+3), where
// xs holds x pre-multiplied by nibble_scale: sum_i x[i] * q_i, up to fp32 rounding.  A nibble
// in bits 0..19 ORed into 2^23's mantissa (bits 0..22) gives 2^23 + q * 16^pos exactly; bit 23
// is the exponent's, so nibbles 5..7 (bits 20..31) are shifted down to bits 0..11 first.
IRLM_DEVICE float dot8_nibbles(unsigned v, const float* xs) {
  const float base = 8388608.f;  // 2^23
  const unsigned hi = v >> 20;
  float d = (__uint_as_float((v & 0x0000000fu) | 0x4b000000u) - base) * xs[0];
  d = fmaf(__uint_as_float((v & 0x000000f0u) | 0x4b000000u) - base, xs[1], d);
  d = fmaf(__uint_as_float((v & 0x00000f00u) | 0x4b000000u) - base, xs[2], d);
  d = fmaf(__uint_as_float((v & 0x0000f000u) | 0x4b000000u) - base, xs[3], d);
  d = fmaf(__uint_as_float((v & 0x000f0000u) | 0x4b000000u) - base, xs[4], d);
  d = fmaf(__uint_as_float((hi & 0x00fu) | 0x4b000000u) - base, xs[5], d);
  d = fmaf(__uint_as_float((hi & 0x0f0u) | 0x4b000000u) - base, xs[6], d);
  d = fmaf(__uint_as_float((hi & 0xf00u) | 0x4b000000u) - base, xs[7], d);
  return d;
}

template <typename T, int MAXM, int ROWS>
__global__ void __launch_bounds__(256) irlm_w4a16_gemv(const Q4GemvParams p) {
  pdl_enter();
  constexpr int UNROLL = 2;
  constexpr int CHUNK = 32;                      // weights per lane per load
  const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int row0 = warp * ROWS;
  if (row0 >= p.n) return;
  const long long row_bytes = p.k / 2;
  const int groups = p.k / p.group;
  const T* x = reinterpret_cast<const T*>(p.x);
  float acc[ROWS][MAXM];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[r][m] = 0.f;

  for (int base = lane * CHUNK; base < p.k; base += 32 * CHUNK * UNROLL) {
    int4 wv[UNROLL][ROWS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * CHUNK;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
        wv[u][r] = (k0 < p.k && row < p.n)
                       ? load_stream(p.w + (long long)row * row_bytes + k0 / 2)
                       : make_int4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k0 = base + u * 32 * CHUNK;
      if (k0 >= p.k) break;
      const int g = k0 / p.group;
      float sz[ROWS][2];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r < p.n ? row0 + r : p.n - 1;
        sz[r][0] = p.scales[(long long)row * groups + g];
        sz[r][1] = static_cast<float>(p.zeros[(long long)row * groups + g]);
      }
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < p.m) {
          float xf[CHUNK];
          const T* xm = x + (long long)m * p.x_stride + k0;
#pragma unroll
          for (int c = 0; c < CHUNK; c += 8) {
            float t[8];
            load_vec<T, 8>(xm + c, t);
#pragma unroll
            for (int i = 0; i < 8; ++i) xf[c + i] = t[i];
          }
          float xsum = 0.f;
#pragma unroll
          for (int i = 0; i < CHUNK; ++i) {
            xsum += xf[i];
            xf[i] *= nibble_scale(i);
          }
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const float d = dot8_nibbles((unsigned)wv[u][r].x, xf) +
                            dot8_nibbles((unsigned)wv[u][r].y, xf + 8) +
                            dot8_nibbles((unsigned)wv[u][r].z, xf + 16) +
                            dot8_nibbles((unsigned)wv[u][r].w, xf + 24);
            acc[r][m] = fmaf(sz[r][0], d - sz[r][1] * xsum, acc[r][m]);
          }
        }
      }
    }
  }
  T* out = reinterpret_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    const float b = (p.bias && row < p.n) ? to_float(reinterpret_cast<const T*>(p.bias)[row]) : 0.f;
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (m < p.m && row < p.n && lane == ((m + r * MAXM) & 31))
        out[(long long)m * p.o_stride + row] = from_float<T>(v + b);
    }
  }
}

// ---- the same product on the tensor cores (mma.sync m16n8k16), for groups of 128k --------------
//
// The FMA kernel above spends about three instructions per weight and stays short of the copy
// bandwidth at one row (55% on an H100's gate/up shape, benchmarks/quant_gemm.py).  Here the
// weights become exact 16-bit integers q - z two at a time (one shift, one LOP3 into the
// mantissa of 128.0 (bf16) / 1024.0 (fp16), one packed subtract of 128 + z, exact), the tensor
// cores multiply them with x and add in fp32, and the group's scale is applied to the fp32 sums
// once per 128 k.  The rows of x are the MMA's 8 columns (m <= 8 per launch).
//
// Layout: a block owns 16 output features; its warps split K in steps of 128 (one group, as
// group % 128 == 0).  In a step, lane (g = lane / 4, t = lane % 4) loads 16 bytes of features
// g and g + 8 (k in [32t, 32t + 32) of the step) and the same 32 activations of x's row g.
// A dot product does not depend on the order of its k, so each MMA's 16 "k" slots are filled
// with whichever k the lanes hold, the same k for the weight (A) and the activation (B)
// fragments: MMA j of the step reads word j / 2 of each lane's 16 bytes; its A pair for slots
// (2t, 2t + 1) is nibbles (s, s + 4) of that word and for slots (2t + 8, 2t + 9) nibbles
// (s + 1, s + 5), s = 2 (j % 2), which one shift and mask 0x000f000f put in the two halves of a
// 32-bit register; B takes x at the same k with one byte permute per register.
// The per-dtype pieces: the magic (BASE as a 16-bit float; BASE + q exact for q < 128 in bf16,
// < 1024 in fp16), a packed exact a - b (an fma with 1.0 and -b), and the MMA.  TY is the
// PTX type name of T.
#define IRLM_INT4_MMA_OPS(TY)                                                                   \
  IRLM_DEVICE static unsigned minus(unsigned a, unsigned b) {                                   \
    unsigned d;                                                                                 \
    asm("fma.rn." TY "x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(ONE), "r"(b ^ 0x80008000u)); \
    return d;                                                                                   \
  }                                                                                             \
  IRLM_DEVICE static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) { \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0, %1, %2, %3}, "   \
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"                                \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                               \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));               \
  }
template <typename T> struct Int4Mma;
template <> struct Int4Mma<irlm_bf16> {
  static constexpr unsigned BASE = 0x4300u, MAGIC = BASE | BASE << 16, ONE = 0x3f803f80u;  // 128.0
  IRLM_INT4_MMA_OPS("bf16")
};
template <> struct Int4Mma<irlm_fp16> {
  static constexpr unsigned BASE = 0x6400u, MAGIC = BASE | BASE << 16, ONE = 0x3c003c00u;  // 1024.0
  IRLM_INT4_MMA_OPS("f16")
};
#undef IRLM_INT4_MMA_OPS

// The block's warps (1..8, blockDim.x / 32; the host launches 8, INT4_MMA_WARPS in
// quant_linear.py, where that choice was measured) split K.
template <typename T>
__global__ void __launch_bounds__(256) irlm_w4a16_mma(const Q4GemvParams p) {
  {  // the start of the block's 16 weight rows, into L2 while the previous kernel runs
    const long long row_bytes = p.k / 2;
    const int lines = (int)((min((long long)p.prefetch, row_bytes) + 127) / 128);
    for (int i = threadIdx.x; i < 16 * lines; i += blockDim.x) {
      const int f = blockIdx.x * 16 + i / lines;
      if (f < p.n) prefetch_l2(p.w + (long long)f * row_bytes + 128LL * (i % lines));
    }
  }
  pdl_enter();
  constexpr int MAX_WARPS = 8, UNROLL = 4;
  using Op = Int4Mma<T>;
  __shared__ float part[MAX_WARPS][32][4];
  const int WARPS = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int fa = blockIdx.x * 16 + g, fb = fa + 8;  // the two features this lane feeds
  const bool va = fa < p.n, vb = fb < p.n, has_x = g < p.m;
  const long long row_bytes = p.k / 2;
  const unsigned char* wa = p.w + (long long)(va ? fa : 0) * row_bytes + 16 * t;
  const unsigned char* wb = p.w + (long long)(vb ? fb : 0) * row_bytes + 16 * t;
  const T* xg = reinterpret_cast<const T*>(p.x) + (long long)(has_x ? g : 0) * p.x_stride + 32 * t;
  const int steps = p.k / 128, groups = p.k / p.group, per_group = p.group / 128;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

  for (int s0 = warp; s0 < steps; s0 += WARPS * UNROLL) {
    int4 qa[UNROLL], qb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int s = s0 + u * WARPS;
      qa[u] = (s < steps && va) ? load_stream(wa + 64LL * s) : make_int4(0, 0, 0, 0);
      qb[u] = (s < steps && vb) ? load_stream(wb + 64LL * s) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int s = s0 + u * WARPS;
      if (s >= steps) break;
      unsigned xv[16];
      if (has_x) {
        const int4* xp = reinterpret_cast<const int4*>(xg + 128LL * s);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int4 v = xp[i];
          xv[4 * i] = v.x; xv[4 * i + 1] = v.y; xv[4 * i + 2] = v.z; xv[4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) xv[i] = 0u;
      }
      const int gi = s / per_group;
      const float sa = va ? p.scales[(long long)fa * groups + gi] : 0.f;
      const float sb = vb ? p.scales[(long long)fb * groups + gi] : 0.f;
      const unsigned za = Op::BASE | (va ? p.zeros[(long long)fa * groups + gi] : 0u);
      const unsigned zb = Op::BASE | (vb ? p.zeros[(long long)fb * groups + gi] : 0u);
      // int4 zero points are 0..15 (quantize_int4, AWQ, GGUF); BASE | z is BASE + z only
      // for z < 128 (bf16) / 1024 (fp16)
      const unsigned zza = za | (za << 16), zzb = zb | (zb << 16);
      const unsigned wa4[4] = {(unsigned)qa[u].x, (unsigned)qa[u].y, (unsigned)qa[u].z,
                               (unsigned)qa[u].w};
      const unsigned wb4[4] = {(unsigned)qb[u].x, (unsigned)qb[u].y, (unsigned)qb[u].z,
                               (unsigned)qb[u].w};
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const unsigned va_w = wa4[j >> 1], vb_w = wb4[j >> 1];
        const int sh = 8 * (j & 1);
        unsigned a[4];
        a[0] = Op::minus(((va_w >> sh) & 0x000f000fu) | Op::MAGIC, zza);        // fa, slots 2t..
        a[1] = Op::minus(((vb_w >> sh) & 0x000f000fu) | Op::MAGIC, zzb);        // fb, slots 2t..
        a[2] = Op::minus(((va_w >> (sh + 4)) & 0x000f000fu) | Op::MAGIC, zza);  // fa, 2t + 8..
        a[3] = Op::minus(((vb_w >> (sh + 4)) & 0x000f000fu) | Op::MAGIC, zzb);  // fb, 2t + 8..
        const int e = 8 * (j >> 1) + 2 * (j & 1);    // the k (within the lane's 32) of slot 2t
        const unsigned lo = xv[e >> 1], hi = xv[(e + 4) >> 1];
        Op::mma(c, a, __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
      }
      acc[0] = fmaf(sa, c[0], acc[0]);
      acc[1] = fmaf(sa, c[1], acc[1]);
      acc[2] = fmaf(sb, c[2], acc[2]);
      acc[3] = fmaf(sb, c[3], acc[3]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) part[warp][lane][i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  for (int w = 0; w < WARPS; ++w)
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] += part[w][lane][i];
  // lane holds out[2t, fa], out[2t + 1, fa], out[2t, fb], out[2t + 1, fb]
  T* out = reinterpret_cast<T*>(p.out);
  const T* bias = reinterpret_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = 2 * t + (i & 1), f = i < 2 ? fa : fb;
    if (m < p.m && f < p.n)
      out[(long long)m * p.o_stride + f] = from_float<T>(v[i] + (bias ? to_float(bias[f]) : 0.f));
  }
}
