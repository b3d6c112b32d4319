#!/usr/bin/env bash
# Runs the cluster simulation (crates/lazarus-sim, docs/simulator.md) over many seeds:
# three real storage nodes, the recovery server and an NBD client on simulated hosts,
# with seeded crashes, partitions and recovery-server crashes. Each seed runs in its
# own process and replays exactly; a failing seed prints its events, and
# `target/release/lazarus-sim seed SEED [FAULTS [LOAD_SECS]]` replays it (with
# LAZARUS_SIM_LOG=debug for the nodes' logs).
#
# Usage: scripts/sim.sh [FIRST [COUNT [JOBS [FAULTS [LOAD_SECS]]]]]
#        (defaults: 1 1000 2 3 20; LAZARUS_SIM_DISK_FAULTS=1 adds bit rot and EIO)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p lazarus-sim
exec target/release/lazarus-sim sweep "${1:-1}" "${2:-1000}" "${3:-2}" "${4:-3}" "${5:-20}"
