#!/usr/bin/env bash
# Memory and start-up against the data stored: one `lazarus node` (no cluster) gets
# SIZES of unique 4 KiB blocks written (fio, fresh random data in every block), then
# prints its resident memory, and the time and memory of a restart after a clean stop
# and after kill -9 (journal replay), each until the node serves NBD reads again.
#
# Usage: bench/scale.sh [SIZE_GIB ...]   (default: 1 4 16; needs SIZE + 1 GiB of disk
# for each size in turn under $DIR, default /var/tmp)
# PAGE_CACHE=BYTES sets the node's page_cache_bytes (default: the node's, 64 MiB).
# One line per size on stdout, and a JSON line per size in $DIR/scale.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(1 4 16)
for t in fio nbdinfo curl; do
  command -v "$t" >/dev/null || { echo "$t missing: run scripts/test.sh once (it installs the clients)" >&2; exit 1; }
done
if [ -n "${LAZARUS_BIN:-}" ]; then
  BIN="$LAZARUS_BIN"
else
  cargo build --release --quiet
  BIN="$PWD/target/release/lazarus"
fi
DIR="${DIR:-/var/tmp}"
OUTJ="$DIR/scale.jsonl"
: > "$OUTJ"
NODE=""
cleanup() { [ -n "$NODE" ] && kill -9 "$NODE" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
now() { date +%s.%N; }

# Starts the node on $W; sets NODE, and STARTED to the seconds until it serves (with
# an argument: its admin API only, before vol0 exists; else NBD reads of vol0 too).
start_node() {
  local t0 t1
  t0=$(now)
  "$BIN" node --config "$W/node.toml" >> "$W/node.log" 2>&1 &
  NODE=$!
  for _ in $(seq 6000); do
    if curl -sf http://127.0.0.1:30713/api/v1/health >/dev/null 2>&1 &&
       { [ $# -gt 0 ] || nbdinfo --size nbd://127.0.0.1:30703/vol0 >/dev/null 2>&1; }; then
      t1=$(now)
      STARTED=$(python3 -c "print(round($t1 - $t0, 2))")
      return 0
    fi
    kill -0 "$NODE" 2>/dev/null || { echo "the node exited; its log: $W/node.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "the node did not serve within 300 s" >&2
  exit 1
}

for gib in "${SIZES[@]}"; do
  W=$(mktemp -d "$DIR/lazarus-scale.XXXXXX")
  cat > "$W/node.toml" <<TOML
id = "scale"
data_dir = "$W"
nbd_listen = "127.0.0.1:30703"
admin_listen = "127.0.0.1:30713"
${PAGE_CACHE:+page_cache_bytes = $PAGE_CACHE}
TOML
  start_node admin-only
  RSS_EMPTY=$(rss_mib "$NODE")
  curl -sf -X POST -H 'content-type: application/json' \
    -d "{\"name\":\"vol0\",\"size\":\"$((gib + 1))GiB\"}" http://127.0.0.1:30713/api/v1/volumes >/dev/null
  # Unique content in every block (refill_buffers), sequential 1 MiB writes, flushed.
  T0=$(now)
  fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:30703/vol0 --rw=write --bs=1M \
      --iodepth=8 --size="${gib}g" --refill_buffers=1 --end_fsync=1 --output-format=terse >/dev/null
  T1=$(now)
  BLOCKS=$(curl -sf http://127.0.0.1:30713/api/v1/volumes/vol0 | python3 -c "import json,sys;print(json.load(sys.stdin)['mapped_blocks'])")
  RSS_FULL=$(rss_mib "$NODE")
  # A clean stop (SIGTERM: flush and checkpoint), then a start.
  kill -TERM "$NODE"; wait "$NODE" 2>/dev/null || true
  start_node
  START_CLEAN=$STARTED
  sleep 1
  RSS_CLEAN=$(rss_mib "$NODE")
  # A crash after more writes (what the journal holds is replayed), then a start.
  fio --name=more --ioengine=nbd --uri=nbd://127.0.0.1:30703/vol0 --rw=randwrite --bs=4k \
      --iodepth=32 --size="${gib}g" --io_size=64m --refill_buffers=1 --end_fsync=1 --output-format=terse >/dev/null
  kill -9 "$NODE"; wait "$NODE" 2>/dev/null || true
  start_node
  START_CRASH=$STARTED
  sleep 1
  RSS_CRASH=$(rss_mib "$NODE")
  kill -TERM "$NODE"; wait "$NODE" 2>/dev/null || true
  NODE=""
  python3 - "$gib" "$BLOCKS" "$RSS_EMPTY" "$RSS_FULL" "$START_CLEAN" "$RSS_CLEAN" "$START_CRASH" "$RSS_CRASH" "$T0" "$T1" <<'PY' | tee -a "$OUTJ"
import json, sys
gib, blocks = int(sys.argv[1]), int(sys.argv[2])
empty, full, sc, rc, sx, rx = map(float, sys.argv[3:9])
t0, t1 = float(sys.argv[9]), float(sys.argv[10])
import os
print(json.dumps({
    "page_cache_bytes": os.environ.get("PAGE_CACHE", "default"),
    "gib": gib, "stored_blocks": blocks, "write_s": round(t1 - t0, 1),
    "rss_empty_mib": empty, "rss_full_mib": full,
    "bytes_per_block": round((full - empty) * 2**20 / max(blocks, 1), 1),
    "start_clean_s": sc, "rss_after_clean_start_mib": rc,
    "start_after_kill9_s": sx, "rss_after_crash_start_mib": rx,
}))
PY
  rm -rf "$W"
done
