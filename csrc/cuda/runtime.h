#pragma once

namespace ensel {

// CUDART_VERSION the module was compiled against, e.g. 13000.
int cuda_runtime_version();

// Visible devices; on failure 0, with the runtime's message in *error (e.g. no driver).
int cuda_device_count(const char** error);

}  // namespace ensel
