//! Layers: an overlay upper dir → OCI layer tar (streamed, compressed, digested); a layer blob →
//! an unpacked directory usable as an overlay lower dir; and archive extraction for `ADD`.
//!
//! Rules (DESIGN.md §5): entries sorted by path, mtimes clamped to SOURCE_DATE_EPOCH, numeric
//! owners without names, overlay whiteouts translated to OCI whiteouts and back, hardlinks kept,
//! symlinks never followed, xattrs carried in PAX records, every extraction path-safe.

mod compress;
mod extract;
mod pgzip;
mod speculate;
mod write;

use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::rootfs::RootfsError;

pub use extract::{UnpackNotes, Unpacked, extract_archive, is_archive, unpack_layer};
pub use speculate::{Precompressed, Speculation};
pub use write::{
    ListedEntry, ListedKind, layer_xattrs, upper_has_changes, write_layer, write_layer_with,
    write_listed_layer,
};

/// How a layer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    /// Clamp file mtimes to this time (seconds since the epoch) when set.
    pub source_date_epoch: Option<i64>,
    /// Compression of the layer blob.
    pub compression: Compression,
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// gzip at a fixed level with a fixed header (no name, mtime 0, OS byte 255), compressed
    /// block-parallel with output independent of the thread count.
    #[default]
    Gzip,
    /// zstd at a fixed level, single-threaded, no checksum or content size in the frame.
    Zstd,
    /// The plain tar.
    None,
}

/// What [`write_layer`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSummary {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Length of the uncompressed tar in bytes.
    pub uncompressed_size: u64,
    /// Number of entries in the tar (files, directories, links, whiteouts).
    pub entries: u64,
}

/// Errors from writing, unpacking or extracting layers and archives; each names its path.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O error on a host path.
    #[error("{op} {}: {err}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        err: io::Error,
    },
    /// A path-safe operation inside a root failed or was refused.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// A file whose name OCI reserves for whiteouts (`.wh.*`).
    #[error(
        "{}: names starting with .wh. are reserved for OCI whiteouts; refusing to put it in a layer",
        path.display()
    )]
    ReservedName {
        /// The path (in the layer or archive).
        path: PathBuf,
    },
    /// An overlayfs feature kiln mounts without (redirect_dir, metacopy) shows up in an upper dir.
    #[error("{}: has overlay xattr {xattr}; kiln needs overlays mounted with redirect_dir=off,metacopy=off", path.display())]
    OverlayFeature {
        /// The path in the upper dir.
        path: PathBuf,
        /// The xattr found.
        xattr: String,
    },
    /// A file changed size while it was being written into the layer.
    #[error("{}: file changed while being read (expected {expected} bytes, got {got})", path.display())]
    FileChanged {
        /// The path in the upper dir.
        path: PathBuf,
        /// Size from stat.
        expected: u64,
        /// Bytes actually read.
        got: u64,
    },
    /// An archive entry whose path or link target would leave the destination.
    #[error("archive entry {}: {reason}", path.display())]
    UnsafeEntry {
        /// The entry's path as stored in the archive.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A device node or FIFO in an `ADD` archive (never created, never opened).
    #[error("archive entry {}: {kind} entries are refused in ADD archives (never created or opened)", path.display())]
    SpecialFile {
        /// The entry's path.
        path: PathBuf,
        /// "character device", "block device" or "FIFO".
        kind: &'static str,
    },
    /// An entry type kiln does not unpack.
    #[error("archive entry {}: unsupported tar entry type {kind:?}", path.display())]
    UnsupportedEntry {
        /// The entry's path.
        path: PathBuf,
        /// The raw type flag.
        kind: char,
    },
    /// The archive or layer stream itself is malformed or could not be read.
    #[error("reading {what}: {err}")]
    Read {
        /// "layer" or the archive path.
        what: String,
        /// The underlying error.
        err: io::Error,
    },
}

impl SnapshotError {
    fn io(op: &'static str, path: &Path, err: io::Error) -> Self {
        SnapshotError::Io {
            op,
            path: path.to_path_buf(),
            err,
        }
    }
}

/// Prefix of OCI whiteout names.
const WH_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
const WH_OPAQUE: &[u8] = b".wh..wh..opq";

/// Whether an xattr is host- or overlay-specific and never goes into, or comes out of, a layer.
fn xattr_is_private(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name == b"security.selinux"
        || name == b"system.nfs4_acl"
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(super) fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
