//! `--secret` and `--ssh`: what RUN --mount=type=secret|ssh may bind, checked before the build.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::Failure;

/// `--secret id=ID,src=PATH` values, by id; each source must be a file.
pub(crate) fn parse_secrets(specs: &[String]) -> Result<BTreeMap<String, PathBuf>, Failure> {
    let mut secrets = BTreeMap::new();
    for s in specs {
        let mut id = None;
        let mut src = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
                _ => {
                    return Err(Failure::usage(format!(
                        "--secret {s:?}: expected id=ID,src=PATH"
                    )));
                }
            }
        }
        match (id, src) {
            (Some(id), Some(src)) if src.is_file() => {
                secrets.insert(id, src);
            }
            (Some(_), Some(src)) => {
                return Err(Failure::usage(format!(
                    "--secret {s:?}: {} is not a file",
                    src.display()
                )));
            }
            _ => {
                return Err(Failure::usage(format!(
                    "--secret {s:?}: expected id=ID,src=PATH"
                )));
            }
        }
    }
    Ok(secrets)
}

/// `--ssh ID[=SOCKET]` values, by id; each must name an ssh-agent socket.
pub(crate) fn parse_ssh(specs: &[String]) -> Result<BTreeMap<String, PathBuf>, Failure> {
    let mut ssh = BTreeMap::new();
    for spec in specs {
        let (id, socket) = match spec.split_once('=') {
            Some((id, path)) => (id, PathBuf::from(path)),
            None => match std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
                Some(sock) => (spec.as_str(), PathBuf::from(sock)),
                None => {
                    return Err(Failure::usage(format!(
                        "--ssh {spec}: SSH_AUTH_SOCK is not set; start ssh-agent or pass \
                         --ssh {spec}=SOCKET"
                    )));
                }
            },
        };
        let is_socket = std::fs::metadata(&socket)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if id.is_empty() || !is_socket {
            return Err(Failure::usage(format!(
                "--ssh {spec}: {} is not an ssh-agent socket (kiln forwards a running agent; \
                 load keys into it with ssh-add)",
                socket.display()
            )));
        }
        ssh.insert(id.to_string(), socket);
    }
    Ok(ssh)
}
