"""Which samples to acquire, from one score per sample: the rules of `Scores.top`, written once
for it and for the distributed `ensel.distributed.global_top_k`.

Every strategy starts from the **rank order**: the most uncertain first (the highest values, the
lowest for `margin`), equal values in increasing sample index, or -- given a generator -- in the
order of a random key per sample (`tie_keys`), so that a cut through a tie group (variation ratio
and error count take only E + 1 values) takes a random part of it rather than its lowest
indices. `exclude_top` then drops the first floor(exclude_top * N) samples as outliers.

- "top": the next k of the rank order.
- "balanced": class-balanced top-k. The candidates' predicted classes (the ensemble's `mode`)
  each get a quota of k // C samples (C: the classes predicted among the candidates), filled by
  that class's first samples in rank order; what is left of k (classes with fewer samples than
  their quota, and k mod C) is filled by the first samples of the rank order not yet taken.
- "power", "softmax", "softrank": stochastic batch acquisition (Kirsch, Farquhar, Atighehchian,
  Jesson, Branchaud-Charron, Gal: "Stochastic Batch Acquisition: A Simple Baseline for Deep Active
  Learning", TMLR 2023). k samples drawn without replacement with probability proportional to
  s^beta (power; s >= 0, a score where higher is more uncertain), exp(beta s) (softmax; s the score,
  negated for margin) or r^-beta (softrank; r the 1-based position in the rank order), beta =
  1 / temperature: as Gumbel top-k, the k largest of log-weight + Gumbel noise (Kool, van Hoof,
  Welling, ICML 2019), taken in that order.

Randomness comes from an explicit torch.Generator, one 62-bit draw of it per selection; the
noise of sample i is then a hash of (that seed, i) (splitmix64), not a stream position, so the
ranks of a distributed run, each hashing its own samples' global indices, draw exactly what one
process would.
"""

from __future__ import annotations

import math

import torch

from ._fields import DIRECTION

STRATEGIES = ("top", "balanced", "power", "softmax", "softrank")
STOCHASTIC = ("power", "softmax", "softrank")

# splitmix64's constants as the int64 values of their bits (torch has no uint64 arithmetic;
# int64 multiplication wraps as uint64 would).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def tie_keys(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A pseudo-random int64 per sample index: splitmix64 of seed + (index + 1) * golden ratio,
    the generator of Steele, Lea and Flood ("Fast splittable pseudorandom number generators",
    OOPSLA 2014): a bijection of the index for a given seed, so distinct samples never tie."""
    x = (indices.to(torch.int64) + 1) * _GOLDEN + seed
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def gumbel_noise(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise per sample index (float64): -log(-log u), u in (0, 1) from the top 53
    bits of a key (a different seed than the ties', so the two are independent)."""
    bits = _shift_right(tie_keys(seed ^ 0x5DEECE66D, indices), 11)
    u = (bits.to(torch.float64) + 0.5) * 2.0**-53
    return -torch.log(-torch.log(u))


def draw_seed(generator: torch.Generator) -> int:
    """One selection's seed from the caller's generator (which it advances by one draw)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**62, (), generator=generator))


def check_strategy(strategy: str, temperature: float, by: str, generator) -> float:
    """The strategy's arguments checked (one-line ValueError/TypeError); returns beta."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy in STOCHASTIC and generator is None:
        raise ValueError(f"strategy={strategy!r} draws at random: pass generator= (a torch.Generator) "
                         "so that the selection can be reproduced")
    if strategy == "power" and DIRECTION[by] != "high":
        raise ValueError(f"strategy='power' needs a score where higher is more uncertain; {by!r} is not "
                         "(use 'softmax' or 'softrank', or least_confidence)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: expected a positive finite number")
    return 1.0 / float(temperature)


def rank_order(values: torch.Tensor, indices: torch.Tensor, descending: bool, tie_seed: int | None) -> torch.Tensor:
    """Positions of `values` in rank order: by value, equal values by increasing `indices`, or
    by increasing tie_keys(tie_seed, indices) when tie_seed is given."""
    if tie_seed is None:
        first = torch.sort(indices, stable=True).indices
    else:
        first = torch.sort(tie_keys(tie_seed, indices), stable=True).indices
    by_value = torch.sort(values[first], descending=descending, stable=True).indices
    return first[by_value]


def log_weights(values: torch.Tensor, by: str, strategy: str, beta: float, ranks: torch.Tensor | None) -> torch.Tensor:
    """log of each sample's sampling weight (float64): beta log s (power; log 0 = -inf, never
    drawn while another weight is positive), beta s (softmax; s = -margin for margin), or
    -beta log r (softrank; `ranks` 1-based)."""
    if strategy == "softrank":
        return -beta * torch.log(ranks.to(torch.float64))
    s = values.to(torch.float64)
    if strategy == "power":
        if bool((s < 0).any()):
            first = int((s < 0).nonzero()[0, 0])
            raise ValueError(f"strategy='power': {by} is negative at candidate {first}; power sampling needs s >= 0")
        return beta * torch.log(s)
    return beta * (s if DIRECTION[by] == "high" else -s)


def sampling_order(keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions by decreasing Gumbel key; equal keys (two -inf weights) by increasing index."""
    first = torch.sort(indices, stable=True).indices
    return first[torch.sort(keys[first], descending=True, stable=True).indices]


def balanced(order: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """Class-balanced top-k of candidates given in rank order (`order`: their positions; `classes`:
    the predicted class of every position): quotas of k // C per predicted class, the remainder by
    the rank order; returned in rank order."""
    if k == 0 or order.numel() == 0:
        return order[:0]
    cls = classes[order]
    present = torch.unique(cls)
    quota = k // present.numel()
    # Within its class, each candidate's place in rank order: a stable sort by class keeps it.
    by_class = torch.sort(cls, stable=True).indices
    counts = torch.bincount(cls - int(present.min()))
    counts = counts[counts > 0]
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    place = torch.empty_like(by_class)
    place[by_class] = torch.arange(order.numel(), device=order.device) - starts
    taken = place < quota
    rest = k - int(taken.sum())
    if rest > 0:
        more = (~taken).nonzero()[:rest, 0]
        taken[more] = True
    return order[taken]
