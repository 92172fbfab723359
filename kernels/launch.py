"""Host side of the Triton kernels: strategy by K, launch configurations, autotuning.

Strategies (docs/contract.md section 8): K <= TILE_MAX_K reads every row once into a register tile
(many samples per program for small K, one or a few rows per program up to TILE_MAX_K);
beyond, rows are walked in chunks of CHUNK_K classes with an online softmax. These thresholds and
MODE_BLOCK_E are module attributes so that tests can shrink them and reach the chunk path (and
the pairwise mode's merge across blocks of members) at small sizes under the interpreter.

Autotuning (GPU only): the fused kernels are wrapped in `triton.autotune`, keyed on K, the label
flag and the dtype; the chosen configuration is logged once per key on the "ensel" logger at
DEBUG level (`logging.getLogger("ensel").setLevel(logging.DEBUG)` plus a handler), and Triton's
own TRITON_PRINT_AUTOTUNING=1 prints it too. The streaming kernels use fixed heuristics: they
update the state in place, so benchmarking configurations would need a state copy per trial.
Under the interpreter (TRITON_INTERPRET=1) every kernel runs one fixed configuration.
"""

from __future__ import annotations

import logging
import os

import torch
import triton

from . import _rowmath
from . import fused as _fused
from . import streaming as _streaming

TILE_MAX_K = 4096  # largest K held as one register tile per row
CHUNK_K = 4096  # classes per chunk beyond TILE_MAX_K
MODE_BLOCK_E = 64  # member argmaxes compared at once by the pairwise mode (large K)
NO_FAILURE = 2**63 - 1

_log = logging.getLogger("ensel")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _tile_configs(block_k: int) -> list[triton.Config]:
    """Candidate (BLOCK_N, num_warps, num_stages) for the fused tile kernel, sized so that nothing
    spills (ptxas for sm_90, bfloat16 with labels): Triton's blocked layout spreads a short row
    over up to 16 threads and gives each thread one logit of many rows, so every per-row value
    (entropy sum, label counters, ...) is held once per row a thread touches: about 20 registers
    per logit a thread holds (4 -> 92 registers, 8 -> 177, 16 -> 255 and spills at K = 10),
    against about 7 for rows of 1024 or more (8 -> 56). num_stages 3 lets Triton prefetch the
    next member's tile; 16 warps only for the widest rows."""
    per_thread = (4, 8) if block_k <= 256 else (8, 16)
    configs = []
    for warps in (4, 8, 16) if block_k >= 2048 else (4, 8):
        for logits in per_thread:
            block_n = logits * 32 * warps // block_k
            if 1 <= block_n <= 1024:
                for stages in (1, 3):
                    configs.append(triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return configs


_TUNED: dict[tuple, object] = {}
_LOGGED: set = set()


def _tuned(kernel, name: str, configs: list[triton.Config], key: list[str], tag):
    cache_key = (name, tag)
    if cache_key not in _TUNED:
        _TUNED[cache_key] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNED[cache_key]


def _log_choice(name: str, tuner, what: str) -> None:
    config = getattr(tuner, "best_config", None)
    if config is not None and (name, what) not in _LOGGED:
        _LOGGED.add((name, what))
        _log.debug("ensel triton %s %s: autotuned %s", name, what, config)


def _fail_buffer(device) -> torch.Tensor:
    return torch.full((1,), NO_FAILURE, dtype=torch.int64, device=device)


def decode_failure(fail: torch.Tensor, num_samples: int) -> tuple[int, int, int]:
    """(status, member, sample) from a kernel's failure key, or (0, -1, -1)."""
    key = int(fail.item())
    if key == NO_FAILURE:
        return 0, -1, -1
    rest, status = divmod(key, 4)
    member, sample = divmod(rest, num_samples)
    return status, member, sample


def _outputs(N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    floats = torch.empty(_rowmath.NUM_FLOAT_FIELDS, N, dtype=torch.float32, device=device)
    ints = torch.empty(_rowmath.NUM_INT_FIELDS, N, dtype=torch.int64, device=device)
    return floats, ints


def fused_scores(x: torch.Tensor, labels: torch.Tensor | None, vote_log: torch.Tensor):
    """floats [9, N], ints [3, N], and the failure (status, member, sample) of [E, N, K] logits
    with unit class stride. `vote_log`: int64 [E + 1] on x's device, the vote_entropy table of
    ensel/_votes.py."""
    E, N, K = x.shape
    floats, ints = _outputs(N, x.device)
    if N == 0:
        return floats, ints, (0, -1, -1)
    fail = _fail_buffer(x.device)
    has_labels = labels is not None
    labels_arg = labels if has_labels else fail  # never read without labels
    is_f64 = x.dtype == torch.float64
    block_k = _pow2(K)
    args = (x, labels_arg, floats, ints, fail, vote_log, E, N, K, x.stride(0), x.stride(1))
    if block_k <= TILE_MAX_K:
        # In-tile offsets are int32 unless a tile of up to 1024 rows may span 2^31 elements.
        wide = 1024 * x.stride(1) + K >= 2**31
        if interpreting():
            block_n = max(1, min(64, 4096 // block_k))
            grid = (triton.cdiv(N, block_n),)
            _fused.fused_tile_kernel[grid](*args, HAS_LABELS=has_labels, IS_F64=is_f64, WIDE_ROWS=wide,
                                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        else:
            tuner = _tuned(_fused.fused_tile_kernel, "fused_tile", _tile_configs(block_k),
                           ["K", "HAS_LABELS", "IS_F64"], block_k)
            tuner[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                *args, HAS_LABELS=has_labels, IS_F64=is_f64, WIDE_ROWS=wide, BLOCK_K=block_k)
            _log_choice("fused_tile", tuner, f"K={K} dtype={x.dtype} labels={has_labels}")
    else:
        row_max = torch.empty(E, N, dtype=torch.float64 if is_f64 else torch.float32, device=x.device)
        inv_sum = torch.empty(E, N, dtype=torch.float32, device=x.device)
        argmax = torch.empty(E, N, dtype=torch.int32, device=x.device)
        chunk = min(CHUNK_K, block_k)
        block_e = min(MODE_BLOCK_E, _pow2(E))
        grid = (N,)
        _fused.fused_chunk_stats_kernel[grid](
            x, labels_arg, floats, ints, fail, row_max, inv_sum, argmax, E, N, K, x.stride(0), x.stride(1),
            HAS_LABELS=has_labels, IS_F64=is_f64, BLOCK_K=chunk,
            num_warps=4 if interpreting() else 8)
        _fused.fused_chunk_finish_kernel[grid](
            x, floats, ints, row_max, inv_sum, argmax, vote_log, E, N, K, x.stride(0), x.stride(1),
            IS_F64=is_f64, BLOCK_K=chunk, BLOCK_E=block_e, num_warps=4 if interpreting() else 8)
    return floats, ints, decode_failure(fail, N)


def stream_update(state, x: torch.Tensor, start: int):
    """Validates one member's [B, K] rows, then (only if all are valid) adds them to `state`.
    Returns the failure (status, member, sample), (0, -1, -1) when applied."""
    B, K = x.shape
    N = state.num_samples
    is_f64 = x.dtype == torch.float64
    block_k = _pow2(K)
    fail = _fail_buffer(x.device)
    check_k = min(block_k, 1024)
    check_n = max(1, min(64, (4096 if interpreting() else 2048) // check_k))
    _streaming.check_kernel[(triton.cdiv(B, check_n),)](
        x, state.members, fail, B, N, K, start, x.stride(0),
        IS_F64=is_f64, BLOCK_N=check_n, BLOCK_K=check_k, num_warps=4)
    failure = decode_failure(fail, N)
    if failure[0] != 0:
        return failure
    has_labels = state.labels is not None
    single = block_k <= TILE_MAX_K
    if single:
        block_n = max(1, min(64, (4096 if interpreting() else 2048) // block_k))
        warps = 4 if block_n * block_k <= 2048 else 8
    else:
        block_n, block_k, warps = 1, min(CHUNK_K, block_k), 8
    _streaming.update_kernel[(triton.cdiv(B, block_n),)](
        x, state.labels if has_labels else fail, state.pbar_sum, state.entropy_sum, state.members,
        state.argmax_history, state.correct, state.last_correct, state.forgetting, state.nll_max,
        state.nll_sum, B, N, K, start, x.stride(0),
        HAS_LABELS=has_labels, IS_F64=is_f64, BLOCK_N=block_n, BLOCK_K=block_k, SINGLE_CHUNK=single,
        num_warps=4 if interpreting() else warps)
    return failure


def stream_finalize(state, num_members: int, vote_log: torch.Tensor):
    """floats [9, N], ints [3, N] from a state in which every sample has seen E = num_members
    members; `vote_log` as for fused_scores."""
    N, K, E = state.num_samples, state.num_classes, num_members
    device = state.pbar_sum.device
    floats, ints = _outputs(N, device)
    has_labels = state.labels is not None
    one_hot = _pow2(K) <= 64
    block_k = _pow2(K) if one_hot else min(_pow2(K), 1024)
    block_n = max(1, min(64, (4096 if interpreting() else 2048) // block_k))
    _streaming.finalize_kernel[(triton.cdiv(N, block_n),)](
        state.pbar_sum, state.entropy_sum, state.argmax_history, state.correct, state.forgetting,
        state.nll_max, state.nll_sum, floats, ints, vote_log, E, N, K,
        HAS_LABELS=has_labels, ONE_HOT_VOTES=one_hot, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_E=min(MODE_BLOCK_E, _pow2(E)), num_warps=4)
    return floats, ints
