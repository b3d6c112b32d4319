#!/usr/bin/env bash
# Benchmark: fio (ioengine=nbd) against qemu-nbd and nbdkit serving a raw file, and
# against Lazarus, in one run on the same disk: a single node (no cluster), and a
# three-node `lazarus up` cluster on this machine with a volume at replication factor 3
# (vol0) and one at replication factor 1 (solo), both through n1. Writes BENCHMARKS.md.
#
# Usage: bench/run.sh [--reps N] [--runtime SECONDS] [--dir DIR] [--out FILE]
# UP_ARGS adds arguments to `lazarus up` (UP_ARGS=--insecure-cluster: cluster traffic
# without mutual TLS, to measure what TLS costs).
# Workloads: 4 KiB randread and randwrite at iodepth 32, 4 KiB randwrite at iodepth 1
# (latency: p50 and p99), 1 MiB sequential read and write at iodepth 8; each server
# gets the same prefilled 1 GiB working set.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3
RUNTIME=10
DIR=""
OUT=BENCHMARKS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for t in fio qemu-nbd nbdkit nbdcopy; do
  command -v "$t" >/dev/null || { echo "$t missing: run scripts/test.sh once (it installs the clients) or apt-get install fio qemu-utils nbdkit libnbd-bin" >&2; exit 1; }
done
# LAZARUS_BIN: measure that binary (for instance one built from another commit) instead
# of building this tree's.
if [ -n "${LAZARUS_BIN:-}" ]; then
  BIN="$LAZARUS_BIN"
else
  cargo build --release --quiet
  BIN="$PWD/target/release/lazarus"
fi
WORK="${DIR:-$(mktemp -d /var/tmp/lazarus-bench.XXXXXX)}"
mkdir -p "$WORK"
SIZE=$((1024 * 1024 * 1024))
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

head -c $SIZE /dev/urandom > "$WORK/seed.img"
cp --sparse=never "$WORK/seed.img" "$WORK/qemu.img"
cp --sparse=never "$WORK/seed.img" "$WORK/nbdkit.img"

qemu-nbd -f raw -x vol0 -p 30801 -b 127.0.0.1 --persistent --shared=8 --cache=writeback --aio=threads "$WORK/qemu.img" &
PIDS+=($!)
nbdkit -f -p 30802 -i 127.0.0.1 --exportname vol0 file "$WORK/nbdkit.img" &
PIDS+=($!)
mkdir -p "$WORK/lz"
cat > "$WORK/lz/node.toml" <<TOML
id = "bench"
data_dir = "$WORK/lz"
nbd_listen = "127.0.0.1:30803"
admin_listen = "127.0.0.1:30813"
TOML
"$BIN" node --config "$WORK/lz/node.toml" 2> "$WORK/lz/node.log" &
PIDS+=($!)
for i in $(seq 100); do
  curl -sf http://127.0.0.1:30813/api/v1/health >/dev/null 2>&1 && nbdinfo nbd://127.0.0.1:30801/vol0 >/dev/null 2>&1 && nbdinfo nbd://127.0.0.1:30802/vol0 >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf -X POST -H 'content-type: application/json' -d '{"name":"vol0","size":"1GiB"}' http://127.0.0.1:30813/api/v1/volumes >/dev/null
# The cluster: three node processes on this machine (NBD 30900-30902).
"$BIN" up --data "$WORK/cluster" --port-base 30900 --volume-size 1GiB --nbd-tls off ${UP_ARGS:-} > "$WORK/up.log" 2>&1 &
PIDS+=($!)
for i in $(seq 300); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
grep -q "Press Ctrl-C" "$WORK/up.log" || { echo "lazarus up did not start:" >&2; cat "$WORK/up.log" >&2; exit 1; }
"$BIN" volume create solo --size 1GiB --replicas 1 --primary n1 --data "$WORK/cluster" >/dev/null
# Same random content as the raw files, so reads hit real stored data everywhere.
nbdcopy "$WORK/seed.img" nbd://127.0.0.1:30803/vol0
nbdcopy "$WORK/seed.img" nbd://127.0.0.1:30900/vol0
nbdcopy "$WORK/seed.img" nbd://127.0.0.1:30900/solo
rm -f "$WORK/seed.img"

RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
run_fio() { # server uri workload rw bs iodepth rep
  local name=$1 uri=$2 wl=$3 rw=$4 bs=$5 qd=$6 rep=$7
  fio --name="$wl" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --size=1g --time_based --runtime="$RUNTIME" --ramp_time=2 \
      --randrepeat=0 --norandommap --output-format=json > "$WORK/fio.json"
  python3 - "$WORK/fio.json" "$name" "$wl" "$rep" >> "$RESULTS" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
j = d["jobs"][0]
side = "read" if j["read"]["io_bytes"] > 0 else "write"
s = j[side]
pct = s["clat_ns"].get("percentile", {})
print(json.dumps({"server": sys.argv[2], "workload": sys.argv[3], "rep": int(sys.argv[4]),
                  "iops": s["iops"], "bw_bytes": s["bw_bytes"],
                  "p50_us": pct.get("50.000000", 0) / 1000.0,
                  "p99_us": pct.get("99.000000", 0) / 1000.0}))
PY
}
for rep in $(seq "$REPS"); do
  for srv in "qemu-nbd nbd://127.0.0.1:30801/vol0" "nbdkit nbd://127.0.0.1:30802/vol0" \
             "lazarus nbd://127.0.0.1:30803/vol0" "lazarus-rf1 nbd://127.0.0.1:30900/solo" \
             "lazarus-rf3 nbd://127.0.0.1:30900/vol0"; do
    set -- $srv
    run_fio "$1" "$2" randread-4k randread 4k 32 "$rep"
    run_fio "$1" "$2" randwrite-4k randwrite 4k 32 "$rep"
    run_fio "$1" "$2" randwrite-4k-qd1 randwrite 4k 1 "$rep"
    run_fio "$1" "$2" seqread-1m read 1m 8 "$rep"
    run_fio "$1" "$2" seqwrite-1m write 1m 8 "$rep"
  done
done
python3 bench/report.py "$RESULTS" "$OUT" "bench/run.sh --reps $REPS --runtime $RUNTIME"
echo "wrote $OUT (raw results: $RESULTS)"
