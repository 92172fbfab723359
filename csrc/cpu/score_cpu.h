// C++ CPU backend: the fused [E, N, K] reduction and the streaming update + finalize.
// Pointers are raw (the Python layer validates tensors); offsets are 64-bit throughout.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "ensel/state.h"

namespace ensel {

// `probs`: the values are probabilities (ProbInput in ensel/row.h), read as they are, otherwise
// logits or log-probabilities (LogitInput).
Failure fused_cpu(LogitsView logits, bool probs, int64_t E, int64_t N, int64_t K, const int64_t* labels,
                  ScoreOutputs out, int num_threads);

// Adds one member's logits (probabilities if `probs`) for rows [start, start + rows). Either the
// whole batch is applied or, on invalid input, nothing is. The caller guarantees
// members[n] < history_capacity.
Failure update_cpu(StreamState state, LogitsView logits, bool probs, int64_t start, int64_t rows, int num_threads);

// Every sample must have seen the same number E > 0 of members (checked by the caller).
void finalize_cpu(StreamState state, int32_t E, ScoreOutputs out, int num_threads);

// The instruction-set levels (csrc/cpu/isa.h) this processor runs, lowest first; the one in use
// (the best, from load on); and a switch to another supported level (false if unknown or
// unsupported). Every level computes the contract's scores; the tests run each.
std::vector<std::string> cpu_isas();
std::string cpu_isa();
bool set_cpu_isa(const std::string& name);

}  // namespace ensel
