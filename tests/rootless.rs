//! Rootless kiln end to end, as real unprivileged users the tests create: a user with
//! subordinate id ranges builds (COPY --chown, USER, RUN --mount=type=cache), hits the cache,
//! pushes to a registry, and gets the same image digest as root does for the same recipe; a
//! user without ranges builds with a warning; and the snapshotters that stand in for the
//! kernel's overlayfs write the same layers as it does.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::registry::{Registry, skopeo};
use common::unprivileged::TestUser;
use common::{Kiln, assert_success, context, stderr, stdout_line, umoci_unpack};

/// The recipe built by root and by a normal user: owners from COPY --chown, chown, USER
/// steps; setuid and setgid bits; a hardlink; a FIFO; a deleted file.
const SAME_AS_ROOT: &str = "FROM busybox
COPY --chown=1000:1000 owned.txt /home/app/owned.txt
RUN echo x > /setuid && chown 1000:10 /setuid && chmod 4755 /setuid && chmod 2755 /sbin \\
    && mkdir -p /data/deep && chown -R 1000:1000 /data && ln /setuid /hard && mkfifo /fifo \\
    && rm /etc/group && echo 'root:x:0:\\napp:x:1000:' > /etc/group && chown 65534:65534 /fifo
USER app
RUN echo by-app > /tmp/by-app && mkdir /tmp/app-dir && ln -s /tmp/by-app /tmp/link
USER 1000:10
RUN touch /data/deep/by-1000-10
USER root
RUN rm -rf /data/deep && mkdir /data/deep && touch /data/deep/again
";

fn image_id(out: &std::process::Output) -> String {
    assert_success(out);
    stdout_line(out)
}

#[test]
fn rootless_build_cache_chown_user_cache_mount_and_push() {
    let user = TestUser::new(true);
    user.import_busybox();
    let recipe = "FROM busybox
COPY --chown=1000:1000 app.txt /home/app/app.txt
RUN --mount=type=cache,target=/cache echo run >> /cache/runs && wc -l < /cache/runs > /runs-seen
RUN echo made > /made && chmod 4755 /made && chown -R app:app /home/app
USER app
RUN id -u > /tmp/id && cp /home/app/app.txt /home/app/copy
";
    let ctx = user.context(recipe, &[("app.txt", b"hello\n")]);
    let layout = user.home.join("oci");
    let out_arg = format!("type=oci,dest={}", layout.display());
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--progress", "plain", "-t", "rootless:1"];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap());
        user.kiln(&args)
    };

    let first = build(&["-o", &out_arg]);
    let id = image_id(&first);
    let err = stderr(&first);
    assert!(
        err.contains(&format!(
            "rootless: user namespace, uid map 0→{}, 1-65536→",
            user.uid
        )),
        "{err}"
    );
    assert!(
        err.contains("snapshotter: overlay (kernel overlayfs in the user namespace, userxattr)"),
        "{err}"
    );
    assert!(!err.contains("WARNING"), "{err}");
    assert!(user.store().join("blobs").is_dir());

    // The image as a consumer unpacks it: owners as the recipe says, not as the host has them.
    let bundle = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "1", &bundle.path().join("b"));
    let owner = |p: &str| {
        let m = std::fs::symlink_metadata(rootfs.join(p)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner("home/app/app.txt"), (1000, 1000, 0o644));
    assert_eq!(owner("home/app/copy"), (1000, 1000, 0o644));
    assert_eq!(owner("made"), (0, 0, 0o4755));
    assert_eq!(owner("tmp/id").0, 1000);
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("tmp/id"), "1000\n");
    assert_eq!(read("runs-seen").trim(), "1");

    // Every step from the cache.
    let again = build(&[]);
    assert_eq!(image_id(&again), id);
    let err = stderr(&again);
    assert_eq!(err.matches(" CACHED").count(), 4, "{err}");

    // The cache mount outlives the build: a rebuilt step sees the first run's line.
    let rebuilt = build(&["--no-cache", "-o", &out_arg]);
    let id = image_id(&rebuilt);
    let rootfs = umoci_unpack(&layout, "1", &bundle.path().join("b2"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("runs-seen"))
            .unwrap()
            .trim(),
        "2"
    );

    // Push (the cached build) to a registry; skopeo sees the digest kiln reports.
    let reg = Registry::start();
    let reference = format!("127.0.0.1:{}/rootless/app:1", reg.port);
    let pushed = user.kiln(&[
        "build",
        "--progress",
        "plain",
        "-t",
        &reference,
        "--push",
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(image_id(&pushed), id);
    let err = stderr(&pushed);
    let digest = err
        .lines()
        .find_map(|l| {
            l.split_once(&format!("pushed {reference}@"))
                .map(|(_, d)| d)
        })
        .unwrap_or_else(|| panic!("no push line: {err}"))
        .trim()
        .to_string();
    let info: serde_json::Value = serde_json::from_slice(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]))
    .unwrap();
    assert_eq!(info["Digest"], digest.as_str());

    // Nothing of the user's (or its subordinate ids') stays in /tmp, and kiln wrote nothing
    // in the home but its store (the rest is this test's, and useradd's skeleton).
    assert_eq!(user.owned_under(Path::new("/tmp")), Vec::<PathBuf>::new());
    assert_eq!(
        user.owned_under(&user.store().join("tmp")),
        Vec::<PathBuf>::new()
    );
    let mut home: Vec<String> = std::fs::read_dir(&user.home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("ctx-") && !n.starts_with(".bash") && n != ".profile")
        .collect();
    home.sort();
    assert_eq!(home, [".local", "busybox.tar", "kiln", "oci"]);
    let local: Vec<PathBuf> = walkdir::WalkDir::new(user.home.join(".local"))
        .max_depth(2)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    assert_eq!(
        local,
        [".local", ".local/share", ".local/share/kiln"].map(|p| user.home.join(p))
    );

    // The store's unpacked layers hold files of subordinate ids, which only kiln's user
    // namespace may remove: prune does.
    let layers = user.store().join("layers");
    let not_the_users = || {
        walkdir::WalkDir::new(&layers)
            .into_iter()
            .filter(|e| e.as_ref().unwrap().metadata().unwrap().uid() != user.uid)
            .count()
    };
    assert!(not_the_users() > 0);
    assert_success(&user.kiln(&["rmi", "rootless:1", &reference]));
    assert_success(&user.kiln(&["prune"]));
    assert_eq!(not_the_users(), 0);
}

#[test]
fn root_and_rootless_builds_give_the_same_digest() {
    let files: &[(&str, &[u8])] = &[("owned.txt", b"mine\n")];
    let root_store = Kiln::new();
    let (out, _ctx) = root_store.build(SAME_AS_ROOT, files, &["--source-date-epoch", "0"]);
    let root_id = image_id(&out);

    let user = TestUser::new(true);
    user.import_busybox();
    let ctx = user.context(SAME_AS_ROOT, files);
    let out = user.kiln(&[
        "build",
        "--progress",
        "plain",
        "--source-date-epoch",
        "0",
        ctx.to_str().unwrap(),
    ]);
    assert_eq!(image_id(&out), root_id, "{}", stderr(&out));

    // The copying snapshotter, for where no overlay can be mounted, gives the same image.
    let out = user
        .command(&[
            "build",
            "--progress",
            "plain",
            "--no-cache",
            "--source-date-epoch",
            "0",
            ctx.to_str().unwrap(),
        ])
        .env("KILN_SNAPSHOTTER", "copy")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("snapshotter: copy ("),
        "{}",
        stderr(&out)
    );
    assert_eq!(image_id(&out), root_id, "{}", stderr(&out));
}

#[test]
fn rootless_without_ranges_warns_builds_as_root_and_refuses_other_users() {
    let user = TestUser::new(false);
    user.import_busybox();
    let ctx = user.context(
        "FROM busybox\nCOPY a.txt /a.txt\nRUN id -u > /uid && echo built > /built\n",
        &[("a.txt", b"a\n")],
    );
    let out = user.kiln(&["build", "--progress", "plain", ctx.to_str().unwrap()]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("uid map 0→{}; gid map 0→{}", user.uid, user.gid)),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "WARNING: user {} has no range in /etc/subuid and /etc/subgid",
            user.name
        )) && err.contains("files owned by other ids cannot be made"),
        "{err}"
    );

    let ctx = user.context("FROM busybox\nUSER 1000:1000\nRUN id\n", &[]);
    let out = user.kiln(&["build", "--progress", "plain", ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("gid 1000 does not exist in kiln's user namespace"),
        "{err}"
    );
}

#[test]
fn rootless_limits_need_a_cgroup_or_best_effort() {
    let user = TestUser::new(true);
    user.import_busybox();
    let ctx = user.context("FROM busybox\nRUN ulimit -u > /nproc\n", &[]);
    let ctx = ctx.to_str().unwrap();
    let out = user.kiln(&["build", "--progress", "plain", "--memory", "64m", ctx]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "the resource limits cannot be applied here: --memory: kiln may not create cgroups in"
        ) && err.contains("hint: --limits=best-effort"),
        "{err}"
    );

    let layout = user.home.join("oci");
    let out_arg = format!("type=oci,dest={}", layout.display());
    let out = user.kiln(&[
        "build",
        "--progress",
        "plain",
        "--memory",
        "64m",
        "--limits=best-effort",
        "-o",
        &out_arg,
        ctx,
    ]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("WARNING: --memory is not applied"), "{err}");
    assert!(err.contains("process limit 4096: RLIMIT_NPROC"), "{err}");
    // Without a cgroup, the default process limit is the step's RLIMIT_NPROC.
    let bundle = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "latest", &bundle.path().join("b"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("nproc")).unwrap(),
        "4096\n"
    );
}

/// The image id of `ctx` built into a fresh store with the snapshotter forced by
/// KILN_SNAPSHOTTER, checking that the build says which one ran.
fn id_with_snapshotter(ctx: &Path, snapshotter: &str) -> String {
    let k = Kiln::new();
    let out = std::process::Command::new(common::kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain", "--source-date-epoch", "0"])
        .arg(ctx)
        .env("KILN_SNAPSHOTTER", snapshotter)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        err.contains(&format!("snapshotter: {snapshotter} (")),
        "{err}"
    );
    image_id(&out)
}

/// The copying snapshotter and fuse-overlayfs (forced with KILN_SNAPSHOTTER) write the same
/// layers as the kernel's overlayfs for creates, deletes, renames, owner and mode changes,
/// opaque dirs, hardlinks made in one step, FIFOs and a COPY between RUNs.
#[test]
fn snapshotters_write_the_same_layers() {
    let recipe = "FROM busybox
RUN mkdir -p /d/sub /e /keep && echo 1 > /d/sub/f && echo 2 > /e/g && echo k > /keep/k \\
    && ln -s /d/sub/f /link && echo x > /x && chown 7:8 /x && chmod 4755 /x && ln /x /x2
COPY --chown=5:6 copied /e/copied/
RUN rm -rf /d && mkdir -p /d/new && echo 3 >> /e/g && rm /link && chmod 700 /keep \\
    && rm /etc/group && echo n > /etc/newfile && mkdir /e/h && touch /usr/bin/zzz \\
    && mkfifo /fifo && chown 1000:1000 /e && echo y > /y && ln /y /y2
RUN rm -rf /keep && echo file > /keep && mv /e /e2 && chown -R 1000:1000 /etc
";
    let ctx = context(recipe, &[("copied/a", b"a\n"), ("copied/sub/b", b"b\n")]);
    let overlay = id_with_snapshotter(ctx.path(), "overlay");
    assert_eq!(id_with_snapshotter(ctx.path(), "copy"), overlay, "copy");
    assert_eq!(
        id_with_snapshotter(ctx.path(), "fuse-overlayfs"),
        overlay,
        "fuse-overlayfs"
    );
}

/// Hardlinks across layers: a step that deletes, adds or writes through a name of a file an
/// earlier layer hardlinked. The copying snapshotter leaves what the kernel's overlayfs leaves
/// (a write copies one name up and breaks the link). fuse-overlayfs keeps such links whole
/// and copies up as it sees fit (README), so it is not held to this.
#[test]
fn the_copying_snapshotter_treats_hardlinks_across_layers_as_overlayfs_does() {
    let recipe = "FROM busybox
RUN echo x > /x && ln /x /x2 && ln /x /x3 && echo y > /y && ln /y /y2
RUN rm /x2 && ln /x /x4 && echo more >> /y
RUN echo again > /x3 && ln /y2 /y3
";
    let ctx = context(recipe, &[]);
    let overlay = id_with_snapshotter(ctx.path(), "overlay");
    assert_eq!(id_with_snapshotter(ctx.path(), "copy"), overlay);
}

/// Where the kernel refuses an overlay (here: the store on an overlayfs, as in a container's
/// root file system), kiln falls back by itself, says why, and warns that the store cannot
/// hold whiteouts.
#[test]
fn the_snapshotter_falls_back_where_the_kernel_refuses_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["l", "u", "w", "m"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let ctx = context("FROM busybox\nRUN echo made > /made\n", &[]);
    let p = |d: &str| dir.path().join(d).display().to_string();
    // A private mount namespace holds the overlay the store lives on; it ends with the shell.
    let script = format!(
        "mount --make-rprivate / && mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {} \
         && {kiln} --root {m}/store import {base} busybox >/dev/null \
         && {kiln} --root {m}/store build --progress plain {ctx}",
        p("l"),
        p("u"),
        p("w"),
        p("m"),
        kiln = common::kiln_bin(),
        m = p("m"),
        base = common::base_archive().display(),
        ctx = ctx.path().display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_success(&out);
    assert!(
        err.contains("snapshotter: fuse-overlayfs (")
            && err.contains("the kernel refused an overlay mount"),
        "{err}"
    );
    assert!(
        err.contains("WARNING: the store's file system cannot hold overlay whiteouts"),
        "{err}"
    );
}
