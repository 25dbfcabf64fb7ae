#!/usr/bin/env bash
# One command, offline: build kiln, the busybox base image and examples/hello, and show the result.
set -euo pipefail
cd "$(dirname "$0")"
if ! [ -x /bin/busybox ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static umoci >/dev/null
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
