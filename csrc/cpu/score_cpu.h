// C++ CPU backend: the fused [E, N, K] reduction and the streaming update + finalize.
// Pointers are raw (the Python layer validates tensors); offsets are 64-bit throughout.
#pragma once

#include <stdint.h>

#include "ensel/state.h"

namespace ensel {

Failure fused_cpu(LogitsView logits, int64_t E, int64_t N, int64_t K, const int64_t* labels,
                  ScoreOutputs out, int num_threads);

// Adds one member's logits for rows [start, start + rows). Either the whole batch is applied or,
// on invalid input, nothing is. The caller guarantees members[n] < history_capacity.
Failure update_cpu(StreamState state, LogitsView logits, int64_t start, int64_t rows, int num_threads);

// Every sample must have seen the same number E > 0 of members (checked by the caller).
void finalize_cpu(StreamState state, int32_t E, ScoreOutputs out, int num_threads);

}  // namespace ensel
