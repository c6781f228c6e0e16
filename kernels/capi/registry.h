// Registration of kernel instantiations into the C ABI's table (registry.cu).
#pragma once

namespace irlm {
struct KernelEntry {
  const char* name;      // the NVRTC name expression, e.g. "irlm_rms_norm<float, 4, 8, false>"
  const void* function;  // the __global__ function
};

// A static Registrar in each generated instance file adds its entries when the library loads.
struct Registrar {
  Registrar(const KernelEntry* entries, int count);
};
}  // namespace irlm
