"""The float64 reference: the contract (docs/contract.md section 1) written as directly as PyTorch allows.

It materializes the softmax ([E, N, K] probabilities in float64), so it is the oracle of the tests
and the baseline of the benchmarks, never a fast path. Each score is computed from its definition,
independently of the kernels' algebra (no log-sum-exp entropy identity, no online softmax).
"""

from __future__ import annotations

import math

import torch

from ._inputs import row_status


def first_invalid(logits: torch.Tensor) -> tuple[int, int, int]:
    """(status, member, sample) of the first invalid row of [E, N, K] logits in (member, sample)
    order, or (0, -1, -1)."""
    E, N, K = logits.shape
    status = row_status(logits.reshape(E * N, K))
    bad = status.nonzero()
    if bad.numel() == 0:
        return 0, -1, -1
    row = int(bad[0, 0])  # rows are in (member, sample) order
    return int(status[row]), row // N, row % N


def reference_scores(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every score of the contract for [E, N, K] logits, in float64 (counts and classes in int64).

    Invalid input is not checked here (see `first_invalid`); labels must lie in [0, K).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits: expected [E, N, K], got shape {tuple(logits.shape)}")
    E, N, K = logits.shape
    if E == 0 or K == 0:  # the contract's empty-input rule (docs/contract.md section 5)
        raise ValueError(f"logits: there must be at least one member and one class, got shape {tuple(logits.shape)}")
    x = logits.to(torch.float64)
    p = torch.softmax(x, dim=-1)  # [E, N, K]; exp(-inf) = 0
    member_entropy = -torch.special.xlogy(p, p).sum(-1)  # [E, N]; 0 log 0 = 0
    pbar = p.mean(0)  # [N, K]
    entropy = -torch.special.xlogy(pbar, pbar).sum(-1)
    mean_entropy = member_entropy.mean(0)

    votes_for = x.argmax(-1)  # [E, N]: torch.argmax takes the first maximum
    counts = torch.zeros(N, K, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, votes_for.T, torch.ones_like(votes_for.T))
    mode_votes, _ = counts.max(-1)
    # The lowest class among those with the most votes.
    mode = (counts == mode_votes[:, None]).to(torch.int8).argmax(-1)
    # v_c / E, sorted so that equal count multisets are summed in the same order (equal bits)
    vote_share = counts.sort(-1).values.to(torch.float64) / E

    top = pbar.topk(min(2, K), dim=-1).values
    margin = top[:, 0] - top[:, 1] if K > 1 else torch.ones(N, dtype=torch.float64, device=x.device)

    out = {
        "entropy": entropy,
        "mean_entropy": mean_entropy,
        "mutual_info": (entropy - mean_entropy).clamp_min(0.0),
        "mode": mode,
        "mode_votes": mode_votes,
        "variation_ratio": (E - mode_votes).to(torch.float64) / E,
        "vote_entropy": -torch.special.xlogy(vote_share, vote_share).sum(-1),
        "margin": margin,
        "least_confidence": 1.0 - top[:, 0],
    }
    if labels is not None:
        y = labels.to(device=x.device, dtype=torch.int64)
        correct = votes_for == y[None, :]  # [E, N]
        out["error_count"] = (E - correct.sum(0)).to(torch.float64) / E
        out["forgetting"] = (correct[:-1] & ~correct[1:]).sum(0)
        # -log pbar_y, in log space so that a pbar_y below float64's range is still finite.
        log_p_label = torch.log_softmax(x, dim=-1).gather(2, y[None, :, None].expand(E, N, 1))[..., 0]
        out["nll"] = -(torch.logsumexp(log_p_label, dim=0) - math.log(E))
    return out
