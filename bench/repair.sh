#!/usr/bin/env bash
# Repair efficiency (Repair issue): a 64 GiB thin volume with every one of its 65,536
# slice pages mapped (WRITE_ZEROES with NO_HOLE: each page maps a stored zero block),
# replicated on three nodes; n2 is cut off and 1% of the pages change, then n3 is cut
# off and another 1% change (n2 is stale in 2%, n3 in 1%); 10 primary pages are then
# damaged on disk: 4 current only on n3, 3 current on both dead replicas, 3 current on
# neither. `lazarus repair` rebuilds them; the script prints the bytes moved for it and
# the wall time, next to what copying one replica's whole slice file would move.
# Usage: bench/repair.sh [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=""
[ "${1:-}" = "--dir" ] && DIR="$2"
cargo build --release --quiet
BIN="$PWD/target/release/lazarus"
WORK="${DIR:-$(mktemp -d /var/tmp/lazarus-repair.XXXXXX)}"
mkdir -p "$WORK"
"$BIN" up --data "$WORK/c" --port-base 32900 --volume-size 64GiB --nbd-tls off > "$WORK/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for i in $(seq 600); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
U=nbd://127.0.0.1:32900/vol0
L() { "$BIN" "$@" --data "$WORK/c"; }
t0=$(date +%s.%N)
/usr/bin/python3 crates/lazarus/tests/py/fill.py "$U"
echo "filled 64 GiB (every page mapped) in $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s"
write_pages() { # first count tag: one 4 KiB block in each of `count` pages from `first`, 97 pages apart
  /usr/bin/python3 - "$U" "$1" "$2" "$3" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
first, count, tag = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(count):
    p = (first + i * 97) % 65536
    h.pwrite(bytes([tag, i % 256, i // 256]) * 1365 + b"\0", p << 20)
h.flush()
PY
}
L fault drop --from n1 --to n2 >/dev/null
write_pages 1 655 1          # n2 stale here; n3 current
L fault drop --from n1 --to n3 >/dev/null
write_pages 50000 655 2      # both stale here
L status | grep "volume vol0"
# 10 damaged pages: 4 current only on n3, 3 current on both, 3 current on neither.
PAGES="1 98 195 292 30001 30002 30003 50000 50097 50194"
for p in $PAGES; do L fault corrupt --node n1 --volume vol0 --lba $((p * 256)) >/dev/null; done
t0=$(date +%s.%N)
L repair --volume vol0
t1=$(date +%s.%N)
# The admin token as a curl header file (not in argv, where `ps` shows it).
(umask 077; printf 'Authorization: Bearer %s\n' "$(cat "$WORK/c/admin.token")" > "$WORK/auth.header")
curl -s -H @"$WORK/auth.header" http://127.0.0.1:32910/api/v1/repairs | python3 -c "
import json, sys
r = json.load(sys.stdin)
b = r['bytes']['vol0']
tree, page, blk = b['tree_bytes'], b['page_bytes'], b['block_bytes']
total = tree + page + blk
print(f'repair of 10 damaged pages: {tree} B checksum pages + {page} B slice pages + {blk} B blocks = {total} B ({total/1024:.1f} KiB) in {$t1-$t0:.2f} s wall (lazarus repair)')
print(f'copying one replica\'s whole slice file instead: {65536*4096} B (256 MiB), {65536*4096/total:.0f}x more')
print('counters:', json.dumps(r['counters']['vol0']))
"
