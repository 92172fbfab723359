"""ensel heuristics for baal 2.1 (`baal.active.heuristics`), drop-in inside `ActiveLearningLoop`.

Plug-in point: a heuristic is an `AbstractHeuristic` whose `compute_score(predictions,
target_predictions=None)` turns predictions `[N, C, ..., I]` (samples, classes, any extra axes,
MC-dropout iterations or ensemble members *last*; what `ModelWrapper.predict_on_dataset` returns:
raw outputs, i.e. logits) into scores `[N, ...]`. `BALD`, `Entropy`, `Margin` and `Certainty` here
are subclasses of baal's own classes that override `compute_score` only (and let torch tensors
through, see below): baal's `reduction`, `shuffle_prop`, `reverse`, its non-finite replacement,
its ranking (`reorder_indices`: `np.argsort`, reversed for high-first heuristics) and its generator
handling are inherited, untouched. So `ActiveLearningLoop(dataset, wrapper.predict_on_dataset,
heuristic=ensel.integrations.baal.BALD(), ...)` runs as before, with ensel's one-pass kernels.

Logits or probabilities (`kind=None`, the default): exactly baal's `to_prob` test, on the array
baal applies it to (the predictions for BALD; their mean over iterations for Entropy and Margin,
which baal averages first), per generator batch as in baal: the values are probabilities when
`min >= 0`, `max <= 1` and `np.allclose(values.sum(1), 1)` (rtol 1e-5, atol 1e-8), else logits.
`kind="logits" | "log_probs" | "probs"` says it instead and skips the test (no extra pass).

Definitions. `definition="baal"` (the default) reproduces baal's numbers, for drop-in parity;
`definition="ensel"` scores ensel's ensemble definitions (docs/contract.md section 1):

    heuristic  (acquire)   definition="baal" (default, = native)          definition="ensel"
    BALD       high        H(pbar) - mean_i H(p_i), not clipped            max(that, 0) (mutual_info)
    Entropy    high        logits: H(softmax(mean_i l_i)); probs: H(pbar)   H(pbar)
    Margin     low         logits: margin of softmax(mean_i l_i);           pbar_(1) - pbar_(2)
                           probs: margin of pbar
    Certainty  low         max_c mean_i x_i,c of the raw values (logits:    max_c pbar_c
                           the largest mean logit, no softmax)

with p_i = softmax(l_i) the i-th iteration's probabilities (or the given probabilities, normalized)
and pbar = mean_i p_i; natural logs, 0 log 0 = 0.

Known differences from the native heuristics, each tested in tests/test_integration_baal.py:

- Entropy and Margin on logits: baal averages the logits over iterations *before* the softmax
  (its `singlepass` decorator runs before `requireprobs`), so it scores the softmax of the mean
  logit, not the ensemble's mean probability. The default reproduces it (ensel scores the mean
  logits as a single member: identical selections); `definition="ensel"` scores H(pbar) and the
  margin of pbar, which is what baal itself computes when handed probabilities.
- Certainty has no softmax at all in baal: on logits it ranks by the largest mean logit. The
  default reproduces it (a plain max of the mean, computed on the input's device: there is nothing
  for a fused kernel to do); `definition="ensel"` ranks by max pbar (= 1 - least_confidence).
- BALD: baal does not clip at 0; neither does the default (near-zero scores keep their sign, as
  natively); `definition="ensel"` clips (ensel's mutual_info).
- Values: ensel computes in float32 in one fused pass; baal in the input dtype with numpy/scipy.
  Scores agree to about 1e-6; selections are identical except where two samples' scores are
  within that of each other (a near-tie can swap). Scores come back float32 (baal: input dtype).
- Invalid values: baal scores NaN/+inf predictions and replaces the non-finite scores (warning);
  ensel refuses them first (ValueError naming the member and sample). `-inf` logits are valid.
  `Certainty(definition="baal")` computes baal's own expression, so it behaves as baal does.
- One output per sample (C = 1): baal applies a sigmoid and scores -p log p; refused here
  (ValueError), except by `Certainty(definition="baal")`, which needs no probabilities. Two-class
  models should output two logits.
- Extra axes `[N, C, ..., I]` (e.g. segmentation): scored per position, giving `[N, ...]`, then
  baal's `reduction` as natively; the positions are flattened into the samples chunk by chunk.
- Memory: the kernels read unit-stride class rows, and baal's classes are strided (iterations
  last), so the predictions are transposed chunk by chunk into one reused 16 MiB buffer (numpy's
  copy on the host: about ten times faster than torch's for this transpose), never whole. baal
  itself materializes several [N, C, ..., I] temporaries (softmax, xlogy).
- Torch tensors: baal calls `.numpy()` on a tensor (which fails on CUDA, bfloat16 or
  `requires_grad`); these heuristics score it where it is. On CUDA the `[N, C, I]` block never
  leaves the device; the `[N]` scores come back, as baal's ranking (numpy) needs them.
- Generators (`predict_on_dataset_generator`): baal scores each batch on its own and
  concatenates; each batch holds every iteration of its B samples, a complete `[B, C, I]` block,
  so each is one fused call (no `ensel.Accumulator`, which would need N up front and hold K floats
  per sample for nothing). The logits/probabilities test runs per batch, as in baal.
- Ties: the ranking is baal's own (`np.argsort`, not stable, reversed for BALD and Entropy);
  ensel's `Scores.top` (stable, lowest index first) is not used.
- Not ensel's and not provided: `Variance` (variance of the raw outputs), `BatchBALD`, `EPIG`,
  `Random`, `Precomputed`, `PowerSampling` (which wraps any heuristic, these included).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._inputs import as_tensor, check_kind
from ._common import require, scores_of

_heuristics = require("baal.active.heuristics.heuristics", "baal")
DEPRECATED = _heuristics.DEPRECATED
_require_single_item = _heuristics.require_single_item

__all__ = ["BALD", "Entropy", "Margin", "Certainty"]

DEFINITIONS = ("baal", "ensel")

# The most values of one chunk of samples copied at once into the kernels' layout (4 Mi values:
# 16 MiB of float32), and the buffer it is copied into, reused from chunk to chunk.
_CHUNK_VALUES = 1 << 22


class _Held:
    """A torch tensor carried through baal's `get_uncertainties`, which would call `.numpy()` on
    it (a host copy of a CUDA tensor; an error for bfloat16 or requires_grad)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _as_predictions(predictions, min_dim: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """The predictions as a torch view (never a copy) and, where the values live on the host in
    a dtype numpy has, as the numpy array baal itself would compute with."""
    x = predictions.tensor if isinstance(predictions, _Held) else predictions
    t = as_tensor(x, "predictions").detach()
    if not t.dtype.is_floating_point:
        raise TypeError(f"predictions: expected floating-point values, got {t.dtype}")
    if t.dim() < min_dim:
        shape = "[N, C, ..., I] (samples, classes, ..., iterations)" if min_dim == 3 else "[N, C, ...]"
        raise ValueError(f"predictions: expected at least {min_dim} axes {shape}, got shape {tuple(t.shape)}")
    arr = x if isinstance(x, np.ndarray) else None
    if arr is None and t.device.type == "cpu" and t.dtype != torch.bfloat16:
        arr = t.numpy()  # zero-copy: what baal's own `.numpy()` gives
    return t, arr


def _baal_kind(t: torch.Tensor, arr: np.ndarray | None) -> str:
    """baal's `to_prob` test (baal/utils/array_utils.py): "probs" where it leaves the values as
    they are, "logits" where it applies a softmax over axis 1. On the host it is numpy's own
    expressions on baal's own array; on a device, the same in torch (min and max are exact in any
    order; only the class sums' rounding can differ, at sums within an ulp of 1 +- 1e-5)."""
    if arr is not None:
        not_bounded = np.min(arr) < 0 or np.max(arr) > 1.0  # NaN compares False, as in baal
    else:
        lo, hi = torch.aminmax(t)
        not_bounded = bool(lo < 0) or bool(hi > 1.0)
    if not_bounded:
        return "logits"
    if t.shape[1] == 1:  # not multiclass: baal leaves bounded values alone
        return "probs"
    if arr is not None:
        sum_to_one = bool(np.allclose(arr.sum(1), 1))
    else:
        sums = t.sum(1)
        sum_to_one = bool(torch.allclose(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-8))
    return "probs" if sum_to_one else "logits"


def _by_position(
    t: torch.Tensor, arr: np.ndarray | None, kind: str, names: tuple[str, ...], backend: str
) -> list[np.ndarray]:
    """ensel's fields `names` of predictions [N, C, *S, I] (I members), each [N, *S] float32 on the
    host. Every position of S is a sample of its own."""
    N, C, *S, I = t.shape
    positions = math.prod(S)
    if arr is None:
        if not S:  # a permuted view: ensel reads it in bounded chunks on the input's device
            s = scores_of(t, "NKE", kind, backend=backend)
            return [getattr(s, name).cpu().numpy() for name in names]
        moved = t.movedim(1, -1)  # [N, *S, I, C]
    else:
        moved = np.moveaxis(arr, 1, -1)
    out = [np.empty(N * positions, dtype=np.float32) for _ in names]
    step = max(1, _CHUNK_VALUES // max(1, positions * C * I))
    buffer = None
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        chunk = moved[lo:hi]
        if arr is None:
            block = chunk.reshape((hi - lo) * positions, I, C)  # a copy when S is not mergeable
        elif chunk.flags.c_contiguous:
            block = torch.from_numpy(chunk).view((hi - lo) * positions, I, C)
        else:
            # The kernels read unit-stride class rows: the chunk goes to [n, *S, I, C], sample-major
            # (numpy's copy of this transpose reads the input in order: several times torch's).
            if buffer is None:
                buffer = np.empty((min(step, N), *S, I, C), dtype=arr.dtype)
            np.copyto(buffer[: hi - lo], chunk)
            block = torch.from_numpy(buffer[: hi - lo]).view((hi - lo) * positions, I, C)
        s = scores_of(block, "NEK", kind, backend=backend)
        for o, name in zip(out, names):
            o[lo * positions : hi * positions] = getattr(s, name).cpu().numpy()
    return [o.reshape(N, *S) for o in out]


class _EnselHeuristic:
    """What the four heuristics share: their options, torch tensors kept where they are, and the
    checks of what they are handed. Mixed in before baal's class, which keeps everything else."""

    _needs_iterations = False

    def _setup(self, kind, definition, backend) -> None:
        self.kind = None if kind is None else check_kind(kind)
        if definition not in DEFINITIONS:
            raise ValueError(f"definition={definition!r}: expected one of {', '.join(map(repr, DEFINITIONS))}")
        self.definition = definition
        self.backend = backend

    def get_uncertainties(self, predictions, target_predictions=None):
        """baal's `get_uncertainties` (compute_score, reduction, non-finite replacement), with a
        torch tensor handed to compute_score as it is instead of through `.numpy()`."""
        if isinstance(predictions, torch.Tensor):
            predictions = _Held(predictions)
        return super().get_uncertainties(predictions, target_predictions=target_predictions)

    def _prepare(self, predictions, classes_needed: bool = True):
        t, arr = _as_predictions(predictions, 3 if self._needs_iterations else 2)
        if classes_needed and t.shape[1] < 2:
            raise ValueError(
                f"predictions: {type(self).__name__} needs C >= 2 classes on axis 1, got shape "
                f"{tuple(t.shape)} (baal's single-output sigmoid case is not supported: output one "
                f"logit per class)"
            )
        if t.dim() == 2:  # a single prediction per sample: one iteration
            t, arr = t[..., None], None if arr is None else arr[..., None]
        return t, arr

    def _empty(self, t: torch.Tensor) -> np.ndarray:
        return np.empty((0, *t.shape[2:-1]), dtype=np.float32)

    def _members(self, t, arr, names):
        """Fields of every iteration as an ensemble member (BALD, definition="ensel")."""
        kind = self.kind or _baal_kind(t, arr)
        return _by_position(t, arr, kind, names, self.backend)

    def _mean_member(self, t, arr, name):
        """A field of the mean over iterations, scored as a single member: baal's `singlepass`
        then `requireprobs`, with the logits/probabilities test on the mean, as in baal."""
        if arr is not None:  # baal's own expression on baal's own array
            m_arr = np.asarray(arr.mean(-1))[..., None]  # [N, C, *S, 1]
            m = torch.from_numpy(m_arr)
        else:
            m_arr, m = None, t.mean(-1, keepdim=True)
        kind = self.kind or _baal_kind(m, m_arr)
        return _by_position(m, m_arr, kind, (name,), self.backend)[0]


class BALD(_EnselHeuristic, _heuristics.BALD):
    """BALD (Houlsby et al. 2011): H(pbar) - mean_i H(p_i), high first (reverse=True).

    Plug-in point: baal's `BALD`, same arguments (`shuffle_prop`, `reduction`) plus `kind`
    (None: baal's to_prob test; "logits", "log_probs" or "probs"), `definition` ("baal": not
    clipped, as natively; "ensel": clipped at 0) and `backend` (ensel's). Predictions
    [N, C, ..., I], iterations last; scores [N, ...] float32."""

    _needs_iterations = True

    def __init__(self, shuffle_prop=DEPRECATED, reduction="none", *, kind=None, definition="baal", backend="auto"):
        super().__init__(shuffle_prop=shuffle_prop, reduction=reduction)
        self._setup(kind, definition, backend)

    @_require_single_item
    def compute_score(self, predictions, target_predictions=None):
        t, arr = self._prepare(predictions)
        if t.shape[0] == 0:
            return self._empty(t)
        if self.definition == "ensel":
            return self._members(t, arr, ("mutual_info",))[0]
        entropy, mean_entropy = self._members(t, arr, ("entropy", "mean_entropy"))
        if t.shape[-1] == 1:  # one iteration: H(p) - H(p) = 0 exactly, as natively (all ties)
            return np.zeros_like(entropy)
        return entropy - mean_entropy


class _OneScore(_EnselHeuristic):
    """A heuristic that is one ensel field: of the mean member (definition="baal") or of the
    ensemble (definition="ensel"). Subclasses name the field."""

    field: str

    def __init__(self, shuffle_prop=DEPRECATED, reduction="none", *, kind=None, definition="baal", backend="auto"):
        super().__init__(shuffle_prop=shuffle_prop, reduction=reduction)
        self._setup(kind, definition, backend)

    @_require_single_item
    def compute_score(self, predictions, target_predictions=None):
        t, arr = self._prepare(predictions)
        if t.shape[0] == 0:
            return self._empty(t)
        if self.definition == "ensel":
            return self._members(t, arr, (self.field,))[0]
        return self._mean_member(t, arr, self.field)


class Entropy(_OneScore, _heuristics.Entropy):
    """Predictive entropy, high first (reverse=True). definition="baal" (default): baal's
    H(softmax(mean_i l_i)) on logits, H(pbar) on probabilities; "ensel": H(pbar), pbar the mean
    over iterations of each one's probabilities. Arguments as baal's `Entropy` plus `kind`,
    `definition`, `backend` (see `BALD`)."""

    field = "entropy"


class Margin(_OneScore, _heuristics.Margin):
    """Margin between the two most probable classes, low first (reverse=False).
    definition="baal" (default): of softmax(mean_i l_i) on logits, of pbar on probabilities;
    "ensel": pbar_(1) - pbar_(2). Arguments as baal's `Margin` plus `kind`, `definition`,
    `backend` (see `BALD`)."""

    field = "margin"


class Certainty(_EnselHeuristic, _heuristics.Certainty):
    """Certainty, low first (reverse=False). definition="baal" (default): baal's
    max_c mean_i x_i,c of the raw values, no softmax (on logits, the largest mean logit), in the
    input's dtype, on its device; "ensel": max_c pbar_c = 1 - least_confidence. Arguments as
    baal's `Certainty` plus `kind`, `definition`, `backend` (see `BALD`)."""

    def __init__(self, shuffle_prop=DEPRECATED, reduction="none", *, kind=None, definition="baal", backend="auto"):
        super().__init__(shuffle_prop=shuffle_prop, reduction=reduction)
        self._setup(kind, definition, backend)

    @_require_single_item
    def compute_score(self, predictions, target_predictions=None):
        t, arr = self._prepare(predictions, classes_needed=self.definition == "ensel")
        if t.shape[0] == 0:
            return self._empty(t)
        if self.definition == "ensel":
            return 1.0 - self._members(t, arr, ("least_confidence",))[0]
        if arr is not None:  # baal's own expression on baal's own array
            return np.asarray(np.max(arr.mean(-1), axis=1))
        best = t.mean(-1).amax(1)
        return (best.float() if best.dtype == torch.bfloat16 else best).cpu().numpy()
