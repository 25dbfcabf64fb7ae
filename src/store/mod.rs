//! The local image store (DESIGN.md §4): content-addressed blobs, images and tags, unpacked
//! layer directories, build cache records, locks and garbage collection. The only writer of
//! blobs; knows nothing of Dockerfiles.
//!
//! Layout under ROOT (itself a valid OCI image layout, so `skopeo inspect oci:ROOT:NAME` works):
//!
//! ```text
//! blobs/sha256/<hex>   every blob; written under tmp/, fsynced, verified, then renamed here
//! index.json           one entry per image; tagged ones carry org.opencontainers.image.ref.name
//! oci-layout           {"imageLayoutVersion":"1.0.0"}
//! layers/<hex>/        unpacked layers by diff_id (overlay lower dirs), installed by rename
//! cache/<hex>.json     build cache records by cache key, written atomically
//! remote/<hex>         promised blobs: where a layer taken from a shared cache can be fetched
//! tmp/s-<id>/          one scratch directory per open Store, flock'ed by its owner
//! lock                 short exclusive lock around index.json updates
//! gc.lock              shared by running builds (leases), exclusive for prune
//! ```
//!
//! Invariants: a blob's name is its digest; nothing references an incomplete blob (an image may
//! reference a promised one, fetched and verified when first read); partial work
//! lives only under `tmp/` with temporary names and is removed on the next open once its owner
//! is gone; several processes may use one store at once.

mod export;
mod import;
mod indexes;
mod promised;
mod writeback;

pub use export::{export_docker_archive, export_oci_archive, export_oci_dir};
pub use import::{import, import_layout};
pub use indexes::{StoredIndex, StoredRef};
pub use promised::BlobSource;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tempfile::NamedTempFile;

use crate::digest::{BackgroundHashingWriter, Digest, HashingReader};
use crate::image::{
    ANNOTATION_REF_NAME, Descriptor, ImageConfig, ImageError, Index, MEDIA_CONFIG, MEDIA_MANIFEST,
    Manifest, Platform, canonical_json, is_index_type, platform_names,
};
use writeback::WritebackFile;

/// Something went wrong in the store; every variant names the path or reference involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A blob the operation needs is not in the store.
    #[error("blob {digest} is not in the store at {}", root.display())]
    BlobNotFound {
        /// The missing blob.
        digest: Digest,
        /// The store root.
        root: PathBuf,
    },
    /// Content did not hash to the digest it was expected to have; nothing was stored.
    #[error("{what}: expected digest {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// What was being written or read.
        what: String,
        /// The digest the caller expected.
        expected: Digest,
        /// The digest of the content.
        actual: Digest,
    },
    /// A stored file or document is not in the format it should be.
    #[error("{what}: {source}")]
    Format {
        /// The file or blob involved.
        what: String,
        /// What is wrong with it.
        source: ImageError,
    },
    /// A promised blob could not be fetched from its origin (or did not verify).
    #[error("fetching blob {digest} from {origin}: {reason}")]
    Fetch {
        /// The blob.
        digest: Digest,
        /// Where its promise said it could be fetched.
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// A stored JSON file (index, cache record) could not be parsed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// An image reference or id prefix matches more than one image.
    #[error("image reference {name:?} is ambiguous: it matches {count} images")]
    Ambiguous {
        /// The reference given.
        name: String,
        /// How many images it matches.
        count: usize,
    },
    /// An input (archive, layout, name) is unusable.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file, directory or name involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Attaches a path to an `io::Error`.
trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// How long an unowned entry in `tmp/` (one not inside a locked session) must be untouched
/// before `open` removes it.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// The owner and mode a cache mount's directory is created with (`RUN
/// --mount=type=cache,uid=,gid=,mode=`; BuildKit's defaults are 0, 0 and 0755).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheRoot {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
}

impl Default for CacheRoot {
    fn default() -> Self {
        CacheRoot {
            uid: 0,
            gid: 0,
            mode: 0o755,
        }
    }
}

impl CacheRoot {
    /// Gives `dir` this owner and mode. A builder that is not root keeps its own ownership
    /// where the kernel refuses the owner (rootless builds map ids through their namespace).
    pub fn apply(&self, dir: &Path) -> Result<(), StoreError> {
        match std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid)) {
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    && !nix::unistd::geteuid().is_root() => {}
            other => other.at(dir)?,
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(self.mode & 0o7777)).at(dir)
    }
}

/// A store opened at a root directory. `Send + Sync`: share it between threads by reference or
/// `Arc`. Each `Store` owns a private scratch directory under `ROOT/tmp`, removed on drop.
pub struct Store {
    root: PathBuf,
    session: Session,
    /// Blobs this `Store` hashed as it wrote them; exports copy these without hashing again.
    written: Arc<Mutex<BTreeSet<Digest>>>,
    /// This boot's id, which unsynced-layer markers record (see `install_layer_dir`).
    boot_id: String,
    /// Fetches promised blobs (see [`BlobSource`]).
    blob_source: Option<Arc<dyn BlobSource>>,
    /// Held while a promised blob is fetched.
    fetching: Mutex<()>,
}

/// The per-`Store` scratch directory and the exclusive lock that marks it live.
struct Session {
    dir: PathBuf,
    _lock: File,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A new blob being written; see [`Store::blob_writer`]. Dropping it without committing removes
/// the temporary file.
pub struct BlobWriter {
    blobs_dir: PathBuf,
    written: Arc<Mutex<BTreeSet<Digest>>>,
    inner: BackgroundHashingWriter<BufWriter<WritebackFile>>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter {
    /// Fsyncs the blob and renames it to `blobs/sha256/<hex>` (a no-op if that blob already
    /// exists); returns its digest and size.
    pub fn commit(self) -> Result<(Digest, u64), StoreError> {
        self.finish(None)
    }

    /// Like [`commit`](Self::commit), but the content must hash to `expected`; on a mismatch
    /// nothing is stored and the error names both digests.
    pub fn commit_expecting(self, expected: &Digest) -> Result<(Digest, u64), StoreError> {
        self.finish(Some(expected))
    }

    fn finish(self, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let (buf, digest, size) = self.inner.finish().at(&self.blobs_dir)?;
        let tmp = buf
            .into_inner()
            .map_err(|e| StoreError::Io {
                path: self.blobs_dir.clone(),
                source: e.into_error(),
            })?
            .into_inner();
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StoreError::DigestMismatch {
                what: format!("blob written to {}", self.blobs_dir.display()),
                expected: *expected,
                actual: digest,
            });
        }
        let dest = self.blobs_dir.join(digest.hex());
        if dest.is_file() {
            return Ok((digest, size));
        }
        tmp.as_file().sync_all().at(tmp.path())?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644)).at(tmp.path())?;
        tmp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        sync_dir(&self.blobs_dir)?;
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest);
        Ok((digest, size))
    }
}

/// A shared hold on the store taken by a running build; [`Store::prune`] waits until no lease
/// is held. Released on drop.
pub struct Lease {
    _file: File,
}

/// An image in the store: its manifest (descriptor and parsed body) and config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredImage {
    /// The manifest's descriptor (media type, digest, size; no annotations).
    pub manifest: Descriptor,
    /// The parsed manifest.
    pub manifest_body: Manifest,
    /// The parsed config.
    pub config: ImageConfig,
    /// The config's digest: the image id.
    pub config_digest: Digest,
}

/// One line of `kiln images`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// Repository name (`docker.io/library/busybox`), or `<none>` for an untagged image.
    pub name: String,
    /// Tag, or `<none>`.
    pub tag: String,
    /// The image id: an image's config digest, an index's own digest.
    pub id: Digest,
    /// The manifest (or index) digest.
    pub manifest: Digest,
    /// Config plus layer blob sizes, in bytes (of every image of an index that is here).
    pub size: u64,
    /// The config's `created`, if set (for an index, the latest of its images').
    pub created: Option<String>,
    /// The platforms it is for: an image's own, an index's entries.
    pub platforms: Vec<Platform>,
}

/// What [`Store::prune`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Untagged images dropped from `index.json`.
    pub images_removed: usize,
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Bytes of blobs deleted.
    pub bytes_freed: u64,
    /// Unpacked layer directories deleted.
    pub layer_dirs_removed: usize,
    /// Cache records deleted.
    pub cache_records_removed: usize,
}

/// One problem found by [`Store::fsck`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsckProblem {
    /// A blob's content does not hash to its name.
    CorruptBlob {
        /// The blob file.
        path: PathBuf,
        /// What its content hashes to.
        actual: Digest,
    },
    /// A referenced blob is not in the store.
    MissingBlob {
        /// The missing blob.
        digest: Digest,
        /// What references it.
        referenced_by: String,
    },
    /// A document (index, manifest, config, cache record) cannot be read.
    Unreadable {
        /// The file or blob.
        what: String,
        /// Why.
        reason: String,
    },
    /// A file that does not belong where it is (e.g. a partial file outside `tmp/`).
    Stray {
        /// The file.
        path: PathBuf,
    },
}

impl fmt::Display for FsckProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsckProblem::CorruptBlob { path, actual } => {
                write!(f, "{}: corrupt: content hashes to {actual}", path.display())
            }
            FsckProblem::MissingBlob {
                digest,
                referenced_by,
            } => write!(f, "blob {digest} referenced by {referenced_by} is missing"),
            FsckProblem::Unreadable { what, reason } => write!(f, "{what}: {reason}"),
            FsckProblem::Stray { path } => write!(f, "{}: stray file", path.display()),
        }
    }
}

/// The result of [`Store::fsck`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// How many blobs were hashed.
    pub blobs_checked: usize,
    /// Everything found wrong.
    pub problems: Vec<FsckProblem>,
}

impl FsckReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The entries of `dir` whose names are digests' hex (blobs, unpacked layers), with those
/// digests; other names are skipped.
fn digest_named_entries(dir: &Path) -> Result<Vec<(Digest, fs::DirEntry)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        if let Some(d) = entry
            .file_name()
            .to_str()
            .and_then(|n| Digest::from_hex(n).ok())
        {
            out.push((d, entry));
        }
    }
    Ok(out)
}

/// Fsyncs a finished temp file, makes it world-readable and renames it to `dest`.
fn persist_synced(tmp: NamedTempFile, dest: &Path) -> Result<(), StoreError> {
    tmp.as_file().sync_all().at(tmp.path())?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644)).at(tmp.path())?;
    tmp.persist(dest).map_err(|e| StoreError::Io {
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// How long a layer dir installed in this boot stays marked unsynced before `open` settles it
/// with a `syncfs` (by then the kernel has normally written it back already).
const UNSYNCED_GRACE: Duration = Duration::from_secs(600);

/// This boot's id (`/proc/sys/kernel/random/boot_id`); empty if unknown, which never
/// matches a recorded id, so unknown boots count as different.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Removes a file; one that is already gone is fine.
fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at(path),
        _ => Ok(()),
    }
}

/// Fsyncs a directory so renames into it are durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

/// Every `sha256:` digest mentioned by a string anywhere in a JSON value.
fn digests_in(v: &serde_json::Value, out: &mut BTreeSet<Digest>) {
    match v {
        serde_json::Value::String(s) => {
            if let Ok(d) = s.parse() {
                out.insert(d);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| digests_in(i, out)),
        serde_json::Value::Object(map) => map.values().for_each(|i| digests_in(i, out)),
        _ => {}
    }
}

/// Splits a stored reference into (repository, tag): `a/b:1` → (`a/b`, `1`),
/// `a/b@sha256:..` → (`a/b`, `<none>`), `host:5000/a` → (`host:5000/a`, `<none>`).
fn split_name(name: &str) -> (String, String) {
    if let Some((repo, _)) = name.split_once('@') {
        return (repo.to_string(), "<none>".to_string());
    }
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].rfind(':') {
        Some(i) => (
            name[..slash + i].to_string(),
            name[slash + i + 1..].to_string(),
        ),
        None => (name.to_string(), "<none>".to_string()),
    }
}

impl Store {
    /// Opens the store at `root`, creating its layout if needed, and removes scratch entries
    /// left by processes that are gone.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let root = root.to_path_buf();
        for sub in [
            "blobs/sha256",
            "layers",
            "unsynced",
            "cache",
            "remote",
            "tmp",
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).at(&dir)?;
        }
        let tmp = root.join("tmp");
        clean_stale(&tmp);
        let session = Session::create(&tmp)?;
        let store = Store {
            root,
            session,
            written: Arc::default(),
            boot_id: boot_id(),
            blob_source: None,
            fetching: Mutex::new(()),
        };
        store.recover_unsynced_layers()?;
        let layout = store.root.join("oci-layout");
        if !layout.is_file() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !store.index_path().is_file() {
            let _guard = store.index_lock()?;
            if !store.index_path().is_file() {
                store.write_index(&Index::default())?;
            }
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Where the blob `d` lives (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    /// Whether this `Store` wrote blob `d` itself, hashing it on the way (so its content was
    /// verified moments ago, not read back from an earlier run).
    pub(crate) fn wrote_blob(&self, d: &Digest) -> bool {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(d)
    }

    /// Whether the blob `d` is in the store (blobs only appear complete).
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// A writer for a new blob: a temporary file under `ROOT/tmp`, hashed as it is written.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.session.dir)
            .at(&self.session.dir)?;
        Ok(BlobWriter {
            blobs_dir: self.blobs_dir(),
            written: Arc::clone(&self.written),
            inner: BackgroundHashingWriter::new(BufWriter::with_capacity(
                256 * 1024,
                WritebackFile::new(tmp),
            )),
        })
    }

    /// Stores `bytes` as a blob; returns its digest and size.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(Digest, u64), StoreError> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes).at(&self.session.dir)?;
        w.commit()
    }

    /// Reads a (small) blob into memory, verifying its digest; a promised blob is fetched.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(d);
        let bytes = self
            .read_or_fetch(d, || fs::read(&path))?
            .map_err(|source| self.not_found_or(d, &path, source))?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(StoreError::DigestMismatch {
                what: format!("blob {}", path.display()),
                expected: *d,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Opens a blob for streaming (not verified; see [`fsck`](Self::fsck)); a promised blob is
    /// fetched (and verified) first.
    pub fn open_blob(&self, d: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(d);
        self.read_or_fetch(d, || File::open(&path))?
            .map_err(|source| self.not_found_or(d, &path, source))
    }

    fn not_found_or(&self, d: &Digest, path: &Path, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound {
            StoreError::BlobNotFound {
                digest: *d,
                root: self.root.clone(),
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    /// The unpacked directory of the layer with this diff_id, when one has been installed.
    pub fn layer_dir(&self, diff_id: &Digest) -> Option<PathBuf> {
        let dir = self.root.join("layers").join(diff_id.hex());
        dir.is_dir().then_some(dir)
    }

    /// Installs `populated` (a fully populated directory on the store's filesystem, typically
    /// inside [`scratch_dir`](Self::scratch_dir)) as the unpacked layer for `diff_id`, by rename.
    /// If another process installed it first, ours is discarded. Returns the installed path.
    ///
    /// The files inside are not fsynced (one fsync per file would cost more than the build
    /// step). Instead a durable marker `unsynced/<hex>` naming this boot is written before the
    /// rename; [`open`](Self::open) discards layer dirs whose marker names an earlier boot,
    /// since a crash may have lost their contents (they are unpacked again from the blob).
    pub fn install_layer_dir(
        &self,
        diff_id: &Digest,
        populated: &Path,
    ) -> Result<PathBuf, StoreError> {
        let layers = self.root.join("layers");
        let dest = layers.join(diff_id.hex());
        let unsynced = self.root.join("unsynced");
        // Only the marker's name must be durable before the rename: a crash that loses its
        // content leaves a marker naming no boot, which counts as an earlier one.
        let marker = unsynced.join(diff_id.hex());
        fs::write(&marker, &self.boot_id).at(&marker)?;
        sync_dir(&unsynced)?;
        match fs::rename(populated, &dest) {
            Ok(()) => {
                sync_dir(&layers)?;
                Ok(dest)
            }
            Err(e) if dest.is_dir() => {
                // Another process won the race (EEXIST / ENOTEMPTY): keep theirs.
                let _ = e;
                fs::remove_dir_all(populated).at(populated)?;
                Ok(dest)
            }
            Err(e) => Err(StoreError::Io {
                path: populated.to_path_buf(),
                source: e,
            }),
        }
    }

    /// Discards unpacked layer dirs that were installed during an earlier boot and never known
    /// to be on disk (see [`install_layer_dir`](Self::install_layer_dir)); markers of this boot
    /// older than [`UNSYNCED_GRACE`] are settled with one `syncfs` of the store's filesystem.
    fn recover_unsynced_layers(&self) -> Result<(), StoreError> {
        let unsynced = self.root.join("unsynced");
        let mut settled = Vec::new();
        let mut dropped = false;
        for (d, entry) in digest_named_entries(&unsynced)? {
            let marker = entry.path();
            let boot = fs::read_to_string(&marker).unwrap_or_default();
            if boot == self.boot_id {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > UNSYNCED_GRACE);
                if old {
                    settled.push(marker);
                }
                continue;
            }
            self.discard_layer_dir(&d)?;
            dropped = true;
        }
        if !settled.is_empty() {
            let root = File::open(&self.root).at(&self.root)?;
            // SAFETY: a plain syscall on an fd we own.
            if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
                return Err(io::Error::last_os_error()).at(&self.root);
            }
            for marker in settled {
                remove_if_present(&marker)?;
            }
        } else if !dropped {
            return Ok(());
        }
        sync_dir(&unsynced)
    }

    /// Removes the unpacked dir of layer `d` (if any) and its unsynced marker. The dir leaves
    /// `layers/` by rename first, so a half-deleted tree never looks installed.
    fn discard_layer_dir(&self, d: &Digest) -> Result<(), StoreError> {
        let dir = self.root.join("layers").join(d.hex());
        let doomed = self.session.dir.join(format!("rm-{}", d.hex()));
        match fs::rename(&dir, &doomed) {
            Ok(()) => fs::remove_dir_all(&doomed).at(&doomed)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&dir),
        }
        remove_if_present(&self.root.join("unsynced").join(d.hex()))
    }

    /// The persistent directory of a `RUN --mount=type=cache` with this id,
    /// `ROOT/mounts/<sha256 of id>`, kept across builds. Created on first use with `root`'s
    /// owner and mode, whole (made aside, then renamed into place); an existing one is kept
    /// as it is.
    pub fn cache_mount_dir(&self, id: &str, root: CacheRoot) -> Result<PathBuf, StoreError> {
        let dir = self.cache_mount_path(id);
        if dir.is_dir() {
            return Ok(dir);
        }
        let fresh = self.scratch_dir()?;
        root.apply(fresh.path())?;
        self.adopt_cache_mount_dir(id, &fresh.keep())
    }

    /// Takes the lock of a cache mount's directory: waits for it (`wait`), else returns None
    /// when another step holds it. The lock lasts as long as the returned file is open.
    pub fn lock_cache_mount(&self, dir: &Path, wait: bool) -> Result<Option<File>, StoreError> {
        let f = File::open(dir).at(dir)?;
        if wait {
            f.lock().at(dir)?;
            return Ok(Some(f));
        }
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e).at(dir),
        }
    }

    fn cache_mount_path(&self, id: &str) -> PathBuf {
        self.root
            .join("mounts")
            .join(Digest::of(id.as_bytes()).hex())
    }

    /// The directory of the cache mount `id` if it exists already.
    pub fn existing_cache_mount_dir(&self, id: &str) -> Option<PathBuf> {
        let dir = self.cache_mount_path(id);
        dir.is_dir().then_some(dir)
    }

    /// Makes `seeded` (a directory on the store's file system, e.g. in a
    /// [`scratch_dir`](Self::scratch_dir)) the cache mount `id`, unless another build made that
    /// cache first: the cache appears whole or not at all. Returns its directory.
    pub fn adopt_cache_mount_dir(&self, id: &str, seeded: &Path) -> Result<PathBuf, StoreError> {
        let dir = self.cache_mount_path(id);
        let parent = self.root.join("mounts");
        fs::create_dir_all(&parent).at(&parent)?;
        match fs::rename(seeded, &dir) {
            Ok(()) => Ok(dir),
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(seeded);
                Ok(dir)
            }
            Err(e) => Err(e).at(&dir),
        }
    }

    /// A fresh directory under `ROOT/tmp` (same filesystem as the store), removed on drop.
    pub fn scratch_dir(&self) -> Result<tempfile::TempDir, StoreError> {
        tempfile::Builder::new()
            .prefix("scratch-")
            .tempdir_in(&self.session.dir)
            .at(&self.session.dir)
    }

    /// Saves `config` (canonical JSON) and a manifest for it over `layers`, whose blobs must
    /// already be stored or promised. The image is recorded untagged in `index.json` (so it
    /// can be found by id) until [`tag`](Self::tag)ged; [`prune`](Self::prune) drops untagged
    /// images.
    pub fn put_image(
        &self,
        config: &ImageConfig,
        layers: &[Descriptor],
    ) -> Result<StoredImage, StoreError> {
        self.put_image_annotated(config, layers, BTreeMap::new())
    }

    /// [`put_image`](Self::put_image) with manifest annotations.
    pub fn put_image_annotated(
        &self,
        config: &ImageConfig,
        layers: &[Descriptor],
        annotations: BTreeMap<String, String>,
    ) -> Result<StoredImage, StoreError> {
        let config_bytes = canonical_json(config);
        let (config_digest, config_size) = self.put_blob(&config_bytes)?;
        self.put_manifest(
            config_digest,
            config_size,
            config.clone(),
            layers.to_vec(),
            annotations,
        )
    }

    /// Writes the manifest for an already stored config and layers (stored or promised), and
    /// records it.
    fn put_manifest(
        &self,
        config_digest: Digest,
        config_size: u64,
        config: ImageConfig,
        layers: Vec<Descriptor>,
        annotations: BTreeMap<String, String>,
    ) -> Result<StoredImage, StoreError> {
        for l in &layers {
            if !self.has_blob_or_promise(&l.digest) {
                return Err(StoreError::BlobNotFound {
                    digest: l.digest,
                    root: self.root.clone(),
                });
            }
        }
        let manifest_body = Manifest {
            config: Descriptor::new(MEDIA_CONFIG, config_digest, config_size),
            layers,
            annotations,
        };
        let (digest, size) = self.put_blob(&canonical_json(&manifest_body))?;
        let manifest = Descriptor::new(MEDIA_MANIFEST, digest, size);
        self.record(&manifest)?;
        Ok(StoredImage {
            manifest,
            manifest_body,
            config,
            config_digest,
        })
    }

    /// Adds an untagged `index.json` entry for `manifest` unless some entry already lists it.
    fn record(&self, manifest: &Descriptor) -> Result<(), StoreError> {
        self.update_index(|idx| {
            if idx.manifests.iter().any(|d| d.digest == manifest.digest) {
                return false;
            }
            let mut entry = manifest.clone();
            entry.annotations.remove(ANNOTATION_REF_NAME);
            idx.manifests.push(entry);
            true
        })
        .map(drop)
    }

    /// Points `name` (already normalized by the caller) at `manifest`, replacing what it named
    /// before. The manifest blob must be in the store.
    pub fn tag(&self, name: &str, manifest: &Descriptor) -> Result<(), StoreError> {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(StoreError::Invalid {
                path: PathBuf::from(name),
                reason: "not a valid image name".into(),
            });
        }
        let _guard = self.index_lock()?;
        if !self.has_blob(&manifest.digest) {
            return Err(StoreError::BlobNotFound {
                digest: manifest.digest,
                root: self.root.clone(),
            });
        }
        let mut idx = self.read_index()?;
        idx.manifests.retain(|d| match d.ref_name() {
            Some(n) => n != name,
            None => d.digest != manifest.digest,
        });
        let mut entry = manifest.clone();
        entry
            .annotations
            .insert(ANNOTATION_REF_NAME.to_string(), name.to_string());
        idx.manifests.push(entry);
        self.write_index(&idx)
    }

    /// Finds an image or index by name, by id (an image's config digest, an index's own
    /// digest: `sha256:<hex>`, `<hex>`, or a unique prefix of at least 4 hex digits), or by
    /// full manifest digest.
    pub fn lookup(&self, name_or_id: &str) -> Result<Option<StoredRef>, StoreError> {
        let idx = self.read_index()?;
        if let Some(d) = idx
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(name_or_id))
        {
            return self.load(d).map(Some);
        }
        let prefix = name_or_id.strip_prefix("sha256:").unwrap_or(name_or_id);
        if prefix.len() < 4
            || prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Ok(None);
        }
        let mut found: BTreeMap<Digest, StoredRef> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for d in &idx.manifests {
            if !seen.insert(d.digest) {
                continue;
            }
            let item = self.load(d)?;
            let hit = match &item {
                StoredRef::Image(img) => {
                    img.config_digest.hex().starts_with(prefix)
                        || img.manifest.digest.hex() == prefix
                }
                StoredRef::Index(x) => x.desc.digest.hex().starts_with(prefix),
            };
            if hit {
                found.insert(item.id(), item);
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.into_values().next()),
            count => Err(StoreError::Ambiguous {
                name: name_or_id.to_string(),
                count,
            }),
        }
    }

    /// Finds an image like [`lookup`](Self::lookup); a name for an index gives its image for
    /// the host platform.
    pub fn resolve(&self, name_or_id: &str) -> Result<Option<StoredImage>, StoreError> {
        match self.lookup(name_or_id)? {
            None => Ok(None),
            Some(StoredRef::Image(img)) => Ok(Some(img)),
            Some(StoredRef::Index(x)) => {
                let host = Platform::host();
                self.image_in(&x, &host)?
                    .map(Some)
                    .ok_or_else(|| StoreError::Invalid {
                        path: PathBuf::from(name_or_id),
                        reason: format!(
                            "the index has no image for the host platform {host} (it has {})",
                            platform_names(&x.body.platforms())
                        ),
                    })
            }
        }
    }

    /// Loads what an `index.json` entry names: an image, or an index.
    fn load(&self, desc: &Descriptor) -> Result<StoredRef, StoreError> {
        if !is_index_type(&desc.media_type) {
            return self.load_image(desc).map(StoredRef::Image);
        }
        let bytes = self.read_blob(&desc.digest)?;
        let body = Index::from_json(&bytes).map_err(|source| StoreError::Format {
            what: format!("index {}", desc.digest),
            source,
        })?;
        let mut desc = desc.clone();
        desc.annotations.clear();
        Ok(StoredRef::Index(StoredIndex { desc, body }))
    }

    /// Loads the image a manifest descriptor names.
    pub fn load_image(&self, desc: &Descriptor) -> Result<StoredImage, StoreError> {
        let mut desc = desc.clone();
        desc.annotations.clear();
        desc.platform = None;
        let bytes = self.read_blob(&desc.digest)?;
        let manifest_body = Manifest::from_json(&bytes).map_err(|source| StoreError::Format {
            what: format!("manifest {}", desc.digest),
            source,
        })?;
        let config_digest = manifest_body.config.digest;
        let config_bytes = self.read_blob(&config_digest)?;
        let config =
            ImageConfig::from_json(&config_bytes).map_err(|source| StoreError::Format {
                what: format!("config {config_digest}"),
                source,
            })?;
        Ok(StoredImage {
            manifest: desc,
            manifest_body,
            config,
            config_digest,
        })
    }

    /// Every image in `index.json`: name, tag, image id, size, created. Sorted by name.
    pub fn images(&self) -> Result<Vec<ImageEntry>, StoreError> {
        let idx = self.read_index()?;
        let mut out = Vec::new();
        for d in &idx.manifests {
            let (name, tag) = match d.ref_name() {
                Some(n) => split_name(n),
                None => ("<none>".to_string(), "<none>".to_string()),
            };
            let item = self.load(d)?;
            let id = item.id();
            let (size, created, platforms) = match item {
                StoredRef::Image(img) => {
                    let platform = img.config.platform().normalized();
                    (
                        img.size(),
                        img.config.created,
                        Vec::from_iter((!platform.is_unknown()).then_some(platform)),
                    )
                }
                StoredRef::Index(x) => {
                    // Only the images that are here count: an index pulled for one platform
                    // lists the others without their content.
                    let present = self.present_images(&x)?;
                    let created = present
                        .iter()
                        .filter_map(|i| i.config.created.clone())
                        .max();
                    (
                        present.iter().map(StoredImage::size).sum(),
                        created,
                        x.body.platforms(),
                    )
                }
            };
            out.push(ImageEntry {
                name,
                tag,
                id,
                manifest: d.digest,
                size,
                created,
                platforms,
            });
        }
        out.sort_by(|a, b| (&a.name, &a.tag, a.id).cmp(&(&b.name, &b.tag, b.id)));
        Ok(out)
    }

    /// Removes the name `name`; returns whether it existed. Blobs stay until [`prune`](Self::prune).
    pub fn untag(&self, name: &str) -> Result<bool, StoreError> {
        self.update_index(|idx| {
            let before = idx.manifests.len();
            idx.manifests.retain(|d| d.ref_name() != Some(name));
            idx.manifests.len() != before
        })
    }

    /// Removes untagged images, then every blob, layer dir and cache record not reachable from a
    /// tag. Waits until no build holds a [`Lease`], so nothing a running build uses is removed
    /// (so never call it while holding a lease yourself).
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let gc = self.root.join("gc.lock");
        let gc_file = open_lock_file(&gc)?;
        gc_file.lock().at(&gc)?;
        let _index_guard = self.index_lock()?;
        let mut report = PruneReport::default();

        let mut idx = self.read_index()?;
        let before = idx.manifests.len();
        idx.manifests.retain(|d| d.ref_name().is_some());
        report.images_removed = before - idx.manifests.len();
        if report.images_removed > 0 {
            self.write_index(&idx)?;
        }

        let mut blobs = BTreeSet::new();
        let mut diff_ids = BTreeSet::new();
        for d in &idx.manifests {
            self.mark(d, &mut blobs, &mut diff_ids)?;
        }

        let mut removed = BTreeSet::new();
        let blobs_dir = self.blobs_dir();
        for (d, entry) in digest_named_entries(&blobs_dir)? {
            if blobs.contains(&d) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(entry.path()).at(&entry.path())?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
            removed.insert(d);
        }

        let promises = self.root.join("remote");
        for (d, entry) in digest_named_entries(&promises)? {
            if !blobs.contains(&d) || self.has_blob(&d) {
                fs::remove_file(entry.path()).at(&entry.path())?;
            }
        }

        let layers = self.root.join("layers");
        for (d, _) in digest_named_entries(&layers)? {
            if diff_ids.contains(&d) {
                continue;
            }
            self.discard_layer_dir(&d)?;
            report.layer_dirs_removed += 1;
            removed.insert(d);
        }

        let cache = self.root.join("cache");
        for entry in fs::read_dir(&cache).at(&cache)? {
            let entry = entry.at(&cache)?;
            let path = entry.path();
            let keep = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| {
                    let mut mentioned = BTreeSet::new();
                    digests_in(&v, &mut mentioned);
                    mentioned.is_disjoint(&removed)
                });
            if !keep {
                fs::remove_file(&path).at(&path)?;
                report.cache_records_removed += 1;
            }
        }
        Ok(report)
    }

    /// Adds the blobs (and diff_ids) reachable from `desc` to the sets.
    fn mark(
        &self,
        desc: &Descriptor,
        blobs: &mut BTreeSet<Digest>,
        diff_ids: &mut BTreeSet<Digest>,
    ) -> Result<(), StoreError> {
        if !blobs.insert(desc.digest) {
            return Ok(());
        }
        let bytes = self.read_blob(&desc.digest)?;
        if is_index_type(&desc.media_type) {
            let idx = Index::from_json(&bytes).map_err(|source| StoreError::Format {
                what: format!("index {}", desc.digest),
                source,
            })?;
            // An index may list images that were never pulled (other platforms).
            for child in idx.manifests.iter().filter(|c| self.has_blob(&c.digest)) {
                self.mark(child, blobs, diff_ids)?;
            }
            return Ok(());
        }
        let m = Manifest::from_json(&bytes).map_err(|source| StoreError::Format {
            what: format!("manifest {}", desc.digest),
            source,
        })?;
        blobs.insert(m.config.digest);
        blobs.extend(m.layers.iter().map(|l| l.digest));
        let config =
            ImageConfig::from_json(&self.read_blob(&m.config.digest)?).map_err(|source| {
                StoreError::Format {
                    what: format!("config {}", m.config.digest),
                    source,
                }
            })?;
        diff_ids.extend(config.rootfs.diff_ids);
        Ok(())
    }

    fn cache_path(&self, key: &Digest) -> PathBuf {
        self.root.join("cache").join(format!("{}.json", key.hex()))
    }

    /// The cache record stored under `key`, if any.
    pub fn cache_get(&self, key: &Digest) -> Result<Option<serde_json::Value>, StoreError> {
        let path = self.cache_path(key);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Json { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Stores a cache record under `key` (atomically). Prune deletes a record when a blob or
    /// layer dir whose digest appears in any of its strings (`"sha256:<hex>"`) is removed.
    pub fn cache_put(&self, key: &Digest, record: &serde_json::Value) -> Result<(), StoreError> {
        self.write_atomic(&self.cache_path(key), &canonical_json(record))
    }

    /// Takes a shared lease for a running build; prune waits for all leases to end.
    pub fn build_lease(&self) -> Result<Lease, StoreError> {
        let path = self.root.join("gc.lock");
        let file = open_lock_file(&path)?;
        file.lock_shared().at(&path)?;
        Ok(Lease { _file: file })
    }

    /// Checks the invariants: every blob hashes to its name, every blob referenced from
    /// `index.json` exists (or is promised), documents parse, and no stray files lie outside
    /// `tmp/`.
    pub fn fsck(&self) -> Result<FsckReport, StoreError> {
        let _lease = self.build_lease()?;
        let mut report = FsckReport::default();
        let known = [
            "blobs",
            "index.json",
            "oci-layout",
            "layers",
            "unsynced",
            "cache",
            "tmp",
            "lock",
            "gc.lock",
            "mounts",
            "remote",
        ];
        for entry in fs::read_dir(&self.root).at(&self.root)? {
            let entry = entry.at(&self.root)?;
            if !known.iter().any(|k| entry.file_name() == *k) {
                report
                    .problems
                    .push(FsckProblem::Stray { path: entry.path() });
            }
        }
        let blobs_parent = self.root.join("blobs");
        for entry in fs::read_dir(&blobs_parent).at(&blobs_parent)? {
            let entry = entry.at(&blobs_parent)?;
            if entry.file_name() != "sha256" {
                report
                    .problems
                    .push(FsckProblem::Stray { path: entry.path() });
            }
        }

        let blobs_dir = self.blobs_dir();
        let mut present = BTreeSet::new();
        for entry in fs::read_dir(&blobs_dir).at(&blobs_dir)? {
            let entry = entry.at(&blobs_dir)?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(d) = name.to_str().and_then(|n| Digest::from_hex(n).ok()) else {
                report.problems.push(FsckProblem::Stray { path });
                continue;
            };
            if !entry.file_type().at(&path)?.is_file() {
                report.problems.push(FsckProblem::Stray { path });
                continue;
            }
            let file = File::open(&path).at(&path)?;
            let mut reader = HashingReader::new(file);
            io::copy(&mut reader, &mut io::sink()).at(&path)?;
            let (_, actual, _) = reader.finish();
            report.blobs_checked += 1;
            if actual != d {
                report
                    .problems
                    .push(FsckProblem::CorruptBlob { path, actual });
            }
            present.insert(d);
        }

        for (dir, suffix) in [
            ("layers", ""),
            ("unsynced", ""),
            ("cache", ".json"),
            ("remote", ""),
        ] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).at(&dir)? {
                let entry = entry.at(&dir)?;
                let name = entry.file_name();
                let ok = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(suffix))
                    .is_some_and(|hex| Digest::from_hex(hex).is_ok());
                if !ok {
                    report
                        .problems
                        .push(FsckProblem::Stray { path: entry.path() });
                }
            }
        }

        // A promised blob counts as present: it is fetched when first read.
        let promised = self.root.join("remote");
        for (d, _) in digest_named_entries(&promised)? {
            present.insert(d);
        }
        match self.read_index() {
            Ok(idx) => {
                for d in &idx.manifests {
                    let what = d.ref_name().map_or_else(
                        || format!("index.json entry {}", d.digest),
                        |n| format!("image {n}"),
                    );
                    self.fsck_refs(d, &what, &present, &mut report);
                }
            }
            Err(e) => report.problems.push(FsckProblem::Unreadable {
                what: self.index_path().display().to_string(),
                reason: e.to_string(),
            }),
        }
        Ok(report)
    }

    /// Records missing or unreadable blobs reachable from `desc`.
    fn fsck_refs(
        &self,
        desc: &Descriptor,
        what: &str,
        present: &BTreeSet<Digest>,
        report: &mut FsckReport,
    ) {
        let missing = |d: &Digest, report: &mut FsckReport| {
            let gone = !present.contains(d);
            if gone {
                report.problems.push(FsckProblem::MissingBlob {
                    digest: *d,
                    referenced_by: what.to_string(),
                });
            }
            gone
        };
        if missing(&desc.digest, report) {
            return;
        }
        let unreadable = |reason: String, report: &mut FsckReport| {
            report.problems.push(FsckProblem::Unreadable {
                what: format!("{what}: blob {}", desc.digest),
                reason,
            });
        };
        let bytes = match self.read_blob(&desc.digest) {
            Ok(b) => b,
            Err(e) => return unreadable(e.to_string(), report),
        };
        if is_index_type(&desc.media_type) {
            match Index::from_json(&bytes) {
                Ok(idx) => {
                    // An index may list images that were never pulled (other platforms).
                    for child in idx.manifests.iter().filter(|c| present.contains(&c.digest)) {
                        self.fsck_refs(child, what, present, report);
                    }
                }
                Err(e) => unreadable(e.to_string(), report),
            }
            return;
        }
        let m = match Manifest::from_json(&bytes) {
            Ok(m) => m,
            Err(e) => return unreadable(e.to_string(), report),
        };
        for d in std::iter::once(&m.config).chain(&m.layers) {
            missing(&d.digest, report);
        }
        if present.contains(&m.config.digest)
            && let Err(e) = self.read_blob(&m.config.digest).and_then(|b| {
                ImageConfig::from_json(&b).map_err(|source| StoreError::Format {
                    what: format!("config {}", m.config.digest),
                    source,
                })
            })
        {
            unreadable(e.to_string(), report);
        }
    }

    /// Reads `index.json` (always complete: it is replaced by rename).
    fn read_index(&self) -> Result<Index, StoreError> {
        let path = self.index_path();
        let bytes = fs::read(&path).at(&path)?;
        Index::from_json(&bytes).map_err(|source| StoreError::Format {
            what: path.display().to_string(),
            source,
        })
    }

    fn write_index(&self, idx: &Index) -> Result<(), StoreError> {
        let mut idx = idx.clone();
        idx.manifests.sort_by(|a, b| {
            (a.ref_name().is_none(), a.ref_name(), a.digest).cmp(&(
                b.ref_name().is_none(),
                b.ref_name(),
                b.digest,
            ))
        });
        self.write_atomic(&self.index_path(), &canonical_json(&idx))
    }

    /// Applies `change` to `index.json` under the index lock; writes it back if `change`
    /// returns true. Returns that flag.
    fn update_index(&self, change: impl FnOnce(&mut Index) -> bool) -> Result<bool, StoreError> {
        let _guard = self.index_lock()?;
        let mut idx = self.read_index()?;
        let changed = change(&mut idx);
        if changed {
            self.write_index(&idx)?;
        }
        Ok(changed)
    }

    /// The short exclusive lock around `index.json` updates, released on drop.
    fn index_lock(&self) -> Result<File, StoreError> {
        let path = self.root.join("lock");
        let file = open_lock_file(&path)?;
        file.lock().at(&path)?;
        Ok(file)
    }

    /// Writes `bytes` to `dest` atomically: temp file in our session, fsync, rename, fsync dir.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let mut tmp = NamedTempFile::new_in(&self.session.dir).at(&self.session.dir)?;
        tmp.write_all(bytes).at(tmp.path())?;
        persist_synced(tmp, dest)?;
        match dest.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .at(path)
}

impl Session {
    /// Creates `tmp/s-<id>` holding an exclusively locked `lock` file. It is prepared under a
    /// `.new-` name and renamed, so others never see an unlocked session directory.
    fn create(tmp: &Path) -> Result<Session, StoreError> {
        let staging = tempfile::Builder::new()
            .prefix(".new-")
            .tempdir_in(tmp)
            .at(tmp)?;
        let lock_path = staging.path().join("lock");
        let lock = open_lock_file(&lock_path)?;
        lock.lock().at(&lock_path)?;
        let id = staging
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(".new-"))
            .unwrap_or("x")
            .to_string();
        let dir = tmp.join(format!("s-{id}"));
        fs::rename(staging.path(), &dir).at(&dir)?;
        // The staging TempDir now points at nothing; forget it rather than delete.
        let _ = staging.keep();
        Ok(Session { dir, _lock: lock })
    }
}

/// Removes scratch entries under `tmp` whose owner is gone: session dirs whose lock can be
/// taken, and anything else untouched for [`STALE_AFTER`]. Errors are ignored (best effort).
fn clean_stale(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with("s-")) {
            match File::open(path.join("lock")) {
                Ok(f) => {
                    if f.try_lock().is_ok() {
                        let _ = fs::remove_dir_all(&path);
                    }
                }
                Err(_) => {
                    let _ = fs::remove_dir_all(&path);
                }
            }
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
}

/// Reads at most `limit` bytes from `r`; more is an error naming `what`.
fn read_limited(mut r: impl Read, limit: u64, what: &Path) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::new();
    r.by_ref().take(limit + 1).read_to_end(&mut buf).at(what)?;
    if buf.len() as u64 > limit {
        return Err(StoreError::Invalid {
            path: what.to_path_buf(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(
            split_name("docker.io/library/busybox:1.36"),
            ("docker.io/library/busybox".into(), "1.36".into())
        );
        assert_eq!(
            split_name("localhost:5000/app"),
            ("localhost:5000/app".into(), "<none>".into())
        );
        assert_eq!(split_name("a/b@sha256:00"), ("a/b".into(), "<none>".into()));
    }

    #[test]
    fn stale_sessions_are_cleaned_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        let a_session = a.session.dir.clone();
        // A session left by a dead process: directory with an unlocked lock file.
        let dead = dir.path().join("tmp/s-dead");
        fs::create_dir_all(&dead).unwrap();
        fs::write(dead.join("lock"), b"").unwrap();
        fs::write(dead.join("blob-partial"), b"half").unwrap();
        let b = Store::open(dir.path()).unwrap();
        assert!(a_session.is_dir(), "live session must survive");
        assert!(!dead.exists(), "dead session must be removed");
        drop(a);
        assert!(!a_session.exists());
        drop(b);
    }

    #[test]
    fn layer_dirs_from_an_earlier_boot_are_dropped_and_old_ones_of_this_boot_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let install = |name: &str| {
            let diff = Digest::of(name.as_bytes());
            let populated = store.scratch_dir().unwrap().keep();
            fs::write(populated.join("file"), name).unwrap();
            store.install_layer_dir(&diff, &populated).unwrap();
            let marker = dir.path().join("unsynced").join(diff.hex());
            assert_eq!(fs::read_to_string(&marker).unwrap(), boot_id());
            (diff, marker)
        };
        let (before_crash, crash_marker) = install("before a reboot");
        let (settled, old_marker) = install("ten minutes ago");
        let (fresh, fresh_marker) = install("just now");
        fs::write(&crash_marker, "a-boot-before-this-one").unwrap();
        let long_ago = SystemTime::now() - UNSYNCED_GRACE - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&old_marker)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert!(store.layer_dir(&before_crash).is_none(), "may be torn");
        assert!(!crash_marker.exists());
        assert!(store.layer_dir(&settled).is_some());
        assert!(!old_marker.exists(), "settled by syncfs");
        assert!(store.layer_dir(&fresh).is_some());
        assert!(fresh_marker.exists(), "still unsynced");
        assert!(store.fsck().unwrap().problems.is_empty());
    }
}
