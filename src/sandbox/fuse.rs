//! The fuse-overlayfs snapshotter: one `fuse-overlayfs -f` daemon per mount, a child of the
//! mounting thread (it dies with it), waited for after the unmount. Afterwards the upper dir is
//! brought into the form the kernel's overlayfs leaves (fuse-overlayfs marks opaque dirs with
//! extra `.wh..wh..opq` files and marks new dirs opaque too), so a step's layer is the same
//! whichever of the two ran it.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::SandboxError;
use super::snapshotter::unmount_path;

/// How long the daemon may take to mount, or to exit after the unmount.
const PATIENCE: Duration = Duration::from_secs(10);

/// A fuse-overlayfs mount and its daemon.
pub(crate) struct FuseMount {
    child: Child,
    target: PathBuf,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    log: PathBuf,
}

fn option_path(p: &Path) -> Result<String, SandboxError> {
    let s = p.to_str().unwrap_or_default();
    if s.is_empty() || s.contains([':', ',']) {
        return Err(SandboxError::InvalidInput(format!(
            "fuse-overlayfs cannot take the path {} (it has a ':' or ',', or is not UTF-8)",
            p.display()
        )));
    }
    Ok(s.to_string())
}

impl FuseMount {
    /// Starts the daemon and waits until the overlay is mounted at `target`.
    pub(crate) fn mount(
        program: &Path,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<FuseMount, SandboxError> {
        let fuse_work = work.join("fuse");
        let log = work.join("fuse.log");
        fs::create_dir_all(&fuse_work).map_err(|e| SandboxError::sys("mkdir", &fuse_work, e))?;
        let lowerdir = lowers
            .iter()
            .map(|l| option_path(l))
            .collect::<Result<Vec<_>, _>>()?
            .join(":");
        let options = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            option_path(upper)?,
            option_path(&fuse_work)?
        );
        let log_file = fs::File::create(&log).map_err(|e| SandboxError::sys("create", &log, e))?;
        let mut cmd = Command::new(program);
        cmd.args(["-f", "-o", &options])
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe. The daemon gets SIGTERM (and unmounts) when the
        // mounting thread ends, so a killed kiln leaves no daemon behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| SandboxError::sys("spawn", program, e))?;
        let mut m = FuseMount {
            child,
            target: target.to_path_buf(),
            lowers: lowers.to_vec(),
            upper: upper.to_path_buf(),
            log,
        };
        let parent_dev = fs::metadata(target.parent().unwrap_or(Path::new("/")))
            .map_err(|e| SandboxError::sys("stat", target, e))?
            .dev();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(SandboxError::Setup(format!(
                    "fuse-overlayfs exited ({status}) before mounting {}: {}",
                    target.display(),
                    m.log_text()
                )));
            }
            if fs::metadata(target).is_ok_and(|md| md.dev() != parent_dev) {
                return Ok(m);
            }
            if start.elapsed() > PATIENCE {
                let _ = m.child.kill();
                let _ = m.child.wait();
                return Err(SandboxError::Setup(format!(
                    "fuse-overlayfs did not mount {} within {PATIENCE:?}: {}",
                    target.display(),
                    m.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("unknown argument ignored"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Unmounts, waits for the daemon to exit, and normalizes the upper dir.
    pub(crate) fn unmount(mut self) -> Result<(), SandboxError> {
        let unmounted = unmount_path(&self.target);
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > PATIENCE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        unmounted?;
        normalize_upper(&self.upper, &self.lowers, Path::new(""))
    }
}

/// The xattr the kernel's overlayfs would have used for an opaque dir in this process.
fn opaque_xattr() -> &'static str {
    if super::userns::in_user_namespace() {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// The opaque markers fuse-overlayfs may set, in the order it reads them.
const FUSE_OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];

/// Whether some lower layer has an entry at `rel` (the first layer that knows the path
/// decides: a whiteout there means no).
fn below(lowers: &[PathBuf], rel: &Path) -> bool {
    for l in lowers {
        if let Ok(md) = fs::symlink_metadata(l.join(rel)) {
            return !(md.file_type().is_char_device() && md.rdev() == 0);
        }
    }
    false
}

/// Removes the xattrs fuse-overlayfs keeps for itself (`user.fuseoverlayfs.origin`, ...).
fn remove_own_xattrs(path: &Path) -> Result<(), SandboxError> {
    let Ok(names) = xattr::list(path) else {
        return Ok(());
    };
    for name in names {
        let n = name.as_bytes();
        let own = n
            .splitn(2, |&b| b == b'.')
            .nth(1)
            .is_some_and(|rest| rest.starts_with(b"fuseoverlayfs."));
        if own {
            xattr::remove(path, &name)
                .map_err(|e| SandboxError::sys("remove fuse-overlayfs xattr", path, e))?;
        }
    }
    Ok(())
}

/// Rewrites fuse-overlayfs's markers in the upper dir `dir` (at `rel` in the rootfs) as the
/// kernel's overlayfs would have left them: opaque only where a lower layer has the path (a dir
/// made over a whiteout), marked by one xattr, without marker files.
fn normalize_upper(upper: &Path, lowers: &[PathBuf], rel: &Path) -> Result<(), SandboxError> {
    let dir = upper.join(rel);
    let times = fs::symlink_metadata(&dir).map_err(|e| SandboxError::sys("stat", &dir, e))?;
    let entries = fs::read_dir(&dir).map_err(|e| SandboxError::sys("read dir", &dir, e))?;
    let mut marked = false;
    for entry in entries {
        let entry = entry.map_err(|e| SandboxError::sys("read dir", &dir, e))?;
        let name = entry.file_name();
        let path = entry.path();
        let md = fs::symlink_metadata(&path).map_err(|e| SandboxError::sys("stat", &path, e))?;
        let bytes = name.as_bytes();
        if bytes == b".wh..wh..opq" || bytes == b".wh..opq" {
            marked |= bytes == b".wh..wh..opq";
            fs::remove_file(&path).map_err(|e| SandboxError::sys("remove", &path, e))?;
            continue;
        }
        remove_own_xattrs(&path)?;
        if md.is_dir() {
            normalize_upper(upper, lowers, &rel.join(&name))?;
        }
    }
    if marked {
        // Removing the marker files touched the dir: it keeps the times the step left it with.
        super::copyfs::set_times(&dir, &times)?;
    }
    if rel.as_os_str().is_empty() {
        return Ok(());
    }
    for name in FUSE_OPAQUE_XATTRS {
        if let Ok(Some(v)) = xattr::get(&dir, name) {
            marked |= v == b"y";
            xattr::remove(&dir, name)
                .map_err(|e| SandboxError::sys(&format!("remove xattr {name}"), &dir, e))?;
        }
    }
    if marked && below(lowers, rel) {
        xattr::set(&dir, opaque_xattr(), b"y")
            .map_err(|e| SandboxError::sys("set opaque xattr", &dir, e))?;
    }
    Ok(())
}
