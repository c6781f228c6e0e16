// irlm_paged_attention.h: llm.paged_attention in one call.  The launch logic mirrors
// irlm.kernels.ops.paged_attention (kv_cache_write, then paged_attention_decode or
// prefill_attention) decision for decision; tests/test_kernels_cmake.py compares this file's
// plans with the Python launchers' choices, so change both together.  The one difference: the
// Python path measures max(q_lens) and max(cached_lens) with a device sync when not given,
// this one never synchronises and uses the bounds the caller gives (or the shapes' bounds).
#include "attention.cuh"       // AttnParams, AttnSmem (templates only: nothing instantiated here)
#include "irlm_kernels.h"
#include "kv_cache_write.cu"  // KvWriteParams
#include "irlm_paged_attention.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace {

thread_local std::string g_error;

int fail(int code, std::string msg) {
  g_error = "irlm_paged_attention: " + msg;
  return code;
}

constexpr int kMaxSplits = 128;       // IRLM_MAX_SPLITS in paged_attention_decode.cu
constexpr int kMinSplitKeys = 128;    // ops.choose_splits's min_keys
constexpr int kChosenMaxSplits = 64;  // ops.choose_splits's max_splits
constexpr int kNoSplit = 1 << 30;     // split_size of an unsplit launch (ops: 1 << 30)
constexpr size_t kAlign = 256;        // workspace sections (and the workspace base)

long long cdiv(long long a, long long b) { return (a + b - 1) / b; }
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// ---- the kernel variants (ops.CTYPES, ops.attention_block_n, ops.attention_smem_bytes) ------
template <typename T> struct CType;
template <> struct CType<float> { static constexpr const char* name = "float"; };
template <> struct CType<irlm_fp16> { static constexpr const char* name = "irlm_fp16"; };
template <> struct CType<irlm_bf16> { static constexpr const char* name = "irlm_bf16"; };
// the kernels' trailing cache-type template argument (ops._cache_arg): none for a cache of the
// model's dtype, the 8-bit element type of an int8 / fp8 cache
template <typename C> struct CacheArg { static constexpr const char* text = ""; };
template <> struct CacheArg<signed char> { static constexpr const char* text = ", signed char"; };
template <> struct CacheArg<irlm_fp8e4m3> {
  static constexpr const char* text = ", irlm_fp8e4m3";
};

template <typename T, int D, bool DECODE>
constexpr int block_n() {
  return sizeof(T) == 4 ? 32 : (DECODE || D <= 128 ? 64 : 32);
}

struct Variant {
  const char* ctype;
  const char* cache_arg;  // "" or ", <8-bit cache type>"
  int elem_size;
  int block_n;
  int smem;       // AttnSmem<...>::BYTES: the kernel traps if given less
};

template <typename T, typename C, int D, bool DECODE>
Variant variant_of() {
  constexpr int bn = block_n<T, D, DECODE>();
  return {CType<T>::name, CacheArg<C>::text, static_cast<int>(sizeof(T)), bn,
          AttnSmem<T, D, DECODE ? 1 : 4, DECODE ? 4 : 1, bn, C>::BYTES};
}

template <typename T, typename C>
bool variant_for_dim(int head_dim, bool decode, Variant* v) {
  switch (head_dim) {
    case 64:
      *v = decode ? variant_of<T, C, 64, true>() : variant_of<T, C, 64, false>();
      return true;
    case 80:
      *v = decode ? variant_of<T, C, 80, true>() : variant_of<T, C, 80, false>();
      return true;
    case 96:
      *v = decode ? variant_of<T, C, 96, true>() : variant_of<T, C, 96, false>();
      return true;
    case 128:
      *v = decode ? variant_of<T, C, 128, true>() : variant_of<T, C, 128, false>();
      return true;
    case 256:
      *v = decode ? variant_of<T, C, 256, true>() : variant_of<T, C, 256, false>();
      return true;
  }
  return false;
}

template <typename T>
bool variant_for_cache(int cache_dtype, int dtype, int head_dim, bool decode, Variant* v) {
  if (cache_dtype == dtype) return variant_for_dim<T, T>(head_dim, decode, v);
  if (cache_dtype == IRLM_DTYPE_I8) return variant_for_dim<T, signed char>(head_dim, decode, v);
  if (cache_dtype == IRLM_DTYPE_F8E4M3)
    return variant_for_dim<T, irlm_fp8e4m3>(head_dim, decode, v);
  return false;
}

bool variant(int dtype, int cache_dtype, int head_dim, bool decode, Variant* v) {
  switch (dtype) {
    case IRLM_DTYPE_F32: return variant_for_cache<float>(cache_dtype, dtype, head_dim, decode, v);
    case IRLM_DTYPE_F16:
      return variant_for_cache<irlm_fp16>(cache_dtype, dtype, head_dim, decode, v);
    case IRLM_DTYPE_BF16:
      return variant_for_cache<irlm_bf16>(cache_dtype, dtype, head_dim, decode, v);
  }
  return false;
}

bool quantized_cache(const IrlmPagedAttentionArgs& a) {
  return a.cache_dtype == IRLM_DTYPE_I8 || a.cache_dtype == IRLM_DTYPE_F8E4M3;
}

const char* dtype_name(int dtype) {
  switch (dtype) {
    case IRLM_DTYPE_F32: return "f32";
    case IRLM_DTYPE_F16: return "f16";
    case IRLM_DTYPE_BF16: return "bf16";
    case IRLM_DTYPE_I8: return "i8";
    case IRLM_DTYPE_F8E4M3: return "f8e4m3";
  }
  return "an unknown dtype";
}

// Kernel names are built once and kept (the plan hands out their const char*).
const char* intern(const std::string& s) {
  static thread_local std::string slots[4];
  static thread_local int next = 0;
  std::string& slot = slots[next++ & 3];
  slot = s;
  return slot.c_str();
}

// ---- the library's own helper kernel: cu_q_lens and the ALiBi slopes into the workspace -----
struct PrepareParams {
  const int* q_lens;
  int* cu_q_lens;       // [num_reqs + 1]
  float* alibi;         // [num_alibi] or null
  int num_reqs;
  int num_alibi;
  float slopes[IRLM_PA_MAX_ALIBI_HEADS];
};

constexpr int kPrepareThreads = 256;

// One CTA: each thread sums a contiguous chunk of q_lens, the chunk sums are scanned in
// shared memory, then each thread writes its chunk's prefix sums (cu_q_lens[0] = 0).
__global__ void __launch_bounds__(kPrepareThreads) irlm_paged_attention_prepare(
    const PrepareParams p) {
  __shared__ int sums[kPrepareThreads];
  const int tid = threadIdx.x;
  const int chunk = (p.num_reqs + kPrepareThreads - 1) / kPrepareThreads;
  const int beg = min(p.num_reqs, tid * chunk), end = min(p.num_reqs, beg + chunk);
  int s = 0;
  for (int i = beg; i < end; ++i) s += p.q_lens[i];
  sums[tid] = s;
  __syncthreads();
  for (int off = 1; off < kPrepareThreads; off <<= 1) {  // inclusive Hillis-Steele scan
    const int add = tid >= off ? sums[tid - off] : 0;
    __syncthreads();
    sums[tid] += add;
    __syncthreads();
  }
  int run = sums[tid] - s;  // exclusive prefix of this chunk
  if (tid == 0) p.cu_q_lens[0] = 0;
  for (int i = beg; i < end; ++i) {
    run += p.q_lens[i];
    p.cu_q_lens[i + 1] = run;
  }
  for (int i = tid; i < p.num_alibi; i += kPrepareThreads) p.alibi[i] = p.slopes[i];
}

// ---- workspace layout ---------------------------------------------------------------------
struct Layout {
  size_t cu_q_lens, alibi, part_out, part_ml, bytes;  // offsets from the aligned base
};

Layout layout(const IrlmPagedAttentionArgs& a, int num_reqs, int num_tokens, int splits) {
  Layout l{};
  size_t off = 0;
  l.cu_q_lens = off;
  off = align_up(off + sizeof(int) * (static_cast<size_t>(num_reqs) + 1));
  l.alibi = off;
  if (a.num_alibi_slopes > 0) off = align_up(off + sizeof(float) * a.heads);
  l.part_out = l.part_ml = off;
  if (splits > 1) {
    const size_t rows = static_cast<size_t>(splits) * num_tokens * a.heads;
    off = align_up(off + rows * a.head_dim * sizeof(float));
    l.part_ml = off;
    off = align_up(off + rows * 2 * sizeof(float));
  }
  l.bytes = off;
  return l;
}

bool is_float(int dt) {
  return dt == IRLM_DTYPE_F32 || dt == IRLM_DTYPE_F16 || dt == IRLM_DTYPE_BF16;
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// The checks of ops._attn_common, ops._cache_geometry and ops.kv_cache_write that do not
// depend on the data, with the same wording where there is a Python counterpart.
int check(const IrlmPagedAttentionArgs& a, bool pointers) {
  if (a.num_tokens < 0 || a.num_reqs < 0)
    return fail(IRLM_PA_INVALID, "num_tokens and num_reqs must be >= 0");
  if (!is_float(a.dtype))
    return fail(IRLM_PA_INVALID, std::string("query/key/value must be f32, f16 or bf16, got ") +
                                     dtype_name(a.dtype));
  if (a.head_dim != 64 && a.head_dim != 80 && a.head_dim != 96 && a.head_dim != 128 &&
      a.head_dim != 256)
    return fail(IRLM_PA_UNSUPPORTED, "head_dim " + std::to_string(a.head_dim) +
                                         " has no attention kernel (supported: 64, 80, 96, 128, "
                                         "256)");
  if (a.heads <= 0 || a.kv_heads <= 0 || a.heads % a.kv_heads)
    return fail(IRLM_PA_INVALID, std::to_string(a.heads) + " query heads are not a multiple of " +
                                     std::to_string(a.kv_heads) + " kv heads");
  if (a.cache_dtype != a.dtype && !quantized_cache(a))
    return fail(IRLM_PA_INVALID, std::string("kv_cache dtype ") + dtype_name(a.cache_dtype) +
                                     " differs from " + dtype_name(a.dtype));
  if (quantized_cache(a) && !(a.kv_scale_k > 0.f && a.kv_scale_v > 0.f &&
                              std::isfinite(a.kv_scale_k) && std::isfinite(a.kv_scale_v)))
    return fail(IRLM_PA_INVALID, std::string("the ") + dtype_name(a.cache_dtype) +
                                     " kv_cache needs kv_scales: kv_scale_k and kv_scale_v "
                                     "positive and finite");
  if (!quantized_cache(a) && (a.kv_scale_k != 0.f || a.kv_scale_v != 0.f))
    return fail(IRLM_PA_INVALID, "kv_scales are for an i8 or f8e4m3 kv_cache, not " +
                                     std::string(dtype_name(a.cache_dtype)));
  if (a.block_size <= 0 || (a.block_size & (a.block_size - 1)))
    return fail(IRLM_PA_INVALID,
                "block_size must be a power of two, got " + std::to_string(a.block_size));
  if (a.layer < 0 || a.layer >= a.layers)
    return fail(IRLM_PA_INVALID, "layer " + std::to_string(a.layer) + " is outside the cache's " +
                                     std::to_string(a.layers) + " layers");
  if (a.num_blocks <= 0 || a.max_blocks <= 0)
    return fail(IRLM_PA_INVALID, "num_blocks and max_blocks must be > 0");
  if (a.sliding_window < 0)
    return fail(IRLM_PA_INVALID,
                "sliding_window must be >= 0, got " + std::to_string(a.sliding_window));
  if (a.num_alibi_slopes != 0 && a.num_alibi_slopes != a.heads)
    return fail(IRLM_PA_INVALID, std::to_string(a.num_alibi_slopes) + " alibi slopes for " +
                                     std::to_string(a.heads) + " heads");
  if (a.num_alibi_slopes > IRLM_PA_MAX_ALIBI_HEADS)
    return fail(IRLM_PA_UNSUPPORTED, "ALiBi with more than " +
                                         std::to_string(IRLM_PA_MAX_ALIBI_HEADS) + " heads");
  if (a.num_alibi_slopes > 0 && a.alibi_slopes == nullptr)
    return fail(IRLM_PA_INVALID, "num_alibi_slopes > 0 with alibi_slopes NULL");
  if (a.decode < -1 || a.decode > 1)
    return fail(IRLM_PA_INVALID, "decode must be -1, 0 or 1");
  if (a.max_q_len < 0 || a.max_kv_len < 0 || a.num_splits < 0 || a.num_sms < 0)
    return fail(IRLM_PA_INVALID, "max_q_len, max_kv_len, num_splits and num_sms must be >= 0");
  const long long hd = static_cast<long long>(a.heads) * a.head_dim;
  const long long kvd = static_cast<long long>(a.kv_heads) * a.head_dim;
  const long long qs = a.query_stride ? a.query_stride : hd;
  const long long os = a.out_stride ? a.out_stride : hd;
  const long long ks = a.key_stride ? a.key_stride : kvd;
  const long long vs = a.value_stride ? a.value_stride : kvd;
  if (qs < hd || os < hd || ks < kvd || vs < kvd)
    return fail(IRLM_PA_INVALID, "a token stride is smaller than its row (heads * head_dim)");
  const int vec = 16 / (a.dtype == IRLM_DTYPE_F32 ? 4 : 2);
  if (qs % vec)
    return fail(IRLM_PA_INVALID, "q must be 16-byte aligned with a token stride that is a "
                                 "multiple of 16 bytes");
  if (os % 4)
    return fail(IRLM_PA_INVALID, "out must be 8-byte aligned with a token stride that is a "
                                 "multiple of 4 elements");
  if (!pointers) return IRLM_PA_OK;
  if (!a.query || !a.key || !a.value || !a.kv_cache || !a.block_tables || !a.q_lens ||
      !a.cached_lens || !a.out)
    return fail(IRLM_PA_INVALID, "a tensor pointer is NULL");
  if (!aligned(a.kv_cache, 16)) return fail(IRLM_PA_INVALID, "kv_cache must be 16-byte aligned");
  if (!aligned(a.query, 16))
    return fail(IRLM_PA_INVALID, "q must be 16-byte aligned with a token stride that is a "
                                 "multiple of 16 bytes");
  if (!aligned(a.out, 8))
    return fail(IRLM_PA_INVALID, "out must be 8-byte aligned with a token stride that is a "
                                 "multiple of 4 elements");
  return IRLM_PA_OK;
}

int sm_count(const IrlmPagedAttentionArgs& a, int* sms) {
  if (a.num_sms > 0) {
    *sms = a.num_sms;
    return IRLM_PA_OK;
  }
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess)
    return fail(static_cast<int>(e), std::string("cannot read the SM count: ") +
                                         cudaGetErrorString(e));
  return IRLM_PA_OK;
}

// ops.choose_splits
void choose_splits(long long ctas, long long kv_len, int bn, int sms, int* splits, int* size) {
  *splits = 1;
  *size = kNoSplit;
  if (kv_len <= kMinSplitKeys || (ctas >= sms && kv_len <= 4LL * kMinSplitKeys)) return;
  long long s = std::max(1LL, cdiv(4LL * sms, std::max(ctas, 1LL)));
  s = std::min(std::min(s, kv_len / kMinSplitKeys), static_cast<long long>(kChosenMaxSplits));
  if (s <= 1) return;
  const long long sz = cdiv(cdiv(kv_len, s), bn) * bn;
  *splits = static_cast<int>(cdiv(kv_len, sz));
  *size = static_cast<int>(sz);
}

// ops.paged_attention_decode's forced num_splits
void forced_splits(int n, long long kv_len, int bn, int* splits, int* size) {
  long long sz = cdiv(kv_len, std::min(kMaxSplits, std::max(1, n)));
  sz = cdiv(sz, bn) * bn;
  *splits = static_cast<int>(cdiv(kv_len, sz));
  *size = *splits == 1 ? kNoSplit : static_cast<int>(sz);
}

bool decides_decode(const IrlmPagedAttentionArgs& a) {
  return a.decode == -1 ? a.num_tokens == a.num_reqs : a.decode == 1;
}

long long kv_len_bound(const IrlmPagedAttentionArgs& a) {
  long long kv = a.max_kv_len ? a.max_kv_len : static_cast<long long>(a.max_blocks) * a.block_size;
  return a.sliding_window ? std::min(kv, static_cast<long long>(a.sliding_window)) : kv;
}

void set(IrlmLaunch* l, const char* name, long long gx, long long gy, long long gz, int bx,
         size_t smem) {
  l->kernel = name;
  l->grid[0] = static_cast<unsigned>(gx);
  l->grid[1] = static_cast<unsigned>(gy);
  l->grid[2] = static_cast<unsigned>(gz);
  l->block[0] = static_cast<unsigned>(bx);
  l->block[1] = l->block[2] = 1;
  l->shared_mem_bytes = smem;
}

int make_plan(const IrlmPagedAttentionArgs& a, size_t workspace_bytes, bool pointers,
              IrlmPagedAttentionPlan* plan) {
  *plan = IrlmPagedAttentionPlan{};
  int rc = check(a, pointers);
  if (rc) return rc;
  const bool decode = decides_decode(a);
  plan->decode = decode ? 1 : 0;
  plan->num_splits = 1;
  plan->split_size = kNoSplit;
  if (decode && a.num_tokens != a.num_reqs)
    return fail(IRLM_PA_INVALID, "decode takes one query per request: q has " +
                                     std::to_string(a.num_tokens) + " tokens for " +
                                     std::to_string(a.num_reqs) + " requests");
  const int T = a.num_tokens, R = a.num_reqs;
  if (T == 0 || R == 0) return IRLM_PA_OK;  // nothing to write or attend (as the launchers)
  Variant v{};
  variant(a.dtype, a.cache_dtype, a.head_dim, decode, &v);
  const int vec = 16 / v.elem_size;
  const int G = a.heads / a.kv_heads;

  set(&plan->prepare, "irlm_paged_attention_prepare", 1, 1, 1, kPrepareThreads, 0);

  // ops.kv_cache_write: the vectorised variant where rows, pointers and strides allow it
  const long long kvd = static_cast<long long>(a.kv_heads) * a.head_dim;
  const long long ks = a.key_stride ? a.key_stride : kvd;
  const long long vs = a.value_stride ? a.value_stride : kvd;
  const bool vec_ok = kvd % vec == 0 && ks % vec == 0 && vs % vec == 0 &&
                      (!pointers || (aligned(a.key, 16) && aligned(a.value, 16)));
  set(&plan->kv_write,
      intern("irlm_kv_cache_write<" + std::string(v.ctype) + ", " +
             std::to_string(vec_ok ? vec : 1) + v.cache_arg + ">"),
      T, 1, 1, 128, 0);

  const std::string tmpl = std::string(v.ctype) + ", " + std::to_string(a.head_dim);
  if (!decode) {  // ops.prefill_attention
    const long long max_q = a.max_q_len ? a.max_q_len : T;
    set(&plan->attention,
        intern("irlm_prefill_attention<" + tmpl + ", " + std::to_string(v.block_n) +
               v.cache_arg + ">"),
        cdiv(max_q * G, 64), a.kv_heads, R, 128, v.smem);
  } else {  // ops.paged_attention_decode
    const long long kv_len = kv_len_bound(a);
    const long long tiles = cdiv(G, 16);
    int splits, size;
    if (a.num_splits) {
      forced_splits(a.num_splits, kv_len, v.block_n, &splits, &size);
    } else {
      int sms = 0;
      if ((rc = sm_count(a, &sms))) return rc;
      choose_splits(static_cast<long long>(R) * a.kv_heads * tiles, kv_len, v.block_n, sms,
                    &splits, &size);
    }
    // fewer partitions where the workspace cannot hold their partial outputs
    for (int want = splits - 1; splits > 1 && layout(a, R, T, splits).bytes > workspace_bytes;
         --want)
      forced_splits(want, kv_len, v.block_n, &splits, &size);
    plan->num_splits = splits;
    plan->split_size = size;
    set(&plan->attention,
        intern("irlm_paged_attention_decode<" + tmpl + ", " + std::to_string(v.block_n) +
               v.cache_arg + ">"),
        tiles * splits, a.kv_heads, R, 128, v.smem);
    if (splits > 1)
      set(&plan->split_reduce, intern("irlm_attention_split_reduce<" + tmpl + ">"), a.heads, R,
          1, 128, 0);
  }
  plan->workspace_bytes = layout(a, R, T, plan->num_splits).bytes;
  if (plan->workspace_bytes > workspace_bytes)
    return fail(IRLM_PA_WORKSPACE, "the workspace holds " + std::to_string(workspace_bytes) +
                                       " bytes, this call needs " +
                                       std::to_string(plan->workspace_bytes) +
                                       " (irlm_paged_attention_workspace_size)");
  return IRLM_PA_OK;
}

int launch(const IrlmLaunch& l, cudaStream_t stream, const AttnParams& p) {
  const int rc = irlm_launch_kernel(l.kernel, l.grid[0], l.grid[1], l.grid[2], l.block[0],
                                    l.block[1], l.block[2], l.shared_mem_bytes, stream, &p);
  if (rc == -1)
    return fail(IRLM_PA_INTERNAL, std::string("the library has no kernel ") + l.kernel +
                                      " (built from other sources than this file?)");
  if (rc != 0)
    return fail(rc, std::string("launching ") + l.kernel + " failed: " +
                        cudaGetErrorString(static_cast<cudaError_t>(rc)));
  return IRLM_PA_OK;
}

}  // namespace

extern "C" const char* irlm_paged_attention_error(void) { return g_error.c_str(); }

extern "C" int irlm_paged_attention_workspace_size(const IrlmPagedAttentionArgs* args,
                                                   size_t* bytes) {
  g_error.clear();
  if (args == nullptr || bytes == nullptr) return fail(IRLM_PA_INVALID, "NULL argument");
  const IrlmPagedAttentionArgs& a = *args;
  int rc = check(a, false);
  if (rc) return rc;
  // The most any batch within these bounds needs.  Split-KV applies to decode batches
  // (tokens == reqs <= min(num_reqs, num_tokens)); the partition count before rounding the
  // partition size (which bounds the final count) grows with the context bound, and the
  // maximum over every batch size grows with num_reqs, so the answer never shrinks as the
  // bounds grow: a workspace sized for a profile's largest shapes serves every smaller call.
  size_t most = layout(a, a.num_reqs, a.num_tokens, 1).bytes;
  const int decode_reqs = a.decode == 0 ? 0 : std::min(a.num_reqs, a.num_tokens);
  if (decode_reqs > 0) {
    const long long kv_len = kv_len_bound(a);
    const long long tiles = cdiv(a.heads / a.kv_heads, 16);
    int sms = 0;
    if (!a.num_splits && (rc = sm_count(a, &sms))) return rc;
    for (int r = a.num_splits ? decode_reqs : 1; r <= decode_reqs; ++r) {
      long long splits;
      if (a.num_splits) {
        splits = std::min(kMaxSplits, a.num_splits);
      } else if (kv_len <= kMinSplitKeys) {
        splits = 1;
      } else {   // choose_splits before the partition size is rounded up
        splits = std::max(1LL, cdiv(4LL * sms, static_cast<long long>(r) * a.kv_heads * tiles));
        splits = std::min(std::min(splits, kv_len / kMinSplitKeys),
                          static_cast<long long>(kChosenMaxSplits));
      }
      most = std::max(most, layout(a, r, r, static_cast<int>(std::max(1LL, splits))).bytes);
    }
  }
  *bytes = most + kAlign;  // room to align the base
  return IRLM_PA_OK;
}

extern "C" int irlm_paged_attention_plan(const IrlmPagedAttentionArgs* args,
                                         size_t workspace_bytes, IrlmPagedAttentionPlan* plan) {
  g_error.clear();
  if (args == nullptr || plan == nullptr) return fail(IRLM_PA_INVALID, "NULL argument");
  // the workspace the call would get after aligning an arbitrary base
  return make_plan(*args, workspace_bytes >= kAlign ? workspace_bytes - kAlign : 0,
                   args->query != nullptr, plan);
}

extern "C" int irlm_paged_attention(const IrlmPagedAttentionArgs* args, void* workspace,
                                    size_t workspace_bytes, void* stream) {
  g_error.clear();
  if (args == nullptr) return fail(IRLM_PA_INVALID, "NULL argument");
  const IrlmPagedAttentionArgs& a = *args;
  // align the workspace base (the partial outputs are read as float4)
  const uintptr_t raw = reinterpret_cast<uintptr_t>(workspace);
  const uintptr_t base = (raw + kAlign - 1) / kAlign * kAlign;
  const size_t avail = workspace == nullptr || workspace_bytes < base - raw
                           ? 0 : workspace_bytes - (base - raw);
  IrlmPagedAttentionPlan plan;
  int rc = make_plan(a, avail, true, &plan);
  if (rc) return rc;
  if (a.num_tokens == 0 || a.num_reqs == 0) return IRLM_PA_OK;
  if (workspace == nullptr)
    return fail(IRLM_PA_WORKSPACE, "the workspace is NULL (irlm_paged_attention_workspace_size)");
  auto* ws = reinterpret_cast<unsigned char*>(base);
  const Layout l = layout(a, a.num_reqs, a.num_tokens, plan.num_splits);
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  PrepareParams pp{};
  pp.q_lens = a.q_lens;
  pp.cu_q_lens = reinterpret_cast<int*>(ws + l.cu_q_lens);
  pp.num_reqs = a.num_reqs;
  pp.num_alibi = a.num_alibi_slopes;
  pp.alibi = a.num_alibi_slopes ? reinterpret_cast<float*>(ws + l.alibi) : nullptr;
  for (int i = 0; i < a.num_alibi_slopes; ++i) pp.slopes[i] = a.alibi_slopes[i];
  irlm_paged_attention_prepare<<<1, kPrepareThreads, 0, s>>>(pp);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return fail(static_cast<int>(e), std::string("launching irlm_paged_attention_prepare "
                                                 "failed: ") + cudaGetErrorString(e));

  const long long kvd = static_cast<long long>(a.kv_heads) * a.head_dim;
  const long long hd = static_cast<long long>(a.heads) * a.head_dim;
  const long long layer_offset = static_cast<long long>(a.layer) * a.num_blocks * 2 *
                                 a.block_size * kvd;
  int shift = 0;
  while ((1 << shift) < a.block_size) ++shift;

  // ops.kv_cache_write
  const KvWriteParams wp{a.key, a.value, a.kv_cache, a.block_tables, pp.cu_q_lens, a.cached_lens,
       a.key_stride ? a.key_stride : kvd, a.value_stride ? a.value_stride : kvd, layer_offset,
       a.num_reqs, a.kv_heads, a.head_dim, a.block_size, shift, a.max_blocks, a.kv_scale_k,
       a.kv_scale_v};
  rc = irlm_launch_kernel(plan.kv_write.kernel, plan.kv_write.grid[0], 1, 1, 128, 1, 1, 0, s,
                          &wp);
  if (rc == -1)
    return fail(IRLM_PA_INTERNAL, std::string("the library has no kernel ") +
                                      plan.kv_write.kernel);
  if (rc) return fail(rc, std::string("launching ") + plan.kv_write.kernel + " failed: " +
                              cudaGetErrorString(static_cast<cudaError_t>(rc)));

  // ops._attn_common
  AttnParams p{};
  p.q = a.query;
  p.out = a.out;
  p.cache = a.kv_cache;
  p.block_tables = a.block_tables;
  p.cu_q_lens = pp.cu_q_lens;
  p.cached_lens = a.cached_lens;
  p.alibi = pp.alibi;
  if (plan.num_splits > 1) {
    p.part_out = reinterpret_cast<float*>(ws + l.part_out);
    p.part_ml = reinterpret_cast<float*>(ws + l.part_ml);
  }
  p.q_stride = a.query_stride ? a.query_stride : hd;
  p.o_stride = a.out_stride ? a.out_stride : hd;
  p.layer_offset = layer_offset;
  p.num_reqs = a.num_reqs;
  p.heads = a.heads;
  p.kv_heads = a.kv_heads;
  p.group = a.heads / a.kv_heads;
  p.block_size = a.block_size;
  p.block_shift = shift;
  p.max_blocks = a.max_blocks;
  p.window = a.sliding_window;
  p.num_splits = plan.num_splits;
  p.split_size = plan.split_size;
  p.num_tokens = a.num_tokens;
  p.smem_bytes = static_cast<int>(plan.attention.shared_mem_bytes);
  // in double, as the Python launcher computes it
  const double scale = a.scale > 0.f ? static_cast<double>(a.scale)
                                     : 1.0 / std::sqrt(static_cast<double>(a.head_dim));
  // an int8 / fp8 cache: q . (k * ks) = ks * (q . k), so the key scale joins the softmax
  // scale; the value scale multiplies the output (ops._attn_common)
  const bool quant = quantized_cache(a);
  const double ks = quant ? static_cast<double>(a.kv_scale_k) : 1.0;
  p.scale_log2 = static_cast<float>(scale * ks * 1.4426950408889634);
  p.v_scale = quant ? a.kv_scale_v : 1.f;
  if ((rc = launch(plan.attention, s, p))) return rc;
  if (plan.split_reduce.kernel != nullptr && (rc = launch(plan.split_reduce, s, p))) return rc;
  return IRLM_PA_OK;
}
