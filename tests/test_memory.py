"""The fused path allocates O(N) beyond its input: measured as the peak resident memory of a fresh
process, which a materialized softmax of the same input would raise by gigabytes."""

import json
import subprocess
import sys


PROBE = r"""
import json, resource, sys, torch, ensel
E, N, K = 32, 40_000, 100  # 512 MB of float32 logits
logits = torch.randn(E, N, K)
ensel.score(logits[:, :10], backend=sys.argv[1])  # load code paths and thread stacks first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scores = ensel.score(logits, backend=sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"input_mb": logits.numel() * 4 / 2**20, "extra_mb": (after - before) / 1024}))
"""


def peak_extra_mb(backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, backend], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_fused_cpu_allocates_o_n_beyond_its_input():
    m = peak_extra_mb("cpu")
    # Outputs: 11 fields x N x 8 bytes = 3.4 MB; scratch per thread: O(K + tile x (K + E)).
    assert m["extra_mb"] < 32, m


def test_the_probe_sees_a_materialized_softmax():
    # The same probe on the reference (float64 softmax of the input) must see gigabytes, or the
    # measurement above proves nothing.
    m = peak_extra_mb("reference")
    assert m["extra_mb"] > m["input_mb"], m
