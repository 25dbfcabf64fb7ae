//! A COPY told as a list of layer entries instead of performed: what [`copy::run`] would add on
//! top of a stage, worked out from its sources (the context, or another stage or image) and a
//! read-only look at the stage, so the layer can be written straight from the source files and
//! they are never created on disk (used when no later step needs the stage's files).
//!
//! Only cases whose result is certain without doing the copy are told; anything else (a path on
//! the way to the destination that is a symlink or a file, a source landing on something the
//! stage or an earlier source already has, `..` in the destination) gives `None`, and the caller
//! performs the copy instead.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::copy::{CopyError, CopyJob, Kind, SourceFs, SourceItem, SrcMeta, dest_err, src_err};
use crate::rootfs::RootDir;
use crate::snapshot::{ListedEntry, ListedKind, layer_xattrs};

/// The entries `copy::run(root, job)` would add to the stage mounted at `root` (which is only
/// read), as they would appear in the step's layer; `now` stands for the time of the copy.
/// `None` when the copy must be performed to know (see the module doc).
pub fn listed_copy(
    root: &RootDir,
    job: &CopyJob,
    now: i64,
) -> Result<Option<Vec<ListedEntry>>, CopyError> {
    if job.extract_archives || job.parents {
        return Ok(None);
    }
    let Some(dest) = normalize(&job.dest) else {
        return Ok(None);
    };
    let Some(base) = probe(root, &dest)? else {
        return Ok(None);
    };
    let mut tree = Tree {
        base,
        nodes: BTreeMap::new(),
        now,
    };
    let items = job.expanded_items()?;
    if items.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let into_dir = job.dest_is_dir || items.len() > 1 || tree.base.dest_is_dir;
    let created = if into_dir {
        let (uid, gid) = job.chown.unwrap_or((0, 0));
        tree.mkdir_all(&dest, 0o755, uid, gid)
    } else {
        match dest.rsplit_once('/') {
            Some((parent, _)) => tree.mkdir_all(parent, 0o755, 0, 0),
            None => Some(()),
        }
    };
    if created.is_none() {
        return Ok(None);
    }
    // Directories whose mtime the copy sets back to the source's once their contents are in.
    let mut dir_times = Vec::new();
    for item in &items {
        let SourceItem::Path {
            rel,
            name,
            keep: None,
        } = item
        else {
            return Ok(None);
        };
        let mut entries = source_entries(&job.from, rel)?.into_iter();
        let Some(top) = entries.next() else {
            return Ok(None);
        };
        let m = SrcMeta::from(&top.meta);
        if m.kind == Kind::Dir {
            let (uid, gid) = job.chown.unwrap_or((0, 0));
            if tree.mkdir_all(&dest, 0o755, uid, gid).is_none() {
                return Ok(None);
            }
            for child in entries {
                let sub = child
                    .rel
                    .strip_prefix(rel.as_str())
                    .unwrap_or(&child.rel)
                    .trim_start_matches('/');
                if job
                    .exclude
                    .iter()
                    .any(|g| g.is_match(&child.rel) || g.is_match(sub))
                {
                    continue;
                }
                let cm = SrcMeta::from(&child.meta);
                let target = join(&dest, sub);
                if tree
                    .add_source(&target, child.host, &cm, job.owner(&cm), job.chmod.as_ref())
                    .is_none()
                {
                    return Ok(None);
                }
                if cm.kind == Kind::Dir {
                    dir_times.push((target, cm.mtime));
                }
            }
        } else {
            let name = name
                .as_deref()
                .unwrap_or_else(|| rel.rsplit('/').next().unwrap_or(rel));
            let target = if into_dir {
                join(&dest, name)
            } else {
                dest.clone()
            };
            if tree
                .add_source(&target, top.host, &m, job.owner(&m), job.chmod.as_ref())
                .is_none()
            {
                return Ok(None);
            }
        }
    }
    for (dir, mtime) in dir_times {
        if let Some(node) = tree.nodes.get_mut(&dir) {
            node.mtime = mtime;
        }
    }
    tree.finish(root)
}

/// One source entry: its path in the source, `lstat` data, and where it is read from.
struct Found {
    rel: String,
    meta: Metadata,
    host: PathBuf,
}

/// The source `rel` and, if it is a directory, everything below it, as `copy::run` sees them:
/// a symlink named by the instruction is followed, one found inside a directory is not.
fn source_entries(from: &SourceFs, rel: &str) -> Result<Vec<Found>, CopyError> {
    if let SourceFs::Context(c) = from {
        // The context's walk has the `lstat` data already.
        let entries = c.walk(rel).map_err(|e| src_err(rel, e))?;
        return Ok(entries
            .into_iter()
            .map(|e| Found {
                host: c.host_path(&e.rel),
                rel: e.rel,
                meta: e.meta,
            })
            .collect());
    }
    let found = |rel: &str, host: PathBuf| -> Result<Found, CopyError> {
        let meta = std::fs::symlink_metadata(&host).map_err(|e| src_err(rel, e))?;
        Ok(Found {
            rel: rel.to_string(),
            meta,
            host,
        })
    };
    let top = found(rel, from.host_path(rel)?)?;
    let mut out = Vec::new();
    let is_dir = top.meta.is_dir();
    out.push(top);
    if is_dir {
        for child in from.children(rel)? {
            let host = from.entry_path(&child)?;
            out.push(found(&child, host)?);
        }
    }
    Ok(out)
}

/// What the stage has on the way to the destination.
struct Base {
    /// The directories that exist there, from the first component down, each with its entry
    /// as a layer would carry it after overlayfs copied it up. The chain stops before the
    /// first component the stage does not have.
    dirs: Vec<(String, ListedEntry)>,
    /// The destination itself is a directory in the stage (the last of `dirs`, or the root).
    dest_is_dir: bool,
}

/// Looks at each component of `dest` in the stage: `None` if one is a symlink or not a
/// directory (the copy would resolve or replace it), else the directories found.
fn probe(root: &RootDir, dest: &str) -> Result<Option<Base>, CopyError> {
    let mut dirs = Vec::new();
    let mut path = String::new();
    let parts: Vec<&str> = dest.split('/').filter(|p| !p.is_empty()).collect();
    for part in &parts {
        path = join(&path, part);
        let md = match root.symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(Some(Base {
                    dirs,
                    dest_is_dir: false,
                }));
            }
            Err(e) => return Err(dest_err(&format!("/{path}"), e)),
        };
        if !md.is_dir() {
            return Ok(None);
        }
        let host = root
            .resolve(&path)
            .map_err(|e| dest_err(&format!("/{path}"), e))?;
        let xattrs = layer_xattrs(&host).map_err(|e| dest_err(&format!("/{path}"), e))?;
        let entry = ListedEntry {
            path: path.clone().into_bytes(),
            kind: ListedKind::Dir,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            xattrs,
        };
        dirs.push((path.clone(), entry));
    }
    Ok(Some(Base {
        dirs,
        dest_is_dir: true,
    }))
}

/// The entries the copy adds, keyed by path (relative to the root, no leading `/`).
struct Tree {
    base: Base,
    nodes: BTreeMap<String, ListedEntry>,
    now: i64,
}

impl Tree {
    /// Whether `path` is a directory that the stage has or the copy made.
    fn is_dir(&self, path: &str) -> bool {
        path.is_empty()
            || self.base.dirs.iter().any(|(p, _)| p == path)
            || self
                .nodes
                .get(path)
                .is_some_and(|n| n.kind == ListedKind::Dir)
    }

    /// `RootDir::mkdir_all`: every missing component becomes a directory with this mode and
    /// owner; `None` if one is something else.
    fn mkdir_all(&mut self, path: &str, mode: u32, uid: u32, gid: u32) -> Option<()> {
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            prefix = join(&prefix, part);
            if self.is_dir(&prefix) {
                continue;
            }
            if self.nodes.contains_key(&prefix) {
                return None;
            }
            self.insert(
                &prefix,
                ListedKind::Dir,
                (mode, uid, gid),
                self.now,
                Vec::new(),
            )?;
        }
        Some(())
    }

    /// One source entry at `target` (`copy_entry`); `None` if `target` is taken already or its
    /// parent is missing.
    fn add_source(
        &mut self,
        target: &str,
        host: std::path::PathBuf,
        m: &SrcMeta,
        (uid, gid): (u32, u32),
        chmod: Option<&super::chmod::Chmod>,
    ) -> Option<()> {
        if self.nodes.contains_key(target) || self.base.dirs.iter().any(|(p, _)| p == target) {
            return None;
        }
        let mode = chmod.map_or(m.mode, |c| c.apply(m.mode, m.kind == Kind::Dir));
        match m.kind {
            Kind::Dir => {
                self.mkdir_all(target, mode, uid, gid)?;
                let node = self.nodes.get_mut(target)?;
                (node.mode, node.uid, node.gid) = (mode, uid, gid);
                Some(())
            }
            Kind::File => {
                let kind = ListedKind::File {
                    source: host,
                    size: m.size,
                };
                self.insert(target, kind, (mode, uid, gid), m.mtime, Vec::new())
            }
            Kind::Symlink => {
                let link = std::fs::read_link(&host).ok()?;
                let kind = ListedKind::Symlink(link.into_os_string().into_encoded_bytes());
                self.insert(target, kind, (0o777, uid, gid), m.mtime, Vec::new())
            }
            Kind::Other => Some(()),
        }
    }

    /// Adds a new entry whose parent exists; `None` if it does not.
    fn insert(
        &mut self,
        path: &str,
        kind: ListedKind,
        (mode, uid, gid): (u32, u32, u32),
        mtime: i64,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Option<()> {
        let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
        if !self.is_dir(parent) {
            return None;
        }
        let entry = ListedEntry {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        };
        self.nodes.insert(path.to_string(), entry);
        Some(())
    }

    /// The layer's entries: the new ones, plus the stage's directories above them as overlayfs
    /// copies them up (their own metadata; the one that got new entries gets the copy's time).
    /// `None` if a new entry directly in a stage directory is already there in the stage.
    fn finish(self, root: &RootDir) -> Result<Option<Vec<ListedEntry>>, CopyError> {
        if self.nodes.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let deepest = self
            .base
            .dirs
            .last()
            .map_or("", |(p, _)| p.as_str())
            .to_string();
        for path in self.nodes.keys() {
            let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
            if parent == deepest.as_str() {
                match root.symlink_metadata(path) {
                    Ok(_) => return Ok(None),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(dest_err(&format!("/{path}"), e)),
                }
            }
        }
        let mut out: Vec<ListedEntry> = self.nodes.into_values().collect();
        for (path, mut entry) in self.base.dirs {
            if path == deepest {
                entry.mtime = self.now;
            }
            out.push(entry);
        }
        Ok(Some(out))
    }
}

/// `dest` as a root-relative path without `.` components or slashes at either end; `None` if
/// it has `..`.
fn normalize(dest: &str) -> Option<String> {
    let mut out = String::new();
    for part in dest.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return None;
        }
        out = join(&out, part);
    }
    Some(out)
}

fn join(dir: &str, name: &str) -> String {
    match (dir.is_empty(), name.is_empty()) {
        (_, true) => dir.to_string(),
        (true, false) => name.to_string(),
        (false, false) => format!("{dir}/{name}"),
    }
}
