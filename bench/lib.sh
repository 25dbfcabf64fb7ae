#!/usr/bin/env bash
# Helpers the bench scripts share (sourced): timing a run, and buildah in a storage root of
# its own. They use the caller's $work (scratch dir) and $out (results file).

# timed TOOL CASE RUN CMD...: runs CMD under GNU time, appends "tool case run secs rss_kib".
timed() {
  local tool=$1 case=$2 run=$3
  shift 3
  local t="$work/time.$$"
  sync # untimed: no run pays for the write-back of an earlier one
  if ! /usr/bin/time -f "%e %M" -o "$t" "$@" >"$work/log-$tool-$case-$run" 2>&1; then
    echo "$tool $case run $run failed; log: $work/log-$tool-$case-$run" >&2
    tail -5 "$work/log-$tool-$case-$run" >&2
    exit 1
  fi
  read -r secs rss < "$t"
  printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$case" "$run" "$secs" "$rss" >> "$out"
  printf '  %-8s %-11s run %s: %6.2f s, peak RSS %6d KiB\n' "$tool" "$case" "$run" "$secs" "$rss" >&2
}

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
