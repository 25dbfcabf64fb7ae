//! The `docker save` archive format: a tar whose `manifest.json` lists, per image, the path of
//! its config file, its `RepoTags` and the paths of its layer tars (plain or compressed).
//!
//! kiln writes the layout Docker 25+ writes: an OCI image layout (`blobs/sha256/...`,
//! `index.json`, `oci-layout`) plus `manifest.json` pointing into `blobs/`, which both
//! `docker load` (any version) and OCI tools read.

use serde::{Deserialize, Serialize};

use super::{ImageError, canonical_json, null_default};

/// The name of the archive's table of contents.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One image in `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveEntry {
    /// Path of the image config inside the archive.
    #[serde(rename = "Config")]
    pub config: String,
    /// Names to tag the image with on load (`name:tag`).
    #[serde(rename = "RepoTags", default, deserialize_with = "null_default")]
    pub repo_tags: Vec<String>,
    /// Paths of the layer tars inside the archive, bottom first.
    #[serde(rename = "Layers", default, deserialize_with = "null_default")]
    pub layers: Vec<String>,
}

/// Parses `manifest.json`.
pub fn parse_manifest(bytes: &[u8]) -> Result<Vec<ArchiveEntry>, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        what: "docker-archive manifest.json",
        source,
    })
}

/// The bytes of `manifest.json` for `entries` (canonical JSON).
pub fn write_manifest(entries: &[ArchiveEntry]) -> Vec<u8> {
    canonical_json(&entries)
}

/// The short form Docker uses in `RepoTags`: `docker.io/library/busybox:latest` becomes
/// `busybox:latest`, `docker.io/me/app:1` becomes `me/app:1`; other names are unchanged.
pub fn familiar_name(name: &str) -> &str {
    name.strip_prefix("docker.io/library/")
        .filter(|rest| !rest.contains('/'))
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips() {
        let e = vec![ArchiveEntry {
            config: "blobs/sha256/abc".into(),
            repo_tags: vec!["busybox:latest".into()],
            layers: vec!["blobs/sha256/def".into()],
        }];
        let bytes = write_manifest(&e);
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"[{"Config":"blobs/sha256/abc","Layers":["blobs/sha256/def"],"RepoTags":["busybox:latest"]}]"#
        );
        assert_eq!(parse_manifest(&bytes).unwrap(), e);
        let legacy = br#"[{"Config":"x.json","RepoTags":null,"Layers":["a/layer.tar"]}]"#;
        assert!(parse_manifest(legacy).unwrap()[0].repo_tags.is_empty());
        assert!(parse_manifest(b"{}").is_err());
    }

    #[test]
    fn familiar_names() {
        assert_eq!(familiar_name("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(familiar_name("docker.io/me/app:1"), "me/app:1");
        assert_eq!(familiar_name("localhost:5000/x:y"), "localhost:5000/x:y");
    }
}
