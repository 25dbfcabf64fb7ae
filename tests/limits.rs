//! Resource limits of RUN steps end to end (as root, in the cgroups this machine has): a fork
//! bomb under --pids-limit and a 1 GiB allocation under --memory fail fast with the cause in
//! words, leave the host's process count, load and free memory alone, and leave no process,
//! cgroup or mount behind; --cpus, --ulimit and --shm-size are what the step sees; a killed
//! build removes its step's cgroup.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Kiln, assert_success, context, kiln_bin, mount_count, processes_with, stderr};

/// The host's 1-minute load average and number of tasks (`/proc/loadavg`).
fn loadavg() -> (f64, u64) {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap();
    let f: Vec<&str> = s.split_whitespace().collect();
    let total = f[3].split_once('/').unwrap().1.parse().unwrap();
    (f[0].parse().unwrap(), total)
}

/// The host's `MemAvailable`, bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// What the host looked like while a build ran.
struct Watched {
    out: Output,
    pid: u32,
    elapsed: Duration,
    most_tasks: u64,
    least_available: u64,
}

/// Runs a build of `recipe` on `k`'s store, sampling the host's task count and free memory
/// every few milliseconds until it ends.
fn watched_build(k: &Kiln, recipe: &str, args: &[&str]) -> Watched {
    let ctx = context(recipe, &[]);
    let child = Command::new(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain"])
        .args(args)
        .arg(ctx.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut most, mut least) = (0, u64::MAX);
            while !done.load(Ordering::Relaxed) {
                most = most.max(loadavg().1);
                least = least.min(mem_available());
                std::thread::sleep(Duration::from_millis(3));
            }
            (most, least)
        })
    };
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let (most_tasks, least_available) = sampler.join().unwrap();
    Watched {
        out,
        pid,
        elapsed,
        most_tasks,
        least_available,
    }
}

/// The parent dirs of step cgroups: kiln's own cgroup in each v1 hierarchy, or v2's.
fn cgroup_parents() -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let rel = path.trim_start_matches('/');
        if ctrls.is_empty() {
            dirs.push(PathBuf::from("/sys/fs/cgroup/kiln"));
        }
        for c in ["memory", "pids", "cpu"] {
            if ctrls.split(',').any(|x| x == c) {
                dirs.push(PathBuf::from("/sys/fs/cgroup").join(ctrls).join(rel));
            }
        }
    }
    dirs
}

/// Step cgroups (`kiln-PID-N`) of the kiln process `pid` that still exist.
fn leftover_cgroups(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("kiln-{pid}-");
    cgroup_parents()
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

#[test]
fn a_fork_bomb_under_pids_limit_fails_fast_and_leaves_the_host_alone() {
    let k = Kiln::new();
    let mounts = mount_count();
    let (load_before, tasks_before) = loadavg();
    let marker = "fork-bomb-marker-7f3a";
    let recipe = format!("FROM busybox\nRUN echo {marker}; b(){{ b | b & }}; b; sleep 30\n");
    let w = watched_build(&k, &recipe, &["--pids-limit", "64"]);
    let err = stderr(&w.out);
    assert_eq!(w.out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("` was killed: could not fork: process limit 64 reached"),
        "{err}"
    );
    assert!(err.contains("Dockerfile:2:"), "{err}");
    // The step would sleep 30 s had it not been stopped.
    assert!(w.elapsed < Duration::from_secs(10), "{:?}", w.elapsed);
    // 64 processes at most, plus kiln's own and whatever else the machine runs meanwhile.
    assert!(
        w.most_tasks < tasks_before + 200,
        "tasks {tasks_before} -> {}",
        w.most_tasks
    );
    // The 1-minute load average moves with everything else this shared machine runs: the
    // margin allows for that, not for 64 processes spinning for 30 s.
    let (load_after, _) = loadavg();
    assert!(
        load_after < load_before * 1.25 + 3.0,
        "load {load_before} -> {load_after}"
    );
    assert_eq!(leftover_cgroups(w.pid), Vec::<PathBuf>::new());
    assert_eq!(processes_with(marker), Vec::new());
    assert_eq!(mount_count(), mounts);
}

#[test]
fn a_memory_hog_under_memory_limit_fails_fast_and_leaves_the_host_alone() {
    let k = Kiln::new();
    let mounts = mount_count();
    let available = mem_available();
    let marker = "memory-hog-marker-91c2";
    let recipe = format!(
        "FROM busybox\nRUN echo {marker} && dd if=/dev/zero of=/dev/null bs=1G count=1 && sleep 30\n"
    );
    let w = watched_build(&k, &recipe, &["--memory", "64m"]);
    let err = stderr(&w.out);
    assert_eq!(w.out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("` was killed: out of memory (limit 64 MiB)"),
        "{err}"
    );
    assert!(err.contains("limits: memory 64 MiB"), "{err}");
    assert!(w.elapsed < Duration::from_secs(10), "{:?}", w.elapsed);
    // Without the limit the host would have lost 1 GiB.
    assert!(
        w.least_available + (512 << 20) > available,
        "MemAvailable {available} -> {}",
        w.least_available
    );
    assert_eq!(leftover_cgroups(w.pid), Vec::<PathBuf>::new());
    assert_eq!(processes_with(marker), Vec::new());
    assert_eq!(mount_count(), mounts);
}

#[test]
fn cpus_ulimit_and_shm_size_are_what_the_step_sees() {
    let k = Kiln::new();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let out_arg = format!("type=oci,dest={}", layout.display());
    let recipe = "FROM busybox
RUN ulimit -n > /nofile && ulimit -Hn > /nofile-hard \\
    && df -k /dev/shm | tail -1 | awk '{print $2}' > /shm && sleep 2
";
    let ctx = context(recipe, &[]);
    let child = Command::new(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain", "--cpus", "0.5"])
        .args([
            "--ulimit",
            "nofile=100:200",
            "--shm-size",
            "8m",
            "-o",
            &out_arg,
        ])
        .arg(ctx.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the step runs, its cgroup has the CPU quota: half of each 100 ms period.
    let start = Instant::now();
    let quota = loop {
        let found = leftover_cgroups(child.id())
            .into_iter()
            .find_map(|d| std::fs::read_to_string(d.join("cpu.cfs_quota_us")).ok())
            .or_else(|| {
                leftover_cgroups(child.id())
                    .into_iter()
                    .find_map(|d| std::fs::read_to_string(d.join("cpu.max")).ok())
            });
        if let Some(q) = found {
            break q;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no step cgroup with a CPU quota"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(quota == "50000\n" || quota == "50000 100000\n", "{quota:?}");
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    assert!(
        stderr(&out).contains("limits: cpus 0.5, pids 4096"),
        "{}",
        stderr(&out)
    );
    let bundle = dir.path().join("bundle");
    let rootfs = common::umoci_unpack(&layout, "latest", &bundle);
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("nofile"), "100\n");
    assert_eq!(read("nofile-hard"), "200\n");
    assert_eq!(read("shm"), "8192\n");
}

#[test]
fn limit_flags_are_checked() {
    let k = Kiln::new();
    for (args, message) in [
        (
            vec!["--memory", "lots"],
            "--memory \"lots\": expected a size",
        ),
        (vec!["--memory", "1m"], "the smallest memory limit is 6m"),
        (vec!["--cpus", "0"], "--cpus \"0\""),
        (vec!["--ulimit", "bogus=1"], "unknown limit \"bogus\""),
        (
            vec!["--ulimit", "nofile=10:5"],
            "soft limit is above the hard limit",
        ),
        (
            vec!["--memory", "64m", "--memory-swap", "32m"],
            "less than --memory",
        ),
        (vec!["--memory-swap", "1g"], "--memory-swap needs --memory"),
    ] {
        let (out, _ctx) = k.build("FROM busybox\nRUN true\n", &[], &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

#[test]
fn a_killed_build_leaves_no_cgroup_or_process() {
    let k = Kiln::new();
    let marker = "killed-build-marker-55d1";
    // Not the shell's last command, so the shell stays, with the marker in its command line.
    let ctx = context(&format!("FROM busybox\nRUN sleep 60; echo {marker}\n"), &[]);
    let mut child = Command::new(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain", "--memory", "64m"])
        .arg(ctx.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    while leftover_cgroups(pid).is_empty() || processes_with(marker).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the step never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The step's scratch dir (in the host's temp dir) is where its /etc/hosts is bound from.
    let scratch = processes_with(marker)
        .into_iter()
        .find_map(|(pid, _)| {
            let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
            mountinfo.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(4) == Some(&"/etc/hosts"))
                    .then(|| PathBuf::from(f[3]).parent().unwrap().to_path_buf())
            })
        })
        .expect("the step's /etc/hosts mount");
    assert!(scratch.is_dir(), "{}", scratch.display());
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    while !leftover_cgroups(pid).is_empty()
        || !processes_with(marker).is_empty()
        || scratch.exists()
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "left behind: {:?} {:?} {}",
            leftover_cgroups(pid),
            processes_with(marker),
            scratch.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
