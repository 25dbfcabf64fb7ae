#!/usr/bin/env python3
"""The floor of a bench case: its RUN commands alone, run natively in a plain chroot.

Usage (as root): bench/floor.py KILN DOCKERFILE [RUNS]
  FLOOR_BUSYBOX=PATH   the static busybox to run (default the host's); another architecture's
                       runs through the host's binfmt_misc emulator, as a build's RUN would

No builder can finish a recipe faster than the shell work its RUN steps ask for, so this times
exactly that work with no sandbox, overlay, snapshot or image: each stage's RUN commands run in
order in a fresh chroot holding the static busybox (the bench's base image is that busybox), in
the stage's WORKDIR and with its ENV; stages the last one depends on run concurrently first, as
kiln and buildah --jobs run them, then the last stage. COPY, ADD and metadata steps are builder
work and do not count (only their destination directories are made, so later RUNs find them). Prints the median wall time in seconds over RUNS runs (default 3).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def stages_of(kiln, dockerfile):
    """[(name, [(workdir, env, command)])] for each stage, from `kiln parse`."""
    recipe = json.loads(subprocess.check_output([kiln, "parse", dockerfile]))
    out = []
    for stage in recipe["stages"]:
        workdir, env, runs = "/", {}, []
        for instr in stage["instructions"]:
            kind, args = instr["kind"]["instruction"], instr["kind"]["args"]
            if kind == "workdir":
                workdir = os.path.join(workdir, args)
            elif kind == "env":
                env.update({k: v for k, v in (args if isinstance(args, list) else [])})
            elif kind in ("copy", "add") and args["dest"].endswith("/"):
                runs.append((workdir, {}, f"mkdir -p '{args['dest']}'"))
            elif kind == "run":
                command = args["command"].get("shell")
                if command is None:
                    sys.exit(f"{dockerfile}: exec-form RUN is not supported by floor.py")
                runs.append((workdir, dict(env), command))
        out.append((stage.get("name"), runs))
    return out


def rootfs(busybox, parent):
    """A minimal chroot like the bench's base image: busybox, its applets, /dev nodes, /tmp."""
    root = tempfile.mkdtemp(dir=parent)
    for d in ("bin", "dev", "tmp", "etc"):
        os.makedirs(os.path.join(root, d))
    shutil.copy(busybox, os.path.join(root, "bin/busybox"))
    subprocess.check_call(["chroot", root, "/bin/busybox", "--install", "-s", "/bin"])
    for name, minor in (("null", 3), ("zero", 5), ("urandom", 9), ("random", 8)):
        os.mknod(os.path.join(root, "dev", name), 0o20666, os.makedev(1, minor))
    return root


def stage_script(runs):
    lines = ["set -e"]
    for workdir, env, command in runs:
        exports = " ".join(f"{k}='{v}'" for k, v in env.items())
        lines.append(f"mkdir -p '{workdir}' && cd '{workdir}'")
        lines.append(f"( {'export ' + exports + '; ' if exports else ''}{command} ) >/dev/null")
    return "\n".join(lines)


def one_run(stages, busybox, parent):
    roots = [rootfs(busybox, parent) for _ in stages]
    start = time.monotonic()
    procs = [
        subprocess.Popen(["chroot", root, "/bin/sh", "-c", stage_script(runs)])
        for root, (_, runs) in zip(roots[:-1], stages[:-1])
    ]
    if any(p.wait() for p in procs):
        sys.exit("a stage failed")
    subprocess.check_call(["chroot", roots[-1], "/bin/sh", "-c", stage_script(stages[-1][1])])
    elapsed = time.monotonic() - start
    for root in roots:
        shutil.rmtree(root)
    return elapsed


def main():
    kiln, dockerfile = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    busybox = os.environ.get("FLOOR_BUSYBOX") or next(
        p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)
    )
    stages = stages_of(kiln, dockerfile)
    parent = tempfile.mkdtemp(prefix="kiln-floor-")
    try:
        times = [one_run(stages, busybox, parent) for _ in range(runs)]
    finally:
        shutil.rmtree(parent)
    print(f"{statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
