//! Seccomp for RUN steps. Profiles are in Docker's format (`defaultAction`, `archMap`,
//! `syscalls` with `includes`/`excludes` by capability, architecture and kernel); the default
//! one ships as data (`seccomp-default.json`, Docker's default policy). A profile is read and
//! checked up front, and compiled once, in the calling process, when the first step needs it
//! (about 10 ms of CPU), with libseccomp into a BPF program for the native architecture and
//! its companions (x86 and x32 on x86_64); the sandbox init loads that program with seccomp(2)
//! just before it drops its capabilities and execs the step.

use std::io::{Read, Seek};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use serde::Deserialize;
use thiserror::Error;

/// Docker's default profile, as kiln applies it to every RUN step.
const DEFAULT_PROFILE: &str = include_str!("seccomp-default.json");

/// A checked seccomp profile and, once a step needed it, its BPF program.
#[derive(Clone)]
pub struct SeccompFilter {
    inner: Arc<Compiled>,
}

struct Compiled {
    profile: Profile,
    program: OnceLock<Result<Vec<u8>, String>>,
}

impl PartialEq for SeccompFilter {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for SeccompFilter {}

impl std::fmt::Debug for SeccompFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeccompFilter")
    }
}

/// Why a profile cannot be used.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The profile is not a valid profile document.
    #[error("invalid seccomp profile: {0}")]
    Profile(String),
    /// libseccomp refused to build the filter.
    #[error("compiling the seccomp profile: {0}")]
    Compile(String),
}

impl SeccompFilter {
    /// Docker's default profile (one per process, so it is compiled at most once).
    pub fn docker_default() -> Result<SeccompFilter, SeccompError> {
        static DEFAULT: OnceLock<Result<SeccompFilter, String>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                Self::from_profile(DEFAULT_PROFILE.as_bytes()).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(SeccompError::Profile)
    }

    /// A profile in Docker's JSON format, read and checked (actions, comparisons,
    /// architectures); compiled when a step first needs it.
    pub fn from_profile(json: &[u8]) -> Result<SeccompFilter, SeccompError> {
        let profile: Profile =
            serde_json::from_slice(json).map_err(|e| SeccompError::Profile(e.to_string()))?;
        check(&profile)?;
        Ok(SeccompFilter {
            inner: Arc::new(Compiled {
                profile,
                program: OnceLock::new(),
            }),
        })
    }

    /// The BPF program (`struct sock_filter` entries in native byte order) for the
    /// capabilities a RUN step keeps, compiled on the first call.
    pub(super) fn program(&self) -> Result<&[u8], SeccompError> {
        self.inner
            .program
            .get_or_init(|| {
                let caps: Vec<String> = super::init::KEPT_CAPABILITIES
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                compile(&self.inner.profile, &caps, go_arch(), &kernel_version())
                    .map_err(|e| e.to_string())
            })
            .as_deref()
            .map_err(|e| SeccompError::Compile(e.clone()))
    }
}

/// Everything in `profile` that compiling could refuse besides libseccomp itself.
fn check(profile: &Profile) -> Result<(), SeccompError> {
    action(&profile.default_action, profile.default_errno_ret)?;
    let arches =
        profile.arch_map.iter().flatten().flat_map(|m| {
            std::iter::once(&m.architecture).chain(m.sub_architectures.iter().flatten())
        });
    for name in arches.chain(profile.architectures.iter().flatten()) {
        ScmpArch::from_str(name)
            .map_err(|_| SeccompError::Profile(format!("unknown architecture {name:?}")))?;
    }
    for rule in profile.syscalls.iter().flatten() {
        action(&rule.action, rule.errno_ret)?;
        for arg in rule.args.iter().flatten() {
            compare(arg)?;
        }
    }
    Ok(())
}

/// A profile in Docker's format (the fields kiln acts on; others are ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    arch_map: Option<Vec<ArchMap>>,
    /// The older form: the architectures to add, without a map.
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    syscalls: Option<Vec<SyscallRule>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyscallRule {
    #[serde(default)]
    names: Option<Vec<String>>,
    /// The older form: one name.
    #[serde(default)]
    name: Option<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(default)]
    includes: Option<Condition>,
    #[serde(default)]
    excludes: Option<Condition>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// When a rule applies (`includes`: all of these hold) or does not (`excludes`: any holds).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(default)]
    caps: Option<Vec<String>>,
    #[serde(default)]
    arches: Option<Vec<String>>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// The architecture as Docker's profiles name it (Go's `GOARCH`).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The running kernel's `major.minor` (0.0 if unknown).
fn kernel_version() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| parse_version(&r))
        .unwrap_or((0, 0))
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

fn action(name: &str, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => ScmpAction::Allow,
        "SCMP_ACT_ERRNO" => ScmpAction::Errno(errno.unwrap_or(libc::EPERM as u32) as i32),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => ScmpAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => ScmpAction::KillProcess,
        "SCMP_ACT_TRAP" => ScmpAction::Trap,
        "SCMP_ACT_LOG" => ScmpAction::Log,
        "SCMP_ACT_TRACE" => ScmpAction::Trace(errno.unwrap_or(libc::EPERM as u32) as u16),
        other => {
            return Err(SeccompError::Profile(format!(
                "action {other:?} is not supported (ALLOW, ERRNO, KILL, KILL_THREAD, \
                 KILL_PROCESS, TRAP, LOG, TRACE)"
            )));
        }
    })
}

fn compare(arg: &Arg) -> Result<ScmpArgCompare, SeccompError> {
    let (op, datum) = match arg.op.as_str() {
        "SCMP_CMP_NE" => (ScmpCompareOp::NotEqual, arg.value),
        "SCMP_CMP_LT" => (ScmpCompareOp::Less, arg.value),
        "SCMP_CMP_LE" => (ScmpCompareOp::LessOrEqual, arg.value),
        "SCMP_CMP_EQ" => (ScmpCompareOp::Equal, arg.value),
        "SCMP_CMP_GE" => (ScmpCompareOp::GreaterEqual, arg.value),
        "SCMP_CMP_GT" => (ScmpCompareOp::Greater, arg.value),
        "SCMP_CMP_MASKED_EQ" => (ScmpCompareOp::MaskedEqual(arg.value), arg.value_two),
        other => {
            return Err(SeccompError::Profile(format!(
                "argument comparison {other:?} is not supported"
            )));
        }
    };
    if arg.index > 5 {
        return Err(SeccompError::Profile(format!(
            "argument index {} (a system call has six)",
            arg.index
        )));
    }
    Ok(ScmpArgCompare::new(arg.index, op, datum))
}

/// Whether `rule` applies to a step holding `caps` on `arch` under kernel `kernel`, as
/// Docker decides it: every `includes` condition holds and no `excludes` condition does.
fn applies(rule: &SyscallRule, caps: &[String], arch: &str, kernel: &(u32, u32)) -> bool {
    let has_cap = |c: &String| caps.iter().any(|k| k.eq_ignore_ascii_case(c));
    if let Some(inc) = &rule.includes {
        if let Some(arches) = &inc.arches
            && !arches.is_empty()
            && !arches.iter().any(|a| a == arch)
        {
            return false;
        }
        if let Some(need) = &inc.caps
            && !need.iter().all(has_cap)
        {
            return false;
        }
        if let Some(min) = inc.min_kernel.as_deref().and_then(parse_version)
            && *kernel < min
        {
            return false;
        }
    }
    if let Some(exc) = &rule.excludes {
        if exc
            .arches
            .as_ref()
            .is_some_and(|arches| arches.iter().any(|a| a == arch))
        {
            return false;
        }
        if exc.caps.as_ref().is_some_and(|c| c.iter().any(has_cap)) {
            return false;
        }
        if let Some(min) = exc.min_kernel.as_deref().and_then(parse_version)
            && *kernel >= min
        {
            return false;
        }
    }
    true
}

fn compile_err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Compile(e.to_string())
}

/// The BPF program of `profile` for a step holding `caps`.
fn compile(
    profile: &Profile,
    caps: &[String],
    arch: &str,
    kernel: &(u32, u32),
) -> Result<Vec<u8>, SeccompError> {
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    let mut ctx = ScmpFilterContext::new(default).map_err(compile_err)?;
    let native = ScmpArch::native();
    let mut extra: Vec<&str> = Vec::new();
    if let Some(map) = &profile.arch_map {
        for m in map {
            if ScmpArch::from_str(&m.architecture).ok() == Some(native) {
                extra.extend(m.sub_architectures.iter().flatten().map(String::as_str));
            }
        }
    }
    extra.extend(profile.architectures.iter().flatten().map(String::as_str));
    for name in extra {
        let a = ScmpArch::from_str(name)
            .map_err(|_| SeccompError::Profile(format!("unknown architecture {name:?}")))?;
        if a != native && !ctx.is_arch_present(a).map_err(compile_err)? {
            ctx.add_arch(a).map_err(compile_err)?;
        }
    }
    for rule in profile.syscalls.iter().flatten() {
        if !applies(rule, caps, arch, kernel) {
            continue;
        }
        let act = action(&rule.action, rule.errno_ret)?;
        if act == default {
            // The filter does this anyway (and libseccomp refuses such a rule).
            continue;
        }
        let conditions = rule
            .args
            .iter()
            .flatten()
            .map(compare)
            .collect::<Result<Vec<_>, _>>()?;
        // libseccomp compares one argument once per rule: several comparisons of the same
        // argument become one rule each (either may match), as Docker does.
        let mut indices: Vec<u32> = rule.args.iter().flatten().map(|a| a.index).collect();
        indices.sort_unstable();
        let repeated = indices.windows(2).any(|w| w[0] == w[1]);
        let names = rule.names.iter().flatten().chain(rule.name.iter());
        for name in names {
            // A name this libseccomp does not know (or this architecture lacks) is skipped,
            // as Docker skips it.
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            if conditions.is_empty() {
                ctx.add_rule(act, syscall).map_err(compile_err)?;
            } else if repeated {
                for c in &conditions {
                    ctx.add_rule_conditional(act, syscall, std::slice::from_ref(c))
                        .map_err(compile_err)?;
                }
            } else {
                ctx.add_rule_conditional(act, syscall, &conditions)
                    .map_err(compile_err)?;
            }
        }
    }
    let mut out = tempfile::tempfile().map_err(compile_err)?;
    ctx.export_bpf(&out).map_err(compile_err)?;
    out.rewind().map_err(compile_err)?;
    let mut program = Vec::new();
    out.read_to_end(&mut program).map_err(compile_err)?;
    if program.is_empty() || program.len() % 8 != 0 {
        return Err(SeccompError::Compile(format!(
            "libseccomp exported {} bytes, not a BPF program",
            program.len()
        )));
    }
    Ok(program)
}

/// Installs `filter` on the calling thread (and so on everything it execs). Without
/// `no_new_privs`, the caller must still hold `CAP_SYS_ADMIN`: setuid programs in the step
/// keep working, as under Docker.
pub(super) fn load(program: &[u8]) -> std::io::Result<()> {
    let instructions: Vec<libc::sock_filter> = program
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let len = u16::try_from(instructions.len())
        .map_err(|_| std::io::Error::other("seccomp program longer than 65535 instructions"))?;
    let prog = libc::sock_fprog {
        len,
        filter: instructions.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `len` valid instructions that outlive the call; the kernel
    // copies the program.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &prog as *const libc::sock_fprog,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> Profile {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_default_profile_compiles() {
        let f = SeccompFilter::docker_default().unwrap();
        assert!(f.program().unwrap().len() > 100 * 8);
    }

    #[test]
    fn rules_apply_by_caps_arch_and_kernel_as_docker_decides() {
        let p = profile(include_str!("seccomp-default.json"));
        let rules = p.syscalls.as_ref().unwrap();
        let find = |name: &str| {
            rules
                .iter()
                .filter(|r| r.names.iter().flatten().any(|n| n == name))
                .collect::<Vec<_>>()
        };
        let kept = ["CAP_CHOWN".to_string(), "CAP_SYS_CHROOT".to_string()];
        let admin = ["CAP_SYS_ADMIN".to_string()];
        let k = (6, 1);
        let any = |name: &str, caps: &[String], arch: &str, kernel: (u32, u32)| {
            find(name)
                .iter()
                .any(|r| r.action == "SCMP_ACT_ALLOW" && applies(r, caps, arch, &kernel))
        };
        assert!(any("chroot", &kept, "amd64", k));
        assert!(!any("mount", &kept, "amd64", k));
        assert!(any("mount", &admin, "amd64", k));
        assert!(any("arch_prctl", &kept, "amd64", k));
        assert!(!any("arch_prctl", &kept, "arm64", k));
        assert!(any("ptrace", &kept, "amd64", k));
        assert!(!any("ptrace", &kept, "amd64", (4, 7)));
        // The namespace-free clone only without CAP_SYS_ADMIN (with it, clone is allowed whole).
        let masked = |caps: &[String]| {
            find("clone")
                .iter()
                .any(|r| r.args.is_some() && applies(r, caps, "amd64", &k))
        };
        assert!(masked(&kept));
        assert!(!masked(&admin));
    }

    #[test]
    fn bad_profiles_are_named() {
        let e = SeccompFilter::from_profile(b"{").unwrap_err();
        assert!(e.to_string().contains("invalid seccomp profile"), "{e}");
        let e = SeccompFilter::from_profile(br#"{"defaultAction":"SCMP_ACT_NOPE"}"#).unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_NOPE"), "{e}");
        let e = SeccompFilter::from_profile(
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["personality"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_WHAT"}]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("SCMP_CMP_WHAT"), "{e}");
        // Unknown system call names are skipped, as Docker skips them.
        let f = SeccompFilter::from_profile(
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["no_such_call","mount"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        assert!(!f.program().unwrap().is_empty());
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_version("4.8"), Some((4, 8)));
        assert_eq!(parse_version("5"), Some((5, 0)));
        assert_eq!(parse_version("x"), None);
    }
}
