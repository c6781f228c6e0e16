// irlm kernels: token sampling on the GPU, one CTA (1024 threads) per request.
//
// logits [reqs, vocab] (any float dtype) -> token ids [reqs] (int32), with per-request
// temperature, top_k, top_p, seed and offset tensors, so a decode step needs no host round trip.
//   * temperature <= 0 or top_k == 1: greedy, the first index of the largest logit (torch.argmax).
//   * otherwise the allowed set is the top_k largest logits (ties at the k-th value all stay),
//     then, if top_p < 1, its smallest prefix (by decreasing logit) whose probability under
//     softmax(logits / temperature), renormalised over the top-k set, reaches top_p; the token
//     is argmax over the allowed set of logit / temperature + Gumbel noise, which is an exact
//     sample of the renormalised distribution.
// Thresholds are found by radix selection over order-preserving 32-bit keys of the logits
// (4 passes of 8 bits): counts for top-k, and for top-p probability mass in 2^-40 fixed point,
// so the sums, and the choice, are exact and deterministic.  Histogram updates are aggregated
// per warp (match.any) before the shared-memory atomics.  Noise: Philox-4x32-10 keyed by the
// request's seed, counter (vocab index, offset): the same (seed, offset) gives the same token.
#include "common.cuh"

struct SampleParams {
  const void* logits;         // [reqs, vocab], row stride `stride`
  const float* temperature;   // [reqs] or null (1.0)
  const int* top_k;           // [reqs] or null (0: off)
  const float* top_p;         // [reqs] or null (1.0: off)
  const long long* seeds;     // [reqs]
  const long long* offsets;   // [reqs] or null (0)
  int* out;                   // [reqs]
  long long stride;
  int vocab;
};

#define IRLM_SAMPLE_THREADS 1024

IRLM_DEVICE unsigned float_key(float f) {
  if (f != f) return 0u;  // NaN sorts below everything
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

IRLM_DEVICE void philox4x32_10(unsigned (&c)[4], unsigned k0, unsigned k1) {
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const unsigned hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const unsigned hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    const unsigned n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Shared state of one CTA.
struct SampleSmem {
  unsigned long long hist[256];
  unsigned long long chunk[32];
  float fred[32];
  int ired[32];
  unsigned digit;
  unsigned long long above;
  unsigned long long total;
};

// After hist[] is filled: the digit d (searching from 255 down) where the running sum of the
// bins above d is < target <= that sum + hist[d]; returns d, sets *above to the sum above d.
// If target exceeds the total, the lowest non-empty digit is taken.  Called by all threads.
IRLM_DEVICE unsigned select_digit(SampleSmem& sm, unsigned long long target,
                                  unsigned long long* above) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    unsigned long long sum = 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) sum += sm.hist[255 - 8 * lane - q];
    unsigned long long incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, incl >= target);
    const unsigned nonempty = __ballot_sync(0xffffffffu, sum > 0);
    int L = hit ? __ffs(hit) - 1 : (nonempty ? 31 - __clz(nonempty) : 31);
    if (lane == L) {
      unsigned long long cum = incl - sum;
      unsigned d = 255 - 8 * L - 7, last = d;
      bool found = false;
      for (int q = 0; q < 8; ++q) {
        const unsigned dd = 255 - 8 * L - q;
        if (sm.hist[dd] > 0) last = dd;
        if (cum + sm.hist[dd] >= target) { d = dd; found = true; break; }
        cum += sm.hist[dd];
      }
      if (!found) {  // target above the total: back to the lowest non-empty digit
        d = last;
        cum = incl - sum;
        for (unsigned dd = 255 - 8 * L; dd > last; --dd) cum += sm.hist[dd];
      }
      sm.digit = d;
      sm.above = cum;
    }
    if (lane == 31) sm.total = incl;
  }
  __syncthreads();
  *above = sm.above;
  const unsigned d = sm.digit;
  __syncthreads();
  return d;
}

// Add `amount` to hist[bin] for every lane with bin < 256, aggregating equal bins per warp.
IRLM_DEVICE void hist_add(SampleSmem& sm, unsigned bin, unsigned long long amount) {
  if (__all_sync(0xffffffffu, bin >= 256)) return;  // nothing of this warp in the prefix
  const unsigned same = __match_any_sync(0xffffffffu, bin);
  const int lane = threadIdx.x & 31;
  // sum `amount` over the lanes of `same` (two 32-bit halves: __reduce_add_sync is 32-bit)
  const unsigned lo = (unsigned)(amount & 0xFFFFFu), hi = (unsigned)(amount >> 20);
  const unsigned slo = __reduce_add_sync(same, lo), shi = __reduce_add_sync(same, hi);
  if (bin < 256 && lane == __ffs(same) - 1)
    atomicAdd(&sm.hist[bin], ((unsigned long long)shi << 20) + slo);
}

template <typename T>
IRLM_DEVICE float logit_at(const T* row, int i) { return to_float(row[i]); }

template <typename T>
__global__ void __launch_bounds__(IRLM_SAMPLE_THREADS) irlm_sample(const SampleParams p) {
  pdl_enter();
  __shared__ SampleSmem sm;
  const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int V = p.vocab;
  const T* row = reinterpret_cast<const T*>(p.logits) + (long long)r * p.stride;
  const float temp = p.temperature != nullptr ? p.temperature[r] : 1.f;
  const int topk = p.top_k != nullptr ? p.top_k[r] : 0;
  const float topp = p.top_p != nullptr ? p.top_p[r] : 1.f;
  const bool greedy = !(temp > 0.f) || topk == 1;
  const float inv_t = greedy ? 1.f : 1.f / temp;

  // ---- thresholds on keys: allowed = key >= thr ----
  unsigned thr = 0;
  float mx = 0.f;
  if (!greedy && topk > 0 && topk < V) {
    unsigned prefix = 0, mask = 0;
    unsigned long long remaining = (unsigned long long)topk;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += blockDim.x) sm.hist[b] = 0;
      __syncthreads();
      for (int base = 0; base < V; base += blockDim.x) {
        const int i = base + tid;
        unsigned bin = 256;
        if (i < V) {
          const unsigned key = float_key(logit_at(row, i));
          if ((key & mask) == prefix) bin = (key >> shift) & 255u;
        }
        hist_add(sm, bin, 1ull);
      }
      __syncthreads();
      unsigned long long above;
      const unsigned d = select_digit(sm, remaining, &above);
      remaining -= above;
      prefix |= d << shift;
      mask |= 255u << shift;
    }
    thr = prefix;
  }
  if (!greedy && topp < 1.f) {
    // the largest logit (it is always allowed), for exp() without overflow
    float m = IRLM_NEG_INF;
    for (int i = tid; i < V; i += blockDim.x) m = fmaxf(m, logit_at(row, i));
    m = warp_max(m);
    if (lane == 0) sm.fred[warp] = m;
    __syncthreads();
    if (warp == 0) {
      float t = lane < (int)(blockDim.x >> 5) ? sm.fred[lane] : IRLM_NEG_INF;
      t = warp_max(t);
      if (lane == 0) sm.fred[0] = t;
    }
    __syncthreads();
    mx = sm.fred[0];
    __syncthreads();
    unsigned prefix = 0, mask = 0;
    unsigned long long target = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += blockDim.x) sm.hist[b] = 0;
      __syncthreads();
      for (int base = 0; base < V; base += blockDim.x) {
        const int i = base + tid;
        unsigned bin = 256;
        unsigned long long mass = 0;
        if (i < V) {
          const float l = logit_at(row, i);
          const unsigned key = float_key(l);
          if (key >= thr && (key & mask) == prefix) {
            bin = (key >> shift) & 255u;
            mass = (unsigned long long)__float2ull_rn(__expf((l - mx) * inv_t) * 1099511627776.f);
          }
        }
        hist_add(sm, bin, mass);
      }
      __syncthreads();
      if (shift == 24) {
        // the first pass sees the whole allowed set: fix the target mass from its total
        if (tid < 32) {
          unsigned long long s = 0;
          for (int b = lane; b < 256; b += 32) s += sm.hist[b];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          if (lane == 0) sm.total = s;
        }
        __syncthreads();
        const unsigned long long total = sm.total;
        __syncthreads();
        const double want = (double)fmaxf(topp, 0.f) * (double)total;
        target = (unsigned long long)ceil(want);
        if (target < 1) target = 1;
        if (target > total) target = total;
      }
      unsigned long long above;
      const unsigned d = select_digit(sm, target, &above);
      target -= above;
      prefix |= d << shift;
      mask |= 255u << shift;
    }
    thr = thr > prefix ? thr : prefix;
  }

  // ---- final pass: argmax of logit (greedy) or of logit / T + Gumbel noise over allowed ----
  const unsigned long long seed = p.seeds != nullptr ? (unsigned long long)p.seeds[r] : 0ull;
  const unsigned long long off = p.offsets != nullptr ? (unsigned long long)p.offsets[r] : 0ull;
  float best = IRLM_NEG_INF;
  int besti = 0x7fffffff;
  for (int i = tid; i < V; i += blockDim.x) {
    const float l = logit_at(row, i);
    float score;
    if (greedy) {
      score = l;
    } else {
      if (float_key(l) < thr) continue;
      unsigned c[4] = {(unsigned)i, (unsigned)off, (unsigned)(off >> 32), 0u};
      philox4x32_10(c, (unsigned)seed, (unsigned)(seed >> 32));
      const float u = ((float)(c[0] >> 8) + 0.5f) * (1.f / 16777216.f);
      score = l * inv_t - __logf(-__logf(u));
    }
    if (score > best || (score == best && i < besti)) { best = score; besti = i; }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, besti, o);
    if (ob > best || (ob == best && oi < besti)) { best = ob; besti = oi; }
  }
  if (lane == 0) { sm.fred[warp] = best; sm.ired[warp] = besti; }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    best = lane < nw ? sm.fred[lane] : IRLM_NEG_INF;
    besti = lane < nw ? sm.ired[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, besti, o);
      if (ob > best || (ob == best && oi < besti)) { best = ob; besti = oi; }
    }
    if (lane == 0) p.out[r] = besti == 0x7fffffff ? 0 : besti;
  }
}
