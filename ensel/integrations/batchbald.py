"""ensel's BALD for batchbald_redux 2.0.5: `get_bald_batch`, same signature, same result type.

Plug-in point: `batchbald_redux.batchbald.get_bald_batch(log_probs_N_K_C, batch_size, dtype=None,
device=None) -> CandidateBatch(scores, indices)`, where `log_probs_N_K_C` holds log-probabilities
`[N samples, K members (MC-dropout samples), C classes]` (note: K is the *members* axis here, and
C the classes). It scores every sample's BALD,

    BALD(n) = H(pbar_n) - (1/K) sum_k H(p_n,k),   p_n,k = exp(log_probs[n, k]),  pbar_n = mean_k p_n,k,

natural logs, and returns the `batch_size` highest (`batch_size` capped at N), highest first.
`get_bald_batch` here scores it with ensel's one-pass kernel from a permuted view of the input
(`kind="log_probs"`, members to the front: no copy of the whole block), on the input's device,
and selects as natively: `torch.topk` of the float64 scores (same routine, same sorted order).
Only the `batch_size` scores and indices come back to the host (as the Python lists of
`CandidateBatch`, batchbald_redux's own dataclass).

Known differences from the native function, each tested in tests/test_integration_batchbald.py:

- Values: ensel accumulates in float32 in one fused pass (batchbald_redux: two passes, in the
  input's dtype, into float64 buffers). Scores agree to about 1e-6 and the selected indices are
  identical, except where two samples' scores are within that of each other (a near-tie can
  swap). Neither clips at 0: the score is ensel's `entropy - mean_entropy` (in float64).
- A probability of exactly 0 (`log p = -inf`): batchbald_redux computes `-inf * 0 = NaN` and has
  no nansum, so that sample's score is NaN, and `torch.topk` ranks NaN first: it is selected
  ahead of every other sample whatever its BALD. ensel reads `-inf` as a probability of 0
  (0 log 0 = 0) and scores the sample's true BALD.
- NaN or +inf log-probabilities, or a row of all `-inf`: refused (ValueError naming the member
  and the sample) instead of a NaN score.
- Rows are normalized: ensel reads log-probabilities as logits (softmax(log p) = p), so rows
  whose exp does not sum to 1 (e.g. raw logits passed by mistake) are scored as their softmax;
  batchbald_redux would use them unnormalized. On log-probabilities (log_softmax output) the two
  agree.
- `dtype` and `device` are accepted and ignored, as by batchbald_redux's `get_bald_batch` (its
  BatchBALD uses them). ensel scores on the input's device: a CUDA input stays there.
- No tqdm progress bars (batchbald_redux prints two per call).
- `batch_size` must be a non-negative integer (batchbald_redux leaves a negative one to
  `torch.topk`'s RuntimeError): TypeError / ValueError here.
- `get_batchbald_batch` (BatchBALD, joint entropies of candidate batches) is not ensel's: use
  batchbald_redux's own.
"""

from __future__ import annotations

import torch

from .._inputs import as_int, as_tensor
from ._common import require, scores_of

_batchbald = require("batchbald_redux.batchbald", "batchbald")
CandidateBatch = _batchbald.CandidateBatch

__all__ = ["get_bald_batch", "bald_scores", "CandidateBatch"]


def bald_scores(log_probs_N_K_C, *, backend: str = "auto") -> torch.Tensor:
    """BALD of every sample, float64 [N], on the input's device: ensel's
    `entropy - mean_entropy` of log-probabilities [N, K members, C classes], read as a
    permuted view (the block is never copied whole)."""
    x = as_tensor(log_probs_N_K_C, "log_probs_N_K_C")
    if x.dim() != 3:
        raise ValueError(
            f"log_probs_N_K_C: expected a 3-D tensor [N samples, K members, C classes], got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"log_probs_N_K_C: there must be at least one member (K = 0), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:  # one member: H(p) - H(p) = 0 exactly, as natively (all ties)
        scores_of(x, "NEK", kind="log_probs", backend=backend)  # the same checks of the values
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    s = scores_of(x, "NEK", kind="log_probs", backend=backend)
    return s.entropy.double() - s.mean_entropy.double()


def get_bald_batch(
    log_probs_N_K_C, batch_size: int, dtype=None, device=None, *, backend: str = "auto"
) -> CandidateBatch:
    """batchbald_redux's `get_bald_batch`, scored by ensel: the `min(batch_size, N)` samples of
    highest BALD, highest first, as `CandidateBatch(scores, indices)` (Python lists).

    `log_probs_N_K_C`: log-probabilities [N, K members, C classes], a torch tensor (CPU or CUDA),
    numpy array or DLPack array, any strides. `dtype` and `device` are ignored, as natively.
    `backend` is ensel's (default "auto")."""
    size = as_int(batch_size, "batch_size", 0)
    scores = bald_scores(log_probs_N_K_C, backend=backend)
    top_scores, top_indices = torch.topk(scores, min(size, scores.shape[0]))
    return CandidateBatch(top_scores.tolist(), top_indices.tolist())
