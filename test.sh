#!/usr/bin/env bash
# The full test suite: formatting, lints, unit and end-to-end tests (end-to-end tests need root).
set -euo pipefail
cd "$(dirname "$0")"
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
