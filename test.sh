#!/usr/bin/env bash
# The full test suite: formatting, lints, unit and end-to-end tests (end-to-end tests need root).
# As root, it first installs what the tests use (Debian packages), so a fresh machine needs
# nothing done by hand.
set -euo pipefail
cd "$(dirname "$0")"
packages=(busybox-static umoci skopeo docker-registry apache2-utils openssl python3-yaml uidmap fuse-overlayfs
  qemu-user-static libseccomp-dev pkg-config podman python3-jsonschema)
# The crates first: installing packages may bring Debian's ca-certificates, which rewrites the
# system CA bundle (a machine behind a TLS-intercepting proxy then can no longer reach the crate
# registry); nothing after this line needs the network for Rust.
cargo fetch --quiet
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing test dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Multi-platform tests: an arm64 busybox (fetched once) and its QEMU handler registered.
  examples/foreign-arch.sh arm64 >/dev/null
fi
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --quiet --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "kiln tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
