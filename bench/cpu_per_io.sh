#!/usr/bin/env bash
# The primary's CPU per request under one fio job: a fresh three-node `lazarus up`
# cluster, vol0 (three copies, 1 GiB) prefilled with 1 MiB writes, the jobs of BEFORE
# (default none; "rw bs iodepth seconds", `;` between jobs), then JOB (default
# "read 1m 8 8") through n1, timed by n1's user+system CPU from /proc.
# Usage: bench/cpu_per_io.sh   (LAZARUS_BIN, UP_ARGS, PORT_BASE as the other scripts)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
lazarus_bin
JOB=${JOB:-read 1m 8 8}
PORT=${PORT_BASE:-36900}
W=$(mktemp -d /var/tmp/lazarus-cpu-io.XXXXXX)
start_cluster "$W" "$PORT"
URI="nbd://127.0.0.1:$PORT/vol0"
fill_and_before "$URI"
PID=$(node_pid "$W" n1)
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
T0=$(cpu)
# shellcheck disable=SC2086 # the job's four words
fio_job "$URI" $JOB > "$W/fio.json"
T1=$(cpu)
python3 - "$W/fio.json" "$T0" "$T1" "$(getconf CLK_TCK)" "$JOB" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index('{'):])['jobs'][0]
d = j['write'] if j['write']['io_bytes'] else j['read']
cpu = (float(sys.argv[3]) - float(sys.argv[2])) / float(sys.argv[4])
print(f"{sys.argv[5]}: {d['iops']:.0f} IOPS, {d['bw'] / 1024:.0f} MiB/s; "
      f"n1 CPU {cpu:.2f} s, {cpu * 1e6 / d['total_ios']:.1f} µs per request")
PY
