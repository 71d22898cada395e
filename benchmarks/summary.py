"""Print a short table from benchmark JSON records: `python -m benchmarks.summary a.json b.json ...`."""
from __future__ import annotations

import json
import sys


def summarize(paths: list[str]) -> str:
    lines = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        m = r["machine"]
        where = m.get("gpu") or m.get("cpu")
        lines.append(f"{r['case']['describe']} on {where} (torch {m['torch']}); baseline: {r['baseline']}")
        peak = r.get("peak")
        if peak:
            lines.append(f"  peak {peak['gflops']:.0f} GFLOP/s ({peak['method']}); one forward {r['flops'] / 1e9:.1f} GFLOP")
        lines.append(f"  {'variant':18s} {'median ms':>10s} {'vs eager':>9s} {'vs recipe':>9s} {'cold s':>7s} {'rel L2':>8s} "
                     f"{'% peak':>7s}")
        for v in r["variants"]:
            if v.get("error") or v.get("median_ms") is None:
                lines.append(f"  {v['name']:18s} FAILED: {(v.get('error') or 'no timings')[:90]}")
                continue
            cold = v.get("compile_cold_s")
            ratio = [("-" if x is None else f"{x:.2f}x") for x in (v.get("speedup_vs_eager"), v.get("speedup_vs_recipe"))]
            lines.append(f"  {v['name']:18s} {v['median_ms']:10.2f} {ratio[0]:>9s} {ratio[1]:>9s} "
                         f"{'-' if cold is None else f'{cold:.0f}':>7s} {v.get('rel_l2_err', float('nan')):8.1e} "
                         f"{'-' if v.get('percent_of_peak') is None else format(v['percent_of_peak'], '.0f') + '%':>7s}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1:]))
