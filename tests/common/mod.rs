//! Shared helpers for end-to-end tests: a fresh store with the busybox base image built from
//! examples/busybox, build contexts in temp dirs, and real consumers (umoci, skopeo) to check
//! what kiln wrote. These tests need root (namespaces, overlayfs), as CI runs them.
#![allow(dead_code)]

pub mod registry;
pub mod unprivileged;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The kiln binary under test.
pub fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// A store holding the busybox base, shared read-only by the tests of one binary: each test
/// gets its own store seeded from it by `kiln import`, so tests stay independent.
pub fn base_archive() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| build_base("base", &[]))
}

/// The busybox base for linux/amd64 and linux/arm64, one image index (see [`base_archive`]).
fn multiarch_archive() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| build_base("multiarch", &["--platform", "linux/amd64,linux/arm64"]))
}

/// Builds the busybox base with examples/build-base.sh and `extra` args, as an OCI archive.
fn build_base(what: &str, extra: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-test-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("store");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/build-base.sh");
    let out = Command::new("bash")
        .args([
            script,
            kiln_bin(),
            "--progress",
            "plain",
            "--source-date-epoch",
            "0",
        ])
        .args(extra)
        .env("KILN_ROOT", &root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the busybox base ({what}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive = dir.join("busybox.tar");
    export_tagged(&root, "busybox", &archive, extra);
    // Only the archive is needed from here on.
    std::fs::remove_dir_all(&root).unwrap();
    archive
}

fn export_tagged(root: &Path, name: &str, archive: &Path, platform_args: &[&str]) {
    // A FROM-only recipe re-exports the tagged image as an archive (for the same platforms).
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {name}\n")).unwrap();
    let out = Command::new(kiln_bin())
        .arg("--root")
        .arg(root)
        .args(["build", "-q", "-o"])
        .arg(format!("type=oci-archive,dest={}", archive.display()))
        .args(platform_args)
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exporting the base failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test's own store, seeded with the busybox base.
pub struct Kiln {
    /// The store root.
    pub root: tempfile::TempDir,
}

impl Kiln {
    /// A fresh store with `busybox` imported.
    pub fn new() -> Kiln {
        Kiln::with_base(base_archive())
    }

    /// A fresh store whose `busybox` is an index for linux/amd64 and linux/arm64.
    pub fn multiarch() -> Kiln {
        Kiln::with_base(multiarch_archive())
    }

    fn with_base(archive: &Path) -> Kiln {
        let k = Kiln::empty();
        let out = k.run(&["import", archive.to_str().unwrap(), "busybox"]);
        assert!(
            out.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        k
    }

    /// A fresh, empty store.
    pub fn empty() -> Kiln {
        Kiln {
            root: tempfile::Builder::new()
                .prefix("kiln-store-")
                .tempdir()
                .unwrap(),
        }
    }

    /// Runs kiln with this store.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(kiln_bin())
            .arg("--root")
            .arg(self.root.path())
            .args(args)
            .output()
            .unwrap()
    }

    /// Builds `dockerfile` in a new context holding `files`; returns the output and the context.
    pub fn build(
        &self,
        dockerfile: &str,
        files: &[(&str, &[u8])],
        args: &[&str],
    ) -> (Output, tempfile::TempDir) {
        let ctx = context(dockerfile, files);
        let out = self.build_dir(ctx.path(), args);
        (out, ctx)
    }

    /// Builds the context directory `ctx` (holding its recipe).
    pub fn build_dir(&self, ctx: &Path, args: &[&str]) -> Output {
        let mut full = vec!["build", "--progress", "plain"];
        full.extend_from_slice(args);
        full.push(ctx.to_str().unwrap());
        self.run(&full)
    }

    /// Builds and asserts success; returns the image id.
    pub fn build_ok(&self, dockerfile: &str, files: &[(&str, &[u8])], args: &[&str]) -> String {
        let (out, _ctx) = self.build(dockerfile, files, args);
        assert_success(&out);
        stdout_line(&out)
    }

    /// Builds, exports as an OCI layout and unpacks with umoci.
    pub fn build_unpacked(&self, dockerfile: &str, files: &[(&str, &[u8])]) -> Unpacked {
        self.build_unpacked_with(dockerfile, files, &[])
    }

    /// [`Kiln::build_unpacked`] with more `kiln build` arguments.
    pub fn build_unpacked_with(
        &self,
        dockerfile: &str,
        files: &[(&str, &[u8])],
        args: &[&str],
    ) -> Unpacked {
        self.build_dir_unpacked(context(dockerfile, files).path(), args)
    }

    /// Builds the context directory `ctx`, exports the image as an OCI layout and unpacks it
    /// with umoci (asserting success all the way).
    pub fn build_dir_unpacked(&self, ctx: &Path, args: &[&str]) -> Unpacked {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        let out_arg = format!("type=oci,dest={}", layout.display());
        let mut all = vec!["-t", "test:latest", "-o", &out_arg];
        all.extend_from_slice(args);
        assert_success(&self.build_dir(ctx, &all));
        let bundle = dir.path().join("bundle");
        umoci_unpack(&layout, "latest", &bundle);
        Unpacked {
            dir,
            layout,
            rootfs: bundle.join("rootfs"),
        }
    }
}

/// An image exported and unpacked by umoci.
pub struct Unpacked {
    /// Keeps the temp dir alive.
    pub dir: tempfile::TempDir,
    /// The OCI layout.
    pub layout: PathBuf,
    /// The unpacked root filesystem.
    pub rootfs: PathBuf,
}

/// Unpacks `layout:tag` with umoci into `bundle` (asserting success); returns the rootfs.
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle)
        .output()
        .unwrap();
    assert_success(&out);
    bundle.join("rootfs")
}

/// A temp context dir with a Dockerfile and files.
pub fn context(dockerfile: &str, files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let ctx = tempfile::Builder::new()
        .prefix("kiln-ctx-")
        .tempdir()
        .unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    for (name, content) in files {
        let p = ctx.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    ctx
}

/// Panics with the output when the command failed.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The last line of stdout.
pub fn stdout_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

/// The stderr text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The number of mounts in this process's mount namespace.
pub fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

/// The processes on the machine whose command line (NULs read as spaces) contains `marker`:
/// (pid, command line).
pub fn processes_with(marker: &str) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, cmdline)| cmdline.contains(marker))
        .collect()
}

/// The `index.json` of an OCI image layout (a kiln store is one too).
pub fn oci_index(layout: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap()
}

/// The blob `digest` (`sha256:…`) of an OCI image layout.
pub fn oci_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
}

/// The blob `digest` of an OCI image layout, as JSON.
pub fn oci_json(layout: &Path, digest: &str) -> serde_json::Value {
    serde_json::from_slice(&oci_blob(layout, digest)).unwrap()
}

/// The digest of the entry of an OCI layout's `index.json` named `name` (its
/// `org.opencontainers.image.ref.name`).
pub fn oci_ref_digest(layout: &Path, name: &str) -> String {
    oci_index(layout)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == name)
        .and_then(|e| e["digest"].as_str())
        .unwrap_or_else(|| panic!("{name} is not in {}", layout.display()))
        .to_string()
}

/// The image config of `name` as JSON.
pub fn inspect(k: &Kiln, name: &str) -> serde_json::Value {
    let out = k.run(&["inspect", name]);
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}
