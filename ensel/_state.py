"""The streaming accumulator's state: one layout shared by every backend, saved and loaded as is.

Per sample n (docs/contract.md section 9): the running sum of member probabilities, the sum of member
entropies, the member count, each member's argmax (for the mode), and what the label scores need.
Memory: 4 N K + 4 N E + 36 N bytes, e.g. 5.6 GB for N = 1.28M, K = 1000, E = 100.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Order of the state addresses handed to the compiled kernels (csrc/bindings.cpp).
FIELDS = (
    "pbar_sum",  # float32 [N, K]
    "entropy_sum",  # float32 [N]
    "members",  # int32 [N]: members seen by each sample
    "argmax_history",  # int32 [capacity, N]: row c holds each sample's c-th member's argmax
    "correct",  # int32 [N]: members whose argmax is the label
    "last_correct",  # int32 [N]: was the previous member correct (forgetting)
    "forgetting",  # int32 [N]
    "nll_max",  # float32 [N]: running logsumexp of log p_e,y (max ...
    "nll_sum",  # float32 [N]: ... and sum of exp(. - max))
)


@dataclass
class StreamState:
    num_samples: int
    num_classes: int
    labels: torch.Tensor | None  # int64 [N], validated
    pbar_sum: torch.Tensor
    entropy_sum: torch.Tensor
    members: torch.Tensor
    argmax_history: torch.Tensor
    correct: torch.Tensor
    last_correct: torch.Tensor
    forgetting: torch.Tensor
    nll_max: torch.Tensor
    nll_sum: torch.Tensor

    @classmethod
    def empty(cls, num_samples: int, num_classes: int, labels, device, capacity: int) -> StreamState:
        n, k = num_samples, num_classes

        def zeros(*shape, dtype=torch.int32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            num_samples=n,
            num_classes=k,
            labels=labels,
            pbar_sum=zeros(n, k, dtype=torch.float32),
            entropy_sum=zeros(n, dtype=torch.float32),
            members=zeros(n),
            argmax_history=zeros(capacity, n),
            correct=zeros(n),
            last_correct=zeros(n),
            forgetting=zeros(n),
            nll_max=torch.full((n,), float("-inf"), dtype=torch.float32, device=device),
            nll_sum=zeros(n, dtype=torch.float32),
        )

    @property
    def device(self) -> torch.device:
        return self.pbar_sum.device

    @property
    def capacity(self) -> int:
        return self.argmax_history.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in FIELDS}

    def addresses(self) -> tuple[int, ...]:
        return tuple(getattr(self, name).data_ptr() for name in FIELDS)

    def history_with_room(self, rows: int) -> torch.Tensor:
        """An argmax history with room for `rows` argmaxes per sample: the current one if it has
        it, else a grown copy (doubling, so that growth is amortized O(1)). The copy is not
        installed: the Accumulator installs it only once an update into it has succeeded, so a
        refused batch leaves the state as it was, capacity included."""
        if rows <= self.capacity:
            return self.argmax_history
        new_capacity = max(rows, 2 * self.capacity, 8)
        grown = torch.zeros(new_capacity, self.num_samples, dtype=torch.int32, device=self.device)
        grown[: self.capacity] = self.argmax_history
        return grown

    def with_history(self, history: torch.Tensor) -> StreamState:
        """The same state (the same tensors, shared) over another argmax history."""
        return dataclasses.replace(self, argmax_history=history)
