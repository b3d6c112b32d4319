#!/usr/bin/env bash
# Runs every Lazarus test: lint, unit, integration (real lazarus processes + real NBD
# clients), and a short fuzzing pass. Installs what it needs when missing.
# Usage: scripts/test.sh            (from a fresh clone, as root or with sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Test clients, from apt, only when missing.
pkgs=()
command -v fio      >/dev/null || pkgs+=(fio)
command -v nbdcopy  >/dev/null || pkgs+=(libnbd-bin)
command -v nbdinfo  >/dev/null || pkgs+=(libnbd-bin)
command -v nbdkit   >/dev/null || pkgs+=(nbdkit)
command -v qemu-io  >/dev/null || pkgs+=(qemu-utils)
command -v qemu-nbd >/dev/null || pkgs+=(qemu-utils)
command -v curl     >/dev/null || pkgs+=(curl)
# Building: the system's OpenSSL (NBD over TLS) through pkg-config.
command -v pkg-config >/dev/null || pkgs+=(pkg-config)
{ command -v pkg-config >/dev/null && pkg-config --exists openssl; } || pkgs+=(libssl-dev)
command -v ip       >/dev/null || pkgs+=(iproute2)
command -v chromium >/dev/null || pkgs+=(chromium)
{ command -v nbdsh >/dev/null && /usr/bin/python3 -c 'import nbd' 2>/dev/null; } || pkgs+=(python3-libnbd)
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || pkgs+=(python3-prometheus-client)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "== installing test clients: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

echo "== fuzz smoke (${FUZZ_SECONDS:=5}s per target)"
scripts/fuzz.sh "$FUZZ_SECONDS"
