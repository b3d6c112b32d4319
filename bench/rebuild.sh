#!/usr/bin/env bash
# Re-replication benchmark (Membership issue), one run, one cluster of four nodes:
#  1. vol0 (on n1, n2, n3; n1 primary) filled with SIZE of random data;
#  2. a client's 4 KiB random writes at QD1 for RUNTIME seconds (fio, ioengine=nbd, through
#     n1): the latency with nothing else going on;
#  3. n3 killed for good (a few seconds of the client's writes get it marked dead): n3 is
#     marked out after the out-time (5 s), n4 gets a new copy and resyncs it from n1 by
#     Merkle diff while the client writes. Reports the time from the kill to the mark and
#     from the mark until n4's copy is live and n3's dropped, the rate of the copy, and
#     the client's latency (p50/p99/max) during the rebuild.
# Usage: bench/rebuild.sh [--size 1GiB] [--runtime SECONDS] [--resync-rate MIB_PER_S]
# (--resync-rate is `lazarus up --resync-rate`: 64 by default, 0 for no limit.)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=1GiB
RUNTIME=15
RATE=64
while [ $# -gt 0 ]; do
  case "$1" in
    --resync-rate) RATE="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null || { echo "fio is required" >&2; exit 2; }
command -v nbdcopy >/dev/null || { echo "nbdcopy (libnbd-bin) is required" >&2; exit 2; }
cargo build --release --quiet
BIN="$PWD/target/release/lazarus"
WORK="$(mktemp -d /var/tmp/lazarus-rebuild.XXXXXX)"
PORT=23200
"$BIN" up --data "$WORK/c" --port-base $PORT --nodes 4 --out-after 5 --volume-size "$SIZE" \
  --resync-rate "$RATE" \
  --nbd-tls off > "$WORK/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for i in $(seq 600); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
U=nbd://127.0.0.1:$PORT/vol0
L() { "$BIN" "$@" --data "$WORK/c"; }
BYTES=$(python3 -c "import sys; s=sys.argv[1]; u={'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}; print(int(s[:-3])*u[s[-3:]])" "$SIZE")
head -c "$BYTES" /dev/urandom > "$WORK/seed.img"
nbdcopy "$WORK/seed.img" "$U"
rm -f "$WORK/seed.img"
lat() { # fio JSON on stdin -> "IOPS, p50/p99/max"
  python3 -c "
import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]['write']
p=j['clat_ns']['percentile']
print(f\"{j['iops']:.0f} IOPS, p50 {p['50.000000']/1000:.0f} us, p99 {p['99.000000']/1000:.0f} us, max {j['clat_ns']['max']/1e6:.1f} ms\")"
}
FIO=(fio --name=client --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=1
     --size="$BYTES" --time_based --output-format=json)
echo "== $SIZE of random data in vol0 (n1, n2, n3), four nodes, out-time 5 s, resync rate $RATE MiB/s (0: no limit)"
echo "client alone, ${RUNTIME}s: $("${FIO[@]}" --runtime="$RUNTIME" 2>/dev/null | lat)"

meta() { L status --json | python3 -c "
import json,sys
m=json.load(sys.stdin)['cluster']['metadata']; v=m['volumes']['vol0']
print(' '.join([str(3 in m.get('out',[])), ','.join(map(str, sorted(v['replicas']))), v['states'].get('4','-')]))"; }
t0=$(date +%s.%N)
L fault kill --node n3 >/dev/null
# The client's next writes find n3 gone and get it marked dead (not measured).
"${FIO[@]}" --runtime=3 >/dev/null 2>&1
tout=""
for i in $(seq 600); do
  read -r out replicas n4 <<< "$(meta)"
  [ "$out" = True ] && { tout=$(date +%s.%N); break; }
  sleep 0.1
done
[ -n "$tout" ] || { echo "n3 was not marked out within a minute" >&2; exit 1; }
"${FIO[@]}" --runtime=600 > "$WORK/during.json" 2>/dev/null &
FIOPID=$!
tdone=""
for i in $(seq 3000); do
  read -r out replicas n4 <<< "$(meta)"
  if [ "$replicas" = "1,2,4" ] && [ "$n4" = live ]; then tdone=$(date +%s.%N); break; fi
  sleep 0.2
done
kill -INT $FIOPID; wait $FIOPID || true
[ -n "$tdone" ] || { echo "n4's copy did not turn live within 10 minutes" >&2; exit 1; }
python3 - "$t0" "$tout" "$tdone" "$BYTES" <<'EOF'
import sys
t0, tout, tdone, size = map(float, sys.argv[1:])
print(f"n3 killed -> marked out: {tout - t0:.1f} s; marked out -> n4 live, n3 dropped: {tdone - tout:.1f} s "
      f"({size / (1 << 20) / (tdone - tout):.0f} MiB/s of mapped data)")
EOF
echo "client during the rebuild: $(lat < "$WORK/during.json")"
