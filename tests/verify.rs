//! `kiln build --verify`: the examples and typical recipes build the same twice (exit 0, the
//! digest printed); a recipe that writes `date` into a file fails, naming the layer, the file
//! and the byte offset; the second build leaves nothing behind.

mod common;

use std::path::Path;

use common::*;

fn verify(
    k: &Kiln,
    dockerfile: &str,
    files: &[(&str, &[u8])],
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["--verify", "--source-date-epoch", "1700000000"];
    args.extend_from_slice(extra);
    k.build(dockerfile, files, &args).0
}

fn assert_reproducible(out: &std::process::Output) {
    assert_success(out);
    let err = stderr(out);
    assert!(
        err.contains("verify: reproducible, both builds gave sha256:"),
        "{err}"
    );
    assert!(err.contains("umask"), "{err}");
}

#[test]
fn examples_verify() {
    let k = Kiln::new();
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let out = k.run(&[
        "build",
        "--progress",
        "plain",
        "--verify",
        "--source-date-epoch",
        "0",
        hello.to_str().unwrap(),
    ]);
    assert_reproducible(&out);
    assert!(stdout_line(&out).starts_with("sha256:"));
    // The busybox base itself (FROM scratch, COPY, RUN), built the way the demo builds it.
    let base = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/build-base.sh"))
        .args([
            kiln_bin(),
            "--progress",
            "plain",
            "--verify",
            "--source-date-epoch",
            "0",
        ])
        .env("KILN_ROOT", k.root.path())
        .output()
        .unwrap();
    assert_reproducible(&base);
    // The verification's fresh store and copies are gone.
    let tmp = std::fs::read_dir(k.root.path().join("tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0, "leftovers in the store's tmp/");
}

#[test]
fn typical_recipes_verify() {
    let k = Kiln::new();
    let mut archive = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o640);
    h.set_mtime(12345);
    h.set_cksum();
    archive
        .append_data(&mut h, "inner/file", &b"abc"[..])
        .unwrap();
    let archive = archive.into_inner().unwrap();
    let recipe = r#"# syntax=docker/dockerfile:1
FROM busybox AS build
ARG VERSION=1.0
WORKDIR /src
COPY app/ ./
RUN mkdir -p /out && for f in *.txt; do cat "$f"; done > /out/all.txt \
 && echo "$VERSION" > /out/version && chmod 0750 /out/version && ln -s version /out/current
COPY <<EOF /out/notes.md
built by kiln
EOF

FROM busybox
ENV APP=/app
RUN mkdir -p /home/app/.config && chown -R app:app /home/app
COPY --from=build --chown=app:app /out/ /app/
COPY --chmod=0755 run.sh /usr/local/bin/run
COPY --link extra.txt /extra/
ADD files.tar /opt/
RUN touch /app/marker && mkdir -p /var/cache/app && echo ok > /var/cache/app/state
USER app
WORKDIR /app/data
CMD ["run"]
"#;
    let files: &[(&str, &[u8])] = &[
        ("app/a.txt", b"a\n"),
        ("app/b.txt", b"b\n"),
        ("run.sh", b"#!/bin/sh\necho run\n"),
        ("extra.txt", b"extra\n"),
        ("files.tar", &archive),
    ];
    let out = verify(&k, recipe, files, &["--build-arg", "VERSION=2.0"]);
    assert_reproducible(&out);

    // A recipe outside the context, with its own .dockerignore, and one from stdin.
    let ctx = context("", &[("keep.txt", b"keep"), ("skip.txt", b"skip")]);
    let outside = tempfile::tempdir().unwrap();
    let recipe_path = outside.path().join("Release.Dockerfile");
    std::fs::write(
        &recipe_path,
        "FROM busybox\nCOPY . /ctx/\nRUN ls /ctx > /listing\n",
    )
    .unwrap();
    std::fs::write(
        outside.path().join("Release.Dockerfile.dockerignore"),
        "skip.txt\n",
    )
    .unwrap();
    let out = k.run(&[
        "build",
        "--progress",
        "plain",
        "--verify",
        "--source-date-epoch",
        "0",
        "-f",
        recipe_path.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    assert_reproducible(&out);
}

#[test]
fn a_recipe_writing_the_date_fails_naming_the_file_and_offset() {
    let k = Kiln::new();
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta.json");
    let out = verify(
        &k,
        "FROM busybox\nRUN echo stable > /stable\nRUN date +%s > /stamp\n",
        &[],
        &["--metadata-file", meta.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains("not reproducible") && line.contains("RUN /bin/sh -c date +%s > /stamp"),
        "{line}"
    );
    // `date +%s` prints ten digits that differ at least in the last one or two.
    assert!(line.contains("stamp: content differs at byte "), "{line}");
    let offset: usize = line
        .split("differs at byte ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line}"));
    assert!((7..10).contains(&offset), "{line}");
    // The stable file in the earlier layer is not mentioned.
    assert!(!err.contains("~ stable"), "{err}");
    // A failed verification tags nothing.
    let images = String::from_utf8_lossy(&k.run(&["images"]).stdout).into_owned();
    assert!(!images.contains("kiln-verify"), "{images}");
    // Nor writes a metadata file (the second build writes none either).
    assert!(
        !meta.exists(),
        "{}",
        std::fs::read_to_string(&meta).unwrap()
    );
    assert_eq!(
        std::fs::read_dir(k.root.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}
