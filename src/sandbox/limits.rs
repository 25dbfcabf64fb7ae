//! What a build asks to limit in each RUN step (`--memory`, `--memory-swap`, `--cpus`,
//! `--pids-limit`, `--ulimit`, `--shm-size`, `--limits`), and the plan for applying it here:
//! which limits go into a cgroup (see [`super::cgroups`]), which fall back to an rlimit, which
//! cannot be applied (an error, or a warning with `--limits=best-effort`).

use serde::{Deserialize, Serialize};

use super::cgroups::{self, Controller, Hierarchy};
use super::{SandboxError, userns};

/// The process limit of a RUN step when `--pids-limit` is not given: a fork bomb stops there.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// The size of a step's `/dev/shm` when `--shm-size` is not given (Docker's default).
pub const DEFAULT_SHM_SIZE: u64 = 64 << 20;

/// `--pids-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PidsLimit {
    /// Not given: [`DEFAULT_PIDS_LIMIT`], applied where it can be, else skipped with a warning.
    #[default]
    Default,
    /// `--pids-limit 0` or `-1`: none.
    Unlimited,
    /// `--pids-limit N`.
    Max(u64),
}

/// One `--ulimit NAME=SOFT[:HARD]`: an rlimit of the step's processes (-1 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// The `RLIMIT_*` resource number.
    pub resource: i32,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// The `--ulimit` names (Docker's) and their `RLIMIT_*` resources.
pub const ULIMIT_NAMES: [(&str, i32); 16] = [
    ("core", libc::RLIMIT_CORE as i32),
    ("cpu", libc::RLIMIT_CPU as i32),
    ("data", libc::RLIMIT_DATA as i32),
    ("fsize", libc::RLIMIT_FSIZE as i32),
    ("locks", libc::RLIMIT_LOCKS as i32),
    ("memlock", libc::RLIMIT_MEMLOCK as i32),
    ("msgqueue", libc::RLIMIT_MSGQUEUE as i32),
    ("nice", libc::RLIMIT_NICE as i32),
    ("nofile", libc::RLIMIT_NOFILE as i32),
    ("nproc", libc::RLIMIT_NPROC as i32),
    ("rss", libc::RLIMIT_RSS as i32),
    ("rtprio", libc::RLIMIT_RTPRIO as i32),
    ("rttime", libc::RLIMIT_RTTIME as i32),
    ("sigpending", libc::RLIMIT_SIGPENDING as i32),
    ("stack", libc::RLIMIT_STACK as i32),
    ("as", libc::RLIMIT_AS as i32),
];

/// The `--ulimit` name of a resource.
pub fn ulimit_name(resource: i32) -> &'static str {
    ULIMIT_NAMES
        .iter()
        .find(|(_, r)| *r == resource)
        .map_or("?", |(n, _)| n)
}

/// The resource limits of every RUN step of a build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// `--memory`: bytes of memory.
    pub memory: Option<u64>,
    /// `--memory-swap`: bytes of memory plus swap; `None` = as much swap as memory (when
    /// `--memory` is set); -1 = unlimited swap.
    pub memory_swap: Option<i64>,
    /// `--cpus`: CPUs' worth of time, in thousandths.
    pub millicpus: Option<u64>,
    /// `--pids-limit`.
    pub pids: PidsLimit,
    /// `--ulimit`s.
    pub ulimits: Vec<Ulimit>,
    /// `--shm-size`: bytes of `/dev/shm`.
    pub shm_size: Option<u64>,
    /// `--limits=best-effort`: limits that cannot be applied here are skipped with a warning
    /// instead of failing the build.
    pub best_effort: bool,
}

/// The memory and swap values a step cgroup gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLimit {
    /// Bytes of memory.
    pub memory: u64,
    /// Bytes of memory plus swap (`None` = unlimited swap).
    pub memory_and_swap: Option<u64>,
}

/// How the limits are applied to each step, decided once per build.
#[derive(Debug, Clone, Default)]
pub struct LimitPlan {
    /// Where step cgroups are made, when any limit needs one.
    pub hierarchy: Option<Hierarchy>,
    /// The memory limit (in the cgroup).
    pub memory: Option<MemoryLimit>,
    /// CPU time (in the cgroup), thousandths of a CPU.
    pub millicpus: Option<u64>,
    /// The process limit (in the cgroup).
    pub pids: Option<u64>,
    /// rlimits set in each step: `--ulimit`s, and `RLIMIT_NPROC` standing in for the process
    /// limit where no cgroup can be made.
    pub rlimits: Vec<Ulimit>,
    /// Bytes of `/dev/shm`.
    pub shm_size: u64,
    /// Lines for progress output: what is applied and how.
    pub notes: Vec<String>,
    /// Limits skipped (`--limits=best-effort`), for warnings.
    pub warnings: Vec<String>,
}

impl Limits {
    /// The memory limit a cgroup gets, with Docker's swap rules: unset = as much swap as
    /// memory, -1 = unlimited, else the total.
    fn memory_limit(&self) -> Result<Option<MemoryLimit>, SandboxError> {
        let Some(memory) = self.memory else {
            if self.memory_swap.is_some() {
                return Err(SandboxError::InvalidInput(
                    "--memory-swap needs --memory (it is memory plus swap)".into(),
                ));
            }
            return Ok(None);
        };
        let memory_and_swap = match self.memory_swap {
            None => Some(memory.saturating_mul(2)),
            Some(-1) => None,
            Some(n) if n < 0 || (n as u64) < memory => {
                return Err(SandboxError::InvalidInput(format!(
                    "--memory-swap {n} is less than --memory {memory}: it is memory plus swap"
                )));
            }
            Some(n) => Some(n as u64),
        };
        Ok(Some(MemoryLimit {
            memory,
            memory_and_swap,
        }))
    }

    /// Decides how the limits are applied on this machine; fails when a limit that was asked
    /// for cannot be applied, unless `--limits=best-effort`.
    pub fn plan(&self) -> Result<LimitPlan, SandboxError> {
        let memory = self.memory_limit()?;
        let pids = match self.pids {
            PidsLimit::Default => Some(DEFAULT_PIDS_LIMIT),
            PidsLimit::Unlimited => None,
            PidsLimit::Max(n) => Some(n),
        };
        let mut wanted = Vec::new();
        if memory.is_some() {
            wanted.push(Controller::Memory);
        }
        if self.millicpus.is_some() {
            wanted.push(Controller::Cpu);
        }
        if pids.is_some() {
            wanted.push(Controller::Pids);
        }
        let mut plan = LimitPlan {
            rlimits: self.ulimits.clone(),
            shm_size: self.shm_size.unwrap_or(DEFAULT_SHM_SIZE),
            ..Default::default()
        };
        if wanted.is_empty() {
            return Ok(plan);
        }
        let found = cgroups::find(&wanted);
        let missing = |c: Controller| match &found {
            Ok(h) if h.has(c) => None,
            Ok(h) => Some(h.missing_reason(c)),
            Err(why) => Some(why.clone()),
        };
        let mut skipped = Vec::new();
        if let Some(m) = memory {
            match missing(Controller::Memory) {
                None => {
                    let swap_ok = match &found {
                        Ok(h) => h.has_swap_limit(),
                        Err(_) => false,
                    };
                    if !swap_ok && self.memory_swap.is_some_and(|s| s != -1) {
                        skipped.push((
                            "--memory-swap",
                            "this kernel does not account swap (cgroup v1 without memory.memsw)"
                                .to_string(),
                        ));
                        plan.memory = Some(MemoryLimit {
                            memory_and_swap: None,
                            ..m
                        });
                    } else {
                        plan.memory = Some(MemoryLimit {
                            memory_and_swap: if swap_ok { m.memory_and_swap } else { None },
                            ..m
                        });
                    }
                }
                Some(why) => {
                    skipped.push(("--memory", why));
                    if self.memory_swap.is_some() {
                        skipped.push(("--memory-swap", "--memory is not applied".into()));
                    }
                }
            }
        }
        if let Some(c) = self.millicpus {
            match missing(Controller::Cpu) {
                None => plan.millicpus = Some(c),
                Some(why) => skipped.push(("--cpus", why)),
            }
        }
        if let Some(n) = pids {
            match missing(Controller::Pids) {
                None => plan.pids = Some(n),
                Some(why) => {
                    let nproc_asked = self
                        .ulimits
                        .iter()
                        .any(|u| u.resource == libc::RLIMIT_NPROC as i32);
                    // A user namespace's root is held to RLIMIT_NPROC (host root is not): it
                    // counts the step user's processes in kiln's namespace, not the step's
                    // alone, but it stops a fork bomb.
                    if userns::in_user_namespace() && !nproc_asked {
                        plan.rlimits.push(Ulimit {
                            resource: libc::RLIMIT_NPROC as i32,
                            soft: n,
                            hard: n,
                        });
                        plan.notes.push(format!(
                            "process limit {n}: RLIMIT_NPROC (per user id in kiln's user namespace), as no cgroup can be made: {why}"
                        ));
                    } else if self.pids == PidsLimit::Default {
                        plan.warnings.push(format!(
                            "RUN steps have no process limit (the default is {n}): {why}"
                        ));
                    } else {
                        skipped.push(("--pids-limit", why));
                    }
                }
            }
        }
        if !skipped.is_empty() && !self.best_effort {
            let list = skipped
                .iter()
                .map(|(flag, why)| format!("{flag}: {why}"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(SandboxError::LimitsUnavailable(list));
        }
        for (flag, why) in skipped {
            plan.warnings.push(format!("{flag} is not applied: {why}"));
        }
        if plan.memory.is_some() || plan.millicpus.is_some() || plan.pids.is_some() {
            let h = found.map_err(SandboxError::LimitsUnavailable)?;
            let mut applied = Vec::new();
            if let Some(m) = plan.memory {
                applied.push(format!("memory {}", human_bytes(m.memory)));
                match m.memory_and_swap {
                    Some(t) if h.has_swap_limit() => {
                        applied.push(format!("memory+swap {}", human_bytes(t)))
                    }
                    _ => {}
                }
            }
            if let Some(c) = plan.millicpus {
                applied.push(format!("cpus {}", c as f64 / 1000.0));
            }
            if let Some(n) = plan.pids {
                applied.push(format!("pids {n}"));
            }
            plan.notes
                .push(format!("limits: {} ({})", applied.join(", "), h.describe()));
            plan.hierarchy = Some(h);
        }
        Ok(plan)
    }
}

/// `64 MiB`, `1.5 GiB`, `512 KiB`, `100 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// What made the kernel stop a step: it hit one of its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitHit {
    /// The memory cgroup's OOM killer killed a process.
    OutOfMemory {
        /// The limit, bytes.
        limit: u64,
    },
    /// A fork or clone failed at the process limit.
    Pids {
        /// The limit.
        limit: u64,
    },
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::OutOfMemory { limit } => {
                write!(f, "out of memory (limit {})", human_bytes(*limit))
            }
            LimitHit::Pids { limit } => {
                write!(f, "could not fork: process limit {limit} reached")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(100), "100 B");
    }

    #[test]
    fn swap_follows_docker() {
        let l = |memory, memory_swap| Limits {
            memory,
            memory_swap,
            ..Default::default()
        };
        assert_eq!(
            l(Some(100), None).memory_limit().unwrap(),
            Some(MemoryLimit {
                memory: 100,
                memory_and_swap: Some(200)
            })
        );
        assert_eq!(
            l(Some(100), Some(-1))
                .memory_limit()
                .unwrap()
                .unwrap()
                .memory_and_swap,
            None
        );
        assert_eq!(
            l(Some(100), Some(150))
                .memory_limit()
                .unwrap()
                .unwrap()
                .memory_and_swap,
            Some(150)
        );
        assert!(l(Some(100), Some(50)).memory_limit().is_err());
        assert!(l(None, Some(50)).memory_limit().is_err());
        assert_eq!(l(None, None).memory_limit().unwrap(), None);
    }

    #[test]
    fn hits_are_told_in_words() {
        assert_eq!(
            LimitHit::OutOfMemory { limit: 64 << 20 }.to_string(),
            "out of memory (limit 64 MiB)"
        );
        assert_eq!(
            LimitHit::Pids { limit: 100 }.to_string(),
            "could not fork: process limit 100 reached"
        );
    }

    #[test]
    fn ulimit_names_round_trip() {
        for (name, r) in ULIMIT_NAMES {
            assert_eq!(ulimit_name(r), name);
        }
    }
}
