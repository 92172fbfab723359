"""The CPU kernels' instruction-set levels (csrc/cpu/isa.h, ensel/backends/cpu.py): what is
detected, how a level is chosen, and that every level computes the same scores. (The whole
contract suite also runs at every level: the "cpu@level" backends of tests/device_shim.py.)"""

import os
import subprocess
import sys

import pytest
import torch

import ensel
from ensel.backends import cpu
from helpers import DTYPE_IDS, assert_matches_reference

pytestmark = pytest.mark.skipif(not cpu.CpuBackend().available(), reason="ensel._C is not built")

LEVELS = cpu.isa_levels()
DISCRETE = ("mode", "mode_votes", "variation_ratio", "vote_entropy", "error_count", "forgetting")
CONTINUOUS = ("entropy", "mean_entropy", "mutual_info", "margin", "least_confidence", "nll")


@pytest.fixture
def restore_isa():
    previous = cpu.isa()
    yield
    cpu.use_isa(previous)


def test_levels_start_at_baseline_and_the_best_is_in_use():
    assert LEVELS[0] == "baseline"
    assert set(LEVELS) <= set(cpu.ISA_LEVELS)
    assert LEVELS == [level for level in cpu.ISA_LEVELS if level in LEVELS]  # lowest first
    assert cpu.isa() == LEVELS[-1]


def test_what_the_processor_reports_decides_the_levels():
    """x86-64-v3 needs avx2, fma, f16c and bmi2; v4 adds AVX-512 F/BW/CD/DQ/VL (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    v3 = {"avx2", "fma", "f16c", "bmi2"} <= set(flags)
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= set(flags)
    assert ("avx2" in LEVELS) == v3
    assert ("avx512" in LEVELS) == v4


@pytest.mark.parametrize("level", ["sse9", "", "AVX2", 2])
def test_an_unknown_level_is_refused_in_one_line(level, restore_isa):
    with pytest.raises(ValueError, match=r"unknown; choose one of baseline"):
        cpu.use_isa(level)
    assert cpu.isa() == LEVELS[-1]  # unchanged


@pytest.mark.skipif("avx512" in LEVELS, reason="this processor runs every level")
def test_an_unsupported_level_is_refused(restore_isa):
    with pytest.raises(ValueError, match="not supported by this processor"):
        cpu.use_isa("avx512")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_the_environment_variable_picks_the_level():
    code = "import torch, ensel; from ensel.backends import cpu; ensel.score(torch.randn(2, 3, 4), backend='cpu'); print(cpu.isa())"
    res = _run(code, ENSEL_CPU_ISA="baseline")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["baseline"]
    res = _run(code, ENSEL_CPU_ISA="auto")
    assert res.stdout.split() == [LEVELS[-1]], res.stderr


def test_a_bad_environment_variable_fails_the_first_cpu_call_with_its_name():
    res = _run("import torch, ensel; ensel.score(torch.randn(2, 3, 4), backend='cpu')", ENSEL_CPU_ISA="avx3")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "ValueError: ENSEL_CPU_ISA: CPU instruction set 'avx3': unknown; choose one of " + ", ".join(LEVELS)
    )


def _logits(E, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, N, K, generator=g) * 4
    if K > 2:
        x[:, ::3, 0] = x[:, ::3, 1]  # ties for the argmax
        x[:, ::5, K // 2] = -torch.inf  # classes no member can pick
    return x.to(dtype)


# K across the kernels' paths: the lane path (K <= 128) at and around vector widths, the per-row
# path beyond; E across the vote-count table.
SHAPES = [(1, 33, 1), (3, 70, 7), (8, 45, 16), (5, 64, 100), (4, 40, 128), (6, 17, 129), (3, 9, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("E,N,K", SHAPES, ids=lambda v: str(v))
def test_every_level_scores_alike(E, N, K, dtype, restore_isa):
    """Discrete scores bit-identical across levels, continuous ones within the contract's
    tolerance of the reference at every level; fused and streaming alike."""
    logits = _logits(E, N, K, dtype, seed=E * 1000 + K)
    labels = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(K))
    fused, streamed = {}, {}
    for level in LEVELS:
        cpu.use_isa(level)
        fused[level] = ensel.score(logits, labels, backend="cpu")
        acc = ensel.Accumulator(N, K, labels=labels, backend="cpu")
        for e in range(E):
            acc.update(logits[e])
        streamed[level] = acc.finalize()
        assert_matches_reference(fused[level], logits, labels)
        assert_matches_reference(streamed[level], logits, labels)
    first = LEVELS[0]
    for level in LEVELS[1:]:
        for name in DISCRETE:
            assert torch.equal(getattr(fused[level], name), getattr(fused[first], name)), (level, name)
            assert torch.equal(getattr(streamed[level], name), getattr(streamed[first], name)), (level, name)


def _special_halves() -> torch.Tensor:
    """Every finite half, both infinities' neighbours, subnormals and signed zeros: the bit
    patterns F16C and the portable conversion must agree on."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("K", [5, 8, 13, 200])
def test_half_input_scores_as_its_exact_float32_values(level, K, restore_isa):
    """Each level converts halves exactly (F16C where it has it), so half logits score
    bit-identically to the same values handed in as float32, at every level."""
    cpu.use_isa(level)
    values = _special_halves()
    N = values.numel() // K
    halves = values[: N * K].reshape(1, N, K)
    halves = torch.cat([halves, halves.roll(1, dims=1)])  # E = 2
    a = ensel.score(halves, backend="cpu")
    b = ensel.score(halves.float(), backend="cpu")
    for name in DISCRETE[:4] + CONTINUOUS[:-1]:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_invalid_halves_are_found_at_every_level(level, bad, message, restore_isa):
    cpu.use_isa(level)
    x = torch.zeros(3, 40, 24, dtype=torch.float16)
    x[2, 17, 9] = bad
    with pytest.raises(ValueError, match=rf"{message} logit at member 2, sample 17"):
        ensel.score(x, backend="cpu")
