#!/usr/bin/env bash
# How a three-node `lazarus up` cluster's members keep hearing each other under a
# flood of writes: copies 2 GiB of other files on the same disk (writeback pressure),
# then writes vol0 whole twice with nbdcopy (four connections of large writes through
# n1), and counts in the nodes' logs the Raft calls that timed out (150 ms), the pings
# missed ("stopped answering", 300 ms), requests refused for a lapsed lease, and
# take-overs. None of these lose data;
# enough of them in a row start a failover or jeopardy mode that the flood did not call
# for. Prints one line; exits non-zero if nbdcopy failed.
# Usage: bench/flood.sh   (LAZARUS_BIN=<binary> measures that build instead)
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
lazarus_bin
PORT=${PORT_BASE:-36900}
W=$(mktemp -d /var/tmp/lazarus-flood.XXXXXX)
start_cluster "$W" "$PORT"
head -c 1G /dev/urandom > "$W/seed.img"
cp --sparse=never "$W/seed.img" "$W/a.img"
cp --sparse=never "$W/seed.img" "$W/b.img"
rc=0
for _ in 1 2; do
  nbdcopy "$W/seed.img" "nbd://127.0.0.1:$PORT/vol0" || rc=1
done
logs() { cat "$W"/c/n*/node.log; }
echo "nbdcopy $([ $rc = 0 ] && echo ok || echo FAILED); Raft calls timed out: $(logs | grep 'openraft' | grep -c 'timed out after'); pings missed: $(logs | grep -c 'stopped answering'); requests refused for a lapsed lease: $(logs | grep -c 'lease on .* lapsed'); takeovers: $(logs | grep -c 'kind="takeover"')"
exit $rc
