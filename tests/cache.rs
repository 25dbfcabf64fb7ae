//! The shared build cache end to end through the `kiln` binary against real registries
//! (`docker-registry`, with htpasswd + TLS where it matters): a fresh store builds from a
//! cache another store exported and gets the same image, downloading no layer; cache keys
//! depend on content only (contexts at other paths, other owners, other mtimes); mode=min and
//! mode=max; OCI-layout and inline caches; `--metadata-file`; broken and hostile caches never
//! break a build; two runners exporting to one ref at once.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::registry::{Action, Proxy, Registry, RegistrySetup, docker_config, free_port};
use common::{
    Kiln, assert_success, context, kiln_bin, oci_index, oci_json, stderr, stdout_line, umoci_unpack,
};
use kiln::digest::Digest;
use kiln::registry::{Client, ClientOptions, MEDIA_OCI_MANIFEST, Reference};
use kiln::store::Store;
use serde_json::Value;

/// Two stages: `tools` is an intermediate stage the final one copies from.
const RECIPE: &str = "\
FROM busybox AS tools
RUN echo tool > /tool
FROM busybox
ENV GREETING=hello
COPY app /app
RUN cat /app/x > /out && echo $GREETING >> /out
WORKDIR /srv
COPY --from=tools /tool /srv/tool
LABEL stage=final
";

const FILES: &[(&str, &[u8])] = &[("app/x", b"one\n"), ("app/y", b"two\n")];

/// How kiln reaches the test registry: credentials and the CA that signed its certificate.
#[derive(Default)]
struct Access {
    auth: Option<PathBuf>,
    ca: Option<PathBuf>,
}

/// Runs kiln on `k`'s store with only `access`'s credentials (never the developer's own).
fn kiln_cmd(k: &Kiln, args: &[&str], access: &Access) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.arg("--root")
        .arg(k.root.path())
        .args(args)
        .env(
            "REGISTRY_AUTH_FILE",
            access
                .auth
                .as_deref()
                .unwrap_or(Path::new("/nonexistent/kiln-test-auth.json")),
        )
        .env("DOCKER_CONFIG", "/nonexistent/kiln-test-docker-config")
        .stdin(Stdio::null());
    if let Some(ca) = &access.ca {
        cmd.env("SSL_CERT_FILE", ca);
    }
    cmd
}

/// `kiln build --progress plain ARGS CTX --metadata-file …`; returns the output and the
/// metadata document (Null when the build failed).
fn build(k: &Kiln, ctx: &Path, args: &[&str], access: &Access) -> (Output, Value) {
    build_env(k, ctx, args, access, &[])
}

/// [`build`] with these environment variables set (a value) or removed (None).
fn build_env(
    k: &Kiln,
    ctx: &Path,
    args: &[&str],
    access: &Access,
    env: &[(&str, Option<&str>)],
) -> (Output, Value) {
    let md = tempfile::NamedTempFile::new().unwrap();
    let mut full = vec!["build", "--progress", "plain", "--metadata-file"];
    full.push(md.path().to_str().unwrap());
    full.extend_from_slice(args);
    full.push(ctx.to_str().unwrap());
    let mut cmd = kiln_cmd(k, &full, access);
    for (name, value) in env {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    let out = cmd.output().unwrap();
    let doc = std::fs::read(md.path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (out, doc)
}

/// Builds and asserts success; returns the metadata document.
fn build_ok(k: &Kiln, ctx: &Path, args: &[&str], access: &Access) -> Value {
    let (out, doc) = build(k, ctx, args, access);
    assert_success(&out);
    assert_eq!(
        stdout_line(&out),
        doc["containerimage.config.digest"].as_str().unwrap()
    );
    doc
}

/// The `kiln.steps` entry of the step with this instruction (the first one).
fn step<'d>(doc: &'d Value, instruction: &str) -> &'d Value {
    doc["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["instruction"] == instruction)
        .unwrap_or_else(|| panic!("no step {instruction:?} in {doc:#}"))
}

/// Steps that run something or change files (the ones with cache records).
fn layer_steps(doc: &Value) -> Vec<&Value> {
    doc["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let i = s["instruction"].as_str().unwrap();
            ["RUN ", "COPY ", "ADD ", "WORKDIR "]
                .iter()
                .any(|p| i.starts_with(p))
        })
        .collect()
}

/// Gives every file and directory of `dir` these owners and an old mtime, as another checkout
/// on another machine would.
fn reown(dir: &Path, uid: u32, gid: u32) {
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid)).unwrap();
        if e.file_type().is_file() {
            let f = std::fs::File::options().write(true).open(e.path()).unwrap();
            f.set_modified(std::time::UNIX_EPOCH).unwrap();
        }
    }
}

/// The context of RECIPE somewhere else: under another directory, with other owners.
fn context_elsewhere(uid: u32) -> (tempfile::TempDir, PathBuf) {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("checkout/of/the/same/repo");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), RECIPE).unwrap();
    for (name, content) in FILES {
        std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
        std::fs::write(dir.join(name), content).unwrap();
    }
    reown(&dir, uid, uid + 1);
    (outer, dir)
}

/// A client for the test's own registry calls (no credentials from the environment).
fn test_client() -> Client {
    Client::new(ClientOptions {
        tls_verify: false,
        auth_file: Some(PathBuf::from("/nonexistent/kiln-test-auth.json")),
        ..Default::default()
    })
}

/// A file of the unpacked image.
fn read(rootfs: &Path, path: &str) -> String {
    std::fs::read_to_string(rootfs.join(path)).unwrap()
}

/// Exports `k`'s image `name` as an OCI layout and unpacks it with umoci; returns the rootfs
/// (and the temp dir holding it).
fn unpack(layout: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(layout, "latest", &dir.path().join("bundle"));
    (dir, rootfs)
}

#[test]
fn a_fresh_store_elsewhere_builds_from_the_registry_cache_to_the_same_image() {
    let reg = Registry::start_with(RegistrySetup {
        htpasswd: Some(("ci", "t0ken")),
        tls: true,
    });
    let work = tempfile::tempdir().unwrap();
    let access = Access {
        auth: Some(docker_config(work.path(), &reg.host(), "ci", "t0ken")),
        ca: Some(reg.ca()),
    };
    let host = reg.host();
    let max_ref = format!("{host}/cache/app:main");
    let min_ref = format!("{host}/cache/app:min");

    // Runner A: its checkout belongs to uid 1000.
    let a = Kiln::new();
    let ctx_a = context(RECIPE, FILES);
    reown(ctx_a.path(), 1000, 1000);
    let doc_a = build_ok(
        &a,
        ctx_a.path(),
        &[
            "-t",
            &format!("{host}/app:a"),
            "--push",
            "--cache-to",
            &format!("type=registry,ref={max_ref},mode=max"),
            "--cache-to",
            &format!("type=registry,ref={min_ref}"),
        ],
        &access,
    );
    assert!(layer_steps(&doc_a).iter().all(|s| s["cached"] == "no"));

    // Runner B: a fresh store, the same recipe checked out at another path by another user.
    let b = Kiln::new();
    let (_keep, ctx_b) = context_elsewhere(2000);
    let (out, doc_b) = build(
        &b,
        &ctx_b,
        &[
            "-t",
            &format!("{host}/app:b"),
            "--push",
            "--cache-from",
            &max_ref,
        ],
        &access,
    );
    assert_success(&out);
    for key in [
        "containerimage.digest",
        "containerimage.config.digest",
        "containerimage.descriptor",
    ] {
        assert_eq!(doc_a[key], doc_b[key], "{key}");
    }
    assert_eq!(doc_b["image.name"], format!("{host}/app:b"));
    assert_eq!(
        doc_b["containerimage.descriptor"]["mediaType"],
        MEDIA_OCI_MANIFEST
    );
    let normalized = Reference::parse(&max_ref).unwrap().to_string();
    let steps = layer_steps(&doc_b);
    assert_eq!(steps.len(), 5, "{doc_b:#}");
    for s in steps {
        assert_eq!(s["cached"], normalized.as_str(), "{s}");
    }
    // Metadata-only steps take the state of the step before them.
    assert_eq!(step(&doc_b, "ENV GREETING=hello")["cached"], "local");
    assert_eq!(
        step(&doc_b, "LABEL stage=final")["cached"],
        normalized.as_str()
    );
    assert_eq!(step(&doc_b, "FROM busybox")["line"], 3);
    // Nothing was downloaded: the image's layers are promises in B's store, and the push
    // mounted them from the cache's repository.
    let store_b = Store::open(b.root.path()).unwrap();
    let mut promised = 0;
    for s in layer_steps(&doc_b) {
        if let Some(layer) = s["layer"].as_str() {
            let d: Digest = layer.parse().unwrap();
            assert!(!store_b.has_blob(&d), "{d} was downloaded");
            assert!(store_b.blob_origin(&d).is_some());
            promised += 1;
        }
    }
    assert!(promised >= 4);
    drop(store_b);
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds", "ci:t0ken"])
        .arg(format!("docker://{host}/app:b"))
        .output()
        .unwrap();
    assert_success(&out);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Digest"], doc_a["containerimage.digest"]);

    // One changed file: that COPY and the steps after it are rebuilt, with the difference to
    // the nearest record named; the intermediate stage still comes from the cache (mode=max),
    // and its layer is now fetched since a rebuilt step copies from it.
    std::fs::write(ctx_b.join("app/x"), "changed\n").unwrap();
    let layout = work.path().join("changed-oci");
    let doc = build_ok(
        &b,
        &ctx_b,
        &[
            "--cache-from",
            &max_ref,
            "-o",
            &format!("type=oci,dest={}", layout.display()),
        ],
        &access,
    );
    assert_eq!(
        step(&doc, "RUN echo tool > /tool")["cached"],
        normalized.as_str()
    );
    let copy = step(&doc, "COPY app /app");
    assert_eq!(copy["cached"], "no");
    assert_eq!(
        copy["reason"],
        format!("not in cache {normalized}; nearest record differs: 1 file changed: app/x")
    );
    for later in [
        "RUN cat /app/x > /out && echo $GREETING >> /out",
        "WORKDIR /srv",
        "COPY --from=tools /tool /srv/tool",
    ] {
        assert_eq!(step(&doc, later)["cached"], "no", "{later}");
    }
    let (_d, rootfs) = unpack(&layout);
    assert_eq!(read(&rootfs, "out"), "changed\nhello\n");
    assert_eq!(read(&rootfs, "srv/tool"), "tool\n");

    // mode=min carries the image's own steps only: a fresh store rebuilds the intermediate
    // stage and takes the rest from the cache.
    let c = Kiln::new();
    let doc_c = build_ok(&c, ctx_a.path(), &["--cache-from", &min_ref], &access);
    let min_name = Reference::parse(&min_ref).unwrap().to_string();
    assert_eq!(step(&doc_c, "RUN echo tool > /tool")["cached"], "no");
    assert_eq!(
        step(&doc_c, "COPY --from=tools /tool /srv/tool")["cached"],
        min_name.as_str()
    );
    assert_eq!(
        doc_c["containerimage.config.digest"],
        doc_a["containerimage.config.digest"]
    );
}

#[test]
fn layout_dir_and_inline_caches() {
    let reg = Registry::start();
    let host = reg.host();
    let access = Access::default();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("ci-cache");
    let dir_s = dir.to_str().unwrap();
    let a = Kiln::new();
    let ctx = context(RECIPE, FILES);
    let image = format!("{host}/app:inline");
    let doc_a = build_ok(
        &a,
        ctx.path(),
        &[
            "-t",
            &image,
            "--push",
            "--cache-to",
            &format!("type=local,dest={dir_s},mode=max"),
            "--cache-to",
            "type=inline",
        ],
        &access,
    );
    // The layout holds one cache artifact and exactly the blobs it references.
    let index = oci_index(&dir);
    let entry = &index["manifests"][0];
    assert_eq!(entry["artifactType"], "application/vnd.kiln.cache.v1");
    let manifest = oci_json(&dir, entry["digest"].as_str().unwrap());
    let blobs = std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, manifest["layers"].as_array().unwrap().len() + 2);

    // From the directory: every step, the intermediate stage's too.
    let b = Kiln::new();
    let layout = work.path().join("oci");
    let doc_b = build_ok(
        &b,
        ctx.path(),
        &[
            "--cache-from",
            &format!("type=local,src={dir_s}"),
            "-o",
            &format!("type=oci,dest={}", layout.display()),
        ],
        &access,
    );
    for s in layer_steps(&doc_b) {
        assert_eq!(s["cached"], dir_s, "{s}");
    }
    assert_eq!(
        doc_b["containerimage.config.digest"],
        doc_a["containerimage.config.digest"]
    );
    // The OCI output needed the bytes: fetched from the directory and verified.
    let (_d, rootfs) = unpack(&layout);
    assert_eq!(read(&rootfs, "out"), "one\nhello\n");

    // From the pushed image alone (inline records: the image's own steps).
    let c = Kiln::new();
    let doc_c = build_ok(&c, ctx.path(), &["--cache-from", &image], &access);
    let name = Reference::parse(&image).unwrap().to_string();
    assert_eq!(step(&doc_c, "RUN echo tool > /tool")["cached"], "no");
    assert_eq!(step(&doc_c, "COPY app /app")["cached"], name.as_str());
    assert_eq!(
        step(&doc_c, "COPY --from=tools /tool /srv/tool")["cached"],
        name.as_str()
    );
    assert_eq!(
        doc_c["containerimage.config.digest"],
        doc_a["containerimage.config.digest"]
    );
}

/// Pushes a copy of the cache at `from` to `to`, with its records config changed by `edit`.
fn push_edited_cache(from: &str, to: &str, edit: impl Fn(&mut Value)) {
    let client = test_client();
    let (_, bytes, _) = client
        .get_manifest(&Reference::parse(from).unwrap())
        .unwrap();
    let mut manifest: Value = serde_json::from_slice(&bytes).unwrap();
    let config_digest: Digest = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut config = Vec::new();
    client
        .get_blob(
            &Reference::parse(from).unwrap(),
            &config_digest,
            &mut config,
        )
        .unwrap();
    let mut config: Value = serde_json::from_slice(&config).unwrap();
    edit(&mut config);
    let config = serde_json::to_vec(&config).unwrap();
    push_raw_cache(to, &mut manifest, &config);
}

/// Pushes `config` as the records of the cache manifest `manifest` to `to`.
fn push_raw_cache(to: &str, manifest: &mut Value, config: &[u8]) {
    let client = test_client();
    let r = Reference::parse(to).unwrap();
    let d = Digest::of(config);
    let bytes = config.to_vec();
    let open = move || -> std::io::Result<Box<dyn Read>> {
        Ok(Box::new(std::io::Cursor::new(bytes.clone())))
    };
    client
        .push_blob(&r, &d, config.len() as u64, &open, None)
        .unwrap();
    manifest["config"]["digest"] = d.to_string().into();
    manifest["config"]["size"] = config.len().into();
    client
        .put_manifest(
            &r,
            MEDIA_OCI_MANIFEST,
            &serde_json::to_vec(manifest).unwrap(),
        )
        .unwrap();
}

/// The record whose layer is the one `doc`'s step `instruction` added.
fn record_of<'c>(config: &'c mut Value, doc: &Value, instruction: &str) -> &'c mut Value {
    let layer = step(doc, instruction)["layer"]
        .as_str()
        .unwrap()
        .to_string();
    config["records"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["layer"]["digest"] == layer.as_str())
        .unwrap()
}

/// A recipe sharing RECIPE's steps up to its last RUN, then needing that RUN's files: a
/// build of it hits the shared steps and then must fetch their layers.
const NEEDS_LAYERS: &str = "\
FROM busybox AS tools
RUN echo tool > /tool
FROM busybox
ENV GREETING=hello
COPY app /app
RUN cat /app/x > /out && echo $GREETING >> /out
RUN cat /out > /out.copy
";

/// A registry holding a good cache of RECIPE (`c:good`, mode=max), and what its build did.
struct Hostile {
    reg: Registry,
    good: String,
    doc: Value,
    needs: tempfile::TempDir,
}

impl Hostile {
    fn new() -> Hostile {
        let reg = Registry::start();
        let good = format!("{}/c:good", reg.host());
        let ctx = context(RECIPE, FILES);
        let doc = build_ok(
            &Kiln::new(),
            ctx.path(),
            &["--cache-to", &format!("type=registry,ref={good},mode=max")],
            &Access::default(),
        );
        Hostile {
            reg,
            good,
            doc,
            needs: context(NEEDS_LAYERS, FILES),
        }
    }

    /// A fresh store builds NEEDS_LAYERS from `cache`: it succeeds, says `warning`, runs
    /// `rebuilt` again, and the image is right.
    fn check(&self, cache: &str, warning: &str, rebuilt: &str) {
        let k = Kiln::new();
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("oci");
        let (out, doc) = build(
            &k,
            self.needs.path(),
            &[
                "--cache-from",
                cache,
                "-o",
                &format!("type=oci,dest={}", layout.display()),
            ],
            &Access::default(),
        );
        assert_success(&out);
        assert!(stderr(&out).contains(warning), "{}", stderr(&out));
        assert_eq!(step(&doc, rebuilt)["cached"], "no", "{doc:#}");
        let (_d, rootfs) = unpack(&layout);
        assert_eq!(read(&rootfs, "out.copy"), "one\nhello\n");
    }
}

const RUN_LINE: &str = "RUN cat /app/x > /out && echo $GREETING >> /out";

#[test]
fn unreadable_caches_and_records_are_warnings() {
    let h = Hostile::new();
    let host = h.reg.host();
    // A ref nothing was exported to.
    h.check(
        &format!("{host}/c:missing"),
        "ignored: not found",
        "COPY app /app",
    );
    // Records that are not JSON; a digest that is a path.
    let (_, bytes, _) = test_client()
        .get_manifest(&Reference::parse(&h.good).unwrap())
        .unwrap();
    let mut manifest: Value = serde_json::from_slice(&bytes).unwrap();
    push_raw_cache(
        &format!("{host}/c:notjson"),
        &mut manifest,
        b"{\"records\": [",
    );
    h.check(
        &format!("{host}/c:notjson"),
        "ignored: invalid records",
        "COPY app /app",
    );
    push_edited_cache(&h.good, &format!("{host}/c:path"), |c| {
        c["records"][0]["key"] = "sha256:../../../etc/passwd".into();
    });
    h.check(
        &format!("{host}/c:path"),
        "ignored: invalid records",
        "COPY app /app",
    );
    // A record naming a layer the cache does not list.
    push_edited_cache(&h.good, &format!("{host}/c:foreign"), |c| {
        let r = record_of(c, &h.doc, "COPY app /app");
        r["layer"]["digest"] = Digest::of(b"elsewhere").to_string().into();
    });
    h.check(
        &format!("{host}/c:foreign"),
        "which the cache does not list",
        "COPY app /app",
    );
}

#[test]
fn bad_layers_are_found_out_and_their_steps_rebuilt() {
    let h = Hostile::new();
    let host = h.reg.host();
    // A record whose layer says it unpacks to something else: found out when a step needs
    // the files, and the build runs again without it.
    push_edited_cache(&h.good, &format!("{host}/c:liar"), |c| {
        let r = record_of(c, &h.doc, "COPY app /app");
        r["layer"]["diffID"] = Digest::of(b"a lie").to_string().into();
    });
    h.check(
        &format!("{host}/c:liar"),
        "building again without it",
        "COPY app /app",
    );

    // A layer blob gone from the cache's repository (a registry GC, a partial delete).
    let run_layer = step(&h.doc, RUN_LINE)["layer"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = ureq::delete(&format!("http://{host}/v2/c/blobs/{run_layer}"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    h.check(&h.good, "is not in the registry", RUN_LINE);

    // Layer bytes that do not match their digest on the way (a broken proxy or mirror).
    let layers: Vec<String> = layer_steps(&h.doc)
        .iter()
        .filter_map(|s| s["layer"].as_str().map(str::to_string))
        .collect();
    let proxy = Proxy::start(
        h.reg.port,
        Box::new(move |_, req| {
            if req.line.starts_with("GET ") && layers.iter().any(|l| req.line.contains(l)) {
                Action::Corrupt
            } else {
                Action::Forward
            }
        }),
    );
    h.check(
        &format!("{}/c:good", proxy.host()),
        "building again without it",
        "COPY app /app",
    );
}

#[test]
fn a_failed_export_is_a_warning_unless_errors_are_not_ignored() {
    let nowhere = format!("127.0.0.1:{}/c:x", free_port());
    let ctx = context(RECIPE, FILES);
    let k = Kiln::new();
    let access = Access::default();
    let (out, _) = build(
        &k,
        ctx.path(),
        &["--cache-to", &format!("type=registry,ref={nowhere}")],
        &access,
    );
    assert_success(&out);
    assert!(
        stderr(&out).contains("WARNING: exporting the build cache to"),
        "{}",
        stderr(&out)
    );
    let (out, _) = build(
        &k,
        ctx.path(),
        &[
            "--cache-to",
            &format!("type=registry,ref={nowhere},ignore-error=false"),
        ],
        &access,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("error: cannot reach"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn two_runners_exporting_to_one_ref_at_once_leave_a_valid_cache() {
    let reg = Registry::start();
    let cache = format!("{}/shared/cache:main", reg.host());
    let access = Access::default();
    let ctx = context(RECIPE, FILES);
    let runners: Vec<Kiln> = (0..2).map(|_| Kiln::new()).collect();
    let children: Vec<_> = runners
        .iter()
        .map(|k| {
            kiln_cmd(
                k,
                &[
                    "build",
                    "-q",
                    "--cache-to",
                    &format!("type=registry,ref={cache},mode=max,ignore-error=false"),
                    ctx.path().to_str().unwrap(),
                ],
                &access,
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
    // Whichever export came last, the ref holds a complete cache.
    let c = Kiln::new();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("oci");
    let doc = build_ok(
        &c,
        ctx.path(),
        &[
            "--cache-from",
            &cache,
            "-o",
            &format!("type=oci,dest={}", layout.display()),
        ],
        &access,
    );
    let name = Reference::parse(&cache).unwrap().to_string();
    for s in layer_steps(&doc) {
        assert_eq!(s["cached"], name.as_str(), "{s}");
    }
    let (_d, rootfs) = unpack(&layout);
    assert_eq!(read(&rootfs, "srv/tool"), "tool\n");
}

/// Builds with `env` (see [`build_env`]) and asserts success; returns the metadata document.
fn build_env_ok(k: &Kiln, ctx: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> Value {
    let (out, doc) = build_env(k, ctx, args, &Access::default(), env);
    assert_success(&out);
    doc
}

/// Asserts that every layer step of `doc` has this cache state and, for a rebuilt one, this
/// reason.
fn assert_steps(doc: &Value, cached: &str, reason: Option<&str>) {
    let steps = layer_steps(doc);
    assert!(!steps.is_empty());
    for s in steps {
        assert_eq!(s["cached"], cached, "{s}");
        if let Some(reason) = reason {
            assert_eq!(s["reason"], reason, "{s}");
        }
    }
}

/// Layers clamp file times to SOURCE_DATE_EPOCH, so a layer made with one epoch (or none) is
/// never reused by a build with another: every kind of step is keyed on it, however the epoch
/// is given (flag, build arg, environment). `--verify` found it: a build with an epoch reused
/// the layers of a build without one, and its second, uncached build differed in mtimes.
#[test]
fn every_step_is_keyed_on_source_date_epoch() {
    let recipe = "\
FROM busybox
RUN echo hi > /f
COPY a /a
COPY --link b /b
WORKDIR /w
ADD c /c
";
    let ctx = context(recipe, &[("a", b"a\n"), ("b", b"b\n"), ("c", b"c\n")]);
    let k = Kiln::new();
    let unset = [("SOURCE_DATE_EPOCH", None)];
    let none = build_env_ok(&k, ctx.path(), &[], &unset);
    assert_steps(&none, "no", None);
    assert_eq!(layer_steps(&none).len(), 5);

    // The fresh build of --verify must find what the first one made: so the first may not
    // take the layers made without an epoch.
    let zero = build_env_ok(
        &k,
        ctx.path(),
        &["--verify", "--source-date-epoch", "0"],
        &unset,
    );
    assert_steps(&zero, "no", Some("SOURCE_DATE_EPOCH changed (unset -> 0)"));
    let id = |doc: &Value| doc["containerimage.config.digest"].clone();
    assert_ne!(id(&none), id(&zero));

    // Each build finds its own records again.
    let again = build_env_ok(&k, ctx.path(), &[], &unset);
    assert_steps(&again, "local", None);
    assert_eq!(id(&again), id(&none));
    for (args, env) in [
        (&["--source-date-epoch", "0"][..], None),
        (&["--build-arg", "SOURCE_DATE_EPOCH=0"][..], None),
        (&[][..], Some("0")),
    ] {
        let doc = build_env_ok(&k, ctx.path(), args, &[("SOURCE_DATE_EPOCH", env)]);
        assert_steps(&doc, "local", None);
        assert_eq!(id(&doc), id(&zero), "{args:?} {env:?}");
    }
    let five = build_env_ok(&k, ctx.path(), &["--source-date-epoch", "5"], &unset);
    assert_steps(&five, "no", Some("SOURCE_DATE_EPOCH changed (0 -> 5)"));
}

/// fuse-overlayfs keeps hardlinks of earlier layers whole, so a step writing through such a
/// link gets other layer bytes than under the kernel's overlayfs: its results are keyed apart.
/// The copying snapshotter writes overlayfs's layers and shares its keys.
#[test]
fn fuse_overlayfs_layers_are_keyed_apart_from_overlayfs_ones() {
    let recipe = "\
FROM busybox
RUN echo x > /x && ln /x /x2 && ln /x /x3 && echo y > /y && ln /y /y2
RUN rm /x2 && ln /x /x4 && echo more >> /y
RUN echo again > /x3 && ln /y2 /y3
";
    let ctx = context(recipe, &[]);
    let epoch = ["--source-date-epoch", "0"];
    let with = |k: &Kiln, snapshotter: &str| {
        build_env_ok(
            k,
            ctx.path(),
            &epoch,
            &[("KILN_SNAPSHOTTER", Some(snapshotter))],
        )
    };
    let id = |doc: &Value| doc["containerimage.config.digest"].clone();
    let fresh_fuse = with(&Kiln::new(), "fuse-overlayfs");

    let k = Kiln::new();
    let overlay = with(&k, "overlay");
    assert_steps(&overlay, "no", None);
    assert_ne!(id(&overlay), id(&fresh_fuse), "the layers differ");
    let copy = with(&k, "copy");
    assert_steps(&copy, "local", None);
    assert_eq!(id(&copy), id(&overlay));
    let fuse = with(&k, "fuse-overlayfs");
    let why = "snapshotter layers changed (overlay -> fuse-overlayfs)";
    assert_eq!(step(&fuse, recipe.lines().nth(1).unwrap())["reason"], why);
    assert_steps(&fuse, "no", None);
    assert_eq!(id(&fuse), id(&fresh_fuse));
}

/// Steps whose cache keys name another stage's files or the stage below without reading them:
/// a `COPY --link` (what it takes from the stage below), binds and a seeded cache `from=` a
/// stage, and a bind of the context.
const MOUNTS: &str = "\
FROM busybox AS build
RUN mkdir /o && echo built > /o/out
FROM busybox
RUN mkdir -p /app && echo base > /app/base
COPY --link a /app/
RUN --mount=type=bind,from=build,source=/o,target=/in cat /in/out > /from-bind
RUN --mount=type=cache,from=build,source=/o,target=/seed,id=seeded cat /seed/out > /from-cache
RUN --mount=type=bind,target=/ctx cat /ctx/a /app/base > /from-context
";

/// Lazy layers: a fresh store whose build hits every step in a registry cache downloads no
/// layer, even where a step's key involves another stage's files or the stage below (a linked
/// copy, mounts `from=`); a step that runs later fetches what it needs and sees it.
#[test]
fn an_all_hit_build_with_linked_copies_and_mounts_downloads_no_layer() {
    let reg = Registry::start();
    let cache = format!("{}/c:mounts", reg.host());
    let ctx = context(MOUNTS, &[("a", b"a\n")]);
    let doc_a = build_ok(
        &Kiln::new(),
        ctx.path(),
        &["--cache-to", &format!("type=registry,ref={cache},mode=max")],
        &Access::default(),
    );
    assert_eq!(layer_steps(&doc_a).len(), 6);

    // Runner B reads the cache through a proxy that counts the layer downloads.
    let proxy = Proxy::start(reg.port, Box::new(|_, _| Action::Forward));
    let through_proxy = format!("{}/c:mounts", proxy.host());
    let b = Kiln::new();
    let doc_b = build_ok(
        &b,
        ctx.path(),
        &["--cache-from", &through_proxy],
        &Access::default(),
    );
    let name = Reference::parse(&through_proxy).unwrap().to_string();
    assert_steps(&doc_b, &name, None);
    assert_eq!(
        doc_b["containerimage.config.digest"],
        doc_a["containerimage.config.digest"]
    );
    let layers: Vec<String> = layer_steps(&doc_b)
        .iter()
        .filter_map(|s| s["layer"].as_str().map(str::to_string))
        .collect();
    assert_eq!(layers.len(), 6);
    let store = Store::open(b.root.path()).unwrap();
    let fetched: Vec<String> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.line.starts_with("GET ") && layers.iter().any(|l| r.line.contains(l)))
        .map(|r| r.line)
        .collect();
    assert!(fetched.is_empty(), "layers downloaded: {fetched:?}");
    for l in &layers {
        let d: Digest = l.parse().unwrap();
        assert!(!store.has_blob(&d), "{d} was downloaded");
        assert!(store.blob_origin(&d).is_some(), "{d} is not promised");
    }
    drop(store);

    // What B exports carries the linked copy's own record too (found by the copy's inputs
    // whatever lies below), though B found the copy by its alias: a build on another base
    // still takes the copy's layer.
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    build_ok(
        &b,
        ctx.path(),
        &[
            "--cache-from",
            &through_proxy,
            "--cache-to",
            &format!("type=local,dest={},mode=max", dir.display()),
        ],
        &Access::default(),
    );
    let rebased = context(
        &MOUNTS.replace("echo base >", "echo other base >"),
        &[("a", b"a\n")],
    );
    let doc = build_ok(
        &Kiln::new(),
        rebased.path(),
        &["--cache-from", &format!("type=local,src={}", dir.display())],
        &Access::default(),
    );
    let copy = step(&doc, "COPY --link a /app/");
    assert_eq!(copy["cached"], dir.to_str().unwrap());
    assert_eq!(copy["layer"], step(&doc_a, "COPY --link a /app/")["layer"]);

    // A changed context file: the linked copy and the steps after it run, on the layers they
    // need, now fetched.
    std::fs::write(ctx.path().join("a"), "changed\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("files");
    let doc = build_ok(
        &b,
        ctx.path(),
        &["--cache-from", &through_proxy, "-o", dest.to_str().unwrap()],
        &Access::default(),
    );
    assert_eq!(step(&doc, "COPY --link a /app/")["cached"], "no");
    for (file, content) in [
        ("from-bind", "built\n"),
        ("from-cache", "built\n"),
        ("from-context", "changed\nbase\n"),
        ("app/a", "changed\n"),
    ] {
        assert_eq!(read(&dest, file), content, "{file}");
    }
}
