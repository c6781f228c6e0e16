// The C ABI of irlm_kernels.h: a name -> __global__ function table that the generated
// instance files (one per kernel source, gen_instances.py) fill at load time.
#include "irlm_kernels.h"
#include "registry.h"

#include <cuda_runtime.h>

#include <cstring>
#include <vector>

namespace {
std::vector<irlm::KernelEntry>& table() {
  static std::vector<irlm::KernelEntry> entries;
  return entries;
}
}  // namespace

namespace irlm {
Registrar::Registrar(const KernelEntry* entries, int count) {
  for (int i = 0; i < count; ++i) table().push_back(entries[i]);
}
}  // namespace irlm

extern "C" int irlm_kernels_abi_version(void) { return IRLM_KERNELS_ABI_VERSION; }

extern "C" int irlm_kernel_count(void) { return static_cast<int>(table().size()); }

extern "C" const char* irlm_kernel_name(int i) {
  if (i < 0 || i >= irlm_kernel_count()) return nullptr;
  return table()[i].name;
}

extern "C" const void* irlm_kernel_function(const char* name) {
  if (name == nullptr) return nullptr;
  for (const auto& e : table())
    if (std::strcmp(e.name, name) == 0) return e.function;
  return nullptr;
}

extern "C" int irlm_launch_kernel(const char* name, unsigned gx, unsigned gy, unsigned gz,
                                  unsigned bx, unsigned by, unsigned bz, size_t smem,
                                  void* stream, const void* params) {
  const void* fn = irlm_kernel_function(name);
  if (fn == nullptr) return -1;
  if (smem > 48 * 1024) {  // opt in to more than the default dynamic shared memory
    cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  void* args[] = {const_cast<void*>(params)};
  return static_cast<int>(cudaLaunchKernel(fn, dim3(gx, gy, gz), dim3(bx, by, bz), args, smem,
                                           static_cast<cudaStream_t>(stream)));
}
