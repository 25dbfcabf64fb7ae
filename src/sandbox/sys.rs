//! Thin wrappers over the Linux syscalls the sandbox needs that nix does not cover:
//! the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`), `close_range`
//! and `pidfd_open`; plus the overlay mount built on them.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::SandboxError;

fn cstring(s: &[u8]) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::InvalidInput(format!("{s:?} contains a NUL byte")))
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `fsopen(2)`: a new file system context for `fstype`.
fn fsopen(fstype: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: valid NUL-terminated string; returns a new fd we own.
    let fd = check(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), 1 as libc::c_uint) })?;
    // SAFETY: the kernel just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `fsconfig(2)` with `FSCONFIG_SET_STRING`.
fn fsconfig_string(fs: &OwnedFd, key: &CStr, value: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            1 as libc::c_uint, // FSCONFIG_SET_STRING
            key.as_ptr(),
            value.as_ptr(),
            0 as libc::c_int,
        )
    })
    .map(drop)
}

/// `fsconfig(2)` with `FSCONFIG_SET_FLAG`: an option without a value.
fn fsconfig_flag(fs: &OwnedFd, key: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated key; a flag takes no value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            0 as libc::c_uint, // FSCONFIG_SET_FLAG
            key.as_ptr(),
            std::ptr::null::<libc::c_void>(),
            0 as libc::c_int,
        )
    })
    .map(drop)
}

/// `fsconfig(2)` with `FSCONFIG_CMD_CREATE`.
fn fsconfig_create(fs: &OwnedFd) -> io::Result<()> {
    // SAFETY: valid fd; the command takes no key or value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            6 as libc::c_uint, // FSCONFIG_CMD_CREATE
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0 as libc::c_int,
        )
    })
    .map(drop)
}

/// `fsmount(2)`: a detached mount of the created superblock.
fn fsmount(fs: &OwnedFd, attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: valid fd; FSMOUNT_CLOEXEC.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            1 as libc::c_uint,
            attrs as libc::c_uint,
        )
    })?;
    // SAFETY: the kernel just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `move_mount(2)`: attaches the detached mount `mnt` at `target`.
fn move_mount(mnt: &OwnedFd, target: &Path) -> Result<(), SandboxError> {
    let t = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: valid fd, empty path with MOVE_MOUNT_F_EMPTY_PATH, NUL-terminated target.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            4 as libc::c_uint, // MOVE_MOUNT_F_EMPTY_PATH
        )
    })
    .map(drop)
    .map_err(|e| SandboxError::sys("move_mount", target, e))
}

/// Marks every fd from 3 up close-on-exec (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`).
/// Makes every mount in this mount namespace private, so nothing we mount propagates back to
/// the host's namespace (call right after unsharing the mount namespace).
pub(crate) fn make_mounts_private() -> Result<(), SandboxError> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("make mounts private", Path::new("/"), e.into()))
}

pub(crate) fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: plain syscall on integers.
    check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            !0 as libc::c_uint,
            1u32 << 2,
        )
    })
    .map(drop)
}

/// `pidfd_open(2)`.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; returns a new fd we own.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) })?;
    // SAFETY: the kernel just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reads the kernel's messages about a failed file system context (best effort).
fn fs_log(fs: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: reading into a local buffer from a valid fd.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push(
            String::from_utf8_lossy(&buf[..n as usize])
                .trim()
                .to_string(),
        );
    }
    out.join("; ")
}

/// The options an overlay mount is made of.
pub(crate) struct Overlay<'a> {
    /// Lower layers, top-most first (at least one).
    pub lowers: &'a [PathBuf],
    /// The upper dir.
    pub upper: &'a Path,
    /// The work dir.
    pub work: &'a Path,
    /// Mounted in a user namespace: overlay's own data lives in `user.overlay.*` xattrs (the
    /// `trusted.*` ones need root on the host), which also needs `redirect_dir=nofollow`.
    pub userxattr: bool,
}

/// Opens `path` as an `O_PATH` directory fd and names it by a short `/proc/self/fd/N` path.
fn by_fd(path: &Path) -> Result<(OwnedFd, CString), SandboxError> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SandboxError::sys("open", path, e.into()))?;
    let name = cstring(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())?;
    Ok((fd, name))
}

/// The options that keep the upper dir a plain diff (DESIGN.md §6). In a user namespace
/// `redirect_dir=off` means "follow", which `userxattr` forbids: there it is `nofollow`.
fn overlay_flags(userxattr: bool) -> [(&'static CStr, &'static CStr); 3] {
    [
        (
            c"redirect_dir",
            if userxattr { c"nofollow" } else { c"off" },
        ),
        (c"metacopy", c"off"),
        (c"index", c"off"),
    ]
}

/// Mounts the overlay at `target` (in the caller's mount namespace).
///
/// Uses the new mount API with one `lowerdir+` per layer (Linux 6.8+), so no option-length
/// limit applies; every dir is passed as a short `/proc/self/fd/N`. On older kernels it falls
/// back to mount(2) with the same short names (about 200 layers fit in its one-page limit).
pub(crate) fn mount_overlay(o: &Overlay<'_>, target: &Path) -> Result<(), SandboxError> {
    allow_volatile_remount(o.work)?;
    let fs =
        fsopen(c"overlay").map_err(|e| SandboxError::sys("fsopen(overlay)", Path::new(""), e))?;
    let set = |key: &CStr, value: &CStr, about: &Path| {
        fsconfig_string(&fs, key, value).map_err(|e| SandboxError::Overlay {
            path: about.to_path_buf(),
            option: key.to_string_lossy().into_owned(),
            source: e,
            log: fs_log(&fs),
        })
    };
    for (i, lower) in o.lowers.iter().enumerate() {
        let (_fd, name) = by_fd(lower)?;
        match set(c"lowerdir+", &name, lower) {
            Err(SandboxError::Overlay { source, .. })
                if i == 0 && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                return mount_overlay_legacy(o, target);
            }
            r => r?,
        }
    }
    let (_u, upper) = by_fd(o.upper)?;
    set(c"upperdir", &upper, o.upper)?;
    let (_w, work) = by_fd(o.work)?;
    set(c"workdir", &work, o.work)?;
    if o.userxattr {
        fsconfig_flag(&fs, c"userxattr").map_err(|e| SandboxError::Overlay {
            path: o.upper.to_path_buf(),
            option: "userxattr".into(),
            source: e,
            log: fs_log(&fs),
        })?;
    }
    for (k, v) in overlay_flags(o.userxattr) {
        set(k, v, o.upper)?;
    }
    // `volatile`: no sync of the upper filesystem when the overlay is unmounted. Without it,
    // tearing a sandbox down runs syncfs on the whole host filesystem the scratch dir lives
    // on, writing out the step's files (and anything else dirty) before the snapshot even
    // starts. The upper dir is scratch: what must be durable is the layer blob, which the
    // store fsyncs, and unpacked layer dirs are guarded by the store (see `Store::open`).
    fsconfig_flag(&fs, c"volatile").map_err(|e| SandboxError::Overlay {
        path: o.upper.to_path_buf(),
        option: "volatile".into(),
        source: e,
        log: fs_log(&fs),
    })?;
    fsconfig_create(&fs).map_err(|e| SandboxError::Overlay {
        path: o.upper.to_path_buf(),
        option: "create".into(),
        source: e,
        log: fs_log(&fs),
    })?;
    let mnt = fsmount(&fs, 0).map_err(|e| SandboxError::sys("fsmount(overlay)", o.upper, e))?;
    move_mount(&mnt, target)
}

/// A `volatile` overlay leaves `WORK/work/incompat/volatile` behind, and the kernel refuses
/// to mount that work dir again while it exists (after a crash the upper dir may have lost
/// writes). The caller owns the pair and mounts it again only within one live process (kiln's
/// scratch dirs never outlive their session), so the marker is cleared before each mount.
fn allow_volatile_remount(work: &Path) -> Result<(), SandboxError> {
    let incompat = work.join("work/incompat");
    match std::fs::remove_dir_all(&incompat) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(SandboxError::sys("remove", &incompat, e))
        }
        _ => Ok(()),
    }
}

/// The mount(2) fallback of [`mount_overlay`] for kernels without `lowerdir+`.
fn mount_overlay_legacy(o: &Overlay<'_>, target: &Path) -> Result<(), SandboxError> {
    let mut fds = Vec::new();
    let mut lowers = Vec::new();
    for lower in o.lowers {
        let (fd, name) = by_fd(lower)?;
        fds.push(fd);
        lowers.push(name.into_string().unwrap_or_default());
    }
    let (_u, upper) = by_fd(o.upper)?;
    let (_w, work) = by_fd(o.work)?;
    let mut data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.to_string_lossy(),
        work.to_string_lossy()
    );
    if o.userxattr {
        data.push_str(",userxattr");
    }
    for (k, v) in overlay_flags(o.userxattr) {
        data.push_str(&format!(",{}={}", k.to_string_lossy(), v.to_string_lossy()));
    }
    data.push_str(",volatile"); // as in `mount_overlay`
    if data.len() >= 4096 {
        return Err(SandboxError::InvalidInput(format!(
            "{} layers do not fit in one overlay mount on this kernel (Linux 6.8+ has no limit)",
            o.lowers.len()
        )));
    }
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| SandboxError::Overlay {
        path: o.upper.to_path_buf(),
        option: "mount(2)".into(),
        source: e.into(),
        log: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mount(2) fallback handles 60 layers (run as root, in a private mount namespace).
    #[test]
    fn legacy_overlay_mount_takes_many_layers() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::TempDir::new().unwrap();
        let lowers: Vec<PathBuf> = (0..60)
            .map(|i| {
                let l = dir
                    .path()
                    .join(format!("layer-with-a-long-descriptive-name-{i:03}"));
                std::fs::create_dir(&l).unwrap();
                std::fs::write(l.join(format!("f{i}")), "").unwrap();
                l
            })
            .collect();
        let (upper, work, root) = (
            dir.path().join("u"),
            dir.path().join("w"),
            dir.path().join("r"),
        );
        for d in [&upper, &work, &root] {
            std::fs::create_dir(d).unwrap();
        }
        let seen = std::thread::spawn(move || {
            use nix::sched::{CloneFlags, unshare};
            unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).unwrap();
            let private = nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE;
            nix::mount::mount(None::<&str>, "/", None::<&str>, private, None::<&str>).unwrap();
            let o = Overlay {
                lowers: &lowers,
                upper: &upper,
                work: &work,
                userxattr: false,
            };
            mount_overlay_legacy(&o, &root).unwrap();
            let n = std::fs::read_dir(&root).unwrap().count();
            nix::mount::umount(&root).unwrap();
            n
        })
        .join()
        .unwrap();
        assert_eq!(seen, 60);
    }
}
