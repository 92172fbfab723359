// The per-row and per-sample math of the contract (docs/contract.md sections 1 and 8), written once.
//
// For one member's row l in R^K:   m = max_k l_k,  a = argmax (lowest index on ties),
//   s = sum_k exp(l_k - m),  t = sum_k exp(l_k - m) (l_k - m),
//   H(p) = -sum_k p_k log p_k = log s - t / s,   p_k = exp(l_k - m) / s,
//   log p_y = (l_y - m) - log s.
// Per sample, over the E members in stream order:
//   pbar = mean_e p_e,  entropy = H(pbar),  mean_entropy = mean_e H(p_e),
//   mutual_info = max(entropy - mean_entropy, 0),  mode/mode_votes from the argmax votes,
//   variation_ratio = (E - mode_votes) / E,  margin = pbar_(1) - pbar_(2),
//   vote_entropy = -sum_c (v_c / E) log(v_c / E), exactly from the vote counts (vote_entropy_of),
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
  kErrorCount, kNll, kVoteEntropy, kNumFloatFields
};
enum IntField : int32_t { kMode = 0, kModeVotes, kForgetting, kNumIntFields };

// Output rows of shape [kNum*Fields, N]; `stride` is N. `vote_log` is what writing vote_entropy
// reads: the fixed-point table [2^F, L[1], ..., L[E]], L[v] = round(log(v) 2^F), of
// ensel/_votes.py (built once in Python for every backend; on the outputs' device).
struct ScoreOutputs {
  float* floats;
  int64_t* ints;
  int64_t stride;
  const int64_t* vote_log;
};

// vote_entropy = (E log E - sum_c v_c log v_c) / E from S = sum_c v_c L[v_c] = sum_e L[c_e]
// (c_e: the votes of member e's class). S is an integer, exact in any order of classes, members
// or threads, so equal count multisets give equal bits; then three correctly rounded steps
// (int64 -> double, one division, double -> float), the same on every device (ensel/_votes.py).
// E L[E] - S >= 0 since v_c <= E; it is 0 when every member votes alike.
ENSEL_HD float vote_entropy_of(int64_t vote_log_sum, int32_t E, const int64_t* vote_log) {
  const int64_t d = static_cast<int64_t>(E) * vote_log[E] - vote_log_sum;
  return static_cast<float>(static_cast<double>(d) /
                            (static_cast<double>(E) * static_cast<double>(vote_log[0])));
}

// l - m, floored so that exp flushes to exactly 0 and 0 * (l - m) stays 0 for l = -inf
// (where 0 * -inf would be NaN).
ENSEL_HD float shifted_logit(float d) {
  const float kFloor = -104.0f;
  return d < kFloor ? kFloor : d;
}

// What a row's values are (docs/contract.md section 3), as the row math reads them. Each kind
// says which values are invalid and when a row has no mass, and turns each value x into d and
// w = exp(d) with d = log(x's unnormalized probability) + c for a constant c of the row: every
// score is invariant to c (H = log s - t / s, p_k = w_k / s, log p_y = d_y - log s), so c is
// chosen per kind to keep w in range, from `ref`, the row's reference (reference(m) of its
// maximum m). The argmax is the first x = m in either kind: compared on the values as given, so
// probabilities one ulp apart keep their order.
struct LogitInput {
  // Logits (and log-probabilities: softmax(log p) = p / sum p): NaN and +inf are invalid, a row
  // of -inf has no mass. ref = m, d = l - m floored by shifted_logit, w = exp(d) in (0, 1].
  template <typename C>
  static ENSEL_HD bool invalid(C x) { return !(x < static_cast<C>(kInf)); }
  template <typename C>
  static ENSEL_HD bool massless(C m) { return m == -static_cast<C>(kInf); }
  template <typename C>
  static ENSEL_HD C reference(C m) { return m; }
  template <typename C>
  static ENSEL_HD void terms(C x, C ref, float& d, float& w) {
    d = shifted_logit(static_cast<float>(x - ref));
    w = exp_approx(d);
  }
  // d of the label's value, unfloored (a -inf logit gives log p_y = -inf).
  template <typename C>
  static ENSEL_HD float label_shift(C x, C ref) { return static_cast<float>(x - ref); }
};

struct ProbInput {
  // Probabilities, any positive scale (a row is scored as the normalized row): NaN, negative
  // values and +inf are invalid, a row of zeros has no mass. ref = 2^-e for the exponent e of m
  // (pow2_inverse), so w = p ref is exact, the maximum's w is in [1, 2) and s >= 1; d = log w:
  // a log in place of an exp, and no division. Below FLT_MIN, d is taken at FLT_MIN (w d < 1e-36,
  // as xlogx takes it), which keeps subnormals and 0 (w d = 0) away from log_approx.
  template <typename C>
  static ENSEL_HD bool invalid(C x) { return !(x >= static_cast<C>(0) && x < static_cast<C>(kInf)); }
  template <typename C>
  static ENSEL_HD bool massless(C m) { return !(m > static_cast<C>(0)); }
  template <typename C>
  static ENSEL_HD C reference(C m) { return pow2_inverse(m); }
  template <typename C>
  static ENSEL_HD void terms(C x, C ref, float& d, float& w) {
    const float kTiny = 1.17549435e-38f;
    w = static_cast<float>(x * ref);
    d = log_approx(w < kTiny ? kTiny : w);
  }
  // In double, once per row: a label probability far below the maximum keeps a finite log.
  template <typename C>
  static ENSEL_HD float label_shift(C x, C ref) {
    return x > static_cast<C>(0) ? static_cast<float>(log(static_cast<double>(x) * static_cast<double>(ref)))
                                 : -kInf;
  }
};

// Validates a row without computing anything else: NaN, +inf or all -inf are invalid (for
// probabilities: NaN, negative or +inf values, or a row of zeros; a negative value is reported
// as kNaN, and ensel/_inputs.py names it from the row).
template <typename In = LogitInput, typename T>
ENSEL_HD Status check_row(const T* row, int64_t K, compute_t<T>& row_max) {
  using C = compute_t<T>;
  const C inf = static_cast<C>(kInf);
  C m = -inf;
  int32_t bad = 0;
  ENSEL_SIMD(reduction(max : m) reduction(| : bad))
  for (int64_t k = 0; k < K; ++k) {
    const C x = to_compute(row[k]);
    m = x > m ? x : m;
    bad |= In::invalid(x);
  }
  if (bad) {
    for (int64_t k = 0; k < K; ++k) {  // the rare path: name the first offending value
      const C x = to_compute(row[k]);
      if (x == inf) return kPosInf;
      if (In::invalid(x)) return kNaN;
    }
  }
  row_max = m;
  return In::massless(m) ? kAllNegInf : kOk;
}

// H(p_e) = log s - t / s; rounding can leave -1 ulp on one-hot rows, hence the clamp.
ENSEL_HD float member_entropy(float log_s, float t, float inv_s) {
  const float h = log_s - t * inv_s;
  return h > 0.0f ? h : 0.0f;
}

// Length of the blocks whose float32 partial sums are added up in double.
constexpr int32_t kSumBlock = 256;

struct RowResult {
  float log_sum;   // log s
  float log_p_label;  // log p_e,y when a label was given
  float entropy;   // H(p_e)
  int32_t argmax;  // a_e
};

// One member's row: validates it, adds p_e into pbar_sum[0..K) and fills `r` (log p_e,y too when
// label >= 0). `scratch` holds K floats (the exponentials, so exp is evaluated once per logit).
template <typename In = LogitInput, typename T>
ENSEL_HD Status process_row(const T* row, int64_t K, int64_t label, float* scratch, float* pbar_sum,
                            RowResult& r) {
  using C = compute_t<T>;
  C m;
  const Status status = check_row<In>(row, K, m);
  if (status != kOk) return status;

  // The argmax is the first k with l_k = m (ties go to the lowest index), as a min reduction.
  // Sums run in blocks added up in double: 33000 equal terms summed in float32 lanes would
  // drift by 1e-3 (each rounding errs the same way).
  double s_total = 0.0, t_total = 0.0;
  const C ref = In::reference(m);
  const int32_t k_classes = static_cast<int32_t>(K);  // class indices fit in int32 (as argmaxes do)
  int32_t a = k_classes;
  for (int32_t k0 = 0; k0 < k_classes; k0 += kSumBlock) {
    const int32_t k1 = k_classes - k0 < kSumBlock ? k_classes : k0 + kSumBlock;
    float s_block = 0.0f, t_block = 0.0f;
    ENSEL_SIMD(reduction(+ : s_block, t_block) reduction(min : a))
    for (int32_t k = k0; k < k1; ++k) {
      const C x = to_compute(row[k]);
      const int32_t candidate = x == m ? k : k_classes;
      a = candidate < a ? candidate : a;
      float d, ex;
      In::terms(x, ref, d, ex);
      scratch[k] = ex;
      s_block += ex;
      t_block += ex * d;
    }
    s_total += s_block;
    t_total += t_block;
  }
  const float s = static_cast<float>(s_total), t = static_cast<float>(t_total);
  const float inv_s = 1.0f / s;
  ENSEL_SIMD()
  for (int64_t k = 0; k < K; ++k) pbar_sum[k] += scratch[k] * inv_s;

  r.log_sum = logf(s);
  if (label >= 0) r.log_p_label = In::label_shift(to_compute(row[label]), ref) - r.log_sum;
  r.entropy = member_entropy(r.log_sum, t, inv_s);
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

// Mode of E member argmaxes (read at argmax[e * stride]); ties go to the lowest class. Also
// vote_log_sum = sum_e vote_log[c_e], what vote_entropy_of needs (vote_log: ScoreOutputs').
// `counts` has K zeros on entry and is left zeroed: O(E) whatever K.
ENSEL_HD void mode_of(const int32_t* argmax, int64_t stride, int32_t E, int32_t* counts, const int64_t* vote_log,
                      int32_t& mode, int32_t& votes, int64_t& vote_log_sum) {
  for (int32_t e = 0; e < E; ++e) ++counts[argmax[e * stride]];
  int32_t best = argmax[0], best_votes = counts[best];
  int64_t log_sum = vote_log[best_votes];
  for (int32_t e = 1; e < E; ++e) {
    const int32_t c = argmax[e * stride], v = counts[c];
    log_sum += vote_log[v];
    if (v > best_votes || (v == best_votes && c < best)) {
      best = c;
      best_votes = v;
    }
  }
  for (int32_t e = 0; e < E; ++e) counts[argmax[e * stride]] = 0;
  mode = best;
  votes = best_votes;
  vote_log_sum = log_sum;
}

// What the scores need from pbar: -H(pbar) and its two largest entries.
struct PbarSummary {
  float neg_entropy;  // sum_k pbar_k log pbar_k
  float top1, top2;
};

// The summary of pbar = pbar_sum / E, for a contiguous row of K sums.
ENSEL_HD PbarSummary summarize_pbar(const float* pbar_sum, int64_t K, float inv_e) {
  double neg_h = 0.0;  // in blocks, as in process_row
  float top1 = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
    const int64_t k1 = K - k0 < kSumBlock ? K : k0 + kSumBlock;
    float block = 0.0f;
    ENSEL_SIMD(reduction(+ : block) reduction(max : top1))
    for (int64_t k = k0; k < k1; ++k) {
      const float p = pbar_sum[k] * inv_e;
      block += xlogx(p);
      top1 = p > top1 ? p : top1;
    }
    neg_h += block;
  }
  int64_t i1 = 0;
  while (pbar_sum[i1] * inv_e != top1) ++i1;
  float top2 = 0.0f;
  ENSEL_SIMD(reduction(max : top2))
  for (int64_t k = 0; k < K; ++k) {
    const float p = k == i1 ? 0.0f : pbar_sum[k] * inv_e;
    top2 = p > top2 ? p : top2;
  }
  return PbarSummary{static_cast<float>(neg_h), top1, top2};
}

// The contract's scores of sample n (column n of `out`) from its sums over E members.
// `vote_log_sum`: sum_e vote_log[c_e] (mode_of's; vote_entropy_of).
ENSEL_HD void write_scores(ScoreOutputs out, int64_t n, int64_t K, int32_t E, PbarSummary pbar,
                           float entropy_sum, int32_t mode, int32_t votes, int64_t vote_log_sum,
                           const LabelState* label_state) {
  const float inv_e = 1.0f / static_cast<float>(E);
  const float entropy = -pbar.neg_entropy > 0.0f ? -pbar.neg_entropy : 0.0f;
  const float mean_entropy = entropy_sum * inv_e;
  const float mi = entropy - mean_entropy;
  float* f = out.floats + n;
  const int64_t s = out.stride;
  f[kEntropy * s] = entropy;
  f[kMeanEntropy * s] = mean_entropy;
  f[kMutualInfo * s] = mi > 0.0f ? mi : 0.0f;
  // (E - v) / E is one correctly rounded division: bit-identical in every backend.
  f[kVariationRatio * s] = static_cast<float>(E - votes) / static_cast<float>(E);
  f[kVoteEntropy * s] = vote_entropy_of(vote_log_sum, E, out.vote_log);
  f[kMargin * s] = K > 1 ? pbar.top1 - pbar.top2 : 1.0f;  // K = 1: the contract's value
  f[kLeastConfidence * s] = 1.0f - pbar.top1;
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

// Turns one sample's sums over its E members into the contract's scores (column n of `out`).
ENSEL_HD void finalize_sample(const float* pbar_sum, int64_t K, int32_t E, float entropy_sum,
                              int32_t mode, int32_t votes, int64_t vote_log_sum, const LabelState* label_state,
                              ScoreOutputs out, int64_t n) {
  const PbarSummary pbar = summarize_pbar(pbar_sum, K, 1.0f / static_cast<float>(E));
  write_scores(out, n, K, E, pbar, entropy_sum, mode, votes, vote_log_sum, label_state);
}

}  // namespace ensel
