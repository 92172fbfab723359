"""The benchmark's providers: every way of getting the contract's scores (docs/contract.md section 1)
out of an [E, N, K] logits tensor that the report compares, plus two floors.

Each provider is a plain function `(logits, labels=None) -> result`. Scoring providers return a
dict of per-sample scores (torch tensors, or numpy arrays for `numpy`); the floors (`softmax`,
`memcpy`) return a tensor. `prepare(name, logits, labels)` returns a zero-argument callable that
does exactly the work to be timed: setup that a user does once (torch.compile, the memcpy
destination buffer) happens in `prepare` or in the report's warm-up, never in the timed call.

Inputs of a dtype a provider cannot take natively are converted as a user would
(`logits.float()` before the float32 formulas, `.float().numpy()` for numpy), and that conversion
is part of the provider's time.

- eager       the contract's formulas as users write them: float32 eager PyTorch, softmax
              materialized. "The eager baseline" of bench/README.md.
- compile     the same function under torch.compile (inductor), compiled once per shape/dtype.
- numpy       the formulation active-learning libraries use (baal's heuristics style): softmax
              in numpy, np.mean over the ensemble axis, entropy as p * log(p + eps).
- softmax     torch.softmax(logits, -1) alone: reads the logits and writes as many bytes back.
- reference   ensel.score(..., backend="reference"): float64, softmax materialized, validates.
- cpu         ensel.score(..., backend="cpu"): the fused C++ kernel.
- cpu_stream  ensel.Accumulator, one update per member, then finalize (checkpoint-major).
- cuda, triton                 the same fused call on the GPU backends (bench/gpu_report.py).
- cuda_stream, triton_stream   their Accumulator: one update per member, then finalize.
- memcpy      dst.copy_(logits) into a preallocated buffer: the bandwidth ceiling row (on a GPU,
              a device-to-device copy).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import ensel

# ---------------------------------------------------------------------------------------------
# eager: the contract in float32 eager PyTorch, as a user writes it.


def eager_scores(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    x = logits.float()  # bfloat16/float16 -> float32, as users do
    E, N, K = x.shape
    p = x.softmax(-1)  # [E, N, K], materialized
    pbar = p.mean(0)  # [N, K]
    entropy = -torch.special.xlogy(pbar, pbar).sum(-1)
    mean_entropy = -torch.special.xlogy(p, p).sum(-1).mean(0)
    mutual_info = (entropy - mean_entropy).clamp_min(0)

    votes_for = x.argmax(-1)  # [E, N], first maximum
    counts = torch.zeros(N, K, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, votes_for.T, torch.ones_like(votes_for.T))
    mode = counts.argmax(-1)  # lowest class among the most voted
    mode_votes = counts.gather(1, mode[:, None])[:, 0]

    if K > 1:
        top2 = pbar.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        top1 = top2[:, 0]
    else:
        top1 = pbar[:, 0]
        margin = torch.ones_like(top1)
    out = {
        "entropy": entropy,
        "mean_entropy": mean_entropy,
        "mutual_info": mutual_info,
        "mode": mode,
        "mode_votes": mode_votes,
        "variation_ratio": 1.0 - mode_votes.float() / E,
        "vote_entropy": -torch.special.xlogy(counts.float() / E, counts.float() / E).sum(-1),
        "margin": margin,
        "least_confidence": 1.0 - top1,
    }
    if labels is not None:
        correct = votes_for == labels[None, :]
        out["error_count"] = 1.0 - correct.float().mean(0)
        out["forgetting"] = (correct[:-1] & ~correct[1:]).sum(0)
        out["nll"] = -torch.log(pbar.gather(1, labels[:, None])[:, 0])
    return out


# ---------------------------------------------------------------------------------------------
# compile: the eager function under torch.compile. One compiled wrapper; the report resets
# dynamo between cases so that every case gets its own static-shape graph (the recompile limit
# would otherwise silently send later cases back to eager).

_compiled = None


def _compiled_fn():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_scores, dynamic=False)
    return _compiled


def reset_compile() -> None:
    """Forget every compiled graph (call between cases)."""
    global _compiled
    torch._dynamo.reset()
    _compiled = None


def compile_scores(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return _compiled_fn()(logits, labels)


# ---------------------------------------------------------------------------------------------
# numpy: the formulation of numpy-based active-learning libraries (baal.active.heuristics style),
# written here in our [E, N, K] layout. Single-threaded, as numpy's elementwise ufuncs are.

EPS = 1e-12  # the "+ eps" inside the log; small, so that it does not bias float32 entropies


def _np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    # scipy.special.softmax's recipe
    x_max = np.amax(x, axis=axis, keepdims=True)
    exp_x = np.exp(x - x_max)
    return exp_x / np.sum(exp_x, axis=axis, keepdims=True)


def _np_entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    return -np.sum(p * np.log(p + EPS), axis=axis)


def numpy_scores(logits, labels=None) -> dict[str, np.ndarray]:
    if isinstance(logits, torch.Tensor):
        # numpy has no bfloat16: convert as a user would
        x = logits.numpy() if logits.dtype in (torch.float32, torch.float64) else logits.float().numpy()
    else:
        x = np.asarray(logits)
    y = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    E, N, K = x.shape
    probs = _np_softmax(x, axis=-1)  # [E, N, K]
    expected_p = np.mean(probs, axis=0)  # [N, K]
    entropy = _np_entropy(expected_p)
    mean_entropy = np.mean(_np_entropy(probs), axis=0)
    mutual_info = np.maximum(entropy - mean_entropy, 0.0)

    votes_for = np.argmax(x, axis=-1)  # [E, N], first maximum
    counts = np.bincount((np.arange(N) * K + votes_for).ravel(), minlength=N * K).reshape(N, K)
    mode = np.argmax(counts, axis=-1)
    mode_votes = counts[np.arange(N), mode]

    sort_p = np.sort(expected_p, axis=-1)  # baal's Margin/Certainty sort the probabilities
    margin = sort_p[:, -1] - sort_p[:, -2] if K > 1 else np.ones(N, dtype=x.dtype)
    out = {
        "entropy": entropy,
        "mean_entropy": mean_entropy,
        "mutual_info": mutual_info,
        "mode": mode,
        "mode_votes": mode_votes,
        "variation_ratio": 1.0 - mode_votes / E,
        "vote_entropy": -np.sum(np.where(counts > 0, counts / E * np.log(np.maximum(counts, 1) / E), 0.0), axis=-1),
        "margin": margin,
        "least_confidence": 1.0 - sort_p[:, -1],
    }
    if y is not None:
        correct = votes_for == y[None, :]
        out["error_count"] = 1.0 - correct.mean(axis=0)
        out["forgetting"] = np.sum(correct[:-1] & ~correct[1:], axis=0)
        out["nll"] = -np.log(expected_p[np.arange(N), y] + EPS)
    return out


# ---------------------------------------------------------------------------------------------
# ensel itself, and the floors.


def reference_scores(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return ensel.score(logits, labels, backend="reference").to_dict()


def fused_provider(backend: str) -> Callable:
    def scores(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return ensel.score(logits, labels, backend=backend).to_dict()

    scores.__name__ = f"{backend}_scores"
    return scores


def stream_provider(backend: str) -> Callable:
    def scores(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        E, N, K = logits.shape
        acc = ensel.Accumulator(N, K, labels=labels, backend=backend, device=logits.device, num_members=E)
        for member in logits:  # checkpoint-major: one member's [N, K] logits at a time
            acc.update(member, start=0)
        return acc.finalize().to_dict()

    scores.__name__ = f"{backend}_stream_scores"
    return scores


cpu_scores = fused_provider("cpu")
cpu_stream_scores = stream_provider("cpu")


def softmax_floor(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    return torch.softmax(logits, -1)


def memcpy_floor(logits: torch.Tensor, labels: torch.Tensor | None = None, out: torch.Tensor | None = None):
    if out is None:
        out = torch.empty_like(logits)
    return out.copy_(logits)


PROVIDERS: dict[str, Callable] = {
    "eager": eager_scores,
    "compile": compile_scores,
    "numpy": numpy_scores,
    "softmax": softmax_floor,
    "reference": reference_scores,
    "cpu": cpu_scores,
    "cpu_stream": cpu_stream_scores,
    "memcpy": memcpy_floor,
}
NAMES = tuple(PROVIDERS)  # the CPU report's providers
SCORING = ("eager", "compile", "numpy", "reference", "cpu", "cpu_stream")  # return score dicts

# The GPU report's own (bench/gpu_report.py); eager, compile and memcpy run on the GPU as they are.
GPU_PROVIDERS: dict[str, Callable] = {
    name: make(backend)
    for backend in ("cuda", "triton")
    for name, make in ((backend, fused_provider), (f"{backend}_stream", stream_provider))
}
PROVIDERS.update(GPU_PROVIDERS)
FLOORS = ("softmax", "memcpy")

# Rough peak of extra memory each provider allocates, in units of the logits' size in float32
# (E * N * K * 4 bytes); the report skips a provider where this would not fit in free RAM.
MEMORY_FACTOR = {
    "eager": 3.0,  # float32 copy (non-float32 input) + p + xlogy(p, p)
    "compile": 1.0,
    "numpy": 5.0,  # x - max, exp, p, p + eps, log, p * log: several live temporaries
    "softmax": 1.0,
    "reference": 7.5,  # float64 copy + softmax + xlogy (2x each) + validation masks
    "cpu": 0.0,
    "cpu_stream": 0.0,
    "memcpy": 1.0,
    "cuda": 0.0,
    "triton": 0.0,
    "cuda_stream": 0.0,
    "triton_stream": 0.0,
}


def prepare(name: str, logits: torch.Tensor, labels: torch.Tensor | None = None) -> Callable[[], object]:
    """The zero-argument callable that the benchmarks time for provider `name` on these inputs.

    One-time setup is done here (memcpy's destination buffer, touched once so that its pages
    exist). torch.compile compiles on the first call: warm the callable up before timing it.
    """
    if name == "memcpy":
        out = torch.empty_like(logits)
        out.copy_(logits)  # fault the pages in once
        return lambda: memcpy_floor(logits, labels, out)
    if name == "compile":
        fn = _compiled_fn()
        return lambda: fn(logits, labels)
    fn = PROVIDERS[name]
    return lambda: fn(logits, labels)


def as_numpy_dict(result) -> dict[str, np.ndarray]:
    """A provider's scores as float64/int64 numpy arrays (for agreement checks)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        out[k] = v.astype(np.float64) if v.dtype.kind == "f" else v.astype(np.int64)
    return out
