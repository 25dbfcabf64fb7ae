//! OCI image formats, pure: the image config, manifest, index and descriptor types kiln reads
//! and writes, their canonical JSON encoding (sorted keys, compact) so digests are reproducible,
//! RFC 3339 timestamps, platforms, and the `docker save` archive format.
//!
//! Reading accepts both OCI and Docker v2 schema 2 media types; writing always produces OCI.
//! Empty optional fields are omitted the way docker and buildah omit them.

pub mod diff;
pub mod docker_archive;
mod platform;

pub use platform::{ARCHITECTURES, Platform, PlatformError, platform_names};

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::digest::Digest;

/// OCI image manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer, uncompressed tar.
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip-compressed tar.
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd-compressed tar.
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MEDIA_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (the Docker counterpart of an OCI index).
pub const DOCKER_MEDIA_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_MEDIA_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker layer, gzip-compressed tar.
pub const DOCKER_MEDIA_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker layer, uncompressed tar.
pub const DOCKER_MEDIA_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker layer, zstd-compressed tar.
pub const DOCKER_MEDIA_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
/// The most an image config may hold (as JSON): 16 MiB, for a pulled base image's config as
/// for a built stage's (plus its build args).
pub const MAX_CONFIG_LEN: usize = 16 << 20;

/// The index annotation saying what an entry is about another (BuildKit's attestations).
pub const ANNOTATION_REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// The index annotation naming the manifest an entry is about.
pub const ANNOTATION_REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
/// [`ANNOTATION_REFERENCE_TYPE`]'s value for an attestation manifest.
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";

/// Whether an index entry is an attestation manifest (about another entry, never run).
pub fn is_attestation(d: &Descriptor) -> bool {
    d.annotations
        .get(ANNOTATION_REFERENCE_TYPE)
        .map(String::as_str)
        == Some(ATTESTATION_MANIFEST)
}

/// The annotation naming an image inside an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Whether `media_type` names an image manifest (OCI or Docker v2 schema 2).
pub fn is_manifest_type(media_type: &str) -> bool {
    media_type == MEDIA_MANIFEST || media_type == DOCKER_MEDIA_MANIFEST
}

/// Whether `media_type` names an image index (OCI index or Docker manifest list).
pub fn is_index_type(media_type: &str) -> bool {
    media_type == MEDIA_INDEX || media_type == DOCKER_MEDIA_MANIFEST_LIST
}

/// The OCI layer media type for a Docker one (`…rootfs.diff.tar.gzip` → `…layer.v1.tar+gzip`),
/// so that a manifest kiln writes over a Docker image's layers is OCI throughout. Other
/// types are returned unchanged.
pub fn oci_layer_type(media_type: &str) -> &str {
    match media_type {
        DOCKER_MEDIA_LAYER_GZIP => MEDIA_LAYER_GZIP,
        DOCKER_MEDIA_LAYER_TAR => MEDIA_LAYER_TAR,
        DOCKER_MEDIA_LAYER_ZSTD => MEDIA_LAYER_ZSTD,
        other => other,
    }
}

/// A document that could not be read as the format it was expected to be.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not valid JSON, or JSON of the wrong shape.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// The kind of document ("image config", "manifest", ...).
        what: &'static str,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// `schemaVersion` is missing or not 2.
    #[error("{what}: unsupported schemaVersion {found:?} (expected 2)")]
    SchemaVersion {
        /// The kind of document.
        what: &'static str,
        /// The version found, if any.
        found: Option<u64>,
    },
    /// `mediaType` names another kind of document.
    #[error("{what}: unexpected mediaType {found:?}")]
    MediaType {
        /// The kind of document.
        what: &'static str,
        /// The media type found.
        found: String,
    },
}

/// The JSON `{}` used as the value of `ExposedPorts` and `Volumes` entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyObject {}

/// Deserialises `null` (which Docker writes for empty lists and maps) as the default value.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The OCI image config: the subset kiln reads and writes. Fields kiln does not model (e.g.
/// Docker's `container_config`) are dropped when a config is re-written; imported config blobs
/// are always stored byte for byte.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Creation time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The image author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture (OCI names: `amd64`, `arm64`, ...).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// CPU variant (`v8`, `v7`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The runtime defaults for containers made from the image.
    #[serde(default, deserialize_with = "null_default")]
    pub config: RuntimeConfig,
    /// The layers' uncompressed digests, bottom first.
    #[serde(default, deserialize_with = "null_default")]
    pub rootfs: RootFs,
    /// One entry per build step, bottom first.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<History>,
}

/// The `config` member of an image config: defaults for running a container. JSON names are
/// the ones Docker writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    /// `USER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `EXPOSE`: `"80/tcp"` → `{}`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, EmptyObject>,
    /// `ENV`, as `KEY=value` strings in order.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`: path → `{}`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub volumes: BTreeMap<String, EmptyObject>,
    /// `WORKDIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `LABEL`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// `STOPSIGNAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// `HEALTHCHECK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `SHELL` (a Docker extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// `ONBUILD` triggers (a Docker extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
}

/// `HEALTHCHECK` settings, as Docker stores them (durations in nanoseconds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub test: Vec<String>,
    /// Time between checks, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Time before a check is considered hung, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Grace period after start, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    /// Time between checks during the start period, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
    /// Consecutive failures before unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// The `rootfs` member of an image config; `"type"` is always `"layers"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootFs {
    /// The layers' uncompressed digests, bottom first.
    pub diff_ids: Vec<Digest>,
}

impl Serialize for RootFs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("type", "layers")?;
        m.serialize_entry("diff_ids", &self.diff_ids)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for RootFs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(rename = "type", default)]
            kind: Option<String>,
            #[serde(default, deserialize_with = "null_default")]
            diff_ids: Vec<Digest>,
        }
        let w = Wire::deserialize(d)?;
        match w.kind.as_deref() {
            None | Some("layers") => Ok(RootFs {
                diff_ids: w.diff_ids,
            }),
            Some(other) => Err(serde::de::Error::custom(format!(
                "rootfs type {other:?} is not \"layers\""
            ))),
        }
    }
}

/// One entry of an image's history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When the step ran, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction that made the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// A free-form comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the step made no layer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub empty_layer: bool,
}

/// A content descriptor: what a blob is, its digest and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The blob's media type.
    #[serde(default)]
    pub media_type: String,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Annotations (e.g. `org.opencontainers.image.ref.name` in an index).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// The platform, for index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor with no annotations and no platform.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }

    /// Whether it describes an image index (or Docker manifest list).
    pub fn is_index(&self) -> bool {
        is_index_type(&self.media_type)
    }

    /// The `org.opencontainers.image.ref.name` annotation, if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .get(ANNOTATION_REF_NAME)
            .map(String::as_str)
    }
}

/// An image manifest. Serialises with `schemaVersion` 2 and the OCI manifest media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
    /// Manifest annotations.
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestWire {
    #[serde(default)]
    schema_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default, deserialize_with = "null_default")]
    layers: Vec<Descriptor>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    annotations: BTreeMap<String, String>,
}

impl Serialize for Manifest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ManifestWire {
            schema_version: Some(2),
            media_type: Some(MEDIA_MANIFEST.to_string()),
            config: self.config.clone(),
            layers: self.layers.clone(),
            annotations: self.annotations.clone(),
        }
        .serialize(s)
    }
}

fn check_header(
    what: &'static str,
    schema_version: Option<u64>,
    media_type: Option<&str>,
    accept: fn(&str) -> bool,
) -> Result<(), ImageError> {
    if schema_version != Some(2) {
        return Err(ImageError::SchemaVersion {
            what,
            found: schema_version,
        });
    }
    match media_type {
        Some(m) if !accept(m) => Err(ImageError::MediaType {
            what,
            found: m.to_string(),
        }),
        _ => Ok(()),
    }
}

impl Manifest {
    /// Parses an OCI or Docker v2 schema 2 image manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ImageError> {
        const WHAT: &str = "manifest";
        let w: ManifestWire = serde_json::from_slice(bytes)
            .map_err(|source| ImageError::Json { what: WHAT, source })?;
        check_header(
            WHAT,
            w.schema_version,
            w.media_type.as_deref(),
            is_manifest_type,
        )?;
        Ok(Manifest {
            config: w.config,
            layers: w.layers,
            annotations: w.annotations,
        })
    }

    /// The `mediaType` a manifest document declares, if it declares one.
    pub fn declared_media_type(bytes: &[u8]) -> Option<String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
        }
        serde_json::from_slice::<Probe>(bytes).ok()?.media_type
    }
}

/// An image index (or Docker manifest list). Serialises with `schemaVersion` 2 and the OCI
/// index media type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// The manifests (or nested indexes) listed.
    pub manifests: Vec<Descriptor>,
    /// Index annotations.
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexWire {
    #[serde(default)]
    schema_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    manifests: Vec<Descriptor>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    annotations: BTreeMap<String, String>,
}

impl Serialize for Index {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        IndexWire {
            schema_version: Some(2),
            media_type: Some(MEDIA_INDEX.to_string()),
            manifests: self.manifests.clone(),
            annotations: self.annotations.clone(),
        }
        .serialize(s)
    }
}

impl Index {
    /// An index of `manifests`, in this order, with no annotations.
    pub fn of(manifests: Vec<Descriptor>) -> Index {
        Index {
            manifests,
            annotations: BTreeMap::new(),
        }
    }

    /// The platforms of the entries that are images, in order: entries without a platform
    /// and BuildKit's `unknown/unknown` (attestation) entries are not images for one.
    pub fn platforms(&self) -> Vec<Platform> {
        self.manifests
            .iter()
            .filter_map(|d| d.platform.clone())
            .filter(|p| !p.is_unknown())
            .collect()
    }

    /// The first entry for `wanted` (see [`Platform::matches`]).
    pub fn select(&self, wanted: &Platform) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.matches(wanted)))
    }

    /// Parses an OCI image index or a Docker manifest list.
    pub fn from_json(bytes: &[u8]) -> Result<Index, ImageError> {
        const WHAT: &str = "index";
        let w: IndexWire = serde_json::from_slice(bytes)
            .map_err(|source| ImageError::Json { what: WHAT, source })?;
        check_header(
            WHAT,
            w.schema_version,
            w.media_type.as_deref(),
            is_index_type,
        )?;
        Ok(Index {
            manifests: w.manifests,
            annotations: w.annotations,
        })
    }
}

impl ImageConfig {
    /// Parses an OCI or Docker image config.
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "image config",
            source,
        })
    }

    /// The platform this config declares.
    pub fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
            os_version: None,
            os_features: Vec::new(),
        }
    }
}

/// Canonical JSON bytes: object keys sorted, no insignificant whitespace.
///
/// # Panics
/// Only if `v`'s `Serialize` implementation fails or produces a map with non-string keys,
/// which no kiln type does.
pub fn canonical_json<T: Serialize>(v: &T) -> Vec<u8> {
    let value = serde_json::to_value(v).expect("kiln's image types serialise to JSON");
    let mut out = Vec::new();
    write_canonical(&value, &mut out);
    out
}

/// [`canonical_json`] of a JSON value, without copying it first.
pub fn canonical_json_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(val, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Writing a scalar JSON value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
    let _ = out.flush();
}

/// RFC 3339 UTC timestamp (`1970-01-01T00:00:00Z`) for a unix time.
pub fn rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn canonical_json_sorts_and_compacts() {
        let mut a = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        let mut b = a.clone();
        for (k, v) in [("z", "1"), ("a", "2"), ("m", "3")] {
            a.config.labels.insert(k.into(), v.into());
        }
        for (k, v) in [("m", "3"), ("z", "1"), ("a", "2")] {
            b.config.labels.insert(k.into(), v.into());
        }
        let (ja, jb) = (canonical_json(&a), canonical_json(&b));
        assert_eq!(ja, jb);
        assert_eq!(
            String::from_utf8(ja).unwrap(),
            r#"{"architecture":"amd64","config":{"Labels":{"a":"2","m":"3","z":"1"}},"os":"linux","rootfs":{"diff_ids":[],"type":"layers"}}"#
        );
        let v = serde_json::json!({"b": [1, {"y": 1, "x": "é\n"}], "a": null});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":null,"b":[1,{"x":"é\n","y":1}]}"#
        );
    }

    #[test]
    fn parses_docker_config_with_nulls() {
        let json = br#"{"architecture":"amd64","os":"linux","config":{"Hostname":"","Env":null,
            "Cmd":["sh"],"Labels":null,"ExposedPorts":{"80/tcp":{}},"Entrypoint":null},
            "container_config":{},"rootfs":{"type":"layers","diff_ids":
            ["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history":[{"created":"2020-01-01T00:00:00Z","created_by":"x","empty_layer":true}]}"#;
        let c = ImageConfig::from_json(json).unwrap();
        assert_eq!(c.config.cmd, Some(vec!["sh".to_string()]));
        assert!(c.config.env.is_empty());
        assert_eq!(c.config.entrypoint, None);
        assert_eq!(c.rootfs.diff_ids.len(), 1);
        assert!(c.history[0].empty_layer);
        let again = ImageConfig::from_json(&canonical_json(&c)).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn manifest_and_index_check_types() {
        let m = Manifest {
            config: Descriptor::new(MEDIA_CONFIG, Digest::of(b"c"), 1),
            layers: vec![Descriptor::new(MEDIA_LAYER_GZIP, Digest::of(b"l"), 2)],
            annotations: BTreeMap::new(),
        };
        let bytes = canonical_json(&m);
        assert!(String::from_utf8_lossy(&bytes).contains(r#""schemaVersion":2"#));
        assert_eq!(Manifest::from_json(&bytes).unwrap(), m);
        assert!(matches!(
            Index::from_json(&bytes),
            Err(ImageError::MediaType { .. })
        ));
        let idx = Index {
            manifests: vec![Descriptor::new(MEDIA_MANIFEST, Digest::of(&bytes), 3)],
            annotations: BTreeMap::new(),
        };
        let ib = canonical_json(&idx);
        assert_eq!(Index::from_json(&ib).unwrap(), idx);
        assert!(idx.platforms().is_empty());
        assert!(Manifest::from_json(&ib).is_err());
        assert!(Manifest::from_json(b"{\"schemaVersion\":1}").is_err());
        assert!(Manifest::from_json(b"not json").is_err());
    }

    #[test]
    fn index_entries_by_platform() {
        let entry = |p: Option<&str>, data: &[u8]| Descriptor {
            platform: p.map(|p| Platform::parse(p).unwrap()),
            ..Descriptor::new(MEDIA_MANIFEST, Digest::of(data), 1)
        };
        let mut attestation = entry(None, b"att");
        attestation.platform = Some(Platform::new("unknown", "unknown", None));
        let idx = Index::of(vec![
            entry(Some("linux/amd64"), b"amd64"),
            entry(Some("linux/arm64"), b"arm64"),
            attestation,
            entry(None, b"none"),
        ]);
        let names: Vec<String> = idx.platforms().iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["linux/amd64", "linux/arm64"]);
        let arm = Platform::new("linux", "arm64", Some("v8"));
        assert_eq!(idx.select(&arm).unwrap().digest, Digest::of(b"arm64"));
        assert!(
            idx.select(&Platform::parse("linux/s390x").unwrap())
                .is_none()
        );
        let bytes = canonical_json(&idx);
        assert!(
            String::from_utf8_lossy(&bytes)
                .contains(r#""platform":{"architecture":"arm64","os":"linux"}"#)
        );
        assert_eq!(Index::from_json(&bytes).unwrap(), idx);
    }
}
