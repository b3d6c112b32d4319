#!/usr/bin/env bash
# Where the CPU goes on a replicated write: runs fio randwrite 4k QD32 for RUNTIME
# seconds against vol0 of a fresh three-node `lazarus up` cluster (RF3) and against a
# fresh RF1 volume, and prints each process's CPU time (user+system, from /proc) per
# completed write.  Usage: bench/cpu_per_write.sh [RUNTIME]
# LAZARUS_BIN=path measures that binary instead of this tree's release build.
# UP_ARGS adds arguments to `lazarus up`: UP_ARGS=--insecure-cluster measures the
# cluster without its mutual TLS, to see what TLS costs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-8}
. bench/lib.sh
lazarus_bin
WORK=$(mktemp -d /var/tmp/lazarus-cpu.XXXXXX)
start_cluster "$WORK" 31900
"$BIN" volume create solo --size 1GiB --replicas 1 --primary n1 --data "$WORK/c" >/dev/null
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
pids() { for n in n1 n2 n3; do node_pid "$WORK" "$n"; done; }
HZ=$(getconf CLK_TCK)
for vol in vol0 solo; do
  # The working set mapped first, so the measured writes overwrite stored blocks.
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:31900/$vol" --rw=write --bs=1M \
      --iodepth=8 --size=256m --output-format=terse >/dev/null
  P=($(pids))
  B=(); for p in "${P[@]}"; do B+=($(ticks "$p")); done
  fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:31900/$vol" --rw=randwrite --bs=4k --iodepth=32 \
      --size=256m --time_based --runtime="$RUNTIME" --randrepeat=0 --norandommap \
      --output-format=json > "$WORK/fio.json"
  IOS=$(python3 -c "import json,sys;t=open('$WORK/fio.json').read();d=json.loads(t[t.index('{'):]);print(d['jobs'][0]['write']['total_ios'])")
  FIOCPU=$(python3 -c "import json;t=open('$WORK/fio.json').read();d=json.loads(t[t.index('{'):]);j=d['jobs'][0];print((j['usr_cpu']+j['sys_cpu'])/100*$RUNTIME)")
  line="$vol: $IOS writes in ${RUNTIME}s ($((IOS / RUNTIME))/s); CPU µs per write:"
  for i in 0 1 2; do
    A=$(ticks "${P[$i]}")
    line="$line n$((i+1)) $(python3 -c "print(round(($A-${B[$i]})/$HZ/$IOS*1e6,1))")"
  done
  line="$line fio $(python3 -c "print(round($FIOCPU/$IOS*1e6,1))")"
  echo "$line"
done
