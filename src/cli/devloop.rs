//! The `docker buildx build` flags of the everyday inner loop: `--build-context`, `--load`,
//! `--pull`, `--add-host`, `--no-cache-filter`; each turned into build options here.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use kiln::progress::Progress;
use kiln::store::{self, Store, StoredImage};

use kiln::sources::named::{self, NamedSource};

use super::Failure;

/// The inner-loop flags of `kiln build`.
#[derive(clap::Args)]
pub(crate) struct DevLoopArgs {
    /// A named context for FROM NAME, COPY --from=NAME and RUN --mount=…,from=NAME:
    /// NAME=DIR | NAME=docker-image://REF | NAME=oci-layout://DIR[:TAG] | NAME=target:STAGE
    /// (repeatable).
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    pub(crate) build_contexts: Vec<String>,
    /// Hand the image to `docker load` (else `podman load`) when the build is done.
    #[arg(long)]
    pub(crate) load: bool,
    /// Ask the registry for every base image, even those the store has.
    #[arg(long)]
    pub(crate) pull: bool,
    /// An /etc/hosts entry for RUN steps: HOST:IP or HOST=IP (`host-gateway` = 127.0.0.1,
    /// RUN steps share the host's network) (repeatable).
    #[arg(long = "add-host", value_name = "HOST:IP")]
    pub(crate) add_hosts: Vec<String>,
    /// Build these stages (names or indices) without the cache (repeatable, comma-separated).
    #[arg(
        long = "no-cache-filter",
        value_name = "STAGE[,STAGE]",
        value_delimiter = ','
    )]
    pub(crate) no_cache_filter: Vec<String>,
}

impl DevLoopArgs {
    /// The `--build-context` values, by name.
    pub(crate) fn named_contexts(&self) -> Result<BTreeMap<String, NamedSource>, Failure> {
        let mut out = BTreeMap::new();
        for spec in &self.build_contexts {
            let (name, source) = named::parse(spec).map_err(Failure::input)?;
            if out.insert(name.clone(), source).is_some() {
                return Err(Failure::usage(format!(
                    "--build-context {name:?} is given twice"
                )));
            }
        }
        Ok(out)
    }

    /// The `--add-host` entries as (host, address).
    pub(crate) fn extra_hosts(&self) -> Result<Vec<(String, String)>, Failure> {
        self.add_hosts
            .iter()
            .map(|spec| parse_add_host(spec))
            .collect()
    }
}

/// `--load`: writes the image as a docker-archive and hands it to `docker load`, else to
/// `podman load`; an error naming what each said when neither could take it.
pub(crate) fn load(
    store: &Store,
    image: &StoredImage,
    tags: &[String],
    progress: &Progress,
) -> Result<(), Failure> {
    let scratch = store.scratch_dir()?;
    let archive = scratch.path().join("image.tar");
    store::export_docker_archive(store, image, &archive, tags)?;
    let mut tried = Vec::new();
    for tool in ["docker", "podman"] {
        let out = Command::new(tool)
            .arg("load")
            .arg("-i")
            .arg(&archive)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let said = String::from_utf8_lossy(&out.stdout);
                progress.info(&format!("{tool} load: {}", said.trim()));
                return Ok(());
            }
            Ok(out) => {
                let said = String::from_utf8_lossy(&out.stderr);
                let last = said
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                tried.push(format!(
                    "`{tool} load` failed ({}): {}",
                    out.status,
                    last.trim()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(format!("{tool} is not installed"));
            }
            Err(e) => tried.push(format!("running {tool}: {e}")),
        }
    }
    Err(Failure::runtime(LoadError(tried.join("; "))).hint(
        "start the docker daemon or install podman; `--output type=docker-archive,dest=FILE` writes an archive to load later",
    ))
}

/// Neither docker nor podman took the image.
#[derive(Debug, thiserror::Error)]
#[error("--load: neither docker nor podman could load the image: {0}")]
struct LoadError(String);

/// One `--add-host HOST:IP` (or `HOST=IP`); the address must be an IP address.
fn parse_add_host(spec: &str) -> Result<(String, String), Failure> {
    let bad = |why: &str| Failure::usage(format!("--add-host {spec:?}: {why}"));
    let (host, ip) = match spec.split_once('=') {
        Some(pair) => pair,
        None => spec
            .split_once(':')
            .ok_or_else(|| bad("expected HOST:IP"))?,
    };
    let host = host.trim();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("the host name is empty or holds blanks"));
    }
    let ip = match ip.trim() {
        "host-gateway" => "127.0.0.1".to_string(),
        ip => {
            let bare = ip.trim_start_matches('[').trim_end_matches(']');
            bare.parse::<std::net::IpAddr>()
                .map_err(|_| bad(&format!("{ip:?} is not an IP address")))?
                .to_string()
        }
    };
    Ok((host.to_string(), ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_host_values() {
        let ok = |s: &str| parse_add_host(s).unwrap_or_else(|f| panic!("{s}: {}", f.error));
        assert_eq!(ok("db:10.0.0.5"), ("db".into(), "10.0.0.5".into()));
        assert_eq!(ok("db=10.0.0.5"), ("db".into(), "10.0.0.5".into()));
        assert_eq!(ok("v6:::1"), ("v6".into(), "::1".into()));
        assert_eq!(ok("v6=[fe80::1]"), ("v6".into(), "fe80::1".into()));
        assert_eq!(ok("gw:host-gateway"), ("gw".into(), "127.0.0.1".into()));
        for bad in ["nocolon", ":1.2.3.4", "h:notanip", "a b:1.2.3.4"] {
            assert!(parse_add_host(bad).is_err(), "{bad}");
        }
    }
}
