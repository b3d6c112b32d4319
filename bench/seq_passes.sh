#!/usr/bin/env bash
# Sequential overwrite passes on one fresh three-node `lazarus up` cluster: vol0 (three
# copies, 1 GiB) prefilled with fio, then PASSES runs of fio write 1 MiB QD8 for RT
# seconds each (defaults 3 and 8). Prints each pass's throughput, how much the page
# cache grew during it (/proc/meminfo "Cached") and n1's block file size: the first
# pass after the prefill grows the block file (overwritten blocks' slots are reused only
# after a durability point), later passes do not, so the difference is what growing the
# page cache costs on this machine (see bench/folio_cost.py).
# Usage: bench/seq_passes.sh [PASSES]; LAZARUS_BIN=<binary> runs that build; RT, PORT_BASE.
set -euo pipefail
cd "$(dirname "$0")/.."
PASSES=${1:-3}
. bench/lib.sh
lazarus_bin
RT=${RT:-8}
PORT=${PORT_BASE:-33900}
WORK=$(mktemp -d /var/tmp/lazarus-seq-passes.XXXXXX)
start_cluster "$WORK" "$PORT"
cached() { awk '/^Cached:/{print int($2/1024)}' /proc/meminfo; }
fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol0" --rw=write --bs=1M --iodepth=8 \
    --size=1g --output-format=terse >/dev/null
for r in $(seq "$PASSES"); do
  c0=$(cached)
  bw=$(fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol0" --rw=write --bs=1M --iodepth=8 \
        --size=1g --time_based --runtime="$RT" --output-format=terse | grep ';' | awk -F';' '{print int($48/1024)}')
  echo "pass $r: $bw MiB/s; page cache +$(( $(cached) - c0 )) MiB; n1 blocks.dat $(stat -c %s "$WORK/c/n1/blocks.dat") bytes"
done
