// C++ CPU backend. Threads own disjoint ranges of samples; within a range, samples are taken in
// tiles so that for each member the tile's rows are read as one contiguous stretch of memory
// (K = 10 would otherwise touch one cache line per member per sample).
#include "score_cpu.h"

#include <algorithm>
#include <atomic>
#include <system_error>
#include <type_traits>
#include <thread>
#include <vector>

#include "isa.h"

namespace ensel {
namespace {

// How many contiguous slices parallel_for cuts [0, n) into. Below `serial_below` items of work
// a thread's start-up (tens of microseconds) costs more than it saves.
int64_t slice_count(int64_t n, int num_threads, int64_t work_per_item) {
  const int64_t serial_below = 1 << 15;
  if (n * work_per_item < serial_below) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(num_threads, n));
}

// Runs body(slice, begin, end) on slice_count(...) threads, the calling thread included. A thread
// the system cannot start (no memory left for its stack: EAGAIN) leaves its slice to the calling
// thread: slower, never an error.
template <typename Body>
void parallel_for(int64_t n, int num_threads, int64_t work_per_item, Body body) {
  const int64_t slices = slice_count(n, num_threads, work_per_item);
  std::vector<std::thread> pool;
  pool.reserve(slices - 1);
  int64_t started = 1;
  try {
    for (; started < slices; ++started)
      pool.emplace_back(body, started, n * started / slices, n * (started + 1) / slices);
  } catch (const std::system_error&) {
  }
  body(int64_t{0}, int64_t{0}, n / slices);
  for (int64_t t = started; t < slices; ++t) body(t, n * t / slices, n * (t + 1) / slices);
  for (auto& th : pool) th.join();
}

bool earlier(const Failure& a, const Failure& b) {
  if (a.status == kOk) return false;
  if (b.status == kOk) return true;
  return a.member != b.member ? a.member < b.member : a.sample < b.sample;
}

template <typename T>
struct Rows {
  const T* base;
  int64_t member_stride, sample_stride;
  const T* row(int64_t e, int64_t n) const { return base + e * member_stride + n * sample_stride; }
};

// Asks for rows [n0, n0 + nb) of member e ahead of their use. The fused passes read a tile's
// rows member after member, each member a short stretch of memory far from the last (K = 10:
// 1.3 KB), which the hardware prefetchers pick up too late; fetching the next member's rows
// while this one computes took 15-20% off at E = 64 (K = 10 and 100, measured).
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(Rows<T> rows, int64_t e, int64_t n0, int64_t nb, int64_t K) {
  const T* first = rows.row(e, n0);
  const bool contiguous = rows.row(e, n0 + nb - 1) == first + (nb - 1) * K;
  for (int64_t b = 0; b < (contiguous ? 1 : nb); ++b) {
    const char* p = reinterpret_cast<const char*>(rows.row(e, n0 + b));
    const char* end = reinterpret_cast<const char*>(rows.row(e, n0 + b) + (contiguous ? nb * K : K));
    for (; p < end; p += 64) __builtin_prefetch(p);
  }
}

// What the row math reads a row of T as: float, or double for double rows (compared in double).
template <typename T>
using staged_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// A row as the row math reads it: float and double rows in place; half and bfloat16 rows
// converted into `buffer` (K floats) first, halves with F16C where the level has it. The
// conversion is exact, so every level computes on the same floats.
template <CpuIsa L, typename T>
__attribute__((always_inline)) inline const staged_t<T>* stage_row(const T* row, int64_t K, float* buffer) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    return row;
  } else {
#if ENSEL_CPU_X86
    if constexpr (std::is_same<T, Half>::value && L == kIsaAvx2) {
      half_row_to_float_avx2(row, buffer, K);
      return buffer;
    } else if constexpr (std::is_same<T, Half>::value && L == kIsaAvx512) {
      half_row_to_float_avx512(row, buffer, K);
      return buffer;
    }
#endif
    ENSEL_SIMD()
    for (int64_t k = 0; k < K; ++k) buffer[k] = to_float(row[k]);
    return buffer;
  }
}

// Samples per tile: about 16 KB of float accumulators, at most 256 samples.
int64_t tile_for(int64_t K) { return std::max<int64_t>(1, std::min<int64_t>(256, 4096 / K)); }

// mode_of for samples b < nb at once, vectorized over samples, from argmax[e * member_stride + b]:
// the votes of member e's class counted by comparing it with every member's (E^2 compares per
// sample, against mode_of's histogram of E dependent increments). The same mode (ties to the
// lowest class), votes and integer vote_log_sum. `scratch`: nb ints.
__attribute__((always_inline)) inline void lane_modes(const int32_t* argmax, int64_t member_stride, int64_t E,
                                                      int64_t nb, const int64_t* vote_log, int32_t* __restrict best,
                                                      int32_t* __restrict best_votes, int64_t* __restrict log_sum,
                                                      int32_t* __restrict scratch) {
  const int32_t k_none = 0x7fffffff;
  for (int64_t b = 0; b < nb; ++b) {
    best[b] = k_none;
    best_votes[b] = 0;
    log_sum[b] = 0;
  }
  for (int64_t e = 0; e < E; ++e) {
    const int32_t* __restrict ae = argmax + e * member_stride;
    int32_t* __restrict v = scratch;
    for (int64_t b = 0; b < nb; ++b) v[b] = 0;
    for (int64_t e2 = 0; e2 < E; ++e2) {
      const int32_t* __restrict a2 = argmax + e2 * member_stride;
      ENSEL_SIMD()
      for (int64_t b = 0; b < nb; ++b) v[b] += a2[b] == ae[b];
    }
    ENSEL_SIMD()
    for (int64_t b = 0; b < nb; ++b) {
      log_sum[b] += vote_log[v[b]];
      const bool better = v[b] > best_votes[b] || (v[b] == best_votes[b] && ae[b] < best[b]);
      best_votes[b] = better ? v[b] : best_votes[b];
      best[b] = better ? ae[b] : best[b];
    }
  }
}

// Up to this many members lane_modes beats mode_of (measured at K = 10: 18% of the whole fused
// pass at E = 8, even at E = 32).
constexpr int64_t kLaneModeUpToE = 16;

// What a fused tile keeps per sample besides pbar: the member argmaxes, the entropy sum, the
// label state, and the first invalid member. Shared by the per-row and the lane paths.
struct TileSamples {
  int64_t T, E;  // samples per tile, members
  std::vector<int32_t> argmax, counts;  // [E][T] (member-major: lane loops read it at unit stride); [K] zeros
  std::vector<float> entropy_sum;
  std::vector<LabelState> label_state;
  std::vector<Status> status;
  std::vector<int64_t> bad_member;

  std::vector<int32_t> mode, votes;  // [tile]: finish's mode_of results
  std::vector<int64_t> vote_log_sum;
  std::vector<int32_t> counts_of_lanes;  // [tile]: lane_modes' votes of one member's class

  TileSamples(int64_t tile, int64_t members, int64_t K)
      : T(tile), E(members), argmax(tile * members), counts(K, 0), entropy_sum(tile), label_state(tile),
        status(tile), bad_member(tile), mode(tile), votes(tile), vote_log_sum(tile),
        counts_of_lanes(tile) {}

  void reset() {
    std::fill(entropy_sum.begin(), entropy_sum.end(), 0.0f);
    std::fill(label_state.begin(), label_state.end(), empty_label_state());
    std::fill(status.begin(), status.end(), kOk);
  }
  bool valid(int64_t b) const { return status[b] == kOk; }

  // Member e of sample b: its row's status, then (if valid) its argmax, entropy and label terms.
  void observe(int64_t b, int64_t e, Status st, int32_t a, float entropy, int64_t label, float log_p_label) {
    if (st != kOk) {
      status[b] = st;
      bad_member[b] = e;
      return;
    }
    record(b, e, a, entropy);
    if (label >= 0) observe_label(label_state[b], a, label, log_p_label);
  }
  // A valid member e of sample b, without labels.
  __attribute__((always_inline)) void record(int64_t b, int64_t e, int32_t a, float entropy) {
    argmax[e * T + b] = a;
    entropy_sum[b] += entropy;
  }

  // Writes the scores of samples t0 + b, b < nb, or folds their failures into `first`.
  // summary(b) is sample b's PbarSummary.
  template <typename Summary>
  void finish(int64_t t0, int64_t nb, int64_t K, bool has_labels, ScoreOutputs out, Summary summary,
              Failure& first) {
    bool all_valid = true;
    for (int64_t b = 0; b < nb; ++b) {
      if (status[b] != kOk) {
        const Failure f{status[b], bad_member[b], t0 + b};
        if (earlier(f, first)) first = f;
        all_valid = false;
      }
    }
    if (all_valid && E <= kLaneModeUpToE) {
      lane_modes(argmax.data(), T, E, nb, out.vote_log, mode.data(), votes.data(), vote_log_sum.data(),
                 counts_of_lanes.data());
    } else {
      for (int64_t b = 0; b < nb; ++b)
        if (status[b] == kOk)
          mode_of(argmax.data() + b, T, static_cast<int32_t>(E), counts.data(), out.vote_log, mode[b], votes[b],
                  vote_log_sum[b]);
    }
    const int32_t members = static_cast<int32_t>(E);
    if (all_valid && !has_labels) {  // the common case, vectorized over samples: one store per field
      ENSEL_SIMD()
      for (int64_t b = 0; b < nb; ++b)
        write_scores(out, t0 + b, K, members, summary(b), entropy_sum[b], mode[b], votes[b], vote_log_sum[b],
                     nullptr);
      return;
    }
    for (int64_t b = 0; b < nb; ++b)
      if (status[b] == kOk)
        write_scores(out, t0 + b, K, members, summary(b), entropy_sum[b], mode[b], votes[b], vote_log_sum[b],
                     has_labels ? &label_state[b] : nullptr);
  }
};

template <CpuIsa L, typename In, typename T>
__attribute__((always_inline)) inline Failure fused_range(Rows<T> rows, int64_t E, int64_t K,
                                                          const int64_t* labels, ScoreOutputs out,
                                                          int64_t begin, int64_t end) {
  const int64_t tile = tile_for(K);
  std::vector<float> pbar(tile * K), scratch(K), staged(K);
  TileSamples samples(tile, E, K);
  const float inv_e = 1.0f / static_cast<float>(E);
  Failure first;

  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t nb = std::min(tile, end - t0);
    std::fill(pbar.begin(), pbar.begin() + nb * K, 0.0f);
    samples.reset();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t b = 0; b < nb; ++b) {
        if (!samples.valid(b)) continue;
        const int64_t n = t0 + b;
        const int64_t y = labels != nullptr ? labels[n] : -1;
        RowResult r{};
        const auto* row = stage_row<L>(rows.row(e, n), K, staged.data());
        const Status st = process_row<In>(row, K, y, scratch.data(), pbar.data() + b * K, r);
        samples.observe(b, e, st, r.argmax, r.entropy, y, r.log_p_label);
      }
    }
    samples.finish(t0, nb, K, labels != nullptr, out,
                   [&](int64_t b) { return summarize_pbar(pbar.data() + b * K, K, inv_e); }, first);
  }
  return first;
}

// Small K: rows are too short to vectorize along classes (K = 10 would leave 6 of 16 AVX-512
// lanes idle, and every row would pay for horizontal reductions). Instead each SIMD lane owns a
// sample: a tile of kLanes rows is transposed to [K][kLanes] floats, and the row math runs
// lane-parallel with k as the outer loop. (float64 input takes the per-row path, which compares
// in float64.)
constexpr int64_t kLanes = 32;
constexpr int64_t kLanesUpToK = 128;

// Below this K the lane path's per-row costs (the streaming check, per-lane bookkeeping) are
// worth lane-parallel versions; from it on, loops along the row are as fast (measured, avx512).
constexpr int64_t kShortRowsBelowK = 48;

template <typename T>
constexpr bool use_lanes(int64_t K) {
  return !std::is_same<T, double>::value && K <= kLanesUpToK;
}

// One member's rows for up to kLanes samples: process_row's quantities, one lane per row.
struct LaneTile {
  static constexpr int64_t B = kLanes;
  int64_t K;
  std::vector<float> x;  // [K][B]: the values (In's kind), then their weights w = exp(d)
  float m[B], ref[B], s[B], t[B], inv_s[B], log_s[B];  // ref: In::reference(m)
  int32_t bad[B], a[B];

  std::vector<float> staged;  // [B][K]: the tile's rows in float (stage_row), for 16-bit input

  explicit LaneTile(int64_t classes) : K(classes), x(classes * B, 0.0f), staged(B * classes) {}

  // Rows row_of(b) for b < nb; lanes >= nb compute on stale finite values and are never read.
  // load = gather (rows -> [K][B] floats) + scan (max, NaN/+inf) + exponentiate; the streaming
  // check needs only the first two.
  template <CpuIsa L, typename In, typename T, typename RowOf>
  __attribute__((always_inline)) void load(RowOf row_of, int64_t nb) {
    gather<L, T>(row_of, nb);
    scan<In>();
    exponentiate<In>();
  }

  template <CpuIsa L, typename T, typename RowOf>
  __attribute__((always_inline)) void gather(RowOf row_of, int64_t nb) {
    float* xs = x.data();
    if constexpr (std::is_same<T, double>::value) {  // (never called: double rows take the per-row path)
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t k = 0; k < K; ++k) xs[k * B + b] = to_float(row_of(b)[k]);
    } else {
      const float* rows[B];
      const T* first = row_of(0);
      if (!std::is_same<T, float>::value && row_of(nb - 1) == first + (nb - 1) * K) {
        // 16-bit rows stored back to back: converted as one block (K = 10 rows are too short
        // to vectorize one by one).
        const float* block = stage_row<L>(first, nb * K, staged.data());
        for (int64_t b = 0; b < nb; ++b) rows[b] = block + b * K;
      } else {
        for (int64_t b = 0; b < nb; ++b) rows[b] = stage_row<L>(row_of(b), K, staged.data() + b * K);
      }
      rows_to_lanes(rows, nb, K, xs, B);
    }
  }

  // The loops work on local arrays and a restrict pointer: the compiler must see that the lane
  // accumulators do not alias the tile, or it stops vectorizing (2.4x slower at K = 100).
  template <typename In>
  __attribute__((always_inline)) void scan() {
    const float* __restrict xs = x.data();
    float lm[B];
    int32_t lbad[B];
    for (int64_t b = 0; b < B; ++b) {
      lm[b] = -kInf;
      lbad[b] = 0;
    }
    for (int64_t k = 0; k < K; ++k) {
      const float* xk = xs + k * B;
      ENSEL_SIMD()
      for (int64_t b = 0; b < B; ++b) {
        lm[b] = xk[b] > lm[b] ? xk[b] : lm[b];
        lbad[b] |= In::invalid(xk[b]);
      }
    }
    std::copy(lm, lm + B, m);
    std::copy(lbad, lbad + B, bad);
  }

  template <typename In>
  __attribute__((always_inline)) void exponentiate() {
    const int32_t k_classes = static_cast<int32_t>(K);
    float* __restrict xs = x.data();
    float lm[B], lref[B], ls[B], lt[B];
    int32_t la[B];
    for (int64_t b = 0; b < B; ++b) {
      lm[b] = m[b];
      lref[b] = ref[b] = In::reference(m[b]);
      ls[b] = lt[b] = 0.0f;
      la[b] = k_classes;
    }
    for (int32_t k = 0; k < k_classes; ++k) {
      float* xk = xs + k * B;
      ENSEL_SIMD()
      for (int64_t b = 0; b < B; ++b) {
        la[b] = xk[b] == lm[b] && la[b] == k_classes ? k : la[b];  // first maximum
        float d, ex;
        In::terms(xk[b], lref[b], d, ex);
        xk[b] = ex;
        ls[b] += ex;
        lt[b] += ex * d;
      }
    }
    ENSEL_SIMD()
    for (int64_t b = 0; b < B; ++b) {
      s[b] = ls[b];
      t[b] = lt[b];
      a[b] = la[b];
      inv_s[b] = 1.0f / ls[b];
      log_s[b] = log_approx(ls[b]);  // s >= 1 (the maximum contributes w >= 1): a normal float
    }
  }

  // Whether a lane b < nb holds an invalid row (status() names what and where); after scan.
  template <typename In>
  bool any_invalid(int64_t nb) const {
    int32_t flagged = 0;
    for (int64_t b = 0; b < nb; ++b) flagged |= bad[b] | In::massless(m[b]);
    return flagged != 0;
  }

  template <typename In, typename T>
  Status status(int64_t b, const T* row) const {
    compute_t<T> unused;
    return bad[b] ? check_row<In>(row, K, unused) : (In::massless(m[b]) ? kAllNegInf : kOk);
  }
  float entropy(int64_t b) const { return member_entropy(log_s[b], t[b], inv_s[b]); }
  template <typename In, typename T>
  float log_p(int64_t b, const T* row, int64_t label) const {
    return In::label_shift(to_float(row[label]), ref[b]) - log_s[b];
  }
};

// summarize_pbar for kLanes samples at once, from pbar sums in [K][kLanes] layout: -H(pbar) and
// its two largest entries, lane-parallel (ties: top2 = top1, margin 0). The fused lane path and
// the finalize of small K share it.
struct LaneSummary {
  static constexpr int64_t B = kLanes;
  float neg_h[B], top1[B], top2[B];

  __attribute__((always_inline)) void compute(const float* __restrict pbar, int64_t K, float inv_e) {
    for (int64_t b = 0; b < B; ++b) neg_h[b] = top1[b] = top2[b] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float* pk = pbar + k * B;
      ENSEL_SIMD()
      for (int64_t b = 0; b < B; ++b) {
        const float p = pk[b] * inv_e;
        neg_h[b] += xlogx(p);
        // max/min, not nested selects, so that the loop vectorizes (p is never NaN here).
        const float low = p < top1[b] ? p : top1[b];
        top2[b] = low > top2[b] ? low : top2[b];
        top1[b] = p > top1[b] ? p : top1[b];
      }
    }
  }
  PbarSummary of(int64_t b) const { return PbarSummary{neg_h[b], top1[b], top2[b]}; }
};

template <CpuIsa L, typename In, typename T>
__attribute__((always_inline)) inline Failure fused_range_lanes(Rows<T> rows, int64_t E, int64_t K,
                                                                const int64_t* labels, ScoreOutputs out,
                                                                int64_t begin, int64_t end) {
  constexpr int64_t B = kLanes;
  LaneTile tile(K);
  std::vector<float> pbar(K * B);  // [K][B]
  TileSamples samples(B, E, K);
  LaneSummary summary;
  const float inv_e = 1.0f / static_cast<float>(E);
  Failure first;

  for (int64_t t0 = begin; t0 < end; t0 += B) {
    const int64_t nb = std::min(B, end - t0);
    std::fill(pbar.begin(), pbar.end(), 0.0f);
    samples.reset();
    for (int64_t e = 0; e < E; ++e) {
      if (e + 1 < E) prefetch_rows(rows, e + 1, t0, nb, K);
      tile.load<L, In, T>([&](int64_t b) { return rows.row(e, t0 + b); }, nb);
      float inv_s[B];
      std::copy(tile.inv_s, tile.inv_s + B, inv_s);
      const float* __restrict xs = tile.x.data();
      float* __restrict ps = pbar.data();
      for (int64_t k = 0; k < K; ++k) {
        ENSEL_SIMD()
        for (int64_t b = 0; b < B; ++b) ps[k * B + b] += xs[k * B + b] * inv_s[b];
      }
      // Short rows, the common case (every lane valid, no labels): the per-lane bookkeeping
      // without its branches (18% at K = 10, E = 64; at K = 100 it measured 10% slower).
      int32_t flagged = labels != nullptr || K >= kShortRowsBelowK || tile.any_invalid<In>(nb);
      for (int64_t b = 0; b < nb; ++b) flagged |= samples.status[b] != kOk;
      if (!flagged) {
        for (int64_t b = 0; b < nb; ++b) samples.record(b, e, tile.a[b], tile.entropy(b));
        continue;
      }
      for (int64_t b = 0; b < nb; ++b) {
        if (!samples.valid(b)) continue;
        const T* row = rows.row(e, t0 + b);
        const int64_t y = labels != nullptr ? labels[t0 + b] : -1;
        samples.observe(b, e, tile.status<In>(b, row), tile.a[b], tile.entropy(b), y,
                        y >= 0 ? tile.log_p<In>(b, row, y) : 0.0f);
      }
    }
    summary.compute(pbar.data(), K, inv_e);
    samples.finish(t0, nb, K, labels != nullptr, out,
                   [&](int64_t b) { return summary.of(b); }, first);
  }
  return first;
}

// The streaming update of rows that check_range has validated, lane-parallel.
template <CpuIsa L, typename In, typename T>
__attribute__((always_inline)) inline void update_range_lanes(const StreamState& s, Rows<T> rows, int64_t K,
                                                              int64_t start, int64_t begin, int64_t end) {
  constexpr int64_t B = kLanes;
  LaneTile tile(K);
  const int64_t N = s.num_samples;
  for (int64_t t0 = begin; t0 < end; t0 += B) {
    const int64_t nb = std::min(B, end - t0);
    tile.load<L, In, T>([&](int64_t b) { return rows.row(0, t0 + b); }, nb);
    // The tile's pbar_sum rows are one contiguous [nb][K] block.
    lanes_to_rows_add(tile.x.data(), tile.inv_s, nb, K, B, s.pbar_sum + (start + t0) * K);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t n = start + t0 + b;
      s.entropy_sum[n] += tile.entropy(b);
      s.argmax_history[static_cast<int64_t>(s.members[n]) * N + n] = tile.a[b];
      s.members[n] += 1;
      if (s.labels != nullptr) {
        const int64_t y = s.labels[n];
        LabelState st = s.load_label_state(n);
        observe_label(st, tile.a[b], y, tile.log_p<In>(b, rows.row(0, t0 + b), y));
        s.store_label_state(n, st);
      }
    }
  }
}

template <CpuIsa L, typename In, typename T>
__attribute__((always_inline)) inline Failure check_range(const StreamState& s, Rows<T> rows, int64_t K,
                                                          int64_t start, int64_t begin, int64_t end) {
  Failure first;
  std::vector<float> staged(K);
  for (int64_t i = begin; i < end; ++i) {
    staged_t<T> m;
    const Status st = check_row<In>(stage_row<L>(rows.row(0, i), K, staged.data()), K, m);
    const Failure f{st, s.members[start + i], start + i};
    if (earlier(f, first)) first = f;
  }
  return first;
}

// check_range for short rows, lane-parallel (LaneTile's gather and scan); the same statuses.
template <typename T>
constexpr bool use_lane_check(int64_t K) {
  return use_lanes<T>(K) && K < kShortRowsBelowK;
}

template <CpuIsa L, typename In, typename T>
__attribute__((always_inline)) inline Failure check_range_lanes(const StreamState& s, Rows<T> rows, int64_t K,
                                                                int64_t start, int64_t begin, int64_t end) {
  constexpr int64_t B = kLanes;
  LaneTile tile(K);
  Failure first;
  for (int64_t t0 = begin; t0 < end; t0 += B) {
    const int64_t nb = std::min(B, end - t0);
    tile.gather<L, T>([&](int64_t b) { return rows.row(0, t0 + b); }, nb);
    tile.scan<In>();
    if (!tile.any_invalid<In>(nb)) continue;
    for (int64_t b = 0; b < nb; ++b) {
      const Failure f{tile.status<In>(b, rows.row(0, t0 + b)), s.members[start + t0 + b], start + t0 + b};
      if (earlier(f, first)) first = f;
    }
  }
  return first;
}

template <CpuIsa L, typename In, typename T>
__attribute__((always_inline)) inline void update_range(const StreamState& s, Rows<T> rows, int64_t K,
                                                        int64_t start, int64_t begin, int64_t end) {
  std::vector<float> scratch(K), staged(K);
  const int64_t N = s.num_samples;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = start + i;
    const auto* row = stage_row<L>(rows.row(0, i), K, staged.data());
    RowResult r{};
    const int64_t y = s.labels != nullptr ? s.labels[n] : -1;
    process_row<In>(row, K, y, scratch.data(), s.pbar_sum + n * K, r);  // validated by check_range
    s.entropy_sum[n] += r.entropy;
    s.argmax_history[static_cast<int64_t>(s.members[n]) * N + n] = r.argmax;
    s.members[n] += 1;
    if (y >= 0) {
      LabelState st = s.load_label_state(n);
      observe_label(st, r.argmax, y, r.log_p_label);
      s.store_label_state(n, st);
    }
  }
}

// The entry points of one ISA level: per input kind (logits, probabilities) and dtype, the fused
// pass, the streaming check and update; and the finalize. The templates above inline into each, compiled for the level's TARGET.
using FusedFn = Failure (*)(LogitsView, int64_t, int64_t, const int64_t*, ScoreOutputs, int64_t, int64_t);
using CheckFn = Failure (*)(const StreamState&, LogitsView, int64_t, int64_t, int64_t, int64_t);
using UpdateFn = void (*)(const StreamState&, LogitsView, int64_t, int64_t, int64_t, int64_t);
using FinalizeFn = void (*)(const StreamState&, int32_t, ScoreOutputs, int64_t, int64_t);

struct Kernels {
  FusedFn fused[2][4];  // [probs][DType code]
  CheckFn check[2][4];
  UpdateFn update[2][4];
  FinalizeFn finalize;
};

template <typename T>
Rows<T> rows_of(LogitsView v) {
  return Rows<T>{static_cast<const T*>(v.data), v.member_stride, v.sample_stride};
}

// Small K: pbar summarized kLanes samples at a time (their pbar_sum rows are one contiguous
// block, transposed to [K][kLanes]); a row of 10 classes is too short to vectorize along.
__attribute__((always_inline)) inline void finalize_range(const StreamState& s, int32_t E, ScoreOutputs out,
                                                          int64_t begin, int64_t end) {
  constexpr int64_t B = kLanes;
  const int64_t K = s.num_classes, N = s.num_samples;
  const float inv_e = 1.0f / static_cast<float>(E);
  const bool lanes = K <= kLanesUpToK;
  std::vector<int32_t> counts(K, 0);
  std::vector<float> pbar_lanes(lanes ? K * B : 0);
  LaneSummary summary;
  int32_t modes[B], votes_of[B], scratch[B];
  int64_t log_sums[B];
  for (int64_t t0 = begin; t0 < end; t0 += B) {
    const int64_t nb = std::min(B, end - t0);
    if (lanes) {
      const float* rows[B];
      for (int64_t b = 0; b < nb; ++b) rows[b] = s.pbar_sum + (t0 + b) * K;
      rows_to_lanes(rows, nb, K, pbar_lanes.data(), B);
      summary.compute(pbar_lanes.data(), K, inv_e);  // lanes >= nb: stale values, never read
    }
    const bool lane_mode = E <= kLaneModeUpToE;
    if (lane_mode) lane_modes(s.argmax_history + t0, N, E, nb, out.vote_log, modes, votes_of, log_sums, scratch);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t n = t0 + b;
      int32_t mode = modes[b], votes = votes_of[b];
      int64_t vote_log_sum = log_sums[b];
      if (!lane_mode) mode_of(s.argmax_history + n, N, E, counts.data(), out.vote_log, mode, votes, vote_log_sum);
      LabelState st;
      if (s.labels != nullptr) st = s.load_label_state(n);
      const PbarSummary pbar = lanes ? summary.of(b) : summarize_pbar(s.pbar_sum + n * K, K, inv_e);
      write_scores(out, n, K, E, pbar, s.entropy_sum[n], mode, votes, vote_log_sum,
                   s.labels != nullptr ? &st : nullptr);
    }
  }
}

#define ENSEL_CPU_DTYPE_KERNELS(TARGET, L, In, T, SUFFIX)                                                    \
  TARGET Failure fused_##SUFFIX(LogitsView v, int64_t E, int64_t K, const int64_t* labels, ScoreOutputs out, \
                                int64_t begin, int64_t end) {                                                \
    return use_lanes<T>(K) ? fused_range_lanes<L, In, T>(rows_of<T>(v), E, K, labels, out, begin, end)        \
                           : fused_range<L, In, T>(rows_of<T>(v), E, K, labels, out, begin, end);            \
  }                                                                                                          \
  TARGET Failure check_##SUFFIX(const StreamState& s, LogitsView v, int64_t K, int64_t start, int64_t begin,  \
                                int64_t end) {                                                               \
    return use_lane_check<T>(K) ? check_range_lanes<L, In, T>(s, rows_of<T>(v), K, start, begin, end)         \
                                : check_range<L, In, T>(s, rows_of<T>(v), K, start, begin, end);             \
  }                                                                                                          \
  TARGET void update_##SUFFIX(const StreamState& s, LogitsView v, int64_t K, int64_t start, int64_t begin,   \
                              int64_t end) {                                                                 \
    if (use_lanes<T>(K))                                                                                     \
      update_range_lanes<L, In, T>(s, rows_of<T>(v), K, start, begin, end);                                  \
    else                                                                                                     \
      update_range<L, In, T>(s, rows_of<T>(v), K, start, begin, end);                                        \
  }

// One input kind at one level, in the order of the DType codes: float32, float16, bfloat16, float64.
#define ENSEL_CPU_KIND_KERNELS(TARGET, L, In, NAME)            \
  ENSEL_CPU_DTYPE_KERNELS(TARGET, L, In, float, NAME##_f32)    \
  ENSEL_CPU_DTYPE_KERNELS(TARGET, L, In, Half, NAME##_f16)     \
  ENSEL_CPU_DTYPE_KERNELS(TARGET, L, In, BFloat16, NAME##_bf16) \
  ENSEL_CPU_DTYPE_KERNELS(TARGET, L, In, double, NAME##_f64)

#define ENSEL_CPU_BY_DTYPE(FN, NAME) {FN##_##NAME##_f32, FN##_##NAME##_f16, FN##_##NAME##_bf16, FN##_##NAME##_f64}

#define ENSEL_CPU_LEVEL(TARGET, L, NAME)                                                                  \
  ENSEL_CPU_KIND_KERNELS(TARGET, L, LogitInput, NAME##_logits)                                            \
  ENSEL_CPU_KIND_KERNELS(TARGET, L, ProbInput, NAME##_probs)                                              \
  TARGET void finalize_##NAME(const StreamState& s, int32_t E, ScoreOutputs out, int64_t begin, int64_t end) { \
    finalize_range(s, E, out, begin, end);                                                                \
  }                                                                                                       \
  constexpr Kernels kernels_##NAME = {                                                                    \
      {ENSEL_CPU_BY_DTYPE(fused, NAME##_logits), ENSEL_CPU_BY_DTYPE(fused, NAME##_probs)},                \
      {ENSEL_CPU_BY_DTYPE(check, NAME##_logits), ENSEL_CPU_BY_DTYPE(check, NAME##_probs)},                \
      {ENSEL_CPU_BY_DTYPE(update, NAME##_logits), ENSEL_CPU_BY_DTYPE(update, NAME##_probs)},              \
      finalize_##NAME};

static_assert(kFloat32 == 0 && kFloat16 == 1 && kBFloat16 == 2 && kFloat64 == 3, "Kernels' dtype order");

#define ENSEL_TARGET_BASELINE
ENSEL_CPU_LEVEL(ENSEL_TARGET_BASELINE, kIsaBaseline, baseline)
#if ENSEL_CPU_X86
ENSEL_CPU_LEVEL(ENSEL_TARGET_AVX2, kIsaAvx2, avx2)
ENSEL_CPU_LEVEL(ENSEL_TARGET_AVX512, kIsaAvx512, avx512)
#endif

const Kernels* kernels_of(CpuIsa level) {
  switch (level) {
#if ENSEL_CPU_X86
    case kIsaAvx2: return &kernels_avx2;
    case kIsaAvx512: return &kernels_avx512;
#endif
    default: return &kernels_baseline;
  }
}

CpuIsa best_cpu_isa() {
  for (int level = kNumCpuIsas - 1; level > kIsaBaseline; --level)
    if (cpu_isa_supported(static_cast<CpuIsa>(level))) return static_cast<CpuIsa>(level);
  return kIsaBaseline;
}

// The level in use: the best the processor has, chosen once at load; set_cpu_isa lowers it.
std::atomic<int32_t> g_cpu_isa{best_cpu_isa()};

const Kernels& kernels() { return *kernels_of(static_cast<CpuIsa>(g_cpu_isa.load(std::memory_order_relaxed))); }

// Runs a Failure-returning body over slices and returns the first failure of all.
template <typename Body>
Failure parallel_first_failure(int64_t n, int num_threads, int64_t work_per_item, Body body) {
  std::vector<Failure> found(slice_count(n, num_threads, work_per_item));
  parallel_for(n, num_threads, work_per_item,
               [&](int64_t slice, int64_t begin, int64_t end) { found[slice] = body(begin, end); });
  Failure first;
  for (const Failure& f : found)
    if (earlier(f, first)) first = f;
  return first;
}

}  // namespace

Failure fused_cpu(LogitsView logits, bool probs, int64_t E, int64_t N, int64_t K, const int64_t* labels,
                  ScoreOutputs out, int num_threads) {
  const FusedFn fused = kernels().fused[probs][logits.dtype];
  return parallel_first_failure(N, num_threads, E * K, [&](int64_t begin, int64_t end) {
    return fused(logits, E, K, labels, out, begin, end);
  });
}

Failure update_cpu(StreamState state, LogitsView logits, bool probs, int64_t start, int64_t rows, int num_threads) {
  const int64_t K = state.num_classes;
  const Kernels& level = kernels();  // one level for both passes, whatever set_cpu_isa does meanwhile
  const CheckFn check = level.check[probs][logits.dtype];
  const UpdateFn update = level.update[probs][logits.dtype];
  const Failure first = parallel_first_failure(rows, num_threads, K, [&](int64_t begin, int64_t end) {
    return check(state, logits, K, start, begin, end);
  });
  if (first.status != kOk) return first;
  parallel_for(rows, num_threads, K, [&](int64_t, int64_t begin, int64_t end) {
    update(state, logits, K, start, begin, end);
  });
  return first;
}

void finalize_cpu(StreamState state, int32_t E, ScoreOutputs out, int num_threads) {
  parallel_for(state.num_samples, num_threads, state.num_classes + E,
               [&](int64_t, int64_t begin, int64_t end) { kernels().finalize(state, E, out, begin, end); });
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int level = 0; level < kNumCpuIsas; ++level)
    if (cpu_isa_supported(static_cast<CpuIsa>(level))) names.emplace_back(cpu_isa_name(static_cast<CpuIsa>(level)));
  return names;
}

std::string cpu_isa() { return cpu_isa_name(static_cast<CpuIsa>(g_cpu_isa.load())); }

bool set_cpu_isa(const std::string& name) {
  for (int level = 0; level < kNumCpuIsas; ++level) {
    const CpuIsa l = static_cast<CpuIsa>(level);
    if (name == cpu_isa_name(l) && cpu_isa_supported(l)) {
      g_cpu_isa.store(level);
      return true;
    }
  }
  return false;
}

}  // namespace ensel
