#!/usr/bin/env python3
"""Turns bench/run.sh results (JSON lines) into the BENCHMARKS.md table."""
import json, statistics, sys, platform, subprocess, datetime

results_path, out_path, command = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
servers = ["qemu-nbd", "nbdkit", "lazarus", "lazarus-rf1", "lazarus-rf3"]
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
lines.append("Mean of the repetitions (range in parentheses for IOPS); ratios are against nbdkit.\n")
lines.append("Lazarus columns: *single node* is one `lazarus node` with no cluster; *RF1* and *RF3* are "
             "volumes of a three-node `lazarus up` cluster whose three node processes share this "
             "machine's cores with fio, written and read through n1 (the primary).\n")
lines.append("| workload | qemu-nbd | nbdkit (file) | Lazarus single node | Lazarus RF1 | Lazarus RF3 | single / nbdkit | RF1 / nbdkit | RF3 / nbdkit |")
lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for wl in workloads:
    key = "iops" if wl.endswith("4k") else "bw_bytes"
    nk, _ = agg("nbdkit", wl, key)
    ratios = []
    for srv in ["lazarus", "lazarus-rf1", "lazarus-rf3"]:
        v, _ = agg(srv, wl, key)
        ratios.append(f"{v / nk:.2f}x" if nk else "n/a")
    lines.append(f"| {wl} | {fmt(wl, 'qemu-nbd')} | {fmt(wl, 'nbdkit')} | {fmt(wl, 'lazarus')} | "
                 f"{fmt(wl, 'lazarus-rf1')} | {fmt(wl, 'lazarus-rf3')} | {' | '.join(ratios)} |")
lines.append("")
qn, _ = agg("qemu-nbd", "randwrite-4k", "iops")
nk_r, _ = agg("nbdkit", "randread-4k", "iops")
nk_w, _ = agg("nbdkit", "randwrite-4k", "iops")
rf3_r, _ = agg("lazarus-rf3", "randread-4k", "iops")
rf3_w, _ = agg("lazarus-rf3", "randwrite-4k", "iops")
def verdict(ok):
    return "met" if ok else "**missed**"
lines.append("Targets (Cluster issue, 4 KiB at iodepth 32):\n")
lines.append(f"- RF3 randread ≥ 0.9x nbdkit: {rf3_r / nk_r:.2f}x, {verdict(rf3_r >= 0.9 * nk_r)}")
lines.append(f"- RF3 randwrite ≥ 0.5x nbdkit: {rf3_w / nk_w:.2f}x, {verdict(rf3_w >= 0.5 * nk_w)}")
lines.append(f"- RF3 randwrite ahead of qemu-nbd ({qn/1000:.1f}k): {rf3_w/1000:.1f}k, {verdict(rf3_w > qn)}")
lines.append("")
# Keep any hand-written analysis below the marker.
try:
    old = open(out_path).read()
    tail = old[old.index("<!-- analysis -->"):]
except (FileNotFoundError, ValueError):
    tail = "<!-- analysis -->\n"
open(out_path, "w").write("\n".join(lines) + "\n" + tail)
