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
