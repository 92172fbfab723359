"""Streaming (checkpoint-major) Triton kernels: one member's [B, K] rows into the accumulator state
(ensel/_state.py layout), and the state into the contract's scores (docs/contract.md sections 8-9).

* `check_kernel` validates a batch before anything is written, so an update is all or nothing:
  the first offending (member, sample), member = the sample's member count, goes to `fail` as
  (member * N + sample) * 4 + status via atomic_min. For batches that fit in L2 (tens of MB) the
  update's second read of the logits comes from there.
* `update_kernel` adds each row's probabilities into pbar_sum and its entropy, argmax and label
  terms into the per-sample state. K <= BLOCK_K: a [BLOCK_N, BLOCK_K] tile per program, read once.
  K > BLOCK_K: one row per program, an online-softmax pass over K-chunks for m, s, t and the
  argmax, then a second pass adding exp(l - m) / s into pbar_sum chunk by chunk.
* `finalize_kernel` summarizes pbar = pbar_sum / E chunk by chunk (any K), and takes the mode and
  vote_entropy of argmax_history: one-hot vote counts for small K, pairwise counts beyond.
"""

import triton
import triton.language as tl

from ._rowmath import (
    load_compute,
    member_entropy,
    merge_top2,
    mode_pairwise,
    observe_label,
    onehot_vote_log_sum,
    online_row_stats,
    shifted,
    store_member_scores,
    store_pbar_scores,
    xlogx,
)


@triton.jit
def check_kernel(x_ptr, members_ptr, fail_ptr, B, N, K, start, stride_n,
                 IS_F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < B
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    big = 2147483647
    first_nan = tl.full([BLOCK_N], big, tl.int32)
    first_pos_inf = tl.full([BLOCK_N], big, tl.int32)
    if IS_F64:
        m = tl.full([BLOCK_N], float("-inf"), tl.float64)
    else:
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = load_compute(x_ptr + rows64[:, None] * stride_n + kk[None, :], mask_n[:, None] & (kk < K)[None, :], IS_F64)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(x != x, kk[None, :], big), axis=1))
        first_pos_inf = tl.minimum(first_pos_inf, tl.min(tl.where(x == float("inf"), kk[None, :], big), axis=1))
        m = tl.maximum(m, tl.max(tl.where(x != x, float("-inf"), x), axis=1))
    status = tl.where(first_nan < first_pos_inf, 1,
                      tl.where(first_pos_inf < first_nan, 2, tl.where(m == float("-inf"), 3, 0)))
    samples = start + rows64
    member = tl.load(members_ptr + samples, mask=mask_n, other=0).to(tl.int64)
    key = (member * N + samples) * 4 + status.to(tl.int64)
    key = tl.where(mask_n & (status > 0), key, 9223372036854775807)
    first = tl.min(key, axis=0)
    if first < 9223372036854775807:
        tl.atomic_min(fail_ptr, first)


@triton.jit
def update_kernel(x_ptr, labels_ptr, pbar_sum_ptr, entropy_sum_ptr, members_ptr, history_ptr,
                  correct_ptr, last_correct_ptr, forgetting_ptr, nll_max_ptr, nll_sum_ptr,
                  B, N, K, start, stride_n,
                  HAS_LABELS: tl.constexpr, IS_F64: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """Rows already validated by check_kernel. Each sample appears once in a batch, so plain
    loads and stores (no atomics) update its state."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < B
    rows64 = rows.to(tl.int64)
    samples = start + rows64
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows64[:, None] * stride_n
    pbar_rows = pbar_sum_ptr + samples[:, None] * K
    if SINGLE_CHUNK:
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        x = load_compute(x_rows + offs_k[None, :], mask, IS_F64)
        # Rows past B read all -inf; keep their (unused) math finite-free of traps by m = 0.
        m = tl.max(x, axis=1)
        m = tl.where(mask_n, m, 0.0)
        a = tl.min(tl.where(x == m[:, None], offs_k[None, :], BLOCK_K), axis=1)
        d = shifted(x, m[:, None])
        ex = tl.exp(d)
        s = tl.sum(ex, axis=1)
        t = tl.sum(ex * d, axis=1)
        inv_s = 1.0 / s
        pbar = tl.load(pbar_rows + offs_k[None, :], mask=mask, other=0.0)
        tl.store(pbar_rows + offs_k[None, :], pbar + ex * inv_s[:, None], mask=mask)
    else:
        # One row per program (BLOCK_N == 1): pass 1 for the row statistics, pass 2 into pbar_sum.
        m, a, s, t = online_row_stats(x_ptr + rows64 * stride_n, K, IS_F64, BLOCK_K)
        inv_s = 1.0 / s
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask = mask_n[:, None] & (kk < K)[None, :]
            x = load_compute(x_rows + kk[None, :], mask, IS_F64)
            ex = tl.exp(shifted(x, m))
            pbar = tl.load(pbar_rows + kk[None, :], mask=mask, other=0.0)
            tl.store(pbar_rows + kk[None, :], pbar + ex * inv_s, mask=mask)
    log_s = tl.log(s)
    entropy_sum = tl.load(entropy_sum_ptr + samples, mask=mask_n, other=0.0)
    tl.store(entropy_sum_ptr + samples, entropy_sum + member_entropy(log_s, t, inv_s), mask=mask_n)
    member = tl.load(members_ptr + samples, mask=mask_n, other=0)
    # int64: members * N passes 2^31 at ImageNet scale (100 members x 1.28M samples).
    tl.store(history_ptr + member.to(tl.int64) * N + samples, a, mask=mask_n)
    tl.store(members_ptr + samples, member + 1, mask=mask_n)
    if HAS_LABELS:
        y = tl.load(labels_ptr + samples, mask=mask_n, other=0)
        x_y = load_compute(x_ptr + rows64 * stride_n + y, mask_n, IS_F64)
        log_p = (x_y - m).to(tl.float32) - log_s
        correct = tl.load(correct_ptr + samples, mask=mask_n, other=0)
        last_correct = tl.load(last_correct_ptr + samples, mask=mask_n, other=0)
        forgetting = tl.load(forgetting_ptr + samples, mask=mask_n, other=0)
        nll_max = tl.load(nll_max_ptr + samples, mask=mask_n, other=0.0)
        nll_sum = tl.load(nll_sum_ptr + samples, mask=mask_n, other=0.0)
        correct, last_correct, forgetting, nll_max, nll_sum = observe_label(
            a, y, log_p, correct, last_correct, forgetting, nll_max, nll_sum)
        tl.store(correct_ptr + samples, correct, mask=mask_n)
        tl.store(last_correct_ptr + samples, last_correct, mask=mask_n)
        tl.store(forgetting_ptr + samples, forgetting, mask=mask_n)
        tl.store(nll_max_ptr + samples, nll_max, mask=mask_n)
        tl.store(nll_sum_ptr + samples, nll_sum, mask=mask_n)


@triton.jit
def finalize_kernel(pbar_sum_ptr, entropy_sum_ptr, history_ptr, correct_ptr, forgetting_ptr,
                    nll_max_ptr, nll_sum_ptr, floats_ptr, ints_ptr, vote_log_ptr, E, N, K,
                    HAS_LABELS: tl.constexpr, ONE_HOT_VOTES: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    N64 = tl.cast(N, tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    inv_e = 1.0 / tl.cast(E, tl.float32)
    neg_h = tl.zeros([BLOCK_N], tl.float32)
    top1 = tl.zeros([BLOCK_N], tl.float32)
    top2 = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask = mask_n[:, None] & (kk < K)[None, :]
        p = tl.load(pbar_sum_ptr + offs_n64[:, None] * K + kk[None, :], mask=mask, other=0.0) * inv_e
        neg_h += tl.sum(xlogx(p), axis=1)
        top1, top2 = merge_top2(top1, top2, p, kk)
    if ONE_HOT_VOTES:
        # K <= BLOCK_K: count the E argmaxes into a [BLOCK_N, BLOCK_K] tile of votes.
        votes = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        for e in range(E):
            a = tl.load(history_ptr + tl.cast(e, tl.int64) * N64 + offs_n64, mask=mask_n, other=0)
            votes += (offs_k[None, :] == a[:, None]).to(tl.int32)
        mode_votes = tl.max(votes, axis=1)
        mode = tl.min(tl.where(votes == mode_votes[:, None], offs_k[None, :], BLOCK_K), axis=1)
        vote_log_sum = onehot_vote_log_sum(votes, vote_log_ptr)
    else:
        mode, mode_votes, vote_log_sum = mode_pairwise(history_ptr, N64, offs_n64, mask_n, E, vote_log_ptr,
                                                       BLOCK_N, BLOCK_E)
    entropy_sum = tl.load(entropy_sum_ptr + offs_n64, mask=mask_n, other=0.0)
    correct = tl.zeros([BLOCK_N], tl.int32)
    forgetting = tl.zeros([BLOCK_N], tl.int32)
    nll_max = tl.zeros([BLOCK_N], tl.float32)
    nll_sum = tl.zeros([BLOCK_N], tl.float32)
    if HAS_LABELS:
        correct = tl.load(correct_ptr + offs_n64, mask=mask_n, other=0)
        forgetting = tl.load(forgetting_ptr + offs_n64, mask=mask_n, other=0)
        nll_max = tl.load(nll_max_ptr + offs_n64, mask=mask_n, other=0.0)
        nll_sum = tl.load(nll_sum_ptr + offs_n64, mask=mask_n, other=0.0)
    mean_entropy = store_member_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, E, entropy_sum, correct,
                                       forgetting, nll_max, nll_sum, HAS_LABELS)
    store_pbar_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, K, E, neg_h, top1, top2, mean_entropy,
                      mode, mode_votes, vote_log_sum, vote_log_ptr)
