// CUDA backend: the fused [E, N, K] reduction and the streaming update + finalize, with the CPU
// backend's semantics (score_cpu.h). Host-callable without CUDA headers (bindings.cpp is plain C++).
//
// Every pointer is a device pointer on `device`; `stream` is the caller's cudaStream_t (as an
// integer, from torch.cuda.current_stream(device).cuda_stream). Each call takes a device
// workspace of at least the bytes its *_workspace_bytes function asks for (the caller allocates
// it, e.g. with torch's caching allocator), waits for its kernels, and returns the first invalid
// (member, sample) like the CPU kernels. CUDA errors throw std::runtime_error naming the step.
#pragma once

#include <stdint.h>

#include "ensel/state.h"

namespace ensel {

int64_t fused_cuda_workspace_bytes(DType dtype, int64_t E, int64_t N, int64_t K, int device);
Failure fused_cuda(LogitsView logits, int64_t E, int64_t N, int64_t K, const int64_t* labels, ScoreOutputs out,
                   void* workspace, int64_t workspace_bytes, int device, uintptr_t stream);

// One member's rows [start, start + rows): all applied, or none if any row is invalid. The caller
// guarantees members[n] < history_capacity.
int64_t update_cuda_workspace_bytes();
Failure update_cuda(StreamState state, LogitsView logits, int64_t start, int64_t rows, void* workspace,
                    int64_t workspace_bytes, int device, uintptr_t stream);

// Every sample must have seen the same number E > 0 of members (checked by the caller).
int64_t finalize_cuda_workspace_bytes(int64_t N, int64_t K, int device);
void finalize_cuda(StreamState state, int32_t E, ScoreOutputs out, void* workspace, int64_t workspace_bytes,
                   int device, uintptr_t stream);

}  // namespace ensel
