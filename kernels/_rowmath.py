"""Per-row and per-sample math shared by the Triton kernels: the Triton twin of
csrc/include/ensel/row.h (docs/contract.md sections 1 and 8).

For one member's row l in R^K:  m = max_k l_k,  a = the first k with l_k = m,
  s = sum_k exp(l_k - m),  t = sum_k exp(l_k - m) (l_k - m),  H(p) = log s - t / s,
  p_k = exp(l_k - m) / s,  log p_y = (l_y - m) - log s.
Comparisons (max, argmax, validity) run in the input's precision (float64 stays float64), every
quantity after l - m in float32.

Validity costs nothing in the hot loop: a valid row has s >= 1 (its maximum contributes exp(0) = 1),
while a NaN anywhere, a +inf (inf - inf = NaN) or a row of all -inf (-inf - -inf = NaN) makes s NaN.
The kernels only flag such rows; `row_status` then names the offence on the rare failing path.
"""

import triton
import triton.language as tl

# l - m is floored here so that exp flushes to 0 and 0 * (l - m) stays 0 for l = -inf (row.h).
FLOOR = tl.constexpr(-104.0)
# p log p is taken as 0 below FLT_MIN (row.h xlogx).
TINY = tl.constexpr(1.17549435e-38)

# Output rows: ensel/_fields.py FLOAT_FIELDS and INT_FIELDS order.
ENTROPY = tl.constexpr(0)
MEAN_ENTROPY = tl.constexpr(1)
MUTUAL_INFO = tl.constexpr(2)
VARIATION_RATIO = tl.constexpr(3)
MARGIN = tl.constexpr(4)
LEAST_CONFIDENCE = tl.constexpr(5)
ERROR_COUNT = tl.constexpr(6)
NLL = tl.constexpr(7)
VOTE_ENTROPY = tl.constexpr(8)
MODE = tl.constexpr(0)
MODE_VOTES = tl.constexpr(1)
FORGETTING = tl.constexpr(2)
# Rows of the packed outputs (host side only: kernels/launch.py).
NUM_FLOAT_FIELDS = 9
NUM_INT_FIELDS = 3


@triton.jit
def load_compute(ptrs, mask, IS_F64: tl.constexpr):
    """Logits in the comparison precision: float64 as is, every other dtype as float32 (exact for
    float16 and bfloat16; the interpreter has no bfloat16 arithmetic, so the cast comes first).
    Masked lanes read -inf: a padded class is a masked class (probability 0)."""
    x = tl.load(ptrs, mask=mask, other=float("-inf"))
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def shifted(x, m):
    """float32 l - m, floored (a NaN stays NaN: `where`, unlike maximum, does not drop it)."""
    d = (x - m).to(tl.float32)
    return tl.where(d < FLOOR, FLOOR, d)


@triton.jit
def member_entropy(log_s, t, inv_s):
    # Rounding can leave -1 ulp on one-hot rows, hence the clamp (row.h).
    h = log_s - t * inv_s
    return tl.where(h > 0.0, h, 0.0)


@triton.jit
def is_bad(s):
    """Rows whose s flags NaN, +inf or all -inf (see the module docstring)."""
    return (s != s) | (s < 1.0)


@triton.jit
def xlogx(p):
    safe = tl.where(p < TINY, 1.0, p)
    return tl.where(p < TINY, 0.0, p * tl.log(safe))


@triton.jit
def row_status(row_ptr, K, IS_F64: tl.constexpr, BLOCK_K: tl.constexpr):
    """Status of a row already known to be invalid (ensel._inputs codes): 1 if its first NaN comes
    before its first +inf, 2 if the reverse, 3 when it has neither (all -inf)."""
    offs = tl.arange(0, BLOCK_K)
    first_nan = tl.full([], 2147483647, tl.int32)
    first_pos_inf = tl.full([], 2147483647, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        x = load_compute(row_ptr + kk, kk < K, IS_F64)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(x != x, kk, 2147483647), axis=0))
        first_pos_inf = tl.minimum(first_pos_inf, tl.min(tl.where(x == float("inf"), kk, 2147483647), axis=0))
    return tl.where(first_nan < first_pos_inf, 1, tl.where(first_pos_inf < first_nan, 2, 3))


@triton.jit
def observe_label(argmax, y, log_p, correct, last_correct, forgetting, nll_max, nll_sum):
    """One member's label terms (row.h observe_label): correct count, forgetting events (a correct
    member followed by a wrong one), and the online logsumexp (max, sum of exp(. - max)) of
    log p_e,y."""
    now = (argmax == y).to(tl.int32)
    forgetting += last_correct & (1 - now)
    correct += now
    up = log_p > nll_max
    # exp(-inf) = 0 starts the sum at 1; the unselected branches may hold NaN, never selected.
    raised = nll_sum * tl.exp(nll_max - log_p) + 1.0
    added = tl.where(log_p > float("-inf"), nll_sum + tl.exp(log_p - nll_max), nll_sum)
    nll_sum = tl.where(up, raised, added)
    nll_max = tl.where(up, log_p, nll_max)
    return correct, now, forgetting, nll_max, nll_sum


@triton.jit
def merge_top2(top1, top2, p, offs_k):
    """The two largest entries so far merged with those of a [rows, BLOCK_K] block of pbar
    (entries >= 0; a tie for the first place makes the second equal to the first, as in row.h)."""
    c1 = tl.max(p, axis=1)
    i1 = tl.min(tl.where(p == c1[:, None], offs_k[None, :], 2147483647), axis=1)
    c2 = tl.max(tl.where(offs_k[None, :] == i1[:, None], 0.0, p), axis=1)
    new2 = tl.where(c1 > top1, tl.maximum(top1, c2), tl.maximum(top2, c1))
    return tl.maximum(top1, c1), new2


@triton.jit
def store_member_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, E, entropy_sum, correct, forgetting,
                        nll_max, nll_sum, HAS_LABELS: tl.constexpr):
    """The scores made of per-member terms (row.h write_scores): mean_entropy, and error_count,
    forgetting, nll. Without labels those three are NaN, NaN, 0 (the fields Scores drops), as in
    the reference backend. Returns mean_entropy."""
    e_f = tl.cast(E, tl.float32)
    n64 = tl.cast(N, tl.int64)
    mean_entropy = entropy_sum * (1.0 / e_f)
    tl.store(floats_ptr + MEAN_ENTROPY * n64 + offs_n64, mean_entropy, mask=mask_n)
    if HAS_LABELS:
        # (E - c) / E correctly rounded (div_rn): bit-identical to every other backend.
        ec = tl.div_rn(tl.cast(E - correct, tl.float32), e_f)
        nll = tl.where(nll_max == float("-inf"), float("inf"), -(nll_max + tl.log(nll_sum) - tl.log(e_f)))
        tl.store(floats_ptr + ERROR_COUNT * n64 + offs_n64, ec, mask=mask_n)
        tl.store(floats_ptr + NLL * n64 + offs_n64, nll, mask=mask_n)
        tl.store(ints_ptr + FORGETTING * n64 + offs_n64, tl.cast(forgetting, tl.int64), mask=mask_n)
    else:
        nan = tl.full(entropy_sum.shape, float("nan"), tl.float32)
        tl.store(floats_ptr + ERROR_COUNT * n64 + offs_n64, nan, mask=mask_n)
        tl.store(floats_ptr + NLL * n64 + offs_n64, nan, mask=mask_n)
        tl.store(ints_ptr + FORGETTING * n64 + offs_n64, tl.zeros(entropy_sum.shape, tl.int64), mask=mask_n)
    return mean_entropy


@triton.jit
def onehot_vote_log_sum(votes, vote_log_ptr):
    """sum_c v_c L[v_c] per row of a [rows, BLOCK_K] tile of vote counts (padded classes hold 0),
    L = vote_log_ptr's table (ensel/_votes.py): an int64, exact in any order (row.h vote_entropy_of)."""
    lv = tl.load(vote_log_ptr + votes, mask=votes > 0, other=0)
    return tl.sum(votes.to(tl.int64) * lv, axis=1)


@triton.jit
def store_pbar_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, K, E, neg_h, top1, top2, mean_entropy,
                      mode, votes, vote_log_sum, vote_log_ptr):
    """The scores made of pbar and the votes (row.h write_scores): entropy, mutual_info,
    variation_ratio, vote_entropy, margin, least_confidence, mode, mode_votes. `vote_log_sum` is
    sum_e L[c_e] (onehot_vote_log_sum, mode_pairwise)."""
    e_f = tl.cast(E, tl.float32)
    n64 = tl.cast(N, tl.int64)
    entropy = tl.where(-neg_h > 0.0, -neg_h, 0.0)
    mi = entropy - mean_entropy
    tl.store(floats_ptr + ENTROPY * n64 + offs_n64, entropy, mask=mask_n)
    tl.store(floats_ptr + MUTUAL_INFO * n64 + offs_n64, tl.where(mi > 0.0, mi, 0.0), mask=mask_n)
    vr = tl.div_rn(tl.cast(E - votes, tl.float32), e_f)
    tl.store(floats_ptr + VARIATION_RATIO * n64 + offs_n64, vr, mask=mask_n)
    # row.h vote_entropy_of: (E L[E] - S) / (E 2^F) by one float64 division, rounded once to float32.
    e64 = tl.cast(E, tl.int64)
    d = e64 * tl.load(vote_log_ptr + e64) - vote_log_sum
    denominator = tl.cast(E, tl.float64) * tl.load(vote_log_ptr).to(tl.float64)
    ve = (d.to(tl.float64) / denominator).to(tl.float32)  # float64 `/` is div.rn.f64 (div_rn: fp32 only)
    tl.store(floats_ptr + VOTE_ENTROPY * n64 + offs_n64, ve, mask=mask_n)
    margin = tl.where(K > 1, top1 - top2, 1.0)  # K = 1: the contract's value
    tl.store(floats_ptr + MARGIN * n64 + offs_n64, margin, mask=mask_n)
    tl.store(floats_ptr + LEAST_CONFIDENCE * n64 + offs_n64, 1.0 - top1, mask=mask_n)
    tl.store(ints_ptr + MODE * n64 + offs_n64, tl.cast(mode, tl.int64), mask=mask_n)
    tl.store(ints_ptr + MODE_VOTES * n64 + offs_n64, tl.cast(votes, tl.int64), mask=mask_n)


@triton.jit
def mode_pairwise(hist_ptr, stride_e, offs_n64, mask_n, E, vote_log_ptr, BLOCK_N: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """Mode and votes of E member argmaxes per sample (hist[e * stride_e + n]): each member's class
    is counted among all E, the most votes win, the lowest class on ties (row.h mode_of); and
    sum_e L[c_e] over those counts c_e (vote_entropy, row.h vote_entropy_of).
    O(E^2) compares, independent of K: for class counts too large to hold one-hot votes."""
    offs_e = tl.arange(0, BLOCK_E)
    best_votes = tl.zeros([BLOCK_N], tl.int32)
    best_class = tl.full([BLOCK_N], 2147483647, tl.int32)
    vote_log_sum = tl.zeros([BLOCK_N], tl.int64)
    for i0 in range(0, E, BLOCK_E):
        ei = i0 + offs_e
        valid = mask_n[:, None] & (ei < E)[None, :]
        cand = tl.load(hist_ptr + ei.to(tl.int64)[None, :] * stride_e + offs_n64[:, None], mask=valid, other=-1)
        counts = tl.zeros([BLOCK_N, BLOCK_E], tl.int32)
        for j in range(E):
            aj = tl.load(hist_ptr + tl.cast(j, tl.int64) * stride_e + offs_n64, mask=mask_n, other=-2)
            counts += (cand == aj[:, None]).to(tl.int32)
        most = tl.max(counts, axis=1)
        cls = tl.min(tl.where(valid & (counts == most[:, None]), cand, 2147483647), axis=1)
        better = (most > best_votes) | ((most == best_votes) & (cls < best_class))
        best_votes = tl.where(better, most, best_votes)
        best_class = tl.where(better, cls, best_class)
        vote_log_sum += tl.sum(tl.load(vote_log_ptr + counts, mask=valid, other=0), axis=1)
    return best_class, best_votes, vote_log_sum


@triton.jit
def online_row_stats(row_ptr, K, IS_F64: tl.constexpr, BLOCK_K: tl.constexpr):
    """m, a, s, t of one row of any length, in chunks of BLOCK_K with an online softmax:
    when the running max rises by delta < 0 the old sums rescale as s <- e^delta s and
    t <- e^delta (t + delta s) (since l - m_new = (l - m_old) + delta)."""
    offs = tl.arange(0, BLOCK_K)
    if IS_F64:
        m = tl.full([], float("-inf"), tl.float64)
    else:
        m = tl.full([], float("-inf"), tl.float32)
    a = tl.full([], 0, tl.int32)
    s = tl.full([], 0.0, tl.float32)
    t = tl.full([], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        x = load_compute(row_ptr + kk, kk < K, IS_F64)
        mc = tl.max(x, axis=0)
        ac = tl.min(tl.where(x == mc, kk, 2147483647), axis=0)
        rises = mc > m
        a = tl.where(rises, ac, a)
        m_new = tl.where(rises, mc, m)
        # A chunk of -inf before any finite logit must add 0, not NaN (-inf - -inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = shifted(x, m_ref)
        ex = tl.exp(d)
        delta = (m - m_ref).to(tl.float32)
        alpha = tl.where(rises, tl.exp(delta), 1.0)
        carried = tl.where(s > 0.0, alpha * (t + tl.where(rises, delta, 0.0) * s), t)
        s = alpha * s + tl.sum(ex, axis=0)
        t = carried + tl.sum(ex * d, axis=0)
        m = m_new
    return m, a, s, t
