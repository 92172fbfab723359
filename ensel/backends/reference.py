"""The reference backend: plain PyTorch on any device, float64 math, softmax materialized."""

from __future__ import annotations

import math

import torch

from .._fields import FLOAT_FIELDS, INT_FIELDS
from .._inputs import raise_invalid, row_status
from .._state import StreamState
from ..reference import first_invalid, reference_scores


def _pack(values: dict[str, torch.Tensor], n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    floats = torch.full((len(FLOAT_FIELDS), n), float("nan"), dtype=torch.float32, device=device)
    ints = torch.zeros(len(INT_FIELDS), n, dtype=torch.int64, device=device)
    for i, name in enumerate(FLOAT_FIELDS):
        if name in values:
            floats[i] = values[name]
    for i, name in enumerate(INT_FIELDS):
        if name in values:
            ints[i] = values[name]
    return floats, ints


class ReferenceBackend:
    name = "reference"
    device_types = frozenset({"cpu", "cuda"})
    verified = True
    reads_probs = False

    def available(self) -> bool:
        return True

    def why_unavailable(self) -> str:
        return ""

    def fused(self, logits, labels):
        raise_invalid(*first_invalid(logits))
        return _pack(reference_scores(logits, labels), logits.shape[1], logits.device)

    def update(self, state: StreamState, logits: torch.Tensor, start: int) -> None:
        rows = slice(start, start + logits.shape[0])
        status = row_status(logits)
        bad = status.nonzero()[:, 0]
        if bad.numel():
            members = state.members[start + bad].long()
            i = int(bad[int((members * state.num_samples + bad).argmin())])  # (member, sample) order
            raise_invalid(int(status[i]), int(state.members[start + i]), start + i)
        x = logits.to(torch.float64)
        p = torch.softmax(x, dim=-1)
        log_p = torch.log_softmax(x, dim=-1)
        argmax = x.argmax(-1)
        state.pbar_sum[rows] += p.float()
        state.entropy_sum[rows] += (-torch.special.xlogy(p, p).sum(-1)).float()
        index = torch.arange(start, start + logits.shape[0], device=logits.device)
        state.argmax_history[state.members[rows].long(), index] = argmax.int()
        state.members[rows] += 1
        if state.labels is not None:
            y = state.labels[rows]
            correct = (argmax == y).int()
            state.forgetting[rows] += state.last_correct[rows] & (1 - correct)
            state.correct[rows] += correct
            state.last_correct[rows] = correct
            lp = log_p.gather(1, y[:, None])[:, 0]
            both = torch.stack([state.nll_max[rows].double() + torch.log(state.nll_sum[rows].double()), lp])
            total = torch.logsumexp(both, dim=0)  # log(sum_e p_e,y) so far
            state.nll_max[rows] = total.float()
            state.nll_sum[rows] = torch.where(torch.isinf(total), 0.0, 1.0).float()

    def finalize(self, state: StreamState, num_members: int):
        E, N = num_members, state.num_samples
        pbar = state.pbar_sum.double() / E
        entropy = -torch.special.xlogy(pbar, pbar).sum(-1)
        mean_entropy = state.entropy_sum.double() / E
        history = state.argmax_history[:E].long()  # [E, N]
        counts = torch.zeros(N, state.num_classes, dtype=torch.int64, device=pbar.device)
        counts.scatter_add_(1, history.T, torch.ones_like(history.T))
        votes, _ = counts.max(-1)
        mode = (counts == votes[:, None]).to(torch.int8).argmax(-1)
        vote_share = counts.sort(-1).values.double() / E  # sorted: equal multisets, equal bits
        top = pbar.topk(min(2, state.num_classes), dim=-1).values
        values = {
            "entropy": entropy,
            "mean_entropy": mean_entropy,
            "mutual_info": (entropy - mean_entropy).clamp_min(0.0),
            "mode": mode,
            "mode_votes": votes,
            "variation_ratio": (E - votes).double() / E,
            "vote_entropy": -torch.special.xlogy(vote_share, vote_share).sum(-1),
            "margin": top[:, 0] - top[:, 1] if state.num_classes > 1 else torch.ones_like(entropy),
            "least_confidence": 1.0 - top[:, 0],
        }
        if state.labels is not None:
            values["error_count"] = (E - state.correct.long()).double() / E
            values["forgetting"] = state.forgetting.long()
            log_total = state.nll_max.double() + torch.log(state.nll_sum.double())
            values["nll"] = -(log_total - math.log(E))
        return _pack(values, N, pbar.device)
