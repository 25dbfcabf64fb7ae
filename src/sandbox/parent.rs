//! The calling side: prepares a scratch dir, spawns the helper with its pipes, streams output,
//! honours cancellation, and removes the sandbox's own mount points from the upper dir after.
//! Also [`with_rootfs`], which needs no helper process.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::cgroups::StepCgroup;
use super::limits::LimitPlan;
use super::snapshotter::{self, Snapshotter};
use super::{INIT_ARG, InitConfig, Report, RootfsSource, RunSpec, SCRATCH_FILES, SandboxError};

fn io_err(call: &str, path: &Path) -> impl FnOnce(io::Error) -> SandboxError {
    move |e| SandboxError::sys(call, path, e)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("pipe2", Path::new(""), e.into()))
}

/// A private scratch dir in the system temp dir: `root/` (where the rootfs is mounted inside the
/// sandbox's own mount namespace), `empty/`, and small files. Removed entry by entry (never
/// recursively) so nothing beyond it can be deleted even if a mount were visible.
struct Scratch {
    path: PathBuf,
    files: Vec<&'static str>,
}

impl Scratch {
    fn new(files: &[(&'static str, String)]) -> Result<Scratch, SandboxError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-sandbox-")
            .tempdir()
            .map_err(io_err("create scratch dir in", &std::env::temp_dir()))?;
        let scratch = Scratch {
            path: dir.keep(),
            files: files.iter().map(|(n, _)| *n).collect(),
        };
        for d in ["root", "empty"] {
            let p = scratch.path.join(d);
            std::fs::create_dir(&p).map_err(io_err("mkdir", &p))?;
        }
        for (name, content) in files {
            let p = scratch.path.join(name);
            std::fs::write(&p, content).map_err(io_err("write", &p))?;
        }
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        super::remove_scratch(&self.path, &self.files);
    }
}

pub(super) fn run(
    exe: &Path,
    limits: &LimitPlan,
    spec: &RunSpec,
    output: &mut (dyn FnMut(&[u8]) + Send),
    cancel: &AtomicBool,
) -> Result<i32, SandboxError> {
    if spec.argv.is_empty() {
        return Err(SandboxError::InvalidInput("empty argv".into()));
    }
    if !spec.cwd.is_empty() && !spec.cwd.starts_with('/') {
        return Err(SandboxError::InvalidInput(format!(
            "cwd {:?} is not absolute",
            spec.cwd
        )));
    }
    let hostname = if spec.hostname.is_empty() {
        "localhost"
    } else {
        &spec.hostname
    };
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let [hosts, hostname_file, resolv_conf] = SCRATCH_FILES;
    let scratch = Scratch::new(&[
        (
            hosts,
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        ),
        (hostname_file, format!("{hostname}\n")),
        (resolv_conf, resolv),
    ])?;
    let snapshotter = snapshotter::current_for(&spec.upper_dir)?;
    let cgroup = match &limits.hierarchy {
        Some(h) => Some(StepCgroup::create(h, limits)?),
        None => None,
    };
    let config = |rootfs| InitConfig {
        rootfs,
        argv: spec.argv.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        user: spec.user.clone(),
        hostname: hostname.to_string(),
        network: spec.network,
        binds: spec.binds.clone(),
        scratch: scratch.path.clone(),
        cgroup: cgroup.clone(),
        rlimits: limits.rlimits.clone(),
        shm_size: limits.shm_size,
    };
    let outcome = match snapshotter {
        Snapshotter::Overlay { userxattr } => execute(
            exe,
            &config(RootfsSource::Overlay {
                lowers: spec.lower_dirs.clone(),
                upper: spec.upper_dir.clone(),
                work: spec.work_dir.clone(),
                userxattr: *userxattr,
            }),
            spec.stdin.as_deref(),
            output,
            cancel,
        ),
        // The rootfs is mounted here, in a thread's own mount namespace, which the helper
        // (spawned from that thread) inherits; its changes reach the upper dir at the unmount.
        other => with_rootfs(
            &spec.lower_dirs,
            &spec.upper_dir,
            &spec.work_dir,
            |merged| {
                let upper = matches!(other, Snapshotter::FuseOverlayfs { .. })
                    .then(|| spec.upper_dir.clone());
                execute(
                    exe,
                    &config(RootfsSource::Prepared {
                        root: merged.to_path_buf(),
                        upper,
                    }),
                    spec.stdin.as_deref(),
                    output,
                    cancel,
                )
            },
        )
        .and_then(|r| r),
    };
    if let Some(cg) = &cgroup {
        // The helper removes it; this covers a helper that died first.
        cg.remove();
    }
    let Outcome {
        reports,
        helper_status,
        cancelled,
    } = outcome?;
    remove_stubs(&spec.upper_dir, &reports);
    drop(scratch);

    if let Some(msg) = reports.iter().find_map(|r| match r {
        Report::Error(m) => Some(m.clone()),
        _ => None,
    }) {
        return Err(SandboxError::Setup(msg));
    }
    if cancelled {
        return Err(SandboxError::Cancelled);
    }
    if let Some(hit) = reports.iter().find_map(|r| match r {
        Report::Limit(hit) => Some(hit.clone()),
        _ => None,
    }) {
        return Err(SandboxError::LimitReached(hit));
    }
    reports
        .iter()
        .find_map(|r| match r {
            Report::Exit(code) => Some(*code),
            _ => None,
        })
        .ok_or_else(|| SandboxError::HelperDied {
            exe: exe.to_path_buf(),
            status: helper_status,
        })
}

/// What a helper run left: its reports, how it ended, whether it was cancelled.
struct Outcome {
    reports: Vec<Report>,
    helper_status: String,
    cancelled: bool,
}

/// Spawns the helper with `config`, feeds it `stdin`, streams the step's output and waits for
/// it to end (or kills it on `cancel`).
fn execute(
    exe: &Path,
    config: &InitConfig,
    stdin_bytes: Option<&[u8]>,
    output: &mut (dyn FnMut(&[u8]) + Send),
    cancel: &AtomicBool,
) -> Result<Outcome, SandboxError> {
    let json = serde_json::to_vec(config)
        .map_err(|e| SandboxError::InvalidInput(format!("serializing the spec: {e}")))?;

    let (cfg_r, cfg_w) = pipe()?;
    let (st_r, st_w) = pipe()?;
    let (ctl_r, ctl_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (stdin_child, stdin_w) = match stdin_bytes {
        Some(_) => {
            let (r, w) = pipe()?;
            (Stdio::from(r), Some(w))
        }
        None => (Stdio::null(), None),
    };
    let mut cmd = Command::new(exe);
    cmd.arg(INIT_ARG)
        .env_clear()
        .stdin(stdin_child)
        .stdout(Stdio::from(
            out_w
                .try_clone()
                .map_err(io_err("dup", Path::new("output pipe")))?,
        ))
        .stderr(Stdio::from(out_w));
    let fds = [cfg_r.as_raw_fd(), st_w.as_raw_fd(), ctl_r.as_raw_fd()];
    // SAFETY: the closure only calls the async-signal-safe fcntl and dup2.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 3];
            for (h, fd) in high.iter_mut().zip(fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err("spawn sandbox helper", exe))?;
    drop(cmd);
    drop((cfg_r, st_w, ctl_r));
    // A failed write means the helper died early; its exit status tells the story below.
    let _ = File::from(cfg_w).write_all(&json);

    let mut stdin = stdin_w.map(|w| (w, stdin_bytes.unwrap_or_default()));
    if let Some((w, _)) = &stdin {
        nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| {
            SandboxError::sys("fcntl(O_NONBLOCK)", Path::new("stdin pipe"), e.into())
        })?;
    }
    let mut control = Some(ctl_w);
    let mut cancelled = false;
    let mut status = Vec::new();
    let (mut out_open, mut st_open) = (true, true);
    let mut buf = vec![0u8; 64 * 1024];
    while out_open || st_open {
        if !cancelled && cancel.load(Ordering::Relaxed) {
            cancelled = true;
            control = None;
            stdin = None;
        }
        if stdin.as_ref().is_some_and(|(_, rest)| rest.is_empty()) {
            stdin = None;
        }
        let mut pfds = Vec::with_capacity(3);
        if out_open {
            pfds.push(PollFd::new(out_r.as_fd(), PollFlags::POLLIN));
        }
        if st_open {
            pfds.push(PollFd::new(st_r.as_fd(), PollFlags::POLLIN));
        }
        if let Some((w, _)) = &stdin {
            pfds.push(PollFd::new(w.as_fd(), PollFlags::POLLOUT));
        }
        match poll(&mut pfds, PollTimeout::from(20u8)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(SandboxError::sys("poll", Path::new(""), e.into())),
        }
        let ready: Vec<bool> = pfds.iter().map(|p| p.any().unwrap_or(false)).collect();
        drop(pfds);
        let mut idx = 0;
        if out_open {
            if ready[idx] {
                match nix::unistd::read(&out_r, &mut buf) {
                    Ok(0) => out_open = false,
                    Ok(n) => output(&buf[..n]),
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Err(_) => out_open = false,
                }
            }
            idx += 1;
        }
        if st_open {
            if ready[idx] {
                match nix::unistd::read(&st_r, &mut buf) {
                    Ok(0) => st_open = false,
                    Ok(n) => status.extend_from_slice(&buf[..n]),
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Err(_) => st_open = false,
                }
            }
            idx += 1;
        }
        if ready.get(idx).copied().unwrap_or(false)
            && let Some((w, rest)) = &mut stdin
        {
            match nix::unistd::write(&*w, rest) {
                Ok(n) => *rest = &rest[n..],
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => stdin = None,
            }
        }
    }
    drop(control);
    let helper_status = child
        .wait()
        .map_err(io_err("wait for sandbox helper", exe))?;
    let reports: Vec<Report> = status
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    Ok(Outcome {
        reports,
        helper_status: helper_status.to_string(),
        cancelled,
    })
}

/// Removes the mount points the init created (and the lower dirs creating them copied up, if
/// still empty and unchanged) from the upper dir, deepest first. Never follows symlinks.
fn remove_stubs(upper: &Path, reports: &[Report]) {
    let Ok(upper_fd) = nix::fcntl::open(
        upper,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    for r in reports.iter().rev() {
        match r {
            Report::Created(p) => remove_entry(&upper_fd, p, None),
            Report::CopiedUp {
                path,
                mode,
                uid,
                gid,
            } => remove_entry(&upper_fd, path, Some((*mode, *uid, *gid))),
            _ => {}
        }
    }
}

fn remove_entry(upper: &OwnedFd, rel: &str, lower_meta: Option<(u32, u32, u32)>) {
    let rel = Path::new(rel);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return;
    }
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return;
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let parent_path = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(dir) = openat2(upper.as_fd(), parent_path, how) else {
        return;
    };
    let Ok(st) = fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
        return;
    };
    let unchanged_copy_up = |(mode, uid, gid): (u32, u32, u32)| {
        st.st_mode == mode && st.st_uid == uid && st.st_gid == gid && !is_opaque(&dir, name)
    };
    let remove = match st.st_mode & libc::S_IFMT {
        // rmdir only succeeds on an empty dir: anything the step put there stays.
        libc::S_IFDIR => lower_meta.is_none_or(unchanged_copy_up),
        libc::S_IFREG => lower_meta.is_none() && st.st_size == 0,
        _ => false,
    };
    if remove {
        let flag = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        let _ = unlinkat(&dir, name, flag);
    }
}

/// Whether an upper dir entry is an overlay opaque dir (it hides everything below it).
fn is_opaque(dir: &OwnedFd, name: &std::ffi::OsStr) -> bool {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let Ok(fd) = openat2(dir.as_fd(), name, how) else {
        return true;
    };
    let f = File::from(fd);
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|k| xattr::FileExt::get_xattr(&f, k).ok().flatten().is_some())
}

pub(super) fn with_rootfs<R: Send>(
    lower_dirs: &[PathBuf],
    upper: &Path,
    work: &Path,
    f: impl FnOnce(&Path) -> R + Send,
) -> Result<R, SandboxError> {
    let scratch = Scratch::new(&[])?;
    let root = scratch.path.join("root");
    let empty = [scratch.path.join("empty")];
    let lowers = if lower_dirs.is_empty() {
        &empty[..]
    } else {
        lower_dirs
    };
    let joined = std::thread::scope(|s| {
        s.spawn(|| -> Result<R, SandboxError> {
            snapshotter::private_mount_namespace()?;
            let mounted = snapshotter::mount_current(lowers, upper, work, &root)?;
            let r = f(&root);
            mounted.unmount()?;
            Ok(r)
        })
        .join()
    });
    drop(scratch);
    match joined {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
