# Shared by the bench scripts that run a three-node `lazarus up` cluster; sourced, not
# run. After `cd` to the repository's root:
#   lazarus_bin                      sets BIN: $LAZARUS_BIN if set, else this tree's
#                                    release build (built now)
#   start_cluster DIR PORT [ARGS...] starts `lazarus up` on DIR/c with 1 GiB volumes
#                                    (NBD without TLS, $UP_ARGS and ARGS added), waits
#                                    until it serves, and stops it and removes DIR at exit
#   node_pid DIR NODE                the process id of node NODE (n1, n2, n3)
#   fill_and_before URI              writes the first 1 GiB of URI with 1 MiB writes, then
#                                    runs the jobs of $BEFORE ("rw bs iodepth seconds",
#                                    `;` between jobs) with fio_job
#   fio_job URI RW BS IODEPTH SECS   one time-based fio job over 1 GiB of URI, JSON output

lazarus_bin() {
  if [ -n "${LAZARUS_BIN:-}" ]; then
    BIN="$LAZARUS_BIN"
  else
    cargo build --release --quiet || exit 1
    BIN="$PWD/target/release/lazarus"
  fi
}

start_cluster() {
  local dir=$1 port=$2
  shift 2
  # shellcheck disable=SC2086 # UP_ARGS is a list of arguments
  "$BIN" up --data "$dir/c" --port-base "$port" --volume-size 1GiB --nbd-tls off ${UP_ARGS:-} "$@" \
    > "$dir/up.log" 2>&1 &
  UP=$!
  # shellcheck disable=SC2064 # expanded now: the directory and pid of this cluster
  trap "kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf '$dir'" EXIT
  for _ in $(seq 300); do grep -q "Press Ctrl-C" "$dir/up.log" && break; sleep 0.2; done
  grep -q "Press Ctrl-C" "$dir/up.log" || { echo "lazarus up did not start:" >&2; cat "$dir/up.log" >&2; exit 1; }
}

node_pid() {
  python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['pid'])" "$1/c/$2/endpoints.json"
}

fio_job() {
  fio --name="$2" --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=1g \
      --time_based --runtime="$5" --randrepeat=0 --norandommap --output-format=json
}

fill_and_before() {
  local uri=$1 b before
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=1g \
      --output-format=terse >/dev/null
  IFS=';' read -ra before <<< "${BEFORE:-}"
  for b in "${before[@]}"; do
    # shellcheck disable=SC2086 # the job's four words
    [ -n "${b// }" ] && fio_job "$uri" $b >/dev/null
  done
  return 0
}
