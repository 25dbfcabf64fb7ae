//! Layer tar → overlay lower dir (`unpack_layer`) and `ADD` archive extraction
//! (`extract_archive`). Both resolve every entry path and link target inside the destination
//! through [`RootDir`], so `..`, absolute paths and planted symlinks cannot lead outside it.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tar::{Archive, Entry, EntryType, Header};

use super::compress::{self, Format};
use super::{SnapshotError, WH_OPAQUE, WH_PREFIX, xattr_is_private};
use crate::digest::{Digest, HashingReader};
use crate::rootfs::{RootDir, RootfsError};

/// What [`unpack_layer`] produced.
#[derive(Debug)]
pub struct Unpacked {
    /// sha256 of the uncompressed tar; the caller compares it with the image config's.
    pub diff_id: Digest,
    /// What could not be made exactly as the layer says (only without root on the host).
    pub notes: UnpackNotes,
}

/// Where an unpacked layer differs from its tar because kiln runs in a user namespace (a normal
/// user's kiln): the layer blob itself is unchanged, only the rootfs steps see differs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnpackNotes {
    /// Entries whose owner is not mapped in the user namespace: they are owned by root.
    pub unmapped_owners: u64,
    /// Device nodes, which a user namespace cannot create: empty regular files stand in.
    pub device_placeholders: Vec<PathBuf>,
    /// `trusted.*` xattrs (root on the host only) that were left out.
    pub skipped_xattrs: u64,
}

impl UnpackNotes {
    /// True when the unpacked dir is exactly what the layer says.
    pub fn is_empty(&self) -> bool {
        *self == UnpackNotes::default()
    }
}

/// Decompress (gzip or zstd detected by magic, or plain tar) and unpack a layer into `dest` (an empty dir)
/// in overlayfs-native form, so `dest` can serve as an overlay lowerdir: OCI `.wh.NAME` → char
/// device 0/0 named NAME; `.wh..wh..opq` → xattr `trusted.overlay.opaque=y` on the dir (in a
/// user namespace, where `trusted.*` is out of reach, `user.overlay.opaque=y`, which is what
/// overlayfs mounted there with `userxattr` reads).
/// Path-safe (entries with `..` that climb out are refused; absolute paths, paths through
/// symlinks and hardlink targets resolve inside `dest`).
pub fn unpack_layer<R: Read>(blob: R, dest: &Path) -> Result<Unpacked, SnapshotError> {
    let read_err = |err| SnapshotError::Read {
        what: "layer".into(),
        err,
    };
    let mut input = compress::buffered(blob);
    let fmt = compress::sniff(&mut input).map_err(read_err)?;
    let tar: Box<dyn Read> = match fmt {
        Format::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Format::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(input).map_err(read_err)?)
        }
        Format::Plain => Box::new(input),
        other => {
            return Err(read_err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("unsupported layer compression {}", other.name()),
            )));
        }
    };
    let mut hashed = HashingReader::new(tar);
    let root = RootDir::open_host(dest)?;
    let notes = Applier::new(&root, Vec::new(), Mode::Layer).run(&mut hashed, "layer")?;
    // The diff_id covers the whole stream, including padding after the end-of-archive blocks.
    io::copy(&mut hashed, &mut io::sink()).map_err(read_err)?;
    Ok(Unpacked {
        diff_id: hashed.finish().1,
        notes,
    })
}

/// For `ADD local.tar dest`: is this file an archive kiln extracts? (tar, gzip/bzip2/xz-compressed
/// tar; detected by content: the first 512 bytes, decompressed, must be a valid tar header).
pub fn is_archive(path: &Path) -> io::Result<bool> {
    let mut input = compress::buffered(File::open(path)?);
    let fmt = compress::sniff(&mut input)?;
    let Ok(mut r) = compress::decoder(input, fmt) else {
        return Ok(false);
    };
    let mut block = [0u8; 512];
    let Ok(n) = super::read_full(&mut r, &mut block) else {
        return Ok(false);
    };
    Ok(n == block.len() && valid_header(&block))
}

/// A non-zero block whose stored checksum matches (the test GNU tar and Go's reader apply).
fn valid_header(block: &[u8; 512]) -> bool {
    if block.iter().all(|&b| b == 0) {
        return false;
    }
    let h = Header::from_byte_slice(block);
    let Ok(stored) = h.cksum() else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(b)
            }
        })
        .sum();
    stored == sum
}

/// Extract an archive (plain / gzip / bzip2 / xz tar, detected by magic) into `dest_dir` inside
/// `root` (a mounted merged rootfs), as Docker's ADD does: path-safe; owners kept (or `chown`
/// override); `.wh.*` entries refused (error names the path); device nodes and FIFOs never
/// opened — refused with an error that says which; hardlinks must point inside.
/// An entry for the archive's own top directory (`./`) does not change `dest_dir`.
pub fn extract_archive(
    archive: &Path,
    root: &RootDir,
    dest_dir: &str,
    chown: Option<(u32, u32)>,
) -> Result<(), SnapshotError> {
    let what = archive.display().to_string();
    let read_err = |err| SnapshotError::Read {
        what: what.clone(),
        err,
    };
    let f = File::open(archive).map_err(|e| SnapshotError::io("open", archive, e))?;
    let mut input = compress::buffered(f);
    let fmt = compress::sniff(&mut input).map_err(read_err)?;
    let r = compress::decoder(input, fmt).map_err(read_err)?;
    let base = clean_entry(dest_dir.as_bytes()).map_err(|reason| SnapshotError::UnsafeEntry {
        path: dest_dir.into(),
        reason,
    })?;
    root.mkdir_all(bytes_path(&base), 0o755, 0, 0)?;
    Applier::new(root, base, Mode::Add { chown })
        .run(r, &what)
        .map(drop)
}

/// What the applier is unpacking.
#[derive(Clone, Copy)]
enum Mode {
    /// A layer into overlay-native form: whiteouts converted, devices created.
    Layer,
    /// An `ADD` archive: whiteout names and special files refused, owners optionally overridden.
    Add { chown: Option<(u32, u32)> },
}

/// Applies tar entries to a [`RootDir`].
struct Applier<'a> {
    root: &'a RootDir,
    /// Where in the root entries land (cleaned, relative; empty = the root itself).
    base: Vec<u8>,
    mode: Mode,
    /// Directory mtimes, set last so creating their contents does not change them.
    dir_times: Vec<(PathBuf, i64)>,
    /// The xattr that marks an opaque dir: `trusted.overlay.opaque` until the kernel refuses it.
    opaque_xattr: &'static str,
    notes: UnpackNotes,
}

/// Lexically cleans an archive path into a relative one: a leading `/`, `.` and empty components
/// are dropped, `a/..` cancels; climbing above the top is an error.
fn clean_entry(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("path climbs out of the destination with '..'".into());
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

fn bytes_path(b: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(b))
}

/// The entry metadata the applier needs, read before the data is consumed.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_meta<R: Read>(entry: &mut Entry<'_, R>) -> io::Result<Meta> {
    let h = entry.header();
    let old = h.as_old();
    let mut m = Meta {
        mode: numeric(&old.mode, h.mode().map(u64::from))? as u32 & 0o7777,
        uid: u32::try_from(numeric(&old.uid, h.uid())?).unwrap_or(u32::MAX),
        gid: u32::try_from(numeric(&old.gid, h.gid())?).unwrap_or(u32::MAX),
        mtime: i64::try_from(numeric(&old.mtime, h.mtime())?).unwrap_or(i64::MAX),
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let (k, v) = (ext.key_bytes(), ext.value_bytes());
            // PAX numbers are decimal; times may carry a fraction.
            let num =
                || -> Option<i64> { std::str::from_utf8(v).ok()?.split('.').next()?.parse().ok() };
            let id = || num().and_then(|n| u32::try_from(n).ok());
            match k {
                b"uid" => m.uid = id().unwrap_or(m.uid),
                b"gid" => m.gid = id().unwrap_or(m.gid),
                b"mtime" => m.mtime = num().unwrap_or(m.mtime),
                _ => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.")
                        && !xattr_is_private(name)
                        && let Ok(name) = std::str::from_utf8(name)
                    {
                        m.xattrs.push((name.to_string(), v.to_vec()));
                    }
                }
            }
        }
    }
    Ok(m)
}

/// A numeric header field: an empty one (all NULs or spaces, as some writers leave them) is 0.
fn numeric(raw: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    if raw.iter().all(|&b| b == 0 || b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

impl<'a> Applier<'a> {
    fn new(root: &'a RootDir, base: Vec<u8>, mode: Mode) -> Self {
        Applier {
            root,
            base,
            mode,
            dir_times: Vec::new(),
            opaque_xattr: "trusted.overlay.opaque",
            notes: UnpackNotes::default(),
        }
    }

    /// Where an archive path lands in the root, or why it is refused.
    fn target(&self, raw: &[u8]) -> Result<Vec<u8>, SnapshotError> {
        let rel = clean_entry(raw).map_err(|reason| SnapshotError::UnsafeEntry {
            path: bytes_path(raw).to_path_buf(),
            reason,
        })?;
        let mut t = self.base.clone();
        if !t.is_empty() && !rel.is_empty() {
            t.push(b'/');
        }
        t.extend_from_slice(&rel);
        Ok(t)
    }

    fn run<R: Read>(mut self, r: R, what: &str) -> Result<UnpackNotes, SnapshotError> {
        let read_err = |err| SnapshotError::Read {
            what: what.to_string(),
            err,
        };
        let mut ar = Archive::new(r);
        for entry in ar.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            self.entry(&mut entry).map_err(|e| match e {
                Step::Snapshot(e) => e,
                Step::Read(err) => read_err(err),
            })?;
        }
        for (p, t) in self.dir_times.iter().rev() {
            match self.root.set_mtime(p, *t) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => r?,
            }
        }
        Ok(self.notes)
    }

    /// Marks `dir` opaque, in the `user.` namespace where `trusted.` is refused.
    fn set_opaque(&mut self, dir: &Path) -> Result<(), SnapshotError> {
        match self.root.set_xattr(dir, self.opaque_xattr, b"y") {
            Err(e)
                if e.raw_os_error() == Some(libc::EPERM)
                    && self.opaque_xattr.starts_with("trusted.") =>
            {
                self.opaque_xattr = "user.overlay.opaque";
                Ok(self.root.set_xattr(dir, self.opaque_xattr, b"y")?)
            }
            r => Ok(r?),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut Entry<'_, R>) -> Result<(), Step> {
        let raw = entry.path_bytes().into_owned();
        let ty = entry.header().entry_type();
        if ty == EntryType::XGlobalHeader {
            return Ok(());
        }
        let raw_path = || bytes_path(&raw).to_path_buf();
        let target = self.target(&raw)?;
        let tpath = bytes_path(&target).to_path_buf();
        let (parent, name) = match target.iter().rposition(|&b| b == b'/') {
            Some(i) => (&target[..i], &target[i + 1..]),
            None => (&target[..0], &target[..]),
        };
        let parent = bytes_path(parent).to_path_buf();
        let entry_is_root = target.len() == self.base.len();

        if name.starts_with(WH_PREFIX) && !entry_is_root {
            match self.mode {
                Mode::Add { .. } => {
                    return Err(SnapshotError::ReservedName { path: raw_path() }.into());
                }
                Mode::Layer => {
                    self.root.mkdir_all(&parent, 0o755, 0, 0)?;
                    if name == WH_OPAQUE {
                        self.set_opaque(&parent)?;
                        return Ok(());
                    }
                    let hidden = &name[WH_PREFIX.len()..];
                    if hidden.is_empty() || hidden == b"." || hidden == b".." {
                        return Err(SnapshotError::UnsafeEntry {
                            path: raw_path(),
                            reason: "malformed whiteout name".into(),
                        }
                        .into());
                    }
                    let p = parent.join(std::ffi::OsStr::from_bytes(hidden));
                    // A whiteout hides lower layers only: something this layer already put
                    // there stays.
                    if !self.root.exists(&p)? {
                        self.root.mknod(&p, libc::S_IFCHR, 0, 0)?;
                    }
                    return Ok(());
                }
            }
        }

        let meta = read_meta(entry).map_err(Step::Read)?;
        if !entry_is_root {
            self.root.mkdir_all(&parent, 0o755, 0, 0)?;
        }
        match ty {
            EntryType::Directory => {
                if entry_is_root {
                    if let Mode::Add { .. } = self.mode {
                        return Ok(());
                    }
                } else {
                    match self.root.symlink_metadata(&tpath) {
                        Ok(md) if md.is_dir() => {}
                        Ok(_) => self.root.remove_all(&tpath)?,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.root.mkdir_all(&tpath, 0o700, 0, 0)?;
                }
                self.finish(&tpath, &meta, Kind::Dir)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.clear_dir(&tpath)?;
                let mut f = self.root.create_file(&tpath, 0o600)?;
                io::copy(entry, &mut f).map_err(Step::Read)?;
                drop(f);
                self.finish(&tpath, &meta, Kind::Other)?;
            }
            EntryType::Symlink => {
                let Some(link) = entry.link_name_bytes() else {
                    return Err(unsafe_entry(raw_path(), "symlink without a target"));
                };
                self.clear_dir(&tpath)?;
                self.root.symlink(bytes_path(&link), &tpath)?;
                self.finish(&tpath, &meta, Kind::Symlink)?;
            }
            EntryType::Link => {
                let Some(link) = entry.link_name_bytes() else {
                    return Err(unsafe_entry(raw_path(), "hardlink without a target"));
                };
                let src = self.target(&link)?;
                if src.len() == self.base.len() {
                    return Err(unsafe_entry(
                        raw_path(),
                        "hardlink to the destination itself",
                    ));
                }
                self.clear_dir(&tpath)?;
                self.root.hardlink(bytes_path(&src), &tpath)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (fmt, kind) = match ty {
                    EntryType::Char => (libc::S_IFCHR, "character device"),
                    EntryType::Block => (libc::S_IFBLK, "block device"),
                    _ => (libc::S_IFIFO, "FIFO"),
                };
                if let Mode::Add { .. } = self.mode {
                    return Err(SnapshotError::SpecialFile {
                        path: raw_path(),
                        kind,
                    }
                    .into());
                }
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                self.clear_dir(&tpath)?;
                match self.root.mknod(&tpath, fmt | meta.mode, major, minor) {
                    // A user namespace may make FIFOs but no devices: an empty file stands in.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) && fmt != libc::S_IFIFO => {
                        self.root.create_file(&tpath, 0o600)?;
                        self.notes.device_placeholders.push(tpath.clone());
                    }
                    r => r?,
                }
                self.finish(&tpath, &meta, Kind::Other)?;
            }
            other => {
                return Err(SnapshotError::UnsupportedEntry {
                    path: raw_path(),
                    kind: char::from(other.as_byte()),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Removes a directory in the way of a non-directory entry (non-directories are replaced by
    /// the create call itself).
    fn clear_dir(&self, p: &Path) -> Result<(), SnapshotError> {
        match self.root.symlink_metadata(p) {
            Ok(md) if md.is_dir() => Ok(self.root.remove_all(p)?),
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Owner, then mode, then xattrs (chown clears security.capability), then the mtime
    /// (deferred for directories).
    fn finish(&mut self, p: &Path, m: &Meta, kind: Kind) -> Result<(), SnapshotError> {
        let (uid, gid) = match self.mode {
            Mode::Add { chown: Some(o) } => o,
            _ => (m.uid, m.gid),
        };
        match self.root.lchown(p, uid, gid) {
            // An owner the user namespace does not map: the entry stays root's.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL) && matches!(self.mode, Mode::Layer) =>
            {
                self.notes.unmapped_owners += 1;
            }
            r => r?,
        }
        if !matches!(kind, Kind::Symlink) {
            self.root.chmod(p, m.mode)?;
        }
        for (k, v) in &m.xattrs {
            if !v.is_empty() {
                match self.root.set_xattr(p, k, v) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::EPERM) && k.starts_with("trusted.") =>
                    {
                        self.notes.skipped_xattrs += 1;
                    }
                    r => r?,
                }
            }
        }
        if matches!(kind, Kind::Dir) {
            self.dir_times.push((p.to_path_buf(), m.mtime));
        } else {
            self.root.set_mtime(p, m.mtime)?;
        }
        Ok(())
    }
}

/// The file type, for what metadata applies.
#[derive(Clone, Copy)]
enum Kind {
    Dir,
    Symlink,
    Other,
}

/// An entry failed: either a snapshot error or an error reading the stream.
enum Step {
    Snapshot(SnapshotError),
    Read(io::Error),
}

impl From<SnapshotError> for Step {
    fn from(e: SnapshotError) -> Self {
        Step::Snapshot(e)
    }
}

impl From<RootfsError> for Step {
    fn from(e: RootfsError) -> Self {
        Step::Snapshot(e.into())
    }
}

fn unsafe_entry(path: PathBuf, reason: &str) -> Step {
    Step::Snapshot(SnapshotError::UnsafeEntry {
        path,
        reason: reason.into(),
    })
}
