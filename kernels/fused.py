"""Fused (sample-major) Triton kernels: an [E, N, K] block of logits to the contract's scores
(docs/contract.md sections 1 and 8), never materializing a softmax.

Two strategies by K:

* `fused_tile_kernel` (K <= TILE_MAX_K): a program owns BLOCK_N samples and loops over the E
  members; each member's [BLOCK_N, BLOCK_K] tile is read once, coalesced, and reduced in
  registers (one pass of max / first argmax / exp sums), its probabilities added into a pbar tile
  and its argmax into one-hot vote counts, both in registers. Many samples per program for small
  K, one or a few rows per program up to a few thousand classes.
* `fused_chunk_stats_kernel` + `fused_chunk_finish_kernel` (K > TILE_MAX_K, e.g. 33000 classes): a
  row no longer fits in registers. The first kernel runs the online softmax over K-chunks of every
  member's row (m, first argmax, s, t; the entropy and label terms), keeping m, 1/s and the argmax
  per (member, sample) in an [E, N] scratch; the second walks the K-chunks in the outer loop and
  the members in the inner one, so each chunk of pbar is complete in registers before it is
  summarized (entropy, two largest entries), and takes the mode from the scratch argmaxes. The
  logits are read twice, the one place docs/contract.md section 8 allows it.

Invalid rows are detected in the kernels; the first offending (member, sample) in lexicographic
order lands in `fail` as the int64 key (member * N + sample) * 4 + status via atomic_min.
"""

import triton
import triton.language as tl

from ._rowmath import (
    MEAN_ENTROPY,
    is_bad,
    load_compute,
    member_entropy,
    merge_top2,
    mode_pairwise,
    observe_label,
    onehot_vote_log_sum,
    online_row_stats,
    row_status,
    shifted,
    store_member_scores,
    store_pbar_scores,
    xlogx,
)


@triton.jit
def _record_failure(x_ptr, fail_ptr, first_bad, offs_n, E, N, K, stride_e, stride_n,
                    IS_F64: tl.constexpr, BLOCK_K: tl.constexpr):
    """The lexicographically first bad (member, sample) of a program's samples into `fail`.
    first_bad[i] is the first member at which sample offs_n[i] went bad (E if never)."""
    first_e = tl.min(first_bad, axis=0)
    if first_e < E:
        n_bad = tl.min(tl.where(first_bad == first_e, offs_n, 2147483647), axis=0)
        e64 = tl.cast(first_e, tl.int64)
        n64 = tl.cast(n_bad, tl.int64)
        status = row_status(x_ptr + e64 * stride_e + n64 * stride_n, K, IS_F64, BLOCK_K)
        key = (e64 * N + n64) * 4 + tl.cast(status, tl.int64)
        tl.atomic_min(fail_ptr, key)


@triton.jit
def fused_tile_kernel(x_ptr, labels_ptr, floats_ptr, ints_ptr, fail_ptr, vote_log_ptr,
                      E, N, K, stride_e, stride_n,
                      HAS_LABELS: tl.constexpr, IS_F64: tl.constexpr, WIDE_ROWS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    # Addresses: a 64-bit base per program and member (E * N * K passes 2^31 at ImageNet scale)
    # plus int32 offsets inside the tile, unless the launcher found that BLOCK_N * stride_n may
    # pass 2^31 (WIDE_ROWS: sample strides of tens of millions of elements).
    first_row = tl.cast(pid, tl.int64) * BLOCK_N * stride_n
    local_rows = tl.arange(0, BLOCK_N)
    if WIDE_ROWS:
        local_rows = local_rows.to(tl.int64)
    tile_off = (local_rows * stride_n)[:, None] + offs_k[None, :]

    pbar = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    votes = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    entropy_sum = tl.zeros([BLOCK_N], tl.float32)
    first_bad = tl.zeros([BLOCK_N], tl.int32) + E
    # Labels lie in [0, K) (checked on the host): int32 halves their registers.
    y = tl.zeros([BLOCK_N], tl.int32)
    if HAS_LABELS:
        y = tl.load(labels_ptr + offs_n64, mask=mask_n, other=0).to(tl.int32)
    correct = tl.zeros([BLOCK_N], tl.int32)
    last_correct = tl.zeros([BLOCK_N], tl.int32)
    forgetting = tl.zeros([BLOCK_N], tl.int32)
    nll_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    nll_sum = tl.zeros([BLOCK_N], tl.float32)

    for e in range(E):
        member_ptr = x_ptr + (tl.cast(e, tl.int64) * stride_e + first_row)
        x = load_compute(member_ptr + tile_off, mask, IS_F64)
        m = tl.max(x, axis=1)
        a = tl.min(tl.where(x == m[:, None], offs_k[None, :], BLOCK_K), axis=1)
        d = shifted(x, m[:, None])
        ex = tl.exp(d)
        s = tl.sum(ex, axis=1)
        t = tl.sum(ex * d, axis=1)
        inv_s = 1.0 / s
        log_s = tl.log(s)
        pbar += ex * inv_s[:, None]
        entropy_sum += member_entropy(log_s, t, inv_s)
        votes += (offs_k[None, :] == a[:, None]).to(tl.int32)
        first_bad = tl.where(mask_n & is_bad(s) & (first_bad == E), e, first_bad)
        if HAS_LABELS:
            x_y = load_compute(member_ptr + (local_rows * stride_n + y), mask_n, IS_F64)
            log_p = (x_y - m).to(tl.float32) - log_s
            correct, last_correct, forgetting, nll_max, nll_sum = observe_label(
                a, y, log_p, correct, last_correct, forgetting, nll_max, nll_sum)

    # Mode: the most votes, the lowest class on ties (padded classes have 0 votes, E >= 1 real).
    mode_votes = tl.max(votes, axis=1)
    mode = tl.min(tl.where(votes == mode_votes[:, None], offs_k[None, :], BLOCK_K), axis=1)
    e_f = tl.cast(E, tl.float32)
    p = tl.where(mask, pbar * (1.0 / e_f), 0.0)
    neg_h = tl.sum(xlogx(p), axis=1)
    zero = tl.zeros([BLOCK_N], tl.float32)
    top1, top2 = merge_top2(zero, zero, p, offs_k)
    vote_log_sum = onehot_vote_log_sum(votes, vote_log_ptr)  # after pbar's last use: fewer live registers
    mean_entropy = store_member_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, E, entropy_sum, correct,
                                       forgetting, nll_max, nll_sum, HAS_LABELS)
    store_pbar_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, K, E, neg_h, top1, top2, mean_entropy,
                      mode, mode_votes, vote_log_sum, vote_log_ptr)
    _record_failure(x_ptr, fail_ptr, first_bad, offs_n, E, N, K, stride_e, stride_n, IS_F64, BLOCK_K)


@triton.jit
def fused_chunk_stats_kernel(x_ptr, labels_ptr, floats_ptr, ints_ptr, fail_ptr,
                             row_max_ptr, inv_sum_ptr, argmax_ptr,
                             E, N, K, stride_e, stride_n,
                             HAS_LABELS: tl.constexpr, IS_F64: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1 of the large-K path, one sample per program: per member the online row statistics;
    writes m, 1/s, argmax to the [E, N] scratch, and mean_entropy and the label scores."""
    n = tl.program_id(0)
    n64 = tl.cast(n, tl.int64)
    N64 = tl.cast(N, tl.int64)
    offs_n64 = tl.zeros([1], tl.int64) + n64
    mask_n = offs_n64 < N64
    entropy_sum = tl.zeros([1], tl.float32)
    first_bad = tl.zeros([1], tl.int32) + E
    y = tl.zeros([1], tl.int64)
    if HAS_LABELS:
        y = tl.load(labels_ptr + offs_n64)
    correct = tl.zeros([1], tl.int32)
    last_correct = tl.zeros([1], tl.int32)
    forgetting = tl.zeros([1], tl.int32)
    nll_max = tl.full([1], float("-inf"), tl.float32)
    nll_sum = tl.zeros([1], tl.float32)
    for e in range(E):
        e64 = tl.cast(e, tl.int64)
        row_ptr = x_ptr + e64 * stride_e + n64 * stride_n
        m, a, s, t = online_row_stats(row_ptr, K, IS_F64, BLOCK_K)
        inv_s = 1.0 / s
        log_s = tl.log(s)
        entropy_sum += member_entropy(log_s, t, inv_s)
        # (nested where: the interpreter cannot `&` a scalar mask with a [1] one)
        first_bad = tl.where(is_bad(s), tl.where(first_bad == E, e, first_bad), first_bad)
        tl.store(row_max_ptr + e64 * N64 + n64, m)
        tl.store(inv_sum_ptr + e64 * N64 + n64, inv_s)
        tl.store(argmax_ptr + e64 * N64 + n64, a)
        if HAS_LABELS:
            x_y = load_compute(row_ptr + y, mask_n, IS_F64)
            log_p = (x_y - m).to(tl.float32) - log_s
            correct, last_correct, forgetting, nll_max, nll_sum = observe_label(
                a, y, log_p, correct, last_correct, forgetting, nll_max, nll_sum)
    store_member_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, E, entropy_sum, correct, forgetting,
                        nll_max, nll_sum, HAS_LABELS)
    _record_failure(x_ptr, fail_ptr, first_bad, n + tl.zeros([1], tl.int32), E, N, K, stride_e, stride_n,
                    IS_F64, BLOCK_K)


@triton.jit
def fused_chunk_finish_kernel(x_ptr, floats_ptr, ints_ptr, row_max_ptr, inv_sum_ptr, argmax_ptr, vote_log_ptr,
                              E, N, K, stride_e, stride_n,
                              IS_F64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Pass 2 of the large-K path, one sample per program: pbar chunk by chunk (members inner),
    its entropy and two largest entries, and the mode and vote_entropy from the scratch argmaxes."""
    n = tl.program_id(0)
    n64 = tl.cast(n, tl.int64)
    N64 = tl.cast(N, tl.int64)
    offs_n64 = tl.zeros([1], tl.int64) + n64
    mask_n = offs_n64 < N64
    offs_k = tl.arange(0, BLOCK_K)
    inv_e = 1.0 / tl.cast(E, tl.float32)
    neg_h = tl.zeros([1], tl.float32)
    top1 = tl.zeros([1], tl.float32)
    top2 = tl.zeros([1], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        pbar = tl.zeros([BLOCK_K], tl.float32)
        for e in range(E):
            e64 = tl.cast(e, tl.int64)
            m = tl.load(row_max_ptr + e64 * N64 + n64)
            inv_s = tl.load(inv_sum_ptr + e64 * N64 + n64)
            x = load_compute(x_ptr + e64 * stride_e + n64 * stride_n + kk, mask_k, IS_F64)
            pbar += tl.exp(shifted(x, m)) * inv_s
        p = tl.where(mask_k, pbar * inv_e, 0.0)[None, :]
        neg_h += tl.sum(xlogx(p), axis=1)
        top1, top2 = merge_top2(top1, top2, p, kk)
    mode, votes, vote_log_sum = mode_pairwise(argmax_ptr, N64, offs_n64, mask_n, E, vote_log_ptr, 1, BLOCK_E)
    mean_entropy = tl.load(floats_ptr + MEAN_ENTROPY * N64 + offs_n64)  # the stats kernel's
    store_pbar_scores(floats_ptr, ints_ptr, offs_n64, mask_n, N, K, E, neg_h, top1, top2, mean_entropy,
                      mode, votes, vote_log_sum, vote_log_ptr)
