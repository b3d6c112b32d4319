#!/usr/bin/env bash
# Quick Lazarus-only fio run (no baselines): the four bench/run.sh workloads on a
# freshly prefilled 1 GiB volume, RT seconds each (default 6). For A/B checks while
# tuning; comparisons with qemu-nbd/nbdkit come only from bench/run.sh.
# WORKLOADS="rw bs qd;rw bs qd;..." runs those fio jobs in that order instead (for
# instance "read 1m 8;randwrite 4k 32;read 1m 8": a sequential read before and after
# random overwrites). It ends with the block file's size and slot counts.
# LAZARUS_BIN=<binary> runs that build instead of building this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${LAZARUS_BIN:-}" ]; then
  BIN="$LAZARUS_BIN"
else
  cargo build --release --quiet
  BIN="$PWD/target/release/lazarus"
fi
W=$(mktemp -d /var/tmp/lazarus-quick.XXXXXX)
mkdir -p "$W/lz"
printf 'id = "q"\ndata_dir = "%s/lz"\nnbd_listen = "127.0.0.1:30903"\nadmin_listen = "127.0.0.1:30913"\n' "$W" > "$W/lz/node.toml"
"$BIN" node --config "$W/lz/node.toml" 2> "$W/node.log" &
P=$!
trap 'kill $P 2>/dev/null; wait $P 2>/dev/null; rm -rf "$W"' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:30913/api/v1/health >/dev/null && break; sleep 0.1; done
curl -sf -X POST -H 'content-type: application/json' -d '{"name":"vol0","size":"1GiB"}' http://127.0.0.1:30913/api/v1/volumes >/dev/null
head -c 1G /dev/urandom > "$W/seed.img"
nbdcopy "$W/seed.img" nbd://127.0.0.1:30903/vol0
rm -f "$W/seed.img"
IFS=';' read -r -a SPECS <<< "${WORKLOADS:-randwrite 4k 32;write 1m 8;randread 4k 32;read 1m 8}"
for spec in "${SPECS[@]}"; do
  set -- $spec
  fio --name=q --ioengine=nbd --uri=nbd://127.0.0.1:30903/vol0 --rw="$1" --bs="$2" --iodepth="$3" \
      --size=1g --time_based --runtime="${RT:-6}" --ramp_time=1 --norandommap --randrepeat=0 2>/dev/null \
    | grep -E "^  (write|read):" | sed "s/^/$1 $2: /"
done
# What the block file holds afterwards: its size, and the store's slots (live blocks,
# free slots, frees waiting for a durability point).
echo "blocks.dat: $(stat -c %s "$W/lz/blocks.dat") bytes; $(curl -sf http://127.0.0.1:30913/api/v1/status \
  | python3 -c 'import json,sys; b=json.load(sys.stdin)["blocks"]; print("slots %d, blocks %d, free %d, pending free %d" % (b["slots"], b["blocks"], b["free_slots"], b["pending_free"]))')"
