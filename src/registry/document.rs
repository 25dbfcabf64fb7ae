//! What a fetched manifest document is: an image manifest or an index, decided only when the
//! Content-Type, the `mediaType` field and the fields present all agree. A document that could
//! be read both ways (CVE-2021-41190: `layers` and `manifests` together, or a `mediaType` that
//! contradicts the Content-Type or the fields) is refused, never interpreted by a guess.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::client::{
    MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};

/// The fields that tell a manifest from an index. Unknown fields are ignored; a duplicated
/// field is an error (serde refuses it), so no reader can pick a different copy.
#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    layers: Option<IgnoredAny>,
    config: Option<IgnoredAny>,
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

/// The media type of the manifest document `bytes` served with `content_type`, or why it is
/// refused. A specific Content-Type (`application/vnd.…`) and the `mediaType` field must
/// agree when both are given; the type they name must fit the fields present (an index has
/// `manifests` and no `layers` or `config`, a manifest the reverse); without either, the
/// fields alone decide, and a document with neither kind of field is refused. Types other
/// than manifests and indexes are returned as they are, for the caller to refuse or handle.
pub fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Result<String, String> {
    // JSON is UTF-8; serde skips the fields it ignores without checking them, so check first
    // (another reader would refuse what this one let through).
    let text =
        std::str::from_utf8(bytes).map_err(|e| format!("the manifest is not UTF-8 text: {e}"))?;
    let shape: Shape = serde_json::from_str(text)
        .map_err(|e| format!("the manifest is not a valid JSON document: {e}"))?;
    let index_fields = shape.manifests.is_some();
    let manifest_fields = shape.layers.is_some() || shape.config.is_some();
    if index_fields && manifest_fields {
        return Err(
            "the document has both `manifests` and `layers`/`config`, so it reads as an image \
             manifest and as an index (CVE-2021-41190)"
                .to_string(),
        );
    }
    let served = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| c.starts_with("application/vnd."));
    let field = shape.media_type.filter(|m| !m.is_empty());
    if let (Some(served), Some(field)) = (&served, &field)
        && served != field
    {
        return Err(format!(
            "it was served as {served} but its mediaType says {field}"
        ));
    }
    let Some(declared) = field.or(served) else {
        return match (index_fields, manifest_fields) {
            (true, _) => Ok(MEDIA_OCI_INDEX.to_string()),
            (_, true) => Ok(MEDIA_OCI_MANIFEST.to_string()),
            _ => Err("neither its type nor its fields say what the document is".to_string()),
        };
    };
    if is_index(&declared) && manifest_fields {
        return Err(format!(
            "it says it is an index ({declared}) but has `layers` or `config`"
        ));
    }
    if is_manifest(&declared) && index_fields {
        return Err(format!(
            "it says it is an image manifest ({declared}) but has `manifests`"
        ));
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"schemaVersion":2,"config":{},"layers":[]}"#;
    const INDEX: &str = r#"{"schemaVersion":2,"manifests":[]}"#;

    fn kind(ct: Option<&str>, body: &str) -> Result<String, String> {
        manifest_media_type(ct, body.as_bytes())
    }

    #[test]
    fn agreeing_documents_are_accepted() {
        assert_eq!(
            kind(Some(MEDIA_OCI_MANIFEST), MANIFEST).unwrap(),
            MEDIA_OCI_MANIFEST
        );
        assert_eq!(
            kind(Some("Application/VND.oci.image.index.v1+json; x=y"), INDEX).unwrap(),
            MEDIA_OCI_INDEX
        );
        assert_eq!(kind(None, MANIFEST).unwrap(), MEDIA_OCI_MANIFEST);
        assert_eq!(
            kind(Some("application/json"), INDEX).unwrap(),
            MEDIA_OCI_INDEX
        );
        let docker =
            format!(r#"{{"mediaType":"{MEDIA_DOCKER_MANIFEST}","config":{{}},"layers":[]}}"#);
        assert_eq!(
            kind(Some(MEDIA_DOCKER_MANIFEST), &docker).unwrap(),
            MEDIA_DOCKER_MANIFEST
        );
        assert_eq!(
            kind(Some("application/octet-stream"), &docker).unwrap(),
            MEDIA_DOCKER_MANIFEST
        );
        // An unknown type is the caller's to refuse.
        let v1 = r#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#;
        assert!(kind(None, v1).unwrap().ends_with("v1+json"));
    }

    #[test]
    fn ambiguous_documents_are_refused() {
        let both = r#"{"schemaVersion":2,"config":{},"layers":[],"manifests":[]}"#;
        for ct in [None, Some(MEDIA_OCI_MANIFEST), Some(MEDIA_OCI_INDEX)] {
            let e = kind(ct, both).unwrap_err();
            assert!(e.contains("CVE-2021-41190"), "{e}");
        }
        let typed_index = format!(r#"{{"mediaType":"{MEDIA_OCI_INDEX}","manifests":[]}}"#);
        let e = kind(Some(MEDIA_OCI_MANIFEST), &typed_index).unwrap_err();
        assert!(
            e.contains("served as") && e.contains("mediaType says"),
            "{e}"
        );
        let e = kind(Some(MEDIA_OCI_INDEX), MANIFEST).unwrap_err();
        assert!(e.contains("has `layers` or `config`"), "{e}");
        let e = kind(Some(MEDIA_DOCKER_MANIFEST), INDEX).unwrap_err();
        assert!(e.contains("has `manifests`"), "{e}");
        let index_without_manifests =
            format!(r#"{{"mediaType":"{MEDIA_OCI_INDEX}","config":{{}}}}"#);
        assert!(kind(None, &index_without_manifests).is_err());
        assert!(kind(None, r#"{"schemaVersion":2}"#).is_err());
        assert!(kind(None, "garbage").is_err());
        // Bytes that are not UTF-8 inside a field no one reads here are refused too.
        let mut bad = MANIFEST.as_bytes().to_vec();
        bad.splice(1..1, b"\"x\":\"\x9e\x90\",".iter().copied());
        assert!(
            manifest_media_type(None, &bad)
                .unwrap_err()
                .contains("UTF-8")
        );
        // Two copies of a field cannot be read differently by different readers.
        let twice = format!(
            r#"{{"mediaType":"{MEDIA_OCI_MANIFEST}","mediaType":"{MEDIA_OCI_INDEX}","manifests":[]}}"#
        );
        assert!(kind(None, &twice).unwrap_err().contains("duplicate"));
    }
}
