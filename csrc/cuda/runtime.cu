// The CUDA side of ensel._C: what the runtime and driver report. The kernels that follow (the
// GPU issue) are added beside this file and built by the same CMake rule.
#include <cuda_runtime.h>

#include "cuda/runtime.h"

namespace ensel {

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_device_count(const char** error) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  *error = status == cudaSuccess ? nullptr : cudaGetErrorString(status);
  return status == cudaSuccess ? count : 0;
}

}  // namespace ensel
