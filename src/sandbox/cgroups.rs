//! Cgroups for RUN steps: each step's processes run in a cgroup of their own (one per
//! controller hierarchy on cgroup v1) with its memory, CPU and process limits, made before the
//! step and removed after it.
//!
//! Where: cgroup v2 first. As root, under `/sys/fs/cgroup/kiln/`; as a normal user, in kiln's
//! own cgroup when it is delegated to the user and kiln is alone in it (`systemd-run --user
//! --scope -p Delegate=yes kiln build …`): kiln moves itself into a leaf `kiln-PID` so the
//! controllers can be enabled, and back when it is done. On cgroup v1, beside kiln's own
//! cgroup in each hierarchy (root only, unless a hierarchy was delegated). Step cgroups are
//! named `kiln-PID-N`; ones left by a kiln that no longer runs are removed when the next one
//! is made.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::SandboxError;
use super::limits::{LimitHit, LimitPlan};

/// A cgroup controller a limit needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Controller {
    /// `--memory`, `--memory-swap`.
    Memory,
    /// `--cpus`.
    Cpu,
    /// `--pids-limit`.
    Pids,
}

impl Controller {
    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

/// Where step cgroups are made, found once per build.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    kind: Kind,
    /// Controllers that cannot be used, with why.
    missing: BTreeMap<Controller, String>,
}

#[derive(Debug, Clone)]
enum Kind {
    /// cgroup v1: the parent dir of step cgroups in each controller's hierarchy.
    V1 {
        parents: BTreeMap<Controller, PathBuf>,
        swap: bool,
    },
    /// cgroup v2: the parent dir of step cgroups (controllers enabled in its subtree).
    V2 {
        parent: PathBuf,
        swap: bool,
        /// Set when kiln moved itself into a leaf to enable controllers; moves it back.
        _moved: Option<Arc<MovedSelf>>,
    },
}

impl Hierarchy {
    /// Whether `c` can be used.
    pub fn has(&self, c: Controller) -> bool {
        !self.missing.contains_key(&c)
    }

    /// Why `c` cannot be used.
    pub fn missing_reason(&self, c: Controller) -> String {
        self.missing
            .get(&c)
            .cloned()
            .unwrap_or_else(|| format!("the {} controller is available", c.name()))
    }

    /// Whether memory plus swap can be limited.
    pub fn has_swap_limit(&self) -> bool {
        match &self.kind {
            Kind::V1 { swap, .. } | Kind::V2 { swap, .. } => *swap,
        }
    }

    /// `cgroup v1 beside /sys/fs/cgroup/memory/x, ...` for progress output.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::V1 { parents, .. } => {
                let mut dirs: Vec<String> =
                    parents.values().map(|p| p.display().to_string()).collect();
                dirs.dedup();
                format!("cgroup v1 under {}", dirs.join(", "))
            }
            Kind::V2 { parent, .. } => format!("cgroup v2 under {}", parent.display()),
        }
    }
}

/// kiln's own move into a leaf cgroup (cgroup v2, delegated): undone on drop.
#[derive(Debug)]
struct MovedSelf {
    /// kiln's original cgroup (now the parent of step cgroups).
    home: PathBuf,
    /// The leaf kiln moved into.
    leaf: PathBuf,
    /// The controllers kiln enabled in `home`'s subtree.
    enabled: Vec<Controller>,
}

impl Drop for MovedSelf {
    fn drop(&mut self) {
        let disable: Vec<String> = self
            .enabled
            .iter()
            .map(|c| format!("-{}", c.name()))
            .collect();
        let _ = fs::write(self.home.join("cgroup.subtree_control"), disable.join(" "));
        if fs::write(self.home.join("cgroup.procs"), "0").is_ok() {
            let _ = fs::remove_dir(&self.leaf);
        }
    }
}

/// Finds where step cgroups with `wanted` controllers can be made, or says why none can.
pub fn find(wanted: &[Controller]) -> Result<Hierarchy, String> {
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    if is_cgroup2(Path::new("/sys/fs/cgroup")) {
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("cgroup v2 is mounted but /proc/self/cgroup has no v2 entry")?;
        find_v2(
            Path::new("/sys/fs/cgroup"),
            path,
            wanted,
            super::userns::is_host_root(),
        )
    } else {
        find_v1(&own, &mountinfo, wanted)
    }
}

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Whether this process may create a cgroup in `dir` (the host's file permissions decide: a
/// user namespace's root has no say over the host's cgroupfs).
fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The v1 hierarchies: (controllers, mount point, mounted root) from mountinfo.
fn v1_mounts(mountinfo: &str) -> Vec<(Vec<String>, PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split_whitespace();
            if post.next()? != "cgroup" {
                return None;
            }
            let options = post.nth(1)?;
            let mut pre = pre.split_whitespace();
            let root = pre.nth(3)?.to_string();
            let mount_point = PathBuf::from(unescape(pre.next()?));
            let controllers = options.split(',').map(str::to_string).collect();
            Some((controllers, mount_point, root))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|t| u8::from_str_radix(t, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn find_v1(own: &str, mountinfo: &str, wanted: &[Controller]) -> Result<Hierarchy, String> {
    let mounts = v1_mounts(mountinfo);
    let mut parents = BTreeMap::new();
    let mut missing = BTreeMap::new();
    for &c in ALL.iter().filter(|c| wanted.contains(c)) {
        let Some((_, mount_point, root)) = mounts
            .iter()
            .find(|(ctrls, _, _)| ctrls.iter().any(|x| x == c.name()))
        else {
            missing.insert(
                c,
                format!("no cgroup v1 hierarchy has the {} controller", c.name()),
            );
            continue;
        };
        let path = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|x| x == c.name())
                .then(|| path.to_string())
        });
        let Some(path) = path else {
            missing.insert(c, format!("/proc/self/cgroup names no {} cgroup", c.name()));
            continue;
        };
        let rel = path
            .strip_prefix(root.as_str())
            .unwrap_or(&path)
            .trim_start_matches('/');
        let dir = if rel.is_empty() {
            mount_point.clone()
        } else {
            mount_point.join(rel)
        };
        if writable(&dir) {
            parents.insert(c, dir);
        } else {
            missing.insert(
                c,
                format!(
                    "kiln may not create cgroups in {} (cgroup v1, not delegated to this user)",
                    dir.display()
                ),
            );
        }
    }
    let swap = parents
        .get(&Controller::Memory)
        .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists());
    Ok(Hierarchy {
        kind: Kind::V1 { parents, swap },
        missing,
    })
}

fn find_v2(
    mount: &Path,
    own: &str,
    wanted: &[Controller],
    host_root: bool,
) -> Result<Hierarchy, String> {
    let root_controllers = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    let (parent, moved) = if host_root {
        let parent = mount.join("kiln");
        match fs::create_dir(&parent) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(format!("cgroup v2: creating {}: {e}", parent.display()));
            }
            _ => {}
        }
        (parent, None)
    } else {
        let home = mount.join(own.trim_start_matches('/'));
        if !writable(&home) || !writable(&home.join("cgroup.subtree_control")) {
            return Err(format!(
                "cgroup v2: kiln's cgroup {} is not delegated to this user (run kiln in a delegated scope: systemd-run --user --scope -p Delegate=yes kiln build …)",
                home.display()
            ));
        }
        (home, Some(()))
    };
    // As root every controller of the root cgroup can be enabled down to `kiln/`; a delegated
    // cgroup offers what its parent gave it.
    let listed = if host_root {
        root_controllers
    } else {
        fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default()
    };
    let available: Vec<Controller> = ALL
        .into_iter()
        .filter(|c| listed.split_whitespace().any(|x| x == c.name()))
        .collect();
    let mut missing = BTreeMap::new();
    let mut enable = Vec::new();
    for &c in wanted {
        if available.contains(&c) {
            enable.push(c);
        } else {
            missing.insert(
                c,
                format!(
                    "cgroup v2: the {} controller is not available in {}",
                    c.name(),
                    parent.display()
                ),
            );
        }
    }
    let moved = match moved {
        Some(()) => Some(Arc::new(move_self_to_leaf(&parent, &enable)?)),
        None => {
            if host_root {
                let plus: Vec<String> = enable.iter().map(|c| format!("+{}", c.name())).collect();
                for dir in [mount, parent.as_path()] {
                    fs::write(dir.join("cgroup.subtree_control"), plus.join(" ")).map_err(|e| {
                        format!(
                            "cgroup v2: enabling {} in {}: {e}",
                            plus.join(" "),
                            dir.display()
                        )
                    })?;
                }
            }
            None
        }
    };
    // The parent has `memory.swap.max` where the kernel accounts swap.
    let swap = enable.contains(&Controller::Memory) && parent.join("memory.swap.max").exists();
    Ok(Hierarchy {
        kind: Kind::V2 {
            parent,
            swap,
            _moved: moved,
        },
        missing,
    })
}

/// Moves kiln into a leaf `kiln-PID` of its delegated cgroup `home` and enables `enable` in
/// `home`'s subtree (cgroup v2 allows controllers only where no process is).
fn move_self_to_leaf(home: &Path, enable: &[Controller]) -> Result<MovedSelf, String> {
    let leaf = home.join(format!("kiln-{}", std::process::id()));
    fs::create_dir(&leaf).map_err(|e| format!("cgroup v2: creating {}: {e}", leaf.display()))?;
    let mut moved = MovedSelf {
        home: home.to_path_buf(),
        leaf: leaf.clone(),
        enabled: Vec::new(),
    };
    fs::write(leaf.join("cgroup.procs"), "0")
        .map_err(|e| format!("cgroup v2: moving kiln into {}: {e}", leaf.display()))?;
    let plus: Vec<String> = enable.iter().map(|c| format!("+{}", c.name())).collect();
    fs::write(home.join("cgroup.subtree_control"), plus.join(" ")).map_err(|e| {
        format!(
            "cgroup v2: enabling {} in {}: {e} (other processes share kiln's cgroup: run kiln in a scope of its own, systemd-run --user --scope -p Delegate=yes kiln build …)",
            plus.join(" "),
            home.display()
        )
    })?;
    moved.enabled = enable.to_vec();
    Ok(moved)
}

/// A counter for step cgroup names.
static NEXT: AtomicU64 = AtomicU64::new(1);
/// Parent dirs already swept for leftovers in this process.
static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A step's cgroup (one dir per v1 hierarchy), handed to the sandbox helper: it puts the step
/// into it, watches for limits being hit, and removes it afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepCgroup {
    /// The cgroup dirs.
    dirs: Vec<PathBuf>,
    /// Version 2 (else 1): how a process joins.
    v2: bool,
    /// Where the memory cgroup counts OOM kills (`memory.oom_control` on v1, `memory.events`
    /// on v2), with the limit.
    memory_events: Option<(PathBuf, u64)>,
    /// Where the pids cgroup counts refused forks (`pids.events`), with the limit.
    pids_events: Option<(PathBuf, u64)>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    let p = dir.join(file);
    fs::write(&p, value).map_err(|e| SandboxError::sys(&format!("write {value:?} to"), &p, e))
}

/// Removes step cgroups left by kilns that no longer run (best effort, once per parent).
fn sweep(parent: &Path) {
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
        if swept.iter().any(|p| p == parent) {
            return;
        }
        swept.push(parent.to_path_buf());
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        // `kiln-PID-N` (a step's), or `kiln-PID` (a kiln's own leaf, cgroup v2).
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kiln-"))
            .map(|n| n.split('-').next().unwrap_or(n))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

impl StepCgroup {
    /// Makes the step's cgroup and writes its limits.
    pub fn create(h: &Hierarchy, plan: &LimitPlan) -> Result<StepCgroup, SandboxError> {
        let name = format!(
            "kiln-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut cg = StepCgroup {
            dirs: Vec::new(),
            v2: matches!(h.kind, Kind::V2 { .. }),
            memory_events: None,
            pids_events: None,
        };
        let mut make = |parent: &Path| -> Result<PathBuf, SandboxError> {
            sweep(parent);
            let dir = parent.join(&name);
            if !cg.dirs.contains(&dir) {
                fs::create_dir(&dir).map_err(|e| SandboxError::sys("create cgroup", &dir, e))?;
                cg.dirs.push(dir.clone());
            }
            Ok(dir)
        };
        match &h.kind {
            Kind::V1 { parents, swap } => {
                let dir_of = |c: Controller| parents.get(&c);
                let mut result = Ok(());
                if let (Some(m), Some(parent)) = (plan.memory, dir_of(Controller::Memory)) {
                    let dir = make(parent)?;
                    result = write(&dir, "memory.limit_in_bytes", &m.memory.to_string());
                    if result.is_ok()
                        && *swap
                        && let Some(total) = m.memory_and_swap
                    {
                        result = write(&dir, "memory.memsw.limit_in_bytes", &total.to_string());
                    }
                    cg.memory_events = Some((dir.join("memory.oom_control"), m.memory));
                }
                if let (Some(c), Some(parent), Ok(())) =
                    (plan.millicpus, dir_of(Controller::Cpu), &result)
                {
                    let dir = make(parent)?;
                    result = write(&dir, "cpu.cfs_period_us", "100000")
                        .and_then(|()| write(&dir, "cpu.cfs_quota_us", &(c * 100).to_string()));
                }
                if let (Some(n), Some(parent), Ok(())) =
                    (plan.pids, dir_of(Controller::Pids), &result)
                {
                    let dir = make(parent)?;
                    result = write(&dir, "pids.max", &n.to_string());
                    cg.pids_events = Some((dir.join("pids.events"), n));
                }
                if let Err(e) = result {
                    cg.remove();
                    return Err(e);
                }
            }
            Kind::V2 { parent, swap, .. } => {
                let dir = make(parent)?;
                let mut result = Ok(());
                if let Some(m) = plan.memory {
                    result = write(&dir, "memory.max", &m.memory.to_string())
                        .and_then(|()| write(&dir, "memory.oom.group", "1"));
                    if result.is_ok() && *swap {
                        let swap_max = match m.memory_and_swap {
                            Some(t) => t.saturating_sub(m.memory).to_string(),
                            None => "max".to_string(),
                        };
                        result = write(&dir, "memory.swap.max", &swap_max);
                    }
                    cg.memory_events = Some((dir.join("memory.events"), m.memory));
                }
                if let (Some(c), Ok(())) = (plan.millicpus, &result) {
                    result = write(&dir, "cpu.max", &format!("{} 100000", c * 100));
                }
                if let (Some(n), Ok(())) = (plan.pids, &result) {
                    result = write(&dir, "pids.max", &n.to_string());
                    cg.pids_events = Some((dir.join("pids.events"), n));
                }
                if let Err(e) = result {
                    cg.remove();
                    return Err(e);
                }
            }
        }
        Ok(cg)
    }

    /// Moves the calling process, which must be single-threaded, into the cgroup. On cgroup v1
    /// it writes `0` (itself) to `tasks`: moving the calling thread alone skips the global
    /// lock that moving a whole process takes (and its RCU grace period, 10–20 ms a step on a
    /// busy machine).
    pub fn join_self(&self) -> io::Result<()> {
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        for dir in &self.dirs {
            fs::write(dir.join(file), "0")
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        Ok(())
    }

    /// The limit the step hit, if any: an OOM kill, or a fork refused at the process limit.
    pub fn hit(&self) -> Option<LimitHit> {
        if let Some((file, limit)) = &self.memory_events
            && counter(file, "oom_kill") > 0
        {
            return Some(LimitHit::OutOfMemory { limit: *limit });
        }
        if let Some((file, limit)) = &self.pids_events
            && counter(file, "max") > 0
        {
            return Some(LimitHit::Pids { limit: *limit });
        }
        None
    }

    /// Removes the cgroup dirs, waiting (briefly) for exiting processes to leave them.
    pub fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        for dir in &self.dirs {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// The cgroup dirs (for tests and messages).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// The value of `key N` in a flat-keyed cgroup file (0 when absent).
fn counter(file: &Path, key: &str) -> u64 {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
        35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        39 31 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn v1_mounts_list_controllers_and_roots() {
        let m = v1_mounts(MOUNTINFO);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, ["rw", "cpu", "cpuacct"]);
        assert_eq!(m[0].1, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[1].2, "/docker/abc");
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }

    #[test]
    fn counters_read_flat_keyed_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.oom_control");
        fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(counter(&f, "oom_kill"), 3);
        assert_eq!(counter(&f, "under_oom"), 0);
        assert_eq!(counter(&dir.path().join("none"), "max"), 0);
    }

    #[test]
    fn v1_parent_is_own_cgroup_under_its_mount() {
        let own = "4:memory:/docker/abc/x\n1:cpu,cpuacct:/y\n0::/\n";
        let h = find_v1(
            own,
            MOUNTINFO,
            &[Controller::Memory, Controller::Cpu, Controller::Pids],
        );
        let h = h.unwrap();
        // Not writable in a test sandbox, or writable as root: either way the reason or the dir
        // names the right place.
        let memory = match &h.kind {
            Kind::V1 { parents, .. } => parents
                .get(&Controller::Memory)
                .map(|p| p.display().to_string()),
            Kind::V2 { .. } => unreachable!(),
        }
        .unwrap_or_else(|| h.missing_reason(Controller::Memory));
        assert!(memory.contains("/sys/fs/cgroup/memory/x"), "{memory}");
        assert!(
            h.missing_reason(Controller::Pids)
                .contains("no cgroup v1 hierarchy")
        );
    }

    /// A cgroup v2 tree made of plain files, as the kernel lays it out.
    fn fake_v2(controllers: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), controllers).unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        root
    }

    #[test]
    fn v2_as_root_enables_controllers_down_to_kiln_and_writes_limits() {
        use super::super::limits::{LimitPlan, MemoryLimit};
        let root = fake_v2("cpuset cpu io memory pids");
        let mount = root.path();
        fs::create_dir(mount.join("kiln")).unwrap();
        fs::write(mount.join("kiln/memory.swap.max"), "max").unwrap();
        let wanted = [Controller::Memory, Controller::Cpu, Controller::Pids];
        let h = find_v2(mount, "/user.slice/session-1.scope", &wanted, true).unwrap();
        assert!(ALL.iter().all(|c| h.has(*c)));
        assert!(h.has_swap_limit());
        assert_eq!(
            fs::read_to_string(mount.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        assert_eq!(
            h.describe(),
            format!("cgroup v2 under {}", mount.join("kiln").display())
        );
        let plan = LimitPlan {
            memory: Some(MemoryLimit {
                memory: 64 << 20,
                memory_and_swap: Some(96 << 20),
            }),
            millicpus: Some(1500),
            pids: Some(100),
            ..LimitPlan::default()
        };
        let cg = StepCgroup::create(&h, &plan).unwrap();
        let dir = &cg.dirs()[0];
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), (32u64 << 20).to_string());
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("cpu.max"), "150000 100000");
        assert_eq!(read("pids.max"), "100");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(cg.hit(), Some(LimitHit::OutOfMemory { limit: 64 << 20 }));
    }

    #[test]
    fn v2_rootless_needs_a_delegated_cgroup_and_moves_kiln_into_a_leaf() {
        let root = fake_v2("memory pids");
        let mount = root.path();
        let home = mount.join("user.slice/user@1000.service/app.slice/kiln.scope");
        fs::create_dir_all(&home).unwrap();
        fs::write(home.join("cgroup.controllers"), "memory pids").unwrap();
        fs::write(home.join("cgroup.subtree_control"), "").unwrap();
        let own = "/user.slice/user@1000.service/app.slice/kiln.scope";
        let h = find_v2(mount, own, &[Controller::Pids, Controller::Cpu], false).unwrap();
        assert!(h.has(Controller::Pids));
        assert!(!h.has(Controller::Cpu));
        assert!(h.missing_reason(Controller::Cpu).contains("not available"));
        let leaf = home.join(format!("kiln-{}", std::process::id()));
        assert_eq!(fs::read_to_string(leaf.join("cgroup.procs")).unwrap(), "0");
        assert_eq!(
            fs::read_to_string(home.join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        // Done: controllers disabled again, kiln back home, the leaf gone (a plain dir with a
        // file in it here, so only the first two show).
        drop(h);
        assert_eq!(
            fs::read_to_string(home.join("cgroup.subtree_control")).unwrap(),
            "-pids"
        );
        assert_eq!(fs::read_to_string(home.join("cgroup.procs")).unwrap(), "0");
    }
}
