//! How metadata instructions change the image config, as Docker writes it: ENV, LABEL,
//! EXPOSE (ranges expanded), VOLUME, USER, WORKDIR, CMD/ENTRYPOINT (shell forms wrapped in
//! the SHELL; CMD reset when ENTRYPOINT changes), STOPSIGNAL, HEALTHCHECK, SHELL, ONBUILD,
//! MAINTAINER.

use crate::image::{Healthcheck as HealthConfig, ImageConfig};
use crate::recipe::instructions::{CommandLine, Healthcheck};

/// The default search path for RUN steps and for images built `FROM scratch`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The default SHELL.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string()]
}

/// Sets `key=value` in a Docker-style env list, replacing an existing entry.
pub fn set_env(env: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    match env
        .iter_mut()
        .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    {
        Some(e) => *e = entry,
        None => env.push(entry),
    }
}

/// Looks a key up in a Docker-style env list.
pub fn get_env<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .find_map(|e| e.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// The argv for a command line: exec form as is, shell form wrapped in `shell`.
pub fn command_argv(cmd: &CommandLine, shell: &[String]) -> Vec<String> {
    match cmd {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => {
            let mut v = shell.to_vec();
            v.push(s.clone());
            v
        }
    }
}

/// Expands `EXPOSE` words (`80`, `8000-8002/udp`) into config keys (`80/tcp`, ...).
pub fn expose_ports(word: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match word.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (word, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid protocol {proto:?} in EXPOSE {word:?}"));
    }
    let parse = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("invalid port {s:?} in EXPOSE {word:?}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(ports)?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(format!("invalid port range in EXPOSE {word:?}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// Applies `HEALTHCHECK`.
pub fn set_healthcheck(config: &mut ImageConfig, hc: &Healthcheck) {
    config.config.healthcheck = Some(match hc {
        Healthcheck::None => HealthConfig {
            test: vec!["NONE".to_string()],
            ..Default::default()
        },
        Healthcheck::Check {
            command,
            interval_ns,
            timeout_ns,
            start_period_ns,
            start_interval_ns,
            retries,
        } => {
            let test = match command {
                CommandLine::Exec(v) => std::iter::once("CMD".to_string())
                    .chain(v.iter().cloned())
                    .collect(),
                CommandLine::Shell(s) => vec!["CMD-SHELL".to_string(), s.clone()],
            };
            let set = |ns: u64| (ns > 0).then_some(ns as i64);
            HealthConfig {
                test,
                interval: set(*interval_ns),
                timeout: set(*timeout_ns),
                start_period: set(*start_period_ns),
                start_interval: set(*start_interval_ns),
                retries: (*retries > 0).then_some(i64::from(*retries)),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_expands_ranges_and_defaults_tcp() {
        assert_eq!(expose_ports("80").unwrap(), vec!["80/tcp"]);
        assert_eq!(expose_ports("53/UDP").unwrap(), vec!["53/udp"]);
        assert_eq!(
            expose_ports("8000-8002").unwrap(),
            vec!["8000/tcp", "8001/tcp", "8002/tcp"]
        );
        assert!(expose_ports("80/xyz").is_err());
        assert!(expose_ports("9-1").is_err());
        assert!(expose_ports("http").is_err());
    }

    #[test]
    fn env_replaces_in_place() {
        let mut env = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        set_env(&mut env, "A", "2");
        set_env(&mut env, "B", "x=y");
        assert_eq!(env, vec!["PATH=/bin", "A=2", "B=x=y"]);
        assert_eq!(get_env(&env, "B"), Some("x=y"));
    }

    #[test]
    fn shell_form_is_wrapped() {
        let sh = default_shell();
        assert_eq!(
            command_argv(&CommandLine::Shell("echo hi".into()), &sh),
            vec!["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(
            command_argv(&CommandLine::Exec(vec!["a".into()]), &sh),
            vec!["a"]
        );
    }
}
