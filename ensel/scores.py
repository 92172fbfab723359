"""`Scores`: every score of the contract for N samples, and the selection of the samples to acquire."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._fields import ALL_FIELDS, DIRECTION, FLOAT_FIELDS, INT_FIELDS, LABEL_FIELDS
from ._inputs import as_int
from .selection import balanced, check_strategy, draw_seed, gumbel_noise, log_weights, rank_order, sampling_order


def empty_columns(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed columns of no samples (float32 [9, 0], int64 [3, 0]): what every kernel returns
    for N = 0, for the paths that have no kernel to call then."""
    floats = torch.empty(len(FLOAT_FIELDS), 0, dtype=torch.float32, device=device)
    ints = torch.empty(len(INT_FIELDS), 0, dtype=torch.int64, device=device)
    return floats, ints


def outliers_skipped(exclude_top: float, num_samples: int) -> int:
    """How many of the most uncertain of `num_samples` samples a selection with `exclude_top`
    skips: floor(exclude_top * N). The rule of `Scores.top`, written once for it, for the
    distributed global top-k, and for the callers that check a selection before scoring."""
    return int(exclude_top * num_samples)


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-sample scores ([N] tensors on the input's device); the label fields are None without
    labels. Float scores are float32, `mode`, `mode_votes` and `forgetting` int64."""

    num_members: int
    entropy: torch.Tensor
    mean_entropy: torch.Tensor
    mutual_info: torch.Tensor
    mode: torch.Tensor
    mode_votes: torch.Tensor
    variation_ratio: torch.Tensor
    vote_entropy: torch.Tensor
    margin: torch.Tensor
    least_confidence: torch.Tensor
    error_count: torch.Tensor | None = None
    forgetting: torch.Tensor | None = None
    nll: torch.Tensor | None = None

    @classmethod
    def from_columns(cls, floats: torch.Tensor, ints: torch.Tensor, num_members: int, has_labels: bool) -> Scores:
        """From a kernel's packed outputs: floats [len(FLOAT_FIELDS), N], ints [len(INT_FIELDS), N]."""
        values = dict(zip(FLOAT_FIELDS, floats))
        values.update(zip(INT_FIELDS, ints))
        if not has_labels:
            for name in LABEL_FIELDS:
                values[name] = None
        return cls(num_members=num_members, **values)

    @property
    def num_samples(self) -> int:
        return self.entropy.shape[0]

    @property
    def has_labels(self) -> bool:
        return self.nll is not None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The available scores by name, in the contract's order."""
        return {name: getattr(self, name) for name in ALL_FIELDS if getattr(self, name) is not None}

    def top(
        self,
        k: int,
        by: str,
        exclude_top: float = 0.0,
        *,
        strategy: str = "top",
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Indices (int64, on the scores' device) of the k samples to acquire by score `by`
        (ensel/selection.py has the rules, shared with the distributed global top-k).

        The rank order puts the most uncertain first: the highest values, or the lowest for
        `margin`. Equal scores are taken in increasing sample index, so the selection is
        deterministic, or, given `generator`, in a random order drawn from it (one draw per
        call). `exclude_top` skips that fraction of the rank order first, as outliers (paper,
        Table 5): floor(exclude_top * N) samples. `strategy`: "top" (the next k), "balanced"
        (quotas of k // C per predicted class `mode`, the remainder by the rank order), or the
        stochastic "power", "softmax", "softrank" (Kirsch et al. 2023; need `generator`; weights
        s^beta, exp(beta s), rank^-beta with beta = 1 / temperature). NaN values are refused
        (ValueError).
        """
        if by not in DIRECTION:
            known = ", ".join(sorted(DIRECTION))
            raise ValueError(f"top(by={by!r}): not an acquisition score; choose one of {known}")
        values = getattr(self, by)
        if values is None:
            raise ValueError(f"top(by={by!r}): this score needs labels; pass labels= when scoring")
        k = as_int(k, "top(k)")
        if not 0.0 <= exclude_top < 1.0:
            raise ValueError(f"top(exclude_top={exclude_top!r}): expected a fraction in [0, 1)")
        beta = check_strategy(strategy, temperature, by, generator)
        n = self.num_samples
        skip = outliers_skipped(exclude_top, n)
        if not 0 <= k <= n - skip:
            raise ValueError(f"top(k={k}): there are {n} samples, {skip} of them excluded as outliers")
        if values.is_floating_point():
            nan = torch.isnan(values)
            if bool(nan.any()):
                # A sort puts NaN first in descending order: it would be "the most uncertain".
                first = int(nan.nonzero()[0, 0])
                raise ValueError(f"top(by={by!r}): the scores hold NaN (first at sample {first}); NaN has no rank")
        seed = None if generator is None else draw_seed(generator)
        positions = torch.arange(n, device=values.device)
        candidates = rank_order(values, positions, DIRECTION[by] == "high", seed)[skip:]
        if strategy == "top":
            return candidates[:k]
        if strategy == "balanced":
            return balanced(candidates, self.mode, k)
        ranks = torch.arange(1, candidates.numel() + 1, device=values.device)
        keys = log_weights(values[candidates], by, strategy, beta, ranks) + gumbel_noise(seed, candidates)
        return candidates[sampling_order(keys, candidates)[:k]]

    def __repr__(self) -> str:
        names = ", ".join(self.to_dict())
        return f"Scores(num_samples={self.num_samples}, num_members={self.num_members}, fields=[{names}])"

