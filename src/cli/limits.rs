//! The resource-limit flags of `kiln build` (`--memory`, `--memory-swap`, `--cpus`,
//! `--pids-limit`, `--ulimit`, `--shm-size`, `--limits`), spelled and read as Docker reads
//! them, turned into [`Limits`].

use clap::ValueEnum;

use kiln::sandbox::limits::{Limits, PidsLimit, ULIMIT_NAMES, Ulimit};

use super::Failure;

/// What happens to limits that cannot be applied on this machine.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum LimitsPolicy {
    /// The build fails, saying which and why.
    Strict,
    /// They are skipped with a warning.
    BestEffort,
}

/// Resource limits for every RUN step of the build.
#[derive(clap::Args, Debug)]
pub(crate) struct LimitArgs {
    /// Memory of each RUN step, e.g. 512m or 2g (at least 6m); a step that needs more is
    /// killed and the build fails.
    #[arg(long, value_name = "BYTES")]
    memory: Option<String>,
    /// Memory plus swap of each RUN step (default: twice --memory; -1: unlimited swap).
    #[arg(long = "memory-swap", value_name = "BYTES", allow_hyphen_values = true)]
    memory_swap: Option<String>,
    /// CPUs' worth of time each RUN step may use, e.g. 1.5.
    #[arg(long, value_name = "N")]
    cpus: Option<String>,
    /// Processes (and threads) each RUN step may have at once (default 4096; 0 or -1:
    /// unlimited).
    #[arg(long = "pids-limit", value_name = "N", allow_hyphen_values = true)]
    pids_limit: Option<i64>,
    /// An rlimit of RUN steps, NAME=SOFT[:HARD] (nofile, nproc, core, stack, ...; -1 =
    /// unlimited; repeatable).
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    ulimits: Vec<String>,
    /// Size of /dev/shm in RUN steps (default 64m).
    #[arg(long = "shm-size", value_name = "BYTES")]
    shm_size: Option<String>,
    /// Limits that cannot be applied here (no cgroup can be made): fail the build (strict), or
    /// skip them with a warning (best-effort).
    #[arg(long = "limits", value_enum, default_value_t = LimitsPolicy::Strict)]
    limits: LimitsPolicy,
}

impl LimitArgs {
    /// The limits, or a usage error naming the flag.
    pub(crate) fn limits(&self) -> Result<Limits, Failure> {
        let memory = self
            .memory
            .as_deref()
            .map(|v| parse_bytes(v).map_err(|e| flag_error("--memory", v, &e)))
            .transpose()?;
        if let Some(m) = memory
            && m < 6 << 20
        {
            return Err(Failure::usage(format!(
                "--memory {m}: the smallest memory limit is 6m"
            )));
        }
        let memory_swap = match self.memory_swap.as_deref() {
            None => None,
            Some("-1") => Some(-1),
            Some(v) => Some(
                parse_bytes(v)
                    .map_err(|e| flag_error("--memory-swap", v, &e))
                    .and_then(|n| {
                        i64::try_from(n).map_err(|_| flag_error("--memory-swap", v, "too big"))
                    })?,
            ),
        };
        match (memory, memory_swap) {
            (None, Some(_)) => {
                return Err(Failure::usage(
                    "--memory-swap needs --memory (it is memory plus swap)",
                ));
            }
            (Some(m), Some(s)) if s != -1 && (s as u64) < m => {
                return Err(Failure::usage(format!(
                    "--memory-swap {s} is less than --memory {m}: it is memory plus swap"
                )));
            }
            _ => {}
        }
        let millicpus = self
            .cpus
            .as_deref()
            .map(|v| parse_cpus(v).map_err(|e| flag_error("--cpus", v, &e)))
            .transpose()?;
        let pids = match self.pids_limit {
            None => PidsLimit::Default,
            Some(n) if n <= 0 => PidsLimit::Unlimited,
            Some(n) => PidsLimit::Max(n as u64),
        };
        let ulimits = self
            .ulimits
            .iter()
            .map(|u| parse_ulimit(u).map_err(|e| flag_error("--ulimit", u, &e)))
            .collect::<Result<Vec<_>, _>>()?;
        let shm_size = self
            .shm_size
            .as_deref()
            .map(|v| parse_bytes(v).map_err(|e| flag_error("--shm-size", v, &e)))
            .transpose()?;
        if shm_size == Some(0) {
            return Err(Failure::usage("--shm-size 0: /dev/shm needs some space"));
        }
        let limits = Limits {
            memory,
            memory_swap,
            millicpus,
            pids,
            ulimits,
            shm_size,
            best_effort: self.limits == LimitsPolicy::BestEffort,
        };
        Ok(limits)
    }
}

fn flag_error(flag: &str, value: &str, why: &str) -> Failure {
    Failure::usage(format!("{flag} {value:?}: {why}"))
}

/// A size as Docker reads one: a number, optionally with a fraction, and a binary unit
/// (`b`, `k`, `m`, `g`, `t`, `p`, any case, optionally followed by `i` and/or `b`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| "expected a size such as 512m or 2g".to_string())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err("expected a size such as 512m or 2g".into()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err("too big".into());
    }
    Ok(bytes as u64)
}

/// `--cpus`: a positive decimal, in thousandths of a CPU (at least 0.01).
fn parse_cpus(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| "expected a number of CPUs such as 1.5".to_string())?;
    if !(0.01..=1_000_000.0).contains(&v) {
        return Err("the number of CPUs must be at least 0.01".into());
    }
    Ok((v * 1000.0).round() as u64)
}

/// `NAME=SOFT[:HARD]` (`-1` = unlimited).
fn parse_ulimit(s: &str) -> Result<Ulimit, String> {
    let (name, values) = s
        .split_once('=')
        .ok_or("expected NAME=SOFT[:HARD], e.g. nofile=1024:2048")?;
    let resource = ULIMIT_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| {
            format!(
                "unknown limit {name:?} (known: {})",
                ULIMIT_NAMES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let value = |v: &str| -> Result<u64, String> {
        match v.trim() {
            "-1" | "unlimited" => Ok(libc::RLIM_INFINITY),
            v => v
                .parse::<u64>()
                .map_err(|_| format!("{v:?} is not a number (or -1 for unlimited)")),
        }
    };
    let (soft, hard) = match values.split_once(':') {
        Some((s, h)) => (value(s)?, value(h)?),
        None => {
            let v = value(values)?;
            (v, v)
        }
    };
    if soft > hard {
        return Err("the soft limit is above the hard limit".into());
    }
    Ok(Ulimit {
        resource,
        soft,
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_docker_reads_them() {
        assert_eq!(parse_bytes("64m"), Ok(64 << 20));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert_eq!(parse_bytes("100b"), Ok(100));
        assert!(parse_bytes("12x").is_err());
        assert!(parse_bytes("m").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn cpus_in_thousandths() {
        assert_eq!(parse_cpus("1.5"), Ok(1500));
        assert_eq!(parse_cpus("0.01"), Ok(10));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("x").is_err());
    }

    #[test]
    fn ulimits() {
        assert_eq!(
            parse_ulimit("nofile=1024:2048"),
            Ok(Ulimit {
                resource: libc::RLIMIT_NOFILE as i32,
                soft: 1024,
                hard: 2048
            })
        );
        assert_eq!(parse_ulimit("core=-1").unwrap().hard, libc::RLIM_INFINITY);
        assert!(parse_ulimit("nofile=2048:1024").is_err());
        assert!(parse_ulimit("bogus=1").is_err());
        assert!(parse_ulimit("nofile").is_err());
    }
}
