//! Upper dir → layer tar: one streaming pass (tar → sha256 for the diff_id → compressor → out).
//!
//! Entries come in depth-first order with each directory's children sorted by name bytes, so the
//! sequence is sorted by path components and every parent precedes its children. Headers are
//! built here (never `HeaderMode::Deterministic`): numeric owners, no names, full mode bits,
//! mtimes clamped to SOURCE_DATE_EPOCH, PAX records for long paths and xattrs.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::compress::Encoder;
use super::pgzip::{ALIGN_MIN, BLOCK_SIZE};
use super::speculate::{Precompressed, PrecompressedFile};
use super::{
    LayerOptions, LayerSummary, SnapshotError, WH_OPAQUE, WH_PREFIX, read_full, xattr_is_private,
};
use crate::digest::BackgroundHashingWriter;

/// Tar block size.
const BLOCK: u64 = 512;
/// Largest value of an 11-digit octal ustar field (size, mtime).
const MAX_OCTAL_11: u64 = 0o77777777777;
/// Largest value of a 7-digit octal ustar field (uid, gid).
const MAX_OCTAL_7: u64 = 0o7777777;
/// Buffer between the tar writer and the hasher/compressor.
const BUF_SIZE: usize = 256 * 1024;

/// True if the upper dir holds any change at all (cheap check: any entry).
pub fn upper_has_changes(upper: &Path) -> io::Result<bool> {
    Ok(fs::read_dir(upper)?.next().transpose()?.is_some())
}

/// Walk ONLY `upper` (an overlayfs upper dir, or any plain dir of new files), write the layer
/// (tar → sha256 for diff_id → compress) into `out`, return `out` and the summary.
pub fn write_layer<W: Write>(
    upper: &Path,
    opts: &LayerOptions,
    out: W,
) -> Result<(W, LayerSummary), SnapshotError> {
    write_layer_with(upper, opts, out, &Precompressed::default())
}

/// [`write_layer`], using the blocks of `pre` (compressed while the step ran) for the files
/// they still match; the layer's bytes are the same either way.
pub fn write_layer_with<W: Write>(
    upper: &Path,
    opts: &LayerOptions,
    out: W,
    pre: &Precompressed,
) -> Result<(W, LayerSummary), SnapshotError> {
    with_tar_writer(upper, opts, out, |tw| tw.walk(pre))
}

/// One entry of a layer given as a list rather than walked from a directory (see
/// [`write_listed_layer`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ListedEntry {
    /// Path in the layer: relative, `/`-separated, no trailing slash.
    pub path: Vec<u8>,
    /// What the entry is.
    pub kind: ListedKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (clamped like a walked entry's).
    pub mtime: i64,
    /// Extended attributes, sorted, as [`layer_xattrs`] returns them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The kind of a [`ListedEntry`].
#[derive(Clone, Debug, PartialEq)]
pub enum ListedKind {
    /// A directory.
    Dir,
    /// A regular file whose `size` bytes are read from `source` (never through a symlink).
    File {
        /// Where the content is read from.
        source: PathBuf,
        /// Its length; a file that changed length meanwhile is an error.
        size: u64,
    },
    /// A symbolic link to this target.
    Symlink(Vec<u8>),
}

/// Writes a layer of new entries described by `entries` (e.g. a COPY's sources, never created on
/// disk) exactly as [`write_layer`] would write a directory holding them: same order, headers,
/// clamping and streaming. `origin` names where the entries come from in errors. The entries may
/// come in any order; every parent directory must be listed.
pub fn write_listed_layer<W: Write>(
    mut entries: Vec<ListedEntry>,
    origin: &Path,
    opts: &LayerOptions,
    out: W,
) -> Result<(W, LayerSummary), SnapshotError> {
    // Sorted by path components: the walker's depth-first order with sorted children.
    entries.sort_by(|a, b| {
        a.path
            .split(|&c| c == b'/')
            .cmp(b.path.split(|&c| c == b'/'))
    });
    with_tar_writer(origin, opts, out, |tw| {
        for e in &entries {
            let name = e.path.rsplit(|&c| c == b'/').next().unwrap_or_default();
            if name.starts_with(WH_PREFIX) {
                return Err(SnapshotError::ReservedName {
                    path: rel_path(&e.path),
                });
            }
            let stat = Stat {
                mode: e.mode & 0o7777,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                rdev: 0,
            };
            match &e.kind {
                ListedKind::Dir => {
                    let mut rel = e.path.clone();
                    rel.push(b'/');
                    tw.entry(&rel, &stat, EntryType::Directory, 0, None, &e.xattrs)?;
                }
                ListedKind::File { source, size } => {
                    tw.entry(&e.path, &stat, EntryType::Regular, *size, None, &e.xattrs)?;
                    tw.copy_file(source, &e.path, *size, None)?;
                }
                ListedKind::Symlink(target) => {
                    let stat = Stat {
                        mode: 0o777,
                        ..stat
                    };
                    tw.entry(
                        &e.path,
                        &stat,
                        EntryType::Symlink,
                        0,
                        Some(target),
                        &e.xattrs,
                    )?;
                }
            }
        }
        Ok(())
    })
}

/// Sets up the tar → sha256 → compressor pipeline, lets `body` write the entries, then ends
/// the archive and returns `out` with the summary.
fn with_tar_writer<W: Write>(
    origin: &Path,
    opts: &LayerOptions,
    out: W,
    body: impl FnOnce(&mut TarWriter<'_, W>) -> Result<(), SnapshotError>,
) -> Result<(W, LayerSummary), SnapshotError> {
    let enc = Encoder::new(out, opts.compression)
        .map_err(|e| SnapshotError::io("start compressing layer from", origin, e))?;
    let sink = BufWriter::with_capacity(BUF_SIZE, BackgroundHashingWriter::new(enc));
    let mut tw = TarWriter {
        out: sink,
        epoch: opts.source_date_epoch,
        entries: 0,
        links: HashMap::new(),
        upper: origin,
    };
    body(&mut tw)?;
    let w = |e| SnapshotError::io("write layer from", origin, e);
    tw.out.write_all(&[0u8; 2 * BLOCK as usize]).map_err(w)?;
    let entries = tw.entries;
    let hashing = tw.out.into_inner().map_err(|e| w(e.into_error()))?;
    let (enc, diff_id, uncompressed_size) = hashing.finish().map_err(w)?;
    let out = enc.finish().map_err(w)?;
    Ok((
        out,
        LayerSummary {
            diff_id,
            uncompressed_size,
            entries,
        },
    ))
}

/// The header fields of one entry that come from its inode.
struct Stat {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    rdev: u64,
}

impl From<&Metadata> for Stat {
    fn from(md: &Metadata) -> Stat {
        Stat {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            rdev: md.rdev(),
        }
    }
}

/// What kind of tar entry a walked file becomes.
enum Kind {
    Dir { opaque: bool },
    File,
    Link(Vec<u8>),
    Symlink(Vec<u8>),
    Device(EntryType),
    Fifo,
}

struct TarWriter<'a, W: Write> {
    out: BufWriter<BackgroundHashingWriter<Encoder<W>>>,
    epoch: Option<i64>,
    entries: u64,
    /// (dev, ino) of multiply-linked files → the layer path first written for them.
    links: HashMap<(u64, u64), Vec<u8>>,
    upper: &'a Path,
}

/// One directory being walked: its host path, its layer path (with trailing `/`, or empty for
/// the root) and its remaining children, sorted by layer name.
struct Frame {
    host: PathBuf,
    rel: Vec<u8>,
    children: std::vec::IntoIter<Child>,
}

/// A directory entry of the upper dir with its sort key and `lstat` data.
struct Child {
    key: Vec<u8>,
    name: OsString,
    md: Metadata,
}

/// An overlay whiteout: a character device 0/0.
fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

impl<W: Write> TarWriter<'_, W> {
    fn frame(&self, host: PathBuf, rel: Vec<u8>) -> Result<Frame, SnapshotError> {
        let mut children = Vec::new();
        for ent in fs::read_dir(&host).map_err(|e| SnapshotError::io("read dir", &host, e))? {
            let name = ent
                .map_err(|e| SnapshotError::io("read dir", &host, e))?
                .file_name();
            let p = host.join(&name);
            let md = fs::symlink_metadata(&p).map_err(|e| SnapshotError::io("stat", &p, e))?;
            // Sort by the name the entry gets in the layer: a whiteout sorts as `.wh.NAME`.
            let mut key = Vec::new();
            if is_whiteout(&md) {
                key.extend_from_slice(WH_PREFIX);
            }
            key.extend_from_slice(name.as_bytes());
            children.push(Child { key, name, md });
        }
        children.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Frame {
            host,
            rel,
            children: children.into_iter(),
        })
    }

    fn walk(&mut self, pre: &Precompressed) -> Result<(), SnapshotError> {
        let mut stack = vec![self.frame(self.upper.to_path_buf(), Vec::new())?];
        while let Some(top) = stack.last_mut() {
            let Some(Child { name, md, .. }) = top.children.next() else {
                stack.pop();
                continue;
            };
            let host = top.host.join(&name);
            let mut rel = top.rel.clone();
            rel.extend_from_slice(name.as_bytes());
            let parent_rel_len = top.rel.len();
            let ft = md.file_type();
            let stat = Stat::from(&md);
            if is_whiteout(&md) {
                if name.as_bytes().starts_with(WH_PREFIX) {
                    return Err(SnapshotError::ReservedName {
                        path: rel_path(&rel),
                    });
                }
                let mut wh = rel[..parent_rel_len].to_vec();
                wh.extend_from_slice(WH_PREFIX);
                wh.extend_from_slice(name.as_bytes());
                self.marker(&wh, md.mtime())?;
                continue;
            }
            if name.as_bytes().starts_with(WH_PREFIX) {
                return Err(SnapshotError::ReservedName {
                    path: rel_path(&rel),
                });
            }
            if ft.is_socket() {
                continue;
            }
            let (xattrs, opaque) = read_xattrs(&host, &rel)?;
            let kind = if ft.is_dir() {
                Kind::Dir { opaque }
            } else if ft.is_symlink() {
                let t =
                    fs::read_link(&host).map_err(|e| SnapshotError::io("readlink", &host, e))?;
                Kind::Symlink(t.into_os_string().into_encoded_bytes())
            } else if ft.is_file() {
                match self.first_link(&md, &rel) {
                    Some(first) => Kind::Link(first),
                    None => Kind::File,
                }
            } else if ft.is_char_device() {
                Kind::Device(EntryType::Char)
            } else if ft.is_block_device() {
                Kind::Device(EntryType::Block)
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                continue;
            };
            match kind {
                Kind::Dir { opaque } => {
                    rel.push(b'/');
                    self.entry(&rel, &stat, EntryType::Directory, 0, None, &xattrs)?;
                    if opaque {
                        let mut m = rel.clone();
                        m.extend_from_slice(WH_OPAQUE);
                        self.marker(&m, md.mtime())?;
                    }
                    let f = self.frame(host, rel)?;
                    stack.push(f);
                }
                Kind::File => {
                    self.entry(&rel, &stat, EntryType::Regular, md.len(), None, &xattrs)?;
                    self.copy_file(&host, &rel, md.len(), pre.blocks_for(&rel, &md))?;
                }
                Kind::Link(first) => {
                    self.entry(&rel, &stat, EntryType::Link, 0, Some(&first), &[])?;
                }
                Kind::Symlink(t) => {
                    self.entry(&rel, &stat, EntryType::Symlink, 0, Some(&t), &xattrs)?;
                }
                Kind::Device(t) => self.entry(&rel, &stat, t, 0, None, &xattrs)?,
                Kind::Fifo => self.entry(&rel, &stat, EntryType::Fifo, 0, None, &xattrs)?,
            }
        }
        Ok(())
    }

    /// For a file with several links: the path written first for its inode, or `None` (and
    /// remember this one) if this is the first.
    fn first_link(&mut self, md: &Metadata, rel: &[u8]) -> Option<Vec<u8>> {
        if md.nlink() < 2 {
            return None;
        }
        let key = (md.dev(), md.ino());
        if let Some(first) = self.links.get(&key) {
            return Some(first.clone());
        }
        self.links.insert(key, rel.to_vec());
        None
    }

    fn clamp(&self, mtime: i64) -> u64 {
        let t = match self.epoch {
            Some(e) => mtime.min(e),
            None => mtime,
        };
        t.clamp(0, MAX_OCTAL_11 as i64) as u64
    }

    fn werr(&self, e: io::Error) -> SnapshotError {
        SnapshotError::io("write layer from", self.upper, e)
    }

    /// An empty whiteout marker entry (`.wh.NAME` or `.wh..wh..opq`).
    fn marker(&mut self, rel: &[u8], mtime: i64) -> Result<(), SnapshotError> {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        h.set_mtime(self.clamp(mtime));
        self.header(h, rel, None, Vec::new())
    }

    /// Writes the header (and PAX record, if needed) of one entry from stat data.
    fn entry(
        &mut self,
        rel: &[u8],
        md: &Stat,
        ty: EntryType,
        size: u64,
        link: Option<&[u8]>,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), SnapshotError> {
        let mut h = Header::new_ustar();
        h.set_entry_type(ty);
        h.set_mode(md.mode);
        h.set_uid(md.uid.into());
        h.set_gid(md.gid.into());
        h.set_mtime(self.clamp(md.mtime));
        h.set_size(size);
        let mut pax = Vec::new();
        if matches!(ty, EntryType::Char | EntryType::Block) {
            let (maj, min) = (libc::major(md.rdev), libc::minor(md.rdev));
            h.set_device_major(maj).map_err(|e| self.werr(e))?;
            h.set_device_minor(min).map_err(|e| self.werr(e))?;
        }
        if size > MAX_OCTAL_11 {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        if u64::from(md.uid) > MAX_OCTAL_7 {
            pax_record(&mut pax, b"uid", md.uid.to_string().as_bytes());
        }
        if u64::from(md.gid) > MAX_OCTAL_7 {
            pax_record(&mut pax, b"gid", md.gid.to_string().as_bytes());
        }
        for (k, v) in xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        self.header(h, rel, link, pax)
    }

    /// Fills in name and link name (PAX `path` / `linkpath` when they do not fit), writes the
    /// PAX extended header if there are records, then the header itself.
    fn header(
        &mut self,
        mut h: Header,
        rel: &[u8],
        link: Option<&[u8]>,
        mut pax: Vec<u8>,
    ) -> Result<(), SnapshotError> {
        let ustar = h
            .as_ustar_mut()
            .ok_or_else(|| self.werr(io::Error::other("not ustar")))?;
        fill(&mut ustar.name, rel);
        if rel.len() > ustar.name.len() {
            pax_record(&mut pax, b"path", rel);
        }
        if let Some(l) = link {
            fill(&mut ustar.linkname, l);
            if l.len() > ustar.linkname.len() {
                pax_record(&mut pax, b"linkpath", l);
            }
        }
        h.set_cksum();
        if !pax.is_empty() {
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0o644);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_mtime(0);
            ph.set_size(pax.len() as u64);
            let base = rel
                .strip_suffix(b"/")
                .unwrap_or(rel)
                .rsplit(|&b| b == b'/')
                .next()
                .unwrap_or_default();
            let mut pname = b"PaxHeaders.0/".to_vec();
            pname.extend_from_slice(base);
            if let Some(u) = ph.as_ustar_mut() {
                fill(&mut u.name, &pname);
            }
            ph.set_cksum();
            self.out
                .write_all(ph.as_bytes())
                .map_err(|e| self.werr(e))?;
            self.out.write_all(&pax).map_err(|e| self.werr(e))?;
            self.pad(pax.len() as u64)?;
        }
        self.out.write_all(h.as_bytes()).map_err(|e| self.werr(e))?;
        self.entries += 1;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<(), SnapshotError> {
        let rem = (BLOCK - len % BLOCK) % BLOCK;
        self.out
            .write_all(&[0u8; BLOCK as usize][..rem as usize])
            .map_err(|e| self.werr(e))
    }

    /// Streams exactly `size` bytes of the file at `host` (never following a symlink). A file
    /// of at least `ALIGN_MIN` bytes gets compressed blocks of its own, taken from `pre` as far
    /// as they match what is read now.
    fn copy_file(
        &mut self,
        host: &Path,
        rel: &[u8],
        size: u64,
        pre: Option<PrecompressedFile<'_>>,
    ) -> Result<(), SnapshotError> {
        let f = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(host)
            .map_err(|e| SnapshotError::io("open", host, e))?;
        let mut f = f.take(size);
        let aligned = size >= ALIGN_MIN;
        if aligned {
            self.align(true)?;
        }
        let mut got = 0;
        if let (true, Some(pre)) = (aligned, pre) {
            got = self.splice_file(&mut f, host, &pre)?;
        }
        got += io::copy(&mut f, &mut self.out).map_err(|e| SnapshotError::io("read", host, e))?;
        if got != size {
            return Err(SnapshotError::FileChanged {
                path: rel_path(rel),
                expected: size,
                got,
            });
        }
        if aligned {
            self.align(false)?;
        }
        self.pad(size)
    }

    /// Ends the compressor's current block here (see `pgzip`); the tar bytes so far go first.
    fn align(&mut self, fresh: bool) -> Result<(), SnapshotError> {
        self.out.flush().map_err(|e| self.werr(e))?;
        let aligned = self.out.get_mut().get_mut().align(fresh);
        aligned.map_err(|e| self.werr(e))
    }

    /// Reads `f` block by block, splicing in each precompressed block whose input matches; at
    /// the first that does not, writes it normally and stops. Returns the bytes consumed.
    fn splice_file(
        &mut self,
        f: &mut impl Read,
        host: &Path,
        pre: &PrecompressedFile<'_>,
    ) -> Result<u64, SnapshotError> {
        let rerr = |e| SnapshotError::io("read", host, e);
        let spool = pre.open().map_err(|e| self.werr(e))?;
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut consumed = 0;
        for i in 0.. {
            let len = read_full(f, &mut buf).map_err(rerr)?;
            if len == 0 {
                break;
            }
            consumed += len as u64;
            let input = &buf[..len];
            let crc = crc32fast::hash(input);
            let Some(compressed) = pre.block(&spool, i, input, crc).map_err(|e| self.werr(e))?
            else {
                self.out.write_all(input).map_err(|e| self.werr(e))?;
                break;
            };
            let hashing = self.out.get_mut();
            hashing.account(input);
            let spliced = match hashing.get_mut().gzip() {
                Some(g) => g.splice(input, crc, compressed),
                None => Err(io::Error::other("precompressed blocks need gzip")),
            };
            spliced.map_err(|e| self.werr(e))?;
        }
        Ok(consumed)
    }
}

/// The layer path as a `PathBuf`, for messages.
fn rel_path(rel: &[u8]) -> PathBuf {
    PathBuf::from(std::ffi::OsStr::from_bytes(rel))
}

/// Copies `src` into a NUL-padded header field, truncating if it does not fit.
fn fill(field: &mut [u8], src: &[u8]) {
    let n = src.len().min(field.len());
    field[..n].copy_from_slice(&src[..n]);
    field[n..].fill(0);
}

/// Appends one PAX record `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    buf.extend_from_slice(len.to_string().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(key);
    buf.push(b'=');
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// Extended attributes as (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The xattrs of `host` that a layer entry for it carries (sorted; none that are host- or
/// overlay-private), as [`write_layer`] would write them.
pub fn layer_xattrs(host: &Path) -> Result<Xattrs, SnapshotError> {
    read_xattrs(host, host.as_os_str().as_bytes()).map(|(x, _)| x)
}

/// The xattrs that go into the layer (sorted, non-empty, not host- or overlay-private) and
/// whether the overlay marked this directory opaque. Redirect/metacopy xattrs are errors.
fn read_xattrs(host: &Path, rel: &[u8]) -> Result<(Xattrs, bool), SnapshotError> {
    let names = match xattr::list(host) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok((Vec::new(), false)),
        Err(e) => return Err(SnapshotError::io("list xattrs", host, e)),
    };
    let mut out = Vec::new();
    let mut opaque = false;
    for name in names {
        let n = name.as_bytes();
        let overlay_key = n
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| n.strip_prefix(b"user.overlay."));
        if let Some(key) = overlay_key {
            match key {
                b"redirect" | b"metacopy" => {
                    return Err(SnapshotError::OverlayFeature {
                        path: rel_path(rel),
                        xattr: name.to_string_lossy().into_owned(),
                    });
                }
                b"opaque" => {
                    let v = xattr::get(host, &name)
                        .map_err(|e| SnapshotError::io("get xattr", host, e))?;
                    opaque |= v.as_deref() == Some(b"y");
                }
                _ => {}
            }
            continue;
        }
        if xattr_is_private(n) {
            continue;
        }
        match xattr::get(host, &name) {
            Ok(Some(v)) if !v.is_empty() => out.push((n.to_vec(), v)),
            Ok(_) => {}
            Err(e) => return Err(SnapshotError::io("get xattr", host, e)),
        }
    }
    out.sort();
    Ok((out, opaque))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in 0..300 {
            let mut buf = Vec::new();
            pax_record(&mut buf, b"path", &vec![b'x'; vlen]);
            let sp = buf.iter().position(|&b| b == b' ').unwrap();
            let n: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
            assert_eq!(n, buf.len(), "value length {vlen}");
        }
    }

    #[test]
    fn fill_truncates_and_pads() {
        let mut f = [b'z'; 4];
        fill(&mut f, b"ab");
        assert_eq!(&f, b"ab\0\0");
        fill(&mut f, b"abcdef");
        assert_eq!(&f, b"abcd");
    }
}
