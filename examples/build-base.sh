#!/usr/bin/env bash
# Builds the busybox base image offline and names it `busybox` in kiln's store.
# Usage: examples/build-base.sh [KILN] [extra kiln build args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kiln="${1:-$here/../target/release/kiln}"
shift || true
busybox="$(command -v busybox || true)"
for candidate in /bin/busybox /usr/bin/busybox; do
  if [ -x "$candidate" ] && file -L "$candidate" 2>/dev/null | grep -q static; then busybox="$candidate"; fi
done
[ -n "$busybox" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 2; }
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$here/busybox/Dockerfile" "$here/busybox/passwd" "$here/busybox/group" "$ctx/"
cp "$busybox" "$ctx/busybox"
"$kiln" build -t busybox:latest "$@" "$ctx"
