#!/usr/bin/env bash
# One command, offline: build kiln, the busybox base image and examples/hello, and show the result.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  [ -x /bin/busybox ] || missing+=(busybox-static umoci)
  for p in libseccomp-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
cargo build --release --quiet
export KILN_ROOT="${KILN_ROOT:-$PWD/target/demo-store}"
kiln=target/release/kiln
examples/build-base.sh "$kiln" --progress plain
"$kiln" build --progress plain -t hello:latest --output type=oci,dest=target/hello-oci examples/hello
echo "--- images"
"$kiln" images
echo "--- config of hello"
"$kiln" inspect hello
if command -v umoci >/dev/null; then
  rm -rf target/hello-bundle
  umoci unpack --image target/hello-oci:latest target/hello-bundle >/dev/null
  echo "--- /app in the unpacked image"
  ls -l target/hello-bundle/rootfs/app
  echo "--- running the entrypoint in the unpacked rootfs"
  chroot target/hello-bundle/rootfs /app/hello.sh kiln
fi
