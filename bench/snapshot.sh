#!/usr/bin/env bash
# Snapshots benchmark (Snapshots issue), one three-node `lazarus up` cluster:
#  1. vol0 (SIZE GiB, three copies) fully mapped: provisioned zeroes everywhere
#     (`qemu-io write -z`, 1 GiB per request) and 1 GiB of random data at its start;
#  2. snapshot a, taken three times over (a0 checkpoints the fill, a1 and a2 do not):
#     the time the primary reports for all three copies, and the snapshot file's size;
#  3. 1% of the volume rewritten with random data (fio, 1 MiB writes at random
#     offsets, no offset twice), then snapshot b;
#  4. `volume export vol0@b --since a2`: the time and the diff file's size; then the
#     time to apply it to another volume;
#  5. `volume clone vol0@a2 clone0` (the whole volume, on all three copies): the
#     clone shares a2's slice pages (it records their checksums); 1 GiB of 4 KiB
#     random writes to the clone (each first write to a page makes it the clone's);
#     `volume revert vol0 a2` (undoing the 1%: the snapshot's block ids mapped where
#     the volume differs, no data copied); `snapshot delete vol0 a2` while the clone
#     shares its pages (each copy of the clone first makes them its own);
#  6. what copy-on-write costs writes: fio 4 KiB random writes (QD32, 15 s) right
#     after a new snapshot (the first write to each slice page stores its old content
#     as a page block), then again (those pages kept already), then with every
#     snapshot deleted.
# Usage: bench/snapshot.sh [SIZE_GIB]   (64 by default; LAZARUS_BIN to use another build)
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-64}
command -v fio >/dev/null || { echo "fio is required" >&2; exit 2; }
command -v nbdcopy >/dev/null || { echo "nbdcopy (libnbd-bin) is required" >&2; exit 2; }
if [ -z "${LAZARUS_BIN:-}" ]; then cargo build --release --quiet; fi
BIN="${LAZARUS_BIN:-$PWD/target/release/lazarus}"
WORK="$(mktemp -d /var/tmp/lazarus-snapshot.XXXXXX)"
PORT=23300
"$BIN" up --data "$WORK/c" --port-base $PORT --volume-size "${GIB}GiB" --nbd-tls off \
  > "$WORK/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for i in $(seq 600); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
U=nbd://127.0.0.1:$PORT/vol0
L() { "$BIN" "$@" --data "$WORK/c"; }
echo "== filling vol0 (${GIB} GiB mapped)"
cmds=()
for i in $(seq 0 $((GIB - 1))); do cmds+=(-c "write -z ${i}G 1G"); done
qemu-io -f raw "${cmds[@]}" -c flush "$U" > /dev/null
head -c $((1 << 30)) /dev/urandom > "$WORK/rand.img"
nbdcopy "$WORK/rand.img" "$U"
rm -f "$WORK/rand.img"
L volume list
echo "== snapshots of the full volume"
for s in a0 a1 a2; do L snapshot create vol0 $s; done
ls -l "$WORK/c/n1/volumes/vol0/snapshots/a2.snap" | awk '{print "snapshot file: " $5 " bytes"}'
echo "== rewriting 1% of vol0"
CHANGE_MIB=$((GIB * 1024 / 100))
fio --name=change --ioengine=nbd --uri="$U" --rw=randwrite --bs=1M --iodepth=8 \
  --size="${GIB}g" --io_size="${CHANGE_MIB}m" --refill_buffers --randrepeat=0 \
  --output-format=terse > /dev/null
qemu-io -f raw -c flush "$U" > /dev/null
L snapshot create vol0 b
echo "== incremental export of ${CHANGE_MIB} MiB changed"
L volume export vol0@b "$WORK/b.diff" --since a2
ls -l "$WORK/b.diff" | awk '{print "diff file: " $5 " bytes"}'
echo "== applying it to another volume (--force: that volume does not hold a2)"
L volume create copy --size "${GIB}GiB"
L volume import "$WORK/b.diff" --volume copy --diff --force
echo "== clone of the whole snapshot a2 (${GIB} GiB mapped), three copies"
L volume clone vol0@a2 clone0
L volume list | grep -E "^(VOLUME|clone0)"
echo "== 4 KiB random writes to the clone: first writes to its shared pages (fio QD32, 20 s)"
fio --name=clonew --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/clone0" --rw=randwrite --bs=4k \
  --iodepth=32 --size="${GIB}g" --time_based --runtime=20 --refill_buffers --randrepeat=0 \
  --output-format=json > "$WORK/fio.json" 2>&1
python3 -c 'import json,sys; s=open(sys.argv[1]).read(); j=json.loads(s[s.index("{"):])["jobs"][0]["write"]; print("%.0f IOPS, p99 %.2f ms" % (j["iops"], j["clat_ns"]["percentile"]["99.000000"]/1e6))' "$WORK/fio.json"
qemu-io -f raw -c flush "nbd://127.0.0.1:$PORT/clone0" > /dev/null
L volume list | grep -E "^(VOLUME|clone0)"
echo "== revert of vol0 to a2 (undoing the ${CHANGE_MIB} MiB changed)"
L volume revert vol0 a2
echo "== deleting a2 while clone0 shares its pages (each copy of clone0 makes them its own first)"
t0=$(date +%s.%N)
L snapshot delete vol0 a2
echo "snapshot delete took $(python3 -c "import sys; print('%.2f s' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$(date +%s.%N)")"
L volume list | grep -E "^(VOLUME|clone0)"
L volume delete clone0 > /dev/null
echo "== what a snapshot costs writes (fio randwrite 4 KiB QD32, 15 s each)"
iops() {
  fio --name=cow --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 \
    --size="${GIB}g" --time_based --runtime=15 --refill_buffers --randrepeat=0 \
    --output-format=json > "$WORK/fio.json" 2>&1 || { cat "$WORK/fio.json" >&2; return 1; }
  python3 -c 'import json,sys; s=open(sys.argv[1]).read(); j=json.loads(s[s.index("{"):])["jobs"][0]["write"]; print("%.0f IOPS, p99 %.2f ms" % (j["iops"], j["clat_ns"]["percentile"]["99.000000"]/1e6))' "$WORK/fio.json"
}
L snapshot create vol0 c > /dev/null
echo "just after snapshot c (copy-on-write of each page's first change): $(iops)"
echo "again (pages kept already): $(iops)"
for s in a0 a1 b c; do L snapshot delete vol0 $s > /dev/null; done
echo "no snapshot: $(iops)"
