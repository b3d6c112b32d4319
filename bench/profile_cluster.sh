#!/usr/bin/env bash
# Where one node's CPU goes under a fio job on a fresh three-node `lazarus up` cluster:
# vol0 (three copies, 1 GiB) prefilled with 1 MiB writes, then the jobs of BEFORE run in
# order (default none: "randwrite 4k 32 8" = rw bs iodepth seconds, `;` between jobs),
# then JOB (default "randwrite 4k 32 10") with `perf record -g` of NODE (default n1)
# for PERF_SECONDS (default 4) from 2 s into it (PERF_CALL="--call-graph dwarf" for Rust callers). Prints the job's result and the top of
# `perf report --no-children`; PERF_OUT=file keeps the recording.
# Usage: bench/profile_cluster.sh   (LAZARUS_BIN, UP_ARGS, PORT_BASE as the other scripts)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
lazarus_bin
JOB=${JOB:-randwrite 4k 32 10}
NODE=${NODE:-n1}
PERF_SECONDS=${PERF_SECONDS:-4}
PORT=${PORT_BASE:-34900}
W=$(mktemp -d /var/tmp/lazarus-profile.XXXXXX)
start_cluster "$W" "$PORT"
URI="nbd://127.0.0.1:$PORT/vol0"
fill_and_before "$URI"
PID=$(node_pid "$W" "$NODE")
OUT=${PERF_OUT:-$W/perf.data}
# shellcheck disable=SC2086 # the job's four words
fio_job "$URI" $JOB > "$W/fio.json" &
FIO=$!
sleep 2
# shellcheck disable=SC2086 # PERF_CALL is perf options
perf record -F 999 ${PERF_CALL:--g} -p "$PID" -o "$OUT" -- sleep "$PERF_SECONDS" >/dev/null 2>&1
wait $FIO
python3 - "$W/fio.json" "$JOB" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index('{'):])['jobs'][0]
d = j['write'] if j['write']['io_bytes'] else j['read']
print(f"{sys.argv[2]}: {d['iops']:.0f} IOPS, {d['bw'] / 1024:.0f} MiB/s")
PY
perf report -i "$OUT" --no-children --sort symbol --stdio -g none 2>/dev/null \
  | grep -E '^ +[0-9]' | head -"${TOP:-25}" | cut -c1-110
