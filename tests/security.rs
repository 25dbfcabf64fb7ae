//! End-to-end checks that hostile contexts, recipes and base images cannot reach the host or
//! run away with the builder's resources.

mod common;

use common::*;

/// A context link whose target runs through another link out of the context
/// (`chain -> x/secret`, `x -> /host/dir`): COPY finds nothing rather than the host's file.
#[test]
fn copy_through_a_chain_of_context_links_stays_inside() {
    let k = Kiln::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "host secret").unwrap();
    let ctx = context("FROM busybox\nCOPY chain /got\nRUN cat /got\n", &[]);
    std::os::unix::fs::symlink(host.path(), ctx.path().join("x")).unwrap();
    std::os::unix::fs::symlink("x/secret", ctx.path().join("chain")).unwrap();
    let out = k.run(&["build", "--progress", "plain", ctx.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!err.contains("host secret"), "{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("chain"), "{err}");
}

/// `ENV A1=$A0$A0$A0$A0` chains (each value four times the last) stop at the first value over
/// 1 MiB, located at the `$` that went over, as an input error.
#[test]
fn expansion_chains_stop_at_the_value_limit() {
    let k = Kiln::empty();
    let mut recipe = String::from("FROM scratch\nENV A0=xxxx\n");
    for i in 1..=20 {
        let p = i - 1;
        recipe.push_str(&format!("ENV A{i}=$A{p}$A{p}$A{p}$A{p}\n"));
    }
    let start = std::time::Instant::now();
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // A9 is exactly 1 MiB (it fits); A10, on line 12, goes over at its second `$A9`.
    assert!(err.contains("Dockerfile:12:12:"), "{err}");
    assert!(err.contains("1 MiB"), "{err}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "{err}"
    );
    // The same through ARG defaults.
    let args = recipe.replace("ENV ", "ARG ");
    let (out, _ctx) = k.build(&args, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":12:12:"), "{err}");
}

/// Many values under the value limit still cannot grow one stage's config past 16 MiB.
#[test]
fn the_config_has_a_size_limit() {
    let k = Kiln::empty();
    let mut recipe = String::from("FROM scratch\nENV A0=xxxx\n");
    for i in 1..=9 {
        let p = i - 1;
        recipe.push_str(&format!("ENV A{i}=$A{p}$A{p}$A{p}$A{p}\n"));
    }
    // A9 is exactly 1 MiB; A0..A9 hold 1.33 MiB, so the 15th copy passes 16 MiB.
    for i in 1..=20 {
        recipe.push_str(&format!("LABEL copy{i}=$A9\n"));
    }
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("16 MiB"), "{err}");
    assert!(err.contains("Dockerfile:26:1:"), "{err}");
}

/// Serves `busybox` from a real registry behind a proxy that answers manifest requests as
/// `serve` says (`None` forwards); returns a `kiln pull` of it through the proxy, and the
/// store it ran on.
fn pull_through(
    serve: impl Fn(&str, &serde_json::Value) -> Option<(String, String)> + Send + Sync + 'static,
) -> (std::process::Output, Kiln) {
    use common::registry::{Action, Proxy, Registry};
    let reg = Registry::start();
    let k = Kiln::new();
    let direct = format!("{}/kiln/base:v1", reg.host());
    assert_success(&k.run(&["push", "busybox", &direct]));
    let manifest = oci_json(
        k.root.path(),
        &oci_ref_digest(k.root.path(), "docker.io/library/busybox:latest"),
    );
    let proxy = Proxy::start(
        reg.port,
        Box::new(move |_, seen| {
            let path = seen.line.split(' ').nth(1).unwrap_or("");
            match path.split_once("/manifests/") {
                Some((_, tag)) if seen.line.starts_with("GET ") => match serve(tag, &manifest) {
                    Some((content_type, body)) => {
                        Action::Respond(200, format!("Content-Type: {content_type}\r\n"), body)
                    }
                    None => Action::Forward,
                },
                _ => Action::Forward,
            }
        }),
    );
    let fresh = Kiln::empty();
    let out = fresh.run(&["pull", &format!("{}/kiln/base:v1", proxy.host())]);
    drop(proxy);
    (out, fresh)
}

fn assert_refused(out: &std::process::Output, k: &Kiln, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(needle), "{err}");
    let index = std::fs::read_to_string(k.root.path().join("index.json")).unwrap_or_default();
    assert!(
        !index.contains("kiln/base"),
        "the refused image was stored: {index}"
    );
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// CVE-2021-41190: a document that reads both as a manifest and as an index, or whose
/// `mediaType` contradicts its Content-Type, is refused and nothing is stored.
#[test]
fn ambiguous_manifests_are_refused() {
    // The untouched image pulls (the proxy itself is not what fails).
    let (out, _k) = pull_through(|_, _| None);
    assert_success(&out);
    // A manifest that also lists manifests.
    let (out, k) = pull_through(|_, m| {
        let mut m = m.clone();
        m["manifests"] = serde_json::json!([]);
        Some((OCI_MANIFEST.into(), m.to_string()))
    });
    assert_refused(&out, &k, "CVE-2021-41190");
    // A manifest served as an index.
    let (out, k) = pull_through(|_, m| Some((OCI_INDEX.into(), m.to_string())));
    assert_refused(&out, &k, "served as");
    // An index that also carries layers.
    let (out, k) = pull_through(|_, m| {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "layers": m["layers"].clone(),
        });
        Some((OCI_INDEX.into(), index.to_string()))
    });
    assert_refused(&out, &k, "has `layers` or `config`");
}

/// An index entry whose child turns out to be of another type than the index says, and blobs
/// other than their descriptors say, are refused.
#[test]
fn index_children_and_blobs_must_match_their_descriptors() {
    let host = kiln::image::Platform::host();
    let (os, arch) = (host.os, host.architecture);
    let (out, k) = pull_through(move |tag, m| {
        if tag.starts_with("sha256:") {
            return None;
        }
        let body = m.to_string();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "digest": format!("sha256:{}", sha256_hex(body.as_bytes())),
                "size": body.len(),
                "platform": {"os": os, "architecture": arch},
            }],
        });
        Some((OCI_INDEX.into(), index.to_string()))
    });
    assert_refused(&out, &k, "the index lists");
    // A layer descriptor one byte short: the registry's extra byte is refused.
    let (out, k) = pull_through(|_, m| {
        let mut m = m.clone();
        let size = m["layers"][0]["size"].as_u64().unwrap();
        m["layers"][0]["size"] = serde_json::json!(size - 1);
        Some((OCI_MANIFEST.into(), m.to_string()))
    });
    assert_refused(&out, &k, "larger than the");
    // A config said to be bigger than any config kiln accepts is not even fetched.
    let (out, k) = pull_through(|_, m| {
        let mut m = m.clone();
        m["config"]["size"] = serde_json::json!(1u64 << 40);
        Some((OCI_MANIFEST.into(), m.to_string()))
    });
    assert_refused(&out, &k, "16 MiB");
}

fn sha256_hex(bytes: &[u8]) -> String {
    kiln::digest::Digest::of(bytes).hex()
}

/// The syscall probe (testdata/probes/syscalls.c), built static, in a context with `recipe`.
fn probe_context(recipe: &str) -> tempfile::TempDir {
    let ctx = context(recipe, &[]);
    let out = std::process::Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(ctx.path().join("probe"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/probes/syscalls.c"
        ))
        .output()
        .unwrap();
    assert_success(&out);
    ctx
}

/// Builds the probe context with `args`; returns the step output (stderr) and the status.
fn probe_build(recipe: &str, args: &[&str]) -> (std::process::Output, String) {
    let k = Kiln::new();
    let ctx = probe_context(recipe);
    let mut full = vec!["build", "--progress", "plain", "--no-cache"];
    full.extend_from_slice(args);
    full.push(ctx.path().to_str().unwrap());
    let out = k.run(&full);
    let err = stderr(&out);
    (out, err)
}

const PROBE_RECIPE: &str = "FROM busybox\nCOPY probe /probe\nRUN mkdir /mnt\n\
    RUN grep -E '^(Seccomp|CapEff):' /proc/self/status && /probe \
        && (unshare -U true && echo busybox-unshare=OK || echo busybox-unshare=refused) \
        && (mount -t tmpfs none /mnt && echo busybox-mount=OK || echo busybox-mount=refused)\n";

/// Every RUN runs under Docker's default seccomp profile: the calls Docker refuses fail the
/// same way (EPERM, and ENOSYS for clone3 so that libcs fall back to clone).
#[test]
fn run_steps_get_dockers_seccomp_profile() {
    let (out, err) = probe_build(PROBE_RECIPE, &[]);
    assert_success(&out);
    for line in [
        "Seccomp:\t2",
        "keyctl=EPERM",
        "unshare-user=EPERM",
        "mount=EPERM",
        "clone3=ENOSYS",
        "personality-query=OK",
        "personality-addr-no-randomize=EPERM",
        "busybox-unshare=refused",
        "busybox-mount=refused",
    ] {
        assert!(err.contains(line), "{line} missing:\n{err}");
    }
    // Docker's capability set as before (no CAP_SYS_ADMIN, no CAP_MKNOD).
    assert!(err.contains("CapEff:\t00000000a00425fb"), "{err}");
}

/// `--security-opt seccomp=unconfined` runs without a filter; `seccomp=FILE` takes a profile in
/// Docker's format; a bad profile is a usage error naming the file.
#[test]
fn security_opt_chooses_the_seccomp_profile() {
    let (out, err) = probe_build(PROBE_RECIPE, &["--security-opt", "seccomp=unconfined"]);
    assert_success(&out);
    for line in [
        "Seccomp:\t0",
        "keyctl=OK",
        "unshare-user=OK",
        "clone3=EINVAL",
    ] {
        assert!(err.contains(line), "{line} missing:\n{err}");
    }
    // Without CAP_SYS_ADMIN, mount still fails: the capability set does not change.
    assert!(err.contains("mount=EPERM"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let (out, err) = probe_build(
        "FROM busybox\nRUN mkdir /made 2>&1; grep Seccomp: /proc/self/status\n",
        &["--security-opt", &opt],
    );
    assert_success(&out);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("Seccomp:\t2"), "{err}");

    std::fs::write(&profile, r#"{"defaultAction":"SCMP_ACT_SOMETIMES"}"#).unwrap();
    let (out, err) = probe_build("FROM busybox\nRUN true\n", &["--security-opt", &opt]);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("profile.json") && err.contains("SCMP_ACT_SOMETIMES"),
        "{err}"
    );
}

/// `RUN --security=insecure` needs `--allow security.insecure`; with it, the step has every
/// capability and no seccomp filter, as BuildKit's insecure entitlement gives.
#[test]
fn insecure_runs_only_when_allowed() {
    let recipe = "FROM busybox\nCOPY probe /probe\nRUN mkdir /mnt\n\
        RUN --security=insecure grep -E '^(Seccomp|CapEff):' /proc/self/status && /probe \
            && touch /proc/sys/kernel/hostname && echo proc-sys=writable\n\
        RUN grep -E '^(Seccomp|CapEff):' /proc/self/status\n";
    let (out, err) = probe_build(recipe, &[]);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Dockerfile:4") && err.contains("--allow security.insecure"),
        "{err}"
    );

    let (out, err) = probe_build(recipe, &["--allow", "security.insecure"]);
    assert_success(&out);
    let host_caps = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap()
        .trim_start_matches("CapBnd:")
        .trim()
        .to_string();
    for line in [
        "Seccomp:\t0".to_string(),
        format!("CapEff:\t{host_caps}"),
        "mount=OK".to_string(),
        "keyctl=OK".to_string(),
        "proc-sys=writable".to_string(),
    ] {
        assert!(err.contains(&line), "{line} missing:\n{err}");
    }
    // The next step is fenced again.
    assert!(err.contains("Seccomp:\t2"), "{err}");
}

/// The shared libraries the kiln binary under test needs, as `ldd` names them: (path in the
/// host, same path in an image).
fn kiln_libraries() -> Vec<std::path::PathBuf> {
    let out = std::process::Command::new("ldd")
        .arg(kiln_bin())
        .output()
        .unwrap();
    assert_success(&out);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(std::path::PathBuf::from)
        .collect()
}

/// A base whose first process re-executes whatever runs the sandbox (`#!/proc/self/exe`) makes
/// kiln the step's PID 1, and kiln then runs a credential helper the image brings: that
/// helper, code of the step, must not find the host's kiln binary behind `/proc/1/exe`, nor
/// write to what it finds, while kiln runs or after it exits (runc CVE-2019-5736).
#[test]
fn the_host_kiln_binary_is_out_of_reach_of_a_step() {
    use common::registry::{Action, Proxy};
    use std::os::unix::fs::MetadataExt;
    let k = Kiln::new();
    // A request without credentials gets a basic-auth challenge, so kiln looks for some; with
    // them, the image is not there.
    let registry = Proxy::start(
        1,
        Box::new(|_, seen| match seen.authorization {
            None => Action::Respond(
                401,
                "WWW-Authenticate: Basic realm=\"kiln\"\r\n".into(),
                String::new(),
            ),
            Some(_) => Action::Status(404),
        }),
    );
    // Its stderr is kiln's to read: it reports on the step's output through PID 1's.
    let helper = "#!/bin/sh\n\
        exec 2>>/proc/1/fd/2\n\
        echo \"pid1-exe=$(stat -L -c %d:%i /proc/1/exe)\" >&2\n\
        if (echo x >> /proc/1/exe) 2>/dev/null; then echo write-now=OK >&2; \
        else echo write-now=refused >&2; fi\n\
        exec 3</proc/1/exe\n\
        ( for i in $(seq 5000); do \
            if (echo x >> /proc/self/fd/3) 2>/dev/null; then echo write-later=OK >&2; exit; fi; \
          done ) >/dev/null &\n\
        echo '{\"Username\":\"u\",\"Secret\":\"p\"}'\n";
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("docker-credential-evil".into(), helper.as_bytes().to_vec()),
        ("config.json".into(), br#"{"credsStore":"evil"}"#.to_vec()),
    ];
    let mut copies = String::new();
    for (i, lib) in kiln_libraries().iter().enumerate() {
        files.push((format!("lib{i}"), std::fs::read(lib).unwrap()));
        copies.push_str(&format!("COPY --chmod=755 lib{i} {}\n", lib.display()));
    }
    // The script's own path is the reference to pull: the kernel runs the interpreter as
    // `/proc/self/exe pull REF`.
    let reference = format!("{}/x/y:1", registry.host());
    let recipe = format!(
        "FROM busybox\n{copies}\
         COPY --chmod=755 docker-credential-evil /bin/\n\
         COPY config.json /cfg/\n\
         ENV DOCKER_CONFIG=/cfg\n\
         RUN mkdir -p /{reference} && rmdir /{reference} \
             && printf '#!/proc/self/exe pull\\n' > /{reference} && chmod 755 /{reference}\n\
         RUN [\"{reference}\"]\n"
    );
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    let before = std::fs::read(kiln_bin()).unwrap();
    let (out, _ctx) = k.build(&recipe, &refs, &[]);
    let err = stderr(&out);
    let host = std::fs::metadata(kiln_bin()).unwrap();
    let host_id = format!("pid1-exe={}:{}", host.dev(), host.ino());
    // The helper did run as a child of kiln (the test would show nothing otherwise).
    assert!(err.contains("pid1-exe="), "{err}");
    assert!(
        !err.contains(&host_id),
        "a step reached the host's kiln binary:\n{err}"
    );
    assert!(err.contains("write-now=refused"), "{err}");
    assert!(!err.contains("write-later=OK"), "{err}");
    assert!(
        std::fs::read(kiln_bin()).unwrap() == before,
        "the kiln binary changed"
    );
}

/// A daemon a step starts (double fork, setsid, its own session) dies with the step: nothing
/// a step starts is left running after the build.
#[test]
fn a_steps_daemon_dies_with_the_step() {
    let k = Kiln::new();
    let marker = 3_000_000 + std::process::id() % 1_000_000;
    let recipe = format!(
        "FROM busybox\n\
         RUN (setsid sh -c 'sleep {marker} & sleep {marker}' &) ; sleep 0.2; \
             ps -o pid,args | grep -c 'sleep {marker}'\n"
    );
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    assert_success(&out);
    let left = processes_with(&format!("sleep {marker}"));
    assert!(left.is_empty(), "left running: {left:?}");
}
