//! Attestations: an SBOM of a Debian-like image validates against SPDX 2.3's JSON schema and
//! lists its dpkg packages; the provenance validates as an in-toto statement with a SLSA v1
//! predicate and names the base image by digest, never a build-arg value; umoci and skopeo
//! read the image; a registry round trip keeps the attestations; the index digest is
//! reproducible and `--verify` passes with attestations on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::Registry;
use common::*;
use serde_json::Value;

const STATUS: &str = "Package: libfoo1\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\nVersion: 1.2-3\nMaintainer: Foo Maintainers <foo@example.org>\nDescription: foo library\n shared objects\nHomepage: https://foo.example.org\n\nPackage: bar-utils\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:2.3-4+deb12u1\nDescription: bar tools\n\nPackage: baz\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 9\n";
const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: foo\n\nFiles: *\nCopyright: 2024 Foo\nLicense: MIT\n\nFiles: debian/*\nLicense: GPL-2+\n";
const RECIPE: &str = "FROM busybox\nCOPY status /var/lib/dpkg/status\nCOPY os-release /etc/os-release\nCOPY copyright /usr/share/doc/libfoo1/copyright\nARG TOKEN\nRUN echo app > /app.txt\n";

fn files() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("status", STATUS.as_bytes()),
        (
            "os-release",
            b"PRETTY_NAME=\"Debian GNU/Linux 12\"\nID=debian\nVERSION_ID=\"12\"\n",
        ),
        ("copyright", COPYRIGHT.as_bytes()),
    ]
}

fn schema(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/attest")
        .join(name)
}

/// Validates `doc` against a JSON schema with Python's jsonschema; panics with its message.
fn validate(doc: &Value, schema: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doc.json");
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1]))\n\
             doc = json.load(open(sys.argv[2]))\n\
             jsonschema.validators.validator_for(schema)(schema).validate(doc)\n\
             print('valid')",
        ])
        .arg(schema)
        .arg(&path)
        .output()
        .expect("python3 with the jsonschema package (test.sh installs python3-jsonschema)");
    assert!(
        out.status.success(),
        "{} does not validate against {}:\n{}",
        doc.to_string().chars().take(300).collect::<String>(),
        schema.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The statements attached in an OCI layout: (image manifest digest, predicate type →
/// statement), checking the attestation manifest's shape on the way.
fn attestations(layout: &Path) -> (String, Vec<(String, Value)>) {
    let index = oci_index(layout);
    let entries = index["manifests"].as_array().unwrap();
    let image = entries
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"].is_string())
        .expect("a named image entry");
    let att = entries
        .iter()
        .find(|e| e["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .expect("an attestation manifest entry");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        image["digest"]
    );
    assert_eq!(att["platform"]["os"], "unknown");
    assert_eq!(att["platform"]["architecture"], "unknown");
    let manifest = oci_json(layout, att["digest"].as_str().unwrap());
    let config = oci_json(layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["os"], "unknown");
    let mut out = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], "application/vnd.in-toto+json");
        let kind = l["annotations"]["in-toto.io/predicate-type"]
            .as_str()
            .unwrap()
            .to_string();
        let statement = oci_json(layout, l["digest"].as_str().unwrap());
        assert_eq!(statement["predicateType"], kind.as_str());
        assert_eq!(
            statement["subject"][0]["digest"]["sha256"]
                .as_str()
                .map(|h| format!("sha256:{h}")),
            image["digest"].as_str().map(str::to_string)
        );
        out.push((kind, statement));
    }
    (image["digest"].as_str().unwrap().to_string(), out)
}

#[test]
fn sbom_and_provenance_of_a_debian_like_image() {
    let k = Kiln::new();
    let out_dir = tempfile::tempdir().unwrap();
    let layout = out_dir.path().join("oci");
    let output = format!("type=oci,dest={}", layout.display());
    let archive = out_dir.path().join("docker.tar");
    let docker_output = format!("type=docker-archive,dest={}", archive.display());
    let id = k.build_ok(
        RECIPE,
        &files(),
        &[
            "--sbom",
            "--attest",
            "type=provenance,mode=max",
            "--source-date-epoch",
            "0",
            "--build-arg",
            "TOKEN=s3cr3t-value",
            "-t",
            "deb:1",
            "-o",
            &output,
            "-o",
            &docker_output,
        ],
    );
    assert!(id.starts_with("sha256:"));
    let (image_digest, statements) = attestations(&layout);
    let kinds: Vec<&str> = statements.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "https://slsa.dev/provenance/v1",
            "https://spdx.dev/Document"
        ]
    );
    for (_, st) in &statements {
        validate(st, &schema("in-toto-statement-v1.json"));
        assert!(
            !st.to_string().contains("s3cr3t-value"),
            "a build-arg value leaked"
        );
    }

    // SBOM: valid SPDX 2.3, the installed dpkg packages with versions, licences and purls.
    let sbom = &statements[1].1["predicate"];
    validate(sbom, &schema("spdx-schema-2.3.json"));
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    let packages = sbom["packages"].as_array().unwrap();
    let find = |name: &str| packages.iter().find(|p| p["name"] == name);
    let foo = find("libfoo1").expect("libfoo1 listed");
    assert_eq!(foo["versionInfo"], "1.2-3");
    assert_eq!(foo["licenseDeclared"], "MIT AND GPL-2.0-or-later");
    assert_eq!(
        foo["externalRefs"][0]["referenceLocator"],
        "pkg:deb/debian/libfoo1@1.2-3?arch=amd64&distro=debian-12"
    );
    let bar = find("bar-utils").expect("bar-utils listed");
    assert_eq!(bar["versionInfo"], "1:2.3-4+deb12u1");
    assert_eq!(
        bar["externalRefs"][0]["referenceLocator"],
        "pkg:deb/debian/bar-utils@1%3A2.3-4%2Bdeb12u1?arch=amd64&distro=debian-12"
    );
    assert_eq!(bar["licenseDeclared"], "NOASSERTION");
    assert!(find("baz").is_none(), "a removed package is listed");
    let image_pkg = find("docker.io/library/deb:1").expect("the image itself");
    assert_eq!(image_pkg["primaryPackagePurpose"], "CONTAINER");
    // The files each layer adds, with their SHA-256 and layer.
    let app = sbom["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fileName"] == "/app.txt")
        .expect("/app.txt listed");
    assert_eq!(
        app["checksums"][0]["checksumValue"],
        kiln::digest::Digest::of(b"app\n").hex()
    );
    assert!(
        app["comment"]
            .as_str()
            .unwrap()
            .starts_with("layerID: sha256:")
    );
    assert!(
        sbom["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["fileName"] == "/bin/busybox"),
        "the base layer's files"
    );

    // Provenance: SLSA v1, the base image by digest, build args without values, the steps.
    let provenance = &statements[0].1["predicate"];
    validate(provenance, &schema("slsa-provenance-v1.json"));
    let busybox = oci_ref_digest(k.root.path(), "docker.io/library/busybox:latest");
    let deps = provenance["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    let base = deps
        .iter()
        .find(|d| d["uri"] == "docker-image://docker.io/library/busybox:latest")
        .expect("the base image among the dependencies");
    assert_eq!(
        format!("sha256:{}", base["digest"]["sha256"].as_str().unwrap()),
        busybox
    );
    let recipe = deps.iter().find(|d| d["name"] == "recipe").unwrap();
    assert_eq!(
        recipe["digest"]["sha256"],
        kiln::digest::Digest::of(RECIPE.as_bytes()).hex()
    );
    let params = &provenance["buildDefinition"]["externalParameters"];
    assert_eq!(
        params["buildArgs"]["TOKEN"]["sha256"],
        kiln::digest::Digest::of(b"s3cr3t-value").hex()
    );
    assert!(params["context"]["digest"]["sha256"].is_string());
    let steps = provenance["buildDefinition"]["internalParameters"]["steps"]
        .as_array()
        .unwrap();
    assert_eq!(steps.len(), 5, "{steps:?}");
    assert_eq!(steps[4]["instruction"], "RUN echo app > /app.txt");
    assert_eq!(steps[4]["cache"], "miss");
    assert!(steps[4]["layer"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(steps[3]["cache"], "none");
    assert_eq!(provenance["runDetails"]["metadata"], serde_json::json!({}));
    assert_eq!(
        provenance["runDetails"]["builder"]["version"]["kiln"],
        env!("CARGO_PKG_VERSION")
    );

    // Real consumers still read the image.
    let bundle = out_dir.path().join("bundle");
    let rootfs = umoci_unpack(&layout, "1", &bundle);
    assert_eq!(std::fs::read(rootfs.join("app.txt")).unwrap(), b"app\n");
    let inspected = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:1", layout.display())])
        .output()
        .unwrap();
    assert_success(&inspected);
    let inspected: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(inspected["Digest"], image_digest.as_str());
    // A docker-archive holds the image alone (the format has no place for attestations).
    let loaded = Command::new("skopeo")
        .args(["inspect", &format!("docker-archive:{}", archive.display())])
        .output()
        .unwrap();
    assert_success(&loaded);

    // Same inputs and SOURCE_DATE_EPOCH in another store: the same index digest.
    let other = Kiln::new();
    let again = other.build_ok(
        RECIPE,
        &files(),
        &[
            "--sbom",
            "--attest",
            "type=provenance,mode=max",
            "--source-date-epoch",
            "0",
            "--build-arg",
            "TOKEN=s3cr3t-value",
            "-t",
            "deb:1",
        ],
    );
    assert_eq!(again, id);
}

#[test]
fn registry_round_trip_keeps_the_attestations_and_verify_passes() {
    let k = Kiln::new();
    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/attest/app:1", registry.port);
    let (out, _ctx) = k.build(
        RECIPE,
        &files(),
        &[
            "--provenance=mode=min",
            "--sbom=true",
            "--source-date-epoch",
            "1700000000",
            "--verify",
            "-t",
            &reference,
            "--push",
        ],
    );
    assert_success(&out);
    assert!(
        stderr(&out).contains("verify: reproducible"),
        "{}",
        stderr(&out)
    );
    let index_digest = stdout_line(&out);

    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert_success(&raw);
    assert_eq!(
        kiln::digest::Digest::of(&raw.stdout).to_string(),
        index_digest,
        "the registry serves another index"
    );
    let index: Value = serde_json::from_slice(&raw.stdout).unwrap();
    let att = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .expect("the pushed index lists the attestation manifest")
        .clone();

    // Everything the index names can be fetched back: copy it all into a layout.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy");
    let copied = Command::new("skopeo")
        .args(["copy", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", copy.display()))
        .output()
        .unwrap();
    assert_success(&copied);
    let manifest = oci_json(&copy, att["digest"].as_str().unwrap());
    let kinds: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "https://slsa.dev/provenance/v1",
            "https://spdx.dev/Document"
        ]
    );

    // kiln pulls the image for this platform and compares it with the local one: identical.
    let same = k.run(&[
        "diff",
        &reference,
        &reference.replace("127.0.0.1", "localhost"),
    ]);
    assert_eq!(same.status.code(), Some(0), "{}", stderr(&same));
}

/// The provenance predicate attached to each image of a multi-platform layout, by architecture.
fn provenance_by_arch(layout: &Path) -> Vec<(String, Value)> {
    let top = oci_index(layout);
    let index = oci_json(layout, top["manifests"][0]["digest"].as_str().unwrap());
    let entries = index["manifests"].as_array().unwrap();
    entries
        .iter()
        .filter(|e| e["platform"]["architecture"] != "unknown")
        .map(|image| {
            let att = entries
                .iter()
                .find(|e| e["annotations"]["vnd.docker.reference.digest"] == image["digest"])
                .expect("an attestation manifest for each image");
            let manifest = oci_json(layout, att["digest"].as_str().unwrap());
            let statement = oci_json(layout, manifest["layers"][0]["digest"].as_str().unwrap());
            assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
            let arch = image["platform"]["architecture"]
                .as_str()
                .unwrap()
                .to_string();
            (arch, statement["predicate"].clone())
        })
        .collect()
}

/// The manifest digest of `arch`'s image in the index `name` names in a store.
fn platform_digest(root: &Path, name: &str, arch: &str) -> String {
    let index = oci_json(root, &oci_ref_digest(root, name));
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["platform"]["architecture"] == arch)
        .and_then(|e| e["digest"].as_str())
        .unwrap()
        .to_string()
}

#[test]
fn each_platform_has_its_own_provenance_and_a_two_platform_build_verifies() {
    let k = Kiln::multiarch();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let (out, _ctx) = k.build(
        "FROM busybox\nARG TARGETARCH\nRUN echo $TARGETARCH > /arch\nENV A=1\n",
        &[],
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--provenance=mode=max",
            "--source-date-epoch",
            "0",
            "--verify",
            "-o",
            &format!("type=oci,dest={}", layout.display()),
        ],
    );
    assert_success(&out);
    assert!(
        stderr(&out).contains("verify: reproducible"),
        "{}",
        stderr(&out)
    );
    let predicates = provenance_by_arch(&layout);
    assert_eq!(predicates.len(), 2);
    for (arch, p) in &predicates {
        validate(p, &schema("slsa-provenance-v1.json"));
        let platform = format!("linux/{arch}");
        assert_eq!(
            p["buildDefinition"]["externalParameters"]["platform"],
            platform.as_str()
        );
        // The base image read for this platform, not the other's.
        let base = p["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["uri"] == "docker-image://docker.io/library/busybox:latest")
            .expect("the base image among the dependencies");
        assert_eq!(
            format!("sha256:{}", base["digest"]["sha256"].as_str().unwrap()),
            platform_digest(k.root.path(), "docker.io/library/busybox:latest", arch),
            "{arch}"
        );
        // This platform's steps only.
        let steps = p["buildDefinition"]["internalParameters"]["steps"]
            .as_array()
            .unwrap();
        let cache: Vec<&str> = steps.iter().map(|s| s["cache"].as_str().unwrap()).collect();
        assert_eq!(cache, ["none", "miss", "none"], "{arch}: {steps:?}");
        for s in steps {
            assert_eq!(s["stage"], format!("{platform} stage-0").as_str(), "{s}");
        }
        assert!(steps[1]["layer"].as_str().unwrap().starts_with("sha256:"));
    }
    assert_ne!(
        predicates[0].1["buildDefinition"]["internalParameters"]["steps"][1]["layer"],
        predicates[1].1["buildDefinition"]["internalParameters"]["steps"][1]["layer"]
    );
}

#[test]
fn shared_cache_hits_are_hits_in_the_provenance_and_verify_rebuilds_them() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let exporter = Kiln::new();
    exporter.build_ok(
        RECIPE,
        &files(),
        &[
            "--source-date-epoch",
            "0",
            "--cache-to",
            &format!("type=local,dest={}", cache.display()),
        ],
    );
    // Another store: every step from that cache, then a second build from nothing.
    let k = Kiln::new();
    let layout = dir.path().join("oci");
    let meta = dir.path().join("meta.json");
    let (out, _ctx) = k.build(
        RECIPE,
        &files(),
        &[
            "--source-date-epoch",
            "0",
            "--cache-from",
            &format!("type=local,src={}", cache.display()),
            "--provenance=mode=max",
            "--verify",
            "--metadata-file",
            meta.to_str().unwrap(),
            "-t",
            "deb:1",
            "-o",
            &format!("type=oci,dest={}", layout.display()),
        ],
    );
    assert_success(&out);
    let err = stderr(&out);
    assert!(
        err.contains("verify: reproducible")
            && err.contains("but for the provenance's cache states"),
        "{err}"
    );
    // The first build takes the three COPY and the RUN from the cache (ARG runs: it is
    // metadata); the second runs them all.
    assert!(err.contains(": 1 steps run, 4 from cache"), "{err}");
    assert!(
        err.contains(": 5 steps run, 0 from cache"),
        "the second build took the shared cache's layers: {err}"
    );
    let (_, statements) = attestations(&layout);
    let steps = statements[0].1["predicate"]["buildDefinition"]["internalParameters"]["steps"]
        .as_array()
        .unwrap()
        .clone();
    let cache_states: Vec<&str> = steps.iter().map(|s| s["cache"].as_str().unwrap()).collect();
    assert_eq!(
        cache_states,
        ["hit", "hit", "hit", "none", "hit"],
        "{steps:?}"
    );
    // The metadata file is the first build's, naming the shared cache the steps came from.
    let doc: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(doc["image.name"], "docker.io/library/deb:1");
    let run = doc["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["instruction"] == steps[4]["instruction"])
        .unwrap();
    assert_eq!(run["layer"], steps[4]["layer"]);
    assert_ne!(run["cached"], "local");
    assert_ne!(run["cached"], "no");
}

#[test]
fn bad_attest_specs_are_usage_errors() {
    let k = Kiln::new();
    for args in [
        &["--attest", "type=nope"][..],
        &["--attest", "type=provenance,mode=most"],
        &["--attest", "provenance"],
        &["--provenance=maybe"],
        &["--sbom=yes"],
    ] {
        let (out, _ctx) = k.build("FROM busybox\n", &[], args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("error: --"), "{}", stderr(&out));
    }
}
