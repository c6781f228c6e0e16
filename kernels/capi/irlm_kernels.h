/* irlm kernel library: a small C ABI over the kernels in kernels/src/*.cu.
 *
 * Every kernel instantiation the NVRTC path can compile (irlm.kernels.ops.all_kernels()) is
 * registered under the same name expression the NVRTC path uses, e.g.
 * "irlm_rms_norm<float, 4, 8, false>".  Every kernel takes one parameter struct by value
 * (RmsNormParams, AttnParams, ... as defined in its source file; irlm.kernels.ops builds the
 * same structs with ctypes), so one launch entry point serves them all.
 */
#ifndef IRLM_KERNELS_H
#define IRLM_KERNELS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IRLM_KERNELS_ABI_VERSION 1

/* The ABI version this library was built with (IRLM_KERNELS_ABI_VERSION). */
int irlm_kernels_abi_version(void);
/* How many kernel instantiations the library holds, and the i-th one's name. */
int irlm_kernel_count(void);
const char* irlm_kernel_name(int i);
/* The __global__ function for a name (for cudaLaunchKernel / CUDA graphs); NULL if unknown. */
const void* irlm_kernel_function(const char* name);
/* Launch kernel `name` with its parameter struct `params` (copied by value at launch).
 * Returns 0 (cudaSuccess), the cudaError_t of a failed launch, or -1 for an unknown name. */
int irlm_launch_kernel(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                       unsigned block_x, unsigned block_y, unsigned block_z,
                       size_t shared_mem_bytes, void* cuda_stream, const void* params);

#ifdef __cplusplus
}
#endif

#endif /* IRLM_KERNELS_H */
