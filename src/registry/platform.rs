//! Choosing the manifest for a platform from an OCI image index or a Docker manifest list.

use serde::Deserialize;

use super::RegistryError;
use crate::digest::Digest;

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    variant: Option<String>,
}

/// Picks the manifest for `os`/`arch`/`variant` from an image index or manifest list and
/// returns its media type and digest. An entry whose variant equals the wanted one wins;
/// otherwise an entry without a variant; when no variant is wanted, the first entry for the
/// os and architecture (preferring one without a variant, or `v8` on arm64) is taken.
pub fn select_platform(
    index_json: &[u8],
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> Result<(String, Digest), RegistryError> {
    let index: Index =
        serde_json::from_slice(index_json).map_err(|e| RegistryError::BadIndex(e.to_string()))?;
    let matching: Vec<(&Entry, Option<&str>)> = index
        .manifests
        .iter()
        .filter_map(|e| {
            let p = e.platform.as_ref()?;
            (p.os == os && p.architecture == arch)
                .then(|| (e, p.variant.as_deref().filter(|v| !v.is_empty())))
        })
        .collect();
    let pick = match variant {
        Some(want) => matching
            .iter()
            .find(|(_, v)| *v == Some(want))
            .or_else(|| matching.iter().find(|(_, v)| v.is_none())),
        None => matching
            .iter()
            .find(|(_, v)| v.is_none() || (arch == "arm64" && *v == Some("v8")))
            .or_else(|| matching.first()),
    };
    let Some((entry, _)) = pick else {
        let available: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|e| e.platform.as_ref())
            .map(platform_name)
            .collect();
        return Err(RegistryError::NoMatchingPlatform {
            wanted: match variant {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            },
            available: if available.is_empty() {
                "none".to_string()
            } else {
                available.join(", ")
            },
        });
    };
    let digest = entry
        .digest
        .parse()
        .map_err(|e: crate::digest::DigestParseError| RegistryError::BadIndex(e.to_string()))?;
    Ok((entry.media_type.clone(), digest))
}

fn platform_name(p: &Platform) -> String {
    match &p.variant {
        Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
        _ => format!("{}/{}", p.os, p.architecture),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>, Digest)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, variant, d)| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = (*v).into();
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d.to_string(), "size": 1, "platform": p
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .unwrap()
    }

    #[test]
    fn picks_by_arch_and_variant() {
        let d = |s: &str| Digest::of(s.as_bytes());
        let idx = index(&[
            ("linux", "amd64", None, d("amd64")),
            ("linux", "arm", Some("v6"), d("armv6")),
            ("linux", "arm", Some("v7"), d("armv7")),
            ("linux", "arm64", Some("v8"), d("arm64")),
            ("unknown", "unknown", None, d("attestation")),
        ]);
        let pick = |arch, v| select_platform(&idx, "linux", arch, v).map(|(_, d)| d);
        assert_eq!(pick("amd64", None).unwrap(), d("amd64"));
        assert_eq!(pick("arm", Some("v7")).unwrap(), d("armv7"));
        assert_eq!(pick("arm", None).unwrap(), d("armv6"));
        assert_eq!(pick("arm64", None).unwrap(), d("arm64"));
        assert_eq!(pick("arm64", Some("v8")).unwrap(), d("arm64"));
        let err = pick("s390x", None).unwrap_err().to_string();
        assert!(
            err.contains("linux/s390x") && err.contains("linux/arm/v7"),
            "{err}"
        );
        assert!(pick("arm", Some("v5")).is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            select_platform(b"{}", "linux", "amd64", None),
            Err(RegistryError::BadIndex(_))
        ));
        assert!(select_platform(b"\xff", "linux", "amd64", None).is_err());
        let bad_digest = br#"{"manifests":[{"digest":"md5:x","platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert!(matches!(
            select_platform(bad_digest, "linux", "amd64", None),
            Err(RegistryError::BadIndex(_))
        ));
    }
}
