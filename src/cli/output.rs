//! `--output` specs: where a build's image goes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::Failure;

/// One `--output` destination.
pub(crate) enum Output {
    OciDir(PathBuf),
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
    Registry,
}

pub(crate) fn parse_output(spec: &str) -> Result<Output, Failure> {
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            Failure::usage(format!("--output {spec:?}: expected key=value pairs"))
        })?;
        fields.insert(k, v);
    }
    let dest = || {
        fields
            .get("dest")
            .map(PathBuf::from)
            .ok_or_else(|| Failure::usage(format!("--output {spec:?}: dest= is required")))
    };
    match fields.get("type").copied() {
        Some("oci") => Ok(Output::OciDir(dest()?)),
        Some("oci-archive") => Ok(Output::OciArchive(dest()?)),
        Some("docker-archive") | Some("docker") => Ok(Output::DockerArchive(dest()?)),
        Some("registry") | Some("image") => Ok(Output::Registry),
        other => Err(Failure::usage(format!(
            "--output {spec:?}: unknown type {other:?} (oci, oci-archive, docker-archive, registry)"
        ))),
    }
}
