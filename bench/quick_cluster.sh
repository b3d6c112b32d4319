#!/usr/bin/env bash
# Quick Lazarus-only fio run against a three-node `lazarus up` cluster (no baselines):
# vol0 (three copies) through n1, prefilled with 1 GiB of random data, then each
# workload for RT seconds (default 5): IOPS, MiB/s and p99 completion latency.
# For A/B checks while tuning; comparisons with qemu-nbd/nbdkit come only from
# bench/run.sh.
# WORKLOADS="rw bs qd;..." runs those fio jobs in that order instead of the default
# "randread 4k 32;randwrite 4k 32;randwrite 4k 1;read 1m 8;write 1m 8".
# LAZARUS_BIN=<binary> runs that build instead of building this checkout; UP_ARGS adds
# arguments to `lazarus up`.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
lazarus_bin
RT=${RT:-5}
PORT=${PORT_BASE:-33900}
W=$(mktemp -d /var/tmp/lazarus-quick-cluster.XXXXXX)
start_cluster "$W" "$PORT"
head -c 1G /dev/urandom > "$W/seed.img"
nbdcopy "$W/seed.img" "nbd://127.0.0.1:$PORT/vol0"
rm -f "$W/seed.img"
IFS=';' read -r -a SPECS <<< "${WORKLOADS:-randread 4k 32;randwrite 4k 32;randwrite 4k 1;read 1m 8;write 1m 8}"
for spec in "${SPECS[@]}"; do
  set -- $spec
  fio --name=j --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol0" --rw="$1" --bs="$2" --iodepth="$3" \
      --size=1g --time_based --runtime="$RT" --output-format=json 2>/dev/null | python3 -c "
import json, sys
t = sys.stdin.read(); d = json.loads(t[t.index('{'):]); j = d['jobs'][0]
k = 'read' if j['read']['total_ios'] > 0 else 'write'
x = j[k]
print('%-10s %-3s qd%-3s %8.0f IOPS %6.0f MiB/s  p99 %6.0f us' % ('$1', '$2', '$3', x['iops'], x['bw'] / 1024, x['clat_ns']['percentile']['99.000000'] / 1000))"
done
