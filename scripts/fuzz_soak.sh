#!/usr/bin/env bash
# Soaks fuzz targets one after another, SECONDS each (default 3600), at the lowest CPU
# priority, then minimizes each corpus (cargo fuzz cmin) so what the soak found can be
# kept in the repository (fuzz/corpus). One line per target is appended to
# fuzz/soak.log: date, target, seconds, runs, coverage, crashes.
#
#   scripts/fuzz_soak.sh 3600 rpc_frames node_bodies
#   scripts/fuzz_soak.sh 3600            # every target (9 hours)
# FUZZ_TARGET_DIR builds elsewhere than fuzz/target (two soaks at once, or a soak
# while another's binary runs).
set -uo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(nbd_request nbd_handshake rpc_frames node_bodies rs_requests rs_files disk_decoders journal_replay admin_bodies)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
mkdir -p fuzz/corpus fuzz/logs
tdir=(); [ -n "${FUZZ_TARGET_DIR:-}" ] && tdir=(--target-dir "$FUZZ_TARGET_DIR")
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  seeds=(); [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  log="fuzz/logs/$t.log"
  start=$(date +%s)
  nice -n 19 cargo fuzz run --sanitizer none "${tdir[@]}" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*')
  crashes=$(ls fuzz/artifacts/"$t"/crash-* 2>/dev/null | wc -l)
  # The merged corpus keeps only inputs that add coverage.
  nice -n 19 cargo fuzz cmin --sanitizer none "${tdir[@]}" "$t" "fuzz/corpus/$t" >>"$log" 2>&1
  files=$(ls "fuzz/corpus/$t" | wc -l)
  echo "$(date -u +%FT%TZ) $t seconds=$took runs=${runs:-?} cov=${cov:-?} corpus_files=$files exit=$rc crash_artifacts=$crashes" | tee -a fuzz/soak.log
done
