"""`ensel.score`: one call from logits to scores."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import torch

from . import backends
from ._chunks import chunk_samples, fused, kernel_dtype, needs_chunks, score_chunks, view_chunks
from ._inputs import InvalidInput, as_tensor, check_kind, check_labels, check_logits
from .accumulator import Accumulator
from .ops import fused_scores
from .scores import Scores


def _is_array(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray)) or hasattr(x, "__dlpack__")


def score(logits, labels=None, *, backend: str = "auto", kind: str = "logits") -> Scores:
    """Every score of the contract for an ensemble's logits, in one pass.

    `logits` is either an [E, N, K] array (members, samples, classes: a torch tensor on CPU or
    CUDA, a numpy array, or any DLPack array; any strides, so a permuted view of an [N, E, K] or
    [N, K, E] buffer is fine) scored by the fused kernel, or an iterable of per-member [N, K]
    arrays (or [e, N, K] groups of members), streamed through an Accumulator.
    `labels` (int [N]) adds error_count, forgetting and nll. Float dtypes: float32, float16,
    bfloat16, float64; scores are accumulated in float32.
    `kind`: what the values are -- "logits", "log_probs" (read as logits: softmax(log p) = p) or
    "probs" (non-negative, rows with a positive sum; scored as the normalized rows: read as they
    are by the cpu backend, converted to log p in bounded chunks of samples for the others). Inputs whose classes are not unit-stride are likewise
    copied chunk by chunk, never whole (docs/contract.md sections 3 and 12).
    """
    kind = check_kind(kind)
    if not _is_array(logits) and isinstance(logits, Iterable):
        return _score_stream(logits, labels, backend, kind)
    x = as_tensor(logits)
    check_logits(x, 3)
    E, N, K = x.shape
    if E == 0:
        raise ValueError("logits: the ensemble has no members (E = 0)")
    if labels is not None:
        labels = check_labels(labels, N, K, x.device)
    if torch.compiler.is_compiling():
        floats, ints = fused_scores(x, labels, backend, kind)  # opaque to the tracer, shaped by its fake
        return Scores.from_columns(floats, ints, E, labels is not None)
    resolved = backends.resolve(backend, x.device)
    if N > 0 and needs_chunks(x, kind, resolved):
        chunk = chunk_samples(E, K, kernel_dtype(x.dtype, kind, resolved))
        return score_chunks(
            view_chunks(x, chunk), num_members=E, num_samples=N, labels=labels, backend=resolved,
            device=x.device, kind=kind, dtype=x.dtype,
        )  # fmt: skip
    # Eagerly the op's wrapper adds nothing but a one-time second of torch._dynamo import.
    try:
        floats, ints = fused(resolved, x, labels, kind)
    except InvalidInput as e:  # probabilities read as they are: the row names what is wrong
        raise e.restated(kind, x[e.member, e.sample] if kind == "probs" else None) from None
    floats, ints = floats.to(x.device), ints.to(x.device)
    return Scores.from_columns(floats, ints, E, labels is not None)


def _score_stream(stream: Iterable, labels, backend: str, kind: str) -> Scores:
    acc = None
    members = 0
    for i, item in enumerate(stream):
        x = as_tensor(item, f"stream item {i}")
        if x.dim() == 2:
            x = x[None]
        check_logits(x, 3, f"stream item {i}")
        if acc is None:
            acc = Accumulator(x.shape[1], x.shape[2], labels=labels, device=x.device, backend=backend, kind=kind)
        elif x.shape[1:] != (acc.num_samples, acc.num_classes):
            raise ValueError(
                f"stream item {i}: shape {tuple(x.shape)} does not match the first item's "
                f"[{acc.num_samples}, {acc.num_classes}]"
            )
        for member in x:
            acc.update(member, start=0)
        members += x.shape[0]
    if acc is None:
        raise ValueError("logits: the stream is empty (no members)")
    if members == 0:
        raise ValueError("logits: the stream's items hold no members (E = 0)")
    scores = acc.finalize()
    # With N = 0 the accumulator cannot know E (its updates were no-ops); the stream does.
    return dataclasses.replace(scores, num_members=members) if acc.num_samples == 0 else scores
