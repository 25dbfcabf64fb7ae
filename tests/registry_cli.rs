//! Registries and the image store end to end through the `kiln` binary: build --push,
//! push, pull and `FROM` a registry image against real `docker-registry` servers (plain,
//! htpasswd + self-signed TLS, behind a fault-injecting proxy), cross-checked with skopeo,
//! plus concurrent builds on one store and docker-archive round trips.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use common::registry::{
    Action, Proxy, Registry, RegistrySetup, corrupt_blob_gets, docker_config, skopeo,
};
use common::{Kiln, assert_success, context, kiln_bin, stderr, stdout_line};
use kiln::digest::Digest;
use kiln::image::MEDIA_LAYER_GZIP;
use kiln::registry::{MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST, Reference};
use kiln::store::{Store, StoredImage};

/// A kiln command on `k`'s store whose registry credentials come only from `auth` (none
/// when `None`), so the developer's own docker config never takes part.
fn kiln_cmd(k: &Kiln, args: &[&str], auth: Option<&Path>) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.arg("--root")
        .arg(k.root.path())
        .args(args)
        .env(
            "REGISTRY_AUTH_FILE",
            auth.unwrap_or(Path::new("/nonexistent/kiln-test-auth.json")),
        )
        .env("DOCKER_CONFIG", "/nonexistent/kiln-test-docker-config")
        .stdin(Stdio::null());
    cmd
}

/// Runs kiln on `k`'s store (see [`kiln_cmd`]).
fn kiln(k: &Kiln, args: &[&str], auth: Option<&Path>) -> Output {
    kiln_cmd(k, args, auth).output().unwrap()
}

/// Builds `dockerfile` (in a context with no other files) with extra `args`; returns the
/// image id.
fn build(k: &Kiln, dockerfile: &str, args: &[&str]) -> String {
    let ctx = context(dockerfile, &[]);
    let mut full = vec!["build", "--progress", "plain"];
    full.extend_from_slice(args);
    full.push(ctx.path().to_str().unwrap());
    let out = kiln(k, &full, None);
    assert_success(&out);
    stdout_line(&out)
}

/// A name as the store records it (`app:1` is `docker.io/library/app:1`).
fn normalized(name: &str) -> String {
    Reference::parse(name).unwrap().to_string()
}

/// The image a name points at in the store's index.
fn stored(k: &Kiln, name: &str) -> Option<StoredImage> {
    Store::open(k.root.path())
        .unwrap()
        .resolve(&normalized(name))
        .unwrap()
}

/// The manifest digest a name points at in the store's index.
fn stored_manifest(k: &Kiln, name: &str) -> Digest {
    stored(k, name)
        .unwrap_or_else(|| panic!("{name} is not in the store"))
        .manifest
        .digest
}

/// The manifest digest skopeo reports for `docker://REF` (plain http, no credentials).
fn skopeo_digest(reference: &str, extra: &[&str]) -> String {
    let url = format!("docker://{reference}");
    let mut args = vec!["inspect", "--tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(&url);
    let info: serde_json::Value = serde_json::from_slice(&skopeo(&args)).unwrap();
    info["Digest"].as_str().unwrap().to_string()
}

/// Asserts that `Store::fsck` finds nothing wrong.
fn assert_fsck_clean(k: &Kiln) {
    let report = Store::open(k.root.path()).unwrap().fsck().unwrap();
    assert!(report.is_clean(), "fsck: {:?}", report.problems);
    assert!(report.blobs_checked > 0);
}

/// A skopeo policy that accepts anything, for `skopeo copy`.
fn permissive_policy(dir: &Path) -> PathBuf {
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    policy
}

const APP: &str = "FROM busybox\nRUN echo built by kiln > /app.txt\nLABEL app=one\n";

#[test]
fn build_push_and_push_agree_with_skopeo() {
    let reg = Registry::start();
    let k = Kiln::new();
    let r1 = format!("{}/app:1", reg.host());
    build(&k, APP, &["-t", &r1, "--push"]);
    let pushed = stored_manifest(&k, &r1);
    assert_eq!(skopeo_digest(&r1, &[]), pushed.to_string());

    // --output type=registry pushes every tag.
    let r2 = format!("{}/app:2", reg.host());
    let r3 = format!("{}/other/app:3", reg.host());
    build(
        &k,
        APP,
        &["-t", &r2, "-t", &r3, "--output", "type=registry"],
    );
    for r in [&r2, &r3] {
        assert_eq!(skopeo_digest(r, &[]), pushed.to_string(), "{r}");
    }

    // `kiln push IMAGE REF` prints the manifest digest on stdout.
    let r4 = format!("{}/pushed/app:4", reg.host());
    let out = kiln(&k, &["push", &r1, &r4], None);
    assert_success(&out);
    assert_eq!(stdout_line(&out), pushed.to_string());
    assert_eq!(skopeo_digest(&r4, &[]), pushed.to_string());

    // Pushing to a name that is only a local tag: `kiln push IMAGE` uses the image's name.
    let out = kiln(&k, &["push", &r1], None);
    assert_success(&out);
    assert_eq!(stdout_line(&out), pushed.to_string());
}

#[test]
fn pull_of_a_skopeo_pushed_image_and_from_a_registry_image() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let source = Kiln::new();
    let id = build(
        &source,
        "FROM busybox\nRUN echo from the registry > /marker\nLABEL origin=skopeo\n",
        &[
            "-t",
            "base:1",
            "--output",
            &format!("type=oci,dest={}", layout.display()),
        ],
    );
    let base = format!("{}/base:1", reg.host());
    skopeo(&[
        "--policy",
        permissive_policy(work.path()).to_str().unwrap(),
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", layout.display()),
        &format!("docker://{base}"),
    ]);

    // Pull into an empty store; the config is the one kiln built.
    let k = Kiln::empty();
    let out = kiln(&k, &["pull", &base], None);
    assert_success(&out);
    assert_eq!(stdout_line(&out), id);
    let out = kiln(&k, &["inspect", &base], None);
    assert_success(&out);
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["config"]["Labels"]["origin"], "skopeo", "{config}");
    assert_eq!(
        stored_manifest(&k, &base).to_string(),
        skopeo_digest(&base, &[])
    );
    assert_fsck_clean(&k);

    // FROM an image that only the registry has: the build pulls it.
    let fresh = Kiln::empty();
    let child = build(
        &fresh,
        &format!("FROM {base}\nRUN cat /marker > /copied\nLABEL child=yes\n"),
        &["-t", "child:1"],
    );
    let base_img = stored(&fresh, &base).expect("base was pulled");
    let img = stored(&fresh, "child:1").unwrap();
    assert_eq!(img.config_digest.to_string(), child);
    assert_eq!(img.config.config.labels["origin"], "skopeo");
    assert_eq!(
        img.manifest_body.layers.len(),
        base_img.manifest_body.layers.len() + 1
    );
    assert_fsck_clean(&fresh);

    // FROM a Docker schema 2 image: kiln's OCI manifest gives its layers OCI media types.
    let docker_base = format!("{}/base:docker", reg.host());
    skopeo(&[
        "--policy",
        permissive_policy(work.path()).to_str().unwrap(),
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", layout.display()),
        &format!("docker://{docker_base}"),
    ]);
    let from_docker = Kiln::empty();
    build(
        &from_docker,
        &format!("FROM {docker_base}\nRUN cat /marker > /copied\n"),
        &["-t", "child:docker"],
    );
    let pulled = stored(&from_docker, &docker_base).unwrap();
    assert_eq!(pulled.manifest.media_type, MEDIA_DOCKER_MANIFEST);
    let img = stored(&from_docker, "child:docker").unwrap();
    assert_eq!(img.manifest.media_type, MEDIA_OCI_MANIFEST);
    for layer in &img.manifest_body.layers {
        assert_eq!(layer.media_type, MEDIA_LAYER_GZIP, "{layer:?}");
    }
}

#[test]
fn push_to_an_authenticated_tls_registry() {
    let reg = Registry::start_with(RegistrySetup {
        htpasswd: Some(("kiln", "s3cret")),
        tls: true,
    });
    let k = Kiln::new();
    build(&k, APP, &["-t", "app:1"]);
    let work = tempfile::tempdir().unwrap();
    let target = format!("{}/private/app:1", reg.host());

    // Right credentials from DOCKER_CONFIG/config.json; the self-signed cert is accepted
    // with --tls-verify=false.
    let docker_dir = work.path().join("docker");
    std::fs::create_dir(&docker_dir).unwrap();
    let good = docker_config(work.path(), &reg.host(), "kiln", "s3cret");
    std::fs::copy(&good, docker_dir.join("config.json")).unwrap();
    let out = kiln_cmd(&k, &["push", "--tls-verify=false", "app:1", &target], None)
        .env("DOCKER_CONFIG", &docker_dir)
        .env_remove("REGISTRY_AUTH_FILE")
        .output()
        .unwrap();
    assert_success(&out);
    let pushed = stored_manifest(&k, "app:1");
    assert_eq!(stdout_line(&out), pushed.to_string());
    assert_eq!(
        skopeo_digest(&target, &["--creds", "kiln:s3cret"]),
        pushed.to_string()
    );

    // And from REGISTRY_AUTH_FILE, pulling it back.
    let puller = Kiln::empty();
    let out = kiln(
        &puller,
        &["pull", "--tls-verify=false", &target],
        Some(&good),
    );
    assert_success(&out);

    // Wrong credentials: exit status 1 and an error naming the registry.
    let bad = docker_config(work.path(), &reg.host(), "kiln", "wrong");
    let out = kiln(
        &k,
        &["push", "--tls-verify=false", "app:1", &target],
        Some(&bad),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&reg.host()) && err.contains("authentication"),
        "{err}"
    );

    // Verification on: the unknown CA is refused, naming the registry.
    let out = kiln(&k, &["push", "app:1", &target], Some(&good));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&reg.host()), "{}", stderr(&out));

    // Credentials from a docker-credential-* helper named by credHelpers.
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let helper = bin.join("docker-credential-kilntest");
    std::fs::write(
        &helper,
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\nprintf '{\"ServerURL\":\"%s\",\"Username\":\"kiln\",\"Secret\":\"s3cret\"}' \"$server\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let helper_dir = work.path().join("helper-config");
    std::fs::create_dir(&helper_dir).unwrap();
    std::fs::write(
        helper_dir.join("config.json"),
        format!("{{\"credHelpers\":{{\"{}\":\"kilntest\"}}}}", reg.host()),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let via_helper = format!("{}/private/app:helper", reg.host());
    let out = kiln_cmd(
        &k,
        &["push", "--tls-verify=false", "app:1", &via_helper],
        None,
    )
    .env("DOCKER_CONFIG", &helper_dir)
    .env("PATH", path)
    .env_remove("REGISTRY_AUTH_FILE")
    .output()
    .unwrap();
    assert_success(&out);
    assert_eq!(
        skopeo_digest(&via_helper, &["--creds", "kiln:s3cret"]),
        pushed.to_string()
    );
}

/// A proxy policy under which every distinct request (method and path; an upload PUT by
/// its digest) first gets a 500 or 503, then a dropped connection, and only then reaches
/// the registry. Deterministic, whatever the order of parallel requests.
fn flaky_policy() -> Box<common::registry::Policy> {
    let attempts: Mutex<HashMap<String, usize>> = Mutex::default();
    Box::new(move |_, req| {
        let mut parts = req.line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let key = match target.split_once("digest=") {
            Some((_, digest)) if method == "PUT" => format!("PUT {digest}"),
            _ => format!("{method} {}", target.split('?').next().unwrap_or("")),
        };
        let mut attempts = attempts.lock().unwrap();
        let n = attempts.entry(key).or_default();
        *n += 1;
        match *n {
            1 if method == "GET" || method == "HEAD" => Action::Status(500),
            1 => Action::Status(503),
            2 => Action::Drop,
            _ => Action::Forward,
        }
    })
}

/// Every blob file in the store (none before it is first opened).
fn blob_files(k: &Kiln) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(k.root.path().join("blobs/sha256")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn push_and_pull_through_faults_and_a_corrupted_blob() {
    let reg = Registry::start();
    let flaky = Proxy::start(reg.port, flaky_policy());
    let k = Kiln::new();
    build(&k, APP, &["-t", "app:1"]);
    let pushed = stored_manifest(&k, "app:1");
    let through = format!("{}/flaky/app:1", flaky.host());
    let out = kiln(&k, &["push", "app:1", &through], None);
    assert_success(&out);
    assert_eq!(stdout_line(&out), pushed.to_string());

    let puller = Kiln::empty();
    let out = kiln(&puller, &["pull", &through], None);
    assert_success(&out);
    assert_eq!(stored_manifest(&puller, &through), pushed);
    assert_fsck_clean(&puller);
    // Every kind of request met a 5xx and a dropped connection before it got through.
    let seen = flaky.seen();
    for kind in ["HEAD ", "POST ", "PUT ", "GET "] {
        assert!(
            seen.iter().filter(|s| s.line.starts_with(kind)).count() >= 3,
            "{kind}: {seen:?}"
        );
    }
    drop(flaky);

    // A proxy that flips a byte of every blob: the pull fails naming the mismatch, and
    // nothing of those blobs stays in the store.
    let corrupting = Proxy::start(reg.port, corrupt_blob_gets());
    let victim = Kiln::empty();
    let before = blob_files(&victim);
    let reference = format!("{}/flaky/app:1", corrupting.host());
    let out = kiln(&victim, &["pull", &reference], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(err.contains(&corrupting.host()), "{err}");
    assert_eq!(blob_files(&victim), before);
    let tmp_left: Vec<_> = walk_files(&victim.root.path().join("tmp"));
    assert!(tmp_left.is_empty(), "left in tmp/: {tmp_left:?}");
    assert!(stored(&victim, &reference).is_none());
    let report = Store::open(victim.root.path()).unwrap().fsck().unwrap();
    assert!(report.is_clean(), "fsck: {:?}", report.problems);
}

/// Every regular file under `dir`.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn two_builds_at_once_on_one_store() {
    let k = Kiln::new();
    let recipes = [
        "FROM busybox\nRUN echo one > /one && sleep 0.2\nRUN seq 1 5000 > /numbers\n",
        "FROM busybox\nRUN echo two > /two && sleep 0.2\nCOPY Dockerfile /recipe\nRUN wc -l /recipe > /lines\n",
    ];
    let contexts: Vec<_> = recipes.iter().map(|r| context(r, &[])).collect();
    let children: Vec<_> = contexts
        .iter()
        .enumerate()
        .map(|(i, ctx)| {
            let tag = format!("par:{i}");
            kiln_cmd(
                &k,
                &[
                    "build",
                    "--progress",
                    "plain",
                    "-t",
                    &tag,
                    ctx.path().to_str().unwrap(),
                ],
                None,
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for child in children {
        assert_success(&child.wait_with_output().unwrap());
    }
    for i in 0..2 {
        assert!(stored(&k, &format!("par:{i}")).is_some());
    }
    assert_fsck_clean(&k);
}

#[test]
fn docker_archive_is_read_by_skopeo_and_imports_back() {
    let k = Kiln::new();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("app.tar");
    let id = build(
        &k,
        APP,
        &[
            "-t",
            "app:1",
            "--output",
            &format!("type=docker-archive,dest={}", archive.display()),
        ],
    );
    let info: serde_json::Value = serde_json::from_slice(&skopeo(&[
        "inspect",
        &format!("docker-archive:{}", archive.display()),
    ]))
    .unwrap();
    assert_eq!(info["Labels"]["app"], "one", "{info}");
    let img = stored(&k, "app:1").unwrap();
    assert_eq!(
        info["Layers"].as_array().unwrap().len(),
        img.manifest_body.layers.len(),
        "{info}"
    );
    // The archive carries kiln's config bytes unchanged.
    let config = skopeo(&[
        "inspect",
        "--config",
        "--raw",
        &format!("docker-archive:{}", archive.display()),
    ]);
    assert_eq!(Digest::of(&config).to_string(), id);

    let other = Kiln::empty();
    let out = kiln(
        &other,
        &["import", archive.to_str().unwrap(), "roundtrip:1"],
        None,
    );
    assert_success(&out);
    assert_eq!(stdout_line(&out), id);
    let a = common::inspect(&k, "app:1");
    let b = common::inspect(&other, "roundtrip:1");
    assert_eq!(a, b);
    assert_fsck_clean(&other);
}
