#!/usr/bin/env bash
# Push benchmark: kiln push vs skopeo copy of the same ~500 MB image (250 MB random, 250 MB
# text) to fresh local registries, interleaved runs, medians, and kiln's peak RSS.
# Usage: bench/push.sh [KILN] [RUNS]      (root; needs docker-registry, skopeo, /usr/bin/time)
# Appends the results to bench/PUSH.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kiln="$(realpath "${1:-$here/../target/release/kiln}")"
runs="${2:-3}"
for tool in docker-registry skopeo /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 2; }
done

work="$(mktemp -d /var/tmp/kiln-push-bench.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export KILN_ROOT="$work/store"
# Keep any real credentials out of kiln (not exported: docker-registry reads REGISTRY_* as
# configuration).
no_creds=(env REGISTRY_AUTH_FILE="$work/no-auth.json" DOCKER_CONFIG="$work/no-docker-config")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts a registry with an empty storage dir; sets $port.
start_registry() {
  local dir="$work/registry-$1"
  port="$(free_port)"
  mkdir -p "$dir"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$port
EOF
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && return 0
    sleep 0.1
  done
  echo "registry on $port did not start" >&2; exit 1
}

# Stops the most recently started registry.
stop_registry() {
  local p="${pids[-1]}"
  kill "$p"; wait "$p" 2>/dev/null || true
  unset 'pids[-1]'
}

echo "== building the image (kiln $kiln)" >&2
"$here/../examples/build-base.sh" "$kiln" --progress quiet >/dev/null
ctx="$work/ctx"
mkdir -p "$ctx"
cat >"$ctx/Dockerfile" <<'EOF'
FROM busybox
RUN head -c 250000000 /dev/urandom > /random.bin
RUN seq 1 27500000 > /numbers.txt
EOF
"$kiln" build -q -t bench:1 -o "type=oci,dest=$work/oci" "$ctx" >/dev/null
layout_mb=$(du -sm "$work/oci/blobs" | cut -f1)
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$work/policy.json"

# Runs "$@" under /usr/bin/time; prints "seconds max_rss_kib".
timed() {
  local log="$work/time.log"
  /usr/bin/time -v -o "$log" "$@" >/dev/null 2>"$work/cmd.err" || { cat "$work/cmd.err" >&2; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  # h:mm:ss or m:ss.ss -> seconds
  echo "$(echo "$wall" | awk -F: '{ s=0; for (i=1; i<=NF; i++) s = s*60 + $i; printf "%.2f", s }') $rss"
}

run_kiln() {
  start_registry "kiln-$1"
  timed "${no_creds[@]}" "$kiln" push bench:1 "127.0.0.1:$port/bench/kiln:1"
  stop_registry
}
run_skopeo() {
  start_registry "skopeo-$1"
  timed skopeo --policy "$work/policy.json" copy -q --dest-tls-verify=false \
    "oci:$work/oci:1" "docker://127.0.0.1:$port/bench/skopeo:1"
  stop_registry
}

kiln_t=() kiln_rss=() skopeo_t=() skopeo_rss=()
for i in $(seq "$runs"); do
  # Alternate who goes first, so neither always meets a colder page cache.
  if (( i % 2 )); then order="kiln skopeo"; else order="skopeo kiln"; fi
  for who in $order; do
    read -r t rss < <("run_$who" "$i")
    echo "run $i: $who ${t}s, peak RSS $((rss / 1024)) MiB" >&2
    if [ "$who" = kiln ]; then kiln_t+=("$t"); kiln_rss+=("$rss"); else skopeo_t+=("$t"); skopeo_rss+=("$rss"); fi
  done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
max() { printf '%s\n' "$@" | sort -n | tail -1; }
k_med=$(median "${kiln_t[@]}"); s_med=$(median "${skopeo_t[@]}")
k_rss=$(( $(max "${kiln_rss[@]}") / 1024 )); s_rss=$(( $(max "${skopeo_rss[@]}") / 1024 ))

report="$(cat <<EOF

## ${BENCH_DATE:-$(date +%F)} — push of a ${layout_mb} MB (compressed) image, $runs interleaved runs

Image: busybox + 250 MB random + ~250 MB text (\`seq\`), gzip layers, pushed to a fresh
\`docker-registry\` on 127.0.0.1 per run. $(nproc) cores. kiln: \`$(basename "$kiln")\` release build.

| tool | runs (s) | median (s) | peak RSS (MiB) |
|---|---|---|---|
| \`kiln push\` | ${kiln_t[*]} | $k_med | $k_rss |
| \`skopeo copy oci: docker://\` | ${skopeo_t[*]} | $s_med | $s_rss |
EOF
)"
echo "$report"
echo "$report" >>"$here/PUSH.md"
