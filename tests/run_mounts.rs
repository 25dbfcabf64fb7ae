//! RUN --mount sources end to end: binds from stages, images and the context resolved inside
//! their own trees (hostile links never reach the host), writable binds over throwaway layers,
//! several such binds in one RUN, and cache mounts seeded from a stage.

mod common;

use common::*;

/// A stage whose `/tmplink` points at an absolute host path that the stage itself lacks, bound
/// `rw` into a later RUN: the step's writes must not land in the host's directory.
#[test]
fn rw_bind_from_a_stage_symlink_never_writes_the_host() {
    let k = Kiln::new();
    let name = format!("kiln-escape-{}", std::process::id());
    let recipe = format!(
        "FROM busybox AS evil\n\
         RUN rm -rf /tmp && ln -s /tmp /tmplink\n\
         FROM busybox\n\
         RUN --mount=type=bind,from=evil,source=/tmplink,target=/mnt,rw touch /mnt/{name}; true\n"
    );
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    let leaked = std::path::Path::new("/tmp").join(&name);
    let existed = leaked.exists();
    let _ = std::fs::remove_file(&leaked);
    assert!(!existed, "the step wrote {} on the host", leaked.display());
    // The source does not exist inside the stage (its link leads nowhere there).
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("/tmplink"), "{}", stderr(&out));
}

/// The same with a read-only bind: the step must not read the host directory either, and a
/// link whose target exists inside the stage is bound from the stage.
#[test]
fn bind_from_a_stage_symlink_resolves_inside_the_stage() {
    let k = Kiln::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "host secret").unwrap();
    let recipe = format!(
        "FROM busybox AS evil\n\
         RUN ln -s {host} /hostlink && mkdir -p /in && echo staged > /in/file && ln -s /in /inlink \
             && ln -s ../../../../../../in /deeplink\n\
         FROM busybox\n\
         RUN --mount=type=bind,from=evil,source=/inlink,target=/a cat /a/file > /via-link\n\
         RUN --mount=type=bind,from=evil,source=/deeplink,target=/b,rw cat /b/file > /via-dots \
             && echo x > /b/new\n\
         RUN --mount=type=bind,from=evil,source=/hostlink,target=/c cat /c/secret > /leak\n",
        host = host.path().display()
    );
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    assert!(!out.status.success(), "the host dir was bound");
    let err = stderr(&out);
    assert!(err.contains("/hostlink"), "{err}");
    assert!(!err.contains("host secret"), "{err}");
    // The first two RUNs worked: the same recipe without the last line builds.
    let ok = recipe.rsplit_once("RUN --mount").unwrap().0;
    let u = k.build_unpacked(ok, &[]);
    let read = |p: &str| std::fs::read_to_string(u.rootfs.join(p)).unwrap();
    assert_eq!(read("via-link"), "staged\n");
    assert_eq!(read("via-dots"), "staged\n");
    assert!(!u.rootfs.join("b").exists());
}

/// A context whose symlinks lead out of it: binding them (read-only or rw) never shows or
/// changes the host's files.
#[test]
fn context_bind_symlinks_stay_inside_the_context() {
    let k = Kiln::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "host secret").unwrap();
    let ctx = context(
        "FROM busybox\n\
         RUN --mount=type=bind,source=l,target=/m cat /m; true\n\
         RUN --mount=type=bind,source=x,target=/w,rw touch /w/planted; true\n",
        &[],
    );
    std::os::unix::fs::symlink(host.path(), ctx.path().join("x")).unwrap();
    std::os::unix::fs::symlink("x/secret", ctx.path().join("l")).unwrap();
    let out = k.run(&["build", "--progress", "plain", ctx.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!err.contains("host secret"), "{err}");
    assert!(
        !host.path().join("planted").exists(),
        "an rw bind wrote the host dir"
    );
}

/// `type=cache,from=STAGE,source=DIR`: the cache starts as a copy of that stage's directory
/// (owners and modes kept), then persists across builds like any cache; the stage is untouched.
#[test]
fn cache_mount_seeded_from_a_stage() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS seed\n\
        RUN mkdir -p /deps/sub && echo seeded > /deps/sub/file && chown -R 7:8 /deps \
            && chmod 0750 /deps\n\
        FROM busybox\n\
        RUN --mount=type=cache,target=/c,from=seed,source=/deps \
            stat -c '%u:%g %a' /c > /root-meta && cat /c/sub/file > /seen \
            && echo RUNID >> /c/log && wc -l < /c/log > /count\n";
    let first = k.build_unpacked(&recipe.replace("RUNID", "one"), &[]);
    let read = |u: &Unpacked, p: &str| std::fs::read_to_string(u.rootfs.join(p)).unwrap();
    assert_eq!(read(&first, "seen"), "seeded\n");
    assert_eq!(read(&first, "root-meta"), "7:8 750\n");
    assert_eq!(read(&first, "count").trim(), "1");
    assert!(
        !first.rootfs.join("c/sub").exists(),
        "the cache leaked into the image"
    );
    // A changed step re-runs and sees the cache as the last build left it.
    let second = k.build_unpacked(&recipe.replace("RUNID", "two"), &[]);
    assert_eq!(read(&second, "seen"), "seeded\n");
    assert_eq!(
        read(&second, "count").trim(),
        "2",
        "the seeded cache did not persist"
    );
    // The same id without from= is another cache (BuildKit keys a seeded cache by its seed).
    let plain = k.build_unpacked(
        "FROM busybox\nRUN --mount=type=cache,target=/c ls /c > /listing\n",
        &[],
    );
    assert_eq!(read(&plain, "listing"), "");
}

/// An empty `from=` names the context; several binds with `from=` or `rw` in one RUN each
/// show their own tree, and what the step writes to them is discarded.
#[test]
fn several_tree_binds_in_one_run() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS a\n\
        RUN mkdir /out && echo from-a > /out/f\n\
        FROM busybox AS b\n\
        RUN mkdir /out && echo from-b > /out/f\n\
        FROM busybox\n\
        RUN --mount=type=bind,from=a,source=/out,target=/a \
            --mount=type=bind,from=b,source=/out,target=/b,rw \
            --mount=type=bind,from=,source=data,target=/ctx,rw \
            --mount=type=bind,source=data,target=/ctx2 \
            cat /a/f /b/f /ctx/file /ctx2/file > /all \
            && echo scribble > /b/f && echo scribble > /ctx/file && cat /b/f /ctx/file >> /all\n\
        RUN --mount=type=bind,from=b,source=/out,target=/b cat /b/f >> /all\n";
    let files: &[(&str, &[u8])] = &[("data/file", b"ctx\n")];
    let u = k.build_unpacked(recipe, files);
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("all")).unwrap(),
        "from-a\nfrom-b\nctx\nctx\nscribble\nscribble\nfrom-b\n"
    );
    for absent in ["a", "b", "ctx", "ctx2"] {
        assert!(
            !u.rootfs.join(absent).exists(),
            "mount point {absent} leaked"
        );
    }
}

/// A RUN with a context bind re-runs when the bound files change (and only then).
#[test]
fn context_bind_is_part_of_the_cache_key() {
    let k = Kiln::new();
    let recipe = "FROM busybox\n\
        RUN --mount=type=bind,source=data,target=/d cat /d/file > /copy\n";
    let ctx = context(recipe, &[("data/file", b"one\n"), ("other", b"x")]);
    let path = ctx.path().to_str().unwrap();
    let build = || {
        let out = k.run(&["build", "--progress", "plain", path]);
        assert_success(&out);
        stderr(&out)
    };
    build();
    std::fs::write(ctx.path().join("other"), "y").unwrap();
    assert!(
        build().contains("CACHED"),
        "an unrelated file re-ran the step"
    );
    std::fs::write(ctx.path().join("data/file"), "two\n").unwrap();
    assert!(
        !build().contains("CACHED"),
        "a changed bound file did not re-run the step"
    );
}

/// A bind of the build context shows it through its .dockerignore, as COPY does: ignored files
/// are absent from the mount (and changing them does not re-run the step); kept ones are there.
#[test]
fn context_bind_honours_dockerignore() {
    let k = Kiln::new();
    let recipe = "FROM busybox\n\
        RUN --mount=type=bind,target=/ctx ls -A /ctx /ctx/logs > /listing 2>&1; \
            cat /ctx/kept /ctx/logs/keep.log > /seen\n";
    let files: &[(&str, &[u8])] = &[
        (".dockerignore", b"secret.txt\nlogs/*\n!logs/keep.log\n"),
        ("secret.txt", b"do not show\n"),
        ("kept", b"kept\n"),
        ("logs/drop.log", b"dropped\n"),
        ("logs/keep.log", b"re-included\n"),
    ];
    let u = k.build_unpacked(recipe, files);
    let listing = std::fs::read_to_string(u.rootfs.join("listing")).unwrap();
    assert!(!listing.contains("secret.txt"), "{listing}");
    assert!(!listing.contains("drop.log"), "{listing}");
    assert!(listing.contains("keep.log"), "{listing}");
    assert!(listing.contains("kept"), "{listing}");
    let seen = std::fs::read_to_string(u.rootfs.join("seen")).unwrap();
    assert_eq!(seen, "kept\nre-included\n");

    let ctx = context(recipe, files);
    let path = ctx.path().to_str().unwrap();
    let build = || {
        let out = k.run(&["build", "--progress", "plain", path]);
        assert_success(&out);
        stderr(&out)
    };
    build();
    std::fs::write(ctx.path().join("secret.txt"), "changed\n").unwrap();
    assert!(
        build().contains("CACHED"),
        "an ignored file re-ran the step"
    );
}

/// A cache mount's directory is made with `uid=`, `gid=` and `mode=` (BuildKit's defaults 0,
/// 0, 0755) on first use; a bad `sharing=` is a located error.
#[test]
fn cache_mount_owner_and_mode() {
    let k = Kiln::new();
    let u = k.build_unpacked(
        "FROM busybox\n\
         RUN --mount=type=cache,target=/mycache,uid=1001,gid=1002,mode=0751 \
             stat -c '%u %g %a' /mycache > /owned\n\
         RUN --mount=type=cache,target=/plain stat -c '%u %g %a' /plain > /default\n",
        &[],
    );
    let read = |p: &str| std::fs::read_to_string(u.rootfs.join(p)).unwrap();
    assert_eq!(read("owned"), "1001 1002 751\n");
    assert_eq!(read("default"), "0 0 755\n");

    let (out, _ctx) = k.build(
        "FROM busybox\nRUN --mount=type=cache,target=/c,sharing=sometimes true\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile:2") && err.contains("sharing=sometimes"),
        "{err}"
    );
}

/// Two stages built at once use one cache: with `sharing=shared` their steps overlap in it;
/// `locked` makes the second wait, `private` gives it a directory of its own.
#[test]
fn cache_mount_sharing_modes() {
    let recipe = |sharing: &str| {
        let step = |name: &str| {
            format!(
                "RUN --mount=type=cache,id=shared-dir,target=/c,sharing={sharing} \
                 if [ -e /c/busy ]; then echo overlap >> /c/log; fi; \
                 touch /c/busy; sleep 2; rm -f /c/busy; echo {name} > /done"
            )
        };
        format!(
            "FROM busybox AS a\n{}\n\
             FROM busybox AS b\n{}\n\
             FROM busybox\n\
             COPY --from=a /done /a\n\
             COPY --from=b /done /b\n\
             RUN --mount=type=cache,id=shared-dir,target=/c cat /c/log > /log 2>/dev/null; true\n",
            step("a"),
            step("b")
        )
    };
    for (sharing, overlap) in [("shared", true), ("locked", false), ("private", false)] {
        let k = Kiln::new();
        let u = k.build_unpacked(&recipe(sharing), &[]);
        let log = std::fs::read_to_string(u.rootfs.join("log")).unwrap();
        assert_eq!(
            log.contains("overlap"),
            overlap,
            "sharing={sharing}: {log:?}"
        );
    }
}
