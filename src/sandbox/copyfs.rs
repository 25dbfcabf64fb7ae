//! The copying snapshotter, for where neither the kernel's overlayfs nor fuse-overlayfs can be
//! mounted: the layers (and the upper dir) are copied into a plain directory, `WORK/merged`,
//! which is bound at the target; after the unmount the upper dir is rewritten as what the
//! kernel's overlayfs would have left in it — changed and new entries (renamed over from the
//! copy, not copied again), whiteouts for deleted ones, opaque dirs where a dir replaced
//! something — by comparing the copy with the layers.
//!
//! Entries are compared by type, owner, mode, size, mtime (to the nanosecond, which the copy
//! keeps), link target and xattrs; a dir whose inode and birth time are not those of a dir the
//! copy made was deleted and made again. Hardlinks between lower files are not kept in the copy (as overlayfs's
//! copy-up does not keep them either); ones the step makes are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;

use super::SandboxError;
use super::snapshotter::unmount_path;

fn err(call: &str, path: &Path) -> impl FnOnce(io::Error) -> SandboxError {
    move |e| SandboxError::sys(call, path, e)
}

fn lstat(p: &Path) -> Result<Option<Metadata>, SandboxError> {
    match fs::symlink_metadata(p) {
        Ok(md) => Ok(Some(md)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SandboxError::sys("stat", p, e)),
    }
}

fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Overlay's own xattrs on layer dirs: never copied, never compared.
fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|k| xattr::get(dir, k).ok().flatten().as_deref() == Some(b"y"))
}

/// The opaque xattr the kernel's overlayfs would set in this process.
fn opaque_xattr() -> &'static str {
    if super::userns::in_user_namespace() {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// The xattrs of `p` (not following a symlink) that belong to the file, sorted.
fn xattrs(p: &Path) -> Result<Vec<(OsString, Vec<u8>)>, SandboxError> {
    let names = match xattr::list(p) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(SandboxError::sys("list xattrs", p, e)),
    };
    let mut out = Vec::new();
    for name in names {
        if is_overlay_xattr(name.as_bytes()) {
            continue;
        }
        if let Some(v) = xattr::get(p, &name).map_err(err("get xattr", p))? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

/// Sets the access and modification times of `p` (not following a symlink) to those of `md`.
pub(crate) fn set_times(p: &Path, md: &Metadata) -> Result<(), SandboxError> {
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &TimeSpec::new(md.atime(), md.atime_nsec()),
        &TimeSpec::new(md.mtime(), md.mtime_nsec()),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| SandboxError::sys("set times", p, e.into()))
}

/// Gives `dst` the owner, mode and xattrs of `src` (`md`); times are set by the caller. An owner
/// the user namespace does not map is left as it is (root), as when unpacking layers.
fn copy_metadata(src: &Path, md: &Metadata, dst: &Path) -> Result<(), SandboxError> {
    match std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid())) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        r => r.map_err(err("chown", dst))?,
    }
    if !md.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(err("chmod", dst))?;
    }
    for (name, value) in xattrs(src)? {
        xattr::set(dst, &name, &value).map_err(err("set xattr", dst))?;
    }
    Ok(())
}

/// Copies one non-directory entry with its metadata and times; `false` when it is of a kind
/// that cannot be made here (a device node in a user namespace, a socket).
fn copy_entry(src: &Path, md: &Metadata, dst: &Path) -> Result<bool, SandboxError> {
    let ft = md.file_type();
    if ft.is_file() {
        let mut from = File::open(src).map_err(err("open", src))?;
        let mut to = File::options()
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(err("create", dst))?;
        io::copy(&mut from, &mut to).map_err(err("copy", src))?;
    } else if ft.is_symlink() {
        let target = fs::read_link(src).map_err(err("readlink", src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(err("symlink", dst))?;
    } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_fifo() {
            SFlag::S_IFIFO
        } else if ft.is_char_device() {
            SFlag::S_IFCHR
        } else {
            SFlag::S_IFBLK
        };
        match mknod(dst, kind, Mode::from_bits_truncate(0o600), md.rdev()) {
            Err(nix::errno::Errno::EPERM) => return Ok(false),
            r => r.map_err(|e| SandboxError::sys("mknod", dst, e.into()))?,
        }
    } else {
        return Ok(false);
    }
    copy_metadata(src, md, dst)?;
    set_times(dst, md)?;
    Ok(true)
}

/// The entries of a merged view of `dirs` (one path in several layers, top first, already cut
/// below an opaque dir): each name with the layer index that provides it, whiteouts dropped.
fn view(dirs: &[PathBuf]) -> Result<BTreeMap<OsString, (usize, Metadata)>, SandboxError> {
    let mut seen: BTreeMap<OsString, Option<(usize, Metadata)>> = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        let entries = match fs::read_dir(d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SandboxError::sys("read dir", d, e)),
        };
        for entry in entries {
            let name = entry.map_err(err("read dir", d))?.file_name();
            if seen.contains_key(&name) {
                continue;
            }
            let p = d.join(&name);
            let md = fs::symlink_metadata(&p).map_err(err("stat", &p))?;
            seen.insert(name, (!is_whiteout(&md)).then_some((i, md)));
        }
    }
    Ok(seen
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect())
}

/// The layer dirs that make up the dir `name` found (as a dir) in `dirs[top]`: that one, and
/// the same path in the layers below until one is opaque or is not a dir.
fn sub_dirs(dirs: &[PathBuf], top: usize, name: &OsString) -> Result<Vec<PathBuf>, SandboxError> {
    let mut out = Vec::new();
    for d in &dirs[top..] {
        let p = d.join(name);
        match lstat(&p)? {
            None => continue,
            Some(md) if md.is_dir() => {
                let opaque = is_opaque(&p);
                out.push(p);
                if opaque {
                    break;
                }
            }
            Some(_) => break,
        }
    }
    Ok(out)
}

/// A dir's identity: its inode and birth time (a deleted dir's inode number is soon given to
/// the next new one; the birth time tells them apart where the file system records it).
type DirId = (u64, Option<std::time::SystemTime>);

fn dir_id(md: &Metadata) -> DirId {
    (md.ino(), md.created().ok())
}

/// A copied rootfs bound at its target.
pub(crate) struct CopyMount {
    target: PathBuf,
    merged: PathBuf,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    /// The dirs the copy made: a dir with another identity was made by the step.
    dir_inodes: HashSet<DirId>,
    /// Paths the copy left out (see [`copy_entry`]): not deleted by the step.
    left_out: HashSet<PathBuf>,
}

impl CopyMount {
    /// Copies `upper` over `lowers` into `WORK/merged` and binds that at `target`.
    pub(crate) fn mount(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<CopyMount, SandboxError> {
        let merged = work.join("merged");
        fs::create_dir(&merged).map_err(err("mkdir", &merged))?;
        let mut m = CopyMount {
            target: target.to_path_buf(),
            merged,
            lowers: lowers.to_vec(),
            upper: upper.to_path_buf(),
            dir_inodes: HashSet::new(),
            left_out: HashSet::new(),
        };
        let mut layers = vec![upper.to_path_buf()];
        layers.extend_from_slice(lowers);
        let merged = m.merged.clone();
        m.copy_dir(&layers, &merged, Path::new(""))?;
        // The root shows the upper dir's owner, mode and times, as an overlay's does.
        let top = fs::symlink_metadata(upper).map_err(err("stat", upper))?;
        copy_metadata(upper, &top, &merged)?;
        set_times(&merged, &top)?;
        mount(
            Some(&merged),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys("bind mount", target, e.into()))?;
        Ok(m)
    }

    /// Fills `dest` (an existing dir) with the merged view of `dirs`.
    fn copy_dir(&mut self, dirs: &[PathBuf], dest: &Path, rel: &Path) -> Result<(), SandboxError> {
        self.dir_inodes.insert(dir_id(
            &fs::symlink_metadata(dest).map_err(err("stat", dest))?,
        ));
        for (name, (i, md)) in view(dirs)? {
            let (src, dst) = (dirs[i].join(&name), dest.join(&name));
            if md.is_dir() {
                fs::create_dir(&dst).map_err(err("mkdir", &dst))?;
                let below = sub_dirs(dirs, i, &name)?;
                self.copy_dir(&below, &dst, &rel.join(&name))?;
                copy_metadata(&src, &md, &dst)?;
                set_times(&dst, &md)?;
            } else if !copy_entry(&src, &md, &dst)? {
                self.left_out.insert(rel.join(&name));
            }
        }
        Ok(())
    }

    /// Unbinds the copy, rewrites the upper dir from it and removes it.
    pub(crate) fn unmount(self) -> Result<(), SandboxError> {
        unmount_path(&self.target)?;
        clear_dir(&self.upper)?;
        let mut diff = Diff {
            mount: &self,
            made: Vec::new(),
            emitted: HashMap::new(),
            linked: HashMap::new(),
        };
        let root_md = fs::symlink_metadata(&self.merged).map_err(err("stat", &self.merged))?;
        diff.dir(&self.lowers, Path::new(""), &[])?;
        diff.finish()?;
        set_times(&self.upper, &root_md)?;
        fs::remove_dir_all(&self.merged).map_err(err("remove", &self.merged))
    }
}

/// Removes everything inside `dir`.
fn clear_dir(dir: &Path) -> Result<(), SandboxError> {
    for entry in fs::read_dir(dir).map_err(err("read dir", dir))? {
        let p = entry.map_err(err("read dir", dir))?.path();
        let r = if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(err("remove", &p))?;
    }
    Ok(())
}

/// A dir of the copy and its ancestors, outermost (the root) first, with their metadata.
type Chain = Vec<(PathBuf, Metadata)>;

/// The comparison of the copy with the layers, writing the upper dir.
struct Diff<'a> {
    mount: &'a CopyMount,
    /// Upper dirs made (by [`Diff::ensure`]) and the metadata they get, times set last.
    made: Vec<(PathBuf, Metadata)>,
    /// Inode (in the copy) → the upper path it was first written to.
    emitted: HashMap<u64, PathBuf>,
    /// Multiply-linked files left in place: inode → their rootfs paths, each with the chain of
    /// its dirs' metadata as it was before anything moved out of them.
    linked: HashMap<u64, Vec<(PathBuf, Chain)>>,
}

/// Whether two non-directories are the same: type, owner, mode, size, mtime, rdev, link
/// target, xattrs.
fn same_entry(a: &Path, am: &Metadata, b: &Path, bm: &Metadata) -> Result<bool, SandboxError> {
    let kind = |m: &Metadata| m.mode() & libc::S_IFMT;
    if kind(am) != kind(bm)
        || am.mode() != bm.mode()
        || am.uid() != bm.uid()
        || am.gid() != bm.gid()
        || am.rdev() != bm.rdev()
        || (am.mtime(), am.mtime_nsec()) != (bm.mtime(), bm.mtime_nsec())
        || (!am.is_dir() && am.len() != bm.len())
    {
        return Ok(false);
    }
    if am.file_type().is_symlink()
        && fs::read_link(a).map_err(err("readlink", a))?
            != fs::read_link(b).map_err(err("readlink", b))?
    {
        return Ok(false);
    }
    Ok(xattrs(a)? == xattrs(b)?)
}

impl Diff<'_> {
    /// Compares the copy's dir at `rel` (whose ancestors' metadata, outermost first, is
    /// `parents`) with the layers' `lowers` (that path in each, cut at an opaque one).
    fn dir(
        &mut self,
        lowers: &[PathBuf],
        rel: &Path,
        parents: &[(PathBuf, Metadata)],
    ) -> Result<(), SandboxError> {
        let here = self.mount.merged.join(rel);
        let below = view(lowers)?;
        let mut names: Vec<OsString> = Vec::new();
        for entry in fs::read_dir(&here).map_err(err("read dir", &here))? {
            names.push(entry.map_err(err("read dir", &here))?.file_name());
        }
        names.sort();
        let here_md = fs::symlink_metadata(&here).map_err(err("stat", &here))?;
        let mut chain = parents.to_vec();
        chain.push((rel.to_path_buf(), here_md));
        for name in &names {
            let path = rel.join(name);
            let m = here.join(name);
            let md = fs::symlink_metadata(&m).map_err(err("stat", &m))?;
            let lower = below.get(name);
            if md.is_dir() {
                match lower {
                    Some((i, lmd))
                        if lmd.is_dir() && self.mount.dir_inodes.contains(&dir_id(&md)) =>
                    {
                        let l = lowers[*i].join(name);
                        if !same_entry(&m, &md, &l, lmd)? {
                            self.ensure(&chain, Some((&path, &md)))?;
                        }
                        let sub = sub_dirs(lowers, *i, name)?;
                        self.dir(&sub, &path, &chain)?;
                    }
                    _ => self.emit_tree(&chain, &path, &md, lower.is_some())?,
                }
                continue;
            }
            if md.file_type().is_socket() {
                continue;
            }
            let unchanged = match lower {
                Some((i, lmd)) => same_entry(&m, &md, &lowers[*i].join(name), lmd)?,
                None => false,
            };
            if !unchanged {
                self.ensure(&chain, None)?;
                self.emit_file(&path, &md)?;
            } else if md.nlink() > 1 {
                self.linked
                    .entry(md.ino())
                    .or_default()
                    .push((path, chain.clone()));
            }
        }
        for name in below.keys() {
            let path = rel.join(name);
            if !names.contains(name) && !self.mount.left_out.contains(&path) {
                self.ensure(&chain, None)?;
                let u = self.mount.upper.join(&path);
                mknod(&u, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| SandboxError::sys("mknod whiteout", &u, e.into()))?;
            }
        }
        Ok(())
    }

    /// Makes the upper dirs of `chain` (and `extra`) that do not exist yet.
    fn ensure(
        &mut self,
        chain: &[(PathBuf, Metadata)],
        extra: Option<(&Path, &Metadata)>,
    ) -> Result<(), SandboxError> {
        let dirs = chain
            .iter()
            .skip(1)
            .map(|(p, m)| (p.as_path(), m))
            .chain(extra);
        for (rel, md) in dirs {
            let u = self.mount.upper.join(rel);
            if lstat(&u)?.is_some() {
                continue;
            }
            fs::create_dir(&u).map_err(err("mkdir", &u))?;
            copy_metadata(&self.mount.merged.join(rel), md, &u)?;
            self.made.push((u, md.clone()));
        }
        Ok(())
    }

    /// Moves a changed or new non-directory from the copy into the upper dir (or links it to
    /// where its inode already went).
    fn emit_file(&mut self, rel: &Path, md: &Metadata) -> Result<(), SandboxError> {
        let (m, u) = (self.mount.merged.join(rel), self.mount.upper.join(rel));
        match self.emitted.get(&md.ino()) {
            Some(first) => fs::hard_link(first, &u).map_err(err("link", &u))?,
            None => {
                fs::rename(&m, &u).map_err(err("rename", &m))?;
                if md.nlink() > 1 {
                    self.emitted.insert(md.ino(), u);
                }
            }
        }
        Ok(())
    }

    /// Moves a dir the step made from the copy into the upper dir, opaque when it hides
    /// something below (as overlayfs marks a dir made over a whiteout).
    fn emit_tree(
        &mut self,
        chain: &[(PathBuf, Metadata)],
        rel: &Path,
        md: &Metadata,
        hides: bool,
    ) -> Result<(), SandboxError> {
        self.ensure(chain, None)?;
        let (m, u) = (self.mount.merged.join(rel), self.mount.upper.join(rel));
        fs::rename(&m, &u).map_err(err("rename", &m))?;
        if hides {
            xattr::set(&u, opaque_xattr(), b"y").map_err(err("set opaque xattr", &u))?;
        }
        set_times(&u, md)?;
        self.note_links(&u)
    }

    /// Records the multiply-linked files of a tree moved into the upper dir.
    fn note_links(&mut self, dir: &Path) -> Result<(), SandboxError> {
        for entry in fs::read_dir(dir).map_err(err("read dir", dir))? {
            let p = entry.map_err(err("read dir", dir))?.path();
            let md = fs::symlink_metadata(&p).map_err(err("stat", &p))?;
            if md.is_dir() {
                self.note_links(&p)?;
            } else if md.nlink() > 1 {
                self.emitted.entry(md.ino()).or_insert(p);
            }
        }
        Ok(())
    }

    /// Links the unchanged paths of inodes that were written to the upper dir (overlayfs
    /// copies a hardlinked file up with all its names), then sets the made dirs' times.
    fn finish(mut self) -> Result<(), SandboxError> {
        let linked = std::mem::take(&mut self.linked);
        for (ino, paths) in linked {
            let Some(first) = self.emitted.get(&ino).cloned() else {
                continue;
            };
            for (rel, chain) in paths {
                self.ensure(&chain, None)?;
                let u = self.mount.upper.join(&rel);
                fs::hard_link(&first, &u).map_err(err("link", &u))?;
            }
        }
        for (dir, md) in self.made.iter().rev() {
            set_times(dir, md)?;
        }
        Ok(())
    }
}
