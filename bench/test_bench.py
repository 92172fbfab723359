"""pytest-benchmark microbenchmarks of every provider (bench/providers.py) on a small and a medium
case. Not part of `make test` (tests/ is the test folder); run them with

    .venv/bin/python -m pytest bench/test_bench.py --benchmark-only

(about a minute on 2 cores). Every scoring provider's result is checked against the float64
reference after it is timed, so that a benchmark never times a wrong formulation. The GB/s report
over the large cases is bench/report.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ensel
import providers as P

CASES = {
    # name: (E, N, K, dtype)
    "small-f32": (8, 2_000, 10, torch.float32),
    "medium-f32": (16, 10_000, 100, torch.float32),  # 64 MB of logits
    "medium-bf16": (16, 10_000, 100, torch.bfloat16),
}
ROUNDS = {"reference": 3}  # the float64 reference is slow: fewer rounds


def _logits(E, N, K, dtype):
    g = torch.Generator().manual_seed(E * 1000 + K)
    x = torch.randn(E, N, K, generator=g)
    x.add_(torch.randn(N, K, generator=g).mul_(2.0))
    return x.to(dtype)


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(case):
        if case not in cache:
            E, N, K, dtype = CASES[case]
            x = _logits(E, N, K, dtype)
            cache[case] = (x, ensel.reference_scores(x))
        return cache[case]

    return get


def _check_against_reference(name, result, ref, K):
    got = P.as_numpy_dict(result)
    want = P.as_numpy_dict(ref)
    # numpy's p * log(p + eps) in float32 and the float32 formulations sit within a loose bound
    # of the float64 reference; the discrete scores must match exactly.
    atol = 1e-4 * (1 + np.log(K))
    for field, w in want.items():
        assert field in got, f"{name}: no {field}"
        if w.dtype.kind == "f":
            np.testing.assert_allclose(got[field], w, atol=atol, rtol=0, err_msg=f"{name}: {field}")
        else:
            np.testing.assert_array_equal(got[field], w, err_msg=f"{name}: {field}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", P.NAMES)
def test_provider(benchmark, inputs, name, case):
    x, ref = inputs(case)
    E, N, K = x.shape
    if name == "compile":
        P.reset_compile()  # a fresh static-shape graph for this case
    fn = P.prepare(name, x, None)
    fn()  # compile / first touch, outside the timing
    benchmark.group = f"{case} E={E} N={N} K={K}"
    benchmark.extra_info.update(E=E, N=N, K=K, dtype=str(x.dtype), bytes=x.numel() * x.element_size())
    result = benchmark.pedantic(fn, rounds=ROUNDS.get(name, 5), iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = x.numel() * x.element_size() / benchmark.stats.stats.median / 1e9
    if name in P.SCORING:
        _check_against_reference(name, result, ref, K)


def test_providers_agree_with_labels():
    """Not a benchmark: the label scores of every scoring provider, on a tiny input with -inf."""
    E, N, K = 5, 300, 13
    x = _logits(E, N, K, torch.float32)
    x[1, 2, 4] = float("-inf")
    y = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(3))
    ref = ensel.reference_scores(x, y)
    for name in P.SCORING:
        if name == "compile":
            P.reset_compile()
        _check_against_reference(name, P.prepare(name, x, y)(), ref, K)
