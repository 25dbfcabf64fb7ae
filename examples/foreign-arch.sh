#!/usr/bin/env bash
# Makes another architecture's busybox usable offline, for multi-platform base images:
# - as root, registers Debian's static QEMU for ARCH with binfmt_misc when no handler is
#   registered (qemu-user-static registers its handlers through systemd-binfmt or
#   update-binfmts, which do not run in a chroot or without systemd): mounts binfmt_misc if
#   needed and writes the package's own line from /usr/lib/binfmt.d/ (flags with F) into it;
# - fetches Debian's busybox-static for ARCH once (dpkg --add-architecture ARCH, apt-get
#   download) into a cache, and prints the path of its static busybox.
# Usage: examples/foreign-arch.sh ARCH      ARCH: a Debian architecture (arm64, armhf, s390x, ...)
#   KILN_DEB_CACHE=DIR   where the packages are kept (default: target/debs in the repository)
set -euo pipefail
arch="${1:?usage: foreign-arch.sh ARCH}"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${KILN_DEB_CACHE:-$here/../target/debs}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

# The QEMU binfmt name of a Debian architecture.
case "$arch" in
  arm64) qemu=aarch64 ;;
  armhf | armel) qemu=arm ;;
  ppc64el) qemu=ppc64le ;;
  i386 | amd64) qemu= ;;
  *) qemu="$arch" ;;
esac
binfmt=/proc/sys/fs/binfmt_misc
if [ -n "$qemu" ] && [ "$(dpkg --print-architecture)" != "$arch" ] && [ ! -e "$binfmt/qemu-$qemu" ]; then
  [ "$(id -u)" = 0 ] || { echo "no binfmt_misc handler for $arch: run this as root to register one" >&2; exit 2; }
  conf="/usr/lib/binfmt.d/qemu-$qemu.conf"
  [ -f "$conf" ] || { echo "$conf not found: apt-get install qemu-user-static" >&2; exit 2; }
  # Another process may be doing the same right now: losing that race is fine.
  [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt" || [ -e "$binfmt/register" ]
  grep -v '^#' "$conf" | head -1 > "$binfmt/register" 2>/dev/null || [ -e "$binfmt/qemu-$qemu" ]
fi

dir="$cache/busybox-$arch"
if [ ! -x "$dir/bin/busybox" ]; then
  deb="$(ls "$cache"/busybox-static_*_"$arch".deb 2>/dev/null | head -1 || true)"
  if [ -z "$deb" ]; then
    [ "$(id -u)" = 0 ] || { echo "busybox-static:$arch is not in $cache: run this as root once to download it" >&2; exit 2; }
    if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
      dpkg --add-architecture "$arch"
      apt-get update -qq
    fi
    # apt's sandbox user cannot write to the cache; download in a directory it can, then move.
    tmp="$(mktemp -d)"
    chmod 755 "$tmp"
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -qq "busybox-static:$arch" ||
      { apt-get update -qq && apt-get download -qq "busybox-static:$arch"; }) >&2
    mv "$tmp"/busybox-static_*_"$arch".deb "$cache/"
    rm -rf "$tmp"
    deb="$(ls "$cache"/busybox-static_*_"$arch".deb | head -1)"
  fi
  rm -rf "$dir.tmp"
  dpkg-deb -x "$deb" "$dir.tmp"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
fi
echo "$dir/bin/busybox"
