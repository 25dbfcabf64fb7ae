#!/usr/bin/env bash
# The full test suite: formatting, lints, unit and end-to-end tests (end-to-end tests need root).
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet -- --test-threads=2
