#!/usr/bin/env bash
# Builds the busybox base image offline and names it `busybox` in kiln's store.
# Usage: examples/build-base.sh [KILN] [extra kiln build args...]
# With --platform P[,P...] among the args, the base is an index with one image per platform:
# the host's busybox comes from the busybox-static package, the others' from Debian's
# busybox-static for their architecture (examples/foreign-arch.sh fetches and caches it, and
# registers the QEMU handler their RUN steps need).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kiln="${1:-$here/../target/release/kiln}"
shift || true
busybox="$(command -v busybox || true)"
for candidate in /bin/busybox /usr/bin/busybox; do
  if [ -x "$candidate" ] && file -L "$candidate" 2>/dev/null | grep -q static; then busybox="$candidate"; fi
done
[ -n "$busybox" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 2; }
platforms=""
prev=""
for a in "$@"; do
  case "$a" in --platform=*) platforms="${a#--platform=}" ;; esac
  [ "$prev" = --platform ] && platforms="$a"
  prev="$a"
done
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$here/busybox/Dockerfile" "$here/busybox/passwd" "$here/busybox/group" "$ctx/"
host_arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
[ -n "$platforms" ] || platforms="linux/$host_arch"
for p in ${platforms//,/ }; do
  arch="${p#*/}"  # arch[/variant], OCI names
  case "$arch" in
    x86_64) deb=amd64 file=amd64 ;;
    aarch64 | arm64 | arm64/v8) deb=arm64 file=arm64 ;;
    arm | arm/v7) deb=armhf file=armv7 ;;
    arm/v6) deb=armel file=armv6 ;;
    386) deb=i386 file=386 ;;
    ppc64le) deb=ppc64el file=ppc64le ;;
    *) deb="$arch" file="$arch" ;;
  esac
  if [ "$deb" = "$host_arch" ]; then
    cp "$busybox" "$ctx/busybox-$file"
  else
    cp "$("$here/foreign-arch.sh" "$deb")" "$ctx/busybox-$file"
  fi
done
"$kiln" build -t busybox:latest "$@" "$ctx"
