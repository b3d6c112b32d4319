#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60). The test command runs it
# for a few seconds; run it longer by hand, e.g. `scripts/fuzz.sh 600`.
# Stable toolchain: cargo-fuzz with --sanitizer none.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
mkdir -p fuzz/corpus
for t in nbd_request nbd_handshake disk_decoders journal_replay rpc_frames node_bodies rs_requests rs_files admin_bodies; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "fuzz/corpus/$t"
  # fuzz/corpus (not in git) gathers what a run finds; fuzz/seeds (in git) holds
  # hand-made valid inputs that random bytes would not find (JSON requests, logs).
  seeds=(); [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | tail -n 3
  # cargo fuzz exits non-zero when a target crashed; pipefail carries it.
done
echo "fuzz: all targets ran without a crash"
