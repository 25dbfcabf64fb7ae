#!/usr/bin/env bash
# kiln vs buildah building for two platforms at once: `kiln build --platform
# linux/amd64,linux/arm64` beside `buildah build --platform linux/amd64,linux/arm64 --manifest`
# on the same recipes and the same two-platform busybox base; arm64 RUN steps go through the
# host's binfmt_misc QEMU handler for both tools.
#
# Usage (as root): bench/platforms.sh [RUNS]     RUNS: timed runs per case and tool (default 3)
#   BENCH_CASES=DIR   the bench recipes (default ../shared/bench-cases beside this repo)
#   BENCH_WORK=DIR    scratch space, emptied first (default /tmp/kiln-bench-platforms)
#   PLATFORM_CASES="steps20 multistage"   which cases to time
#
# What it does:
# - installs buildah, qemu-user-static, GNU time and busybox-static if missing; builds kiln
#   (release); registers the arm64 handler and fetches arm64's busybox (examples/foreign-arch.sh);
# - builds the busybox base for linux/amd64 and linux/arm64 with kiln (examples/build-base.sh),
#   exports it as one OCI archive (an index), and gives buildah the same images: each platform's
#   pulled from that archive and a manifest list docker.io/library/busybox:latest over them, so
#   `FROM busybox` resolves locally per platform for both (buildah runs with --pull-never);
# - buildah: its own storage root, overlay driver, `--isolation chroot` (crun fails on this VM),
#   `--layers`, `--jobs 2`, then `manifest push --all` of the list into an OCI layout; kiln:
#   `--output type=oci,dest=DIR`. Both end with the index and both images in an OCI layout;
# - cold runs: a fresh kiln store (base imported, untimed) and a fresh buildah storage root
#   (base set up, untimed) every run; runs alternate kiln, buildah; `sync` before each;
# - prints wall times (GNU time %e), peak RSS (%M) and the medians' kiln/buildah ratio, and
#   each case's floor: its RUN work alone in plain chroots, amd64 natively and arm64 through the
#   same QEMU, both at once (bench/floor.py), the best time any builder could reach.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
runs="${1:-3}"
cases_dir="${BENCH_CASES:-$here/../shared/bench-cases}"
[ -d "$cases_dir" ] || cases_dir=/work/shared/bench-cases
work="${BENCH_WORK:-/tmp/kiln-bench-platforms}"
cases="${PLATFORM_CASES:-steps20 multistage}"
platforms=linux/amd64,linux/arm64
[ "$(id -u)" = 0 ] || { echo "run as root (kiln's RUN sandbox and buildah need it)" >&2; exit 2; }

need=()
command -v buildah >/dev/null || need+=(buildah)
[ -x /usr/bin/time ] || need+=(time)
[ -f /usr/lib/binfmt.d/qemu-aarch64.conf ] || need+=(qemu-user-static)
[ -x /bin/busybox ] && file -L /bin/busybox | grep -q static || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$here/examples/foreign-arch.sh" arm64 >/dev/null

echo "== building kiln (release)" >&2
(cd "$here" && cargo build --release --quiet)
kiln="$here/target/release/kiln"

rm -rf "$work"
mkdir -p "$work"
out="$work/results.tsv"
: > "$out"

echo "== the busybox base for $platforms, for both" >&2
KILN_ROOT="$work/base" "$here/examples/build-base.sh" "$kiln" --progress quiet --source-date-epoch 0 \
  --platform "$platforms" >/dev/null
mkdir -p "$work/from-busybox"
printf 'FROM busybox\n' > "$work/from-busybox/Dockerfile"
"$kiln" --root "$work/base" build -q --platform "$platforms" \
  -o "type=oci-archive,dest=$work/busybox.tar" "$work/from-busybox" >/dev/null

kiln_store() { # a fresh kiln store with the two-platform base imported
  rm -rf "$1"
  "$kiln" --root "$1" import "$work/busybox.tar" busybox >/dev/null
}
buildah_store() { # a fresh buildah storage root: each platform's base and a list over them
  local r=$1 arch
  buildah_clean "$r"
  mkdir -p "$r"
  for arch in amd64 arm64; do
    buildah_in "$r" pull -q --arch "$arch" "oci-archive:$work/busybox.tar" >/dev/null
  done
  buildah_in "$r" manifest create docker.io/library/busybox:latest >/dev/null
  buildah_in "$r" manifest add --all docker.io/library/busybox:latest "oci-archive:$work/busybox.tar" >/dev/null
}
kiln_build() { # STORE CASE DEST
  "$kiln" --root "$1" build --progress plain --platform "$platforms" \
    -f "$cases_dir/$2/Dockerfile" -o "type=oci,dest=$3" "$cases_dir/$2"
}
buildah_build() { # STORAGE CASE DEST
  local b=(buildah --root "$1/root" --runroot "$1/run" --storage-driver overlay)
  "${b[@]}" bud --pull-never --layers --isolation chroot --jobs 2 --platform "$platforms" \
    --manifest bench-list -f "$cases_dir/$2/Dockerfile" "$cases_dir/$2" &&
    "${b[@]}" manifest push --all bench-list "oci:$3"
}
export -f kiln_build buildah_build
export kiln cases_dir platforms

for case in $cases; do
  echo "== $case, $platforms" >&2
  for run in $(seq 1 "$runs"); do
    ks="$work/kiln-store-$case-$run"
    bs="$work/buildah-store-$case-$run"
    o="$work/out-$case-$run"
    kiln_store "$ks"
    timed kiln "$case" "$run" bash -c 'kiln_build "$@"' _ "$ks" "$case" "$o/kiln"
    buildah_store "$bs"
    timed buildah "$case" "$run" bash -c 'buildah_build "$@"' _ "$bs" "$case" "$o/buildah"
  done
done
echo "== floors: each case's RUN work alone in a chroot, amd64 natively and arm64 emulated, at once (bench/floor.py)" >&2
arm_busybox="$("$here/examples/foreign-arch.sh" arm64)"
for case in $cases; do
  f="$work/floor.$$"
  python3 "$here/bench/floor.py" "$kiln" "$cases_dir/$case/Dockerfile" 1 > "$f.amd64" &
  FLOOR_BUSYBOX="$arm_busybox" python3 "$here/bench/floor.py" "$kiln" "$cases_dir/$case/Dockerfile" 1 > "$f.arm64"
  wait
  secs=$(awk -v a="$(cat "$f.amd64")" -v b="$(cat "$f.arm64")" 'BEGIN { print (a > b ? a : b) }')
  printf 'floor\t%s\t0\t%s\t0\n' "$case" "$secs" >> "$out"
  echo "  floor $case: amd64 $(cat "$f.amd64") s, arm64 $(cat "$f.arm64") s" >&2
done

echo "== cleaning up" >&2
for bs in "$work"/buildah-store-*; do buildah_clean "$bs"; done
rm -rf "$work"/kiln-store-* "$work"/out-*

echo "== summary (medians of $runs; $platforms)"
python3 - "$out" <<'PY'
import statistics, sys
from collections import defaultdict
rows, rss = defaultdict(list), defaultdict(list)
for line in open(sys.argv[1]):
    tool, case, run, secs, kib = line.split("\t")
    rows[(tool, case)].append(float(secs))
    rss[(tool, case)].append(int(kib))
# floor: the slower platform's RUN work alone (both platforms at once), so floor/buildah is the
# best ratio any builder could reach in this run.
print("| case | kiln (s) | buildah (s) | kiln/buildah | floor (s) | floor/buildah | runs kiln | runs buildah | kiln peak RSS (MiB) | buildah peak RSS (MiB) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for case in sorted({c for t, c in rows if t != "floor"}):
    k, b = rows.get(("kiln", case)), rows.get(("buildah", case))
    if not k or not b:
        continue
    km, bm = statistics.median(k), statistics.median(b)
    fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)
    f = rows.get(("floor", case))
    floor = f"{f[0]:.2f} | {f[0] / bm:.3f}" if f else "- | -"
    print(f"| {case} | {km:.2f} | {bm:.2f} | {km / bm:.3f} | {floor} | {fmt(k)} | {fmt(b)} | "
          f"{max(rss[('kiln', case)]) / 1024:.1f} | {max(rss[('buildah', case)]) / 1024:.1f} |")
PY
