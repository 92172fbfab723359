// Views of the inputs and of the accumulator state, shared by the CPU and CUDA kernels.
#pragma once

#include "ensel/common.h"
#include "ensel/row.h"

namespace ensel {

// The first invalid (member, sample) in lexicographic order, or status kOk.
struct Failure {
  Status status = kOk;
  int64_t member = -1;
  int64_t sample = -1;
};

// A [rows, K] (or [E, N, K]) block of logits; the class stride is 1.
struct LogitsView {
  const void* data;
  DType dtype;
  int64_t member_stride;  // elements between members (fused only)
  int64_t sample_stride;  // elements between rows
};

// The accumulator's state, in the layout every backend shares (see ensel/_state.py).
struct StreamState {
  int64_t num_samples;       // N
  int64_t num_classes;       // K
  int64_t history_capacity;  // rows of argmax_history
  float* pbar_sum;           // [N, K]
  float* entropy_sum;        // [N]
  int32_t* members;          // [N]
  int32_t* argmax_history;   // [capacity, N]
  const int64_t* labels;     // [N], or null: then the label fields below are unused
  int32_t* correct;          // [N]   LabelState, one array per field
  int32_t* last_correct;     // [N]
  int32_t* forgetting;       // [N]
  float* nll_max;            // [N]
  float* nll_sum;            // [N]

  ENSEL_HD LabelState load_label_state(int64_t n) const {
    return LabelState{correct[n], last_correct[n], forgetting[n], nll_max[n], nll_sum[n]};
  }
  ENSEL_HD void store_label_state(int64_t n, const LabelState& st) const {
    correct[n] = st.correct;
    last_correct[n] = st.last_correct;
    forgetting[n] = st.forgetting;
    nll_max[n] = st.nll_max;
    nll_sum[n] = st.nll_sum;
  }
};

}  // namespace ensel
