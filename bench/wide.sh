#!/usr/bin/env bash
# Benchmark: 4 KiB random writes (QD32) over a wide working set, where nearly every
# write changes a slice page no other write since the last checkpoint changed, so each
# checkpoint has thousands of page images to write. fio (ioengine=nbd) against
# qemu-nbd and nbdkit serving a sparse raw file of the same size and against one
# Lazarus node (no cluster), in one run, on the same disk. Reports IOPS and the
# latency percentiles where checkpoints show (p99, p99.9, max), and for Lazarus each
# checkpoint's length and how long it held writers off (from its log).
#
# Usage: bench/wide.sh [--size GIB] [--runtime SECONDS] [--reps N]
# LAZARUS_BIN: the lazarus binary to measure (default: a release build of this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=16
RUNTIME=15
REPS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size) GIB="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for t in fio qemu-nbd nbdkit qemu-io; do
  command -v "$t" >/dev/null || { echo "$t missing: run scripts/test.sh once (it installs the clients)" >&2; exit 1; }
done
if [ -z "${LAZARUS_BIN:-}" ]; then
  cargo build --release --quiet
  LAZARUS_BIN="$PWD/target/release/lazarus"
fi
W=$(mktemp -d /var/tmp/lazarus-wide.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

truncate -s "${GIB}G" "$W/qemu.img" "$W/nbdkit.img"
qemu-nbd -f raw -x vol0 -p 30821 -b 127.0.0.1 --persistent --shared=8 --cache=writeback --aio=threads "$W/qemu.img" &
PIDS+=($!)
nbdkit -f -p 30822 -i 127.0.0.1 --exportname vol0 file "$W/nbdkit.img" &
PIDS+=($!)
mkdir -p "$W/lz"
printf 'id = "wide"\ndata_dir = "%s/lz"\nnbd_listen = "127.0.0.1:30823"\nadmin_listen = "127.0.0.1:30833"\n' "$W" > "$W/lz/node.toml"
RUST_LOG=lazarus_store::store=debug,info "$LAZARUS_BIN" node --config "$W/lz/node.toml" 2> "$W/node.log" &
PIDS+=($!)
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:30833/api/v1/health >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf -X POST -H 'content-type: application/json' -d "{\"name\":\"vol0\",\"size\":\"${GIB}GiB\"}" \
  http://127.0.0.1:30833/api/v1/volumes >/dev/null

echo "bench/wide.sh --size $GIB --runtime $RUNTIME --reps $REPS; lazarus: $LAZARUS_BIN ($("$LAZARUS_BIN" --version 2>/dev/null || echo unknown))"
echo
echo "| server | rep | IOPS | p50 µs | p99 µs | p99.9 µs | max ms |"
echo "|---|---|---|---|---|---|---|"
for rep in $(seq "$REPS"); do
  for srv in "qemu-nbd 30821" "nbdkit 30822" "lazarus 30823"; do
    set -- $srv
    : > "$W/node.log.mark"
    [ "$1" = lazarus ] && wc -l < "$W/node.log" > "$W/node.log.mark"
    fio --name=wide --ioengine=nbd --uri="nbd://127.0.0.1:$2/vol0" --rw=randwrite --bs=4k \
        --iodepth=32 --size="${GIB}g" --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --norandommap --randrepeat=0 --output-format=json --output="$W/fio.json" >/dev/null
    /usr/bin/python3 - "$W/fio.json" "$1" "$rep" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {j['iops']:,.0f} | {p['50.000000']/1e3:,.0f} | {p['99.000000']/1e3:,.0f} | {p['99.900000']/1e3:,.0f} | {j['clat_ns']['max']/1e6:,.1f} |")
PY
    if [ "$1" = lazarus ]; then
      tail -n +"$(( $(cat "$W/node.log.mark") + 1 ))" "$W/node.log" | grep ' checkpoint' | /usr/bin/python3 -c '
import re, sys
held, total, images = [], [], []
for line in sys.stdin:
    m = dict(re.findall(r"(\w+)=([0-9.]+)", line))
    if "writers_held_ms" in m:
        held.append(float(m["writers_held_ms"])); total.append(float(m["total_ms"])); images.append(int(m["images"]))
if held:
    print(f"|  | checkpoints: {len(held)}, images {min(images)}-{max(images)}, writers held {min(held):.1f}-{max(held):.1f} ms, whole {min(total):.0f}-{max(total):.0f} ms | | | | | |")
else:
    print("|  | no checkpoint timings in the log (a build before they were logged) | | | | | |")
' || true
    fi
  done
done
