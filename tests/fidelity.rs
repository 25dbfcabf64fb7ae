//! End-to-end tests of fidelity to BuildKit: recipes whose image (files, modes, owners,
//! contents, links, config) must equal what BuildKit builds from them, or whose error must be
//! as clear; and kiln run the way some CI runners run it, under a chroot. Run as root.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Runs `kiln build` on `ctx` with store `k` inside a chroot whose root is a recursive bind of
/// the host's `/` (so every host path is there, under a root that is not the namespace's root),
/// as in a CI runner that chroots into a prepared root with /proc, /sys and /dev bound in. The
/// mounts live in a private mount namespace and end with it.
fn build_in_chroot(k: &Kiln, ctx: &Path, args: &[&str]) -> Output {
    let jail = tempfile::Builder::new()
        .prefix("kiln-chroot-")
        .tempdir()
        .unwrap();
    let script = r#"mount --rbind / "$1" && jail="$1" && shift && exec chroot "$jail" "$@""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(jail.path())
        .arg(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain"])
        .args(args)
        .arg(ctx)
        .output()
        .unwrap()
}

/// Under a chroot, `COPY --from` a stage read nothing ("reading one: No such file or
/// directory"): the source and the destination were mounted in two mount namespaces, and the
/// path the kernel gives for a file of one, seen from the other, is the host's path, which a
/// chroot does not have.
#[test]
fn copy_from_a_stage_works_under_a_chroot() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS first\nRUN mkdir /d && echo one > /d/one && ln -s one /d/link\n\
                  FROM busybox\nCOPY --from=first /d/one /one\nCOPY --from=first /d /d\n\
                  RUN cat /one /d/link > /both\n";
    let ctx = context(recipe, &[]);
    let layout = tempfile::tempdir().unwrap();
    let dest = format!("type=oci,dest={}", layout.path().join("oci").display());
    let out = build_in_chroot(&k, ctx.path(), &["-t", "t", "-o", &dest]);
    assert_success(&out);
    let rootfs = umoci_unpack(
        &layout.path().join("oci"),
        "latest",
        &layout.path().join("b"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("both")).unwrap(),
        "one\none\n"
    );
    assert!(
        std::fs::symlink_metadata(rootfs.join("d/link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::metadata(rootfs.join("d/one")).unwrap().uid(), 0);
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A stage whose layers include one twice (two steps writing the same bytes, made identical by
/// SOURCE_DATE_EPOCH; a pulled image with repeated layers) is mounted with each lower dir once
/// (overlayfs refused the same lower twice: "Too many levels of symbolic links").
#[test]
fn a_layer_repeated_in_a_stage_mounts() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS base\nRUN echo x > /f\nFROM base AS one\nRUN echo x > /f\n\
                  FROM base AS two\nRUN echo x > /f\nCOPY --from=one /f /g\nRUN cat /f /g > /both\n";
    let u = k.build_unpacked_with(recipe, &[], &["--source-date-epoch", "0"]);
    assert_eq!(read(&u.rootfs, "both"), "x\nx\n");
}

/// A stage name defined twice is accepted, with the DuplicateStageName build check's warning
/// naming both lines; references after the second definition mean the second stage.
/// `FROM <index>` names an earlier stage, as in buildah.
#[test]
fn duplicate_stage_names_warn_and_from_an_index_works() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS x\nRUN echo first > /which\nFROM x AS early\n\
                  FROM busybox AS x\nRUN echo second > /which\n\
                  FROM 0 AS by_index\nRUN echo index > /i\n\
                  FROM x\nCOPY --from=early /which /early\nCOPY --from=by_index /which /i0\n\
                  COPY --from=by_index /i /i\n";
    let (out, _ctx) = k.build(recipe, &[], &[]);
    assert_success(&out);
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile:4:17: DuplicateStageName")
            && err.contains("stage name 'x'")
            && err.contains("line 1"),
        "{err}"
    );
    let u = k.build_unpacked_with(recipe, &[], &[]);
    assert_eq!(read(&u.rootfs, "which"), "second\n");
    assert_eq!(read(&u.rootfs, "early"), "first\n");
    assert_eq!(read(&u.rootfs, "i0"), "first\n");
    assert_eq!(read(&u.rootfs, "i"), "index\n");
}

fn owner(root: &Path, rel: &str) -> (u32, u32) {
    let m = std::fs::symlink_metadata(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    (m.uid(), m.gid())
}

/// `--chown` whose variables are unset means no `--chown` (BuildKit: the expanded value is
/// empty); a user with an empty group is the user alone; build args and ENV both expand
/// (BuildKit's testAddChownExpand).
#[test]
fn chown_that_expands_to_nothing_means_no_chown() {
    let k = Kiln::new();
    let recipe = "FROM busybox\nARG UNSET\nARG group\nENV owner=1000\n\
                  COPY --chown=${UNSET}:${UNSET} f /none\nCOPY --chown=$UNSET f /none2\n\
                  COPY --chown=app:${UNSET} f /user_only\nADD --chown=${owner}:${group} f /expanded\n";
    let files: &[(&str, &[u8])] = &[("f", b"f")];
    let u = k.build_unpacked_with(recipe, files, &["--build-arg", "group=nogroup"]);
    assert_eq!(owner(&u.rootfs, "none"), (0, 0));
    assert_eq!(owner(&u.rootfs, "none2"), (0, 0));
    assert_eq!(owner(&u.rootfs, "user_only"), (1000, 1000));
    assert_eq!(owner(&u.rootfs, "expanded"), (1000, 65534));
}

/// `.dockerignore` exceptions that re-include files under an excluded directory: the
/// directories on the way are sent too, with their own mode (BuildKit), so `COPY ./ ./`
/// creates them; a path the ignore file excludes is not in the context, even named literally.
#[test]
fn ignore_exceptions_bring_their_directories() {
    use std::os::unix::fs::PermissionsExt;
    let k = Kiln::new();
    let ctx = context(
        "FROM busybox\nWORKDIR /app\nCOPY ./ ./\nCOPY sub /only-sub/\n",
        &[
            ("sub/keep.txt", b"k"),
            ("sub/drop.txt", b"d"),
            ("sub/deep/x.txt", b"x"),
            ("sub/gone/y.txt", b"y"),
            (".dockerignore", b"sub\n!sub/keep.txt\n!sub/deep/x.txt\n"),
        ],
    );
    std::fs::set_permissions(
        ctx.path().join("sub/deep"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let u = k.build_dir_unpacked(ctx.path(), &[]);
    assert_eq!(read(&u.rootfs, "app/sub/keep.txt"), "k");
    assert_eq!(read(&u.rootfs, "app/sub/deep/x.txt"), "x");
    assert_eq!(read(&u.rootfs, "only-sub/deep/x.txt"), "x");
    for gone in ["app/sub/drop.txt", "app/sub/gone", "only-sub/drop.txt"] {
        assert!(!u.rootfs.join(gone).exists(), "{gone} was copied");
    }
    let mode = std::fs::metadata(u.rootfs.join("app/sub/deep"))
        .unwrap()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o750);

    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY sub/drop.txt /drop\n",
    )
    .unwrap();
    let out = k.run(&["build", ctx.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("sub/drop.txt"), "{}", stderr(&out));
}

/// WORKDIR (and a COPY destination) through a symlink, also a dangling one: the link stays and
/// its target directory is created, owned by the USER (BuildKit's mkdir follows links inside the
/// root).
#[test]
fn workdir_through_a_dangling_symlink_creates_its_target() {
    let k = Kiln::new();
    let recipe = "FROM busybox\nRUN ln -s /var/lib/x /x && ln -s ../opt/app /app && ln -s /home/app /h\n\
                  WORKDIR /x\nRUN pwd > here && touch made-by-run\nCOPY f /app/\n\
                  USER app\nWORKDIR /h/sub\nRUN touch mine\n";
    let u = k.build_unpacked_with(recipe, &[("f", b"f")], &[]);
    for link in ["x", "app"] {
        let m = std::fs::symlink_metadata(u.rootfs.join(link)).unwrap();
        assert!(m.file_type().is_symlink(), "/{link} is no longer a symlink");
    }
    assert_eq!(read(&u.rootfs, "var/lib/x/here"), "/var/lib/x\n");
    assert!(u.rootfs.join("var/lib/x/made-by-run").is_file());
    assert_eq!(read(&u.rootfs, "opt/app/f"), "f");
    assert_eq!(owner(&u.rootfs, "home/app/sub"), (1000, 1000));
    assert_eq!(owner(&u.rootfs, "home/app/sub/mine"), (1000, 1000));
}

/// Several sources, or a wildcard matching several paths, make the destination a directory even
/// without a trailing slash; a wildcard matching one path copies it as a file (BuildKit's
/// testCopyWildcards: `COPY f*.go foo2.go`); a wildcard matching nothing copies nothing
/// (testEmptyWildcard). Wildcards work in `COPY --from` sources too.
#[test]
fn several_sources_make_a_directory_and_wildcards_may_match_nothing() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS src\n\
                  RUN mkdir /out && echo 1 > /out/a.txt && echo 2 > /out/b.txt && echo 3 > /out/c.md\n\
                  FROM busybox\n\
                  COPY a.txt b.txt /two\nCOPY *.txt /glob\nCOPY a.* /single\n\
                  COPY a.txt nomatch* /mixed\nCOPY nomatch* /none/\nADD a.txt b.txt /addtwo\n\
                  COPY --from=src /out/*.txt /fromglob\nCOPY --from=src /out/c.* /fromsingle\n\
                  COPY --from=src /out/nomatch* /fromnone/\n\
                  COPY --from=src /out/*.txt /out/c.md /last\n";
    let files: &[(&str, &[u8])] = &[("a.txt", b"a"), ("b.txt", b"b")];
    let u = k.build_unpacked_with(recipe, files, &[]);
    let r = &u.rootfs;
    for dir in ["two", "glob", "addtwo"] {
        assert_eq!(read(r, &format!("{dir}/a.txt")), "a", "{dir}");
        assert_eq!(read(r, &format!("{dir}/b.txt")), "b", "{dir}");
    }
    assert_eq!(read(r, "single"), "a");
    assert_eq!(read(r, "mixed/a.txt"), "a");
    assert!(!r.join("none").exists());
    assert!(!r.join("fromnone").exists());
    assert_eq!(read(r, "fromglob/a.txt"), "1\n");
    assert_eq!(read(r, "fromglob/b.txt"), "2\n");
    assert!(!r.join("fromglob/c.md").exists());
    assert_eq!(read(r, "fromsingle"), "3\n");
    assert_eq!(read(r, "last/a.txt"), "1\n");
    assert_eq!(read(r, "last/c.md"), "3\n");
}

/// Secrets as BuildKit gives them: `env=VAR` makes the secret an environment variable of that
/// step only (and no file unless a target is given); `--secret id=X,env=HOSTVAR` takes the value
/// from kiln's environment; a relative target is relative to the WORKDIR; the file is 0400
/// root-owned unless mode/uid/gid say otherwise; a secret not given is skipped unless required.
#[test]
fn secrets_as_env_from_env_and_relative_targets() {
    let k = Kiln::new();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cr3t").unwrap();
    let recipe = "FROM busybox\nWORKDIR /w\n\
        RUN --mount=type=secret,id=tok,env=TOKEN echo \"[$TOKEN]\" > /env-seen && (test -e /run/secrets && echo file || echo none) > /run-ls\n\
        RUN --mount=type=secret,id=tok,dst=rel cat /w/rel > /rel-seen\n\
        RUN --mount=type=secret,id=tok stat -c '%a %u %g' /run/secrets/tok > /mode\n\
        RUN --mount=type=secret,id=tok,mode=0440,uid=1000,gid=10 stat -c '%a %u %g' /run/secrets/tok > /mode2\n\
        RUN --mount=type=secret,id=fromenv,env=E,target=/t cat /t > /fromenv-file && echo \"$E\" > /fromenv-env\n\
        RUN --mount=type=secret,id=missing test ! -e /run/secrets/missing && echo skipped > /missing\n\
        RUN echo \"[$TOKEN][$E]\" > /after\n";
    let ctx = context(recipe, &[]);
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let out = Command::new(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--progress", "plain", "-t", "s:latest", "--secret"])
        .arg(format!("id=tok,src={}", secret.path().display()))
        .args(["--secret", "id=fromenv,env=KILN_TEST_HOST_SECRET", "-o"])
        .arg(format!("type=oci,dest={}", layout.display()))
        .arg(ctx.path())
        .env("KILN_TEST_HOST_SECRET", "from-the-host-env")
        .output()
        .unwrap();
    assert_success(&out);
    let r = umoci_unpack(&layout, "latest", &dir.path().join("b"));
    assert_eq!(read(&r, "env-seen"), "[s3cr3t]\n");
    assert_eq!(read(&r, "run-ls"), "none\n", "env= alone made a file");
    assert_eq!(read(&r, "rel-seen"), "s3cr3t");
    assert_eq!(read(&r, "mode"), "400 0 0\n");
    assert_eq!(read(&r, "mode2"), "440 1000 10\n");
    assert_eq!(read(&r, "fromenv-file"), "from-the-host-env");
    assert_eq!(read(&r, "fromenv-env"), "from-the-host-env\n");
    assert_eq!(read(&r, "missing"), "skipped\n");
    assert_eq!(read(&r, "after"), "[][]\n");
    for absent in ["w/rel", "run/secrets", "t"] {
        assert!(!r.join(absent).exists(), "{absent} leaked into the image");
    }
    let config = inspect(&k, "s");
    assert!(
        !config.to_string().contains("s3cr3t") && !config.to_string().contains("from-the-host")
    );
    // A required secret that was not given is an input error naming it.
    let (out, _c) = k.build(
        "FROM busybox\nRUN --mount=type=secret,id=needed,env=X,required=true true\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("needed"), "{}", stderr(&out));
}

/// `RUN <<EOF sh` is not a lone heredoc: BuildKit passes the line and the body to the shell
/// (`sh -c "<<EOF sh\n…\nEOF"`, dispatchRun), so the outer shell expands `$i` in an unquoted
/// body before the inner `sh` reads it, as POSIX says; a quoted delimiter keeps the body as
/// written; a lone `RUN <<EOF` runs the body itself.
#[test]
fn heredoc_before_the_interpreter_goes_through_the_shell() {
    let k = Kiln::new();
    let recipe = "FROM busybox\n\
                  RUN <<EOF sh > /unquoted\nfor i in 1 2 3; do echo \"n$i\"; done\nEOF\n\
                  RUN <<'EOF' sh > /quoted\nfor i in 1 2 3; do echo \"n$i\"; done\nEOF\n\
                  RUN <<EOF\nfor i in 1 2 3; do echo \"n$i\"; done > /lone\nEOF\n\
                  RUN <<-EOF sh -e > /chomped\n\techo \"$((1 + 1))\"\n\tEOF\n";
    let u = k.build_unpacked_with(recipe, &[], &[]);
    assert_eq!(read(&u.rootfs, "unquoted"), "n\nn\nn\n");
    assert_eq!(read(&u.rootfs, "quoted"), "n1\nn2\nn3\n");
    assert_eq!(read(&u.rootfs, "lone"), "n1\nn2\nn3\n");
    assert_eq!(read(&u.rootfs, "chomped"), "2\n");
}

/// A tar with one regular file `foo` owned by 1234:2345.
fn owned_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_uid(1234);
    h.set_gid(2345);
    h.set_cksum();
    b.append_data(&mut h, "foo", &b"hi"[..]).unwrap();
    b.into_inner().unwrap()
}

/// `ADD --chown` of a local archive gives the extracted entries and the directory it makes
/// that owner, as BuildKit does since v0.23 (testDockerfileAddChownArchive: `out/foo` and
/// `out/` are 100:200); without `--chown` the archive's owners stay. buildah keeps the
/// archive's owners either way; kiln follows BuildKit.
#[test]
fn add_chown_of_an_archive_owns_its_entries() {
    let k = Kiln::new();
    let tar = owned_tar();
    let recipe = "FROM busybox\nADD --chown=100:200 t.tar /out/\nADD --chown=100:200 t.tar /out2\n\
                  ADD t.tar /plain/\n";
    let u = k.build_unpacked_with(recipe, &[("t.tar", &tar)], &[]);
    for p in ["out", "out/foo", "out2", "out2/foo"] {
        assert_eq!(owner(&u.rootfs, p), (100, 200), "{p}");
    }
    assert_eq!(owner(&u.rootfs, "plain/foo"), (1234, 2345));
}

/// The mount points a RUN needed are removed after it when they were created for it and are
/// still empty, with the directories made on their way (BuildKit's executor removes mount
/// stubs recursively: llb sets RemoveMountStubsRecursive on every RUN): a tmpfs target
/// `/missing/dir` leaves nothing, a rootfs without /etc gets no /etc from the hosts and
/// resolv.conf mounts; what the step wrote stays.
#[test]
fn mount_points_created_for_a_run_are_removed() {
    let k = Kiln::new();
    let recipe = "FROM scratch\nCOPY --from=busybox /bin/busybox /bin/busybox\n\
                  RUN [\"/bin/busybox\", \"true\"]\n\
                  RUN --mount=type=tmpfs,target=/missing/dir [\"/bin/busybox\", \"true\"]\n\
                  RUN --mount=type=tmpfs,target=/kept/dir [\"/bin/busybox\", \"touch\", \"/kept/mine\"]\n";
    let u = k.build_unpacked_with(recipe, &[], &[]);
    assert!(!u.rootfs.join("etc").exists(), "/etc was left behind");
    assert!(
        !u.rootfs.join("missing").exists(),
        "/missing was left behind"
    );
    assert!(u.rootfs.join("kept/mine").is_file());
    assert!(!u.rootfs.join("kept/dir").exists());
}

/// BuildKit's testCopyChownExistingDir and testCopyChownCreateDest: a directory source copied
/// to a new path makes that directory root-owned, or owned per `--chown`; an existing
/// destination directory keeps its owner; entries keep theirs or get `--chown`'s. Checked on a
/// copy performed (a RUN follows) and on one written straight into the layer (the last step).
#[test]
fn copy_chown_owns_the_directory_it_makes() {
    let k = Kiln::new();
    let base = "FROM busybox AS source\n\
        RUN touch /file && chown 100:200 /file && mkdir -p /dir/subdir && touch /dir/subdir/f \
            && chown 100:200 /dir && chown 101:201 /dir/subdir && chown 102:202 /dir/subdir/f\n\
        FROM busybox AS test_base\n\
        RUN mkdir -p /existingdir/existingsubdir && chown 500:600 /existingdir \
            && chown 501:601 /existingdir/existingsubdir\n\
        FROM test_base\n\
        COPY --from=source /dir /plain\n\
        COPY --from=source --chown=300:400 /dir/. /existingdir\n\
        COPY --chown=app:app . /fromctx\n\
        COPY --from=source --chown=300:400 /dir /dir\n";
    for recipe in [base.to_string(), format!("{base}RUN true\n")] {
        let u = k.build_unpacked_with(&recipe, &[("c", b"c")], &[]);
        let r = &u.rootfs;
        assert_eq!(owner(r, "plain"), (0, 0));
        assert_eq!(owner(r, "plain/subdir"), (101, 201));
        assert_eq!(owner(r, "plain/subdir/f"), (102, 202));
        assert_eq!(owner(r, "existingdir"), (500, 600));
        assert_eq!(owner(r, "existingdir/existingsubdir"), (501, 601));
        assert_eq!(owner(r, "existingdir/subdir"), (300, 400));
        assert_eq!(owner(r, "fromctx"), (1000, 1000));
        assert_eq!(owner(r, "fromctx/c"), (1000, 1000));
        assert_eq!(owner(r, "dir"), (300, 400), "{recipe}");
        assert_eq!(owner(r, "dir/subdir/f"), (300, 400));
    }
}

/// BuildKit's testCopySymlinks, testCopyFollowAllSymlinks, testCopyThroughSymlinkContext and
/// testCopyThroughSymlinkMultiStage: a symlink named by the instruction, or matched by a
/// wildcard, is followed and copied under its own name (it was copied under its target's
/// name); links on the way to a source are followed, inside the context or the stage.
#[test]
fn copied_symlinks_keep_their_names() {
    use std::os::unix::fs::symlink;
    let k = Kiln::new();
    let ctx = context(
        "FROM busybox AS build\n\
         RUN mkdir -p /out/sub && ln -s /out/sub /sub && ln -s out/sub /sub2 && echo -n data > /sub/foo\n\
         FROM busybox\nCOPY foo /\nCOPY sub/l* /alllinks/\nCOPY dir/sub /followed\nCOPY link/lfile /through\n\
         COPY --from=build /sub/foo /fromstage/\nCOPY --from=build /sub2/foo /fromstage/bar\n",
        &[
            ("bar", b"bar-contents"),
            ("sub/lfile", b"lfile-contents"),
            ("sub/subfile", b"subfile-contents"),
            ("sub/baz", b"baz-contents"),
            ("dir/.keep", b""),
        ],
    );
    let p = ctx.path();
    symlink("bar", p.join("foo")).unwrap();
    symlink("subfile", p.join("sub/l0")).unwrap();
    symlink("second", p.join("sub/l1")).unwrap();
    symlink("baz", p.join("sub/second")).unwrap();
    symlink("../bar", p.join("dir/sub")).unwrap();
    symlink("sub", p.join("link")).unwrap();
    let u = k.build_dir_unpacked(p, &[]);
    let r = &u.rootfs;
    assert_eq!(read(r, "foo"), "bar-contents");
    assert!(!r.join("bar").exists());
    assert_eq!(read(r, "alllinks/l0"), "subfile-contents");
    assert_eq!(read(r, "alllinks/l1"), "baz-contents");
    assert_eq!(read(r, "alllinks/lfile"), "lfile-contents");
    assert_eq!(read(r, "followed"), "bar-contents");
    assert_eq!(read(r, "through"), "lfile-contents");
    assert_eq!(read(r, "fromstage/foo"), "data");
    assert_eq!(read(r, "fromstage/bar"), "data");
}

/// `--chmod` in symbolic notation (Dockerfile 1.14), checked as BuildKit's testChmodNonOctal
/// does: against what `chmod` makes of the same entry; octal values and `${VAR}` as in
/// testCopyChmod; a bad value is an error naming it.
#[test]
fn chmod_takes_symbolic_modes() {
    let k = Kiln::new();
    let cases = [
        ("file", "f1", "go-w"),
        ("file", "f2", "u=rw,g=r,o=r"),
        ("file", "f3", "a+X"),
        ("dir", "d1", "go-w"),
        ("dir", "d2", "u+rw,g+r,o-x,o+w"),
        ("dir", "d3", "a+X"),
    ];
    let mut expected = String::new();
    let mut copies = String::new();
    let mut verify = String::new();
    for (src, dst, mode) in cases {
        if src == "dir" {
            expected += &format!(
                "RUN mkdir -p /input/dirs/{dst} && cp -a /input/dir /input/dirs/{dst}/{dst}\n\
                 RUN cp -a /input/dirs/{dst}/. /expected/ && chmod {mode} /expected/{dst}\n"
            );
            copies += &format!("COPY --from=base --chmod={mode} /input/dirs/{dst} /\n");
        } else {
            expected += &format!(
                "RUN cp -a /input/{src} /expected/{dst} && chmod {mode} /expected/{dst}\n"
            );
            copies += &format!("COPY --from=base --chmod={mode} /input/{src} /{dst}\n");
        }
        verify += &format!(
            "RUN [ \"$(stat -c %A /actual/{dst})\" = \"$(stat -c %A /expected/{dst})\" ]\n"
        );
    }
    let recipe = format!(
        "FROM busybox AS base\n\
         RUN mkdir /input && touch /input/file && chmod 666 /input/file && mkdir /input/dir \
             && chmod 124 /input/dir && mkdir /expected\n{expected}\n\
         FROM scratch AS result\n{copies}\n\
         FROM base\nCOPY --from=result / /actual/\n{verify}\
         ARG mode=755\nCOPY --chmod=0644 f /o/a\nCOPY --chmod=0 f /o/b\nCOPY --chmod=${{mode}} f /o/c\n"
    );
    let u = k.build_unpacked_with(&recipe, &[("f", b"f")], &[]);
    let mode = |p: &str| std::fs::metadata(u.rootfs.join(p)).unwrap().mode() & 0o7777;
    assert_eq!((mode("o/a"), mode("o/b"), mode("o/c")), (0o644, 0, 0o755));
    for bad in ["64a", "10000", "u*x"] {
        let (out, _c) = k.build(
            &format!("FROM busybox\nCOPY --chmod={bad} f /f\n"),
            &[("f", b"f")],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains(bad), "{}", stderr(&out));
    }
}

/// The build arg SOURCE_DATE_EPOCH sets the epoch, as in BuildKit
/// (testWorkdirSourceDateEpochReproducible): two builds a second apart in fresh stores give the
/// same image; an `ARG SOURCE_DATE_EPOCH` sees the value however it was given.
#[test]
fn source_date_epoch_as_a_build_arg() {
    let recipe = "FROM busybox\nWORKDIR /mydir\nARG SOURCE_DATE_EPOCH\nRUN echo \"$SOURCE_DATE_EPOCH\" > /epoch\n";
    let arg = ["--build-arg", "SOURCE_DATE_EPOCH=1673364896"];
    let first = Kiln::new().build_ok(recipe, &[], &arg);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let k = Kiln::new();
    let second = k.build_ok(recipe, &[], &[&arg[..], &["-t", "e"]].concat());
    assert_eq!(first, second);
    assert_eq!(inspect(&k, "e")["created"], "2023-01-10T15:34:56Z");
    let u = k.build_unpacked_with(recipe, &[], &["--source-date-epoch", "7"]);
    assert_eq!(read(&u.rootfs, "epoch"), "7\n");
    let (out, _c) = k.build("FROM busybox\n", &[], &arg);
    assert!(
        !stderr(&out).contains("no stage declares"),
        "{}",
        stderr(&out)
    );
}

/// COPY heredocs as BuildKit expands them (testCopyHeredocSpecialSymbols,
/// testHeredocVarSubstitution): quotes are content, the escape character escapes, `${…}`
/// modifiers work; a quoted delimiter keeps the body as written.
#[test]
fn copy_heredocs_expand_as_buildkit() {
    let k = Kiln::new();
    let recipe = "FROM scratch\nARG name=world\n\
        COPY <<EOF quotefile\n\"quotes in file\"\nEOF\n\
        COPY <<EOF slashfile1\n\\\nEOF\nCOPY <<EOF slashfile2\n\\\\\nEOF\nCOPY <<EOF slashfile3\n\\$\nEOF\n\
        COPY <<\"EOF\" rawslashfile1\n\\\nEOF\nCOPY <<\"EOF\" rawslashfile2\n\\\\\nEOF\n\
        COPY <<\"EOF\" rawslashfile3\n\\$\nEOF\n\
        COPY <<EOF q1\nHello '${name}'!\nEOF\nCOPY <<'EOF' c2\nHello ${name}!\nEOF\n\
        COPY <<EOF mods\n${name:-x} ${nope:-def} ${name/o/0}\nEOF\n";
    let u = k.build_unpacked_with(recipe, &[], &[]);
    let r = &u.rootfs;
    assert_eq!(read(r, "quotefile"), "\"quotes in file\"\n");
    assert_eq!(read(r, "slashfile1"), "\n");
    assert_eq!(read(r, "slashfile2"), "\\\n");
    assert_eq!(read(r, "slashfile3"), "$\n");
    assert_eq!(read(r, "rawslashfile1"), "\\\n");
    assert_eq!(read(r, "rawslashfile2"), "\\\\\n");
    assert_eq!(read(r, "rawslashfile3"), "\\$\n");
    assert_eq!(read(r, "q1"), "Hello 'world'!\n");
    assert_eq!(read(r, "c2"), "Hello ${name}!\n");
    assert_eq!(read(r, "mods"), "world def w0rld\n");
}
