#!/usr/bin/env bash
# kiln vs buildah on the shared bench cases, plus kiln's layer writer vs sha256sum/gzip/pigz.
#
# Usage (as root): bench/run.sh [RUNS]      RUNS: timed runs per case and tool (default 3)
#   BENCH_CASES=DIR   the bench recipes (default ../shared/bench-cases beside this repo)
#   BENCH_WORK=DIR    scratch space, emptied first (default /tmp/kiln-bench)
#   BENCH_OUT=FILE    the raw results, one line per run (default $BENCH_WORK/results.tsv)
#
# What it does:
# - installs buildah, pigz, GNU time and busybox-static from apt if missing; builds kiln (release);
# - builds the offline busybox base with kiln (examples/build-base.sh), exports it as an OCI
#   archive and pulls that same archive into buildah, tagged docker.io/library/busybox:latest so
#   `FROM busybox` resolves locally for both (buildah runs with --pull-never);
# - buildah runs with its own storage root under $BENCH_WORK, the overlay driver and
#   `--isolation chroot` (crun's default OCI isolation fails on this VM: "cgroups in hybrid mode
#   not supported"), `--layers` (a cache entry per step, as kiln) and `--jobs 2` for stages;
# - cold runs are really cold for both: a fresh kiln store (the base imported, untimed) and a
#   fresh buildah storage root (the base pulled, untimed) for every run; "cached" rebuilds
#   steps20 in the store / storage root its cold run just filled;
# - every timed build ends with an OCI layout on disk (kiln: --output type=oci,dest=DIR;
#   buildah: bud && push IMG oci:DIR); case by case, runs interleaved (kiln, buildah, kiln, ...);
# - `sync` before every timed run, so no run pays for the write-back of an earlier one;
# - the wall time and peak RSS (GNU time %e / %M, the largest process of the tree) of every run
#   go to $BENCH_OUT; the summary (medians, kiln/buildah ratios) goes to stdout;
# - the floor of each case with RUN steps: that RUN work alone, natively in a chroot
#   (bench/floor.py), so floor/buildah is the best ratio any builder could reach.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
runs="${1:-3}"
cases_dir="${BENCH_CASES:-$here/../shared/bench-cases}"
[ -d "$cases_dir" ] || cases_dir=/work/shared/bench-cases
work="${BENCH_WORK:-/tmp/kiln-bench}"
out="${BENCH_OUT:-$work/results.tsv}"
[ "$(id -u)" = 0 ] || { echo "run as root (kiln's RUN sandbox and buildah need it)" >&2; exit 2; }

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v pigz >/dev/null || need+=(pigz)
[ -x /usr/bin/time ] || need+=(time)
[ -x /bin/busybox ] && file -L /bin/busybox | grep -q static || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== building kiln (release)" >&2
(cd "$here" && cargo build --release --quiet)
kiln="$here/target/release/kiln"
layer_bench="$(cd "$here" && cargo bench --bench layer --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("target", {}).get("name") == "layer" and m.get("executable"):
        print(m["executable"])')"

rm -rf "$work"
mkdir -p "$work"
: > "$out"

echo "== contexts and data" >&2
sh "$cases_dir/bigcopy/gen.sh" "$work/ctx-bigcopy" >&2
sh "$cases_dir/bigrun/gen.sh" --data >&2
data_dir=/tmp/bench-data

echo "== the busybox base, for both" >&2
KILN_ROOT="$work/base" "$here/examples/build-base.sh" "$kiln" --progress quiet --source-date-epoch 0 >/dev/null
mkdir -p "$work/from-busybox"
printf 'FROM busybox\n' > "$work/from-busybox/Dockerfile"
"$kiln" --root "$work/base" build -q -o "type=oci-archive,dest=$work/busybox.tar" "$work/from-busybox" >/dev/null

# The context and recipe of each case.
ctx_of() {
  case "$1" in
    bigcopy) echo "$work/ctx-bigcopy" ;;
    steps20|cached) echo "$cases_dir/steps20" ;;
    *) echo "$cases_dir/$1" ;;
  esac
}
recipe_of() {
  case "$1" in
    cached) echo "$cases_dir/steps20/Dockerfile" ;;
    *) echo "$cases_dir/$1/Dockerfile" ;;
  esac
}

kiln_store() { # a fresh kiln store with the base imported
  rm -rf "$1"
  "$kiln" --root "$1" import "$work/busybox.tar" busybox >/dev/null
}
buildah_store() { # a fresh buildah storage root with the same base
  local r=$1
  buildah_clean "$r"
  mkdir -p "$r"
  local id
  id="$(buildah_in "$r" pull -q "oci-archive:$work/busybox.tar")"
  buildah_in "$r" tag "$id" docker.io/library/busybox:latest
}
kiln_build() { # STORE CASE DEST
  "$kiln" --root "$1" build --progress plain -f "$(recipe_of "$2")" -o "type=oci,dest=$3" "$(ctx_of "$2")"
}
buildah_build() { # STORAGE CASE DEST
  local b=(buildah --root "$1/root" --runroot "$1/run" --storage-driver overlay)
  "${b[@]}" bud --pull-never --layers --isolation chroot --jobs 2 -t "bench-$2" \
    -f "$(recipe_of "$2")" "$(ctx_of "$2")" && "${b[@]}" push "bench-$2" "oci:$3"
}
export -f kiln_build buildah_build recipe_of ctx_of
export kiln work cases_dir

# Case by case, so the small cases are not timed in the wake of the big ones (on this VM the
# memory the big cases touch is handed back to the host afterwards, which slows whatever runs
# next); within a case, runs alternate between the tools. Nothing is deleted until every build
# has run: on ext4 without a journal, creating files shortly after many were deleted is slow
# (the inode allocator skips recently deleted inodes one by one), which would tax whichever
# tool runs right after a cleanup.
for case in steps20 bigcopy bigrun multistage; do
  echo "== $case" >&2
  for run in $(seq 1 "$runs"); do
    ks="$work/kiln-store-$case-$run"
    bs="$work/buildah-store-$case-$run"
    o="$work/out-$case-$run"
    kiln_store "$ks"
    timed kiln "$case" "$run" bash -c 'kiln_build "$@"' _ "$ks" "$case" "$o/kiln-$case"
    if [ "$case" = steps20 ]; then
      timed kiln cached "$run" bash -c 'kiln_build "$@"' _ "$ks" cached "$o/kiln-cached"
    fi
    buildah_store "$bs"
    timed buildah "$case" "$run" bash -c 'buildah_build "$@"' _ "$bs" "$case" "$o/buildah-$case"
    if [ "$case" = steps20 ]; then
      timed buildah cached "$run" bash -c 'buildah_build "$@"' _ "$bs" cached "$o/buildah-cached"
    fi
  done
done
echo "== cleaning up the stores and outputs" >&2
for bs in "$work"/buildah-store-*; do buildah_clean "$bs"; done
rm -rf "$work"/kiln-store-* "$work"/out-*

echo "== layer writing, 512 MiB (256 MiB text + 256 MiB random), page cache warm, output discarded" >&2
cat "$data_dir/mixed.bin" > /dev/null
mb() { awk -v s="$1" 'BEGIN { printf "%.0f", 536870912 / s / 1e6 }'; }
for run in $(seq 1 "$runs"); do
  "$layer_bench" "$data_dir" 1 > "$work/layer.$run"
  for tool in kiln-gzip kiln-zstd kiln-tar; do
    pat=${tool#kiln-}; [ "$pat" = tar ] && pat=none
    s="$(sed -n "s/^write_layer *$pat: .* in \([0-9.]*\) s.*/\1/p" "$work/layer.$run")"
    printf 'layer\t%s\t%s\t%s\t0\n' "$tool" "$run" "$s" >> "$out"
    echo "  layer $tool run $run: $s s ($(mb "$s") MB/s)" >&2
  done
  for tool in sha256sum "gzip -6" "pigz -6" "pigz -1"; do
    t="$work/time.$$"
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e" -o "$t" sh -c "$tool < $data_dir/mixed.bin > /dev/null"
    s="$(cat "$t")"
    printf 'layer\t%s\t%s\t%s\t0\n' "${tool// /}" "$run" "$s" >> "$out"
    echo "  layer $tool run $run: $s s ($(mb "$s") MB/s)" >&2
  done
done

echo "== floors: each case's RUN work alone, natively in a chroot (bench/floor.py)" >&2
for case in steps20 bigrun multistage; do
  s="$(python3 "$here/bench/floor.py" "$kiln" "$(recipe_of "$case")" "$runs")"
  printf 'floor\t%s\t0\t%s\t0\n' "$case" "$s" >> "$out"
  echo "  floor $case: $s s" >&2
done

echo "== summary (medians of $runs)"
python3 - "$out" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
rss = defaultdict(list)
for line in open(sys.argv[1]):
    tool, case, run, secs, kib = line.split("\t")
    rows[(tool, case)].append(float(secs))
    rss[(tool, case)].append(int(kib))
med = {k: statistics.median(v) for k, v in rows.items()}
# floor: the case's RUN work alone (bench/floor.py); floor/buildah is the best ratio any
# builder could reach in this run.
print("| case | kiln (s) | buildah (s) | kiln/buildah | floor (s) | floor/buildah | kiln peak RSS (MiB) | buildah peak RSS (MiB) |")
print("|---|---|---|---|---|---|---|---|")
for case in ["steps20", "cached", "bigcopy", "bigrun", "multistage"]:
    k, b = med.get(("kiln", case)), med.get(("buildah", case))
    if k is None or b is None:
        continue
    kr = max(rss[("kiln", case)]) / 1024
    br = max(rss[("buildah", case)]) / 1024
    f = med.get(("floor", case))
    floor = f"{f:.2f} | {f / b:.3f}" if f is not None else "- | -"
    print(f"| {case} | {k:.2f} | {b:.2f} | {k / b:.3f} | {floor} | {kr:.1f} | {br:.1f} |")
print()
print("| layer writing, 512 MiB | median (s) | MB/s |")
print("|---|---|---|")
for tool in ["kiln-gzip", "kiln-zstd", "kiln-tar", "sha256sum", "gzip-6", "pigz-6", "pigz-1"]:
    s = med.get(("layer", tool))
    if s:
        print(f"| {tool} | {s:.2f} | {536870912 / s / 1e6:.0f} |")
PY
