#!/usr/bin/env python3
"""Turns bench/run.sh results (JSON lines) into the BENCHMARKS.md table."""
import json, statistics, sys, platform, subprocess, datetime

results_path, out_path, command = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
servers = ["qemu-nbd", "nbdkit", "lazarus", "lazarus-rf1", "lazarus-rf3"]
workloads = ["randread-4k", "randwrite-4k", "randwrite-4k-qd1", "seqread-1m", "seqwrite-1m"]

def agg(server, wl, key):
    v = [r[key] for r in rows if r["server"] == server and r["workload"] == wl]
    return statistics.mean(v) if v else float("nan"), (min(v), max(v)) if v else (0, 0)

def fmt(wl, server):
    iops, (lo, hi) = agg(server, wl, "iops")
    bw, _ = agg(server, wl, "bw_bytes")
    p99, _ = agg(server, wl, "p99_us")
    if wl.endswith("qd1"):
        p50, _ = agg(server, wl, "p50_us")
        return f"{iops/1000:.1f}k IOPS, p50 {p50:.0f} µs, p99 {p99:.0f} µs"
    if "-4k" in wl:
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
    key = "iops" if "-4k" in wl else "bw_bytes"
    nk, _ = agg("nbdkit", wl, key)
    ratios = []
    for srv in ["lazarus", "lazarus-rf1", "lazarus-rf3"]:
        v, _ = agg(srv, wl, key)
        ratios.append(f"{v / nk:.2f}x" if nk else "n/a")
    lines.append(f"| {wl} | {fmt(wl, 'qemu-nbd')} | {fmt(wl, 'nbdkit')} | {fmt(wl, 'lazarus')} | "
                 f"{fmt(wl, 'lazarus-rf1')} | {fmt(wl, 'lazarus-rf3')} | {' | '.join(ratios)} |")
lines.append("")
def val(srv, wl):
    key = "iops" if "-4k" in wl else "bw_bytes"
    return agg(srv, wl, key)[0]
def verdict(ok):
    return "met" if ok else "**missed**"
nk = {wl: val("nbdkit", wl) for wl in workloads}
qn_w = val("qemu-nbd", "randwrite-4k")
rf3_w = val("lazarus-rf3", "randwrite-4k")
single_w = val("lazarus", "randwrite-4k")
rf3_p99_qd1, _ = agg("lazarus-rf3", "randwrite-4k-qd1", "p99_us")
gib = 2**30
lines.append("Targets (Performance issue):\n")
lines.append(f"- RF3 randwrite 4 KiB QD32 ahead of qemu-nbd ({qn_w/1000:.1f}k) and ≥ 0.4x nbdkit: {rf3_w/1000:.1f}k, {rf3_w / nk['randwrite-4k']:.2f}x, {verdict(rf3_w > qn_w and rf3_w >= 0.4 * nk['randwrite-4k'])}")
lines.append(f"- single node randwrite 4 KiB QD32 ≥ 0.9x nbdkit: {single_w / nk['randwrite-4k']:.2f}x, {verdict(single_w >= 0.9 * nk['randwrite-4k'])}")
lines.append(f"- seqwrite 1 MiB ≥ 1.5 GiB/s single node, ≥ 0.6 GiB/s RF3: {val('lazarus', 'seqwrite-1m')/gib:.2f} / {val('lazarus-rf3', 'seqwrite-1m')/gib:.2f} GiB/s, {verdict(val('lazarus', 'seqwrite-1m') >= 1.5 * gib and val('lazarus-rf3', 'seqwrite-1m') >= 0.6 * gib)}")
lines.append(f"- seqread 1 MiB ≥ 0.8x nbdkit (RF3): {val('lazarus-rf3', 'seqread-1m') / nk['seqread-1m']:.2f}x, {verdict(val('lazarus-rf3', 'seqread-1m') >= 0.8 * nk['seqread-1m'])}")
lines.append(f"- RF3 write latency at QD1, p99 under 1 ms: {rf3_p99_qd1:.0f} µs, {verdict(rf3_p99_qd1 < 1000)}")
lines.append("")
# Keep any hand-written analysis below the marker.
try:
    old = open(out_path).read()
    tail = old[old.index("<!-- analysis -->"):]
except (FileNotFoundError, ValueError):
    tail = "<!-- analysis -->\n"
open(out_path, "w").write("\n".join(lines) + "\n" + tail)
