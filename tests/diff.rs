//! `kiln diff`: two images written by hand as OCI layouts (every kind of difference a layer can
//! have) compared as layouts and as archives against golden files under `testdata/diff/`;
//! images in the store and in a registry; names that find nothing.
//! `UPDATE_GOLDEN=1 cargo test --test diff` rewrites the golden files.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::registry::Registry;
use common::*;
use kiln::digest::Digest;
use kiln::image::{self, Descriptor, Index, Manifest};

/// One tar entry of a hand-made layer.
struct E {
    path: &'static str,
    kind: tar::EntryType,
    mode: u32,
    owner: (u64, u64),
    mtime: u64,
    content: &'static [u8],
    link: Option<&'static str>,
    xattrs: &'static [(&'static str, &'static [u8])],
}

fn file(path: &'static str, content: &'static [u8]) -> E {
    E {
        path,
        kind: tar::EntryType::Regular,
        mode: 0o644,
        owner: (0, 0),
        mtime: 1_000,
        content,
        link: None,
        xattrs: &[],
    }
}

fn dir(path: &'static str) -> E {
    E {
        kind: tar::EntryType::Directory,
        mode: 0o755,
        ..file(path, b"")
    }
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.owner.0);
        h.set_gid(e.owner.1);
        h.set_mtime(e.mtime);
        h.set_size(e.content.len() as u64);
        if let Some(l) = e.link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, e.path, e.content).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Writes an OCI layout at `dir` holding one image: `layers` are (tar, gzip level, created_by).
fn write_layout(dir: &Path, config: serde_json::Value, layers: &[(Vec<u8>, u32, &str)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        (d, bytes.len() as u64)
    };
    let mut config = config;
    let mut descs = Vec::new();
    for (tar, level, created_by) in layers {
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(Digest::of(tar).to_string().into());
        config["history"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"created_by": created_by}));
        let (d, n) = put(&gzip(tar, *level));
        descs.push(Descriptor::new(image::MEDIA_LAYER_GZIP, d, n));
    }
    let (cd, cn) = put(&image::canonical_json(&config));
    let manifest = Manifest {
        config: Descriptor::new(image::MEDIA_CONFIG, cd, cn),
        layers: descs,
        annotations: Default::default(),
    };
    let (md, mn) = put(&image::canonical_json(&manifest));
    let mut entry = Descriptor::new(image::MEDIA_MANIFEST, md, mn);
    entry
        .annotations
        .insert(image::ANNOTATION_REF_NAME.into(), "latest".into());
    let index = Index {
        manifests: vec![entry],
        annotations: Default::default(),
    };
    std::fs::write(dir.join("index.json"), image::canonical_json(&index)).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn config(env: &[&str], labels: serde_json::Value, created: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"Env": env, "Labels": labels, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    })
}

/// Two images differing in every way a layer can differ, as layouts `a` and `b` in `dir`.
fn make_pair(out: &Path) {
    let base = tar_of(&[dir("etc"), file("etc/os-release", b"ID=kiln\n")]);
    let app_a = tar_of(&[
        dir("app"),
        file("app/main.sh", b"#!/bin/sh\necho hello world\n"),
        file("app/old.txt", b"gone in b\n"),
        E {
            mode: 0o600,
            ..file("app/secret", b"s")
        },
        E {
            owner: (0, 0),
            ..file("app/owned", b"o")
        },
        E {
            mtime: 1_000,
            ..file("app/stamp", b"t")
        },
        E {
            xattrs: &[("user.origin", b"a")],
            ..file("app/tagged", b"x")
        },
        E {
            kind: tar::EntryType::Symlink,
            link: Some("main.sh"),
            ..file("app/run", b"")
        },
    ]);
    let app_b = tar_of(&[
        dir("app"),
        file("app/main.sh", b"#!/bin/sh\necho hello kiln!\n"),
        file("app/new.txt", b"only in b\n"),
        E {
            mode: 0o640,
            ..file("app/secret", b"s")
        },
        E {
            owner: (1000, 1000),
            ..file("app/owned", b"o")
        },
        E {
            mtime: 2_000,
            ..file("app/stamp", b"t")
        },
        E {
            xattrs: &[("user.origin", b"b"), ("security.capability", b"\x01\x00")],
            ..file("app/tagged", b"x")
        },
        E {
            kind: tar::EntryType::Symlink,
            link: Some("new.txt"),
            ..file("app/run", b"")
        },
    ]);
    let ordered_a = tar_of(&[file("data/1", b"1"), file("data/2", b"2")]);
    let ordered_b = tar_of(&[file("data/2", b"2"), file("data/1", b"1")]);
    let only_a = tar_of(&[file("extra/file", b"e")]);
    let labels_a = serde_json::json!({"org.opencontainers.image.title": "a", "same": "1"});
    let labels_b = serde_json::json!({"org.opencontainers.image.title": "b", "same": "1"});
    write_layout(
        &out.join("a"),
        config(&["PATH=/bin", "MODE=a"], labels_a, "1970-01-01T00:00:00Z"),
        &[
            (base.clone(), 6, "COPY base /"),
            (base.clone(), 6, "COPY base / (same blob)"),
            (app_a, 6, "COPY app /app"),
            (ordered_a, 6, "COPY data /data"),
            (only_a, 6, "COPY extra /extra"),
        ],
    );
    write_layout(
        &out.join("b"),
        config(&["PATH=/bin", "MODE=b"], labels_b, "2024-01-01T00:00:00Z"),
        &[
            (base.clone(), 6, "COPY base /"),
            (base, 1, "COPY base / (same blob)"),
            (app_b, 6, "COPY app /app"),
            (ordered_b, 6, "COPY data /data"),
        ],
    );
}

fn diff_in(dir: &Path, args: &[&str]) -> std::process::Output {
    let store = tempfile::tempdir().unwrap();
    Command::new(kiln_bin())
        .arg("--root")
        .arg(store.path())
        .arg("diff")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn check_golden(name: &str, got: &[u8]) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/diff")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, got).unwrap();
        return;
    }
    let want = std::fs::read(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
    assert_eq!(
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(&want),
        "{name} differs from its golden file"
    );
}

#[test]
fn layouts_and_archives_match_the_golden_files() {
    let tmp = tempfile::tempdir().unwrap();
    make_pair(tmp.path());
    let text = diff_in(tmp.path(), &["a", "b"]);
    assert_eq!(text.status.code(), Some(1), "{}", stderr(&text));
    check_golden("text.txt", &text.stdout);
    let json = diff_in(tmp.path(), &["a", "b", "--format", "json"]);
    assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
    check_golden("diff.json", &json.stdout);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["identical"], false);

    // The same images as an OCI archive (a tar of the layout) and a gzipped one: the same
    // report, only the names differ.
    for (name, gz) in [("a.tar", false), ("b.tar.gz", true)] {
        let src = tmp.path().join(&name[..1]);
        let mut t = tar::Builder::new(Vec::new());
        t.append_dir_all(".", &src).unwrap();
        let bytes = t.into_inner().unwrap();
        let bytes = if gz { gzip(&bytes, 6) } else { bytes };
        std::fs::write(tmp.path().join(name), bytes).unwrap();
    }
    let archives = diff_in(tmp.path(), &["a.tar", "b.tar.gz"]);
    assert_eq!(archives.status.code(), Some(1), "{}", stderr(&archives));
    let renamed = String::from_utf8_lossy(&text.stdout)
        .replace("--- a\n", "--- a.tar\n")
        .replace("+++ b\n", "+++ b.tar.gz\n");
    assert_eq!(String::from_utf8_lossy(&archives.stdout), renamed);

    // An image compared with itself is identical, exit 0.
    let same = diff_in(tmp.path(), &["a", "a.tar"]);
    assert_eq!(same.status.code(), Some(0), "{}", stderr(&same));
    assert!(
        String::from_utf8_lossy(&same.stdout).contains("identical"),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
}

#[test]
fn store_names_registry_refs_and_missing_images() {
    let k = Kiln::new();
    k.build_ok(
        "FROM busybox\nRUN echo one > /f && mkdir /d\n",
        &[],
        &["-t", "one", "--source-date-epoch", "0"],
    );
    k.build_ok(
        "FROM busybox\nRUN echo two > /f && mkdir -m 700 /d\n",
        &[],
        &["-t", "two", "--source-date-epoch", "0"],
    );
    let out = k.run(&["diff", "one", "two"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("~ f: content differs at byte 0 (4 bytes, sha256:"),
        "{text}"
    );
    assert!(text.contains("~ d: mode 0755 -> 0700"), "{text}");
    // The base layers are the same and not listed.
    assert!(!text.contains("layer 1 "), "{text}");

    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/diff/one:1", registry.port);
    assert_success(&k.run(&["push", "one", &reference]));
    let images_before = String::from_utf8_lossy(&k.run(&["images"]).stdout).into_owned();
    let from_registry = k.run(&["diff", &reference, "two", "--format", "json"]);
    assert_eq!(from_registry.status.code(), Some(1));
    let theirs: serde_json::Value = serde_json::from_slice(&from_registry.stdout).unwrap();
    let ours: serde_json::Value =
        serde_json::from_slice(&k.run(&["diff", "one", "two", "--format", "json"]).stdout).unwrap();
    assert_eq!(theirs["layers"], ours["layers"]);
    let same = k.run(&["diff", "one", &reference]);
    assert_eq!(same.status.code(), Some(0), "{}", stderr(&same));
    // Pulling for a comparison leaves the local store as it was.
    assert_eq!(
        String::from_utf8_lossy(&k.run(&["images"]).stdout),
        images_before
    );

    let nowhere = format!("127.0.0.1:{}/no/such:image", registry.port);
    let missing = k.run(&["diff", "one", &nowhere]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains(&nowhere), "{}", stderr(&missing));
    let bad = k.run(&["diff", "one", "Not A Name"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("Not A Name"), "{}", stderr(&bad));
}
