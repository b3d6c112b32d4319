#!/usr/bin/env bash
# Where a sequential write's time goes: fio seqwrite 1 MiB QD8 for RUNTIME seconds
# against vol0 of a fresh three-node `lazarus up` cluster (RF3, through n1) and against a
# fresh RF1 volume on n1, each prefilled over 1 GiB so the writes overwrite stored blocks.
# Prints throughput, p50/p99 latency and each node's CPU time per MiB written.
# Usage: bench/seqwrite.sh [RUNTIME]
# PERF=1 records n1 (the primary; PERF_NODE=2 records n2) with `perf record -g` during the RF3 run and prints
# the top of `perf report` (needs perf; PERF_OUT=file keeps the recording).
# LAZARUS_BIN=path measures that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
. bench/lib.sh
lazarus_bin
WORK=$(mktemp -d /var/tmp/lazarus-seq.XXXXXX)
start_cluster "$WORK" 32900
"$BIN" volume create solo --size 1GiB --replicas 1 --primary n1 --data "$WORK/c" >/dev/null
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
pids() { for n in n1 n2 n3; do node_pid "$WORK" "$n"; done; }
HZ=$(getconf CLK_TCK)
for vol in vol0 solo; do
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:32900/$vol" --rw=write --bs=1M \
      --iodepth=8 --size=1g --output-format=terse >/dev/null
  P=($(pids))
  B=(); for p in "${P[@]}"; do B+=($(ticks "$p")); done
  if [ "${PERF:-0}" = 1 ] && [ "$vol" = vol0 ]; then
    perf record -g -o "$WORK/perf.data" -p "${P[$(( ${PERF_NODE:-1} - 1 ))]}" -- sleep "$RUNTIME" >/dev/null 2>&1 &
    PERFPID=$!
  fi
  fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:32900/$vol" --rw=write --bs=1M --iodepth=8 \
      --size=1g --time_based --runtime="$RUNTIME" --output-format=json > "$WORK/fio.json"
  python3 - "$WORK/fio.json" "$vol" "$RUNTIME" <<'EOF' > "$WORK/line"
import json, sys
t = open(sys.argv[1]).read()
w = json.loads(t[t.index('{'):])['jobs'][0]['write']
p = w['clat_ns']['percentile']
print(f"{sys.argv[2]}: {w['bw_bytes'] / 2**30:.2f} GiB/s, {w['total_ios']} writes, "
      f"p50 {p['50.000000'] / 1e6:.1f} ms, p99 {p['99.000000'] / 1e6:.1f} ms;", end="")
print(f" {w['io_bytes'] / 2**20:.0f}")
EOF
  read -r LINE < "$WORK/line"
  MIB=${LINE##* }
  LINE=${LINE% *}
  LINE="$LINE CPU ms per MiB:"
  for i in 0 1 2; do
    A=$(ticks "${P[$i]}")
    LINE="$LINE n$((i+1)) $(python3 -c "print(round(($A-${B[$i]})/$HZ/$MIB*1e3,2))")"
  done
  echo "$LINE"
  if [ -n "${PERFPID:-}" ]; then
    wait "$PERFPID" || true
    [ -n "${PERF_OUT:-}" ] && cp "$WORK/perf.data" "$PERF_OUT"
    perf report -i "$WORK/perf.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null \
      | grep -E "^ +[0-9]" | head -40
    PERFPID=""
  fi
done
