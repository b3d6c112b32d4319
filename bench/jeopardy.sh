#!/usr/bin/env bash
# Last-failure-domain benchmark (Last failure domain issue), one run, one cluster:
#  1. RF3 4 KiB random writes (fio, ioengine=nbd, QD32) in normal mode, then the same with
#     vol0 protected (jeopardy: every write made durable on the recovery server first),
#     twice: the first run starts with the drain of the writes not yet flushed on the
#     replicas (logged by n1), the second is jeopardy mode alone;
#  2. n2 and n3 killed (n1 alone, no Raft majority, holds vol0 at the recovery server),
#     SECONDS of 4 KiB random writes in jeopardy, then both revived: the time until
#     every copy is live again and the jeopardy flag cleared, and the bytes each
#     rejoining node took from the recovery server (log replay) and from the primary
#     (Merkle diff: checksum tree, slice pages, blocks).
# Usage: bench/jeopardy.sh [--runtime SECONDS] [--jeopardy-seconds SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=10
JSECS=60
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) RUNTIME="$2"; shift 2 ;;
    --jeopardy-seconds) JSECS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null || { echo "fio is required" >&2; exit 2; }
# LAZARUS_BIN: measure that binary (for instance one built from another commit) instead
# of building this tree's.
if [ -n "${LAZARUS_BIN:-}" ]; then
  BIN="$LAZARUS_BIN"
else
  cargo build --release --quiet
  BIN="$PWD/target/release/lazarus"
fi
WORK="$(mktemp -d /var/tmp/lazarus-jeopardy.XXXXXX)"
"$BIN" up --data "$WORK/c" --port-base 23100 --volume-size 1GiB --nbd-tls off > "$WORK/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for i in $(seq 600); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
U=nbd://127.0.0.1:23100/vol0
L() { "$BIN" "$@" --data "$WORK/c"; }
# The admin token as a curl header file (not in argv, where `ps` shows it).
(umask 077; printf 'Authorization: Bearer %s\n' "$(cat "$WORK/c/admin.token")" > "$WORK/auth.header")
api() { curl -s -H @"$WORK/auth.header" "http://127.0.0.1:$((23110 + $1 - 1))$2"; }
jeopardy() { api 1 /api/v1/jeopardy | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes']['vol0']['jeopardy'])"; }
fio_iops() { # name runtime
  fio --name="$1" --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 \
      --size=1g --time_based --runtime="$2" --output-format=json 2>/dev/null |
    python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]['write']; print(f\"{j['iops']:.0f} IOPS, p99 {j['clat_ns']['percentile']['99.000000']/1000:.0f} us\")"
}
echo "== RF3 randwrite-4k QD32, ${RUNTIME}s each, same cluster"
echo "normal mode:   $(fio_iops normal "$RUNTIME")"
L volume protect vol0 >/dev/null
for i in $(seq 100); do [ "$(jeopardy)" = True ] && break; sleep 0.1; done
echo "jeopardy mode, first ${RUNTIME}s: $(fio_iops jeopardy "$RUNTIME")  (every write on the recovery server first; the first write after the entry waits for the drain)"
grep -ho "writes not yet flushed on the replicas put on the recovery server.*" "$WORK/c/n1/node.log" | sed 's/^/  drain at the entry: /' || true
echo "jeopardy mode, next ${RUNTIME}s: $(fio_iops jeopardy2 "$RUNTIME")"
L volume unprotect vol0 >/dev/null
for i in $(seq 100); do [ "$(jeopardy)" = False ] && break; sleep 0.1; done

echo "== rejoin after ${JSECS}s of writes in jeopardy (n2, n3 down; n1 without a majority)"
L fault kill --node n2 >/dev/null
L fault kill --node n3 >/dev/null
echo "in jeopardy: $(fio_iops alone "$JSECS")"
LOG=$(api 1 /api/v1/jeopardy | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes']['vol0']['recovery_log_bytes'])")
echo "recovery log: $LOG bytes"
FCID=$(api 1 /api/v1/jeopardy | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes']['vol0']['failure_count_id'])")
t0=$(date +%s.%N)
L fault revive --node n2 >/dev/null
L fault revive --node n3 >/dev/null
# Done when every node (not just n1, whose metadata stood still without a majority)
# sees every copy live and the flag cleared, and the recovery server's log is gone.
for i in $(seq 3000); do
  ok=1
  for n in 1 2 3; do
    s=$(api $n /api/v1/cluster | python3 -c "
import json,sys
c=json.load(sys.stdin); v=c['metadata']['volumes']['vol0']
print('ok' if all(x=='live' for x in v['states'].values()) and not v['recovery_flag'] and v['failure_count_id'] >= $FCID else 'wait')" 2>/dev/null || echo wait)
    [ "$s" = ok ] || ok=0
  done
  [ $ok = 1 ] && [ -z "$(ls "$WORK/c/rs/logs" 2>/dev/null)" ] && break
  sleep 0.1
done
t1=$(date +%s.%N)
echo "every copy live and jeopardy cleared $(python3 -c "print(round($t1-$t0,2))") s after both revives were issued"
for n in 2 3; do
  api $n /api/v1/cluster | python3 -c "
import json,sys
p=json.load(sys.stdin)['resync']['vol0']
prim=p['tree_bytes']+p['page_bytes']+p['block_bytes']
print(f\"n$n: {p['restore_bytes']} B ({p['restore_records']} records) from the recovery server, {prim} B from the primary (tree {p['tree_bytes']}, pages {p['page_bytes']}, blocks {p['block_bytes']}), {p['pages_copied']} pages copied\")"
done
echo "recovery server log files left: $(ls "$WORK/c/rs/logs" | wc -l)"
