#!/usr/bin/env bash
# Takes docs/dashboard.png: a three-node `lazarus up` cluster under fio load, n3 killed
# mid-run (its copy goes dead, the timeline shows it), then revived (it resyncs), and
# the dashboard n1 serves captured by headless Chromium while the load still runs.
# Usage: scripts/screenshot.sh [OUT.png]     (needs fio and chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/dashboard.png}"
command -v fio >/dev/null || { echo "fio is required" >&2; exit 2; }
command -v chromium >/dev/null || { echo "chromium is required" >&2; exit 2; }
cargo build --release --quiet
BIN="$PWD/target/release/lazarus"
WORK="$(mktemp -d /var/tmp/lazarus-shot.XXXXXX)"
"$BIN" up --data "$WORK/c" --port-base 23300 --volume-size 1GiB --nbd-tls off > "$WORK/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for i in $(seq 600); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
L() { "$BIN" "$@" --data "$WORK/c" >/dev/null; }
fio --name=load --ioengine=nbd --uri=nbd://127.0.0.1:23300/vol0 --rw=randrw --bs=4k \
    --iodepth=8 --size=256m --time_based --runtime=45 --rate_iops=1500,1500 >/dev/null 2>&1 &
FIO=$!
sleep 15
L fault kill --node n3
sleep 10
L fault revive --node n3
sleep 12
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$WORK/chromium" \
  --virtual-time-budget=3000 --window-size=1400,1250 --screenshot="$OUT" \
  "http://127.0.0.1:23310/#token=$(cat "$WORK/c/admin.token")" 2>/dev/null
wait $FIO || true
echo "wrote $OUT"
