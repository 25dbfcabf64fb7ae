//! Registry client against real `docker-registry` servers (plain, htpasswd + TLS) and
//! fault-injecting proxies, cross-checked with skopeo.

mod common;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::registry::{
    Action, Proxy, Registry, RegistrySetup, Seen, corrupt_blob_gets, docker_config, skopeo,
};
use kiln::digest::Digest;
use kiln::registry::{
    Client, ClientOptions, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, PushOutcome, Reference,
    RegistryError, select_platform,
};

// ---------------------------------------------------------------------------------------
// Test images
// ---------------------------------------------------------------------------------------

/// A one-layer image built in memory.
struct TestImage {
    layer: Vec<u8>,
    layer_digest: Digest,
    config: Vec<u8>,
    config_digest: Digest,
    manifest: Vec<u8>,
    manifest_digest: Digest,
}

fn make_image(content: &str, arch: &str) -> TestImage {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, "hello.txt", content.as_bytes())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let layer_digest = Digest::of(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).to_string()]},
    }))
    .unwrap();
    let config_digest = Digest::of(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = Digest::of(&manifest);
    TestImage {
        layer,
        layer_digest,
        config,
        config_digest,
        manifest,
        manifest_digest,
    }
}

fn opener(bytes: &[u8]) -> impl Fn() -> io::Result<Box<dyn Read>> + use<> {
    let bytes = bytes.to_vec();
    move || Ok(Box::new(io::Cursor::new(bytes.clone())) as Box<dyn Read>)
}

fn push_image(client: &Client, r: &Reference, img: &TestImage) -> Vec<PushOutcome> {
    let mut outcomes = Vec::new();
    for (blob, digest) in [
        (&img.layer, img.layer_digest),
        (&img.config, img.config_digest),
    ] {
        outcomes.push(
            client
                .push_blob(r, &digest, blob.len() as u64, &opener(blob), None)
                .unwrap(),
        );
    }
    let d = client
        .put_manifest(r, MEDIA_OCI_MANIFEST, &img.manifest)
        .unwrap();
    assert_eq!(d, img.manifest_digest);
    outcomes
}

fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn plain_client() -> Client {
    Client::new(ClientOptions {
        // Keep the developer's own credentials out of the tests.
        auth_file: Some(PathBuf::from("/nonexistent/kiln-test-auth.json")),
        ..ClientOptions::default()
    })
}

// ---------------------------------------------------------------------------------------
// Plain registry
// ---------------------------------------------------------------------------------------

#[test]
fn push_then_skopeo_sees_the_same_manifest_and_pull_round_trips() {
    let reg = Registry::start();
    let client = plain_client();
    let r = reference(&format!("{}/kiln/hello:v1", reg.host()));
    let img = make_image("hello from kiln\n", "amd64");

    let outcomes = push_image(&client, &r, &img);
    assert_eq!(outcomes, [PushOutcome::Uploaded, PushOutcome::Uploaded]);

    // skopeo agrees on the bytes and the digest.
    let url = format!("docker://{}/kiln/hello:v1", reg.host());
    let raw = skopeo(&["inspect", "--tls-verify=false", "--raw", &url]);
    assert_eq!(raw, img.manifest);
    let info: serde_json::Value =
        serde_json::from_slice(&skopeo(&["inspect", "--tls-verify=false", &url])).unwrap();
    assert_eq!(info["Digest"], img.manifest_digest.to_string());

    // Pull by tag and by digest.
    let (media_type, bytes, digest) = client.get_manifest(&r).unwrap();
    assert_eq!(
        (media_type.as_str(), &bytes, digest),
        (MEDIA_OCI_MANIFEST, &img.manifest, img.manifest_digest)
    );
    let by_digest = reference(&format!("{}/kiln/hello@{}", reg.host(), digest));
    assert_eq!(client.get_manifest(&by_digest).unwrap().1, img.manifest);

    let mut out = Vec::new();
    let n = client.get_blob(&r, &img.layer_digest, &mut out).unwrap();
    assert_eq!((n, &out), (img.layer.len() as u64, &img.layer));

    // Existence checks, and a second push skips everything.
    assert!(client.blob_exists(&r, &img.config_digest).unwrap());
    assert!(!client.blob_exists(&r, &Digest::of(b"absent")).unwrap());
    assert_eq!(
        push_image(&client, &r, &img),
        [PushOutcome::Exists, PushOutcome::Exists]
    );

    // Cross-repository mount.
    let other = reference(&format!("{}/kiln/other:v1", reg.host()));
    let outcome = client
        .push_blob(
            &other,
            &img.layer_digest,
            img.layer.len() as u64,
            &opener(&img.layer),
            Some("kiln/hello"),
        )
        .unwrap();
    assert_eq!(outcome, PushOutcome::Mounted);
    assert!(client.blob_exists(&other, &img.layer_digest).unwrap());

    // Not found names the reference and the registry.
    let missing = reference(&format!("{}/kiln/hello:nope", reg.host()));
    let err = client.get_manifest(&missing).unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("not found") && msg.contains(&reg.host()) && msg.contains("hello:nope"),
        "{msg}"
    );
    let err = client
        .get_blob(&r, &Digest::of(b"absent"), &mut Vec::new())
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

#[test]
fn wrong_content_for_a_digest_is_rejected_by_the_registry() {
    let reg = Registry::start();
    let client = plain_client();
    let r = reference(&format!("{}/kiln/bad:v1", reg.host()));
    let err = client
        .push_blob(&r, &Digest::of(b"something else"), 3, &opener(b"abc"), None)
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 400, .. }),
        "{err}"
    );
    // A pinned digest that does not match the manifest bytes is refused before sending.
    let pinned = reference(&format!("{}/kiln/bad@{}", reg.host(), Digest::of(b"x")));
    let err = client
        .put_manifest(&pinned, MEDIA_OCI_MANIFEST, b"{}")
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
}

/// Writes an OCI image layout holding an index of two single-layer images.
fn write_two_platform_layout(dir: &Path, amd64: &TestImage, arm64: &TestImage) -> Vec<u8> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for img in [amd64, arm64] {
        for (bytes, digest) in [
            (&img.layer, img.layer_digest),
            (&img.config, img.config_digest),
            (&img.manifest, img.manifest_digest),
        ] {
            std::fs::write(blobs.join(digest.hex()), bytes).unwrap();
        }
    }
    let entry = |img: &TestImage, arch: &str, variant: Option<&str>| {
        let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        serde_json::json!({"mediaType": MEDIA_OCI_MANIFEST, "digest": img.manifest_digest.to_string(),
                           "size": img.manifest.len(), "platform": platform})
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
        "manifests": [entry(amd64, "amd64", None), entry(arm64, "arm64", Some("v8"))],
    }))
    .unwrap();
    let index_digest = Digest::of(&index);
    std::fs::write(blobs.join(index_digest.hex()), &index).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": MEDIA_OCI_INDEX, "digest": index_digest.to_string(), "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    index
}

#[test]
fn pulls_a_multi_platform_image_copied_in_by_skopeo() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let amd64 = make_image("amd64 payload\n", "amd64");
    let arm64 = make_image("arm64 payload\n", "arm64");
    let index = write_two_platform_layout(&layout, &amd64, &arm64);
    let policy = work.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    skopeo(&[
        "--policy",
        policy.to_str().unwrap(),
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{}/kiln/multi:v1", reg.host()),
    ]);

    let client = plain_client();
    let r = reference(&format!("{}/kiln/multi:v1", reg.host()));
    let (media_type, bytes, digest) = client.get_manifest(&r).unwrap();
    assert_eq!(media_type, MEDIA_OCI_INDEX);
    assert_eq!(
        (bytes.as_slice(), digest),
        (index.as_slice(), Digest::of(&index))
    );

    for (arch, variant, img) in [
        ("arm64", Some("v8"), &arm64),
        ("arm64", None, &arm64),
        ("amd64", None, &amd64),
    ] {
        let (mt, d) = select_platform(&bytes, "linux", arch, variant).unwrap();
        assert_eq!((mt.as_str(), d), (MEDIA_OCI_MANIFEST, img.manifest_digest));
        let by_digest = reference(&format!("{}/kiln/multi@{d}", reg.host()));
        let (_, manifest, _) = client.get_manifest(&by_digest).unwrap();
        assert_eq!(manifest, img.manifest);
        let mut layer = Vec::new();
        client
            .get_blob(&by_digest, &img.layer_digest, &mut layer)
            .unwrap();
        assert_eq!(layer, img.layer);
    }
    assert!(matches!(
        select_platform(&bytes, "linux", "s390x", None),
        Err(RegistryError::NoMatchingPlatform { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// htpasswd + TLS registry
// ---------------------------------------------------------------------------------------

#[test]
fn authenticated_tls_registry() {
    let reg = Registry::start_with(RegistrySetup {
        htpasswd: Some(("kiln", "s3cret")),
        tls: true,
    });
    let work = tempfile::tempdir().unwrap();
    let r = reference(&format!("{}/private/app:v1", reg.host()));
    let img = make_image("secret payload\n", "amd64");
    let with_auth = |user: &str, pass: &str, tls_verify: bool| {
        Client::new(ClientOptions {
            tls_verify,
            auth_file: Some(docker_config(work.path(), &reg.host(), user, pass)),
            ..ClientOptions::default()
        })
    };

    // Right credentials, self-signed certificate accepted with tls_verify=false.
    let client = with_auth("kiln", "s3cret", false);
    assert_eq!(
        push_image(&client, &r, &img),
        [PushOutcome::Uploaded, PushOutcome::Uploaded]
    );
    let (_, bytes, digest) = client.get_manifest(&r).unwrap();
    assert_eq!((bytes, digest), (img.manifest.clone(), img.manifest_digest));
    let mut layer = Vec::new();
    client.get_blob(&r, &img.layer_digest, &mut layer).unwrap();
    assert_eq!(layer, img.layer);
    // skopeo sees it over TLS with the same credentials.
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        "kiln:s3cret",
        &format!("docker://{}", r),
    ]);
    assert_eq!(raw, img.manifest);

    // Wrong credentials: an auth error naming the registry.
    let err = with_auth("kiln", "wrong", false)
        .get_manifest(&r)
        .unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("authentication to {} failed", reg.host())),
        "{err}"
    );
    // No credentials at all.
    let err = Client::new(ClientOptions {
        tls_verify: false,
        auth_file: Some(work.path().join("none.json")),
        ..ClientOptions::default()
    })
    .blob_exists(&r, &img.layer_digest)
    .unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");

    // With verification, a certificate from an unknown CA is refused; the error names the
    // host and is not mistaken for an auth failure.
    let err = with_auth("kiln", "s3cret", true)
        .get_manifest(&r)
        .unwrap_err();
    assert!(err.to_string().contains(&reg.host()), "{err}");
    assert!(matches!(err, RegistryError::Transport { .. }), "{err}");

    // Trusting the CA through SSL_CERT_FILE makes verification pass. The environment is
    // process-wide, so this runs in a child process: this test binary, running only
    // `tls_verified_child`.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tls_verified_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SSL_CERT_FILE", reg.ca())
        .env("KILN_TEST_TLS_REF", r.to_string())
        .env(
            "KILN_TEST_TLS_AUTH",
            docker_config(work.path(), &reg.host(), "kiln", "s3cret"),
        )
        .env("KILN_TEST_TLS_DIGEST", img.manifest_digest.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verified pull ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Half of `authenticated_tls_registry`: pulls with TLS verification against the CA in
/// `SSL_CERT_FILE`. Does nothing unless that test started it.
#[test]
fn tls_verified_child() {
    let (Ok(r), Ok(auth), Ok(digest)) = (
        std::env::var("KILN_TEST_TLS_REF"),
        std::env::var("KILN_TEST_TLS_AUTH"),
        std::env::var("KILN_TEST_TLS_DIGEST"),
    ) else {
        return;
    };
    let client = Client::new(ClientOptions {
        tls_verify: true,
        auth_file: Some(PathBuf::from(auth)),
        ..ClientOptions::default()
    });
    let (_, _, d) = client.get_manifest(&reference(&r)).unwrap();
    assert_eq!(d.to_string(), digest);
    println!("verified pull ok");
}

// ---------------------------------------------------------------------------------------
// Fault-injecting proxy
// ---------------------------------------------------------------------------------------

#[test]
fn push_and_pull_survive_errors_and_dropped_connections() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        reg.port,
        Box::new(|n, _| match n % 9 {
            3 => Action::Status(503),
            6 => Action::Drop,
            0 => Action::Status(500),
            _ => Action::Forward,
        }),
    );
    let client = plain_client();
    let r = reference(&format!("{}/kiln/flaky:v1", proxy.host()));
    let img = make_image("flaky network\n", "amd64");
    assert_eq!(
        push_image(&client, &r, &img),
        [PushOutcome::Uploaded, PushOutcome::Uploaded]
    );
    let (_, bytes, digest) = client.get_manifest(&r).unwrap();
    assert_eq!((bytes, digest), (img.manifest.clone(), img.manifest_digest));
    for (blob, d) in [
        (&img.layer, img.layer_digest),
        (&img.config, img.config_digest),
    ] {
        let mut out = Vec::new();
        client.get_blob(&r, &d, &mut out).unwrap();
        assert_eq!(&out, blob);
        assert!(client.blob_exists(&r, &d).unwrap());
    }
    // The faults really happened, and the image is intact behind the proxy.
    assert!(proxy.seen().len() >= 9, "{:?}", proxy.seen());
    let direct = reference(&format!("{}/kiln/flaky:v1", reg.host()));
    assert_eq!(client.get_manifest(&direct).unwrap().1, img.manifest);
}

/// A manifest PUT that finds a blob just pushed still unknown (eventually consistent storage,
/// or another client rewriting the same blob's link) is tried again; other 400s are final.
#[test]
fn a_manifest_put_retries_while_its_blobs_are_briefly_unknown() {
    let reg = Registry::start();
    let unknown =
        r#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#;
    let refusals = AtomicUsize::new(0);
    let proxy = Proxy::start(
        reg.port,
        Box::new(move |_, req| {
            let manifest_put = req.line.starts_with("PUT ") && req.line.contains("/manifests/");
            if manifest_put && refusals.fetch_add(1, Ordering::SeqCst) < 2 {
                return Action::Respond(400, String::new(), unknown.into());
            }
            Action::Forward
        }),
    );
    let client = plain_client();
    let r = reference(&format!("{}/kiln/eventual:v1", proxy.host()));
    let img = make_image("eventually consistent\n", "amd64");
    push_image(&client, &r, &img);
    let puts = proxy
        .seen()
        .iter()
        .filter(|s| s.line.starts_with("PUT ") && s.line.contains("/manifests/"))
        .count();
    assert_eq!(puts, 3);
    assert_eq!(client.get_manifest(&r).unwrap().1, img.manifest);

    // A manifest the registry refuses for another reason fails at once.
    let invalid = Proxy::start(
        reg.port,
        Box::new(
            |_, req| match req.line.starts_with("PUT ") && req.line.contains("/manifests/") {
                true => Action::Respond(
                    400,
                    String::new(),
                    r#"{"errors":[{"code":"MANIFEST_INVALID","message":"bad"}]}"#.into(),
                ),
                false => Action::Forward,
            },
        ),
    );
    let r = reference(&format!("{}/kiln/invalid:v1", invalid.host()));
    for (blob, digest) in [
        (&img.config, img.config_digest),
        (&img.layer, img.layer_digest),
    ] {
        client
            .push_blob(&r, &digest, blob.len() as u64, &opener(blob), None)
            .unwrap();
    }
    let err = client
        .put_manifest(&r, MEDIA_OCI_MANIFEST, &img.manifest)
        .unwrap_err();
    assert!(err.to_string().contains("MANIFEST_INVALID"), "{err}");
    let puts = invalid
        .seen()
        .iter()
        .filter(|s| s.line.starts_with("PUT ") && s.line.contains("/manifests/"))
        .count();
    assert_eq!(puts, 1);
}

#[test]
fn a_blob_download_cut_midway_resumes_with_a_range_request() {
    let reg = Registry::start();
    let client = plain_client();
    let direct = reference(&format!("{}/kiln/resume:v1", reg.host()));
    // Incompressible content, so the layer is large enough to cut in half.
    let mut noise = String::new();
    let mut x: u32 = 1;
    for _ in 0..100_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        noise.push(char::from(b'a' + (x >> 16) as u8 % 26));
    }
    let img = make_image(&noise, "amd64");
    push_image(&client, &direct, &img);

    let first_blob_get = AtomicBool::new(true);
    let proxy = Proxy::start(
        reg.port,
        Box::new(move |_, req| {
            if req.line.starts_with("GET ")
                && req.line.contains("/blobs/sha256:")
                && first_blob_get.swap(false, Ordering::SeqCst)
            {
                Action::Truncate
            } else {
                Action::Forward
            }
        }),
    );
    let r = reference(&format!("{}/kiln/resume:v1", proxy.host()));
    let mut out = Vec::new();
    let n = client.get_blob(&r, &img.layer_digest, &mut out).unwrap();
    assert_eq!((n, &out), (img.layer.len() as u64, &img.layer));
    let gets: Vec<Seen> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.line.contains("/blobs/"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    let range = gets[1].range.clone().unwrap_or_default();
    assert!(
        range.starts_with("bytes=") && range != "bytes=0-",
        "{gets:?}"
    );
}

#[test]
fn a_registry_that_keeps_failing_gives_up() {
    let reg = Registry::start();
    let proxy = Proxy::start(reg.port, Box::new(|_, _| Action::Status(503)));
    let client = plain_client();
    let r = reference(&format!("{}/kiln/down:v1", proxy.host()));
    let started = Instant::now();
    let err = client.get_manifest(&r).unwrap_err();
    assert!(
        matches!(err, RegistryError::Status { status: 503, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&proxy.host()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Bounded: the probe plus five attempts.
    assert!(proxy.seen().len() <= 10, "{:?}", proxy.seen());
}

#[test]
fn a_corrupted_blob_is_a_digest_mismatch() {
    let reg = Registry::start();
    let client = plain_client();
    let direct = reference(&format!("{}/kiln/corrupt:v1", reg.host()));
    let img = make_image("will be corrupted\n", "amd64");
    push_image(&client, &direct, &img);

    let proxy = Proxy::start(reg.port, corrupt_blob_gets());
    let r = reference(&format!("{}/kiln/corrupt:v1", proxy.host()));
    let err = client
        .get_blob(&r, &img.layer_digest, &mut Vec::new())
        .unwrap_err();
    match err {
        RegistryError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, img.layer_digest);
            assert_ne!(actual, img.layer_digest);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn credentials_are_not_sent_across_a_redirect_to_another_host() {
    use base64::Engine as _;
    let reg = Registry::start_with(RegistrySetup {
        htpasswd: Some(("kiln", "s3cret")),
        tls: false,
    });
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("kiln:s3cret")
    );
    // "Blob storage" on another host name that the registry redirects blob GETs to.
    let storage = Proxy::start(
        reg.port,
        Box::new(move |_, _| Action::ForwardAs(basic.clone())),
    );
    let storage_authority = format!("localhost:{}", storage.port);
    let front = Proxy::start(
        reg.port,
        Box::new(move |_, req| {
            if req.line.starts_with("GET ") && req.line.contains("/blobs/sha256:") {
                Action::Redirect(storage_authority.clone())
            } else {
                Action::Forward
            }
        }),
    );
    let work = tempfile::tempdir().unwrap();
    let client = Client::new(ClientOptions {
        auth_file: Some(docker_config(work.path(), &front.host(), "kiln", "s3cret")),
        ..ClientOptions::default()
    });
    let r = reference(&format!("{}/kiln/redirected:v1", front.host()));
    let img = make_image("redirected\n", "amd64");
    push_image(&client, &r, &img);
    let mut out = Vec::new();
    client.get_blob(&r, &img.layer_digest, &mut out).unwrap();
    assert_eq!(out, img.layer);

    let at_storage = storage.seen();
    assert_eq!(at_storage.len(), 1, "{at_storage:?}");
    assert!(
        at_storage[0].authorization.is_none(),
        "credentials leaked: {at_storage:?}"
    );
    assert!(
        front
            .seen()
            .iter()
            .any(|s| s.line.contains("/blobs/sha256:") && s.authorization.is_some())
    );
}

#[test]
fn bearer_tokens_from_a_token_service() {
    use base64::Engine as _;
    let reg = Registry::start();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("kiln:s3cret")
    );
    // The token service: a token per scope for the right basic credentials.
    let tokens = Proxy::start(
        reg.port,
        Box::new(move |_, req| {
            if req.authorization.as_deref() != Some(basic.as_str()) {
                return Action::Respond(401, String::new(), r#"{"details":"bad creds"}"#.into());
            }
            let push = req
                .line
                .contains("scope=repository%3Akiln%2Fbearer%3Apull%2Cpush");
            let token = if push { "push-token" } else { "pull-token" };
            Action::Respond(200, String::new(), format!(r#"{{"token":"{token}"}}"#))
        }),
    );
    // The registry front: demands a bearer token fit for the request.
    let realm = format!("http://{}/token", tokens.host());
    let front = Proxy::start(
        reg.port,
        Box::new(move |_, req| {
            let writes = !(req.line.starts_with("GET ") || req.line.starts_with("HEAD "));
            let ok = match req.authorization.as_deref() {
                Some("Bearer push-token") => true,
                Some("Bearer pull-token") => !writes,
                _ => false,
            };
            if ok {
                Action::Forward
            } else {
                Action::Respond(
                    401,
                    format!(
                        "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"kiln-test\",scope=\"repository:kiln/bearer:pull\"\r\n"
                    ),
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#.into(),
                )
            }
        }),
    );
    let work = tempfile::tempdir().unwrap();
    let client_with = |pass: &str| {
        Client::new(ClientOptions {
            auth_file: Some(docker_config(work.path(), &front.host(), "kiln", pass)),
            ..ClientOptions::default()
        })
    };
    let client = client_with("s3cret");
    let r = reference(&format!("{}/kiln/bearer:v1", front.host()));
    let img = make_image("bearer\n", "amd64");
    push_image(&client, &r, &img);
    let (_, bytes, _) = client.get_manifest(&r).unwrap();
    assert_eq!(bytes, img.manifest);
    let mut out = Vec::new();
    client.get_blob(&r, &img.layer_digest, &mut out).unwrap();
    assert_eq!(out, img.layer);

    // Tokens are cached per scope: one for push, one for pull.
    let fetched = tokens.seen();
    assert_eq!(fetched.len(), 2, "{fetched:?}");
    assert!(fetched.iter().all(|s| s.line.contains("service=kiln-test")));

    let err = client_with("wrong").get_manifest(&r).unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("authentication to {} failed", front.host())),
        "{err}"
    );
}
