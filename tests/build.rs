//! End-to-end tests of single-stage builds: real sandbox, real overlayfs, images read back
//! by umoci and skopeo. Run as root.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use common::*;

#[test]
fn example_image_is_read_by_umoci_and_skopeo() {
    let k = Kiln::new();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let ex = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello");
    let out = k.run(&[
        "build",
        "--progress",
        "plain",
        "-t",
        "hello",
        "-o",
        &format!("type=oci,dest={}", layout.display()),
        ex,
    ]);
    assert_success(&out);
    let sk = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:latest", layout.display()))
        .output()
        .unwrap();
    assert_success(&sk);
    let info: serde_json::Value = serde_json::from_slice(&sk.stdout).unwrap();
    assert_eq!(info["Labels"]["org.opencontainers.image.title"], "hello");
    // The store itself is an OCI layout skopeo reads.
    let sk = Command::new("skopeo")
        .arg("inspect")
        .arg(format!(
            "oci:{}:docker.io/library/hello:latest",
            k.root.path().display()
        ))
        .output()
        .unwrap();
    assert_success(&sk);
    let bundle = dir.path().join("bundle");
    umoci_unpack(&layout, "latest", &bundle);
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/greeting.txt")).unwrap(),
        "hello from kiln\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "Built by kiln.\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/data/epoch-year")).unwrap(),
        "1970\n"
    );
    let mode = std::fs::metadata(rootfs.join("app/hello.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // Nothing of the sandbox's plumbing leaks into the image.
    for leaked in ["etc/hostname", "etc/resolv.conf", "etc/hosts"] {
        assert!(
            !rootfs.join(leaked).exists(),
            "{leaked} leaked into the image"
        );
    }
    let config = inspect(&k, "hello");
    assert_eq!(config["config"]["User"], "app");
    assert_eq!(config["config"]["WorkingDir"], "/app");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/app/hello.sh"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["world"]));
    assert!(config["config"]["ExposedPorts"].get("8080/tcp").is_some());
    assert!(
        !config["config"]["Env"].to_string().contains("GREETING"),
        "ARG values must not reach the config"
    );
}

#[test]
fn metadata_instructions_land_in_the_config() {
    let k = Kiln::new();
    let recipe = r#"FROM busybox
ENV A=1 B="two words"
ENV C $A-x
LABEL l1=v1 "l 2"="v 2"
EXPOSE 80 53/udp 8000-8002
VOLUME ["/data", "/logs"]
VOLUME /cache
USER 1000:1000
WORKDIR /srv
WORKDIR sub
STOPSIGNAL SIGTERM
SHELL ["/bin/sh", "-ec"]
CMD echo hi
HEALTHCHECK --interval=5s --retries=3 CMD wget -q localhost
ONBUILD RUN echo triggered
MAINTAINER someone@example.com
"#;
    k.build_ok(recipe, &[], &["-t", "meta"]);
    let c = inspect(&k, "meta");
    let cfg = &c["config"];
    let env: Vec<String> = serde_json::from_value(cfg["Env"].clone()).unwrap();
    assert!(
        env.contains(&"A=1".into())
            && env.contains(&"B=two words".into())
            && env.contains(&"C=1-x".into()),
        "{env:?}"
    );
    assert_eq!(cfg["Labels"]["l 2"], "v 2");
    for p in ["80/tcp", "53/udp", "8000/tcp", "8001/tcp", "8002/tcp"] {
        assert!(cfg["ExposedPorts"].get(p).is_some(), "{p}");
    }
    for v in ["/data", "/logs", "/cache"] {
        assert!(cfg["Volumes"].get(v).is_some(), "{v}");
    }
    assert_eq!(cfg["User"], "1000:1000");
    assert_eq!(cfg["WorkingDir"], "/srv/sub");
    assert_eq!(cfg["StopSignal"], "SIGTERM");
    assert_eq!(cfg["Shell"], serde_json::json!(["/bin/sh", "-ec"]));
    assert_eq!(cfg["Cmd"], serde_json::json!(["/bin/sh", "-ec", "echo hi"]));
    assert_eq!(
        cfg["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "wget -q localhost"])
    );
    assert_eq!(cfg["Healthcheck"]["Interval"], 5_000_000_000u64);
    assert_eq!(cfg["Healthcheck"]["Retries"], 3);
    assert_eq!(cfg["OnBuild"], serde_json::json!(["RUN echo triggered"]));
    assert_eq!(c["author"], "someone@example.com");
    let history = c["history"].as_array().unwrap();
    let ours = &history[history.len() - 16..];
    let metadata_only = ours.iter().filter(|h| {
        !h["created_by"]
            .as_str()
            .unwrap_or("")
            .starts_with("WORKDIR")
    });
    assert!(metadata_only.clone().count() >= 14);
    assert!(
        metadata_only.into_iter().all(|h| h["empty_layer"] == true),
        "metadata steps add no layer"
    );
    let workdir: Vec<_> = ours
        .iter()
        .filter(|h| h["created_by"] == "WORKDIR /srv")
        .collect();
    assert_eq!(workdir.len(), 1);
    assert!(
        workdir[0]["empty_layer"].is_null(),
        "WORKDIR /srv should create the directory in a layer"
    );

    // ENTRYPOINT resets an inherited CMD; the ONBUILD trigger runs in the child.
    let child = "FROM meta\nENTRYPOINT [\"/bin/true\"]\n";
    let (out, _ctx) = k.build(child, &[], &["-t", "child"]);
    assert_success(&out);
    assert!(
        stderr(&out).contains("triggered"),
        "ONBUILD trigger did not run:\n{}",
        stderr(&out)
    );
    let c = inspect(&k, "child");
    assert!(c["config"]["Cmd"].is_null(), "{}", c["config"]);
    assert!(c["config"]["OnBuild"].is_null());
}

#[test]
fn layer_edge_cases_survive_a_round_trip() {
    let k = Kiln::new();
    let recipe = r#"FROM busybox
RUN mkdir -p /d/keep /gone && echo a > /d/file && echo x > /gone/x && echo h > /h1 && echo old > /d/keep/old
RUN rm /d/file && rm -r /gone && rm -r /d/keep && mkdir /d/keep && echo new > /d/keep/new \
 && ln /h1 /h2 && ln -s ../h1 /rel && ln -s /h1 /abs && ln -s /nowhere /dangling \
 && touch /suid && chmod 4755 /suid && mkdir /sticky && chmod 1777 /sticky \
 && touch /owned && chown app:app /owned
"#;
    let u = k.build_unpacked(recipe, &[]);
    let r = &u.rootfs;
    assert!(!r.join("d/file").exists(), "deleted file reappeared");
    assert!(!r.join("gone").exists(), "deleted dir reappeared");
    assert!(
        !r.join("d/keep/old").exists(),
        "opaque dir kept a lower file"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("d/keep/new")).unwrap(),
        "new\n"
    );
    let h1 = std::fs::metadata(r.join("h1")).unwrap();
    let h2 = std::fs::metadata(r.join("h2")).unwrap();
    assert_eq!(h1.ino(), h2.ino(), "hardlink lost");
    assert_eq!(
        std::fs::read_link(r.join("rel")).unwrap().to_str(),
        Some("../h1")
    );
    assert_eq!(
        std::fs::read_link(r.join("abs")).unwrap().to_str(),
        Some("/h1")
    );
    assert_eq!(
        std::fs::read_link(r.join("dangling")).unwrap().to_str(),
        Some("/nowhere")
    );
    assert_eq!(
        std::fs::metadata(r.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        std::fs::metadata(r.join("sticky")).unwrap().mode() & 0o7777,
        0o1777
    );
    let owned = std::fs::metadata(r.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
}

#[test]
fn failing_run_names_the_step_and_leaves_nothing_behind() {
    let k = Kiln::new();
    let before = mount_count();
    let (out, _ctx) = k.build(
        "FROM busybox\nRUN echo ok\nRUN echo about to fail && exit 3\nRUN echo never\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("Dockerfile:3"), "{err}");
    assert!(err.contains("exit 3") && err.contains("code 3"), "{err}");
    assert!(!err.contains("never"), "{err}");
    assert_eq!(mount_count(), before, "a mount was left behind");
    let tmp = k.root.path().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|p| !p.is_dir()),
        "scratch dirs left in the store: {left:?}"
    );
}

#[test]
fn copy_follows_docker_destination_rules() {
    let k = Kiln::new();
    let recipe = r#"FROM busybox
WORKDIR /w
COPY a.txt .
COPY a.txt /named
COPY a.txt b.txt /multi/
COPY dir /tree
COPY dir/ /tree2/
COPY *.md /docs/
COPY --chown=app:wheel --chmod=600 a.txt /owned
ADD bundle.tar /unpacked/
"#;
    let tarball = make_tar(&[("inner/file.txt", b"from tar" as &[u8])]);
    let files: Vec<(&str, &[u8])> = vec![
        ("a.txt", b"A"),
        ("b.txt", b"B"),
        ("dir/x", b"X"),
        ("dir/sub/y", b"Y"),
        ("one.md", b"1"),
        ("two.md", b"2"),
        ("skip.md", b"s"),
        (".dockerignore", b"skip.md\n"),
        ("bundle.tar", &tarball),
    ];
    let u = k.build_unpacked(recipe, &files);
    let r = &u.rootfs;
    let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("w/a.txt"), "A");
    assert_eq!(read("named"), "A");
    assert_eq!(read("multi/a.txt") + &read("multi/b.txt"), "AB");
    assert_eq!(read("tree/x") + &read("tree/sub/y"), "XY");
    assert_eq!(read("tree2/sub/y"), "Y");
    assert_eq!(read("docs/one.md") + &read("docs/two.md"), "12");
    assert!(
        !r.join("docs/skip.md").exists(),
        ".dockerignore not honoured"
    );
    let m = std::fs::metadata(r.join("owned")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1000, 10, 0o600));
    assert_eq!(read("unpacked/inner/file.txt"), "from tar");
}

fn make_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A tar with raw entry names, bypassing the tar crate's path checks.
fn raw_tar(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        {
            let bytes = h.as_mut_bytes();
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            bytes[157..157 + link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn copy_and_add_cannot_escape() {
    let k = Kiln::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host secret").unwrap();

    // A source outside the context.
    let (out, _c) = k.build("FROM busybox\nCOPY ../secret /x\n", &[], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("outside the build context"),
        "{}",
        stderr(&out)
    );

    // A symlink in the context pointing out of it.
    let ctx = context("FROM busybox\nCOPY link /x\n", &[]);
    std::os::unix::fs::symlink(outside.path().join("secret"), ctx.path().join("link")).unwrap();
    let out = k.run(&["build", "--progress", "plain", ctx.path().to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "copied through an absolute symlink out of the context"
    );
    let ctx = context("FROM busybox\nCOPY link /x\n", &[]);
    std::os::unix::fs::symlink(
        "../../../../../../../../../etc/passwd",
        ctx.path().join("link"),
    )
    .unwrap();
    let out = k.run(&["build", "--progress", "plain", ctx.path().to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "copied through a relative symlink out of the context"
    );

    // Hostile tars: ../ entries, absolute paths, a symlink then a file through it. Each also
    // holds a harmless file, so a build that succeeds must have really extracted the archive.
    let victim = outside.path().join("victim");
    let ok = ("ok.txt", b'0', "", b"fine" as &[u8]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "kiln-escape-dotdot",
            raw_tar(&[
                ok,
                (
                    "../../../../../../../../../tmp/kiln-escape-dotdot",
                    b'0',
                    "",
                    b"x",
                ),
            ]),
        ),
        (
            "kiln-escape-abs",
            raw_tar(&[ok, ("/tmp/kiln-escape-abs", b'0', "", b"x")]),
        ),
        (
            "link",
            raw_tar(&[
                ok,
                ("link", b'2', outside.path().to_str().unwrap(), b""),
                ("link/victim", b'0', "", b"x"),
            ]),
        ),
    ];
    for (entry, t) in &cases {
        let ctx = context("FROM busybox\nADD evil.tar /dst/\n", &[("evil.tar", t)]);
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        let o = format!("type=oci,dest={}", layout.display());
        let out = k.run(&["build", "-o", &o, ctx.path().to_str().unwrap()]);
        let err = stderr(&out);
        assert!(
            !std::path::Path::new("/tmp/kiln-escape-dotdot").exists(),
            "{entry}: {err}"
        );
        assert!(
            !std::path::Path::new("/tmp/kiln-escape-abs").exists(),
            "{entry}: {err}"
        );
        assert!(!victim.exists(), "{entry}: wrote through a symlink: {err}");
        if out.status.success() {
            let rootfs = umoci_unpack(&layout, "latest", &dir.path().join("b"));
            let extracted = std::fs::read_to_string(rootfs.join("dst/ok.txt"));
            assert_eq!(
                extracted.ok().as_deref(),
                Some("fine"),
                "{entry}: the archive was not extracted"
            );
        } else {
            assert!(
                err.contains(entry),
                "{entry}: the error does not name the entry: {err}"
            );
        }
    }
}

#[test]
fn same_inputs_give_the_same_digest() {
    let recipe = "FROM busybox\nCOPY f /f\nRUN echo $RANDOM > /r || true; rm -f /r; echo stable > /s\nLABEL a=1 b=2 c=3\n";
    let files: &[(&str, &[u8])] = &[("f", b"content")];
    let digest_of = |k: &Kiln| {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        k.build_ok(
            recipe,
            files,
            &[
                "--source-date-epoch",
                "1700000000",
                "-o",
                &format!("type=oci,dest={}", layout.display()),
            ],
        );
        oci_index(&layout)["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = digest_of(&Kiln::new());
    let b = digest_of(&Kiln::new());
    assert_eq!(a, b);
}

#[test]
fn a_big_file_gives_the_same_layer_whether_or_not_it_was_compressed_while_the_step_ran() {
    // The sleep gives kiln time to compress /big while the step still runs; without it the
    // step ends first and the snapshot compresses everything. The layer must not tell.
    let layer_blob = |run: &str| {
        let k = Kiln::new();
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        let recipe = format!("FROM busybox\nRUN {run}\n");
        let out = format!("type=oci,dest={}", layout.display());
        k.build_ok(&recipe, &[], &["--source-date-epoch", "0", "-o", &out]);
        let read = |name: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(layout.join(name)).unwrap()).unwrap()
        };
        let index = read("index.json");
        let manifest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest = read(&format!("blobs/sha256/{}", &manifest[7..]));
        let layers = manifest["layers"].as_array().unwrap();
        layers[layers.len() - 1]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let written = "seq 1 2500000 > /big && mkdir /d && seq 1 9 > /d/small";
    let spliced = layer_blob(&format!("{written} && sleep 2"));
    assert_eq!(spliced, layer_blob(written));
}

#[test]
fn bad_recipe_is_exit_2_with_location() {
    let k = Kiln::new();
    let (out, _c) = k.build("FROM busybox\nRUN echo ok\nFROBNICATE now\n", &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("Dockerfile:3:1"), "{err}");
    assert!(err.contains('^'), "{err}");
}

#[test]
fn workdir_is_created_for_the_user_and_parents_are_kept() {
    let k = Kiln::new();
    let recipe = "FROM busybox\nUSER app\nWORKDIR /srv/data\nUSER root\nWORKDIR /empty\nCOPY --parents src/a/*.txt /keep/\nCOPY --parents ./src/./b/ /pivot/\n";
    let files: &[(&str, &[u8])] = &[
        ("src/a/1.txt", b"1"),
        ("src/a/2.txt", b"2"),
        ("src/b/x", b"x"),
    ];
    let u = k.build_unpacked(recipe, files);
    let r = &u.rootfs;
    let m = std::fs::metadata(r.join("srv/data")).unwrap();
    assert!(m.is_dir());
    assert_eq!(
        (m.uid(), m.gid()),
        (1000, 1000),
        "WORKDIR not owned by USER"
    );
    assert!(r.join("empty").is_dir(), "WORKDIR not created");
    assert_eq!(
        std::fs::read_to_string(r.join("keep/src/a/1.txt")).unwrap(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("keep/src/a/2.txt")).unwrap(),
        "2"
    );
    assert_eq!(std::fs::read_to_string(r.join("pivot/b/x")).unwrap(), "x");
}

#[test]
fn run_mounts_secret_cache_tmpfs_and_bind() {
    let k = Kiln::new();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cr3t").unwrap();
    let secret_arg = format!("id=token,src={}", secret.path().display());
    let recipe = r#"FROM busybox
RUN --mount=type=secret,id=token cat /run/secrets/token > /seen-secret
RUN --mount=type=cache,target=/var/cache/app echo run >> /var/cache/app/log && wc -l < /var/cache/app/log > /cache-count
RUN --mount=type=tmpfs,target=/scratch echo temp > /scratch/x && cat /scratch/x > /seen-tmpfs
RUN --mount=type=bind,source=data,target=/mnt/data cat /mnt/data/file > /seen-bind
"#;
    let files: &[(&str, &[u8])] = &[("data/file", b"from context")];
    let (out, _ctx) = k.build(recipe, files, &["--secret", &secret_arg, "-t", "m1"]);
    assert_success(&out);
    // A changed recipe line re-runs the cache step, which sees the earlier run's file.
    let again = recipe.replace("echo run >>", "echo again >>");
    let u = {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        let o = format!("type=oci,dest={}", layout.display());
        k.build_ok(&again, files, &["--secret", &secret_arg, "-o", &o]);
        let bundle = dir.path().join("b");
        umoci_unpack(&layout, "latest", &bundle);
        (dir, bundle.join("rootfs"))
    };
    let r = &u.1;
    let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("seen-secret"), "s3cr3t");
    assert_eq!(
        read("cache-count").trim(),
        "2",
        "the cache mount did not persist"
    );
    assert_eq!(read("seen-tmpfs"), "temp\n");
    assert_eq!(read("seen-bind"), "from context");
    for absent in [
        "run/secrets/token",
        "var/cache/app/log",
        "scratch/x",
        "mnt/data/file",
    ] {
        assert!(!r.join(absent).exists(), "{absent} leaked into the image");
    }
    // A required secret that was not given is a clear input error (one not required is
    // skipped, as in BuildKit: see tests/fidelity.rs).
    let (out, _c) = k.build(
        "FROM busybox\nRUN --mount=type=secret,id=nope,required=true true\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
}

#[test]
fn whiteout_names_made_by_run_are_refused() {
    let k = Kiln::new();
    let (out, _c) = k.build(
        "FROM busybox\nRUN mkdir -p /d && touch /d/.wh.victim\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(".wh.victim"), "{err}");
    assert!(err.contains("Dockerfile:2") || err.contains(":2:"), "{err}");
}

#[test]
fn zstd_layers_are_read_by_umoci_skopeo_and_a_later_build() {
    let k = Kiln::new();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let out_arg = format!("type=oci,dest={}", layout.display());
    k.build_ok(
        "FROM busybox\nRUN echo from-zstd > /z\nCOPY f /f\n",
        &[("f", b"copied\n")],
        &["--compression", "zstd", "-t", "z:latest", "-o", &out_arg],
    );
    let skopeo = |raw: bool| {
        let sk = Command::new("skopeo")
            .arg("inspect")
            .args(raw.then_some("--raw"))
            .arg(format!("oci:{}:latest", layout.display()))
            .output()
            .unwrap();
        assert_success(&sk);
        serde_json::from_slice::<serde_json::Value>(&sk.stdout).unwrap()
    };
    assert!(skopeo(false)["Layers"].as_array().unwrap().len() >= 3);
    let manifest = skopeo(true);
    let types: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    // The base keeps its gzip layer; the two new layers are zstd.
    assert_eq!(
        &types[types.len() - 2..],
        ["application/vnd.oci.image.layer.v1.tar+zstd"; 2]
    );
    // Debian 12's umoci (0.4.7) refuses the +zstd media type outright (zstd came in 0.5), so
    // skopeo decodes every zstd layer into a gzip copy and umoci unpacks that.
    let gz_layout = dir.path().join("oci-gz");
    let sk = Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "gzip"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("oci:{}:latest", gz_layout.display()))
        .output()
        .unwrap();
    assert_success(&sk);
    let bundle = dir.path().join("bundle");
    umoci_unpack(&gz_layout, "latest", &bundle);
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/z")).unwrap(),
        "from-zstd\n"
    );
    // A fresh store imports the layout and builds on it, unpacking the zstd layers.
    let k2 = Kiln::empty();
    assert_success(&k2.run(&["import", layout.to_str().unwrap(), "z"]));
    k2.build_ok("FROM z\nRUN cat /z /f > /both\n", &[], &[]);
}

#[test]
fn big_directory_copy_is_complete_and_exact() {
    // Over the parallel-copy threshold: 48 files of 256 KiB in nested dirs, with a symlink.
    let k = Kiln::new();
    let mut owned: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..48u32 {
        let body: Vec<u8> = (0..256 * 1024u32)
            .map(|j| (j.wrapping_mul(i + 7) >> 3) as u8)
            .collect();
        owned.push((format!("tree/d{}/f{i:02}", i % 5), body));
    }
    let files: Vec<(&str, &[u8])> = owned
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let u = k.build_unpacked("FROM busybox\nCOPY tree /t/\n", &files);
    for (name, body) in &owned {
        let got = std::fs::read(u.rootfs.join("t").join(&name["tree/".len()..])).unwrap();
        assert!(&got == body, "{name} differs");
    }
    let count = std::fs::read_dir(u.rootfs.join("t/d0")).unwrap().count();
    assert_eq!(count, 10);
}

#[test]
fn cached_layers_are_not_reused_across_compressions() {
    let k = Kiln::new();
    let ctx = context("FROM busybox\nRUN echo z > /z\n", &[]);
    let p = ctx.path().to_str().unwrap();
    assert_success(&k.run(&["build", "-q", p]));
    let out = k.run(&[
        "build",
        "--progress",
        "plain",
        "--compression",
        "zstd",
        "-t",
        "z",
        p,
    ]);
    assert_success(&out);
    assert!(
        stderr(&out).contains("the cached layer has another compression"),
        "{}",
        stderr(&out)
    );
    let layout = tempfile::tempdir().unwrap();
    let o = format!("type=oci,dest={}", layout.path().display());
    assert_success(&k.run(&["build", "-q", "--compression", "zstd", "-o", &o, p]));
    let index = oci_index(layout.path());
    let manifest = oci_json(
        layout.path(),
        index["manifests"][0]["digest"].as_str().unwrap(),
    );
    let last = manifest["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
}

/// A minimal HTTP/1.1 file server on 127.0.0.1 for ADD <url>; stops when dropped.
struct FileServer {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    fn start(path: &'static str, body: &'static [u8]) -> FileServer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !flag.load(std::sync::atomic::Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let response = if line.starts_with(&format!("GET {path} ")) {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                };
                let _ = conn.write_all(&response);
            }
        });
        FileServer {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn add_downloads_urls_with_checksums() {
    let server = FileServer::start("/files/tool.txt", b"downloaded\n");
    let url = format!("http://127.0.0.1:{}/files/tool.txt", server.port);
    let good = kiln::digest::Digest::of(b"downloaded\n");
    let k = Kiln::new();
    let recipe = format!("FROM busybox\nADD {url} /opt/\nADD --checksum={good} {url} /pinned\n");
    let u = k.build_unpacked(&recipe, &[]);
    let m = std::fs::metadata(u.rootfs.join("opt/tool.txt")).unwrap();
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("opt/tool.txt")).unwrap(),
        "downloaded\n"
    );
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(
        m.mtime(),
        784_111_777,
        "mtime should come from Last-Modified"
    );
    assert_eq!(
        std::fs::read_to_string(u.rootfs.join("pinned")).unwrap(),
        "downloaded\n"
    );

    let wrong = kiln::digest::Digest::of(b"other");
    let (out, _c) = k.build(
        &format!("FROM busybox\nADD --checksum={wrong} {url} /x\n"),
        &[],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    let missing = format!("http://127.0.0.1:{}/nope", server.port);
    let (out, _c) = k.build(&format!("FROM busybox\nADD {missing} /x\n"), &[], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nope"), "{}", stderr(&out));
    let (out, _c) = k.build(&format!("FROM busybox\nCOPY {url} /x\n"), &[], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn run_mount_binds_from_stages_and_rw_context() {
    let k = Kiln::new();
    let recipe = r#"FROM busybox AS build
RUN mkdir /out && echo built > /out/artifact
FROM busybox
RUN --mount=type=bind,from=build,source=/out,target=/in cat /in/artifact > /got
RUN --mount=type=bind,from=busybox,source=/etc,target=/base-etc cp /base-etc/passwd /got-passwd
RUN --mount=type=bind,source=.,target=/ctx,rw echo scribble > /ctx/new && cat /ctx/data > /got-ctx
"#;
    let ctx = context(recipe, &[("data", b"ctx data")]);
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let o = format!("type=oci,dest={}", layout.display());
    let out = k.run(&[
        "build",
        "--progress",
        "plain",
        "-o",
        &o,
        ctx.path().to_str().unwrap(),
    ]);
    assert_success(&out);
    let rootfs = umoci_unpack(&layout, "latest", &dir.path().join("b"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("got")).unwrap(),
        "built\n"
    );
    assert!(
        std::fs::read_to_string(rootfs.join("got-passwd"))
            .unwrap()
            .contains("app:x:1000")
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("got-ctx")).unwrap(),
        "ctx data"
    );
    assert!(
        !ctx.path().join("new").exists(),
        "an rw bind wrote into the host's context"
    );
    for absent in ["in", "base-etc", "ctx"] {
        assert!(
            !rootfs.join(absent).exists(),
            "the mount point {absent} leaked"
        );
    }
}

#[test]
fn copy_link_is_reused_on_a_changed_base_and_keeps_the_base_dirs() {
    let k = Kiln::new();
    let dockerfile = "FROM busybox AS base\nARG V\n\
        RUN echo $V > /v && mkdir -p /opt/app && chmod 1777 /opt/app && chown 7:8 /opt/app\n\
        FROM base\nCOPY --link f.txt /opt/app\nRUN cat /v /opt/app/f.txt > /both\n";
    let ctx = context(dockerfile, &[("f.txt", b"linked\n")]);
    let p = ctx.path().to_str().unwrap();
    let build = |v: &str, tag: &str| {
        let arg = format!("V={v}");
        let out = k.run(&[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            &arg,
            "-t",
            tag,
            p,
        ]);
        assert_success(&out);
        stderr(&out)
    };
    build("1", "one");
    let second = build("2", "two");
    // The base changed: its RUN and the RUN after the copy are rebuilt; the linked copy is not.
    assert!(
        second.contains("COPY --link f.txt /opt/app CACHED"),
        "{second}"
    );
    assert!(
        !second.contains("RUN cat /v /opt/app/f.txt > /both CACHED"),
        "{second}"
    );
    let ids = |tag: &str| -> Vec<String> {
        inspect(&k, tag)["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    };
    let (one, two) = (ids("one"), ids("two"));
    let n = one.len();
    assert_eq!(n, two.len());
    assert_ne!(one[n - 3], two[n - 3], "the base's RUN layer");
    assert_eq!(one[n - 2], two[n - 2], "the linked layer is the same blob");
    assert_ne!(one[n - 1], two[n - 1], "the RUN after it saw the new base");
    // When its own source changes, that is the reason given, not the (also changed) base.
    std::fs::write(ctx.path().join("f.txt"), "relinked\n").unwrap();
    let third = build("3", "three");
    let why = third
        .lines()
        .find(|l| l.contains("COPY --link f.txt /opt/app") && l.contains("rebuilding"))
        .unwrap_or_else(|| panic!("no rebuild reason in {third}"));
    assert!(
        why.contains("f.txt") && !why.contains("earlier step"),
        "{why}"
    );

    // /opt/app existed as a directory: the file went into it, and the layer kept its mode and
    // owner (a plain empty-dir copy would have reset them to 0755 root).
    let layout = tempfile::tempdir().unwrap();
    let o = format!("type=oci,dest={}", layout.path().display());
    let arg = "V=2".to_string();
    assert_success(&k.run(&["build", "-q", "--build-arg", &arg, "-o", &o, "-t", "two", p]));
    let bundle = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(layout.path(), "latest", &bundle.path().join("b"));
    let app = std::fs::metadata(rootfs.join("opt/app")).unwrap();
    assert_eq!(app.mode() & 0o7777, 0o1777);
    assert_eq!((app.uid(), app.gid()), (7, 8));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("both")).unwrap(),
        "2\nrelinked\n"
    );
}

#[test]
fn run_mount_ssh_forwards_the_agent_socket() {
    let k = Kiln::new();
    // Any unix socket stands in for the agent: the step checks it sees a socket there.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let _agent = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let ssh_default = format!("default={}", sock.display());
    let ssh_work = format!("work={}", sock.display());
    let recipe = r#"FROM busybox
RUN --mount=type=ssh [ -S "$SSH_AUTH_SOCK" ] && echo "$SSH_AUTH_SOCK" > /seen-default
RUN --mount=type=ssh,id=work,target=/agent.sock [ -S /agent.sock ] && echo "$SSH_AUTH_SOCK" > /seen-work
"#;
    let layout = tempfile::tempdir().unwrap();
    let o = format!("type=oci,dest={}", layout.path().display());
    k.build_ok(
        recipe,
        &[],
        &["--ssh", &ssh_default, "--ssh", &ssh_work, "-o", &o],
    );
    let bundle = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(layout.path(), "latest", &bundle.path().join("b"));
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("seen-default"), "/run/buildkit/ssh_agent.0\n");
    assert_eq!(read("seen-work"), "/agent.sock\n");
    for absent in ["run/buildkit/ssh_agent.0", "agent.sock"] {
        assert!(
            !rootfs.join(absent).exists(),
            "{absent} leaked into the image"
        );
    }

    // Not forwarded: the mount is skipped, unless required.
    k.build_ok(
        "FROM busybox\nRUN --mount=type=ssh [ -z \"$SSH_AUTH_SOCK\" ]\n",
        &[],
        &[],
    );
    let (out, _c) = k.build(
        "FROM busybox\nRUN --mount=type=ssh,required=true true\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--ssh default"), "{}", stderr(&out));
    // --ssh must name a socket.
    let not_a_socket = format!("default={}", dir.path().display());
    let (out, _c) = k.build("FROM busybox\n", &[], &["--ssh", &not_a_socket]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not an ssh-agent socket"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn final_copy_written_from_its_sources_equals_the_copy_performed() {
    // The last COPY of the target stage is written into its layer straight from its sources
    // (the context or a stage; the files are never created); ending the stage with WORKDIR,
    // which reads the files, makes kiln perform the copy instead. Both must give the same
    // layer, byte for byte.
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path();
    // The recipe lives outside the context, which `COPY .` copies.
    let recipes = tempfile::tempdir().unwrap();
    let dockerfile = recipes.path().join("Dockerfile");
    let f = dockerfile.to_str().unwrap();
    for (path, body) in [
        ("a.txt", "a\n"),
        ("sub/b", "b\n"),
        ("sub/deep/d", "d\n"),
        ("sub/skip.txt", "excluded\n"),
        ("passwd", "not the base's\n"),
    ] {
        std::fs::create_dir_all(c.join(path).parent().unwrap()).unwrap();
        std::fs::write(c.join(path), body).unwrap();
    }
    std::fs::create_dir(c.join("empty")).unwrap();
    std::fs::write(c.join("L".repeat(150)), "a long name\n").unwrap();
    std::fs::set_permissions(c.join("sub/b"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    std::os::unix::fs::symlink("../a.txt", c.join("sub/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", c.join("abs")).unwrap();
    let old = std::fs::FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(500_000_000));
    for p in ["sub/deep/d", "sub/deep", "a.txt"] {
        std::fs::File::open(c.join(p))
            .unwrap()
            .set_times(old)
            .unwrap();
    }
    // A stage to copy from; base dirs with an old mtime, so a layer that got the wrong one
    // for them shows it.
    let base = "FROM busybox AS src\n\
        RUN mkdir -p /d/sub && echo hi > /d/f && ln -s f /d/rel && chown -R 5:6 /d/sub \\\n\
         && touch -d @500000000 /d/f\n\
        FROM busybox\nRUN mkdir /opt && touch -d @500000000 /usr /opt /tmp /etc\n";
    // (the copy, whether it can be written from the context, a check of its result)
    let cases = [
        (
            "COPY . /usr/share/app/",
            true,
            "test -u /usr/share/app/sub/b",
        ),
        (
            "COPY --chown=7:8 --chmod=640 sub /opt/new/place",
            true,
            "stat -c %u:%g:%a /opt/new/place/deep/d | grep -qx 7:8:640",
        ),
        (
            "COPY --exclude=*.txt sub a.txt /tmp/",
            true,
            "test -f /tmp/a.txt -a -f /tmp/deep/d -a ! -e /tmp/skip.txt",
        ),
        ("WORKDIR /app\nCOPY . .", true, "test -L /app/sub/rel"),
        ("COPY empty /usr/empty/", true, "test -d /usr/empty"),
        (
            "COPY --from=src /d /opt/fromstage/",
            true,
            "test -L /opt/fromstage/rel && stat -c %u:%g /opt/fromstage/sub | grep -qx 5:6",
        ),
        (
            "COPY --from=src --chown=1:2 /d/f /usr/bin/f",
            true,
            "stat -c %u:%g /usr/bin/f | grep -qx 1:2",
        ),
        // Lands on the base's /etc/passwd: performed either way.
        ("COPY passwd /etc/", false, "grep -q base /etc/passwd"),
    ];
    let diff_id = |k: &Kiln, tag: &str| -> String {
        let ids = inspect(k, tag)["rootfs"]["diff_ids"].clone();
        let ids = ids.as_array().unwrap();
        ids[ids.len() - 1].as_str().unwrap().to_string()
    };
    let unpacked = |k: &Kiln, id: &str| {
        k.root
            .path()
            .join("layers")
            .join(id.trim_start_matches("sha256:"))
            .is_dir()
    };
    for (copy, listed, check) in cases {
        let k = Kiln::new();
        let build = |end: &str, tag: &str| {
            let recipe = format!("{base}{copy}\n{end}\n");
            std::fs::write(&dockerfile, &recipe).unwrap();
            let p = c.to_str().unwrap();
            let args = [
                "build",
                "-q",
                "--no-cache",
                "--source-date-epoch",
                "1000000000",
            ];
            let mut args = args.to_vec();
            args.extend(["-f", f, "-t", tag, p]);
            assert_success(&k.run(&args));
        };
        build("ENV END=1", "listed");
        build("WORKDIR /", "performed");
        let (l, p) = (diff_id(&k, "listed"), diff_id(&k, "performed"));
        assert_eq!(l, p, "{copy}: the two ways gave different layers");
        assert!(
            unpacked(&k, &p),
            "{copy}: the performed copy keeps its layer dir"
        );
        // The listed build left no layer dir behind; the performed one (same diff_id) did, so
        // this is checked in a store of its own.
        let fresh = Kiln::new();
        let recipe = format!("{base}{copy}\nENV END=1\n");
        std::fs::write(&dockerfile, &recipe).unwrap();
        let p = c.to_str().unwrap();
        assert_success(&fresh.run(&["build", "-q", "-f", f, "-t", "listed", p]));
        assert_eq!(
            !unpacked(&fresh, &diff_id(&fresh, "listed")),
            listed,
            "{copy}: written from the context?"
        );
        // A later build on top of it unpacks the layer when a step needs the files.
        let recipe = format!("{base}{copy}\nRUN {check}\n");
        std::fs::write(&dockerfile, &recipe).unwrap();
        let out = fresh.run(&["build", "--progress", "plain", "-f", f, "-t", "more", p]);
        assert_success(&out);
        assert!(
            stderr(&out).contains(&format!("{} CACHED", copy.lines().last().unwrap())),
            "{}",
            stderr(&out)
        );
    }
}
