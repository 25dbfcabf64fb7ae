//! Store and image-format integration tests. Images are made locally (a small tar.gz layer
//! written with `tar` + `flate2`); `skopeo` and `umoci` check that what kiln writes is read by
//! other tools. A failing tool fails the test.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use kiln::digest::Digest;
use kiln::image::{
    Descriptor, History, ImageConfig, MEDIA_LAYER_GZIP, Platform, RootFs, RuntimeConfig,
    canonical_json, rfc3339,
};
use kiln::store::{
    FsckProblem, Store, StoreError, StoredImage, StoredRef, export_docker_archive,
    export_oci_archive, export_oci_dir, import,
};

/// A gzip layer holding `files`; returns (compressed bytes, diff_id).
fn layer(files: &[(&str, &[u8])]) -> (Vec<u8>, Digest) {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let diff_id = Digest::of(&tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// The image an import gave (these tests import single images).
fn image_of(item: StoredRef) -> StoredImage {
    match item {
        StoredRef::Image(img) => img,
        StoredRef::Index(x) => panic!("imported an index: {x:?}"),
    }
}

fn config(diff_ids: Vec<Digest>, labels: &[(&str, &str)]) -> ImageConfig {
    let Platform {
        os,
        architecture,
        variant,
        ..
    } = Platform::host();
    ImageConfig {
        created: Some(rfc3339(0)),
        author: None,
        architecture,
        os,
        variant,
        config: RuntimeConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            env: vec!["PATH=/usr/bin:/bin".into()],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
        rootfs: RootFs { diff_ids },
        history: vec![History {
            created: Some(rfc3339(0)),
            created_by: Some("COPY hello.txt /".into()),
            comment: None,
            empty_layer: false,
        }],
    }
}

/// Stores a one-layer image holding `hello.txt` = `content` and tags it `name`.
fn make_image(store: &Store, name: &str, content: &[u8]) -> StoredImage {
    let (gz, diff_id) = layer(&[("hello.txt", content)]);
    let mut w = store.blob_writer().unwrap();
    w.write_all(&gz).unwrap();
    let (digest, size) = w.commit().unwrap();
    let img = store
        .put_image(
            &config(
                vec![diff_id],
                &[("org.example.b", "2"), ("org.example.a", "1")],
            ),
            &[Descriptor::new(MEDIA_LAYER_GZIP, digest, size)],
        )
        .unwrap();
    store.tag(name, &img.manifest).unwrap();
    img
}

/// Runs a command; panics with its stderr unless it succeeds. Returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn skopeo_inspect(target: &str, extra: &[&str]) -> String {
    run(Command::new("skopeo")
        .arg("inspect")
        .args(extra)
        .arg(target))
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn blob_count(root: &Path) -> usize {
    fs::read_dir(root.join("blobs/sha256")).unwrap().count()
}

#[test]
fn skopeo_reads_the_store_root() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img = make_image(&store, "docker.io/library/hello:1", b"hi\n");
    let target = format!("oci:{}:docker.io/library/hello:1", dir.path().display());
    let out = json(&skopeo_inspect(&target, &[]));
    assert_eq!(out["Digest"], img.manifest.digest.to_string());
    assert_eq!(out["Labels"]["org.example.a"], "1");
    let raw_config = skopeo_inspect(&target, &["--raw", "--config"]);
    assert_eq!(Digest::of(raw_config.as_bytes()), img.config_digest);
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn oci_dir_export_is_read_by_skopeo_and_umoci() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let img = make_image(&store, "example.com/app:latest", b"hello from kiln\n");
    let layout = dir.path().join("layout");
    export_oci_dir(&store, &img.clone().into(), &layout, Some("v1")).unwrap();
    let out = json(&skopeo_inspect(
        &format!("oci:{}:v1", layout.display()),
        &[],
    ));
    assert_eq!(out["Digest"], img.manifest.digest.to_string());

    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    assert_eq!(
        fs::read(bundle.join("rootfs/hello.txt")).unwrap(),
        b"hello from kiln\n"
    );

    // Exporting a second image into the same layout keeps the first.
    let other = make_image(&store, "example.com/other:1", b"other\n");
    export_oci_dir(&store, &other.clone().into(), &layout, Some("v2")).unwrap();
    skopeo_inspect(&format!("oci:{}:v1", layout.display()), &[]);
    skopeo_inspect(&format!("oci:{}:v2", layout.display()), &[]);
}

#[test]
fn oci_archive_export_is_deterministic_and_read_by_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let img = make_image(&store, "example.com/app:latest", b"x");
    let a = dir.path().join("a.tar");
    let b = dir.path().join("b.tar");
    export_oci_archive(&store, &img.clone().into(), &a, Some("latest")).unwrap();
    export_oci_archive(&store, &img.clone().into(), &b, Some("latest")).unwrap();
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    let out = json(&skopeo_inspect(
        &format!("oci-archive:{}", a.display()),
        &[],
    ));
    assert_eq!(out["Digest"], img.manifest.digest.to_string());
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(fs::File::open(&a).unwrap());
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().mtime().unwrap(), 0);
        names.push(e.path().unwrap().display().to_string());
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn docker_archive_export_is_read_by_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let img = make_image(&store, "docker.io/library/app:1", b"x");
    let file = dir.path().join("d.tar");
    export_docker_archive(&store, &img, &file, &["docker.io/library/app:1".into()]).unwrap();
    let target = format!("docker-archive:{}", file.display());
    let out = json(&skopeo_inspect(&target, &[]));
    assert_eq!(out["Labels"]["org.example.b"], "2");
    let raw_config = skopeo_inspect(&target, &["--raw", "--config"]);
    assert_eq!(Digest::of(raw_config.as_bytes()), img.config_digest);
    let mut ar = tar::Archive::new(fs::File::open(&file).unwrap());
    let toc = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some("manifest.json"))
        .map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        })
        .expect("manifest.json in the archive");
    assert!(toc.contains(r#""RepoTags":["app:1"]"#), "{toc}");
}

#[test]
fn import_round_trips_all_three_formats() {
    let dir = tempfile::tempdir().unwrap();
    let src = Store::open(&dir.path().join("src")).unwrap();
    let img = make_image(&src, "example.com/app:1", b"round trip\n");
    let layout = dir.path().join("layout");
    let oci_tar = dir.path().join("oci.tar");
    let docker_tar = dir.path().join("docker.tar");
    export_oci_dir(&src, &img.clone().into(), &layout, Some("1")).unwrap();
    export_oci_archive(&src, &img.clone().into(), &oci_tar, None).unwrap();
    // Two tags: two index.json entries for one manifest, which import takes as one image.
    let tags = ["example.com/app:1".into(), "example.com/app:2".into()];
    export_docker_archive(&src, &img, &docker_tar, &tags).unwrap();

    for (i, path) in [&layout, &oci_tar].into_iter().enumerate() {
        let dst = Store::open(&dir.path().join(format!("dst{i}"))).unwrap();
        let got = image_of(import(&dst, path).unwrap());
        assert_eq!(
            got.manifest.digest,
            img.manifest.digest,
            "{}",
            path.display()
        );
        assert_eq!(got.config_digest, img.config_digest);
        dst.tag("imported:1", &got.manifest).unwrap();
        assert!(dst.fsck().unwrap().is_clean());
    }
    let dst = Store::open(&dir.path().join("dst-docker")).unwrap();
    let got = image_of(import(&dst, &docker_tar).unwrap());
    assert_eq!(got.config_digest, img.config_digest);
    assert_eq!(got.manifest_body.layers.len(), 1);

    // A docker-archive written by skopeo (legacy layout, uncompressed layers).
    let legacy = dir.path().join("skopeo-docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!(
            "docker-archive:{}:example.com/app:1",
            legacy.display()
        )));
    let dst = Store::open(&dir.path().join("dst-legacy")).unwrap();
    let got = image_of(import(&dst, &legacy).unwrap());
    assert_eq!(got.config_digest, img.config_digest);
    dst.tag("legacy:1", &got.manifest).unwrap();
    // ... and it exports again into something umoci unpacks.
    let again = dir.path().join("again");
    export_oci_dir(&dst, &got.clone().into(), &again, Some("x")).unwrap();
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:x", again.display()))
        .arg(&bundle));
    assert_eq!(
        fs::read(bundle.join("rootfs/hello.txt")).unwrap(),
        b"round trip\n"
    );
}

#[test]
fn import_rejects_tampered_archive() {
    let dir = tempfile::tempdir().unwrap();
    let src = Store::open(&dir.path().join("src")).unwrap();
    let img = make_image(&src, "a:1", b"payload-original");
    let file = dir.path().join("oci.tar");
    export_oci_archive(&src, &img.clone().into(), &file, None).unwrap();
    // Flip a byte inside the layer blob (gzip data) without changing sizes.
    let mut bytes = fs::read(&file).unwrap();
    let layer_hex = img.manifest_body.layers[0].digest.hex();
    let pos = bytes
        .windows(layer_hex.len())
        .position(|w| w == layer_hex.as_bytes())
        .unwrap();
    let data = (pos / 512 + 1) * 512 + 20;
    bytes[data] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let dst = Store::open(&dir.path().join("dst")).unwrap();
    let err = import(&dst, &file).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!dst.has_blob(&img.manifest_body.layers[0].digest));
}

#[test]
fn canonical_json_ignores_label_insertion_order() {
    let mut a = config(vec![], &[]);
    let mut b = a.clone();
    let pairs = [("z", "26"), ("a", "1"), ("m", "13"), ("b", "2")];
    for (k, v) in pairs {
        a.config.labels.insert(k.into(), v.into());
    }
    for (k, v) in pairs.iter().rev() {
        b.config.labels.insert(k.to_string(), v.to_string());
    }
    assert_eq!(canonical_json(&a), canonical_json(&b));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ia = store.put_image(&a, &[]).unwrap();
    let ib = store.put_image(&b, &[]).unwrap();
    assert_eq!(ia.manifest.digest, ib.manifest.digest);
    let text = String::from_utf8(store.read_blob(&ia.config_digest).unwrap()).unwrap();
    assert!(!text.contains(": ") && !text.contains('\n'), "{text}");
    assert!(text.contains(r#""Labels":{"a":"1","b":"2","m":"13","z":"26"}"#));
}

#[test]
fn wrong_expected_digest_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.blob_writer().unwrap();
    w.write_all(b"actual content").unwrap();
    let err = w
        .commit_expecting(&Digest::of(b"something else"))
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(blob_count(dir.path()), 0);
    // No temp file is left behind either.
    let leftovers: Vec<PathBuf> = walk(&dir.path().join("tmp"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A dropped writer leaves nothing either.
    let mut w = store.blob_writer().unwrap();
    w.write_all(b"abandoned").unwrap();
    drop(w);
    assert_eq!(blob_count(dir.path()), 0);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

#[test]
fn concurrent_writers_of_one_blob_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let data: Arc<Vec<u8>> = Arc::new((0..1_000_000u32).map(|i| (i % 251) as u8).collect());
    let want = Digest::of(&data);
    let shared = Arc::new(Store::open(dir.path()).unwrap());
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let data = data.clone();
            let shared = shared.clone();
            let root = dir.path().to_path_buf();
            std::thread::spawn(move || {
                // Half share one Store, half open their own (as separate processes would).
                let own;
                let store = if i % 2 == 0 {
                    &*shared
                } else {
                    own = Store::open(&root).unwrap();
                    &own
                };
                let mut w = store.blob_writer().unwrap();
                for chunk in data.chunks(4096) {
                    w.write_all(chunk).unwrap();
                }
                w.commit_expecting(&want).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), (want, 1_000_000));
    }
    assert_eq!(shared.read_blob(&want).unwrap(), *data);
    assert_eq!(blob_count(dir.path()), 1);
}

/// Child half of `concurrent_processes_share_a_store`: runs only when spawned by it.
#[test]
#[ignore = "helper run by concurrent_processes_share_a_store"]
fn helper_process_writer() {
    let Ok(root) = std::env::var("KILN_TEST_STORE") else {
        return;
    };
    let store = Store::open(Path::new(&root)).unwrap();
    let img = make_image(&store, &format!("proc:{}", std::process::id()), b"same");
    for i in 0..20u32 {
        store.put_blob(format!("blob {i}").as_bytes()).unwrap();
        store
            .cache_put(
                &Digest::of(&i.to_le_bytes()),
                &serde_json::json!({"layer": img.manifest_body.layers[0].digest}),
            )
            .unwrap();
    }
}

#[test]
fn concurrent_processes_share_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "helper_process_writer", "--ignored", "--quiet"])
                .env("KILN_TEST_STORE", dir.path())
                .output_async()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let store = Store::open(dir.path()).unwrap();
    let names: Vec<String> = store
        .images()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["proc", "proc"]);
    assert!(store.fsck().unwrap().is_clean());
}

trait SpawnPiped {
    fn output_async(&mut self) -> std::process::Child;
}
impl SpawnPiped for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

#[test]
fn prune_keeps_tagged_and_leased_removes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let kept = make_image(&store, "kept:1", b"kept");
    let dropped = make_image(&store, "dropped:1", b"dropped");
    assert!(store.untag("dropped:1").unwrap());
    assert!(!store.untag("dropped:1").unwrap());
    let untagged = store
        .put_image(&config(vec![], &[("u", "1")]), &[])
        .unwrap();
    let (stray, _) = store.put_blob(b"unreferenced").unwrap();

    // Layer dirs: one for the kept image, one for the dropped one.
    let kept_diff = kept.config.rootfs.diff_ids[0];
    let dropped_diff = dropped.config.rootfs.diff_ids[0];
    for d in [kept_diff, dropped_diff] {
        let scratch = store.scratch_dir().unwrap();
        let populated = scratch.path().join("layer");
        fs::create_dir(&populated).unwrap();
        fs::write(populated.join("hello.txt"), b"x").unwrap();
        store.install_layer_dir(&d, &populated).unwrap();
    }
    let key_kept = Digest::of(b"k1");
    let key_dropped = Digest::of(b"k2");
    store
        .cache_put(&key_kept, &serde_json::json!({"layer": kept.manifest_body.layers[0].digest, "diff_id": kept_diff}))
        .unwrap();
    store
        .cache_put(
            &key_dropped,
            &serde_json::json!({"layer": dropped.manifest_body.layers[0].digest}),
        )
        .unwrap();

    // While a build holds a lease, prune waits and removes nothing.
    let lease = store.build_lease().unwrap();
    let root = dir.path().to_path_buf();
    let pruner = std::thread::spawn(move || Store::open(&root).unwrap().prune().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pruner.is_finished(), "prune must wait for the lease");
    assert!(store.has_blob(&stray));
    drop(lease);
    let report = pruner.join().unwrap();

    assert!(!store.has_blob(&stray));
    assert!(!store.has_blob(&dropped.manifest.digest));
    assert!(!store.has_blob(&untagged.manifest.digest));
    assert!(!store.has_blob(&dropped.manifest_body.layers[0].digest));
    for d in std::iter::once(&kept.manifest.digest)
        .chain(std::iter::once(&kept.config_digest))
        .chain(kept.manifest_body.layers.iter().map(|l| &l.digest))
    {
        assert!(store.has_blob(d), "{d} must be kept");
    }
    assert!(store.layer_dir(&kept_diff).is_some());
    assert!(store.layer_dir(&dropped_diff).is_none());
    assert!(store.cache_get(&key_kept).unwrap().is_some());
    assert!(store.cache_get(&key_dropped).unwrap().is_none());
    assert_eq!(report.images_removed, 1);
    assert_eq!(report.layer_dirs_removed, 1);
    assert_eq!(report.cache_records_removed, 1);
    assert!(report.blobs_removed >= 5, "{report:?}");
    assert_eq!(store.resolve("kept:1").unwrap().unwrap(), kept);
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn fsck_detects_corruption_and_strays() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let img = make_image(&store, "a:1", b"abc");
    assert!(store.fsck().unwrap().is_clean());
    let layer = store.blob_path(&img.manifest_body.layers[0].digest);
    fs::write(&layer, b"garbage").unwrap();
    fs::write(dir.path().join("blobs/sha256/partial.tmp"), b"x").unwrap();
    let report = store.fsck().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, FsckProblem::CorruptBlob { path, .. } if *path == layer)),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, FsckProblem::Stray { .. }))
    );
    fs::remove_file(&layer).unwrap();
    let report = store.fsck().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, FsckProblem::MissingBlob { referenced_by, .. } if referenced_by == "image a:1")),
        "{:?}",
        report.problems
    );
}

#[test]
fn names_ids_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = make_image(&store, "docker.io/library/a:1", b"a");
    store
        .tag("docker.io/library/a:latest", &a.manifest)
        .unwrap();
    let b = make_image(&store, "localhost:5000/b:2", b"b");
    let by_id = store
        .resolve(&a.config_digest.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(by_id.manifest.digest, a.manifest.digest);
    let short = &b.config_digest.hex()[..12];
    assert_eq!(
        store.resolve(short).unwrap().unwrap().config_digest,
        b.config_digest
    );
    assert!(store.resolve("nosuch:1").unwrap().is_none());
    assert!(store.resolve("abc").unwrap().is_none());

    let list = store.images().unwrap();
    let rows: Vec<(&str, &str)> = list
        .iter()
        .map(|e| (e.name.as_str(), e.tag.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("docker.io/library/a", "1"),
            ("docker.io/library/a", "latest"),
            ("localhost:5000/b", "2")
        ]
    );
    assert_eq!(list[0].id, a.config_digest);
    assert_eq!(list[0].created.as_deref(), Some("1970-01-01T00:00:00Z"));
    assert!(list[0].size > 0);

    // Retagging moves the name.
    store.tag("docker.io/library/a:1", &b.manifest).unwrap();
    assert_eq!(
        store
            .resolve("docker.io/library/a:1")
            .unwrap()
            .unwrap()
            .config_digest,
        b.config_digest
    );
    // Tagging a manifest that is not stored fails.
    let ghost = Descriptor::new(kiln::image::MEDIA_MANIFEST, Digest::of(b"ghost"), 5);
    assert!(matches!(
        store.tag("ghost:1", &ghost),
        Err(StoreError::BlobNotFound { .. })
    ));
}

#[test]
fn layer_dirs_install_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let diff = Digest::of(b"layer");
    assert!(store.layer_dir(&diff).is_none());
    let mut installed = Vec::new();
    for content in [&b"first"[..], b"second"] {
        let scratch = store.scratch_dir().unwrap();
        let p = scratch.path().join("l");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("f"), content).unwrap();
        installed.push(store.install_layer_dir(&diff, &p).unwrap());
        assert!(!p.exists());
    }
    assert_eq!(installed[0], installed[1]);
    assert_eq!(store.layer_dir(&diff).unwrap(), installed[0]);
    assert_eq!(fs::read(installed[0].join("f")).unwrap(), b"first");
}

#[test]
fn cache_records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = Digest::of(b"key");
    assert!(store.cache_get(&key).unwrap().is_none());
    let rec = serde_json::json!({"z": 1, "a": {"y": [1, 2], "b": null}});
    store.cache_put(&key, &rec).unwrap();
    assert_eq!(store.cache_get(&key).unwrap(), Some(rec));
    let on_disk = fs::read_to_string(dir.path().join(format!("cache/{}.json", key.hex()))).unwrap();
    assert_eq!(on_disk, r#"{"a":{"b":null,"y":[1,2]},"z":1}"#);
    fs::write(
        dir.path().join(format!("cache/{}.json", key.hex())),
        b"{trunc",
    )
    .unwrap();
    assert!(matches!(
        store.cache_get(&key),
        Err(StoreError::Json { .. })
    ));
}

#[test]
fn oci_dir_export_links_fresh_blobs_and_verifies_those_of_earlier_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let img = make_image(&store, "a:1", b"exported by the session that wrote it");
    let layer = img.manifest_body.layers[0].digest;
    // Same session, same filesystem: the very blob, hard-linked.
    export_oci_dir(&store, &img.clone().into(), &dir.path().join("out1"), None).unwrap();
    let out = dir.path().join("out1/blobs/sha256").join(layer.hex());
    assert_eq!(Digest::of(&fs::read(&out).unwrap()), layer);
    let stored = root.join("blobs/sha256").join(layer.hex());
    assert_eq!(
        fs::metadata(&out).unwrap().ino(),
        fs::metadata(&stored).unwrap().ino()
    );
    // Another filesystem (a tmpfs): copied in the kernel, byte for byte.
    let other = dir.path().join("tmpfs");
    fs::create_dir(&other).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &other,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let result = export_oci_dir(&store, &img.clone().into(), &other.join("out"), None);
    let copied = fs::read(other.join("out/blobs/sha256").join(layer.hex()));
    nix::mount::umount(&other).unwrap();
    result.unwrap();
    assert_eq!(Digest::of(&copied.unwrap()), layer);
    drop(store);
    // A later session finds the blob damaged on disk: the export refuses it.
    let blob = root.join("blobs/sha256").join(layer.hex());
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let store = Store::open(&root).unwrap();
    let err =
        export_oci_dir(&store, &img.clone().into(), &dir.path().join("out2"), None).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(
        !dir.path()
            .join("out2/blobs/sha256")
            .join(layer.hex())
            .exists()
    );
}
