//! The re-executed helper side: reads the [`InitConfig`], unshares a pid namespace, forks the
//! sandbox init (pid 1) which builds the rootfs and execs the command, supervises it, and
//! reports back on the status pipe.
//!
//! File descriptors on entry: 0 stdin, 1 and 2 the output pipe, 3 the config pipe, 4 the status
//! pipe, 5 the control pipe (end of file there means "kill everything").

use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::{Mode, fstat, mkdirat, umask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

use super::sys::{self, Overlay};
use super::{
    InitConfig, NetworkMode, Report, RootfsSource, SandboxError, cgroups, limits, userns, users,
};

const CONFIG_FD: i32 = 3;
const STATUS_FD: i32 = 4;
const CONTROL_FD: i32 = 5;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the hidden sandbox entry point in a re-exec'd kiln process; never returns.
///
/// Must be called first thing in `main` (while the process is single-threaded) when
/// `argv[1] == INIT_ARG`.
pub fn init_main() -> ! {
    let code = match helper() {
        Ok(()) => 0,
        Err(e) => {
            send(error_report(e));
            1
        }
    };
    std::process::exit(code)
}

/// The report of a failed setup: the message alone (the parent says it was the setup).
fn error_report(e: SandboxError) -> Report {
    Report::Error(match e {
        SandboxError::Setup(message) => message,
        e => e.to_string(),
    })
}

/// Writes one report line to the status pipe (best effort: the parent may be gone).
fn send(report: Report) {
    if let Ok(mut line) = serde_json::to_vec(&report) {
        line.push(b'\n');
        // SAFETY: STATUS_FD stays open for the life of this process; ManuallyDrop keeps it open.
        let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(STATUS_FD) });
        let _ = f.write_all(&line);
    }
}

/// The helper itself has no parent-death signal: when kiln dies, the control pipe reaches end of
/// file and the helper kills the sandbox init before exiting (a parent-death signal on the init
/// alone would not survive the init's setuid or an exec of a setuid binary).
fn helper() -> Result<(), SandboxError> {
    // SAFETY: the parent handed us CONFIG_FD; we take ownership and close it after reading.
    let mut config_pipe = unsafe { File::from_raw_fd(CONFIG_FD) };
    let mut buf = Vec::new();
    config_pipe
        .read_to_end(&mut buf)
        .map_err(|e| SandboxError::sys("read config", Path::new("fd 3"), e))?;
    drop(config_pipe);
    let config: InitConfig = serde_json::from_slice(&buf)
        .map_err(|e| SandboxError::InvalidInput(format!("sandbox config: {e}")))?;
    // SAFETY: the parent handed us CONTROL_FD and nothing else owns it.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };

    unshare(CloneFlags::CLONE_NEWPID)
        .map_err(|e| SandboxError::sys("unshare(CLONE_NEWPID)", Path::new(""), e.into()))?;
    // The init watches this pipe: end of file means the helper is gone.
    let (alive_r, alive_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("pipe2", Path::new(""), e.into()))?;
    // SAFETY: this process is single-threaded (init_main runs first thing in main).
    match unsafe { fork() }.map_err(|e| SandboxError::sys("fork", Path::new(""), e.into()))? {
        ForkResult::Child => {
            drop((control, alive_w));
            let err = match sandbox_init(&config, alive_r) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            send(error_report(err));
            // SAFETY: terminating the child without running the parent's atexit handlers.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            let r = supervise(child, control, config.cgroup.as_ref());
            drop(alive_w);
            super::remove_scratch(&config.scratch, &super::SCRATCH_FILES);
            if let Some(cg) = &config.cgroup {
                cg.remove();
            }
            r
        }
    }
}

/// How often (ms) a step's cgroup is checked for a limit it hit.
const LIMIT_CHECK_MS: u8 = 50;

/// Waits for the sandbox init to end, or kills it when the control pipe closes or the step hits
/// a limit of its cgroup; reports how it ended. When it returns, every process of the step has
/// exited.
fn supervise(
    child: Pid,
    control: OwnedFd,
    cgroup: Option<&cgroups::StepCgroup>,
) -> Result<(), SandboxError> {
    // Only the step's processes may hold the output pipe, so its end of file means they are gone.
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| SandboxError::sys("open", Path::new("/dev/null"), e))?;
    for fd in 0..3 {
        // SAFETY: plain dup2 of a valid fd over the standard fds.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
    drop(null);
    let pidfd = sys::pidfd_open(child.as_raw())
        .map_err(|e| SandboxError::sys("pidfd_open", Path::new(""), e))?;
    let mut cancelled = false;
    let mut hit = None;
    let timeout = if cgroup.is_some() {
        PollTimeout::from(LIMIT_CHECK_MS)
    } else {
        PollTimeout::NONE
    };
    loop {
        let mut fds = [
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::sys("poll", Path::new(""), e.into())),
            Ok(_) => {}
        }
        if fds[0].any().unwrap_or(false) {
            break;
        }
        if fds[1].any().unwrap_or(false) {
            cancelled = true;
            let _ = kill(child, Signal::SIGKILL);
            break;
        }
        // A step that hit a limit is failed as a whole: what it goes on to do would depend on
        // which of its processes the kernel stopped.
        hit = cgroup.and_then(cgroups::StepCgroup::hit);
        if hit.is_some() {
            let _ = kill(child, Signal::SIGKILL);
            break;
        }
    }
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::sys("waitpid", Path::new(""), e.into())),
        }
    };
    if cancelled {
        send(Report::Cancelled);
        return Ok(());
    }
    if let Some(hit) = hit.or_else(|| cgroup.and_then(cgroups::StepCgroup::hit)) {
        send(Report::Limit(hit));
    }
    send(Report::Exit(code));
    Ok(())
}

/// What a mount point must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// Creates mount points inside the rootfs without ever leaving it (symlinks are resolved as if
/// the rootfs were `/`), and reports what it created so the parent can remove it afterwards.
struct Rootfs<'a> {
    /// The host path of the merged overlay.
    root: PathBuf,
    root_fd: OwnedFd,
    /// The overlay's upper dir, when there is one to look at (not with a copied rootfs, where
    /// every dir counts as copied up).
    upper: Option<&'a Path>,
}

impl Rootfs<'_> {
    fn open_in_root(&self, rel: &Path, dir: bool) -> Result<OwnedFd, Errno> {
        let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        if dir {
            flags |= OFlag::O_DIRECTORY;
        }
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(self.root_fd.as_fd(), rel, how)
    }

    /// The host path (free of symlinks) an fd opened inside the rootfs refers to.
    fn real_path(&self, fd: &OwnedFd, what: &Path) -> Result<PathBuf, SandboxError> {
        let p = nix::fcntl::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str())
            .map_err(|e| SandboxError::sys("readlink", what, e.into()))?;
        Ok(PathBuf::from(p))
    }

    fn rel_of<'p>(&self, real: &'p Path) -> Option<&'p Path> {
        real.strip_prefix(&self.root).ok()
    }

    /// Makes sure `target` (absolute in the rootfs) exists as `kind`, creating missing
    /// components; returns its host path, or `None` when it exists as something else.
    fn ensure(&self, target: &str, kind: Kind) -> Result<Option<PathBuf>, SandboxError> {
        let mut prefix = PathBuf::new();
        let comps: Vec<&OsStr> = Path::new(target)
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(Ok(n)),
                Component::RootDir | Component::CurDir => None,
                Component::ParentDir | Component::Prefix(_) => Some(Err(())),
            })
            .collect::<Result<_, _>>()
            .map_err(|()| SandboxError::InvalidInput(format!("mount target {target:?} has ..")))?;
        if comps.is_empty() {
            return Err(SandboxError::InvalidInput(format!(
                "mount target {target:?}"
            )));
        }
        let mut parent = self
            .open_in_root(Path::new("."), true)
            .map_err(|e| SandboxError::sys("open", &self.root, e.into()))?;
        for (i, name) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            prefix.push(name);
            let want_dir = !last || kind == Kind::Dir;
            match self.open_in_root(&prefix, false) {
                Ok(fd) => {
                    let st =
                        fstat(&fd).map_err(|e| SandboxError::sys("stat", &prefix, e.into()))?;
                    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
                    if want_dir && !is_dir || !want_dir && !is_file {
                        if last {
                            return Ok(None);
                        }
                        return Err(SandboxError::sys(
                            "mount point parent",
                            &prefix,
                            std::io::Error::from(Errno::ENOTDIR),
                        ));
                    }
                    parent = fd;
                }
                Err(Errno::ENOENT) => {
                    let parent_real = self.real_path(&parent, &prefix)?;
                    self.note_copy_up(&parent_real);
                    let new = parent_real.join(name);
                    if want_dir {
                        mkdirat(parent.as_fd(), *name, Mode::from_bits_truncate(0o755))
                            .map_err(|e| SandboxError::sys("mkdir", &new, e.into()))?;
                    } else {
                        File::options()
                            .write(true)
                            .create_new(true)
                            .open(&new)
                            .map_err(|e| SandboxError::sys("create", &new, e))?;
                    }
                    if let Some(rel) = self.rel_of(&new) {
                        send(Report::Created(rel.to_string_lossy().into_owned()));
                    }
                    parent = self
                        .open_in_root(&prefix, want_dir)
                        .map_err(|e| SandboxError::sys("open", &new, e.into()))?;
                }
                Err(e) => return Err(SandboxError::sys("open", &prefix, e.into())),
            }
        }
        self.real_path(&parent, &prefix).map(Some)
    }

    /// Before creating an entry in `dir` (a host path inside the rootfs), reports each directory
    /// on the way that exists only in the lower layers: creating the entry copies it up.
    fn note_copy_up(&self, dir: &Path) {
        let Some(rel) = self.rel_of(dir) else { return };
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            prefix.push(c);
            if self
                .upper
                .is_some_and(|u| u.join(&prefix).symlink_metadata().is_ok())
            {
                continue;
            }
            if let Ok(m) = self.root.join(&prefix).symlink_metadata() {
                send(Report::CopiedUp {
                    path: prefix.to_string_lossy().into_owned(),
                    mode: m.mode(),
                    uid: m.uid(),
                    gid: m.gid(),
                });
            }
        }
    }
}

fn mount_at(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    mount(Some(source), target, fstype, flags, data).map_err(|e| {
        SandboxError::sys(
            &format!("mount({}, {})", fstype.unwrap_or("bind"), source),
            target,
            e.into(),
        )
    })
}

fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), SandboxError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        SandboxError::sys(
            &format!("bind mount {}", source.display()),
            target,
            e.into(),
        )
    })?;
    if readonly {
        let flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(target);
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| SandboxError::sys("remount read-only", target, e.into()))?;
    }
    Ok(())
}

/// The flags a bind remount of `target` must repeat: in a user namespace the kernel locks
/// `nosuid`, `nodev`, `noexec` and the atime flags of mounts it inherited from the host, and
/// refuses a remount that would clear them.
fn kept_flags(target: &Path) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = nix::sys::statvfs::statvfs(target) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| f.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

/// Builds the rootfs and execs the command; returns only on failure.
fn sandbox_init(cfg: &InitConfig, helper_alive: OwnedFd) -> Result<Infallible, SandboxError> {
    // First, while this process is alone: everything the step starts inherits the cgroup.
    if let Some(cg) = &cfg.cgroup {
        cg.join_self()
            .map_err(|e| SandboxError::Setup(format!("moving the step into its cgroup: {e}")))?;
    }
    // Everything created from here on (mount stubs, the working dir) gets predictable modes.
    umask(Mode::from_bits_truncate(0o022));
    die_with_helper(&helper_alive)?;
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if cfg.network == NetworkMode::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| SandboxError::sys("unshare", Path::new(""), e.into()))?;
    sys::make_mounts_private()?;

    let root = cfg.scratch.join("root");
    let upper = match &cfg.rootfs {
        RootfsSource::Overlay {
            lowers,
            upper,
            work,
            userxattr,
        } => {
            let empty = [cfg.scratch.join("empty")];
            let lowers = if lowers.is_empty() {
                &empty[..]
            } else {
                &lowers[..]
            };
            sys::mount_overlay(
                &Overlay {
                    lowers,
                    upper,
                    work,
                    userxattr: *userxattr,
                },
                &root,
            )?;
            Some(upper.as_path())
        }
        RootfsSource::Prepared {
            root: prepared,
            upper,
        } => {
            bind(prepared, &root, false)?;
            upper.as_deref()
        }
    };
    let root_fd = nix::fcntl::open(
        &root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SandboxError::sys("open", &root, e.into()))?;
    let rootfs = Rootfs {
        root: root.clone(),
        root_fd,
        upper,
    };
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

    let required = |target: &str| -> Result<PathBuf, SandboxError> {
        rootfs.ensure(target, Kind::Dir)?.ok_or_else(|| {
            SandboxError::Setup(format!(
                "{target} exists in the rootfs but is not a directory"
            ))
        })
    };
    let proc_dir = required("/proc")?;
    mount_at("proc", &proc_dir, Some("proc"), nosuid_nodev_noexec, None)?;
    protect_proc(&proc_dir)?;

    let dev = required("/dev")?;
    mount_at(
        "tmpfs",
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    populate_dev(&dev, cfg.shm_size)?;

    let sysfs = required("/sys")?;
    let ro = nosuid_nodev_noexec | MsFlags::MS_RDONLY;
    if mount(Some("sysfs"), &sysfs, Some("sysfs"), ro, None::<&str>).is_err() {
        bind(Path::new("/sys"), &sysfs, true)?;
    }
    mask(&sysfs.join("firmware"))?;

    for name in super::SCRATCH_FILES {
        if let Some(target) = rootfs.ensure(&format!("/etc/{name}"), Kind::File)? {
            bind(&cfg.scratch.join(name), &target, false)?;
        }
    }
    for b in &cfg.binds {
        let kind = if b.source.is_dir() {
            Kind::Dir
        } else {
            Kind::File
        };
        let target = rootfs.ensure(&b.target, kind)?.ok_or_else(|| {
            SandboxError::Setup(format!(
                "bind mount target {} exists but is not a {}",
                b.target,
                if kind == Kind::Dir {
                    "directory"
                } else {
                    "file"
                }
            ))
        })?;
        bind(&b.source, &target, b.readonly)?;
    }

    let hostname = if cfg.hostname.is_empty() {
        "localhost"
    } else {
        &cfg.hostname
    };
    nix::unistd::sethostname(hostname)
        .map_err(|e| SandboxError::sys("sethostname", Path::new(hostname), e.into()))?;
    if cfg.network == NetworkMode::None {
        loopback_up()?;
    }

    // pivot_root(".", ".") stacks the old root on top of the new one; detach it.
    nix::unistd::chdir(&root).map_err(|e| SandboxError::sys("chdir", &root, e.into()))?;
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| SandboxError::sys("pivot_root", &root, e.into()))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| SandboxError::sys("detach old root", Path::new("/"), e.into()))?;
    nix::unistd::chdir("/").map_err(|e| SandboxError::sys("chdir", Path::new("/"), e.into()))?;
    drop(rootfs);

    let passwd = std::fs::read_to_string("/etc/passwd").ok();
    let group = std::fs::read_to_string("/etc/group").ok();
    let user = users::resolve(&cfg.user, passwd.as_deref(), group.as_deref())?;
    let cwd = if cfg.cwd.is_empty() { "/" } else { &cfg.cwd };
    std::fs::create_dir_all(cwd)
        .map_err(|e| SandboxError::sys("create working dir", Path::new(cwd), e))?;
    nix::unistd::chdir(cwd).map_err(|e| SandboxError::sys("chdir", Path::new(cwd), e.into()))?;

    let gids: Vec<Gid> = user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // While the init still holds CAP_SYS_RESOURCE (which some raised limits need).
    set_rlimits(&cfg.rlimits)?;
    // Before the credentials change, while the init still holds CAP_SETPCAP.
    bound_capabilities()?;
    set_groups(&gids, user.gid)?;
    nix::unistd::setgid(Gid::from_raw(user.gid)).map_err(|e| id_error("setgid", user.gid, e))?;
    nix::unistd::setuid(Uid::from_raw(user.uid)).map_err(|e| id_error("setuid", user.uid, e))?;
    // A non-root user lost every capability with setuid; root keeps the default set only.
    limit_capabilities()?;
    reset_signals();
    // Changing credentials cleared the parent-death signal: set it again for the command.
    die_with_helper(&helper_alive)?;
    sys::cloexec_from_3().map_err(|e| SandboxError::sys("close_range", Path::new(""), e))?;
    exec(cfg)
}

/// A failed setuid/setgid, saying when the id does not exist in kiln's user namespace.
fn id_error(call: &str, id: u32, e: Errno) -> SandboxError {
    if e == Errno::EINVAL && userns::in_user_namespace() {
        let which = if call == "setuid" { "uid" } else { "gid" };
        return SandboxError::Setup(format!(
            "{call}({id}): {which} {id} does not exist in kiln's user namespace (a normal user's kiln maps the ids of the user's ranges in /etc/subuid and /etc/subgid; with none, only 0)"
        ));
    }
    SandboxError::sys(&format!("{call}({id})"), Path::new(""), e.into())
}

/// Sets the supplementary groups; where the user namespace forbids setgroups (a single-id
/// map), only the primary group alone is accepted, which the process already has.
fn set_groups(gids: &[Gid], primary: u32) -> Result<(), SandboxError> {
    let denied = std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny");
    if denied {
        if gids.iter().all(|g| g.as_raw() == primary) {
            return Ok(());
        }
        return Err(SandboxError::Setup(format!(
            "the step's user has supplementary groups {:?}, which kiln's single-id user namespace cannot give (add ranges in /etc/subuid and /etc/subgid)",
            gids.iter().map(|g| g.as_raw()).collect::<Vec<_>>()
        )));
    }
    nix::unistd::setgroups(gids)
        .map_err(|e| SandboxError::sys("setgroups", Path::new(""), e.into()))
}

/// Applies `--ulimit`s (and the process-limit fallback) to this process, for the command.
fn set_rlimits(rlimits: &[limits::Ulimit]) -> Result<(), SandboxError> {
    for r in rlimits {
        let limit = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: a plain syscall with a valid rlimit struct.
        if unsafe { libc::setrlimit(r.resource as _, &limit) } != 0 {
            let e = std::io::Error::last_os_error();
            let mut now = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: reading into a local struct.
            unsafe { libc::getrlimit(r.resource as _, &mut now) };
            let show = |v: u64| {
                if v == libc::RLIM_INFINITY {
                    "unlimited".to_string()
                } else {
                    v.to_string()
                }
            };
            return Err(SandboxError::Setup(format!(
                "--ulimit {}={}:{}: {e} (the hard limit kiln runs with is {}; only root on the host may raise it)",
                limits::ulimit_name(r.resource),
                show(r.soft),
                show(r.hard),
                show(now.rlim_max)
            )));
        }
    }
    Ok(())
}

/// The capabilities a RUN step keeps: Docker's default set without `CAP_MKNOD` (kiln has no
/// device cgroup to stop a step from creating and opening the host's disks). Notably absent:
/// `CAP_SYS_ADMIN` (no mounts, so the protections below cannot be undone), `CAP_SYS_MODULE`,
/// `CAP_SYS_TIME`, `CAP_SYS_BOOT`, `CAP_SYS_RAWIO`, `CAP_NET_ADMIN`, `CAP_SYS_PTRACE`.
const KEPT_CAPABILITIES: [caps::Capability; 13] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_NET_RAW,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_SETPCAP,
    caps::Capability::CAP_NET_BIND_SERVICE,
    caps::Capability::CAP_SYS_CHROOT,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_AUDIT_WRITE,
];

/// Files under /proc that show host state a step has no business reading: covered with
/// /dev/null (as Docker does).
const MASKED_PROC_FILES: [&str; 6] = [
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
];
/// Directories under /proc covered with an empty read-only tmpfs.
const MASKED_PROC_DIRS: [&str; 3] = ["acpi", "asound", "scsi"];
/// Paths under /proc made read-only: writing them changes the host kernel, not the sandbox.
const READONLY_PROC: [&str; 5] = ["sys", "sysrq-trigger", "bus", "fs", "irq"];

/// Makes the fresh /proc safe to hand to a step: host-wide knobs read-only, host-only
/// information masked.
fn protect_proc(proc_dir: &Path) -> Result<(), SandboxError> {
    for name in READONLY_PROC {
        let path = proc_dir.join(name);
        if path.exists() {
            bind(&path, &path, true)?;
        }
    }
    for name in MASKED_PROC_FILES {
        let path = proc_dir.join(name);
        if path.is_file() {
            bind(Path::new("/dev/null"), &path, true)?;
        }
    }
    for name in MASKED_PROC_DIRS {
        mask(&proc_dir.join(name))?;
    }
    Ok(())
}

/// Covers a directory (if it exists) with an empty read-only tmpfs.
fn mask(dir: &Path) -> Result<(), SandboxError> {
    if !dir.is_dir() {
        return Ok(());
    }
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_at("tmpfs", dir, Some("tmpfs"), flags, Some("size=0,mode=555"))
}

/// Drops every capability outside [`KEPT_CAPABILITIES`] from the bounding set, so neither the
/// step nor any setuid program it runs can ever hold one.
fn bound_capabilities() -> Result<(), SandboxError> {
    for cap in caps::runtime::thread_all_supported() {
        if !KEPT_CAPABILITIES.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap).map_err(|e| {
                SandboxError::Setup(format!("dropping {cap} from the bounding set: {e}"))
            })?;
        }
    }
    Ok(())
}

/// Reduces the effective, permitted and inheritable sets to [`KEPT_CAPABILITIES`] and clears
/// the ambient set.
fn limit_capabilities() -> Result<(), SandboxError> {
    let keep: caps::CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        let now = caps::read(None, set)
            .map_err(|e| SandboxError::Setup(format!("reading capabilities: {e}")))?;
        let limited: caps::CapsHashSet = now.intersection(&keep).copied().collect();
        caps::set(None, set, &limited)
            .map_err(|e| SandboxError::Setup(format!("limiting capabilities: {e}")))?;
    }
    caps::clear(None, caps::CapSet::Ambient)
        .map_err(|e| SandboxError::Setup(format!("clearing ambient capabilities: {e}")))
}

/// Gives the command default signal dispositions and an empty signal mask (the Rust runtime
/// of the helper ignores SIGPIPE, and ignored signals would survive exec).
fn reset_signals() {
    // The raw syscall, as libc refuses to touch the signals it reserves for itself. A zeroed
    // kernel sigaction is SIG_DFL with no flags and an empty mask.
    let dfl: [libc::c_ulong; 4] = [0; 4];
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: restoring the default disposition; no handler is involved.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<libc::c_void>(),
                    8usize,
                )
            };
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// Makes the kernel kill this process when the helper dies, and exits if it already has
/// (`helper_alive` is the read end of a pipe only the helper writes to).
fn die_with_helper(helper_alive: &OwnedFd) -> Result<(), SandboxError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| SandboxError::sys("prctl(PR_SET_PDEATHSIG)", Path::new(""), e.into()))?;
    let mut fds = [PollFd::new(helper_alive.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
        // SAFETY: leaving at once; nobody is left to report to.
        unsafe { libc::_exit(1) }
    }
    Ok(())
}

/// Fills the fresh /dev tmpfs: device nodes bound from the host, a private devpts, shm, links.
fn populate_dev(dev: &Path, shm_size: u64) -> Result<(), SandboxError> {
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let (source, target) = (Path::new("/dev").join(node), dev.join(node));
        if !source.exists() {
            continue;
        }
        File::create(&target).map_err(|e| SandboxError::sys("create", &target, e))?;
        bind(&source, &target, false)?;
    }
    for dir in ["pts", "shm"] {
        let d = dev.join(dir);
        std::fs::create_dir(&d).map_err(|e| SandboxError::sys("mkdir", &d, e))?;
    }
    // Group 5 (tty) owns the pty slaves, where the user namespace has a group 5.
    let devpts = if userns::is_mapped("gid_map", 5) {
        "newinstance,ptmxmode=0666,mode=0620,gid=5"
    } else {
        "newinstance,ptmxmode=0666,mode=0620"
    };
    mount_at(
        "devpts",
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(devpts),
    )?;
    mount_at(
        "shm",
        &dev.join("shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(&format!("mode=1777,size={shm_size}")),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let l = dev.join(link);
        std::os::unix::fs::symlink(to, &l).map_err(|e| SandboxError::sys("symlink", &l, e))?;
    }
    Ok(())
}

/// Brings up `lo` in a fresh network namespace.
fn loopback_up() -> Result<(), SandboxError> {
    let lo = Path::new("lo");
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq whose name we fill in.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(SandboxError::sys(
                "socket",
                lo,
                std::io::Error::last_os_error(),
            ));
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(SandboxError::sys(
                "SIOCGIFFLAGS",
                lo,
                std::io::Error::last_os_error(),
            ));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(SandboxError::sys(
                "SIOCSIFFLAGS",
                lo,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn cstr(s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::InvalidInput(format!("{s:?} contains a NUL byte")))
}

/// Writes a message to the step's stderr (part of its output) and exits with `code`.
fn fail_exec(code: i32, msg: &str) -> ! {
    // SAFETY: fd 2 is the output pipe; ManuallyDrop keeps it open.
    let mut err = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
    let _ = writeln!(err, "kiln: {msg}");
    // SAFETY: leaving the process without unwinding.
    unsafe { libc::_exit(code) }
}

/// Looks `argv[0]` up in `PATH` and execs it with exactly `cfg.env`.
fn exec(cfg: &InitConfig) -> Result<Infallible, SandboxError> {
    let Some(arg0) = cfg.argv.first() else {
        return Err(SandboxError::InvalidInput("empty argv".into()));
    };
    let argv = cfg
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = cfg
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let program = if arg0.contains('/') {
        PathBuf::from(arg0)
    } else {
        let path = cfg
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        let found = path
            .split(':')
            .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(arg0))
            .find(|p| {
                p.is_file()
                    && nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok()
            });
        match found {
            Some(p) => p,
            None => fail_exec(
                127,
                &format!("exec {arg0:?}: executable file not found in $PATH"),
            ),
        }
    };
    let prog = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidInput(format!("{program:?} contains a NUL byte")))?;
    let Err(err) = nix::unistd::execve(&prog, &argv, &env);
    let code = if err == Errno::ENOENT { 127 } else { 126 };
    fail_exec(code, &format!("exec {}: {}", program.display(), err.desc()))
}
