#!/usr/bin/env bash
# The "fleet" benchmark: runner A builds a case and exports its build cache to a registry;
# runner B, a fresh store on another "machine", builds the same case from that cache and pushes
# the image to the same registry. Timed: runner B's build-and-push. Counted: the bytes runner B
# downloads from the registry (the registry's access log: every GET answered during B's run).
# kiln beside buildah's own --cache-to/--cache-from (buildah 1.28: cache images in a repository).
#
# Usage (as root): bench/fleet.sh [RUNS]     RUNS: runs per case and tool (default 3)
#   BENCH_CASES=DIR   the bench recipes (default ../shared/bench-cases beside this repo)
#   BENCH_WORK=DIR    scratch space, emptied first (default /tmp/kiln-fleet)
#   FLEET_CASES="…"   which cases (default: steps20 bigcopy bigrun)
#
# Method:
# - one docker-registry (plain http on 127.0.0.1, access log on) for the whole run; every run of
#   every tool uses repositories of its own (cache and image), so nothing one run pushed helps
#   another;
# - runner A (untimed): kiln `build --push --cache-to type=registry,ref=…,mode=max`; buildah
#   `bud --layers --cache-to REPO` then `push`;
# - runner B (timed): a fresh kiln store / buildah storage root with the busybox base imported
#   (untimed), then kiln `build --push --cache-from REF` (one command) or buildah
#   `bud --layers --cache-from REPO && push`;
# - buildah runs with --isolation chroot (crun fails on this VM), its own --root/--runroot, the
#   overlay driver, --jobs 2, --pull-never for the base, --tls-verify=false for the registry;
# - `sync` before every timed run; runs alternate kiln, buildah, kiln, ...
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-3}"
cases_dir="${BENCH_CASES:-$here/../shared/bench-cases}"
[ -d "$cases_dir" ] || cases_dir=/work/shared/bench-cases
work="${BENCH_WORK:-/tmp/kiln-fleet}"
cases="${FLEET_CASES:-steps20 bigcopy bigrun}"
[ "$(id -u)" = 0 ] || { echo "run as root (kiln's RUN sandbox and buildah need it)" >&2; exit 2; }

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v docker-registry >/dev/null || need+=(docker-registry)
[ -x /usr/bin/time ] || need+=(time)
[ -x /bin/busybox ] && file -L /bin/busybox | grep -q static || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== building kiln (release)" >&2
(cd "$here" && cargo build --release --quiet)
kiln="$here/target/release/kiln"
# Keep the developer's own registry credentials out of both tools.
export REGISTRY_AUTH_FILE="$work/no-auth.json" DOCKER_CONFIG="$work/no-docker-config"

buildah_in() { # buildah with its own storage root
  local r=$1
  shift
  buildah --root "$r/root" --runroot "$r/run" --storage-driver overlay "$@"
}
buildah_clean() { # remove a buildah storage root and every mount buildah left under it
  local r=$1
  if [ -d "$r/root" ]; then
    buildah_in "$r" rm -a >/dev/null 2>&1 || true
    buildah_in "$r" rmi -a -f >/dev/null 2>&1 || true
    umount -R "$r/root/overlay" 2>/dev/null || true
  fi
  rm -rf "$r"
}
registry_pid=
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && { wait "$registry_pid" 2>/dev/null || true; }
  for r in "$work"/bah-*; do [ -d "$r" ] && buildah_clean "$r"; done
  return 0
}
trap cleanup EXIT

cleanup
rm -rf "$work"
mkdir -p "$work"
echo '{"auths":{}}' > "$REGISTRY_AUTH_FILE"
out="$work/results.tsv"
: > "$out"

echo "== contexts, the busybox base" >&2
sh "$cases_dir/bigcopy/gen.sh" "$work/ctx-bigcopy" >&2
KILN_ROOT="$work/base" "$here/examples/build-base.sh" "$kiln" --progress quiet --source-date-epoch 0 >/dev/null
mkdir -p "$work/from-busybox"
printf 'FROM busybox\n' > "$work/from-busybox/Dockerfile"
"$kiln" --root "$work/base" build -q -o "type=oci-archive,dest=$work/busybox.tar" "$work/from-busybox" >/dev/null
ctx_of() {
  case "$1" in
    bigcopy) echo "$work/ctx-bigcopy" ;;
    *) echo "$cases_dir/$1" ;;
  esac
}

echo "== registry" >&2
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
EOF
log="$work/registry/access.log"
# (docker-registry reads REGISTRY_* variables as configuration)
env -u REGISTRY_AUTH_FILE docker-registry serve "$work/registry/config.yml" > "$log" 2>&1 &
registry_pid=$!
up=
for _ in $(seq 100); do
  (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && { up=1; break; }
  sleep 0.1
done
[ -n "$up" ] || { echo "the registry did not start:" >&2; cat "$log" >&2; exit 1; }
reg="127.0.0.1:$port"

# downloaded FROM: "all_bytes layer_bytes" of the GETs the registry answered after byte FROM of
# its log (access log: `"GET /v2/... HTTP/1.1" STATUS BYTES ...`); layer bytes are those of
# blobs that are not JSON documents (configs, kiln's cache records), as the registry stores them.
downloaded() {
  tail -c +"$(( $1 + 1 ))" "$log" | python3 -c '
import re, sys
blobs = sys.argv[1]
total = layers = 0
for line in sys.stdin:
    m = re.search(r"\"GET (/v2/\S+) HTTP/[0-9.]+\" \d+ (\d+)", line)
    if not m:
        continue
    n = int(m.group(2))
    total += n
    blob = re.search(r"/blobs/sha256:([0-9a-f]{64})$", m.group(1))
    if blob:
        with open(f"{blobs}/{blob.group(1)[:2]}/{blob.group(1)}/data", "rb") as f:
            if f.read(1) != b"{":
                layers += n
print(total, layers)' "$work/registry/data/docker/registry/v2/blobs/sha256"
}

# timed TOOL CASE RUN CMD...: runs CMD under GNU time, counting what the registry served;
# appends "tool case run secs rss_kib bytes layer_bytes".
timed() {
  local tool=$1 case=$2 run=$3
  shift 3
  local t="$work/time.$$"
  sync
  local from
  from=$(stat -c %s "$log")
  if ! /usr/bin/time -f "%e %M" -o "$t" "$@" >"$work/log-$tool-$case-$run" 2>&1; then
    echo "$tool $case run $run failed; log: $work/log-$tool-$case-$run" >&2
    tail -5 "$work/log-$tool-$case-$run" >&2
    exit 1
  fi
  sleep 0.2 # the registry writes its access log line after the response
  read -r secs rss < "$t"
  read -r bytes layer_bytes < <(downloaded "$from")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$case" "$run" "$secs" "$rss" "$bytes" "$layer_bytes" >> "$out"
  printf '  %-8s %-8s run %s: %6.2f s, downloaded %s bytes (%s of layers)\n' "$tool" "$case" "$run" "$secs" "$bytes" "$layer_bytes" >&2
}

kiln_store() { # STORE: a fresh kiln store with the base
  rm -rf "$1"
  "$kiln" --root "$1" import "$work/busybox.tar" busybox >/dev/null
}
kiln_build() { # STORE CASE TAG [build options...]: build and push
  local store=$1 case=$2 tag=$3
  shift 3
  "$kiln" --root "$store" build --progress plain -f "$cases_dir/$case/Dockerfile" -t "$tag" \
    --push "$@" "$(ctx_of "$case")"
}
bah_runner() { # ROOT: a fresh buildah storage root with the base
  buildah_clean "$1"
  mkdir -p "$1"
  local id
  id="$(buildah_in "$1" pull -q "oci-archive:$work/busybox.tar")"
  buildah_in "$1" tag "$id" docker.io/library/busybox:latest
}
bah_build() { # ROOT CASE TAG [bud options...]: build and push
  local root=$1 case=$2 tag=$3
  shift 3
  buildah --root "$root/root" --runroot "$root/run" --storage-driver overlay \
    bud --pull-never --layers --isolation chroot --jobs 2 --tls-verify=false "$@" \
    -t "$tag" -f "$cases_dir/$case/Dockerfile" "$(ctx_of "$case")" &&
    buildah --root "$root/root" --runroot "$root/run" --storage-driver overlay \
      push --tls-verify=false "$tag" "docker://$tag"
}
export -f bah_build kiln_build ctx_of
export cases_dir work kiln

for case in $cases; do
  echo "== $case" >&2
  for run in $(seq 1 "$runs"); do
    # kiln: A exports, B builds from the cache and pushes.
    cache="$reg/kiln-cache-$case-$run:main"
    kiln_store "$work/kiln-a"
    kiln_build "$work/kiln-a" "$case" "$reg/kiln-$case-$run:a" \
      --cache-to "type=registry,ref=$cache,mode=max" >"$work/log-kiln-a-$case-$run" 2>&1
    kiln_store "$work/kiln-b"
    timed kiln "$case" "$run" bash -c 'kiln_build "$@"' _ "$work/kiln-b" "$case" \
      "$reg/kiln-$case-$run:b" --cache-from "$cache"
    grep -c " CACHED" "$work/log-kiln-$case-$run" | sed 's/^/    kiln steps cached on B: /' >&2
    rm -rf "$work/kiln-a" "$work/kiln-b"

    # buildah: the same with its cache images.
    repo="$reg/bah-cache-$case-$run"
    bah_runner "$work/bah-a"
    bah_build "$work/bah-a" "$case" "$reg/bah-$case-$run:a" --cache-to "$repo" \
      >"$work/log-buildah-a-$case-$run" 2>&1
    buildah_clean "$work/bah-a"
    bah_runner "$work/bah-b"
    timed buildah "$case" "$run" bash -c 'bah_build "$@"' _ "$work/bah-b" "$case" \
      "$reg/bah-$case-$run:b" --cache-from "$repo"
    grep -ci "using cache" "$work/log-buildah-$case-$run" |
      sed 's/^/    buildah cache lines on B: /' >&2 || true
    buildah_clean "$work/bah-b"
  done
done

echo "== summary (medians of $runs)"
python3 - "$out" <<'PY'
import statistics, sys
from collections import defaultdict
secs, byts, blobs = defaultdict(list), defaultdict(list), defaultdict(list)
for line in open(sys.argv[1]):
    tool, case, run, s, rss, b, bb = line.rstrip("\n").split("\t")
    secs[(tool, case)].append(float(s))
    byts[(tool, case)].append(int(b))
    blobs[(tool, case)].append(int(bb))
med = lambda v: statistics.median(v)
print("| case | kiln B (s) | buildah B (s) | kiln/buildah | kiln B downloaded (bytes; of layers) | buildah B downloaded (bytes; of layers) |")
print("|---|---|---|---|---|---|")
for case in ["steps20", "bigcopy", "bigrun"]:
    k, b = secs.get(("kiln", case)), secs.get(("buildah", case))
    if not k or not b:
        continue
    print(f"| {case} | {med(k):.2f} | {med(b):.2f} | {med(k) / med(b):.3f} | "
          f"{max(byts[('kiln', case)]):,}; {max(blobs[('kiln', case)]):,} | "
          f"{max(byts[('buildah', case)]):,}; {max(blobs[('buildah', case)]):,} |")
PY
