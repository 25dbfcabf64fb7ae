//! The CLI contract (DESIGN.md §1) through the real binary: `kiln parse`, exit statuses, error
//! rendering, and interrupting a build.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/buildkit/parser"
);

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(kiln_bin()).args(args).output().unwrap()
}

#[test]
fn parse_dump_matches_every_buildkit_case() {
    let mut cases: Vec<_> = std::fs::read_dir(Path::new(CORPUS).join("testfiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 33, "the corpus should have 33 cases");
    for case in &cases {
        let out = kiln(&[
            "parse",
            "--format",
            "dump",
            case.join("Dockerfile").to_str().unwrap(),
        ]);
        assert_success(&out);
        let want = std::fs::read(case.join("result")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&want),
            "{}",
            case.display()
        );
    }
}

#[test]
fn negative_cases_exit_2_with_an_error() {
    let mut n = 0;
    for e in std::fs::read_dir(Path::new(CORPUS).join("testfiles-negative")).unwrap() {
        let file = e.unwrap().path().join("Dockerfile");
        let out = kiln(&["parse", "--format", "dump", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", file.display());
        assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
        n += 1;
    }
    assert_eq!(n, 4);
}

#[test]
fn recipe_errors_show_file_line_column_and_caret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Dockerfile");
    std::fs::write(&file, "FROM scratch\nCOPY --bogus=1 a /b\n").unwrap();
    let out = kiln(&["parse", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let located = format!("{}:2:", file.display());
    assert!(err.contains(&located), "{err}");
    assert!(err.contains("--bogus"), "{err}");
    assert!(err.contains("COPY --bogus=1 a /b"), "{err}");
    assert!(err.lines().any(|l| l.trim_end().ends_with('^')), "{err}");
}

#[test]
fn json_format_is_valid_json() {
    let out = kiln(&[
        "parse",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/Dockerfile"),
    ]);
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stages"][0]["base"], "busybox");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(kiln(&["build", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(
        kiln(&["build", "/nonexistent-context"]).status.code(),
        Some(2)
    );
    let out = kiln(&["build", "--output", "type=nope", "."]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn quiet_prints_only_the_image_id_and_writes_iidfile() {
    let k = Kiln::new();
    let ctx = context("FROM busybox\nRUN echo noisy\n", &[]);
    let iid = ctx.path().join("iid");
    let out = k.run(&[
        "build",
        "-q",
        "--iidfile",
        iid.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("sha256:"));
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), stdout.trim());
    assert!(!stderr(&out).contains("noisy"));
}

#[test]
fn interrupted_build_leaves_no_mounts_processes_or_scratch() {
    let k = Kiln::new();
    let ctx = context("FROM busybox\nRUN echo started && sleep 300\n", &[]);
    let mounts_before = mount_count();
    let mut child = Command::new(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain", ctx.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Wait until the step's process is running (its output reaches stderr).
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sleep_running() {
        assert!(Instant::now() < deadline, "the RUN step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(mount_count(), mounts_before, "a mount was left behind");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleep_running() {
        assert!(
            Instant::now() < deadline,
            "the step's process outlived the build"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tmp = k.root.path().join("tmp");
    let leftovers: Vec<_> = walkdir::WalkDir::new(&tmp)
        .min_depth(1)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_dir() && e.depth() >= 2)
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(
        leftovers.is_empty(),
        "scratch left in the store: {leftovers:?}"
    );
}

/// Is a `sleep 300` (the test's RUN step) running anywhere on the machine?
fn sleep_running() -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.starts_with(b"sleep\x00300\x00"))
        })
}
