//! End-to-end tests of multi-stage builds, ARG scoping and the build cache with its miss
//! explanations. Run as root.

mod common;

use common::*;

/// Lines of plain progress output for steps that ran (`DONE`) and were cached (`CACHED`).
fn steps(err: &str, suffix: &str) -> Vec<String> {
    err.lines()
        .filter(|l| {
            l.trim_end().ends_with(suffix)
                || (suffix == "DONE" && l.contains("] ") && l.contains(" DONE "))
        })
        .map(|l| l.to_string())
        .collect()
}

fn ran(err: &str, needle: &str) -> bool {
    err.lines()
        .any(|l| l.contains(needle) && l.contains(" DONE "))
}

#[test]
fn named_indexed_and_image_sources() {
    let k = Kiln::new();
    let recipe = r#"FROM busybox AS first
RUN echo one > /one
FROM busybox
RUN echo two > /two
FROM scratch
COPY --from=first /one /one
COPY --from=1 /two /two
COPY --from=busybox /bin/busybox /bin/busybox
"#;
    let u = k.build_unpacked(recipe, &[]);
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("one")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("two")).unwrap(),
        "two\n"
    );
    assert!(u.rootfs.join("bin/busybox").is_file());
}

#[test]
fn target_builds_only_what_it_needs() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS broken\nRUN exit 1\nFROM busybox AS base\nRUN echo base > /b\nFROM base AS app\nRUN cat /b > /a\nFROM broken\n";
    let (out, _c) = k.build(recipe, &[], &["--target", "app", "-t", "app"]);
    assert_success(&out);
    assert!(
        !stderr(&out).contains("RUN exit 1"),
        "an unneeded stage was built:\n{}",
        stderr(&out)
    );
    let (out, _c) = k.build(recipe, &[], &["--target", "1"]);
    assert_success(&out);
    let (out, _c) = k.build(recipe, &[], &["--target", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope"));
}

#[test]
fn independent_stages_overlap_in_time() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS a\nRUN sleep 1 && echo a > /a\nFROM busybox AS b\nRUN sleep 1 && echo b > /b\nFROM scratch\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n";
    let (out, _c) = k.build(recipe, &[], &["--jobs", "2"]);
    assert_success(&out);
    let err = stderr(&out);
    // Plain lines are "#<seconds> [stage n/N] TEXT" when a step starts and "... DONE <d>s" at its end.
    let time_at = |stage: &str, done: bool| -> f64 {
        let tag = format!("[{stage} 2/2] RUN");
        let line = err
            .lines()
            .find(|l| l.contains(&tag) && l.contains(" DONE ") == done && !l.contains("rebuilding"))
            .unwrap_or_else(|| panic!("no {tag} line (done={done}) in\n{err}"));
        line.trim_start_matches('#')
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let start = |stage: &str| time_at(stage, false);
    let done = |stage: &str| time_at(stage, true);
    let (sa, sb, da, db) = (start("a"), start("b"), done("a"), done("b"));
    assert!(
        sa < db && sb < da,
        "stages did not overlap: a {sa}..{da}, b {sb}..{db}\n{err}"
    );
}

#[test]
fn arg_scoping() {
    let k = Kiln::new();
    let recipe = r#"ARG BASE=busybox
ARG GLOBAL=g
FROM ${BASE}
RUN echo "global=[$GLOBAL]" > /global
ARG GLOBAL
RUN echo "redeclared=[$GLOBAL]" > /redeclared
ARG VERSION=1.0
RUN echo "version=[$VERSION]" > /version
ENV FROM_ENV=$VERSION
"#;
    let u = k.build_unpacked(recipe, &[]);
    let read = |p: &str| std::fs::read_to_string(u.rootfs.join(p)).unwrap();
    assert_eq!(read("global"), "global=[]\n");
    assert_eq!(read("redeclared"), "redeclared=[g]\n");
    assert_eq!(read("version"), "version=[1.0]\n");

    let (out, _c) = k.build(recipe, &[], &["--build-arg", "VERSION=2.0", "-t", "v2"]);
    assert_success(&out);
    let c = inspect(&k, "v2");
    let env = c["config"]["Env"].to_string();
    assert!(env.contains("FROM_ENV=2.0"), "{env}");
    assert!(
        !env.contains("VERSION=") && !env.contains("GLOBAL"),
        "ARG values leaked into the config: {env}"
    );
    let history = c["history"].to_string();
    assert!(
        !history.contains("2.0\""),
        "ARG values leaked into history: {history}"
    );
}

#[test]
fn unused_build_arg_warns() {
    let k = Kiln::new();
    let (out, _c) = k.build(
        "FROM busybox\nRUN true\n",
        &[],
        &["--build-arg", "NOBODY=1"],
    );
    assert_success(&out);
    assert!(stderr(&out).contains("NOBODY"), "{}", stderr(&out));
}

#[test]
fn onbuild_of_a_parent_stage_runs_in_the_child() {
    let k = Kiln::new();
    let recipe = "FROM busybox AS parent\nONBUILD RUN echo from-trigger > /trigger\nFROM parent\nRUN cat /trigger > /seen\n";
    let u = k.build_unpacked(recipe, &[]);
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("seen")).unwrap(),
        "from-trigger\n"
    );
}

#[test]
fn cache_reuses_and_explains() {
    let k = Kiln::new();
    let recipe = "FROM busybox\nRUN echo base > /base\nCOPY app/ /app/\nARG VERSION=1\nRUN echo v$VERSION > /v && cat /app/main.py > /copy\n";
    let ctx = context(
        recipe,
        &[("app/main.py", b"print(1)"), ("app/util.py", b"x")],
    );
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--progress", "plain"];
        args.extend_from_slice(extra);
        let p = ctx.path().to_str().unwrap().to_string();
        let mut owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        owned.push(p);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        let out = k.run(&refs);
        assert_success(&out);
        (stdout_line(&out), stderr(&out))
    };
    let (id1, err1) = build(&[]);
    assert!(ran(&err1, "RUN echo base"), "{err1}");

    // Unchanged: nothing runs, same image.
    let (id2, err2) = build(&[]);
    assert_eq!(id1, id2, "an unchanged rebuild changed the image");
    assert!(
        steps(&err2, "DONE").iter().all(|l| !l.contains("RUN")),
        "a RUN ran on an unchanged rebuild:\n{err2}"
    );

    // One context file: the COPY and the step after it rebuild, nothing before.
    std::fs::write(ctx.path().join("app/main.py"), "print(2)").unwrap();
    let (_, err3) = build(&[]);
    assert!(!ran(&err3, "RUN echo base"), "{err3}");
    assert!(ran(&err3, "COPY app/"), "{err3}");
    assert!(err3.contains("1 file changed: app/main.py"), "{err3}");
    assert!(ran(&err3, "RUN echo v$VERSION"), "{err3}");

    // One build arg: only the RUN that sees it.
    let (_, err4) = build(&["--build-arg", "VERSION=2"]);
    assert!(
        !ran(&err4, "RUN echo base") && !ran(&err4, "COPY app/"),
        "{err4}"
    );
    assert!(ran(&err4, "RUN echo v$VERSION"), "{err4}");
    assert!(err4.contains("build arg VERSION changed"), "{err4}");

    // One recipe line.
    let edited = recipe.replace("echo base > /base", "echo base2 > /base");
    std::fs::write(ctx.path().join("Dockerfile"), edited).unwrap();
    let (_, err5) = build(&["--build-arg", "VERSION=2"]);
    assert!(ran(&err5, "RUN echo base2"), "{err5}");
    assert!(err5.contains("instruction changed"), "{err5}");
    assert!(err5.contains("an earlier step changed"), "{err5}");

    // --no-cache runs everything.
    let (_, err6) = build(&["--build-arg", "VERSION=2", "--no-cache"]);
    assert!(
        ran(&err6, "RUN echo base2") && ran(&err6, "COPY app/"),
        "{err6}"
    );
}

#[test]
fn copy_from_a_stage_keeps_symlinks_inside_the_copied_directory() {
    let k = Kiln::new();
    let dockerfile = "FROM busybox AS s\n\
        RUN mkdir -p /d/sub && echo hi > /d/f && ln -s f /d/rel && ln -s /etc/passwd /d/abs \\\n\
         && ln -s sub /d/dirlink && ln -s /nowhere /d/dangling\n\
        FROM busybox\nCOPY --from=s /d /out\n";
    let img = k.build_unpacked(dockerfile, &[]);
    let out = img.rootfs.join("out");
    for (name, target) in [
        ("rel", "f"),
        ("abs", "/etc/passwd"),
        ("dirlink", "sub"),
        ("dangling", "/nowhere"),
    ] {
        let link = std::fs::read_link(out.join(name));
        assert_eq!(
            link.ok().as_deref(),
            Some(std::path::Path::new(target)),
            "/out/{name} is not the stage's symlink"
        );
    }
    assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "hi\n");
    assert!(out.join("sub").is_dir());
}
