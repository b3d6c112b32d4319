#!/usr/bin/env bash
# Checks the failover model (crates/lazarus-model, docs/model.md) deeper than its tests:
# release build, breadth-first search to DEPTH (default 16) for every configuration,
# one run per safety property (states, unique states, depth and time for each), then
# property 4 (healing) and the counterexample each bug flag brings back.
#
#   scripts/model.sh [DEPTH] [--quick]
#
# --quick skips the per-property runs (one run checks every property at once).
# Depth 16 takes about a minute per configuration and property on one core and a
# few GB of memory; each step deeper multiplies that by about 4.
set -euo pipefail
cd "$(dirname "$0")/.."
depth=16
quick=0
for a in "$@"; do
    case "$a" in
        --quick) quick=1 ;;
        *[!0-9]*) echo "usage: scripts/model.sh [DEPTH] [--quick]" >&2; exit 2 ;;
        *) depth=$a ;;
    esac
done
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
nice -n 19 cargo build --release -p lazarus-model --bin lazarus-model
bin=target/release/lazarus-model
status=0
for config in normal protected rs survivor survivor-crash; do
    if [ "$quick" = 1 ]; then
        nice -n 19 "$bin" --config "$config" --depth "$depth" || status=1
    else
        nice -n 19 "$bin" --config "$config" --depth "$depth" --per-property || status=1
    fi
    # Property 4 keeps every state in memory: cap its depth (about a minute each).
    case "$config" in
        survivor) cap=12 ;;
        survivor-crash) cap=11 ;;
        *) cap=13 ;;
    esac
    heal_depth=$(( depth > cap ? cap : depth ))
    nice -n 19 "$bin" --config "$config" --depth "$heal_depth" --heal 16 || status=1
done
echo
echo "== bug flags: each must bring back a counterexample"
# flag, configuration, depth
flags=(
    "unchecked_fence normal 10"
    "no_reconcile normal 9"
    "jeopardy_isolated_ack protected 10"
    "jeopardy_serves_on_raft_lease protected 7"
    "ack_without_lease_check protected 10"
    "jeopardy_entry_keeps_failed_live normal 12"
    "clear_flag_before_rs small 14"
    "fence_ignores_hold_outside_jeopardy normal 13"
    "claim_after_deposed small 16"
    "leader_enters_for_primary normal 13"
    "claim_with_stale_hold_epoch small-protected 16"
    "survivor_without_out survivor-crash 13"
    "survivor_without_contact_rule survivor 13"
)
for entry in "${flags[@]}"; do
    read -r flag config d <<<"$entry"
    out=$(nice -n 19 "$bin" --config "$config" --depth "$d" --first --bug "$flag" </dev/null || true)
    if grep -q VIOLATED <<<"$out"; then
        echo "-- $flag ($config): $(sed -n 2p <<<"$out")"
        awk '/VIOLATED/ {p = 1} p {print} p && /^$/ {exit}' <<<"$out"
    else
        echo "-- $flag ($config): NO COUNTEREXAMPLE to depth $d"
        status=1
    fi
done
exit $status
