// The per-row and per-sample math of the contract (DESIGN.md section 1), written once.
//
// For one member's row l in R^K:   m = max_k l_k,  a = argmax (lowest index on ties),
//   s = sum_k exp(l_k - m),  t = sum_k exp(l_k - m) (l_k - m),
//   H(p) = -sum_k p_k log p_k = log s - t / s,   p_k = exp(l_k - m) / s,
//   log p_y = (l_y - m) - log s.
// Per sample, over the E members in stream order:
//   pbar = mean_e p_e,  entropy = H(pbar),  mean_entropy = mean_e H(p_e),
//   mutual_info = max(entropy - mean_entropy, 0),  mode/mode_votes from the argmax votes,
//   variation_ratio = (E - mode_votes) / E,  margin = pbar_(1) - pbar_(2),
//   least_confidence = 1 - pbar_(1),  error_count = (E - #{a_e = y}) / E,
//   forgetting = #{e >= 2 : a_(e-1) = y, a_e != y},
//   nll = -log pbar_y = -(logsumexp_e log p_e,y - log E)  (in log space, so a tiny pbar_y
//   does not underflow to +inf where the float64 reference is finite).
//
// Row loops here are sequential over k (one thread per row); they serve the CPU kernels and the
// GPU kernels' one-thread-per-row paths. Cooperative GPU paths combine the same scalar pieces.
#pragma once

#include <math.h>

#include "ensel/common.h"
#include "ensel/math.h"

namespace ensel {

// Column order of the float and integer outputs; must match ensel/_fields.py.
enum FloatField : int32_t {
  kEntropy = 0, kMeanEntropy, kMutualInfo, kVariationRatio, kMargin, kLeastConfidence,
  kErrorCount, kNll, kNumFloatFields
};
enum IntField : int32_t { kMode = 0, kModeVotes, kForgetting, kNumIntFields };

// Output rows of shape [kNum*Fields, N]; `stride` is N.
struct ScoreOutputs {
  float* floats;
  int64_t* ints;
  int64_t stride;
};

// Validates a row without computing anything else: NaN, +inf or all -inf are invalid.
template <typename T>
ENSEL_HD Status check_row(const T* row, int64_t K, float& row_max) {
  float m = -kInf;
  int32_t bad = 0;
  ENSEL_SIMD(reduction(max : m) reduction(| : bad))
  for (int64_t k = 0; k < K; ++k) {
    const float x = to_float(row[k]);
    m = x > m ? x : m;
    bad |= !(x < kInf);  // true for +inf and NaN
  }
  if (bad) {
    for (int64_t k = 0; k < K; ++k) {  // the rare path: name the first offending value
      const float x = to_float(row[k]);
      if (x != x) return kNaN;
      if (x == kInf) return kPosInf;
    }
  }
  row_max = m;
  return m == -kInf ? kAllNegInf : kOk;
}

struct RowResult {
  float max;       // m
  float log_sum;   // log s
  float entropy;   // H(p_e)
  int32_t argmax;  // a_e
};

// One member's row: validates it, adds p_e into pbar_sum[0..K) and fills `r`.
// `scratch` holds K floats (the exponentials, so exp is evaluated once per logit).
template <typename T>
ENSEL_HD Status process_row(const T* row, int64_t K, float* scratch, float* pbar_sum, RowResult& r) {
  float m;
  const Status status = check_row(row, K, m);
  if (status != kOk) return status;

  // exp(-104) flushes to 0, and 0 * -104 = 0, where -inf would give 0 * -inf = NaN.
  // The argmax is the first k with l_k = m (ties go to the lowest index), as a min reduction.
  const float kFloor = -104.0f;
  float s = 0.0f, t = 0.0f;
  const int32_t k_classes = static_cast<int32_t>(K);  // class indices fit in int32 (as argmaxes do)
  int32_t a = k_classes;
  ENSEL_SIMD(reduction(+ : s, t) reduction(min : a))
  for (int32_t k = 0; k < k_classes; ++k) {
    float d = to_float(row[k]) - m;
    const int32_t candidate = d == 0.0f ? k : k_classes;
    a = candidate < a ? candidate : a;
    d = d < kFloor ? kFloor : d;
    const float ex = exp_approx(d);
    scratch[k] = ex;
    s += ex;
    t += ex * d;
  }
  const float inv_s = 1.0f / s;
  ENSEL_SIMD()
  for (int64_t k = 0; k < K; ++k) pbar_sum[k] += scratch[k] * inv_s;

  r.max = m;
  r.log_sum = logf(s);
  const float h = r.log_sum - t * inv_s;
  r.entropy = h > 0.0f ? h : 0.0f;  // rounding can leave -1 ulp on one-hot rows
  r.argmax = a;
  return kOk;
}

// What the label-dependent scores need, per sample.
struct LabelState {
  int32_t correct;       // #{e : a_e = y}
  int32_t last_correct;  // a_(e-1) = y
  int32_t forgetting;
  float nll_max;         // running logsumexp of log p_e,y: max and sum of exp(. - max)
  float nll_sum;
};

ENSEL_HD LabelState empty_label_state() { return LabelState{0, 0, 0, -kInf, 0.0f}; }

ENSEL_HD void observe_label(LabelState& st, int32_t argmax, int64_t label, float log_p_label) {
  const int32_t correct = argmax == label;
  st.forgetting += st.last_correct & (1 - correct);
  st.correct += correct;
  st.last_correct = correct;
  if (log_p_label > st.nll_max) {
    st.nll_sum = st.nll_sum * expf(st.nll_max - log_p_label) + 1.0f;
    st.nll_max = log_p_label;
  } else if (log_p_label > -kInf) {
    st.nll_sum += expf(log_p_label - st.nll_max);
  }
}

// Mode of E member argmaxes (read at argmax[e * stride]); ties go to the lowest class.
// `counts` has K zeros on entry and is left zeroed: O(E) whatever K.
ENSEL_HD void mode_of(const int32_t* argmax, int64_t stride, int32_t E, int32_t* counts,
                      int32_t& mode, int32_t& votes) {
  for (int32_t e = 0; e < E; ++e) ++counts[argmax[e * stride]];
  int32_t best = argmax[0], best_votes = counts[best];
  for (int32_t e = 1; e < E; ++e) {
    const int32_t c = argmax[e * stride], v = counts[c];
    if (v > best_votes || (v == best_votes && c < best)) {
      best = c;
      best_votes = v;
    }
  }
  for (int32_t e = 0; e < E; ++e) counts[argmax[e * stride]] = 0;
  mode = best;
  votes = best_votes;
}

// Turns one sample's sums over its E members into the contract's scores (column n of `out`).
ENSEL_HD void finalize_sample(const float* pbar_sum, int64_t K, int32_t E, float entropy_sum,
                              int32_t mode, int32_t votes, const LabelState* label_state,
                              ScoreOutputs out, int64_t n) {
  const float inv_e = 1.0f / static_cast<float>(E);
  float neg_h = 0.0f, top1 = 0.0f;
  ENSEL_SIMD(reduction(+ : neg_h) reduction(max : top1))
  for (int64_t k = 0; k < K; ++k) {
    const float p = pbar_sum[k] * inv_e;
    neg_h += xlogx(p);
    top1 = p > top1 ? p : top1;
  }
  float margin = 1.0f;  // K = 1: the contract's value
  if (K > 1) {
    int64_t i1 = 0;
    while (pbar_sum[i1] * inv_e != top1) ++i1;
    float top2 = 0.0f;
    ENSEL_SIMD(reduction(max : top2))
    for (int64_t k = 0; k < K; ++k) {
      const float p = k == i1 ? 0.0f : pbar_sum[k] * inv_e;
      top2 = p > top2 ? p : top2;
    }
    margin = top1 - top2;
  }
  const float entropy = -neg_h > 0.0f ? -neg_h : 0.0f;
  const float mean_entropy = entropy_sum * inv_e;
  const float mi = entropy - mean_entropy;
  float* f = out.floats + n;
  const int64_t s = out.stride;
  f[kEntropy * s] = entropy;
  f[kMeanEntropy * s] = mean_entropy;
  f[kMutualInfo * s] = mi > 0.0f ? mi : 0.0f;
  // (E - v) / E is one correctly rounded division: bit-identical in every backend.
  f[kVariationRatio * s] = static_cast<float>(E - votes) / static_cast<float>(E);
  f[kMargin * s] = margin;
  f[kLeastConfidence * s] = 1.0f - top1;
  if (label_state != nullptr) {
    f[kErrorCount * s] = static_cast<float>(E - label_state->correct) / static_cast<float>(E);
    f[kNll * s] = label_state->nll_max == -kInf
                      ? kInf
                      : -(label_state->nll_max + logf(label_state->nll_sum) - logf(static_cast<float>(E)));
  }
  int64_t* i = out.ints + n;
  i[kMode * s] = mode;
  i[kModeVotes * s] = votes;
  i[kForgetting * s] = label_state != nullptr ? label_state->forgetting : 0;
}

}  // namespace ensel
