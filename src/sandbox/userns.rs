//! Rootless kiln: a normal user's kiln process moves itself into a user namespace in which it
//! is root, before it does anything else, so that unpacking layers, COPY --chown, the RUN
//! sandbox and the store all work as they do for root, on ids as the recipe sees them.
//!
//! The namespace's maps come from the user's ranges in `/etc/subuid` and `/etc/subgid`, written
//! by the setuid `newuidmap`/`newgidmap` of Debian's `uidmap` package: id 0 inside is the user,
//! ids 1.. are the subordinate ids. Without ranges (or without those programs) the map has the
//! single id 0 = the user, and files owned by any other id cannot be made: [`Rootless::warning`]
//! says so.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, unshare};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};
use thiserror::Error;

/// One line of a `uid_map` / `gid_map`: `count` ids from `inside` map to ids from `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the namespace.
    pub inside: u32,
    /// First id outside (on the host).
    pub outside: u32,
    /// How many ids.
    pub count: u32,
}

/// The user namespace kiln entered as a normal user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootless {
    /// The host user.
    pub uid: u32,
    /// The host user's primary group.
    pub gid: u32,
    /// The uid map written.
    pub uid_map: Vec<IdRange>,
    /// The gid map written.
    pub gid_map: Vec<IdRange>,
    /// Why only a single-id map could be made, when that is the case.
    pub warning: Option<String>,
}

impl Rootless {
    /// True when only id 0 exists inside (no subordinate ranges).
    pub fn single_id(&self) -> bool {
        self.uid_map.iter().map(|r| u64::from(r.count)).sum::<u64>() <= 1
    }

    /// One line for progress output: `uid 1000 as root, uids 1-65536 → 100000-165535, ...`.
    pub fn describe(&self) -> String {
        format!(
            "rootless: user namespace, uid map {}; gid map {}",
            describe_map(&self.uid_map),
            describe_map(&self.gid_map)
        )
    }
}

fn describe_map(map: &[IdRange]) -> String {
    map.iter()
        .map(|r| {
            if r.count == 1 {
                format!("{}→{}", r.inside, r.outside)
            } else {
                format!(
                    "{}-{}→{}-{}",
                    r.inside,
                    u64::from(r.inside) + u64::from(r.count) - 1,
                    r.outside,
                    u64::from(r.outside) + u64::from(r.count) - 1
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the user namespace could not be made.
#[derive(Debug, Error)]
pub enum UsernsError {
    /// The kernel refused to create a user namespace.
    #[error(
        "creating a user namespace: {0} (the kernel does not let this user create one: check the sysctls user.max_user_namespaces and kernel.unprivileged_userns_clone, or the container's seccomp/AppArmor profile)"
    )]
    Unshare(nix::Error),
    /// Writing the id maps failed.
    #[error("writing the user namespace's {what}: {source}")]
    Map {
        /// Which file.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A system call failed while setting up.
    #[error("{call}: {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// The error.
        source: nix::Error,
    },
}

static ENTERED: OnceLock<Rootless> = OnceLock::new();

/// The user namespace this process entered with [`enter`], if it did.
pub fn entered() -> Option<&'static Rootless> {
    ENTERED.get()
}

/// True when this process is root on the host (the initial user namespace, uid 0): no user
/// namespace is needed.
pub fn is_host_root() -> bool {
    Uid::effective().is_root() && !in_user_namespace()
}

/// True when this process runs in a user namespace other than the initial one (its uid map is
/// not the identity map of all ids).
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            parse_map(&map)
                != [IdRange {
                    inside: 0,
                    outside: 0,
                    count: u32::MAX,
                }]
        }
        Err(_) => false,
    }
}

/// The uid (or gid) map of this process, as the kernel shows it.
pub fn current_map(which: &str) -> Vec<IdRange> {
    std::fs::read_to_string(format!("/proc/self/{which}"))
        .map(|t| parse_map(&t))
        .unwrap_or_default()
}

/// True when `id` exists in this process's `uid_map`/`gid_map` (always on the host).
pub fn is_mapped(which: &str, id: u32) -> bool {
    current_map(which)
        .iter()
        .any(|r| id >= r.inside && u64::from(id) < u64::from(r.inside) + u64::from(r.count))
}

fn parse_map(text: &str) -> Vec<IdRange> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some(IdRange {
                inside: f.next()??,
                outside: f.next()??,
                count: f.next()??,
            })
        })
        .collect()
}

/// The ranges `(first, count)` that an `/etc/subuid`-format text grants to the user with this
/// name or numeric id, in file order (entries naming the user by name or by number both count).
pub fn subordinate_ranges(text: &str, name: Option<&str>, id: u32) -> Vec<(u32, u32)> {
    let id = id.to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let owner = f.next()?;
            let first = f.next()?.trim().parse::<u32>().ok()?;
            let count = f.next()?.trim().parse::<u32>().ok()?;
            (owner == id || Some(owner) == name)
                .then_some((first, count))
                .filter(|(_, c)| *c > 0)
        })
        .collect()
}

/// The map kiln asks for: 0 = the user's own id, then every subordinate range in turn from 1.
/// A range that contains the user's own id is used without that id (it is already 0).
pub fn plan_map(own: u32, ranges: &[(u32, u32)]) -> Vec<IdRange> {
    let mut map = vec![IdRange {
        inside: 0,
        outside: own,
        count: 1,
    }];
    let mut next: u64 = 1;
    let mut add = |first: u32, count: u32| {
        if count == 0 || next + u64::from(count) > u64::from(u32::MAX) {
            return;
        }
        map.push(IdRange {
            inside: next as u32,
            outside: first,
            count,
        });
        next += u64::from(count);
    };
    for &(first, count) in ranges {
        let end = u64::from(first) + u64::from(count);
        if (u64::from(first)..end).contains(&u64::from(own)) {
            add(first, own - first);
            add(own + 1, (end - u64::from(own) - 1) as u32);
        } else {
            add(first, count);
        }
    }
    map
}

/// Looks a program up in `PATH`, then in the usual system directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            p.is_file() && nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok()
        })
}

fn read_optional(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The maps a user's ranges allow, and the programs that write them.
struct FullMaps {
    uid_map: Vec<IdRange>,
    gid_map: Vec<IdRange>,
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

/// The full maps this user may have, or why only a single id can be mapped.
fn full_maps(uid: u32, gid: u32) -> Result<FullMaps, String> {
    let name = nix::unistd::User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let shown = name.clone().unwrap_or_else(|| uid.to_string());
    let subuid = subordinate_ranges(&read_optional("/etc/subuid"), name.as_deref(), uid);
    let subgid = subordinate_ranges(&read_optional("/etc/subgid"), name.as_deref(), uid);
    if subuid.is_empty() || subgid.is_empty() {
        return Err(format!(
            "user {shown} has no range in /etc/subuid and /etc/subgid (add one, e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {shown}`)"
        ));
    }
    let (Some(newuidmap), Some(newgidmap)) = (find_program("newuidmap"), find_program("newgidmap"))
    else {
        return Err(
            "newuidmap/newgidmap are not installed (Debian: apt-get install uidmap)".to_string(),
        );
    };
    Ok(FullMaps {
        uid_map: plan_map(uid, &subuid),
        gid_map: plan_map(gid, &subgid),
        newuidmap,
        newgidmap,
    })
}

/// The arguments of `newuidmap PID inside outside count ...`.
fn map_args(pid: Pid, map: &[IdRange]) -> Vec<String> {
    let mut args = vec![pid.to_string()];
    for r in map {
        args.extend([r.inside, r.outside, r.count].map(|n| n.to_string()));
    }
    args
}

/// Moves this process into a new user namespace in which it is root (see the module doc), and
/// records it for [`entered`]. Must be called while the process is single-threaded.
pub fn enter() -> Result<&'static Rootless, UsernsError> {
    if let Some(r) = ENTERED.get() {
        return Ok(r);
    }
    let (uid, gid) = (Uid::current().as_raw(), Gid::current().as_raw());
    let rootless = match full_maps(uid, gid) {
        Ok(m) => match unshare_with_helpers(&m.uid_map, &m.gid_map, &m.newuidmap, &m.newgidmap)? {
            Ok(()) => Rootless {
                uid,
                gid,
                uid_map: m.uid_map,
                gid_map: m.gid_map,
                warning: None,
            },
            Err(why) => single_id(uid, gid, why)?,
        },
        Err(why) => {
            unshare(CloneFlags::CLONE_NEWUSER).map_err(UsernsError::Unshare)?;
            single_id(uid, gid, why)?
        }
    };
    Ok(ENTERED.get_or_init(|| rootless))
}

/// Writes the single-id maps (the process has just unshared and has no maps yet).
fn single_id(uid: u32, gid: u32, why: String) -> Result<Rootless, UsernsError> {
    let write = |what: &'static str, text: String| {
        std::fs::write(format!("/proc/self/{what}"), text)
            .map_err(|source| UsernsError::Map { what, source })
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {uid} 1"))?;
    write("gid_map", format!("0 {gid} 1"))?;
    let one = |outside| {
        vec![IdRange {
            inside: 0,
            outside,
            count: 1,
        }]
    };
    Ok(Rootless {
        uid,
        gid,
        uid_map: one(uid),
        gid_map: one(gid),
        warning: Some(format!(
            "{why}; kiln runs with a single-id user namespace (root inside = you): files owned by other ids cannot be made, so layers that own files by other ids appear as root, and COPY --chown, USER and chown to other ids fail"
        )),
    })
}

/// Unshares a user namespace and has a child that stayed outside it run newuidmap and
/// newgidmap on this process. The outer error is fatal; the inner one (the helpers failed)
/// leaves this process in the namespace without maps, for [`single_id`].
fn unshare_with_helpers(
    uid_map: &[IdRange],
    gid_map: &[IdRange],
    newuidmap: &Path,
    newgidmap: &Path,
) -> Result<Result<(), String>, UsernsError> {
    let pipe = || {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|source| UsernsError::Sys {
            call: "pipe2",
            source,
        })
    };
    let (go_r, go_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    let me = Pid::this();
    let uid_args = map_args(me, uid_map);
    let gid_args = map_args(me, gid_map);
    // SAFETY: the caller guarantees this process is single-threaded; the child only reads a
    // pipe, runs two programs and exits.
    match unsafe { fork() }.map_err(|source| UsernsError::Sys {
        call: "fork",
        source,
    })? {
        ForkResult::Child => {
            drop((go_w, done_r));
            let outcome = map_from_outside(go_r, [(newuidmap, &uid_args), (newgidmap, &gid_args)]);
            let mut done = std::fs::File::from(done_w);
            let _ = done.write_all(outcome.err().unwrap_or_default().as_bytes());
            drop(done);
            // SAFETY: leaving the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop((go_r, done_w));
            let unshared = unshare(CloneFlags::CLONE_NEWUSER);
            // Closing `go` without writing tells the child to give up.
            let mut go = std::fs::File::from(go_w);
            if unshared.is_ok() {
                let _ = go.write_all(b"1");
            }
            drop(go);
            let mut report = String::new();
            let _ = std::fs::File::from(done_r).read_to_string(&mut report);
            let _ = waitpid(child, None);
            unshared.map_err(UsernsError::Unshare)?;
            if report.is_empty() && Uid::effective().is_root() {
                Ok(Ok(()))
            } else if report.is_empty() {
                Ok(Err("newuidmap/newgidmap left no map".to_string()))
            } else {
                Ok(Err(report))
            }
        }
    }
}

/// The child's part: waits for the parent to have unshared, then runs the map helpers.
fn map_from_outside(go: OwnedFd, helpers: [(&Path, &Vec<String>); 2]) -> Result<(), String> {
    let mut byte = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if !matches!(go.read(&mut byte), Ok(1)) {
        return Err("the parent did not unshare".into());
    }
    for (program, args) in helpers {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("running {}: {e}", program.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {} failed ({}): {}",
                program.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_by_name_or_id() {
        let text = "# comment\nalice:100000:65536\nbob:165536:65536\n1000:300000:10\nalice:400000:0\nbad:x:1\n";
        assert_eq!(
            subordinate_ranges(text, Some("alice"), 1000),
            vec![(100000, 65536), (300000, 10)]
        );
        assert_eq!(subordinate_ranges(text, Some("carol"), 1001), vec![]);
        assert_eq!(subordinate_ranges(text, None, 1000), vec![(300000, 10)]);
    }

    #[test]
    fn plan_puts_own_id_at_zero_and_ranges_after() {
        let r = |inside, outside, count| IdRange {
            inside,
            outside,
            count,
        };
        assert_eq!(
            plan_map(1000, &[(100000, 65536), (300000, 10)]),
            vec![r(0, 1000, 1), r(1, 100000, 65536), r(65537, 300000, 10)]
        );
        // A range holding the user's own id skips it.
        assert_eq!(
            plan_map(1005, &[(1000, 10)]),
            vec![r(0, 1005, 1), r(1, 1000, 5), r(6, 1006, 4)]
        );
        assert_eq!(plan_map(7, &[]), vec![r(0, 7, 1)]);
    }

    #[test]
    fn maps_parse_and_describe() {
        let m = parse_map("         0       1000          1\n         1     100000      65536\n");
        assert_eq!(m.len(), 2);
        assert_eq!(describe_map(&m), "0→1000, 1-65536→100000-165535");
        assert_eq!(
            parse_map("0 0 4294967295"),
            vec![IdRange {
                inside: 0,
                outside: 0,
                count: u32::MAX
            }]
        );
    }

    #[test]
    fn map_args_list_triples() {
        let m = plan_map(1000, &[(100000, 65536)]);
        assert_eq!(
            map_args(Pid::from_raw(42), &m),
            ["42", "0", "1000", "1", "1", "100000", "65536"]
        );
    }
}
