//! `--secret` and `--ssh`: what RUN --mount=type=secret|ssh may use, checked before the build.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::Failure;
use kiln::build::{MAX_SECRET_BYTES, SecretSource};

/// `--secret` values, by id, as buildx takes them: `id=ID,src=PATH` (a file),
/// `id=ID,env=VAR` (the value of the environment variable VAR), `type=file|env` to say which
/// `src=` is, or `id=ID` alone (the variable ID if set, else the file ID). A file must exist
/// and hold at most 500 KiB; a variable must be set.
pub(crate) fn parse_secrets(specs: &[String]) -> Result<BTreeMap<String, SecretSource>, Failure> {
    let mut secrets = BTreeMap::new();
    for s in specs {
        let bad = |why: &str| Failure::usage(format!("--secret {s:?}: {why}"));
        let (mut id, mut src, mut env, mut kind) = (None, None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(v.to_string()),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", v @ ("file" | "env"))) => kind = Some(v),
                _ => return Err(bad("expected id=ID[,src=PATH|env=VAR][,type=file|env]")),
            }
        }
        let id = id
            .filter(|i| !i.is_empty())
            .ok_or_else(|| bad("expected id=ID"))?;
        if kind == Some("env") && env.is_none() {
            env = src.take();
        }
        if env.is_none() && src.is_none() {
            match std::env::var_os(&id) {
                Some(_) => env = Some(id.clone()),
                None => src = Some(id.clone()),
            }
        }
        let source = match (env, src) {
            (Some(var), _) => match std::env::var_os(&var) {
                Some(v) => SecretSource::Value(std::os::unix::ffi::OsStringExt::into_vec(v)),
                None => return Err(bad(&format!("the environment variable {var} is not set"))),
            },
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() && m.len() <= MAX_SECRET_BYTES => {}
                    Ok(m) if m.is_file() => {
                        return Err(bad(&format!(
                            "{} is bigger than {MAX_SECRET_BYTES} bytes",
                            path.display()
                        )));
                    }
                    _ => return Err(bad(&format!("{} is not a file", path.display()))),
                }
                SecretSource::File(path)
            }
            (None, None) => return Err(bad("expected src=PATH or env=VAR")),
        };
        secrets.insert(id, source);
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
