"""Each AL library's own scoring against the ensel adapter that replaces it: time and peak memory.

    python bench/integrations.py [--n 20000] [--e 20] [--k 100] [--repeat 3] [--out bench/results]

One fresh process per (library, implementation, pool size): the ensemble's output is made in the
library's own layout and dtype (float32), then the peak resident memory is reset
(/proc/self/clear_refs) so that only what the scoring call allocates is counted; the call is timed
(median of --repeat). Native and adapter run one after the other at the same size, so their
ratio is a side-by-side figure on a shared machine. Each pair's selections are compared too.

The largest pool each path handles is measured by runs to failure under a memory cap
(`--cap-gib`, RLIMIT_DATA, which counts the input and everything the scoring allocates: doubling
N until a run fails for lack of memory, then bisecting), and projected to this machine's RAM from
the bytes per sample measured at two pool sizes (input + peak extra in 90% of RAM), labelled as a
projection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (library module, what is timed: code with `x` the input), the input's layout and kind.
CASES = {
    "baal BALD": dict(
        layout="NKE", kind="logits",
        native="from baal.active.heuristics import BALD\nh = BALD()\nrun = lambda: h.compute_score(x)",
        ensel="from ensel.integrations.baal import BALD\nh = BALD()\nrun = lambda: h.compute_score(x)",
        pick="lambda s: np.argsort(-np.asarray(s), kind='stable')[:100]",
    ),
    "scikit-activeml KL_divergence": dict(
        layout="ENK", kind="probs",
        # average_kl_divergence writes into its argument: it gets a fresh copy, made before the
        # peak is reset (and not timed), so the copy is not charged to it.
        native="from skactiveml.pool import average_kl_divergence\nrun = lambda: average_kl_divergence(x.copy())",
        ensel="from ensel.integrations.skactiveml import committee_utilities\nrun = lambda: committee_utilities(x)",
        pick="lambda s: np.argsort(-np.asarray(s), kind='stable')[:100]",
    ),
    "small-text BALD": dict(
        layout="NEK", kind="probs",
        native="from small_text.query_strategies.bayesian import _bald\nrun = lambda: _bald(x)",
        # What ensel.integrations.small_text.BALD scores: BALD of the [N, k, C] probabilities.
        ensel="import ensel, torch\nt = torch.from_numpy(x).permute(1, 0, 2)\n"
              "run = lambda: ensel.score(t, kind='probs').mutual_info",
        pick="lambda s: np.argsort(-np.asarray(s), kind='stable')[:100]",
    ),
    "scikit-activeml US entropy": dict(
        # One model's [n, C] probabilities (what UncertaintySampling scores): E = 1.
        layout="ENK", kind="probs", members=1,
        native="from skactiveml.pool import uncertainty_scores\nrun = lambda: uncertainty_scores(x[0], method='entropy')",
        ensel="from ensel.integrations.skactiveml import uncertainty_utilities\n"
              "run = lambda: uncertainty_utilities(x[0], 'entropy')",
        pick="lambda s: np.argsort(-np.asarray(s), kind='stable')[:100]",
    ),
    "batchbald_redux get_bald_batch": dict(
        layout="NEK", kind="log_probs",
        native="import gc, torch\nfrom batchbald_redux.batchbald import get_bald_batch\nt = torch.from_numpy(x)\n"
               "run = lambda: get_bald_batch(t, 100).indices",
        ensel="import torch\nfrom ensel.integrations.batchbald import get_bald_batch\nt = torch.from_numpy(x)\n"
              "run = lambda: get_bald_batch(t, 100).indices",
        pick="lambda s: np.asarray(s)",
    ),
}

WORKER = r"""
import json, os, resource, statistics, sys, time
case, impl, n, e, k, repeat, cap = json.loads(sys.argv[1])
if cap:  # bytes of data segment (heap and private mappings: every array) this process may hold
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
import numpy as np
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
e = case.get("members", e)
layout, kind = case["layout"], case["kind"]
sizes = {"E": e, "N": n, "K": k}

def is_oom(exc):
    text = str(exc)
    # (EAGAIN: a thread whose stack the cap leaves no room for)
    return isinstance(exc, MemoryError) or any(
        s in text for s in ("can't allocate memory", "out of memory", "Resource temporarily unavailable"))

# The libraries first (their shared objects are mapped memory the cap counts too), then the input.
for line in case.get(impl, "").splitlines():
    if line.startswith(("import ", "from ")):
        exec(line)
stage = "input"
try:
    # The input in the library's layout, made chunk by chunk of samples so that making it costs
    # no more than the input itself (the memory cap counts it).
    x = np.empty([sizes[a] for a in layout], dtype=np.float32)
    view = x.transpose([layout.index(a) for a in "ENK"])
    rng = np.random.default_rng(0)
    step = max(1, (16 << 20) // (4 * e * k))
    for lo in range(0, n, step):
        logits = rng.standard_normal((e, min(step, n - lo), k), dtype=np.float32) * 3
        logits -= logits.max(-1, keepdims=True)
        if kind == "probs":
            z = np.exp(logits); logits = z / z.sum(-1, keepdims=True)
        elif kind == "log_probs":
            logits -= np.log(np.exp(logits).sum(-1, keepdims=True))
        view[:, lo : lo + logits.shape[1]] = logits
    del logits
    if impl == "input":  # the input alone: where no implementation can go further
        print(json.dumps({"seconds": 0.0, "peak_extra": 0, "input": x.nbytes, "picked": []}))
        sys.exit(0)
    stage = "scoring"
    exec(case[impl])
    pick = eval(case["pick"])
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    run()  # warm: imports, first-call costs
    times = []
    peak = 0
    for _ in range(repeat):
        before = rss()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak restarts from here
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        peak = max(peak, hwm() - before)
        picked = pick(out.numpy() if hasattr(out, "numpy") else out)
except Exception as exc:
    if not is_oom(exc):
        raise
    print(json.dumps({"oom": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "stage": stage}))
    sys.exit(0)
print(json.dumps({"seconds": statistics.median(times), "peak_extra": peak, "input": x.nbytes,
                  "picked": sorted(int(i) for i in picked)}))
"""


def measure(name: str, impl: str, n: int, e: int, k: int, repeat: int, cap: int = 0) -> dict:
    arg = json.dumps([CASES[name], impl, n, e, k, repeat, cap])
    env = {key: v for key, v in os.environ.items() if key not in ("TRITON_INTERPRET", "ENSEL_BACKEND")}
    res = subprocess.run([sys.executable, "-c", WORKER, arg], capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def largest_under_cap(name: str, impl: str, start: int, e: int, k: int, cap: int, steps: int) -> dict:
    """The largest pool N that runs under a `cap`-byte memory limit (RLIMIT_DATA: the input and
    everything the scoring allocates), found by doubling from `start` until a run fails for lack
    of memory, then `steps` bisections: a run to failure, not a projection."""
    lo, hi, failure = 0, None, None
    tries = 0
    while hi is None or tries < steps:  # doubling until the first failure, then `steps` bisections
        n = 2 * lo if hi is None else (lo + hi) // 2
        n = n or start
        if hi is not None:
            tries += 1
        got = measure(name, impl, n, e, k, 1, cap)
        if "error" in got:
            return {"error": got["error"]}
        if "oom" in got:
            hi, failure = n, got
        else:
            lo = n
    return {"largest_ok": lo, "smallest_failed": hi, "failure": failure["oom"], "failed_in": failure["stage"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--e", type=int, default=20)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cap-gib", type=float, default=4.0, help="memory cap of the runs to failure (0: none)")
    p.add_argument("--cap-steps", type=int, default=4, help="bisection steps after the first failure")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--update", action="store_true",
                   help="replace only these cases' rows in the existing results (the others are kept as measured)")
    a = p.parse_args()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cap = int(a.cap_gib * 2**30)
    rows = []
    for name in a.cases.split(","):
        got = {}
        for impl in ("native", "ensel"):
            small = measure(name, impl, a.n, a.e, a.k, a.repeat)
            large = measure(name, impl, 2 * a.n, a.e, a.k, 1) if "error" not in small else {"error": "skipped"}
            got[impl] = (small, large)
        (ns, nl), (es, el) = got["native"], got["ensel"]
        E = CASES[name].get("members", a.e)
        row = {"case": name, "E": E, "N": a.n, "K": a.k, "native": ns, "ensel": es}
        if "error" not in ns and "error" not in es:
            row["speedup"] = ns["seconds"] / es["seconds"]
            row["same_selection"] = ns["picked"] == es["picked"]
            for impl, (s, big) in got.items():
                if "error" in big:
                    continue
                per_sample = (big["input"] + big["peak_extra"] - s["input"] - s["peak_extra"]) / a.n
                fixed = s["input"] + s["peak_extra"] - per_sample * a.n
                row[f"{impl}_bytes_per_sample"] = per_sample
                row[f"{impl}_largest_pool_projected"] = int((0.9 * ram - max(fixed, 0)) / per_sample) if per_sample > 0 else None
                if cap:
                    row[f"{impl}_under_cap"] = largest_under_cap(name, impl, a.n, E, a.k, cap, a.cap_steps)
        if cap and "speedup" in row:
            row["input_under_cap"] = largest_under_cap(name, "input", a.n, E, a.k, cap, a.cap_steps)
        for impl in ("native", "ensel"):
            row[impl] = {key: v for key, v in row[impl].items() if key != "picked"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.update and (out / "integrations.json").is_file():
        fresh = {r["case"]: r for r in rows}
        kept = json.loads((out / "integrations.json").read_text())
        rows = [fresh.pop(r["case"], r) for r in kept] + list(fresh.values())
    lines = [f"# AL libraries: native scoring vs the ensel adapter (E={a.e} unless noted, N={a.n}, K={a.k}, float32, "
             f"median of {a.repeat}; {os.cpu_count()} cores, {ram / 2**30:.0f} GiB)", "",
             f"Largest N under a {a.cap_gib:g} GiB cap: runs to failure (RLIMIT_DATA; the input counts), "
             f"bisected to within 1/{2 ** a.cap_steps} of the first failing size; \"input alone\": the largest N whose "
             "input fits next to the imports, the limit of any implementation. "
             "Projected: input + peak extra in 90% of RAM, from the bytes per sample at N and 2N.", "",
             "| case | native s | ensel s | speedup | native peak extra MB | ensel peak extra MB | input MB | same top-100 "
             f"| native largest N, {a.cap_gib:g} GiB cap | ensel largest N, {a.cap_gib:g} GiB cap | input alone "
             "| native largest N (projected) | ensel largest N (projected) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        case = r["case"] + (f" (E={r['E']})" if r["E"] != a.e else "")
        if "speedup" not in r:
            lines.append(f"| {case} | {r['native'].get('error', '')} | {r['ensel'].get('error', '')} | | | | | | | | | | |")
            continue
        mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
        big = lambda key: f"{r[key]:,}" if r.get(key) else "-"  # noqa: E731

        def capped(impl):
            c = r.get(f"{impl}_under_cap")
            if not c:
                return "-"
            if "error" in c:
                return c["error"]
            return f"{c['largest_ok']:,}" + (" (then the input itself)" if c["failed_in"] == "input" else "")

        lines.append(f"| {case} | {r['native']['seconds']:.3f} | {r['ensel']['seconds']:.3f} | {r['speedup']:.1f}x "
                     f"| {mb(r['native']['peak_extra'])} | {mb(r['ensel']['peak_extra'])} | {mb(r['native']['input'])} "
                     f"| {'yes' if r['same_selection'] else 'NO'} | {capped('native')} | {capped('ensel')} | {capped('input')} "
                     f"| {big('native_largest_pool_projected')} | {big('ensel_largest_pool_projected')} |")
    (out / "integrations.txt").write_text("\n".join(lines) + "\n")
    (out / "integrations.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
