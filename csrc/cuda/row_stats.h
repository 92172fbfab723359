// Per-row statistics that the cooperative GPU paths combine across threads: the online softmax
// (running max, s and t relative to it, first argmax) and the row's validity. Plain
// __host__ __device__ code, so that the host can check the merge algebra against process_row
// (ensel._C._row_stats_by_parts, tests/test_cuda.py) without a GPU.
//
// For a set S of a row's entries with maximum m_S:
//   s_S = sum_{k in S} exp(l_k - m_S),   t_S = sum_{k in S} exp(l_k - m_S) (l_k - m_S),
// and for the union with a larger maximum m (d = m_S - m <= 0):
//   s = exp(d) s_S,   t = exp(d) (t_S + d s_S),
// which is how one entry joins a set (push) and how two sets join (merge). As in process_row,
// l - m is floored at -104 (shifted_logit) so that -inf entries and empty sets contribute exactly 0
// and never produce 0 * inf. H(p) = log s - t / s once every entry has joined.
#pragma once

#include "ensel/row.h"

namespace ensel {

// exp(d) for d in [-104, 0] (after shifted_logit). On the device the hardware exp2 (MUFU.EX2, a
// few instructions and about 2 ulp) instead of exp_approx's degree-7 polynomial: for bfloat16 input
// the polynomial alone would take about as many FP32 instructions per logit as H100 issues per
// logit read at full memory speed (about 18). The scores stay within the contract's tolerance
// (relative error of a probability about 1e-6); every comparison (max, argmax, validity) is exact.
ENSEL_HD float exp_of_shifted(float d) {
#if defined(__CUDA_ARCH__)
  return exp2f(d * 1.44269504088896341f);
#else
  return exp_approx(d);
#endif
}

// Validity of a set of entries: the first NaN or +inf (by class index) and whether any entry is
// above -inf. The key 2k + (entry is +inf) orders offenders by index; check_row's status follows.
struct RowCheck {
  static constexpr uint32_t kNone = 0xffffffffu;
  uint32_t first_bad;  // min over offenders k of 2k + (+inf ? 1 : 0), or kNone
  int32_t any_finite;  // some entry > -inf

  ENSEL_HD static RowCheck empty() { return RowCheck{kNone, 0}; }

  template <typename C>
  ENSEL_HD void push(C x, int32_t k) {
    const C inf = static_cast<C>(kInf);
    if (!(x < inf)) {  // NaN or +inf
      const uint32_t key = 2u * static_cast<uint32_t>(k) + (x == x ? 1u : 0u);
      first_bad = key < first_bad ? key : first_bad;
    }
    any_finite |= x > -inf;
  }
  ENSEL_HD void merge(const RowCheck& o) {
    first_bad = o.first_bad < first_bad ? o.first_bad : first_bad;
    any_finite |= o.any_finite;
  }
  // check_row's answer: NaN or +inf, whichever comes first in the row, then all -inf.
  ENSEL_HD Status status() const {
    if (first_bad != kNone) return (first_bad & 1u) ? kPosInf : kNaN;
    return any_finite ? kOk : kAllNegInf;
  }
};

// The online softmax of a set of entries, in the compute type C of the input (float, or double for
// float64 input: max and argmax compare in the input's precision, as check_row does).
template <typename C>
struct OnlineRow {
  C m;        // max (-inf for an empty set)
  float s;    // sum exp(l - m)
  float t;    // sum exp(l - m) (l - m)
  int32_t a;  // lowest index of the max; `none` (K) for an empty set

  ENSEL_HD static OnlineRow empty(int32_t none) { return OnlineRow{static_cast<C>(-kInf), 0.0f, 0.0f, none}; }

  // Entries must be pushed in increasing k (so the first maximum keeps its index). NaN joins no
  // branch (RowCheck reports it); -inf contributes 0 and is skipped, so that -inf - (-inf) never
  // occurs; +inf becomes the max and makes the rest garbage, which the caller discards.
  ENSEL_HD void push(C x, int32_t k) {
    if (x > m) {
      const float d = shifted_logit(static_cast<float>(m - x));  // -inf (empty set) -> -104
      const float scale = exp_of_shifted(d);
      t = scale * (t + d * s);
      s = scale * s + 1.0f;
      m = x;
      a = k;
    } else if (x > static_cast<C>(-kInf)) {
      const float d = shifted_logit(static_cast<float>(x - m));
      const float ex = exp_of_shifted(d);
      s += ex;
      t += ex * d;
    }
  }

  ENSEL_HD void merge(const OnlineRow& o) {
    const C mm = o.m > m ? o.m : m;
    if (mm == static_cast<C>(-kInf)) {  // both empty (or all -inf): nothing to rescale
      a = o.a < a ? o.a : a;
      return;
    }
    const float d1 = shifted_logit(static_cast<float>(m - mm));
    const float d2 = shifted_logit(static_cast<float>(o.m - mm));
    const float e1 = exp_of_shifted(d1), e2 = exp_of_shifted(d2);
    const float ns = e1 * s + e2 * o.s;
    const float nt = e1 * (t + d1 * s) + e2 * (o.t + d2 * o.s);
    const int32_t a1 = m == mm ? a : 0x7fffffff, a2 = o.m == mm ? o.a : 0x7fffffff;
    s = ns;
    t = nt;
    a = a1 < a2 ? a1 : a2;
    m = mm;
  }
};

}  // namespace ensel
