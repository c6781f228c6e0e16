/* irlm kernel library: llm.paged_attention in one call (the launch logic of
 * irlm.kernels.ops.paged_attention, written once in C++ for C/C++ callers such as the TensorRT
 * plugin in kernels/plugins/irlm_plugins.cpp).
 *
 * One call writes this step's keys and values into the paged cache (irlm_kv_cache_write) and
 * runs causal attention over each request's cached prefix: the decode kernel (with split-KV /
 * flash-decoding partitions and their reduce) when every request has one token, else the
 * prefill kernel.  Everything is launched on `stream` without synchronising, so a call can be
 * captured in a CUDA graph.  The kernels, their instantiations and the parameter struct are the
 * ones the NVRTC path uses (the kernel table of irlm_kernels.h).
 *
 * Tensors (all device memory, row-major; "stride" = elements between consecutive tokens, 0 =
 * contiguous):
 *   query         [num_tokens, heads, head_dim]        heads and head_dim contiguous
 *   key, value    [num_tokens, kv_heads, head_dim]      heads and head_dim contiguous
 *   kv_cache      [layers, num_blocks, 2, block_size, kv_heads, head_dim]  contiguous, updated
 *   block_tables  [num_reqs, max_blocks] int32          contiguous
 *   q_lens, cached_lens [num_reqs] int32
 *   out           [num_tokens, heads, head_dim]
 * Request r's q_lens[r] tokens are contiguous, in request order, at positions
 * cached_lens[r] + i (irlm.ops.llm).  Element types: float32, float16, bfloat16 (float32
 * attention runs on the tensor cores as tf32); query, key, value, out and the cache share one.
 * head_dim: 64, 80, 96, 128 or 256.  The cache may instead hold int8 or fp8 e4m3 (cache_dtype
 * IRLM_DTYPE_I8 / IRLM_DTYPE_F8E4M3) with kv_scale_k / kv_scale_v (quantize-kv-cache's
 * kv_scales): keys are stored as k / kv_scale_k and values as v / kv_scale_v (int8 rounded
 * half to even and clamped to +-127, e4m3 clamped to +-448), as irlm.ops.llm.kv_to_cache.
 */
#ifndef IRLM_PAGED_ATTENTION_H
#define IRLM_PAGED_ATTENTION_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types (irlm DType names in comments). */
enum IrlmDType {
  IRLM_DTYPE_F32 = 0,      /* f32 */
  IRLM_DTYPE_F16 = 1,      /* f16 */
  IRLM_DTYPE_BF16 = 2,     /* bf16 */
  IRLM_DTYPE_I8 = 3,       /* i8 (quantized KV cache) */
  IRLM_DTYPE_F8E4M3 = 4    /* f8e4m3 (quantized KV cache) */
};

/* Return codes: 0, a negative IRLM_PA_* code (irlm_paged_attention_error() says why), or a
 * positive cudaError_t of a failed launch. */
enum IrlmPagedAttentionStatus {
  IRLM_PA_OK = 0,
  IRLM_PA_INVALID = -2,      /* an argument is wrong (shape, alignment, range, null pointer) */
  IRLM_PA_UNSUPPORTED = -3,  /* valid but has no kernel (head_dim, ALiBi heads, ...) */
  IRLM_PA_WORKSPACE = -4,    /* the workspace is too small even without split-KV */
  IRLM_PA_INTERNAL = -5      /* a kernel is missing from the library (a build mismatch) */
};

/* The most ALiBi slopes (= heads) a call takes (they travel as kernel parameters). */
#define IRLM_PA_MAX_ALIBI_HEADS 512

typedef struct IrlmPagedAttentionArgs {
  const void* query;
  const void* key;
  const void* value;
  void* kv_cache;
  const int* block_tables;
  const int* q_lens;
  const int* cached_lens;
  void* out;
  const float* alibi_slopes;   /* HOST memory, num_alibi_slopes (= heads) floats; NULL: none */
  long long query_stride;      /* elements between tokens; 0: heads * head_dim */
  long long key_stride;        /* 0: kv_heads * head_dim */
  long long value_stride;      /* 0: kv_heads * head_dim */
  long long out_stride;        /* 0: heads * head_dim */
  int num_tokens;
  int num_reqs;
  int heads;
  int kv_heads;
  int head_dim;
  int layers;                  /* kv_cache dims 0, 1, 3 */
  int num_blocks;
  int block_size;              /* a power of two */
  int max_blocks;              /* block_tables dim 1 */
  int layer;                   /* the layer of the cache this call reads and writes */
  int dtype;                   /* IrlmDType of query, key, value, out */
  int cache_dtype;             /* IrlmDType of kv_cache */
  int num_alibi_slopes;        /* 0 or heads */
  int sliding_window;          /* 0: none; else each query sees that many latest positions */
  float scale;                 /* softmax scale; 0: 1 / sqrt(head_dim) */
  float kv_scale_k;            /* i8 / f8e4m3 caches only (> 0); 0 for a float cache */
  float kv_scale_v;
  /* Upper bounds the caller may know (the NVRTC path computes them with a device sync; this
   * call never synchronises): max_q_len >= every q_lens[r] (0: num_tokens), max_kv_len >=
   * every cached_lens[r] + q_lens[r] (0: max_blocks * block_size).  Tighter bounds launch
   * fewer idle CTAs and pick split-KV partitions closer to the real lengths. */
  int max_q_len;
  int max_kv_len;
  int decode;                  /* -1: decode kernel iff num_tokens == num_reqs (every q_len
                                  is then taken to be 1, as the Python launcher does); 0: prefill;
                                  1: decode (one token per request) */
  int num_splits;              /* decode split-KV partitions; 0: chosen from the batch */
  int num_sms;                 /* the device's SM count; 0: asked of the current device */
} IrlmPagedAttentionArgs;

/* One kernel launch of a plan (kernel NULL: not launched). */
typedef struct IrlmLaunch {
  const char* kernel;          /* the name in irlm_kernel_name()'s table */
  unsigned grid[3];
  unsigned block[3];
  size_t shared_mem_bytes;
} IrlmLaunch;

/* What irlm_paged_attention launches for some arguments, in order. */
typedef struct IrlmPagedAttentionPlan {
  IrlmLaunch prepare;          /* cu_q_lens and the ALiBi slopes into the workspace */
  IrlmLaunch kv_write;
  IrlmLaunch attention;
  IrlmLaunch split_reduce;     /* only with num_splits > 1 */
  int decode;
  int num_splits;
  int split_size;
  size_t workspace_bytes;      /* what this call uses of the workspace */
} IrlmPagedAttentionPlan;

/* Workspace bytes enough for any call with these arguments where num_tokens, num_reqs,
 * max_blocks, max_q_len and max_kv_len are upper bounds (pointers are not read; NULL is fine).
 * The answer never shrinks as those bounds grow (for the same num_sms), so the size for a
 * profile's largest shapes serves every call within it.  Returns a status; *bytes is set on
 * IRLM_PA_OK. */
int irlm_paged_attention_workspace_size(const IrlmPagedAttentionArgs* args, size_t* bytes);

/* The launches a call would make with a workspace of workspace_bytes (host only: no device
 * work; a CUDA call only when num_sms is 0).  The kernel names stay valid until the calling
 * thread's next irlm_paged_attention* call.  Returns a status. */
int irlm_paged_attention_plan(const IrlmPagedAttentionArgs* args, size_t workspace_bytes,
                              IrlmPagedAttentionPlan* plan);

/* Write the keys and values into the cache and attend; launches on `stream` (a cudaStream_t)
 * without synchronising.  A workspace smaller than the chosen split-KV needs gets fewer
 * partitions.  Returns a status (0 when launched). */
int irlm_paged_attention(const IrlmPagedAttentionArgs* args, void* workspace,
                         size_t workspace_bytes, void* stream);

/* Why the calling thread's last irlm_paged_attention* call failed (one line; "" after a
 * success). */
const char* irlm_paged_attention_error(void);

#ifdef __cplusplus
}
#endif

#endif /* IRLM_PAGED_ATTENTION_H */
