//! `--output` specs: where a build's result goes (an image in one of its forms, or the final
//! stage's files).

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln::build::export::FilesDest;

use super::Failure;

/// One `--output` destination.
#[derive(Debug, PartialEq)]
pub(crate) enum Output {
    OciDir(PathBuf),
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
    Registry,
    /// The final stage's files (`type=local`, `type=tar`, `-o DIR`, `-o -`).
    Files(FilesDest),
    /// Handed to `docker load` / `podman load` (`--load`, `type=docker` without dest).
    Load,
}

/// Parses one `--output` / `-o` value: `type=TYPE,KEY=VALUE,…`, or, when the value is not a
/// key=value list, a directory for the files (`-o DIR`), `-` for a tar of them on stdout.
pub(crate) fn parse_output(spec: &str) -> Result<Output, Failure> {
    if !spec.contains('=') {
        return match spec {
            "" => Err(Failure::usage("--output: empty value")),
            "-" => Ok(Output::Files(FilesDest::TarStdout)),
            dir => Ok(Output::Files(FilesDest::Dir(PathBuf::from(dir)))),
        };
    }
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
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| Failure::usage(format!("--output {spec:?}: dest= is required")))
    };
    match fields.get("type").copied() {
        Some("oci") => Ok(Output::OciDir(dest()?)),
        Some("oci-archive") => Ok(Output::OciArchive(dest()?)),
        Some("docker") if !fields.contains_key("dest") => Ok(Output::Load),
        Some("docker-archive") | Some("docker") => Ok(Output::DockerArchive(dest()?)),
        Some("registry") | Some("image") => Ok(Output::Registry),
        Some("local") => Ok(Output::Files(FilesDest::Dir(dest()?))),
        Some("tar") => match dest()? {
            d if d.as_os_str() == "-" => Ok(Output::Files(FilesDest::TarStdout)),
            d => Ok(Output::Files(FilesDest::TarFile(d))),
        },
        other => Err(Failure::usage(format!(
            "--output {spec:?}: unknown type {other:?} (local, tar, oci, oci-archive, docker-archive, registry)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(spec: &str) -> Output {
        parse_output(spec).unwrap_or_else(|f| panic!("{spec}: {}", f.error))
    }

    #[test]
    fn files_outputs() {
        assert_eq!(
            parsed("out"),
            Output::Files(FilesDest::Dir(PathBuf::from("out")))
        );
        assert_eq!(parsed("-"), Output::Files(FilesDest::TarStdout));
        assert_eq!(
            parsed("type=local,dest=a/b"),
            Output::Files(FilesDest::Dir(PathBuf::from("a/b")))
        );
        assert_eq!(
            parsed("type=tar,dest=x.tar"),
            Output::Files(FilesDest::TarFile(PathBuf::from("x.tar")))
        );
        assert_eq!(
            parsed("type=tar,dest=-"),
            Output::Files(FilesDest::TarStdout)
        );
        assert_eq!(
            parsed("type=oci,dest=d"),
            Output::OciDir(PathBuf::from("d"))
        );
        assert_eq!(parsed("type=docker"), Output::Load);
        assert_eq!(
            parsed("type=docker,dest=i.tar"),
            Output::DockerArchive(PathBuf::from("i.tar"))
        );
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("type=nope,dest=x").is_err());
        assert!(parse_output("").is_err());
    }
}
