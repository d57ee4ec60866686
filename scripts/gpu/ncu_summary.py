"""Sums Nsight Compute's per-kernel durations (`ncu --csv --metrics gpu__time_duration.sum`)
over whole decode steps: GPU time per step, and which kernels take it.

    python3 ncu_summary.py ncu.csv
"""
import collections
import csv
import sys

rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r.get("Metric Name") == "gpu__time_duration.sum"]
unit = rows[0]["Metric Unit"] if rows else "ns"
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[unit]
# A decode step starts with the embedding lookup: count whole steps only.
starts = [i for i, r in enumerate(rows) if r["Kernel Name"].startswith("embed_rows")]
steps = len(starts) - 1
if steps < 1:
    sys.exit(f"fewer than two step starts among {len(rows)} kernels")
window = rows[starts[0]:starts[-1]]
per_kernel = collections.defaultdict(float)
for r in window:
    name = r["Kernel Name"].split("(")[0][:60]
    per_kernel[name] += float(r["Metric Value"].replace(",", "")) * scale
total = sum(per_kernel.values())
print(f"{steps} decode steps, {len(window) / steps:.0f} kernels each, GPU time {total / steps:.1f} us per step")
for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
    print(f"  {us / steps:8.1f} us  {100 * us / total:5.1f}%  {name}")
