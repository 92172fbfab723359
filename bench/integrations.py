"""Each AL library's own scoring against the ensel adapter that replaces it: time and peak memory.

    python bench/integrations.py [--n 20000] [--e 20] [--k 100] [--repeat 3] [--out bench/results]

One fresh process per (library, implementation, pool size): the ensemble's output is made in the
library's own layout and dtype (float32), then the peak resident memory is reset
(/proc/self/clear_refs) so that only what the scoring call allocates is counted; the call is timed
(median of --repeat). Native and adapter run one after the other at the same size, so their
ratio is a side-by-side figure on a shared machine. Each pair's selections are compared too.

The largest pool each path handles within this machine's memory is projected from the bytes per
sample measured at two pool sizes (input + peak extra must fit in 90% of RAM): a projection,
labelled as such, not a run to the point of failure.
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
import json, os, statistics, sys, time
import numpy as np
import torch
case, impl, n, e, k, repeat = json.loads(sys.argv[1])
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
rng = np.random.default_rng(0)
logits = rng.standard_normal((e, n, k), dtype=np.float32) * 3
layout, kind = case["layout"], case["kind"]
if kind == "probs":
    z = np.exp(logits - logits.max(-1, keepdims=True)); values = z / z.sum(-1, keepdims=True)
elif kind == "log_probs":
    values = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
else:
    values = logits
del logits
x = np.ascontiguousarray(values.transpose(["ENK".index(a) for a in layout]))
del values
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
print(json.dumps({"seconds": statistics.median(times), "peak_extra": peak, "input": x.nbytes,
                  "picked": sorted(int(i) for i in picked)}))
"""


def measure(name: str, impl: str, n: int, e: int, k: int, repeat: int) -> dict:
    arg = json.dumps([CASES[name], impl, n, e, k, repeat])
    env = {key: v for key, v in os.environ.items() if key not in ("TRITON_INTERPRET", "ENSEL_BACKEND")}
    res = subprocess.run([sys.executable, "-c", WORKER, arg], capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--e", type=int, default=20)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--cases", default=",".join(CASES))
    a = p.parse_args()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for name in a.cases.split(","):
        got = {}
        for impl in ("native", "ensel"):
            small = measure(name, impl, a.n, a.e, a.k, a.repeat)
            large = measure(name, impl, 2 * a.n, a.e, a.k, 1) if "error" not in small else {"error": "skipped"}
            got[impl] = (small, large)
        (ns, nl), (es, el) = got["native"], got["ensel"]
        row = {"case": name, "E": a.e, "N": a.n, "K": a.k, "native": ns, "ensel": es}
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
        for impl in ("native", "ensel"):
            row[impl] = {key: v for key, v in row[impl].items() if key != "picked"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# AL libraries: native scoring vs the ensel adapter (E={a.e}, N={a.n}, K={a.k}, float32, "
             f"median of {a.repeat}; {os.cpu_count()} cores, {ram / 2**30:.0f} GiB)", "",
             "| case | native s | ensel s | speedup | native peak extra MB | ensel peak extra MB | input MB | same top-100 "
             "| native largest N (projected) | ensel largest N (projected) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "speedup" not in r:
            lines.append(f"| {r['case']} | {r['native'].get('error', '')} | {r['ensel'].get('error', '')} | | | | | | | |")
            continue
        mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
        big = lambda key: f"{r[key]:,}" if r.get(key) else "-"  # noqa: E731
        lines.append(f"| {r['case']} | {r['native']['seconds']:.3f} | {r['ensel']['seconds']:.3f} | {r['speedup']:.1f}x "
                     f"| {mb(r['native']['peak_extra'])} | {mb(r['ensel']['peak_extra'])} | {mb(r['native']['input'])} "
                     f"| {'yes' if r['same_selection'] else 'NO'} | {big('native_largest_pool_projected')} "
                     f"| {big('ensel_largest_pool_projected')} |")
    (out / "integrations.txt").write_text("\n".join(lines) + "\n")
    (out / "integrations.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
