//! How a step's rootfs is made from its layers, chosen once per process by trying them on the
//! store's file system: the kernel's overlayfs (in a user namespace with `userxattr`, Linux
//! 5.11+), else fuse-overlayfs when it is installed and `/dev/fuse` can be opened, else a
//! copying snapshotter. All three leave the step's changes in the upper dir in overlayfs form,
//! so layers are written the same way. `KILN_SNAPSHOTTER=overlay|fuse-overlayfs|copy` forces
//! one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{MntFlags, umount2};
use nix::sched::{CloneFlags, unshare};

use super::copyfs::CopyMount;
use super::fuse::FuseMount;
use super::sys::{self, Overlay};
use super::{SandboxError, userns};

/// The environment variable that forces a snapshotter.
pub const SNAPSHOTTER_ENV: &str = "KILN_SNAPSHOTTER";

/// A way to make a rootfs from layer dirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshotter {
    /// The kernel's overlayfs; `userxattr` when kiln runs in a user namespace.
    Overlay {
        /// Overlay keeps its data in `user.overlay.*` xattrs.
        userxattr: bool,
    },
    /// fuse-overlayfs, a FUSE daemon run for each mount.
    FuseOverlayfs {
        /// The program.
        program: PathBuf,
    },
    /// Copies the layers into a plain directory, and the step's changes back out.
    Copy,
}

impl Snapshotter {
    /// The short name (`overlay`, `fuse-overlayfs`, `copy`), as `KILN_SNAPSHOTTER` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Snapshotter::Overlay { .. } => "overlay",
            Snapshotter::FuseOverlayfs { .. } => "fuse-overlayfs",
            Snapshotter::Copy => "copy",
        }
    }

    /// The kind of layers a step gets under this snapshotter, which cache keys name (a
    /// layer made under one kind is never reused by a build that would make the other).
    /// `overlay`: the kernel's overlayfs, with or without `userxattr`, and the copying
    /// snapshotter, which copies up as overlayfs does (hardlinks of earlier layers included;
    /// tests/rootless.rs holds it to overlayfs's digests). `fuse-overlayfs`: it keeps a file
    /// that an earlier layer hardlinked whole, copying up as it sees fit, so a step that
    /// writes, deletes or adds a name of such a file can get a layer of other bytes.
    pub fn layer_kind(&self) -> &'static str {
        match self {
            Snapshotter::Overlay { .. } | Snapshotter::Copy => "overlay",
            Snapshotter::FuseOverlayfs { .. } => "fuse-overlayfs",
        }
    }
}

/// The snapshotter this process uses, and why a faster one was passed over.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The snapshotter.
    pub snapshotter: Snapshotter,
    /// Why the kernel overlay (and fuse-overlayfs) are not used, when they are not.
    pub fallback_reason: Option<String>,
    /// What the store's file system cannot do that some steps need.
    pub warning: Option<String>,
}

impl Choice {
    /// One line for progress output.
    pub fn describe(&self) -> String {
        let what = match &self.snapshotter {
            Snapshotter::Overlay { userxattr: false } => "overlay (kernel overlayfs)".to_string(),
            Snapshotter::Overlay { userxattr: true } => {
                "overlay (kernel overlayfs in the user namespace, userxattr)".to_string()
            }
            Snapshotter::FuseOverlayfs { program } => {
                format!("fuse-overlayfs ({})", program.display())
            }
            Snapshotter::Copy => {
                "copy (every step copies its rootfs: slow, and uses disk space)".to_string()
            }
        };
        match &self.fallback_reason {
            Some(why) => format!("snapshotter: {what}; {why}"),
            None => format!("snapshotter: {what}"),
        }
    }
}

static CHOICE: OnceLock<Choice> = OnceLock::new();

/// The snapshotter of this process, probing (once) with scratch dirs made in `scratch` (a
/// directory on the store's file system) which ones work.
pub fn choose(scratch: &Path) -> Result<&'static Choice, SandboxError> {
    if let Some(c) = CHOICE.get() {
        return Ok(c);
    }
    let mut choice = probe(scratch)?;
    choice.warning = whiteouts_unsupported(scratch);
    Ok(CHOICE.get_or_init(|| choice))
}

/// The snapshotter in use, probing next to `near` (an existing dir on the store's file system)
/// if none was chosen yet.
fn current(near: &Path) -> Result<&'static Choice, SandboxError> {
    choose(near.parent().unwrap_or(near))
}

fn probe(scratch: &Path) -> Result<Choice, SandboxError> {
    let userxattr = userns::in_user_namespace();
    let fuse = || find_fuse_overlayfs().map(|program| Snapshotter::FuseOverlayfs { program });
    if let Some(forced) = std::env::var_os(SNAPSHOTTER_ENV).filter(|v| !v.is_empty()) {
        let snapshotter = match forced.to_str() {
            Some("overlay") => Snapshotter::Overlay { userxattr },
            Some("fuse-overlayfs") => fuse().map_err(SandboxError::Setup)?,
            Some("copy") => Snapshotter::Copy,
            _ => {
                return Err(SandboxError::InvalidInput(format!(
                    "{SNAPSHOTTER_ENV}={}: expected overlay, fuse-overlayfs or copy",
                    forced.to_string_lossy()
                )));
            }
        };
        return Ok(Choice {
            snapshotter,
            fallback_reason: Some(format!("chosen by {SNAPSHOTTER_ENV}")),
            warning: None,
        });
    }
    // Also as root: the kernel refuses an upper dir on some file systems (an overlayfs, as
    // when the store is in a container's root file system).
    let kernel = Snapshotter::Overlay { userxattr };
    let refused = match try_mount(&kernel, scratch) {
        Ok(()) => {
            return Ok(Choice {
                snapshotter: kernel,
                fallback_reason: None,
                warning: None,
            });
        }
        Err(e) if userxattr => {
            format!("the kernel refused an overlay mount in the user namespace ({e})")
        }
        Err(e) => format!("the kernel refused an overlay mount ({e})"),
    };
    let fuse_refused = match fuse() {
        Ok(f) => match try_mount(&f, scratch) {
            Ok(()) => {
                return Ok(Choice {
                    snapshotter: f,
                    fallback_reason: Some(refused),
                    warning: None,
                });
            }
            Err(e) => format!("fuse-overlayfs failed ({e})"),
        },
        Err(why) => why,
    };
    Ok(Choice {
        snapshotter: Snapshotter::Copy,
        fallback_reason: Some(format!("{refused}; {fuse_refused}")),
        warning: None,
    })
}

/// Says so when the store's file system cannot hold overlay whiteouts (character devices
/// 0/0): an overlayfs, such as a container's root file system, refuses them.
fn whiteouts_unsupported(scratch: &Path) -> Option<String> {
    let probe = scratch.join("whiteout-probe");
    let made = nix::sys::stat::mknod(
        &probe,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    );
    let _ = std::fs::remove_file(&probe);
    made.err().map(|e| {
        format!(
            "the store's file system cannot hold overlay whiteouts ({e}; an overlayfs, such as a container's root file system, refuses them): steps that delete files of earlier layers will fail; put the store (--root, $KILN_ROOT) on a volume"
        )
    })
}

/// fuse-overlayfs, if installed and usable: it needs `/dev/fuse` open for reading and writing.
fn find_fuse_overlayfs() -> Result<PathBuf, String> {
    let program = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join("fuse-overlayfs"))
        .find(|p| p.is_file())
        .ok_or("fuse-overlayfs is not installed (Debian: apt-get install fuse-overlayfs)")?;
    std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("fuse-overlayfs cannot be used: /dev/fuse: {e}"))?;
    Ok(program)
}

/// Mounts and unmounts an overlay of one empty layer in a private mount namespace.
fn try_mount(s: &Snapshotter, scratch: &Path) -> Result<(), SandboxError> {
    let dir = tempfile::Builder::new()
        .prefix("probe-")
        .tempdir_in(scratch)
        .map_err(|e| SandboxError::sys("create probe dir in", scratch, e))?;
    let [lower, upper, work, target] = ["l", "u", "w", "m"].map(|n| dir.path().join(n));
    for d in [&lower, &upper, &work, &target] {
        std::fs::create_dir(d).map_err(|e| SandboxError::sys("mkdir", d, e))?;
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(), SandboxError> {
                private_mount_namespace()?;
                mount(s, std::slice::from_ref(&lower), &upper, &work, &target)?.unmount()
            })
            .join()
            .unwrap_or_else(|_| Err(SandboxError::Setup("probe thread panicked".into())))
    })
}

/// Gives the calling thread its own mount namespace in which nothing propagates to the host.
pub(crate) fn private_mount_namespace() -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys("unshare(CLONE_FS|CLONE_NEWNS)", Path::new(""), e.into()))?;
    sys::make_mounts_private()
}

/// A mounted rootfs, to be unmounted with [`Mounted::unmount`].
pub(crate) enum Mounted {
    /// A kernel overlay at this path.
    Kernel(PathBuf),
    /// A fuse-overlayfs mount and its daemon.
    Fuse(FuseMount),
    /// A copied rootfs bound at the target.
    Copy(CopyMount),
}

impl Mounted {
    /// Unmounts; afterwards the upper dir holds the changes made through the mount, in overlay
    /// form, and no process or mount of this one is left.
    pub(crate) fn unmount(self) -> Result<(), SandboxError> {
        match self {
            Mounted::Kernel(target) => unmount_path(&target),
            Mounted::Fuse(f) => f.unmount(),
            Mounted::Copy(c) => c.unmount(),
        }
    }
}

/// Unmounts `target`, lazily if it is busy.
pub(crate) fn unmount_path(target: &Path) -> Result<(), SandboxError> {
    if umount2(target, MntFlags::empty()).is_err() {
        umount2(target, MntFlags::MNT_DETACH)
            .map_err(|e| SandboxError::sys("umount", target, e.into()))?;
    }
    Ok(())
}

/// Mounts `lowers` (top first; at least one) under `upper` at `target` with snapshotter `s`, in
/// the calling thread's mount namespace.
pub(crate) fn mount(
    s: &Snapshotter,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<Mounted, SandboxError> {
    match s {
        Snapshotter::Overlay { userxattr } => {
            sys::mount_overlay(
                &Overlay {
                    lowers,
                    upper,
                    work,
                    userxattr: *userxattr,
                },
                target,
            )?;
            Ok(Mounted::Kernel(target.to_path_buf()))
        }
        Snapshotter::FuseOverlayfs { program } => Ok(Mounted::Fuse(FuseMount::mount(
            program, lowers, upper, work, target,
        )?)),
        Snapshotter::Copy => Ok(Mounted::Copy(CopyMount::mount(
            lowers, upper, work, target,
        )?)),
    }
}

/// Mounts with the snapshotter of this process (probing next to `upper` if none was chosen).
pub(crate) fn mount_current(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<Mounted, SandboxError> {
    let choice = current(upper)?;
    mount(&choice.snapshotter, lowers, upper, work, target)
}

/// The snapshotter of this process (probing next to `upper` if none was chosen).
pub(crate) fn current_for(upper: &Path) -> Result<&'static Snapshotter, SandboxError> {
    Ok(&current(upper)?.snapshotter)
}
