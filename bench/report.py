#!/usr/bin/env python3
"""Turns bench/run.sh results (JSON lines) into the BENCHMARKS.md table."""
import json, statistics, sys, platform, subprocess, datetime

results_path, out_path, command = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
servers = ["qemu-nbd", "nbdkit", "lazarus"]
workloads = ["randread-4k", "randwrite-4k", "seqread-1m", "seqwrite-1m"]

def agg(server, wl, key):
    v = [r[key] for r in rows if r["server"] == server and r["workload"] == wl]
    return statistics.mean(v) if v else float("nan"), (min(v), max(v)) if v else (0, 0)

def fmt(wl, server):
    iops, (lo, hi) = agg(server, wl, "iops")
    bw, _ = agg(server, wl, "bw_bytes")
    p99, _ = agg(server, wl, "p99_us")
    if wl.endswith("4k"):
        return f"{iops/1000:.1f}k IOPS ({lo/1000:.1f}-{hi/1000:.1f}k), p99 {p99:.0f} µs"
    return f"{bw/2**30:.2f} GiB/s, p99 {p99/1000:.1f} ms"

cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
lines = []
lines.append("# Benchmarks\n")
lines.append(f"Measured {datetime.date.today()} on {platform.node()} ({cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores), "
             f"all three servers in the same run, on the same disk, with the same fio jobs "
             f"(`ioengine=nbd`, one connection, 1 GiB working set prefilled with the same random data).\n")
lines.append(f"Command: `{command}`\n")
lines.append("Mean of the repetitions (range in parentheses for IOPS); ratio is Lazarus / nbdkit.\n")
lines.append("| workload | qemu-nbd | nbdkit (file) | Lazarus | Lazarus / nbdkit |")
lines.append("| --- | --- | --- | --- | --- |")
for wl in workloads:
    key = "iops" if wl.endswith("4k") else "bw_bytes"
    lz, _ = agg("lazarus", wl, key)
    nk, _ = agg("nbdkit", wl, key)
    ratio = lz / nk if nk else float("nan")
    lines.append(f"| {wl} | {fmt(wl, 'qemu-nbd')} | {fmt(wl, 'nbdkit')} | {fmt(wl, 'lazarus')} | {ratio:.2f}x |")
lines.append("")
# Keep any hand-written analysis below the marker.
try:
    old = open(out_path).read()
    tail = old[old.index("<!-- analysis -->"):]
except (FileNotFoundError, ValueError):
    tail = "<!-- analysis -->\n"
open(out_path, "w").write("\n".join(lines) + "\n" + tail)
