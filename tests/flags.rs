//! The everyday `docker buildx build` flags, end to end through the binary:
//! `--build-context` (all four kinds), `-o DIR` / `type=local` / `type=tar`, `--load`, `--pull`,
//! `--add-host`, `--no-cache-filter` and `--progress rawjson`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use common::registry::Registry;
use common::{Kiln, assert_success, context, oci_ref_digest, stderr, stdout_line};

/// Every path under `dir` (relative, `/`-separated), with `@` after symlinks.
fn tree(dir: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if e.path_is_symlink() {
                format!("{rel}@")
            } else {
                rel
            }
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A directory with files and a `.dockerignore` excluding `secret.key`.
fn named_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("lib.txt"), "shared library\n").unwrap();
    std::fs::write(d.path().join("secret.key"), "do not ship\n").unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::fs::write(d.path().join("sub/x"), "x\n").unwrap();
    std::fs::write(d.path().join(".dockerignore"), "secret.key\n").unwrap();
    d
}

#[test]
fn named_contexts_of_all_four_kinds() {
    let k = Kiln::new();
    // An OCI layout on disk, tagged v1, whose image has a marker file.
    let layouts = tempfile::tempdir().unwrap();
    let layout = layouts.path().join("oci");
    k.build_ok(
        "FROM busybox\nRUN echo from-layout > /layout-marker\n",
        &[],
        &[
            "-o",
            &format!("type=oci,dest={}", layout.display()),
            "-t",
            "x:v1",
        ],
    );
    let lib = named_dir();
    let recipe = "\
FROM libfiles AS files
FROM base AS build
COPY --from=lib / /lib/
RUN --mount=type=bind,from=lib,target=/m ls /m > /mounted
FROM laid AS laid-stage
RUN cat /layout-marker > /seen
FROM builder
COPY --from=files /lib.txt /from-files.txt
COPY --from=laid-stage /seen /seen
";
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("result");
    let args = [
        "--build-context".to_string(),
        format!("lib={}", lib.path().display()),
        "--build-context".to_string(),
        format!("libfiles={}", lib.path().display()),
        "--build-context".to_string(),
        "base=docker-image://busybox".to_string(),
        "--build-context".to_string(),
        format!("laid=oci-layout://{}:v1", layout.display()),
        "--build-context".to_string(),
        "builder=target:build".to_string(),
        "-o".to_string(),
        dest.display().to_string(),
    ];
    let ctx = context(recipe, &[]);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.splice(0..0, ["build", "--progress", "plain"]);
    args.push(ctx.path().to_str().unwrap());
    let o = k.run(&args);
    assert_success(&o);
    let files = tree(&dest);
    // The directory context, through its own .dockerignore (COPY, FROM and the RUN mount).
    assert!(
        files.contains("lib/lib.txt") && files.contains("lib/sub/x"),
        "{files:?}"
    );
    assert!(!files.contains("lib/secret.key"), "{files:?}");
    assert_eq!(
        std::fs::read_to_string(dest.join("mounted")).unwrap(),
        "lib.txt\nsub\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("from-files.txt")).unwrap(),
        "shared library\n"
    );
    // The OCI layout's image, and busybox (docker-image://) under the target: alias.
    assert_eq!(
        std::fs::read_to_string(dest.join("seen")).unwrap(),
        "from-layout\n"
    );
    assert!(files.contains("bin/busybox"), "{files:?}");

    // Hashed like the main context: an ignored file changes nothing, a kept one rebuilds.
    std::fs::write(lib.path().join("secret.key"), "rotated\n").unwrap();
    let o = k.run(&args);
    assert_success(&o);
    assert!(!stderr(&o).contains("rebuilding"), "{}", stderr(&o));
    assert!(stderr(&o).contains("0 steps run"), "{}", stderr(&o));
    std::fs::write(lib.path().join("lib.txt"), "changed\n").unwrap();
    let o = k.run(&args);
    assert_success(&o);
    let err = stderr(&o);
    assert!(
        err.contains("COPY --from=lib / /lib/ (line 3): rebuilding: 1 file changed: lib.txt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("lib/lib.txt")).unwrap(),
        "changed\n"
    );
}

/// `FROM` and `--from=` find a context by the image name's short form, as in BuildKit:
/// `docker.io/library/mybase:latest` is the context `mybase`.
#[test]
fn named_contexts_match_full_image_names() {
    let k = Kiln::new();
    let lib = named_dir();
    let recipe = "FROM docker.io/library/mybase:latest\n\
                  COPY --from=docker.io/library/lib /lib.txt /lib.txt\n\
                  RUN test -x /bin/busybox && cat /lib.txt > /seen\n";
    let lib_arg = format!("lib={}", lib.path().display());
    let u = k.build_unpacked_with(
        recipe,
        &[],
        &[
            "--build-context",
            "mybase=docker-image://busybox",
            "--build-context",
            &lib_arg,
        ],
    );
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("seen")).unwrap(),
        "shared library\n"
    );
}

/// `oci-layout://DIR@sha256:…` picks an image of a layout by digest (among several tags, where
/// no tag alone would choose); a digest the layout lacks is a usage error naming it.
#[test]
fn an_oci_layout_context_pinned_by_digest() {
    let k = Kiln::new();
    let layouts = tempfile::tempdir().unwrap();
    let layout = layouts.path().join("oci");
    for (tag, marker) in [("v1", "one"), ("v2", "two")] {
        k.build_ok(
            &format!("FROM busybox\nRUN echo {marker} > /marker\n"),
            &[],
            &[
                "-o",
                &format!("type=oci,dest={}", layout.display()),
                "-t",
                &format!("x:{tag}"),
            ],
        );
    }
    let v2 = oci_ref_digest(&layout, "v2");
    let context = format!("laid=oci-layout://{}@{v2}", layout.display());
    let u = k.build_unpacked_with(
        "FROM laid\nRUN cat /marker > /seen\n",
        &[],
        &["--build-context", &context],
    );
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("seen")).unwrap(),
        "two\n"
    );

    let missing = format!(
        "laid=oci-layout://{}@sha256:{}",
        layout.display(),
        "0".repeat(64)
    );
    let (o, _ctx) = k.build("FROM laid\n", &[], &["--build-context", &missing]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&"0".repeat(64)), "{}", stderr(&o));
}

#[test]
fn a_context_named_like_a_stage_replaces_it_and_bad_values_are_usage_errors() {
    let k = Kiln::new();
    let lib = named_dir();
    let recipe =
        "FROM busybox AS deps\nRUN echo built > /deps\nFROM scratch\nCOPY --from=deps / /\n";
    let out = tempfile::tempdir().unwrap();
    let ctx_arg = format!("deps={}", lib.path().display());
    let dest = out.path().display().to_string();
    let (o, _ctx) = k.build(recipe, &[], &["--build-context", &ctx_arg, "-o", &dest]);
    assert_success(&o);
    assert!(!stderr(&o).contains("RUN echo built"), "{}", stderr(&o));
    assert_eq!(
        tree(out.path()),
        set(&[".dockerignore", "lib.txt", "sub", "sub/x"])
    );
    let no_layout = format!("deps=oci-layout://{}:v1", lib.path().display());
    for (bad, says) in [
        ("nope", "NAME=VALUE"),
        ("x=/no/such/dir", "/no/such/dir"),
        ("x=git://example/repo", "git://"),
        (no_layout.as_str(), "not an OCI image layout"),
    ] {
        let (o, _ctx) = k.build(recipe, &[], &["--build-context", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        assert!(stderr(&o).contains(says), "{bad}: {}", stderr(&o));
    }
    // target: must name an earlier stage.
    let (o, _ctx) = k.build(
        "FROM x\nFROM busybox AS late\n",
        &[],
        &["--build-context", "x=target:late"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("target:late"), "{}", stderr(&o));
}

#[test]
fn a_directory_context_gives_the_same_image_wherever_it_lies() {
    let k = Kiln::new();
    let (a, b) = (named_dir(), named_dir());
    let id = |dir: &Path| {
        k.build_ok(
            "FROM lib\n",
            &[],
            &[
                "--source-date-epoch",
                "0",
                "--build-context",
                &format!("lib={}", dir.display()),
            ],
        )
    };
    assert_eq!(id(a.path()), id(b.path()));
}

const ARTIFACT: &str = "\
FROM busybox AS build
RUN mkdir -p /out/bin && echo app > /out/bin/app && chown 1000:1000 /out/bin/app \
 && ln -s /etc/passwd /out/passwd-link && ln -s / /out/root-link
FROM scratch AS artifact
COPY --from=build /out/ /
FROM busybox
RUN echo final image > /final
";

#[test]
fn output_with_target_writes_exactly_the_stage_files() {
    let k = Kiln::new();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("dist");
    let dest = format!("type=local,dest={}", dir.display());
    let (o, ctx) = k.build(ARTIFACT, &[], &["--target", "artifact", "-o", &dest]);
    assert_success(&o);
    assert_eq!(
        tree(&dir),
        set(&["bin", "bin/app", "passwd-link@", "root-link@"])
    );
    // Owned by the user running kiln, symlinks kept as they are.
    let app = std::fs::metadata(dir.join("bin/app")).unwrap();
    assert_eq!((app.uid(), app.gid()), (0, 0));
    assert_eq!(
        std::fs::read_link(dir.join("passwd-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    // `-o DIR` is the same; without --target it is the final stage's whole filesystem.
    let plain = out.path().join("plain");
    let o = k.run(&[
        "build",
        "-q",
        "-o",
        plain.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&o);
    assert!(plain.join("final").is_file() && plain.join("bin/busybox").exists());
    // type=tar: the same entries, owners kept, as a plain tar; `-o -` writes it to stdout.
    let tar_file = out.path().join("a.tar");
    let o = k.run(&[
        "build",
        "-q",
        "--target",
        "artifact",
        "--output",
        &format!("type=tar,dest={}", tar_file.display()),
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&o);
    let listing = |bytes: &[u8]| -> BTreeSet<String> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                format!(
                    "{} {}:{}{}",
                    e.path().unwrap().display(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    e.link_name()
                        .unwrap()
                        .map(|l| format!(" -> {}", l.display()))
                        .unwrap_or_default()
                )
            })
            .collect()
    };
    let from_file = listing(&std::fs::read(&tar_file).unwrap());
    assert_eq!(
        from_file,
        set(&[
            "bin/ 0:0",
            "bin/app 1000:1000",
            "passwd-link 0:0 -> /etc/passwd",
            "root-link 0:0 -> /"
        ])
    );
    let o = k.run(&[
        "build",
        "--target",
        "artifact",
        "-o",
        "-",
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&o);
    assert_eq!(listing(&o.stdout), from_file, "stdout holds only the tar");
}

#[test]
fn output_of_several_platforms_is_a_directory_each() {
    let k = Kiln::empty();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("dist");
    let (o, _ctx) = k.build(
        "FROM scratch\nCOPY a.txt /\n",
        &[("a.txt", b"a\n")],
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            dest.to_str().unwrap(),
        ],
    );
    assert_success(&o);
    assert_eq!(
        tree(&dest),
        set(&[
            "linux_amd64",
            "linux_amd64/a.txt",
            "linux_arm64",
            "linux_arm64/a.txt"
        ])
    );
    for one_platform_only in [&["--load"][..], &["-o", "-"][..]] {
        let mut args = vec!["--platform", "linux/amd64,linux/arm64"];
        args.extend_from_slice(one_platform_only);
        let (o, _ctx) = k.build("FROM scratch\n", &[], &args);
        assert_eq!(o.status.code(), Some(2), "{one_platform_only:?}");
        assert!(stderr(&o).contains("one platform"), "{}", stderr(&o));
    }
}

#[test]
fn output_dir_is_never_written_through_symlinks_pointing_out() {
    let k = Kiln::new();
    let victim = tempfile::tempdir().unwrap();
    std::fs::write(victim.path().join("keep"), "untouched\n").unwrap();
    let v = victim.path().display().to_string();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("dist");
    let dest_s = dest.display().to_string();
    // The first export plants absolute symlinks to the victim (its dir and a file in it) in
    // DIR, next to a directory of the same path inside DIR ...
    let first = format!(
        "FROM busybox AS s\nRUN mkdir -p /o{v} && ln -s {v} /o/data && ln -s {v}/keep /o/file\nFROM scratch\nCOPY --from=s /o/ /\n"
    );
    let (o, _ctx) = k.build(&first, &[], &["-o", &dest_s]);
    assert_success(&o);
    assert!(dest.join("data").is_symlink() && dest.join("file").is_symlink());
    // ... the second has a directory and a file at those paths: they land inside DIR.
    let second = "FROM busybox AS s\nRUN mkdir -p /o/data && echo payload > /o/data/payload && echo overwritten > /o/file\nFROM scratch\nCOPY --from=s /o/ /\n";
    let (o, _ctx) = k.build(second, &[], &["-o", &dest_s]);
    assert_success(&o);
    assert_eq!(tree(victim.path()), set(&["keep"]));
    assert_eq!(
        std::fs::read_to_string(victim.path().join("keep")).unwrap(),
        "untouched\n"
    );
    let inside = dest.join(v.trim_start_matches('/')).join("payload");
    assert_eq!(std::fs::read_to_string(inside).unwrap(), "payload\n");
}

#[test]
fn load_hands_the_image_to_podman_or_says_why_not() {
    let k = Kiln::new();
    let tools = tempfile::tempdir().unwrap();
    let podman = ["/usr/bin/podman", "/usr/local/bin/podman"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("podman is installed by test.sh");
    std::os::unix::fs::symlink(podman, tools.path().join("podman")).unwrap();
    // Podman keeps what it loads in a store of the test's own.
    let storage = tempfile::tempdir().unwrap();
    let conf = storage.path().join("storage.conf");
    std::fs::write(
        &conf,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            storage.path().display()
        ),
    )
    .unwrap();
    let ctx = context("FROM busybox\nRUN echo loaded > /marker\n", &[]);
    let run = |path: &Path| {
        Command::new(common::kiln_bin())
            .arg("--root")
            .arg(k.root.path())
            .args(["build", "--progress", "plain", "--load", "-t", "loaded:1"])
            .arg(ctx.path())
            .env("PATH", path)
            .env("CONTAINERS_STORAGE_CONF", &conf)
            .output()
            .unwrap()
    };
    let o = run(tools.path());
    assert_success(&o);
    let id = stdout_line(&o);
    let images = Command::new(podman)
        .args([
            "images",
            "--no-trunc",
            "--format",
            "{{.Repository}}:{{.Tag}} {{.ID}}",
        ])
        .env("CONTAINERS_STORAGE_CONF", &conf)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&images.stdout).trim(),
        format!("docker.io/library/loaded:1 {id}")
    );
    // Neither tool: a clear error, exit status 1.
    let empty = tempfile::tempdir().unwrap();
    let o = run(empty.path());
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("neither docker nor podman")
            && err.contains("docker is not installed")
            && err.contains("podman is not installed"),
        "{err}"
    );
}

#[test]
fn pull_asks_the_registry_even_when_the_store_has_the_image() {
    let reg = Registry::start();
    let k = Kiln::new();
    let base = format!("{}/base:1", reg.host());
    let push = |content: &str| {
        k.build_ok(
            &format!("FROM busybox\nRUN echo {content} > /version\n"),
            &[],
            &["-t", &base, "--push"],
        );
    };
    push("one");
    let user = Kiln::new();
    let recipe = format!("FROM {base}\nRUN cat /version > /seen\n");
    let seen = |extra: &[&str]| -> String {
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().display().to_string();
        let mut args = vec!["-o", dest.as_str()];
        args.extend_from_slice(extra);
        let (o, _ctx) = user.build(&recipe, &[], &args);
        assert_success(&o);
        std::fs::read_to_string(out.path().join("seen")).unwrap()
    };
    assert_eq!(seen(&[]), "one\n");
    push("two");
    assert_eq!(seen(&[]), "one\n", "without --pull the stored base is used");
    assert_eq!(seen(&["--pull"]), "two\n");
}

#[test]
fn add_host_reaches_run_steps() {
    let k = Kiln::new();
    let (o, _ctx) = k.build(
        "FROM busybox\nRUN grep -E 'db|gw|v6' /etc/hosts\n",
        &[],
        &[
            "--add-host",
            "db:10.0.0.5",
            "--add-host",
            "gw=host-gateway",
            "--add-host",
            "v6:fd00::1",
            "--no-cache",
        ],
    );
    assert_success(&o);
    let err = stderr(&o);
    for line in ["10.0.0.5\tdb", "127.0.0.1\tgw", "fd00::1\tv6"] {
        assert!(err.contains(line), "{line} missing:\n{err}");
    }
    let (o, _ctx) = k.build("FROM busybox\n", &[], &["--add-host", "db:nonsense"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("db:nonsense"), "{}", stderr(&o));
}

#[test]
fn no_cache_filter_rebuilds_only_the_named_stages() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS deps\nRUN echo deps > /deps\nFROM busybox AS app\nCOPY --from=deps /deps /deps\nRUN echo app > /app\n";
    let ctx = context(recipe, &[]);
    let dir = ctx.path().to_str().unwrap();
    assert_success(&k.run(&["build", "--progress", "plain", dir]));
    let o = k.run(&[
        "build",
        "--progress",
        "plain",
        "--no-cache-filter",
        "deps",
        dir,
    ]);
    assert_success(&o);
    let err = stderr(&o);
    assert!(
        err.contains("[deps 2/2] RUN echo deps > /deps (line 2): rebuilding: --no-cache-filter"),
        "{err}"
    );
    // The rebuilt stage gave the same result: the next stage stays cached.
    assert!(
        err.contains("[app 3/3] RUN echo app > /app CACHED"),
        "{err}"
    );
    let o = k.run(&[
        "build",
        "--progress",
        "plain",
        "--no-cache-filter",
        "deps,app",
        dir,
    ]);
    assert!(
        stderr(&o)
            .contains("[app 3/3] RUN echo app > /app (line 5): rebuilding: --no-cache-filter")
    );
    let o = k.run(&["build", "--no-cache-filter", "nosuch", dir]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));
}

#[test]
fn progress_rawjson_is_one_json_event_a_line() {
    let k = Kiln::new();
    let ctx = context("FROM busybox\nRUN echo hello from run\n", &[]);
    let o = k.run(&[
        "build",
        "--progress",
        "rawjson",
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&o);
    let err = stderr(&o);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let run_done = events.iter().any(|e| {
        e["vertexes"][0]["name"]
            .as_str()
            .is_some_and(|n| n.contains("RUN echo hello"))
            && e["vertexes"][0]["completed"].is_string()
    });
    assert!(run_done, "{err}");
    let logged = events.iter().any(|e| {
        e["logs"][0]["data"].as_str().is_some_and(|d| {
            base64::engine::general_purpose::STANDARD.decode(d).unwrap() == b"hello from run\n"
        })
    });
    assert!(logged, "{err}");
    // Warnings (build checks) come as warning events.
    let ctx = context("FROM busybox\nMAINTAINER me\n", &[]);
    let o = k.run(&[
        "build",
        "--progress",
        "rawjson",
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&o);
    assert!(stderr(&o).lines().any(|l| l.starts_with("{\"warnings\":")));
}
