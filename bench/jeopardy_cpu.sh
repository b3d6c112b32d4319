#!/usr/bin/env bash
# CPU of each process during 4 KiB random writes to a protected volume (jeopardy mode:
# every write on the recovery server first), from /proc, over 4 s in the middle of a
# 10 s fio run (QD from $QD, default 32). With MODE=normal a normal-mode run comes
# first (so the jeopardy run starts with the drain of its unflushed writes).
# PERF=N records `perf record -g` of process N (1-3: n1-n3, 4: the recovery server)
# into /tmp/perf-jeopardy.data. LAZARUS_BIN: the binary (default: a release build).
# Usage: [MODE=normal] [QD=1] bench/jeopardy_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LAZARUS_BIN:-}" ]; then cargo build --release --quiet; fi
BIN="${LAZARUS_BIN:-$PWD/target/release/lazarus}"
WORK="$(mktemp -d /var/tmp/lazarus-jcpu.XXXXXX)"
"$BIN" up --data "$WORK/c" --port-base 23200 --volume-size 1GiB --nbd-tls off > "$WORK/up.log" 2>&1 &
UP=$!
trap '(grep -ho "writes not yet flushed.*" "$WORK"/c/n1/node.log | sed "s/^/drain: /") || true; kill -INT $UP 2>/dev/null; sleep 2; pkill -f "$WORK" 2>/dev/null || true; wait $UP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 600); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
U=nbd://127.0.0.1:23200/vol0
L() { "$BIN" "$@" --data "$WORK/c"; }
(umask 077; printf 'Authorization: Bearer %s\n' "$(cat "$WORK/c/admin.token")" > "$WORK/auth.header")
jeopardy() { curl -s -H @"$WORK/auth.header" http://127.0.0.1:23210/api/v1/jeopardy | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes']['vol0']['jeopardy'])"; }
pids() { for n in n1 n2 n3; do pgrep -f "$WORK/c/$n/node.toml"; done; pgrep -f "recovery-server --data $WORK"; }
ticks() { for p in $(pids); do awk '{printf "%d ", $14+$15}' "/proc/$p/stat"; done; }
run() { # label
  fio --name=x --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth="${QD:-32}" --size=1g \
      --time_based --runtime=10 2>/dev/null | grep -E "^  write:" | sed "s/^ */$1: /" &
  local f=$! a b
  sleep 3
  a=($(ticks))
  if [ -n "${PERF:-}" ]; then
    perf record -F 999 -g -p "$(pids | sed -n "${PERF}p")" -o /tmp/perf-jeopardy.data -- sleep 4 >/dev/null 2>&1
  else
    sleep 4
  fi
  b=($(ticks))
  wait $f
  local hz; hz=$(getconf CLK_TCK)
  echo "$1: CPU over 4 s, % of one core: n1 $(( (b[0]-a[0])*100/hz/4 )) n2 $(( (b[1]-a[1])*100/hz/4 )) n3 $(( (b[2]-a[2])*100/hz/4 )) recovery server $(( (b[3]-a[3])*100/hz/4 ))"
}
if [ "${MODE:-}" = normal ]; then run normal; fi
L volume protect vol0 >/dev/null
for _ in $(seq 100); do [ "$(jeopardy)" = True ] && break; sleep 0.1; done
run jeopardy
