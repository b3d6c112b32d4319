#!/usr/bin/env bash
# What NBD over TLS costs: nbdcopy writing and reading 512 MiB through one NBD
# connection set (nbdcopy's default: 4 connections, 64 requests each) in the clear,
# with X.509 and with TLS-PSK, against vol0 (RF3) of a three-node `lazarus up --nbd-tls
# on` cluster, and against qemu-nbd serving a raw file in the clear and with X.509 (the
# same credentials), in one run. Prints a Markdown table.
#
# Usage: bench/nbd_tls.sh [--reps N] [--mib N]
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3
MIB=512
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS="$2"; shift 2 ;;
    --mib) MIB="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for t in qemu-nbd nbdcopy python3; do
  command -v "$t" >/dev/null || { echo "$t missing: run scripts/test.sh once" >&2; exit 1; }
done
cargo build --release --quiet
BIN="$PWD/target/release/lazarus"
WORK="$(mktemp -d /var/tmp/lazarus-nbdtls.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

head -c $((MIB << 20)) /dev/urandom > "$WORK/src.img"
"$BIN" up --data "$WORK/c" --port-base 31500 --volume-size "${MIB}MiB" --nbd-tls on > "$WORK/up.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do grep -q "Press Ctrl-C" "$WORK/up.log" && break; sleep 0.2; done
grep -q "Press Ctrl-C" "$WORK/up.log" || { echo "lazarus up did not start:" >&2; cat "$WORK/up.log" >&2; exit 1; }
T="$WORK/c/nbd-tls"
# qemu-nbd with the same server credentials (it verifies client certificates too).
truncate -s "${MIB}M" "$WORK/qemu.img"
qemu-nbd -f raw -x vol0 -p 31550 -b 127.0.0.1 --persistent --shared=8 --cache=writeback --aio=threads "$WORK/qemu.img" &
PIDS+=($!)
cp --sparse=always "$WORK/qemu.img" "$WORK/qemu-tls.img"
qemu-nbd -f raw -x vol0 -p 31551 -b 127.0.0.1 --persistent --shared=8 --cache=writeback --aio=threads \
  --object "tls-creds-x509,id=tls0,endpoint=server,dir=$T/server,verify-peer=on" --tls-creds tls0 "$WORK/qemu-tls.img" &
PIDS+=($!)
sleep 1

X="?tls-certificates=$T/client"
declare -A URI=(
  ["Lazarus RF3, clear"]="nbd://127.0.0.1:31500/vol0"
  ["Lazarus RF3, X.509"]="nbds://127.0.0.1:31500/vol0$X"
  ["Lazarus RF3, PSK"]="nbds://lazarus@127.0.0.1:31500/vol0?tls-psk-file=$T/keys.psk"
  ["qemu-nbd, clear"]="nbd://127.0.0.1:31550/vol0"
  ["qemu-nbd, X.509"]="nbds://127.0.0.1:31551/vol0$X"
)
ORDER=("qemu-nbd, clear" "qemu-nbd, X.509" "Lazarus RF3, clear" "Lazarus RF3, X.509" "Lazarus RF3, PSK")
mibs() { python3 -c "import sys; print(f'{$MIB/float(sys.argv[1]):.0f}')" "$1"; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); python3 -c "print($t1-$t0)"; }
echo "nbdcopy of $MIB MiB, median of $REPS runs (MiB/s), $(nproc) cores, $(date -u +%F)"
echo
echo "| server | write MiB/s | read MiB/s |"
echo "|---|---:|---:|"
for name in "${ORDER[@]}"; do
  u="${URI[$name]}"
  W=(); R=()
  for _ in $(seq "$REPS"); do
    W+=("$(secs nbdcopy --flush "$WORK/src.img" "$u")")
    R+=("$(secs nbdcopy "$u" "$WORK/back.img")")
    cmp -n $((MIB << 20)) "$WORK/src.img" "$WORK/back.img" >/dev/null || { echo "$name: read back other bytes" >&2; exit 1; }
  done
  med() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
  echo "| $name | $(mibs "$(med "${W[@]}")") | $(mibs "$(med "${R[@]}")") |"
done
