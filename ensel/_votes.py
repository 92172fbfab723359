"""vote_entropy from the vote counts, bit-identical on every backend (docs/contract.md section 7).

    vote_entropy = -sum_c (v_c / E) log(v_c / E) = (E log E - sum_c v_c log v_c) / E.

Acquisition by vote_entropy is all ties: with E = 4..20 members a sample's value is one of the few
values the partitions of E give, and `Scores.top` breaks ties by sample index only if equal count
multisets give *equal bits*. A float sum of -p log p in class order would not: the same counts in
another class order round differently. So every kernel computes it as an integer, exactly:

    S = sum_c v_c L[v_c] = sum_e L[c_e]   (c_e: the votes of member e's class),
    D = E L[E] - S,
    vote_entropy = float32(float64(D) / (float64(E) * 2^F)),

with the fixed-point table L[v] = round(log(v) 2^F) (v >= 1) of `vote_log_table`, built here once
and handed to every kernel (CPU, CUDA, Triton): integer sums are exact in any order, so the value
depends on the multiset of counts only (class order, member order, per-class or per-member
summation, the threads' reduction order: none of it matters), and what follows is three
correctly rounded IEEE operations (int64 -> float64, one float64 division, float64 -> float32),
the same bits on every device. No log is evaluated in a kernel: device and host libraries may
differ in the last bit of a float64 log, the table cannot.

F is the largest number of fraction bits (at most 52) for which E L[E] < 2^62, so no sum
overflows int64 (S <= E L[E] since v_c <= E): F = 52 up to E = 170 members, 49 at E = 1000,
26 at E = 2^31 - 1. The error of D / (E 2^F) against the exact value is about 2^-F (1 + 2 log E)
plus two float64 roundings, far below a float32 ulp: for every count multiset of E <= 30 members the result is the correctly
rounded float32 of the exact value (checked against 60-digit decimal arithmetic). Unanimous votes
give D = 0 exactly, so vote_entropy = 0.

L[0] holds 2^F itself (a count of 0 never looks up the table: 0 x L[0] = 0 in the per-class sum).
"""

from __future__ import annotations

import functools
import math

import torch


def fraction_bits(num_members: int) -> int:
    """F of the table for E members: the most bits <= 52 with E * L[E] < 2^62."""
    E = num_members
    return min(52, 62 - (E * math.ceil(math.log(E)) + 1).bit_length())


@functools.lru_cache(maxsize=64)
def _table(num_members: int) -> tuple[int, ...]:
    F = fraction_bits(num_members)
    scale = 2.0**F  # scaling a float64 by a power of two is exact; round() to an int is exact
    return (1 << F,) + tuple(round(math.log(v) * scale) for v in range(1, num_members + 1))


def vote_log_table(num_members: int, device=None) -> torch.Tensor:
    """int64 [E + 1]: [2^F, L[1], ..., L[E]], L[v] = round(log(v) 2^F) (the module docstring)."""
    if num_members < 1:
        raise ValueError(f"vote_log_table: num_members = {num_members}, expected >= 1")
    return torch.tensor(_table(num_members), dtype=torch.int64, device=device)
