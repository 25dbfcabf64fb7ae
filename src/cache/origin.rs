//! Where promised blobs come from: `docker://HOST/REPO` (a registry repository) or
//! `oci:/DIR` (an OCI layout directory), and the [`BlobSource`] that fetches from both.

use std::io::Write;
use std::path::Path;

use crate::digest::Digest;
use crate::registry::{Client, Reference};
use crate::store::BlobSource;

const REGISTRY_PREFIX: &str = "docker://";
const DIR_PREFIX: &str = "oci:";

/// The origin of blobs in `r`'s repository.
pub fn registry_origin(r: &Reference) -> String {
    format!("{REGISTRY_PREFIX}{}/{}", r.registry, r.repository)
}

/// The origin of blobs in the OCI layout at `dir` (an absolute path).
pub fn dir_origin(dir: &Path) -> String {
    format!("{DIR_PREFIX}{}", dir.display())
}

/// The repository of a registry origin, when it is on `registry`: a blob there can be
/// mounted into another repository of that registry instead of uploaded.
pub fn mount_source(origin: &str, registry: &str) -> Option<String> {
    let r = registry_reference(origin)?;
    (r.registry == registry).then_some(r.repository)
}

fn registry_reference(origin: &str) -> Option<Reference> {
    let rest = origin.strip_prefix(REGISTRY_PREFIX)?;
    Reference::parse(rest).ok().filter(|r| r.digest.is_none())
}

/// Fetches promised blobs with a registry client, or from a layout directory.
pub struct Origins {
    client: Client,
}

impl Origins {
    /// Fetches through `client`.
    pub fn new(client: Client) -> Origins {
        Origins { client }
    }
}

impl BlobSource for Origins {
    fn fetch(&self, origin: &str, digest: &Digest, out: &mut dyn Write) -> Result<(), String> {
        if let Some(r) = registry_reference(origin) {
            return self
                .client
                .get_blob(&r, digest, out)
                .map(drop)
                .map_err(|e| e.to_string());
        }
        if let Some(dir) = origin.strip_prefix(DIR_PREFIX) {
            let path = Path::new(dir).join("blobs/sha256").join(digest.hex());
            let mut f =
                std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            return std::io::copy(&mut f, out)
                .map(drop)
                .map_err(|e| format!("{}: {e}", path.display()));
        }
        Err(format!("unknown blob origin {origin:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_name_a_repository_or_a_directory() {
        let r = Reference::parse("127.0.0.1:5000/team/cache:main").unwrap();
        let o = registry_origin(&r);
        assert_eq!(o, "docker://127.0.0.1:5000/team/cache");
        assert_eq!(
            mount_source(&o, "127.0.0.1:5000").as_deref(),
            Some("team/cache")
        );
        assert_eq!(mount_source(&o, "other:5000"), None);
        assert_eq!(mount_source("oci:/x", "127.0.0.1:5000"), None);
        assert_eq!(dir_origin(Path::new("/var/cache/k")), "oci:/var/cache/k");
    }

    #[test]
    fn layout_origins_serve_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"blob");
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        std::fs::write(dir.path().join("blobs/sha256").join(d.hex()), b"blob").unwrap();
        let o = Origins::new(Client::new(Default::default()));
        let mut out = Vec::new();
        o.fetch(&dir_origin(dir.path()), &d, &mut out).unwrap();
        assert_eq!(out, b"blob");
        let missing = Digest::of(b"none");
        assert!(
            o.fetch(&dir_origin(dir.path()), &missing, &mut out)
                .is_err()
        );
        assert!(
            o.fetch("ftp://x", &d, &mut out)
                .unwrap_err()
                .contains("unknown")
        );
    }
}
