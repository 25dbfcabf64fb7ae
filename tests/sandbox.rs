//! Integration tests of the RUN sandbox (need root, real namespaces and overlayfs).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::processes_with;
use kiln::sandbox::{
    BindMount, BindSource, NetworkMode, RunSpec, Sandbox, SandboxError, SeccompFilter, Security,
    TreeSource, with_rootfs,
};
use tempfile::TempDir;

/// A busybox rootfs with /etc/passwd and /etc/group (user `app`, group `extra`), made once in
/// cargo's per-target temp dir (built aside, then renamed into place).
fn base_layer() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-base-v1");
        if base.join("etc/group").exists() {
            return base;
        }
        let tmp = TempDir::with_prefix_in("sandbox-base-", env!("CARGO_TARGET_TMPDIR")).unwrap();
        let dir = tmp.path();
        for d in ["bin", "etc", "tmp", "root", "home/app"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
        let list = std::process::Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
            }
        }
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/victim"), "delete me\n").unwrap();
        std::fs::write(
            dir.join("etc/group"),
            "root:x:0:\napp:x:1000:\nextra:x:1001:app\n",
        )
        .unwrap();
        // Another test process may have won the race; its copy is just as good.
        let built = tmp.keep();
        if std::fs::rename(&built, &base).is_err() {
            std::fs::remove_dir_all(&built).unwrap();
        }
        base
    })
}

struct Step {
    dir: TempDir,
    spec: RunSpec,
}

fn step(script: &str) -> Step {
    let dir = TempDir::new().unwrap();
    let upper = dir.path().join("upper");
    let work = dir.path().join("work");
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    Step {
        spec: RunSpec {
            lower_dirs: vec![base_layer().to_path_buf()],
            upper_dir: upper,
            work_dir: work,
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            user: String::new(),
            hostname: "kiln-test".into(),
            network: NetworkMode::Host,
            stdin: None,
            binds: vec![],
            security: Security::Sandbox(Some(SeccompFilter::docker_default().unwrap())),
            extra_hosts: vec![],
        },
        dir,
    }
}

fn sandbox() -> Sandbox {
    Sandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_kiln")))
}

fn run(spec: &RunSpec) -> (Result<i32, SandboxError>, String) {
    let mut out = Vec::new();
    let r = sandbox().run(
        spec,
        &mut |b| out.extend_from_slice(b),
        &AtomicBool::new(false),
    );
    (r, String::from_utf8_lossy(&out).into_owned())
}

fn run_ok(spec: &RunSpec) -> String {
    let (r, out) = run(spec);
    assert_eq!(r.unwrap(), 0, "output: {out}");
    out
}

fn upper_entries(upper: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(upper)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap()
                .path()
                .strip_prefix(upper)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

/// The host mount table, without the probe mount `host_mounts_are_not_visible` makes meanwhile.
fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| !l.contains(PROBE))
        .collect::<Vec<_>>()
        .join("\n")
}

const PROBE: &str = "kiln-probe";

#[test]
fn exit_codes_are_propagated() {
    assert_eq!(run(&step("exit 0").spec).0.unwrap(), 0);
    assert_eq!(run(&step("exit 3").spec).0.unwrap(), 3);
    // The step is pid 1 of its namespace: only a fault (forced signal) kills it.
    assert_eq!(run(&step("f() { f; }; f").spec).0.unwrap(), 139);
}

#[test]
fn command_not_found_is_127_with_a_message() {
    let mut s = step("");
    s.spec.argv = vec!["no-such-command".into()];
    let (r, out) = run(&s.spec);
    assert_eq!(r.unwrap(), 127);
    assert!(
        out.contains("no-such-command") && out.contains("not found"),
        "{out}"
    );
    s.spec.argv = vec!["/bin/nope".into()];
    assert_eq!(run(&s.spec).0.unwrap(), 127);
}

#[test]
fn output_is_streamed_merged_and_in_order() {
    let s = step("echo one; echo two >&2; sleep 0.3; echo three");
    let start = Instant::now();
    let mut chunks: Vec<(Duration, String)> = Vec::new();
    let r = sandbox().run(
        &s.spec,
        &mut |b| chunks.push((start.elapsed(), String::from_utf8_lossy(b).into_owned())),
        &AtomicBool::new(false),
    );
    assert_eq!(r.unwrap(), 0);
    let all: String = chunks.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(all, "one\ntwo\nthree\n");
    let first = chunks.iter().find(|c| c.1.contains("one")).unwrap().0;
    let last = chunks.iter().find(|c| c.1.contains("three")).unwrap().0;
    assert!(
        last - first >= Duration::from_millis(200),
        "not streamed: {chunks:?}"
    );
}

#[test]
fn stdin_bytes_are_fed() {
    let mut s = step("cat; echo; wc -c");
    s.spec.stdin = Some(b"hello".to_vec());
    assert_eq!(run_ok(&s.spec).trim(), "hello\n0");
    let mut big = step("wc -c");
    big.spec.stdin = Some(vec![b'x'; 1 << 20]);
    assert_eq!(run_ok(&big.spec).trim(), "1048576");
    assert_eq!(run_ok(&step("wc -c").spec).trim(), "0");
}

#[test]
fn env_is_exact_and_cwd_is_created() {
    let mut s = step("env | sort; pwd");
    s.spec.env.push(("FOO".into(), "bar baz".into()));
    s.spec.cwd = "/work/dir".into();
    let out = run_ok(&s.spec);
    assert_eq!(
        out,
        "FOO=bar baz\nPATH=/bin\nPWD=/work/dir\nSHLVL=1\n/work/dir\n"
    );
    assert!(s.spec.upper_dir.join("work/dir").is_dir());
}

#[test]
fn user_by_name_uid_gid_and_supplementary_groups() {
    let mut s = step("id");
    assert_eq!(
        run_ok(&s.spec).trim(),
        "uid=0(root) gid=0(root) groups=0(root)"
    );
    s.spec.user = "app".into();
    assert_eq!(
        run_ok(&s.spec).trim(),
        "uid=1000(app) gid=1000(app) groups=1000(app),1001(extra)"
    );
    s.spec.user = "1000:1001".into();
    assert_eq!(
        run_ok(&s.spec).trim(),
        "uid=1000(app) gid=1001(extra) groups=1001(extra)"
    );
    s.spec.user = "4242".into();
    assert_eq!(
        run_ok(&s.spec).trim(),
        "uid=4242 gid=0(root) groups=0(root)"
    );
    s.spec.user = "nobody".into();
    let err = run(&s.spec).0.unwrap_err().to_string();
    assert!(err.contains("nobody"), "{err}");
}

#[test]
fn writes_land_in_upper_and_deletes_are_whiteouts() {
    let s = step("echo hi > /tmp/new; rm /etc/victim; mkdir -p /opt/x");
    run_ok(&s.spec);
    let upper = &s.spec.upper_dir;
    assert_eq!(
        std::fs::read_to_string(upper.join("tmp/new")).unwrap(),
        "hi\n"
    );
    let wh = std::fs::symlink_metadata(upper.join("etc/victim")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert!(upper.join("opt/x").is_dir());
    assert_eq!(
        upper_entries(upper),
        ["etc", "etc/victim", "opt", "opt/x", "tmp", "tmp/new"]
    );
    assert!(base_layer().join("etc/victim").exists());
}

#[test]
fn run_true_leaves_upper_empty() {
    let s = step("true");
    run_ok(&s.spec);
    assert_eq!(upper_entries(&s.spec.upper_dir), Vec::<String>::new());
    // A bind mount whose target did not exist leaves nothing either.
    let mut s =
        step("cat /run/secrets/token; (echo x > /run/secrets/token) 2>/dev/null || echo ' ro'");
    let secret = s.dir.path().join("token");
    std::fs::write(&secret, "s3cret").unwrap();
    s.spec.binds.push(BindMount {
        source: BindSource::Host(secret),
        target: "/run/secrets/token".into(),
        readonly: true,
    });
    assert_eq!(run_ok(&s.spec), "s3cret ro\n");
    assert_eq!(upper_entries(&s.spec.upper_dir), Vec::<String>::new());
}

#[test]
fn existing_mount_targets_are_reused_and_copy_ups_undone() {
    let mut s = step("cat /etc/hosts; cat /tmp/secret");
    let top = s.dir.path().join("top");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::create_dir_all(top.join("proc")).unwrap();
    std::fs::write(top.join("etc/hosts"), "image hosts\n").unwrap();
    s.spec.lower_dirs.insert(0, top.clone());
    let secret = s.dir.path().join("secret");
    std::fs::write(&secret, "s\n").unwrap();
    s.spec.binds.push(BindMount {
        source: BindSource::Host(secret),
        target: "/tmp/secret".into(),
        readonly: false,
    });
    let out = run_ok(&s.spec);
    assert!(out.starts_with("127.0.0.1\tlocalhost kiln-test\n"), "{out}");
    assert!(out.ends_with("s\n"), "{out}");
    assert_eq!(upper_entries(&s.spec.upper_dir), Vec::<String>::new());
    assert_eq!(
        std::fs::read_to_string(top.join("etc/hosts")).unwrap(),
        "image hosts\n"
    );
}

#[test]
fn from_scratch_keeps_only_real_changes() {
    let mut s = step("");
    s.spec.lower_dirs.clear();
    s.spec.binds.push(BindMount {
        source: BindSource::Host("/bin/busybox".into()),
        target: "/busybox".into(),
        readonly: true,
    });
    s.spec.argv = vec![
        "/busybox".into(),
        "sh".into(),
        "-c".into(),
        "/busybox echo hi > /f; /busybox echo x > /etc/new".into(),
    ];
    run_ok(&s.spec);
    assert_eq!(upper_entries(&s.spec.upper_dir), ["etc", "etc/new", "f"]);
}

/// A tree bind resolves its path inside the tree: an absolute link in it leads to the tree's
/// own directory, never the host's, and a writable tree bind keeps the tree unchanged.
#[test]
fn tree_binds_resolve_inside_the_tree_and_discard_writes() {
    let mut s = step("cat /t/file; echo new > /t/file; echo more > /t/added; cat /t/file");
    let host_dir = s.dir.path().join("host");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::write(host_dir.join("file"), "host\n").unwrap();
    let tree = s.dir.path().join("tree");
    // In the tree, the link's target is the tree's own copy of the host dir's path.
    let inside = tree.join(host_dir.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::write(inside.join("file"), "tree\n").unwrap();
    std::os::unix::fs::symlink(&host_dir, tree.join("link")).unwrap();
    let scratch = s.dir.path().join("tree-scratch");
    std::fs::create_dir(&scratch).unwrap();
    s.spec.binds.push(BindMount {
        source: BindSource::Tree(TreeSource {
            layers: vec![tree.clone()],
            path: "/link".into(),
            scratch,
        }),
        target: "/t".into(),
        readonly: false,
    });
    assert_eq!(run_ok(&s.spec), "tree\nnew\n");
    assert_eq!(
        std::fs::read_to_string(host_dir.join("file")).unwrap(),
        "host\n"
    );
    assert_eq!(
        std::fs::read_to_string(inside.join("file")).unwrap(),
        "tree\n"
    );
    assert!(!inside.join("added").exists() && !host_dir.join("added").exists());
    assert_eq!(upper_entries(&s.spec.upper_dir), Vec::<String>::new());
}

#[test]
fn hostname_hosts_and_resolv_are_provided() {
    let script = "hostname; cat /etc/hostname; grep -c kiln-test /etc/hosts; \
                  test -f /etc/resolv.conf && echo r";
    assert_eq!(run_ok(&step(script).spec), "kiln-test\nkiln-test\n1\nr\n");
}

#[test]
fn proc_is_the_new_pid_namespace() {
    let out =
        run_ok(&step("echo $$; tr '\\0' ' ' < /proc/1/cmdline; echo; ps -o pid,args; true").spec);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1");
    assert!(lines[1].starts_with("/bin/sh -c echo $$"), "{out}");
    let ps: Vec<&str> = lines[3..].iter().map(|l| l.trim()).collect();
    assert_eq!(ps.len(), 2, "{out}");
    assert!(ps[0].starts_with("1 /bin/sh -c"), "{out}");
    assert!(ps[1].contains("{ps}"), "{out}");
}

#[test]
fn no_fd_or_ignored_signal_is_inherited() {
    // ls itself holds one fd (3) for the directory it lists.
    let out = run_ok(&step("ls /proc/self/fd").spec);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2", "3"],
        "{out}"
    );
    // The step's own process (pid 1, exec'd directly) has only 0, 1, 2 (+ ls's dir fd), and
    // its cwd is inside the rootfs.
    let mut s = step("");
    s.spec.argv = vec!["/bin/ls".into(), "/proc/self/fd".into()];
    let out = run_ok(&s.spec);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2", "3"]
    );
    s.spec.argv = vec![
        "/bin/grep".into(),
        "-E".into(),
        "^Sig(Ign|Blk)".into(),
        "/proc/self/status".into(),
    ];
    assert_eq!(
        run_ok(&s.spec),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    s.spec.argv = vec!["/bin/readlink".into(), "/proc/1/cwd".into()];
    assert_eq!(run_ok(&s.spec), "/\n");
}

#[test]
fn dev_is_minimal_and_sys_is_read_only() {
    let script = "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null && echo ok; \
                  touch /sys/x 2>/dev/null || echo ro";
    assert_eq!(
        run_ok(&step(script).spec),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero \nok\nro\n"
    );
}

#[test]
fn host_mounts_are_not_visible() {
    let probe = TempDir::new().unwrap();
    let marker = format!("{PROBE}-{}", std::process::id());
    nix::mount::mount(
        Some(marker.as_str()),
        probe.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    assert!(
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&marker)
    );
    let out = run(&step("cat /proc/self/mountinfo").spec);
    nix::mount::umount(probe.path()).unwrap();
    let out = out.1;
    assert!(out.contains(" / / "), "{out}");
    assert!(!out.contains(&marker), "{out}");
    assert!(!out.contains(probe.path().to_str().unwrap()), "{out}");
}

#[test]
fn background_processes_are_killed() {
    let tag = format!("{}", 100_000 + std::process::id() % 800_000);
    let s = step(&format!("sleep {tag} & sleep {tag} & echo started"));
    assert_eq!(run_ok(&s.spec), "started\n");
    assert!(processes_with(&tag).is_empty());
}

#[test]
fn network_none_has_only_lo() {
    let mut s =
        step("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; ip link show lo | grep -c ',UP'");
    s.spec.network = NetworkMode::None;
    assert_eq!(run_ok(&s.spec), "lo\n1\n");
}

#[test]
fn cancel_kills_everything_and_leaves_no_mount() {
    let before = mountinfo();
    let tag = format!("{}", 900_000 + std::process::id() % 90_000);
    let s = step(&format!("sleep {tag} & sleep {tag}"));
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c2.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let start = Instant::now();
    let r = sandbox().run(&s.spec, &mut |_| {}, &cancel);
    t.join().unwrap();
    assert!(matches!(r, Err(SandboxError::Cancelled)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(mountinfo(), before);
    assert_eq!(upper_entries(&s.spec.upper_dir), Vec::<String>::new());
    assert!(processes_with(&tag).is_empty());
}

#[test]
fn no_mount_is_left_on_success_or_failure() {
    let before = mountinfo();
    run_ok(&step("true").spec);
    assert_eq!(run(&step("exit 1").spec).0.unwrap(), 1);
    let mut bad = step("true");
    bad.spec.user = "ghost".into();
    assert!(run(&bad.spec).0.is_err());
    let mut bad_lower = step("true");
    bad_lower.spec.lower_dirs.push("/nonexistent/layer".into());
    let err = run(&bad_lower.spec).0.unwrap_err().to_string();
    assert!(err.contains("/nonexistent/layer"), "{err}");
    assert_eq!(mountinfo(), before);
}

#[test]
fn many_lower_dirs_work() {
    let dir = TempDir::new().unwrap();
    let mut lowers = Vec::new();
    for i in 0..80 {
        let l = dir.path().join(format!(
            "a-rather-long-layer-directory-name-to-overflow-the-option-page-{i:03}"
        ));
        std::fs::create_dir(&l).unwrap();
        std::fs::write(l.join(format!("f{i}")), "").unwrap();
        lowers.push(l);
    }
    let mut s = step("ls / | grep -c '^f'");
    lowers.push(base_layer().to_path_buf());
    s.spec.lower_dirs = lowers;
    assert_eq!(run_ok(&s.spec), "80\n");
}

#[test]
fn with_rootfs_writes_land_in_upper_and_leave_no_mount() {
    let before = mountinfo();
    let dir = TempDir::new().unwrap();
    let (upper, work) = (dir.path().join("u"), dir.path().join("w"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let seen = with_rootfs(&[base_layer().to_path_buf()], &upper, &work, |root| {
        std::fs::write(root.join("etc/added"), "x").unwrap();
        std::fs::remove_file(root.join("etc/victim")).unwrap();
        let visible = mountinfo().contains(root.to_str().unwrap());
        (root.join("bin/busybox").exists(), visible)
    })
    .unwrap();
    assert_eq!(
        seen,
        (true, false),
        "mountinfo is per process, not per thread"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/added")).unwrap(),
        "x"
    );
    assert!(
        std::fs::symlink_metadata(upper.join("etc/victim"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(mountinfo(), before);
    // FROM scratch: no lowers.
    let (u2, w2) = (dir.path().join("u2"), dir.path().join("w2"));
    std::fs::create_dir(&u2).unwrap();
    std::fs::create_dir(&w2).unwrap();
    with_rootfs(&[], &u2, &w2, |root| {
        std::fs::write(root.join("a"), "1").unwrap()
    })
    .unwrap();
    assert!(u2.join("a").is_file());
}

/// CPU time (user + system) of reaped children so far.
fn children_cpu() -> Duration {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(r.user_time()) + tv(r.system_time())
}

#[test]
fn overhead_per_step() {
    let s = step("");
    let mut spec = s.spec.clone();
    spec.argv = vec!["/bin/true".into()];
    let mut times = Vec::new();
    let cpu_before = children_cpu();
    for _ in 0..21 {
        let t = Instant::now();
        run_ok(&spec);
        times.push(t.elapsed());
    }
    let cpu = (children_cpu() - cpu_before) / 21;
    times.sort();
    eprintln!(
        "sandbox per-step overhead: median {:?} (min {:?}, max {:?}); helper CPU per step {:?}",
        times[10], times[0], times[20], cpu
    );
}

#[test]
fn root_in_a_step_is_confined() {
    // Docker's default capabilities without CAP_MKNOD, and nothing more, ever: not in the
    // bounding set either, so no setuid program can regain CAP_SYS_ADMIN and the like.
    let out = run_ok(&step("grep -E '^Cap(Eff|Prm|Bnd|Amb):' /proc/self/status").spec);
    for line in [
        "CapEff:\t00000000a00425fb",
        "CapPrm:\t00000000a00425fb",
        "CapBnd:\t00000000a00425fb",
        "CapAmb:\t0000000000000000",
    ] {
        assert!(out.contains(line), "{line} in {out}");
    }
    // Host-wide kernel knobs are read-only; mounts and device nodes are refused.
    let (r, out) = run(&step("echo 3 > /proc/sys/vm/drop_caches").spec);
    assert_ne!(r.unwrap(), 0);
    assert!(out.contains("Read-only file system"), "{out}");
    let (r, out) = run(&step("mkdir -p /m && mount -t tmpfs none /m").spec);
    assert_ne!(r.unwrap(), 0, "{out}");
    let (r, out) = run(&step("mknod /disk b 254 0").spec);
    assert_ne!(r.unwrap(), 0, "{out}");
    // Host-only information under /proc and /sys is masked where this kernel has it.
    let out = run_ok(
        &step("for f in /proc/kcore /proc/keys /proc/timer_list; do [ -e $f ] && wc -c < $f; done; ls -A /sys/firmware | wc -l; ls -A /proc/acpi 2>/dev/null | wc -l").spec,
    );
    assert!(out.lines().all(|l| l.trim() == "0"), "{out}");
    // A non-root user holds no capability at all.
    let mut s = step("grep '^CapEff:' /proc/self/status");
    s.spec.user = "1000".into();
    assert!(run_ok(&s.spec).contains("CapEff:\t0000000000000000"));
}
