#!/usr/bin/env bash
# Rootless kiln against root kiln on the steps20 and bigrun cases, in the same run.
#
# Usage (as root): bench/rootless.sh [RUNS]       RUNS: timed runs per case and mode (default 3)
#   BENCH_CASES=DIR   the bench recipes (default ../shared/bench-cases beside this repo)
#   BENCH_WORK=DIR    scratch space, emptied first (default /tmp/kiln-bench-rootless)
#   BENCH_USER=NAME   the normal user (default kiln-bench; made with `useradd` — which gives it
#                     subordinate id ranges — if missing, and removed at the end if made here)
#
# What it does: builds kiln (release); builds the offline busybox base as root and exports it;
# then case by case, run by run, alternating root and rootless: a fresh store (base imported,
# untimed; the rootless store belongs to the user, on the same file system), `sync`, then one
# timed cold build ending with `--output type=oci,dest=DIR`, exactly as bench/run.sh times kiln.
# The rootless builds run as the user through setpriv, with a clean login environment; they
# use the kernel's overlayfs in the user namespace (the build log says which snapshotter ran).
# Nothing is deleted until every build has run (see bench/run.sh). Medians and the ratio
# rootless/root go to stdout; raw lines "mode case run secs" to $BENCH_WORK/results.tsv.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-3}"
cases_dir="${BENCH_CASES:-$here/../shared/bench-cases}"
[ -d "$cases_dir" ] || cases_dir=/work/shared/bench-cases
work="${BENCH_WORK:-/tmp/kiln-bench-rootless}"
user="${BENCH_USER:-kiln-bench}"
out="$work/results.tsv"
[ "$(id -u)" = 0 ] || { echo "run as root (it makes the user and times root kiln too)" >&2; exit 2; }
command -v newuidmap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq uidmap >/dev/null; }
[ -x /usr/bin/time ] || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; }

echo "== building kiln (release)" >&2
(cd "$here" && cargo build --release --quiet)

made_user=
if ! id "$user" >/dev/null 2>&1; then
  useradd -m -s /bin/sh "$user"
  made_user=1
fi
cleanup() {
  rm -rf "$work"
  if [ -n "$made_user" ]; then userdel -r "$user" 2>/dev/null || true; fi
}
trap cleanup EXIT
uid="$(id -u "$user")"
gid="$(id -g "$user")"
home="$(getent passwd "$user" | cut -d: -f6)"
grep -q "^$user:" /etc/subuid || echo "warning: $user has no /etc/subuid range: rootless runs with a single-id map" >&2

rm -rf "$work"
mkdir -p "$work/root" "$work/user"
chmod 755 "$work"
chown "$uid:$gid" "$work/user"
: > "$out"
# The user's own copy of kiln and of the contexts (the checkout may be unreadable to it).
install -m 755 "$here/target/release/kiln" "$work/kiln"
cp -r "$cases_dir/steps20" "$work/ctx-steps20"
cp -r "$cases_dir/bigrun" "$work/ctx-bigrun"
chmod -R a+rX "$work/ctx-steps20" "$work/ctx-bigrun"
kiln="$work/kiln"

echo "== the busybox base" >&2
KILN_ROOT="$work/base" "$here/examples/build-base.sh" "$kiln" --progress quiet --source-date-epoch 0 >/dev/null
mkdir -p "$work/from-busybox"
printf 'FROM busybox\n' > "$work/from-busybox/Dockerfile"
"$kiln" --root "$work/base" build -q -o "type=oci-archive,dest=$work/busybox.tar" "$work/from-busybox" >/dev/null
chmod 644 "$work/busybox.tar"

# Runs what follows as the user, with a login-like environment and nothing else.
as_user=(setpriv --reuid "$uid" --regid "$gid" --clear-groups
  env -i HOME="$home" USER="$user" LOGNAME="$user" PATH=/usr/local/bin:/usr/bin:/bin)

# timed MODE CASE RUN CMD...: runs CMD under GNU time, appends "mode case run secs".
timed() {
  local mode=$1 case=$2 run=$3
  shift 3
  local t="$work/time.$$" log="$work/log-$mode-$case-$run"
  sync
  if ! /usr/bin/time -f "%e" -o "$t" "$@" >"$log" 2>&1; then
    echo "$mode $case run $run failed; log: $log" >&2
    tail -5 "$log" >&2
    exit 1
  fi
  local secs
  secs="$(tail -1 "$t")"
  printf '%s\t%s\t%s\t%s\n' "$mode" "$case" "$run" "$secs" >> "$out"
  printf '  %-8s %-8s run %s: %6.2f s  (%s)\n' "$mode" "$case" "$run" "$secs" \
    "$(grep -o 'snapshotter: [a-z-]*' "$log" | head -1)" >&2
}

for case in steps20 bigrun; do
  echo "== $case" >&2
  for run in $(seq 1 "$runs"); do
    rs="$work/root/store-$case-$run"
    "$kiln" --root "$rs" import "$work/busybox.tar" busybox >/dev/null
    timed root "$case" "$run" "$kiln" --root "$rs" build --progress plain \
      -o "type=oci,dest=$work/root/out-$case-$run" "$work/ctx-$case"
    us="$work/user/store-$case-$run"
    "${as_user[@]}" "$kiln" --root "$us" import "$work/busybox.tar" busybox >/dev/null
    timed rootless "$case" "$run" "${as_user[@]}" "$kiln" --root "$us" build --progress plain \
      -o "type=oci,dest=$work/user/out-$case-$run" "$work/ctx-$case"
  done
done

echo "== summary (medians of $runs; load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
python3 - "$out" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    mode, case, run, secs = line.split("\t")
    rows[(mode, case)].append(float(secs))
print("| case | root kiln (s) | rootless kiln (s) | rootless/root | runs (root; rootless) |")
print("|---|---|---|---|---|")
for case in ["steps20", "bigrun"]:
    r, u = rows.get(("root", case)), rows.get(("rootless", case))
    if not r or not u:
        continue
    mr, mu = statistics.median(r), statistics.median(u)
    runs = f"{', '.join(f'{x:.2f}' for x in r)}; {', '.join(f'{x:.2f}' for x in u)}"
    print(f"| {case} | {mr:.2f} | {mu:.2f} | {mu / mr:.3f} | {runs} |")
PY
