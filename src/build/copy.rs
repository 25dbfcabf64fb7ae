//! COPY and ADD: writing sources (context files, another stage's or image's files, heredoc
//! bodies, local archives) into a mounted rootfs with Docker's destination rules. Every path
//! on the destination side goes through [`RootDir`], so nothing can land outside the rootfs.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::chmod::Chmod;
use crate::rootfs::RootDir;
use crate::snapshot;
use crate::sources::context::{self, Context};

/// Where COPY reads from.
pub enum SourceFs<'a> {
    /// The build context.
    Context(&'a Context),
    /// A mounted rootfs of another stage or image (host path of its root).
    Rootfs(&'a RootDir),
}

/// One resolved source.
#[derive(Clone)]
pub enum SourceItem {
    /// A path in the source filesystem ("" = its root).
    Path {
        /// The path.
        rel: String,
        /// The name it is copied as into a directory, when not `rel`'s own (a symlink named
        /// by the instruction: its target's content under the link's name).
        name: Option<String>,
        /// With `--parents`: the part of `rel` recreated under the destination.
        keep: Option<String>,
    },
    /// A file downloaded for `ADD <url>` (mode 0600 unless `--chmod`, mtime from the server).
    Download {
        /// File name when the destination is a directory.
        name: String,
        /// The downloaded file on the host.
        path: PathBuf,
        /// Its modification time.
        mtime: Option<i64>,
    },
    /// A pattern with wildcards over the files of another stage or image, expanded when they
    /// are mounted (it may match nothing, as in BuildKit).
    Pattern {
        /// The pattern, relative to the source's root.
        pattern: String,
        /// The source word as written (for `--parents`).
        word: String,
    },
    /// A heredoc body, written as a file named `name`.
    Inline {
        /// File name when the destination is a directory.
        name: String,
        /// The body.
        content: Vec<u8>,
    },
}

/// What to do with the sources.
pub struct CopyJob<'a> {
    /// Source filesystem.
    pub from: SourceFs<'a>,
    /// Resolved sources.
    pub items: Vec<SourceItem>,
    /// Absolute destination inside the rootfs (already joined with WORKDIR).
    pub dest: String,
    /// Whether the destination is a directory whatever the sources match (a trailing slash,
    /// or several sources); one source matching several paths also makes it one.
    pub dest_is_dir: bool,
    /// `--chown` resolved to numbers.
    pub chown: Option<(u32, u32)>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// ADD: extract local archives.
    pub extract_archives: bool,
    /// `--exclude` patterns (context-relative globs).
    pub exclude: Vec<globset::GlobMatcher>,
    /// `--parents`: keep each source's parent directories under the destination.
    pub parents: bool,
}

impl<'a> CopyJob<'a> {
    /// Copies the directory `rel` of `from` ("" = all of it) onto the destination's root,
    /// owners and modes as they are.
    pub(super) fn tree(from: SourceFs<'a>, rel: &str) -> Self {
        CopyJob {
            from,
            items: vec![SourceItem::Path {
                rel: rel.to_string(),
                name: None,
                keep: None,
            }],
            dest: "/".to_string(),
            dest_is_dir: true,
            chown: None,
            chmod: None,
            extract_archives: false,
            exclude: Vec::new(),
            parents: false,
        }
    }

    /// This job reading from the mounted rootfs `src` (another stage or image) if given.
    pub(super) fn reading_from(mut self, src: Option<&'a RootDir>) -> Self {
        if let Some(src) = src {
            self.from = SourceFs::Rootfs(src);
        }
        self
    }

    /// The sources with their patterns expanded against the mounted source.
    pub(super) fn expanded_items(&self) -> Result<Vec<SourceItem>, CopyError> {
        let mut out = Vec::with_capacity(self.items.len());
        for item in &self.items {
            match item {
                SourceItem::Pattern { pattern, word } => {
                    for rel in self.from.glob(pattern)? {
                        let keep = self.parents.then(|| kept_path(word, &rel));
                        out.push(SourceItem::Path {
                            rel,
                            name: None,
                            keep,
                        });
                    }
                }
                other => out.push(other.clone()),
            }
        }
        Ok(out)
    }

    /// The owner a copied entry gets: `--chown`, else root for files from the context, else
    /// the entry's own (files from a stage keep their owners).
    pub(super) fn owner(&self, m: &SrcMeta) -> (u32, u32) {
        match (self.chown, &self.from) {
            (Some(o), _) => o,
            (None, SourceFs::Context(_)) => (0, 0),
            (None, SourceFs::Rootfs(_)) => (m.uid, m.gid),
        }
    }
}

/// An error while copying; names the path.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading a source failed.
    #[error("reading {path}: {message}")]
    Source {
        /// The source path.
        path: String,
        /// The cause.
        message: String,
    },
    /// Writing the destination failed.
    #[error("writing {path}: {message}")]
    Dest {
        /// The destination path.
        path: String,
        /// The cause.
        message: String,
    },
}

/// A destination error naming `path`.
pub(super) fn dest_err(path: &str, e: impl std::fmt::Display) -> CopyError {
    CopyError::Dest {
        path: path.to_string(),
        message: e.to_string(),
    }
}

/// A source error naming `path`.
pub(super) fn src_err(path: &str, e: impl std::fmt::Display) -> CopyError {
    CopyError::Source {
        path: path.to_string(),
        message: e.to_string(),
    }
}

/// Metadata of one source entry, independent of where it lives.
pub(super) struct SrcMeta {
    pub(super) kind: Kind,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: i64,
    pub(super) size: u64,
}

/// What a source entry is, as far as a copy cares.
#[derive(PartialEq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl SrcMeta {
    pub(super) fn from(m: &std::fs::Metadata) -> SrcMeta {
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        SrcMeta {
            kind,
            mode: m.permissions().mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            size: m.len(),
        }
    }
}

impl SourceFs<'_> {
    /// The host path of a source as named in the instruction: a symlink there is followed
    /// (within the source), as Docker does.
    pub(super) fn host_path(&self, rel: &str) -> Result<PathBuf, CopyError> {
        match self {
            SourceFs::Context(c) => Ok(c.host_path(rel)),
            SourceFs::Rootfs(r) => r.resolve(rel).map_err(|e| src_err(rel, e)),
        }
    }

    /// The host path of an entry found inside a source directory: a symlink stays a symlink.
    pub(super) fn entry_path(&self, rel: &str) -> Result<PathBuf, CopyError> {
        match self {
            SourceFs::Context(c) => Ok(c.host_path(rel)),
            SourceFs::Rootfs(r) => r.resolve_entry(rel).map_err(|e| src_err(rel, e)),
        }
    }

    /// The paths of a mounted source that `pattern` matches, sorted; `*`, `?` and `[…]` match
    /// within one path component (Go's `filepath.Match`, as BuildKit).
    pub(super) fn glob(&self, pattern: &str) -> Result<Vec<String>, CopyError> {
        let mut current = vec![String::new()];
        for component in pattern.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if !has_wildcard(component) {
                for path in &mut current {
                    *path = join_rel(path, component);
                }
                continue;
            }
            let glob = context::component_matcher(component).map_err(|e| src_err(pattern, e))?;
            let mut next = Vec::new();
            for base in &current {
                let Ok(dir) = self.host_path(base) else {
                    continue;
                };
                let names = context::matching_names(&dir, &glob);
                next.extend(names.iter().map(|n| join_rel(base, n)));
            }
            current = next;
        }
        Ok(current)
    }

    /// Every path below the directory `rel` (not `rel` itself), sorted.
    pub(super) fn children(&self, rel: &str) -> Result<Vec<String>, CopyError> {
        match self {
            SourceFs::Context(c) => {
                let entries = c.walk(rel).map_err(|e| src_err(rel, e))?;
                Ok(entries.into_iter().skip(1).map(|e| e.rel).collect())
            }
            SourceFs::Rootfs(_) => {
                let mut out = Vec::new();
                let mut stack = vec![rel.to_string()];
                while let Some(dir) = stack.pop() {
                    let host = self.host_path(&dir)?;
                    let mut names: Vec<String> = std::fs::read_dir(&host)
                        .map_err(|e| src_err(&dir, e))?
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    let mut subdirs = Vec::new();
                    for n in names {
                        let child = if dir.is_empty() {
                            n
                        } else {
                            format!("{dir}/{n}")
                        };
                        let m = std::fs::symlink_metadata(self.entry_path(&child)?)
                            .map_err(|e| src_err(&child, e))?;
                        if m.is_dir() {
                            subdirs.push(child.clone());
                        }
                        out.push(child);
                    }
                    stack.extend(subdirs.into_iter().rev());
                }
                out.sort();
                Ok(out)
            }
        }
    }
}

/// Whether a source word has wildcards (an unescaped `*`, `?` or `[`).
pub fn has_wildcard(word: &str) -> bool {
    let mut escaped = false;
    for c in word.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// Performs the copy into `root`. Sources that match nothing copy nothing, and then nothing
/// is created (BuildKit).
pub fn run(root: &RootDir, job: &CopyJob) -> Result<(), CopyError> {
    let owner = |m: &SrcMeta| job.owner(m);
    let items = job.expanded_items()?;
    if items.is_empty() {
        return Ok(());
    }
    let dest_exists_as_dir = root
        .metadata(&job.dest)
        .map(|m| m.is_dir())
        .unwrap_or(false);
    let into_dir = job.dest_is_dir || items.len() > 1 || dest_exists_as_dir || job.parents;
    if into_dir {
        let (uid, gid) = job.chown.unwrap_or((0, 0));
        root.mkdir_all(&job.dest, 0o755, uid, gid)
            .map_err(|e| dest_err(&job.dest, e))?;
    } else if let Some((parent, _)) = job.dest.rsplit_once('/')
        && !parent.is_empty()
    {
        {
            root.mkdir_all(parent, 0o755, 0, 0)
                .map_err(|e| dest_err(parent, e))?;
        }
    }
    for item in &items {
        match item {
            SourceItem::Pattern { .. } => {}
            SourceItem::Inline { name, content } => {
                let target = if into_dir {
                    join(&job.dest, name)
                } else {
                    job.dest.clone()
                };
                let mode = job.chmod.as_ref().map_or(0o644, |c| c.apply(0o644, false));
                let mut f = root
                    .create_file(&target, mode)
                    .map_err(|e| dest_err(&target, e))?;
                io::Write::write_all(&mut f, content).map_err(|e| dest_err(&target, e))?;
                let (uid, gid) = job.chown.unwrap_or((0, 0));
                root.lchown(&target, uid, gid)
                    .map_err(|e| dest_err(&target, e))?;
                root.chmod(&target, mode)
                    .map_err(|e| dest_err(&target, e))?;
            }
            SourceItem::Download { name, path, mtime } => {
                let target = if into_dir {
                    join(&job.dest, name)
                } else {
                    job.dest.clone()
                };
                let size = std::fs::metadata(path).map_err(|e| src_err(name, e))?.len();
                let meta = SrcMeta {
                    kind: Kind::File,
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                    mtime: mtime.unwrap_or(0),
                    size,
                };
                copy_entry(
                    root,
                    path,
                    name,
                    &target,
                    &meta,
                    job.chown.unwrap_or((0, 0)),
                    job.chmod.as_ref(),
                )?;
            }
            SourceItem::Path { rel, name, keep } => {
                let host = job.from.host_path(rel)?;
                let meta = std::fs::symlink_metadata(&host).map_err(|e| src_err(rel, e))?;
                let m = SrcMeta::from(&meta);
                if job.extract_archives
                    && m.kind == Kind::File
                    && snapshot::is_archive(&host).map_err(|e| src_err(rel, e))?
                {
                    // The archive's directory gets --chown's owner when it is made, as in
                    // BuildKit (whose unpack also gives every entry that owner).
                    let dir = &job.dest;
                    let (uid, gid) = job.chown.unwrap_or((0, 0));
                    root.mkdir_all(dir, 0o755, uid, gid)
                        .map_err(|e| dest_err(dir, e))?;
                    snapshot::extract_archive(&host, root, dir, job.chown)
                        .map_err(|e| dest_err(dir, e))?;
                    continue;
                }
                if m.kind == Kind::Dir {
                    // A directory's contents go into the destination directory (with
                    // --parents, into its kept path there).
                    let base = match keep {
                        Some(k) => join(&job.dest, k),
                        None => job.dest.clone(),
                    };
                    // A directory made for the contents gets --chown's owner (BuildKit).
                    let (uid, gid) = job.chown.unwrap_or((0, 0));
                    root.mkdir_all(&base, 0o755, uid, gid)
                        .map_err(|e| dest_err(&base, e))?;
                    let mut dirs = Vec::new();
                    let mut files = Vec::new();
                    for child in job.from.children(rel)? {
                        let sub = child
                            .strip_prefix(rel)
                            .unwrap_or(&child)
                            .trim_start_matches('/');
                        if job
                            .exclude
                            .iter()
                            .any(|g| g.is_match(&child) || g.is_match(sub))
                        {
                            continue;
                        }
                        let target = join(&base, sub);
                        let chost = job.from.entry_path(&child)?;
                        let cmeta =
                            std::fs::symlink_metadata(&chost).map_err(|e| src_err(&child, e))?;
                        let cm = SrcMeta::from(&cmeta);
                        if cm.kind == Kind::File {
                            // Directories and links first; file contents later, in parallel.
                            let own = owner(&cm);
                            files.push(FileCopy {
                                host: chost,
                                rel: child,
                                target,
                                meta: cm,
                                owner: own,
                            });
                            continue;
                        }
                        copy_entry(
                            root,
                            &chost,
                            &child,
                            &target,
                            &cm,
                            owner(&cm),
                            job.chmod.as_ref(),
                        )?;
                        if cm.kind == Kind::Dir {
                            dirs.push((target, cm.mtime));
                        }
                    }
                    copy_files(root, &files, job.chmod.as_ref())?;
                    for (d, mtime) in dirs.iter().rev() {
                        root.set_mtime(d, *mtime).map_err(|e| dest_err(d, e))?;
                    }
                } else {
                    let name = name
                        .as_deref()
                        .unwrap_or_else(|| rel.rsplit('/').next().unwrap_or(rel));
                    let target = match keep {
                        Some(k) => join(&job.dest, k),
                        None if into_dir => join(&job.dest, name),
                        None => job.dest.clone(),
                    };
                    if let Some((parent, _)) = target.rsplit_once('/')
                        && keep.is_some()
                        && !parent.is_empty()
                    {
                        root.mkdir_all(parent, 0o755, 0, 0)
                            .map_err(|e| dest_err(parent, e))?;
                    }
                    copy_entry(root, &host, rel, &target, &m, owner(&m), job.chmod.as_ref())?;
                }
            }
        }
    }
    Ok(())
}

/// A regular file of a directory source, copied after every directory and link exists.
struct FileCopy {
    host: PathBuf,
    rel: String,
    target: String,
    meta: SrcMeta,
    owner: (u32, u32),
}

/// Below this many bytes in total a tree's files are copied on the calling thread.
const PARALLEL_COPY_MIN_BYTES: u64 = 8 << 20;

/// Copies `files` (their directories already exist) on up to one thread per core. Targets are
/// distinct paths, so the order does not change the result; the first error wins.
fn copy_files(root: &RootDir, files: &[FileCopy], chmod: Option<&Chmod>) -> Result<(), CopyError> {
    let one = |f: &FileCopy| copy_entry(root, &f.host, &f.rel, &f.target, &f.meta, f.owner, chmod);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    let bytes: u64 = files.iter().map(|f| f.meta.size).sum();
    if threads < 2 || bytes < PARALLEL_COPY_MIN_BYTES {
        return files.iter().try_for_each(one);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<(), CopyError> {
                    use std::sync::atomic::Ordering::Relaxed;
                    while !failed.load(Relaxed) {
                        let Some(f) = files.get(next.fetch_add(1, Relaxed)) else {
                            break;
                        };
                        if let Err(e) = one(f) {
                            failed.store(true, Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

fn copy_entry(
    root: &RootDir,
    host: &Path,
    rel: &str,
    target: &str,
    m: &SrcMeta,
    (uid, gid): (u32, u32),
    chmod: Option<&Chmod>,
) -> Result<(), CopyError> {
    let mode = chmod.map_or(m.mode, |c| c.apply(m.mode, m.kind == Kind::Dir));
    match m.kind {
        Kind::Dir => {
            root.mkdir_all(target, mode, uid, gid)
                .map_err(|e| dest_err(target, e))?;
            root.lchown(target, uid, gid)
                .map_err(|e| dest_err(target, e))?;
            root.chmod(target, mode).map_err(|e| dest_err(target, e))?;
        }
        Kind::File => {
            let mut src = std::fs::File::open(host).map_err(|e| src_err(rel, e))?;
            let mut dst = root
                .create_file(target, 0o600)
                .map_err(|e| dest_err(target, e))?;
            io::copy(&mut src, &mut dst).map_err(|e| dest_err(target, e))?;
            // On the fd just created: no path is resolved again. chown before chmod (chown
            // clears setuid/setgid), times last.
            std::os::unix::fs::fchown(&dst, Some(uid), Some(gid))
                .map_err(|e| dest_err(target, e))?;
            dst.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| dest_err(target, e))?;
            let t = epoch_time(m.mtime);
            dst.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
                .map_err(|e| dest_err(target, e))?;
        }
        Kind::Symlink => {
            let link = std::fs::read_link(host).map_err(|e| src_err(rel, e))?;
            if root.symlink_metadata(target).is_ok() {
                root.remove_all(target).map_err(|e| dest_err(target, e))?;
            }
            root.symlink(&link, target)
                .map_err(|e| dest_err(target, e))?;
            root.lchown(target, uid, gid)
                .map_err(|e| dest_err(target, e))?;
            root.set_mtime(target, m.mtime)
                .map_err(|e| dest_err(target, e))?;
        }
        Kind::Other => {}
    }
    Ok(())
}

/// `secs` since the epoch (negative: before it) as a `SystemTime`.
fn epoch_time(secs: i64) -> std::time::SystemTime {
    let d = std::time::Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        std::time::UNIX_EPOCH + d
    } else {
        std::time::UNIX_EPOCH - d
    }
}

/// `base/name` for source-relative paths ("" is the root).
fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

fn join(dir: &str, name: &str) -> String {
    if name.is_empty() {
        dir.to_string()
    } else if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// With `--parents`, the part of a matched path kept under the destination: everything after
/// a `./` pivot in the pattern (`a/./b/c` keeps `b/c`), else the whole path.
pub fn kept_path(pattern: &str, rel: &str) -> String {
    let pattern = pattern.trim_start_matches("./");
    match pattern.rfind("/./") {
        Some(i) => {
            let pivot = crate::sources::context::clean_relative(&pattern[..i]).unwrap_or_default();
            rel.strip_prefix(&pivot)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| rel.to_string())
        }
        None => rel.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_keep_the_path_after_the_pivot() {
        assert_eq!(kept_path("a/b/*.txt", "a/b/c.txt"), "a/b/c.txt");
        assert_eq!(kept_path("a/./b/*.txt", "a/b/c.txt"), "b/c.txt");
        assert_eq!(kept_path("./a/b", "a/b"), "a/b");
    }

    #[test]
    fn wildcards_are_unescaped_metacharacters() {
        assert!(has_wildcard("*.txt") && has_wildcard("a?b") && has_wildcard("x[0-9]"));
        assert!(!has_wildcard("plain/path") && !has_wildcard("arr\\[0].txt"));
    }

    #[test]
    fn join_handles_slashes() {
        assert_eq!(join("/app/", "x"), "/app/x");
        assert_eq!(join("/app", "x"), "/app/x");
        assert_eq!(join("/app", ""), "/app");
    }
}
