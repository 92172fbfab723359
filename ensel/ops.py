"""The fused scoring kernel as a torch.library op, so `torch.compile` graphs can hold it.

`torch.ops.ensel.fused_scores(logits, labels, backend, kind)` returns the packed float32 [9, N] and
int64 [3, N] score columns (ensel/_fields.py order); its fake implementation gives their shapes
without running anything. `ensel.score` validates its arguments, then calls this op.
"""

from __future__ import annotations

import torch

from . import backends
from ._chunks import converts, fused
from ._fields import FLOAT_FIELDS, INT_FIELDS
from ._inputs import log_dtype


@torch.library.custom_op("ensel::fused_scores", mutates_args=())
def fused_scores(
    logits: torch.Tensor, labels: torch.Tensor | None, backend: str, kind: str = "logits"
) -> tuple[torch.Tensor, torch.Tensor]:
    resolved = backends.resolve(backend, logits.device)
    if converts(resolved, kind):  # whole, inside a graph: the chunked path is eager only
        logits, kind = torch.log(logits.to(log_dtype(logits.dtype))), "log_probs"
    floats, ints = fused(resolved, logits, labels, kind)
    return floats.to(logits.device), ints.to(logits.device)


@fused_scores.register_fake
def _(logits, labels, backend, kind="logits"):
    n = logits.shape[1]
    floats = logits.new_empty((len(FLOAT_FIELDS), n), dtype=torch.float32)
    ints = logits.new_empty((len(INT_FIELDS), n), dtype=torch.int64)
    return floats, ints
