//! The RUN sandbox: runs one step's process tree in throwaway mount, pid, uts, ipc (and
//! optionally net) namespaces, pivoted into an overlayfs whose upper dir collects the step's
//! changes. This module is the only caller of mount/unshare/pivot_root in kiln; it knows nothing
//! of Dockerfiles or layers.
//!
//! Design: [`Sandbox::run`] re-executes the kiln binary with [`INIT_ARG`] (the caller may be
//! multi-threaded, so no real work happens after a bare fork). That helper reads the spec from a
//! pipe, unshares a pid namespace and forks the sandbox init, which builds the rootfs, pivots
//! into it and execs the command as pid 1 of the new pid namespace; when it exits, the kernel
//! kills everything it left behind. Reports (mount stubs created, errors, the exit status) come
//! back as JSON lines on a status pipe.
//!
//! A normal user's kiln runs the same code in a user namespace ([`userns`]); the rootfs comes
//! from the [`snapshotter`] that works there; each step's processes run in a cgroup with the
//! build's [`limits`] ([`cgroups`]).

pub mod binfmt;
pub mod cgroups;
mod copyfs;
mod fuse;
mod init;
pub mod limits;
mod parent;
pub mod snapshotter;
mod sys;
pub mod userns;
pub mod users;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use init::init_main;
use limits::{LimitHit, LimitPlan, Ulimit};

/// The hidden first argument that makes the kiln binary act as the sandbox helper.
pub const INIT_ARG: &str = "__kiln-sandbox-init";

/// The network a step sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// The host's network namespace.
    Host,
    /// A fresh network namespace with only `lo`, brought up.
    None,
}

/// An extra bind mount into the step's rootfs (secrets and the like).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// The host file or directory.
    pub source: PathBuf,
    /// The absolute path inside the rootfs (created if missing, removed from the upper dir after).
    pub target: String,
    /// Mount it read-only.
    pub readonly: bool,
}

/// Everything needed to run one step.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Read-only layer dirs, top-most first; may be empty (FROM scratch).
    pub lower_dirs: Vec<PathBuf>,
    /// A fresh empty dir the caller made; the step's changes land here.
    pub upper_dir: PathBuf,
    /// A fresh empty dir on the same file system as `upper_dir`.
    pub work_dir: PathBuf,
    /// The command; `argv[0]` is looked up in `PATH` from `env` unless it contains a `/`.
    pub argv: Vec<String>,
    /// The whole environment of the process.
    pub env: Vec<(String, String)>,
    /// Absolute working directory in the rootfs; created if missing.
    pub cwd: String,
    /// `""` (root), `name`, `uid`, `name:group`, `uid:gid`, ... resolved in the rootfs.
    pub user: String,
    /// The sandbox's host name (`localhost` when empty).
    pub hostname: String,
    /// The network the step sees.
    pub network: NetworkMode,
    /// Bytes fed to the process's stdin (else it reads `/dev/null`).
    pub stdin: Option<Vec<u8>>,
    /// Extra bind mounts.
    pub binds: Vec<BindMount>,
}

/// Runs steps by re-executing a kiln binary as the sandbox helper.
#[derive(Debug, Clone)]
pub struct Sandbox {
    helper_exe: PathBuf,
    limits: Arc<LimitPlan>,
}

impl Sandbox {
    /// A sandbox whose helper is `helper_exe` (normally `std::env::current_exe()`), with no
    /// limits but the default size of `/dev/shm`.
    pub fn new(helper_exe: PathBuf) -> Sandbox {
        Sandbox {
            helper_exe,
            limits: Arc::new(LimitPlan {
                shm_size: limits::DEFAULT_SHM_SIZE,
                ..LimitPlan::default()
            }),
        }
    }

    /// The same sandbox, applying `plan` (from [`limits::Limits::plan`]) to every step.
    pub fn with_limits(self, plan: LimitPlan) -> Sandbox {
        Sandbox {
            limits: Arc::new(plan),
            ..self
        }
    }

    /// Runs the step; streams the process's stdout and stderr (merged, in order) to `output`.
    ///
    /// Returns the exit code (128+N if killed by signal N; 127 if the command is not found).
    /// If `cancel` becomes true, kills everything and returns [`SandboxError::Cancelled`].
    pub fn run(
        &self,
        spec: &RunSpec,
        output: &mut (dyn FnMut(&[u8]) + Send),
        cancel: &AtomicBool,
    ) -> Result<i32, SandboxError> {
        parent::run(&self.helper_exe, &self.limits, spec, output, cancel)
    }
}

/// Mounts the layers (lowers + upper/work) privately with this process's [`snapshotter`], calls
/// `f` with the merged root path, and unmounts (after which the upper dir holds the changes).
/// `f` runs on a dedicated thread that has its own mount namespace, so no mount is ever visible
/// to, or leaked into, the host namespace.
pub fn with_rootfs<R: Send>(
    lower_dirs: &[PathBuf],
    upper: &Path,
    work: &Path,
    f: impl FnOnce(&Path) -> R + Send,
) -> Result<R, SandboxError> {
    parent::with_rootfs(lower_dirs, upper, work, f)
}

/// Why a step could not be run.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// A system call failed on a path.
    #[error("{call} {path}: {source}")]
    Sys {
        /// The failing call.
        call: String,
        /// The path it was about.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The overlay mount was refused.
    #[error("mounting overlay ({option} for {path}): {source}{}", if log.is_empty() { String::new() } else { format!(" ({log})") })]
    Overlay {
        /// The layer or dir the failing option was about.
        path: PathBuf,
        /// The option (`lowerdir+`, `upperdir`, ...) or `create`.
        option: String,
        /// The error.
        source: io::Error,
        /// The kernel's own explanation, when it gave one.
        log: String,
    },
    /// The spec cannot be run as given.
    #[error("invalid sandbox spec: {0}")]
    InvalidInput(String),
    /// Resolving the step's user in the rootfs failed.
    #[error(transparent)]
    User(#[from] users::UserError),
    /// Setting up the sandbox failed inside the helper (the message names the call and path).
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The helper process died without reporting a result.
    #[error("sandbox helper {exe} exited without a result ({status})")]
    HelperDied {
        /// The helper executable.
        exe: PathBuf,
        /// How it ended.
        status: String,
    },
    /// The step was cancelled and everything in it killed.
    #[error("cancelled")]
    Cancelled,
    /// The step hit a limit and was killed.
    #[error("killed: {0}")]
    LimitReached(LimitHit),
    /// Limits that were asked for cannot be applied on this machine.
    #[error("the resource limits cannot be applied here: {0}")]
    LimitsUnavailable(String),
}

impl SandboxError {
    fn sys(call: &str, path: &Path, source: io::Error) -> SandboxError {
        SandboxError::Sys {
            call: call.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The files of a step's scratch dir, bound into the rootfs at `/etc/NAME`.
const SCRATCH_FILES: [&str; 3] = ["hosts", "hostname", "resolv.conf"];

/// Removes a sandbox scratch dir: its `files`, then `root/`, `empty/` and the dir itself, entry
/// by entry (never recursively: nothing beyond it can go, even if a mount were visible). The
/// helper does this too when its step ends, so a killed kiln leaves no scratch dir behind.
fn remove_scratch(dir: &Path, files: &[&str]) {
    for f in files {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for d in ["root", "empty", ""] {
        let _ = std::fs::remove_dir(dir.join(d));
    }
}

/// Where the sandbox init gets the step's rootfs.
#[derive(Debug, Serialize, Deserialize)]
enum RootfsSource {
    /// It mounts a kernel overlay itself.
    Overlay {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        userxattr: bool,
    },
    /// It binds a rootfs mounted by kiln (fuse-overlayfs, a copy); `upper` is the dir that
    /// collects changes (fuse-overlayfs), if there is one to look at while the step runs.
    Prepared {
        root: PathBuf,
        upper: Option<PathBuf>,
    },
}

/// What the helper needs from a [`RunSpec`], sent to it as JSON.
#[derive(Debug, Serialize, Deserialize)]
struct InitConfig {
    rootfs: RootfsSource,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    user: String,
    hostname: String,
    network: NetworkMode,
    binds: Vec<BindMount>,
    /// A private scratch dir: `root/` (mount point), `empty/` (lower for FROM scratch), and the
    /// `hosts`, `hostname`, `resolv.conf` files to bind into the rootfs.
    scratch: PathBuf,
    /// The step's cgroup, which the helper puts the step into and removes afterwards.
    cgroup: Option<cgroups::StepCgroup>,
    /// rlimits set before the command runs.
    rlimits: Vec<Ulimit>,
    /// Bytes of `/dev/shm`.
    shm_size: u64,
}

/// One report from the helper or the sandbox init, one JSON line each on the status pipe.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    /// The init created this path (relative to the rootfs) as a mount point.
    Created(String),
    /// Creating a mount point copied this lower dir up (relative path and its lower metadata).
    CopiedUp {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Setup failed.
    Error(String),
    /// The command ended with this code.
    Exit(i32),
    /// The command was killed on request.
    Cancelled,
    /// The step hit a limit of its cgroup (and was killed, if it still ran).
    Limit(LimitHit),
}
