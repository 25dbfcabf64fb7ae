//! Path-safe file operations inside an untrusted directory tree (a rootfs, an unpacked layer).
//!
//! Every path is resolved by the kernel with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! against an open directory fd, so `..`, absolute symlinks and symlinks planted by earlier
//! writes are resolved as if the directory were `/` and can never lead outside it. Operations
//! that act on a final component without following it (`symlink`, `lchown`, `set_xattr`, ...)
//! resolve the parent this way and then use the `*at` system call on the last name.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// An error from a [`RootDir`] operation; always names the path (relative to the root).
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The path leaves the root lexically (`../x`) or the kernel saw an escape attempt.
    #[error("path {} escapes the root directory", path.display())]
    Escape {
        /// The offending path as given.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("{op} {}: {err}", path.display())]
    Io {
        /// The operation, e.g. `mkdir` or `open`.
        op: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The underlying error.
        err: io::Error,
    },
}

impl RootfsError {
    /// The OS error behind this error, if any (e.g. to test for `ENOENT`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            RootfsError::Io { err, .. } => err.raw_os_error(),
            RootfsError::Escape { .. } => None,
        }
    }
}

/// Result of [`RootDir`] operations.
pub type Result<T> = std::result::Result<T, RootfsError>;

/// An open directory that acts as `/` for every path handed to its methods.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
}

/// Cleans `path` lexically into normal components relative to the root: a leading `/` and `.`
/// are dropped, `a/..` cancels; a `..` that would climb above the root is an escape.
fn clean(path: &Path) -> Result<Vec<&OsStr>> {
    let mut out: Vec<&OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err(RootfsError::Escape {
                        path: path.to_path_buf(),
                    });
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

fn join(parts: &[&OsStr]) -> OsString {
    let mut s = OsString::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push("/");
        }
        s.push(p);
    }
    if s.is_empty() {
        s.push(".");
    }
    s
}

fn cstr(s: &OsStr, path: &Path) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| RootfsError::Io {
        op: "encode",
        path: path.to_path_buf(),
        err: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(last_err()) } else { Ok(()) }
}

/// `openat2(dirfd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, retried on EAGAIN.
fn openat2_in_root(
    dirfd: RawFd,
    path: &CString,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is a plain C struct; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        // SAFETY: valid pointers to a NUL-terminated path and an open_how of the given size.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            // SAFETY: the kernel returned a fresh fd that we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
        }
        let err = last_err();
        if err.raw_os_error() == Some(libc::EAGAIN) && tries < 16 {
            tries += 1;
            continue;
        }
        return Err(err);
    }
}

fn proc_fd_path(fd: RawFd, name: &CString) -> CString {
    let mut v = format!("/proc/self/fd/{fd}/").into_bytes();
    v.extend_from_slice(name.as_bytes());
    // The name came from a CString, so no interior NUL is possible.
    CString::new(v).unwrap_or_default()
}

impl RootDir {
    /// Opens `path` (a host path) as a root.
    pub fn open_host(path: &Path) -> Result<RootDir> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(|err| RootfsError::Io {
                op: "open root",
                path: path.to_path_buf(),
                err,
            })?;
        Ok(RootDir { fd: f.into() })
    }

    /// Wraps an already open directory fd.
    pub fn from_fd(fd: OwnedFd) -> RootDir {
        RootDir { fd }
    }

    /// The raw directory fd (for `*at` calls by the caller).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wraps an error of a path operation. EXDEV only comes from openat2 here (link errors are
    /// wrapped directly), where it means the resolution tried to leave the root.
    fn io(op: &'static str, path: &Path, err: io::Error) -> RootfsError {
        if err.raw_os_error() == Some(libc::EXDEV) {
            return RootfsError::Escape {
                path: path.to_path_buf(),
            };
        }
        RootfsError::Io {
            op,
            path: path.to_path_buf(),
            err,
        }
    }

    /// Opens `rel` inside the root with `flags`, following symlinks within the root.
    fn open_flags(&self, rel: &Path, flags: libc::c_int, op: &'static str) -> Result<OwnedFd> {
        let parts = clean(rel)?;
        let c = cstr(&join(&parts), rel)?;
        openat2_in_root(self.fd.as_raw_fd(), &c, flags, 0).map_err(|e| Self::io(op, rel, e))
    }

    /// Opens the parent directory of `rel` and returns it with the last name. The root itself
    /// yields (root, ".").
    fn parent(&self, rel: &Path, op: &'static str) -> Result<(OwnedFd, CString)> {
        let parts = clean(rel)?;
        let Some((last, dir)) = parts.split_last() else {
            let fd = self.fd.try_clone().map_err(|e| Self::io(op, rel, e))?;
            return Ok((fd, CString::from(c".")));
        };
        let c = cstr(&join(dir), rel)?;
        let fd = openat2_in_root(self.fd.as_raw_fd(), &c, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| Self::io(op, rel, e))?;
        Ok((fd, cstr(last, rel)?))
    }

    /// Opens the directory `rel` (following symlinks within this root) as a new root.
    pub fn open(&self, rel: impl AsRef<Path>) -> Result<RootDir> {
        let rel = rel.as_ref();
        let fd = self.open_flags(rel, libc::O_RDONLY | libc::O_DIRECTORY, "open dir")?;
        Ok(RootDir { fd })
    }

    /// Creates `rel` and any missing parents as directories with `mode`, owned by `uid:gid`.
    /// Existing components are kept as they are; symlinks among them are followed within the
    /// root, and a dangling one gets its target created (as BuildKit's `MkdirAll` through
    /// `RootPath` does: `WORKDIR /x` with `/x -> /var/lib/x` creates `/var/lib/x`).
    pub fn mkdir_all(&self, rel: impl AsRef<Path>, mode: u32, uid: u32, gid: u32) -> Result<()> {
        self.mkdir_all_following(rel.as_ref(), mode, uid, gid, 0)
    }

    /// [`RootDir::mkdir_all`], `links` dangling symlinks deep.
    fn mkdir_all_following(
        &self,
        rel: &Path,
        mode: u32,
        uid: u32,
        gid: u32,
        links: usize,
    ) -> Result<()> {
        let parts = clean(rel)?;
        let dirflags = libc::O_PATH | libc::O_DIRECTORY;
        // Fast path: it already exists.
        let full = cstr(&join(&parts), rel)?;
        match openat2_in_root(self.fd.as_raw_fd(), &full, dirflags, 0) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(Self::io("mkdir", rel, e)),
        }
        let mut parent = self.fd.try_clone().map_err(|e| Self::io("mkdir", rel, e))?;
        for i in 0..parts.len() {
            let prefix = cstr(&join(&parts[..=i]), rel)?;
            match openat2_in_root(self.fd.as_raw_fd(), &prefix, dirflags, 0) {
                Ok(fd) => {
                    parent = fd;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(Self::io("mkdir", rel, e)),
            }
            let name = cstr(parts[i], rel)?;
            // SAFETY: valid fd and NUL-terminated name.
            let ret = unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) };
            let created = match check(ret) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                Err(e) => return Err(Self::io("mkdir", rel, e)),
            };
            let fd = match openat2_in_root(self.fd.as_raw_fd(), &prefix, dirflags, 0) {
                Ok(fd) => fd,
                // It exists (EEXIST) but cannot be opened: a dangling symlink. Its target is
                // made (inside the root), then the path resolves through the link.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !created => {
                    let link = Path::new(&join(&parts[..=i])).to_path_buf();
                    if links >= 40 {
                        return Err(Self::io(
                            "mkdir",
                            rel,
                            io::Error::from_raw_os_error(libc::ELOOP),
                        ));
                    }
                    let target = self.read_link(&link)?;
                    // As the kernel resolves it in the root: `..` at the root stays there.
                    let mut resolved: Vec<&OsStr> = parts[..i].to_vec();
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    for c in target.components() {
                        match c {
                            Component::Normal(n) => resolved.push(n),
                            Component::ParentDir => {
                                resolved.pop();
                            }
                            _ => {}
                        }
                    }
                    let resolved = PathBuf::from(join(&resolved));
                    self.mkdir_all_following(&resolved, mode, uid, gid, links + 1)?;
                    openat2_in_root(self.fd.as_raw_fd(), &prefix, dirflags, 0)
                        .map_err(|e| Self::io("mkdir", rel, e))?
                }
                Err(e) => return Err(Self::io("mkdir", rel, e)),
            };
            if created {
                // SAFETY: valid fd; AT_EMPTY_PATH acts on the fd itself.
                check(unsafe {
                    libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH)
                })
                .map_err(|e| Self::io("chown", rel, e))?;
                chmod_fd(&fd, mode).map_err(|e| Self::io("chmod", rel, e))?;
            }
            parent = fd;
        }
        Ok(())
    }

    /// Creates (or replaces: a non-directory already there is unlinked first, which also breaks
    /// hardlinks) the regular file `rel` with permission bits `mode`, open for writing.
    pub fn create_file(&self, rel: impl AsRef<Path>, mode: u32) -> Result<File> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "create")?;
        unlink_nondir(&dir, &name).map_err(|e| Self::io("create", rel, e))?;
        // SAFETY: valid fd and NUL-terminated name.
        let ret = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if ret < 0 {
            return Err(Self::io("create", rel, last_err()));
        }
        // SAFETY: fresh fd owned by us.
        let f = unsafe { File::from_raw_fd(ret) };
        // SAFETY: valid fd.
        check(unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) })
            .map_err(|e| Self::io("chmod", rel, e))?;
        Ok(f)
    }

    /// Creates the symlink `rel` pointing at `target` (stored verbatim, never resolved here).
    /// A non-directory already at `rel` is replaced.
    pub fn symlink(&self, target: impl AsRef<Path>, rel: impl AsRef<Path>) -> Result<()> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "symlink")?;
        let t = cstr(target.as_ref().as_os_str(), rel)?;
        unlink_nondir(&dir, &name).map_err(|e| Self::io("symlink", rel, e))?;
        // SAFETY: valid fd and NUL-terminated strings.
        check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
            .map_err(|e| Self::io("symlink", rel, e))
    }

    /// Creates `new_rel` as a hardlink to `existing_rel` (not following a final symlink). Both
    /// resolve inside the root. A non-directory already at `new_rel` is replaced.
    pub fn hardlink(
        &self,
        existing_rel: impl AsRef<Path>,
        new_rel: impl AsRef<Path>,
    ) -> Result<()> {
        let (old, new) = (existing_rel.as_ref(), new_rel.as_ref());
        let (odir, oname) = self.parent(old, "link")?;
        let (ndir, nname) = self.parent(new, "link")?;
        if clean(old)?.is_empty() {
            return Err(Self::io(
                "link",
                old,
                io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        unlink_nondir(&ndir, &nname).map_err(|e| Self::io("link", new, e))?;
        // SAFETY: valid fds and NUL-terminated names.
        check(unsafe {
            libc::linkat(
                odir.as_raw_fd(),
                oname.as_ptr(),
                ndir.as_raw_fd(),
                nname.as_ptr(),
                0,
            )
        })
        .map_err(|err| RootfsError::Io {
            op: "link",
            path: new.to_path_buf(),
            err,
        })
    }

    /// Creates a device node or FIFO: `mode` carries the file type (`S_IFCHR`, `S_IFBLK`,
    /// `S_IFIFO`) and permission bits. A non-directory already at `rel` is replaced.
    pub fn mknod(&self, rel: impl AsRef<Path>, mode: u32, major: u32, minor: u32) -> Result<()> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "mknod")?;
        unlink_nondir(&dir, &name).map_err(|e| Self::io("mknod", rel, e))?;
        let dev = libc::makedev(major, minor);
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })
            .map_err(|e| Self::io("mknod", rel, e))?;
        self.chmod_nofollow(&dir, &name, mode & 0o7777)
            .map_err(|e| Self::io("chmod", rel, e))
    }

    fn chmod_nofollow(&self, dir: &OwnedFd, name: &CString, mode: u32) -> io::Result<()> {
        // SAFETY: valid fd and NUL-terminated name.
        let ret = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if ret < 0 {
            return Err(last_err());
        }
        // SAFETY: fresh fd owned by us.
        let fd = unsafe { OwnedFd::from_raw_fd(ret) };
        chmod_fd(&fd, mode)
    }

    /// Removes `rel` and everything below it, without following symlinks. Missing is fine.
    pub fn remove_all(&self, rel: impl AsRef<Path>) -> Result<()> {
        let rel = rel.as_ref();
        if clean(rel)?.is_empty() {
            return Err(Self::io(
                "remove",
                rel,
                io::Error::new(io::ErrorKind::InvalidInput, "refusing to remove the root"),
            ));
        }
        let (dir, name) = match self.parent(rel, "remove") {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_all_at(&dir, &name).map_err(|e| Self::io("remove", rel, e))
    }

    /// Changes the owner of `rel` itself (a symlink is not followed).
    pub fn lchown(&self, rel: impl AsRef<Path>, uid: u32, gid: u32) -> Result<()> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "chown")?;
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|e| Self::io("chown", rel, e))
    }

    /// Sets the permission bits (incl. setuid/setgid/sticky) of `rel`, following a final
    /// symlink within the root. Never opens the file for I/O.
    pub fn chmod(&self, rel: impl AsRef<Path>, mode: u32) -> Result<()> {
        let rel = rel.as_ref();
        let fd = self.open_flags(rel, libc::O_PATH, "chmod")?;
        chmod_fd(&fd, mode & 0o7777).map_err(|e| Self::io("chmod", rel, e))
    }

    /// Sets the extended attribute `name` on `rel` itself (a symlink is not followed).
    pub fn set_xattr(&self, rel: impl AsRef<Path>, name: &str, value: &[u8]) -> Result<()> {
        let rel = rel.as_ref();
        let (dir, last) = self.parent(rel, "setxattr")?;
        let p = proc_fd_path(dir.as_raw_fd(), &last);
        let n = CString::new(name).map_err(|_| RootfsError::Io {
            op: "setxattr",
            path: rel.to_path_buf(),
            err: io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"),
        })?;
        // SAFETY: valid NUL-terminated strings and a value buffer of the given length.
        check(unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
        .map_err(|e| Self::io("setxattr", rel, e))
    }

    /// Reads the extended attribute `name` of `rel` itself; `None` if it is not set.
    pub fn get_xattr(&self, rel: impl AsRef<Path>, name: &str) -> Result<Option<Vec<u8>>> {
        let rel = rel.as_ref();
        let (dir, last) = self.parent(rel, "getxattr")?;
        let p = proc_fd_path(dir.as_raw_fd(), &last);
        xattr::get(OsStr::from_bytes(p.as_bytes()), name).map_err(|e| Self::io("getxattr", rel, e))
    }

    /// Sets the modification (and access) time of `rel` itself to `secs` (no symlink following).
    pub fn set_mtime(&self, rel: impl AsRef<Path>, secs: i64) -> Result<()> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "utimes")?;
        let ts = libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: 0,
        };
        let times = [ts, ts];
        // SAFETY: valid fd, NUL-terminated name, two timespecs.
        check(unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|e| Self::io("utimes", rel, e))
    }

    /// Metadata of `rel` itself (a final symlink is not followed).
    pub fn symlink_metadata(&self, rel: impl AsRef<Path>) -> Result<Metadata> {
        let rel = rel.as_ref();
        let fd = self.open_flags(rel, libc::O_PATH | libc::O_NOFOLLOW, "stat")?;
        File::from(fd)
            .metadata()
            .map_err(|e| Self::io("stat", rel, e))
    }

    /// Metadata of what `rel` resolves to, following symlinks within the root.
    pub fn metadata(&self, rel: impl AsRef<Path>) -> Result<Metadata> {
        let rel = rel.as_ref();
        let fd = self.open_flags(rel, libc::O_PATH, "stat")?;
        File::from(fd)
            .metadata()
            .map_err(|e| Self::io("stat", rel, e))
    }

    /// Opens the regular file `rel` for reading (following symlinks within the root). Anything
    /// else (a FIFO, a device) is refused without ever being opened for I/O.
    pub fn open_read(&self, rel: impl AsRef<Path>) -> Result<File> {
        let rel = rel.as_ref();
        let fd = self.open_flags(rel, libc::O_PATH, "open")?;
        let f = File::from(fd);
        let md = f.metadata().map_err(|e| Self::io("open", rel, e))?;
        if !md.is_file() {
            return Err(Self::io(
                "open",
                rel,
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        // Re-open the pinned inode for reading through its fd (not a path lookup).
        let p = format!("/proc/self/fd/{}", f.as_raw_fd());
        File::open(p).map_err(|e| Self::io("open", rel, e))
    }

    /// The target of the symlink `rel`.
    pub fn read_link(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "readlink")?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: valid fd, NUL-terminated name, buffer of the given length.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(Self::io("readlink", rel, last_err()));
        }
        buf.truncate(n as usize);
        Ok(PathBuf::from(OsString::from_vec(buf)))
    }

    /// The real host path `rel` resolves to inside the root (following symlinks within it). If
    /// the final component does not exist, the resolved parent joined with the last name.
    pub fn resolve(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        let rel = rel.as_ref();
        let fd = match self.open_flags(rel, libc::O_PATH, "resolve") {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let (dir, name) = self.parent(rel, "resolve")?;
                let p = fd_path(&dir).map_err(|e| Self::io("resolve", rel, e))?;
                return Ok(p.join(OsStr::from_bytes(name.as_bytes())));
            }
            Err(e) => return Err(e),
        };
        fd_path(&fd).map_err(|e| Self::io("resolve", rel, e))
    }

    /// The real host path of the entry `rel` itself: its parent resolved inside the root
    /// (following symlinks within it), its last component not followed, so a symlink stays one.
    pub fn resolve_entry(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent(rel, "resolve")?;
        let p = fd_path(&dir).map_err(|e| Self::io("resolve", rel, e))?;
        Ok(p.join(OsStr::from_bytes(name.as_bytes())))
    }

    /// Whether `rel` exists (a dangling symlink exists).
    pub fn exists(&self, rel: impl AsRef<Path>) -> Result<bool> {
        match self.symlink_metadata(rel) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Host path of an open fd, via its `/proc/self/fd` link.
fn fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// chmod through an `O_PATH` fd: `fchmodat2(AT_EMPTY_PATH)`, or the `/proc/self/fd` link on
/// kernels without it. Never opens the file for I/O.
fn chmod_fd(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and an empty NUL-terminated path.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode as libc::mode_t,
            libc::AT_EMPTY_PATH,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = last_err();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let p = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if missing.
fn lstat_at(dir: &OwnedFd, name: &CString) -> io::Result<Option<libc::stat>> {
    // SAFETY: stat is plain data; valid fd, name and out-pointer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret < 0 {
        let e = last_err();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(st))
}

/// Unlinks `name` in `dir` if it exists and is not a directory; a directory is an error.
fn unlink_nondir(dir: &OwnedFd, name: &CString) -> io::Result<()> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a directory is in the way",
        )),
        // SAFETY: valid fd and NUL-terminated name.
        Some(_) => check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }),
    }
}

/// Removes `name` in `dir` recursively without following symlinks.
fn remove_all_at(dir: &OwnedFd, name: &CString) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        // SAFETY: valid fd and NUL-terminated name.
        return check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) });
    }
    // SAFETY: valid fd and NUL-terminated name.
    let ret = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(last_err());
    }
    // SAFETY: fresh fd owned by us.
    let sub = unsafe { OwnedFd::from_raw_fd(ret) };
    let names: Vec<CString> = {
        let d = nix::dir::Dir::from_fd(sub.try_clone()?).map_err(io::Error::from)?;
        let mut v = Vec::new();
        for ent in d {
            let ent = ent.map_err(io::Error::from)?;
            let n = ent.file_name();
            if n == c"." || n == c".." {
                continue;
            }
            v.push(n.to_owned());
        }
        v
    };
    for n in &names {
        remove_all_at(&sub, n)?;
    }
    // SAFETY: valid fd and NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, RootDir) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let r = RootDir::open_host(&root).unwrap();
        (t, root, r)
    }

    #[test]
    fn dotdot_at_start_is_refused() {
        let (t, _root, r) = setup();
        let e = r.create_file("../evil", 0o644).unwrap_err();
        assert!(matches!(e, RootfsError::Escape { .. }), "{e}");
        assert!(e.to_string().contains("../evil"), "{e}");
        assert!(!t.path().join("evil").exists());
        // Inside-out-inside is fine.
        r.mkdir_all("a", 0o755, 0, 0).unwrap();
        r.create_file("a/../b", 0o644).unwrap();
        assert!(r.exists("b").unwrap());
    }

    #[test]
    fn absolute_symlink_stays_inside() {
        let (t, root, r) = setup();
        symlink("/", root.join("etc")).unwrap();
        r.mkdir_all("etc/sub", 0o755, 0, 0).unwrap();
        let mut f = r.create_file("/etc/sub/x", 0o644).unwrap();
        f.write_all(b"hi").unwrap();
        // `/etc` -> `/` means the root itself, so this is root/sub/x.
        assert_eq!(std::fs::read(root.join("sub/x")).unwrap(), b"hi");
        assert!(!Path::new("/sub").exists());
        assert_eq!(r.resolve("etc/sub/x").unwrap(), root.join("sub/x"));
        drop(t);
    }

    #[test]
    fn relative_symlink_up_stays_inside() {
        let (t, root, r) = setup();
        std::fs::create_dir(root.join("d")).unwrap();
        symlink("../../..", root.join("d/a")).unwrap();
        r.create_file("d/a/x", 0o600).unwrap();
        assert!(root.join("x").exists());
        assert!(!t.path().join("x").exists());
        r.mkdir_all("d/a/y/z", 0o755, 0, 0).unwrap();
        assert!(root.join("y/z").is_dir());
        assert!(r.metadata("d/a").unwrap().is_dir());
    }

    #[test]
    fn mkdir_through_a_dangling_symlink_makes_its_target() {
        use std::os::unix::fs::MetadataExt;
        let (_t, root, r) = setup();
        symlink("/var/lib/x", root.join("x")).unwrap();
        symlink("../made/here", root.join("var_rel")).unwrap();
        r.mkdir_all("x/sub", 0o750, 7, 8).unwrap();
        r.mkdir_all("var_rel", 0o755, 0, 0).unwrap();
        assert!(r.symlink_metadata("x").unwrap().file_type().is_symlink());
        let made = r.symlink_metadata("var/lib/x/sub").unwrap();
        assert!(made.is_dir());
        assert_eq!((made.uid(), made.gid(), made.mode() & 0o777), (7, 8, 0o750));
        assert!(r.metadata("made/here").unwrap().is_dir());
        symlink("loop", root.join("loop")).unwrap();
        assert!(r.mkdir_all("loop/x", 0o755, 0, 0).is_err());
    }

    #[test]
    fn symlink_chain_stays_inside() {
        let (t, root, r) = setup();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        symlink(&outside, root.join("l1")).unwrap(); // absolute host path: in-root it dangles
        symlink("l1", root.join("l2")).unwrap();
        symlink("/l2/..", root.join("l3")).unwrap();
        r.symlink("/l3/../../..", "l4").unwrap();
        for p in ["l2/x", "l3/x", "l4/x"] {
            let _ = r.create_file(p, 0o644);
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let _ = r.mkdir_all("l2/made", 0o755, 0, 0);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Nofollow operations act on the link itself.
        r.lchown("l2", 1, 1).unwrap();
        assert!(r.symlink_metadata("l2").unwrap().file_type().is_symlink());
        assert_eq!(r.read_link("l2").unwrap(), Path::new("l1"));
        // Hardlink to something outside via a symlinked parent stays inside.
        std::fs::write(outside.join("secret"), b"s").unwrap();
        let _ = r.hardlink("l1/secret", "h");
        assert!(!root.join("h").exists());
    }

    #[test]
    fn mknod_chmod_xattr_mtime_remove() {
        let (_t, root, r) = setup();
        r.mkdir_all("d/e", 0o750, 1000, 1000).unwrap();
        let md = std::fs::metadata(root.join("d/e")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.mode() & 0o7777, md.uid()), (0o750, 1000));
        r.mknod("d/e/w", libc::S_IFCHR | 0o600, 0, 0).unwrap();
        r.mknod("d/fifo", libc::S_IFIFO | 0o644, 0, 0).unwrap();
        assert!(r.open_read("d/fifo").is_err());
        r.create_file("d/f", 0o644).unwrap();
        r.chmod("d/f", 0o4755).unwrap();
        assert_eq!(r.metadata("d/f").unwrap().mode() & 0o7777, 0o4755);
        r.set_xattr("d/f", "trusted.test", b"v").unwrap();
        assert_eq!(r.get_xattr("d/f", "trusted.test").unwrap().unwrap(), b"v");
        r.set_mtime("d/f", 1234).unwrap();
        assert_eq!(r.metadata("d/f").unwrap().mtime(), 1234);
        r.remove_all("d").unwrap();
        assert!(!root.join("d").exists());
        r.remove_all("missing/x").unwrap();
        assert!(r.remove_all("/").is_err());
    }
}
